"""Pretraining survives being killed: a re-run resumes and ends bitwise where an
uninterrupted run ends (on CPU). And it can be watched: its curves and metrics so far are on
disk at every evaluation."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_tokens, stage_args, stage_command, write_params
from gptpipe.checkpoint import load_model

OVERRIDES = {**TINY, "train": {**TINY["train"], "epochs": 2, "checkpoint_every": 3, "eval_freq": 4}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_path):
    """Params and tokens of the tiny config, and the outputs of one uninterrupted run."""
    d = tmp_path_factory.mktemp("faults")
    params = write_params(d / "params.yaml", OVERRIDES, corpus_path)
    make_tokens(d, params)
    baseline = d / "baseline"
    assert pretrain(params, d / "tokens", baseline).wait(timeout=300) == 0
    return params, d / "tokens", baseline


def pretrain(params: Path, tokens: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(stage_command("pretrain", params, *stage_args("pretrain", out), "--tokens", str(tokens)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def assert_same_run(a: Path, b: Path) -> None:
    model_a, progress_a = load_model(a / "model", torch.device("cpu"))
    model_b, progress_b = load_model(b / "model", torch.device("cpu"))
    assert progress_a == progress_b
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    for name in ("losses.csv", "lr.csv"):
        assert (a / "plots" / name).read_bytes() == (b / "plots" / name).read_bytes()
    metrics_a, metrics_b = (json.loads((x / "train.json").read_text()) for x in (a, b))
    for key in ("loss", "steps", "tokens_seen"):  # the rest are timings
        assert metrics_a[key] == metrics_b[key]


def test_resume_after_sigkill_is_bitwise_identical(prepared, tmp_path):
    params, tokens, baseline = prepared
    run = pretrain(params, tokens, tmp_path)
    wait_for(tmp_path / "resume/pretrain.pt", run)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not (tmp_path / "model").exists()
    # the curves so far, which the resumed run continues
    assert (baseline / "plots/losses.csv").read_text().startswith((tmp_path / "plots/losses.csv").read_text())

    rerun = pretrain(params, tokens, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "resuming from" in stderr
    assert_same_run(baseline, tmp_path)
    assert not (tmp_path / "resume/pretrain.pt").exists()  # a finished run leaves no state


def test_sigterm_saves_state_and_exits_cleanly_then_resumes(prepared, tmp_path):
    params, tokens, baseline = prepared
    run = pretrain(params, tokens, tmp_path)
    wait_for(tmp_path / "resume/pretrain.pt", run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "error: stopped by signal 15" in stderr and "run the stage again" in stderr
    assert "Traceback" not in stderr
    # no run wrote here before: the stopped run's curves and metrics are gone again, its training kept
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "resume" not in p.parts]
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["pretrain.pt"]

    rerun = pretrain(params, tokens, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert_same_run(baseline, tmp_path)


def test_changed_params_start_fresh(prepared, tmp_path, corpus_path):
    params, tokens, _ = prepared
    run = pretrain(params, tokens, tmp_path)
    wait_for(tmp_path / "resume/pretrain.pt", run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    changed = write_params(tmp_path / "changed.yaml",
                           {**OVERRIDES, "train": {**OVERRIDES["train"], "lr": 1e-3}}, corpus_path)
    rerun = pretrain(changed, tokens, tmp_path)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert "other params or data: starting fresh" in stderr


def test_the_curves_and_metrics_so_far_are_on_disk_while_it_trains(prepared, tmp_path, corpus_path):
    _, tokens, _ = prepared
    params = write_params(tmp_path / "params.yaml",
                          {**OVERRIDES, "train": {**OVERRIDES["train"], "max_steps": 12, "eval_freq": 2}}, corpus_path)
    run = pretrain(params, tokens, tmp_path)
    losses, metrics = tmp_path / "plots/losses.csv", tmp_path / "train.json"
    seen = []  # losses.csv and the steps in train.json each time they changed, read while the run was going
    while run.poll() is None:
        if losses.exists() and metrics.exists():
            text, steps = losses.read_text(), json.loads(metrics.read_text())["steps"]
            if run.poll() is None and (not seen or text != seen[-1][0]):
                seen.append((text, steps))
        time.sleep(0.01)
    assert run.returncode == 0, run.stderr.read()
    final = losses.read_text()
    assert final.count("\n") == 1 + 6  # the header and 6 evaluations
    rows = [text.count("\n") for text, _ in seen]
    assert len(rows) >= 2 and rows == sorted(rows), "losses.csv did not grow during the run"
    assert all(final.startswith(text) for text, _ in seen)
    assert [steps for _, steps in seen] == sorted(steps for _, steps in seen)
    assert (tmp_path / "plots/lr.csv").read_text().count("\n") == 1 + 12
