"""Sharing runs through a DVC remote, experiments in the cache, and queued sweeps: the real dvc
CLI on the tiny config. Every output is cached and belongs to the params in dvc.lock: after a
pull or an `exp apply`, `dvc status` is clean."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import git_commit, run_dvc
from gptpipe.checkpoint import load_model

pytestmark = pytest.mark.filterwarnings("ignore")

# The tiny config with windows 4x sparser: 9 training steps instead of 36. These tests
# check what DVC stores and restores, not what the model learns.
SPARSE_STRIDE = 128
QUEUE_TIMEOUT_S = 300


def dvc(project: Path, *args: str) -> str:
    return run_dvc(project, *args, timeout=QUEUE_TIMEOUT_S)


def use_sparse_windows(project: Path) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"]["stride"] = SPARSE_STRIDE
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(project, "sparse windows")


def output_files(project: Path) -> dict[str, bytes]:
    """Every pipeline output under data/, metrics/ and plots/ (the .gitignore files are git's)."""
    return {str(path.relative_to(project)): path.read_bytes()
            for folder in ("data", "metrics", "plots")
            for path in sorted((project / folder).rglob("*"))
            if path.is_file() and path.name != ".gitignore"}


def test_push_then_pull_in_a_fresh_clone_restores_every_output(dvc_project, tmp_path):
    project = dvc_project
    use_sparse_windows(project)
    dvc(project, "repro")
    storage = tmp_path / "storage"
    dvc(project, "remote", "add", "-d", "storage", str(storage))
    git_commit(project, "run, shared through the storage remote")  # dvc.lock and .dvc/config
    dvc(project, "push")
    originals = output_files(project)
    assert {"data/model/model.safetensors", "data/model/config.json", "metrics/eval.json",
            "data/tokens/meta.json"} <= set(originals)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "data/model").exists()  # git holds no outputs
    dvc(clone, "pull")
    assert json.loads(dvc(clone, "status", "--json")) == {}  # every output is back, as dvc.lock names it
    assert output_files(clone) == originals


def cache_bytes(project: Path) -> int:
    return sum(path.stat().st_size for path in (project / ".dvc/cache").rglob("*") if path.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_experiments_cache_their_weights_once_and_apply_whole(dvc_project):
    """What one `dvc exp run` adds to the DVC cache: the model (its weights once, not AdamW's
    moments, which would triple it, nor a second copy for transformers: the model directory is
    the one transformers loads), the small reports, nothing else. And `dvc exp apply` of an
    earlier experiment brings back all of its outputs, that transformers model included."""
    project = dvc_project
    use_sparse_windows(project)
    dvc(project, "repro")
    before = cache_bytes(project)
    dvc(project, "exp", "run", "-n", "first", "-S", "train.lr=5e-4")
    added = cache_bytes(project) - before
    model = folder_bytes(project / "data/model")
    reports = sum(folder_bytes(project / folder) for folder in ("plots", "metrics", "data/samples"))
    assert model < added <= model + reports + 4096  # + .dir manifests
    assert not (project / "data/resume").exists() or not any((project / "data/resume").iterdir())
    first = output_files(project)

    dvc(project, "exp", "run", "-n", "second", "-S", "train.lr=1e-3")
    assert output_files(project)["data/model/model.safetensors"] != first["data/model/model.safetensors"]
    dvc(project, "exp", "apply", "first")
    assert json.loads(dvc(project, "status", "--json")) == {}
    assert output_files(project) == first
    transformers = pytest.importorskip("transformers", reason="a test dependency: pip install -e '.[test]'")
    hf = transformers.GPT2LMHeadModel.from_pretrained(project / "data/model").eval()
    ours, _ = load_model(project / "data/model", torch.device("cpu"))
    tokens = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-4)


def queue_statuses(project: Path) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    rows = re.findall(r"^[0-9a-f]{7}\s+(\S+)\s.*\s(\w+)\s*$", dvc(project, "queue", "status"), re.M)
    return dict(rows)


def wait_for_queue(project: Path) -> dict[str, str]:
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        statuses = queue_statuses(project)
        if not {"Queued", "Running"} & set(statuses.values()):
            return statuses
        assert time.monotonic() < deadline, f"queue still busy after {QUEUE_TIMEOUT_S} s: {statuses}"
        time.sleep(3)


def experiments(project: Path) -> dict[str, dict]:
    """{name: {"lr", "val_loss", "state"}} of the experiments `dvc exp show --json` lists."""
    found = {}
    for baseline in json.loads(dvc(project, "exp", "show", "--json")):
        for experiment in baseline["experiments"] or []:
            data = experiment["revs"][0]["data"]
            found[experiment["name"]] = {
                "lr": float(data["params"]["params.yaml"]["data"]["train"]["lr"]),
                "val_loss": data["metrics"]["metrics/eval.json"]["data"]["val"]["loss"],
                "state": experiment["executor"]["state"] if experiment["executor"] else None,
            }
    return found


def worker_pids(project: Path) -> list[int]:
    return [json.loads(path.read_text())["pid"]
            for path in (project / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json")]


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def queue_project(dvc_project):
    """The project; on teardown a worker still running (a failed test) is stopped, its run killed."""
    yield dvc_project
    if any(is_running(pid) for pid in worker_pids(dvc_project)):
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=dvc_project, capture_output=True)


def test_queued_sweep_runs_both_and_applies_the_best(queue_project):
    project = queue_project
    use_sparse_windows(project)
    queued = dvc(project, "exp", "run", "--queue", "-S", "train.lr=1e-4,4e-4")
    assert queued.count("for future execution") == 2  # queued, not run
    dvc(project, "queue", "start")
    statuses = wait_for_queue(project)
    assert len(statuses) == 2 and set(statuses.values()) == {"Success"}, "\n".join(
        dvc(project, "queue", "logs", name) for name, status in statuses.items() if status != "Success")

    shown = experiments(project)
    assert set(shown) == set(statuses)
    assert sorted(run["lr"] for run in shown.values()) == [1e-4, 4e-4]
    assert all(run["state"] == "success" for run in shown.values())
    assert len({run["val_loss"] for run in shown.values()}) == 2  # the learning rate mattered

    best = min(shown, key=lambda name: shown[name]["val_loss"])
    dvc(project, "exp", "apply", best)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert float(params["train"]["lr"]) == shown[best]["lr"]
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["val"]["loss"] == shown[best]["val_loss"]

    # Each experiment ran in a temporary copy under .dvc/tmp/exps; none is left behind,
    # and the worker, idle now, exits when told to.
    assert not list((project / ".dvc/tmp/exps").glob("tmp*"))
    dvc(project, "queue", "stop")
    deadline = time.monotonic() + 60
    while any(is_running(pid) for pid in worker_pids(project)) and time.monotonic() < deadline:
        time.sleep(1)
    assert worker_pids(project) and not any(is_running(pid) for pid in worker_pids(project))
