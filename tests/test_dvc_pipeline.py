"""End to end with the real dvc CLI, in a committed copy of the project on the tiny config."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import git_commit, run_dvc
from gptpipe.checkpoint import load_model

pytestmark = pytest.mark.filterwarnings("ignore")

STAGES = ["download", "tokenize", "pretrain", "evaluate", "sample"]


def set_param(project: Path, group: str, key: str, value) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[group][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def ran_stages(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def test_repro_status_experiments_metrics_plots(dvc_project):
    project = dvc_project
    assert ran_stages(run_dvc(project, "repro")) == set(STAGES)
    assert json.loads(run_dvc(project, "status", "--json")) == {}

    # Every output exists and parses.
    meta = json.loads((project / "data/tokens/meta.json").read_text())
    for split in ("train", "val"):
        tokens = np.fromfile(project / "data/tokens" / meta["splits"][split]["file"], dtype=meta["dtype"])
        assert len(tokens) == meta["splits"][split]["tokens"] > 32
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    model, progress = load_model(project / "data/model", torch.device("cpu"))
    assert model.cfg.emb_dim == 64 and progress["step"] > 0
    losses = pd.read_csv(project / "plots/losses.csv")
    assert list(losses.columns) == ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "train_perplexity",
                                    "val_perplexity", "lr", "grad_norm"]
    assert len(losses) >= 1 and losses["lr"].eq(0.0004).all()
    lrs = pd.read_csv(project / "plots/lr.csv")  # every step's lr, not only the evaluated ones
    assert list(lrs["step"]) == list(range(progress["step"])) and lrs["lr"].eq(0.0004).all()
    train_metrics = json.loads((project / "metrics/train.json").read_text())
    assert train_metrics["steps"] == progress["step"] and train_metrics["tokens_per_second"] > 0
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    for split in ("train", "val"):
        assert evaluation[split]["perplexity"] == pytest.approx(np.exp(evaluation[split]["loss"]))
        assert evaluation[split]["tokens"] > 0
    assert (project / "data/samples/sample.txt").read_text().startswith("Every effort moves you")
    git_commit(project, "baseline run")

    # A sampling param invalidates only the sample stage.
    set_param(project, "sample", "temperature", 0.7)
    assert set(json.loads(run_dvc(project, "status", "--json"))) == {"sample"}
    subprocess.run(["git", "checkout", "params.yaml"], cwd=project, check=True)

    # The learning rate re-runs training and what follows it, not the data stages.
    out = run_dvc(project, "exp", "run", "-S", "train.lr=5e-4")
    assert ran_stages(out) == {"pretrain", "evaluate", "sample"}
    assert pd.read_csv(project / "plots/losses.csv")["lr"].eq(0.0005).all()
    diff = json.loads(run_dvc(project, "metrics", "diff", "--json"))
    assert {"val.loss", "val.perplexity"} <= set(diff["metrics/eval.json"])
    shown = run_dvc(project, "exp", "show", "--csv")
    assert "val.loss" in shown and "train.lr" in shown

    html_dir = project / "plots_html"
    run_dvc(project, "plots", "show", "-o", str(html_dir))
    html = (html_dir / "index.html").read_text()
    assert "Loss by optimizer step" in html and "Learning rate" in html


def test_forced_reruns_are_bitwise_identical(dvc_project):
    project = dvc_project
    run_dvc(project, "repro")
    # the model holds weights, config and progress: no timings, so the same bytes
    outputs = ["data/model/model.safetensors", "data/model/config.json", "metrics/eval.json", "plots/losses.csv",
               "data/samples/sample.txt"]
    first = {name: (project / name).read_bytes() for name in outputs}
    run_dvc(project, "repro", "--force", "pretrain", "evaluate", "sample")
    for name in outputs:
        assert (project / name).read_bytes() == first[name], name
