"""python -m gptpipe.ci_report: two commits reproduced on a params set, reported as CI reports
them (the params that changed, `dvc metrics diff`, the loss curves of both)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from conftest import GIT_IDENTITY, git_commit
from gptpipe import ci_report, cli

# on the tiny config: 4 steps, evaluated at steps 0 and 2
PARAMS_SET = {"train": {"max_steps": 4, "eval_freq": 2, "eval_iter": 1}, "sample": {"max_new_tokens": 5}}


@pytest.fixture
def in_project(dvc_project, monkeypatch):
    """The tiny project as the working directory, with what `dvc` and its stages need from
    the environment (conftest.run_dvc sets the same)."""
    monkeypatch.chdir(dvc_project)
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(dvc_project.parent / "dvc-site-cache"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return dvc_project


def run_report(*args: str) -> tuple[int, str, str]:
    """ci_report's command line in this process: exit status, stdout, stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.run(ci_report.main, list(args))
            status = 0
        except SystemExit as e:
            status = e.code
    return status, stdout.getvalue(), stderr.getvalue()


def table(markdown: str, heading: str) -> list[list[str]]:
    """The rows of the Markdown table under `heading`, as cells."""
    section = markdown.split(heading, 1)[1].split("\n### ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    return rows[2:]  # after the header and its rule


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, text=True).stdout


def test_two_commits_reported(in_project, tmp_path):
    project = in_project
    params_set = tmp_path / "small.yaml"
    params_set.write_text(yaml.safe_dump(PARAMS_SET))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.001
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(project, "a higher learning rate")
    base, head = git(project, "rev-parse", "HEAD~1").strip(), git(project, "rev-parse", "HEAD").strip()

    status, _, stderr = run_report("--base", "HEAD~1", "--params-set", str(params_set), "--out", "report")
    assert status == 0, stderr
    base_exp, head_exp = f"base-{base[:7]}", f"head-{head[:7]}"

    # each commit ran as an experiment with the params set (dvc.lock of its experiment commit)
    for commit, experiment, lr in ((base, base_exp, 0.0004), (head, head_exp, 0.001)):
        lock = yaml.safe_load(git(project, "show", f"refs/exps/{commit[:2]}/{commit[2:]}/{experiment}:dvc.lock"))
        ran = lock["stages"]["pretrain"]["params"]["params.yaml"]
        assert ran["train.max_steps"] == 4 and ran["train.eval_freq"] == 2 and ran["train.lr"] == lr
    # and left this workspace as it was
    assert git(project, "rev-parse", "HEAD").strip() == head
    assert not git(project, "status", "--porcelain", "--untracked-files=no")
    assert len(git(project, "worktree", "list").splitlines()) == 1

    report = (project / "report/report.md").read_text()
    assert f"| base | `HEAD~1` | {base[:7]} | {base_exp} |" in report
    assert table(report, "### Params that changed") == [["params.yaml", "train.lr", "0.0004", "0.001"]]
    metrics = {(row[0], row[1]): row[2:] for row in table(report, "### Metrics")}
    for key in (("metrics/eval.json", "val.loss"), ("metrics/eval.json", "train.loss"), ("metrics/train.json", "loss.val")):
        old, new, change = map(float, metrics[key])
        assert 5 < old < 12 and 5 < new < 12 and old != new, key  # a few steps from ln(50257) = 10.8
        assert change == pytest.approx(new - old, abs=2e-5), key

    # loss.png: both experiments' curves, in the page's colours
    page_spec = json.loads(ci_report.dvc("plots", "diff", base_exp, head_exp, "--json", "--targets", "loss_by_step"))
    scale = page_spec["data"]["loss_by_step"][0]["content"]["encoding"]["color"]["scale"]
    colors = dict(zip(scale["domain"], scale["range"]))
    image = matplotlib.image.imread(project / "report/loss.png")[..., :3]
    assert image.shape[0] > 300 and image.shape[1] > 600
    for experiment in (base_exp, head_exp):
        rgb = np.array([int(colors[experiment][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(image - rgb).max(axis=-1) < 0.02).sum() > 500, experiment  # pixels of its lines
    curves = json.loads((project / "report/report.json").read_text())["image_curves"]
    assert len(curves) == 8  # 2 charts × 2 experiments × train and val
    assert all(curve.endswith(", 2 points") for curve in curves), curves
    assert "![train and validation loss of both](loss.png)" in report

    html = (project / "report/dvc-plots/index.html").read_text()
    assert html.count("vegaEmbed(") == 4 and base_exp in html and head_exp in html

    # the step summary: the same report, its files linked to the uploaded artifact
    status, summary, stderr = run_report("--out", "report", "--summary-link", "https://example.com/artifact/1")
    assert status == 0, stderr
    assert "[download it](https://example.com/artifact/1)" in summary and "![" not in summary
    assert table(summary, "### Params that changed") == table(report, "### Params that changed")


@pytest.mark.parametrize("args, error", [
    (["--base", "no-such-branch", "--params-set", "ok.yaml"], "no-such-branch names no commit in this repository; fetch it"),
    (["--params-set", "missing.yaml"], "missing.yaml does not exist"),
    (["--params-set", "bad-key.yaml"], "bad-key.yaml: train.learning_rate is not a key of params.yaml"),
    (["--params-set", "flat.yaml"], "flat.yaml must map params groups to keys and values"),
    (["--summary-link", "https://example.com"], "report.json does not exist; make the report first"),
])
def test_bad_input_is_one_line(in_project, args, error):
    (in_project / "ok.yaml").write_text("train:\n  max_steps: 1\n")
    (in_project / "bad-key.yaml").write_text("train:\n  learning_rate: 0.1\n")
    (in_project / "flat.yaml").write_text("train.lr: 0.1\n")
    status, _, stderr = run_report(*args, "--out", "nowhere")
    assert status == 1 and stderr.count("error: ") == 1 and error in stderr, stderr
    assert not (in_project / "nowhere").exists()
