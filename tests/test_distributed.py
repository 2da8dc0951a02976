"""Pretraining on several processes (torchrun, DistributedDataParallel, gloo on the CPU) gives
the results of one process on the whole batch, and what it writes works in a plain process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY, make_tokens, stage_args, write_params
from gptpipe.checkpoint import load_model
from gptpipe.distributed import Processes, require_devices, sharded_loader
from gptpipe.errors import PipelineError
from gptpipe.params import load_params, per_process_batch

# fp32 without dropout: how the global batch is split may then change the results only by
# the rounding of the gradients' sum. One window every 64 tokens of the book's corpus in
# global batches of 8 makes 9 steps per epoch, so a run crosses an epoch boundary (a new
# shuffle) and, accumulating 2 micro-batches, ends an epoch with a short group.
OVERRIDES = {**TINY, "model": {**TINY["model"], "drop_rate": 0.0},
             "train": {**TINY["train"], "device": "cpu", "precision": "fp32", "batch_size": 8,
                       "stride": 64, "epochs": 2, "eval_freq": 2, "eval_iter": 2,
                       "checkpoint_every": None}}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, corpus_path) -> Path:
    d = tmp_path_factory.mktemp("tokens")
    return make_tokens(d, write_params(d / "params.yaml", OVERRIDES, corpus_path))


def pretrain(out: Path, tokens: Path, corpus: Path, torchrun_nproc: int | None = None,
             **train: object) -> subprocess.Popen:
    """pretrain with the train params `train` writing under `out`: through torchrun with
    `torchrun_nproc` processes, or as the plain script (which relaunches itself when nproc > 1)."""
    out.mkdir(parents=True, exist_ok=True)
    params = write_params(out / "params.yaml", {**OVERRIDES, "train": {**OVERRIDES["train"], **train}}, corpus)
    launcher = [sys.executable]
    if torchrun_nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_nproc}"]
    return subprocess.Popen(
        [*launcher, str(ROOT / "stages/pretrain.py"), "--params", str(params), *stage_args("pretrain", out),
         "--tokens", str(tokens)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread per process on the shared cores


def finish(run: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for `run`, check it succeeded, and return its stderr."""
    try:
        _, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.terminate()  # pretrain passes it on to torchrun, which stops its workers
        run.communicate(timeout=60)
        raise
    assert run.returncode == 0, stderr
    return stderr


def processes_of(out: Path) -> list[int]:
    """Processes still running with `out` on their command line: the launcher, torchrun, workers."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # it ended meanwhile
            pass
    return pids


@pytest.fixture
def no_process_left(tmp_path):
    yield tmp_path
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + 10
    while (left := processes_of(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"


def logged(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "plots/losses.csv")


def assert_same_training(one: Path, two: Path) -> None:
    a, b = logged(one), logged(two)
    assert len(a) >= 5
    for column in ("step", "epoch", "tokens_seen"):
        assert a[column].tolist() == b[column].tolist(), column
    for column in ("train_loss", "val_loss", "grad_norm", "lr"):
        np.testing.assert_allclose(b[column], a[column], rtol=TOLERANCE, err_msg=column)
    metrics_a, metrics_b = (json.loads((out / "train.json").read_text()) for out in (one, two))
    assert metrics_a["steps"] == metrics_b["steps"] and metrics_a["tokens_seen"] == metrics_b["tokens_seen"]
    # the checkpoint of the processes loads in a plain process, with the same weights
    model_a, _ = load_model(one / "model", torch.device("cpu"))
    model_b, saved = load_model(two / "model", torch.device("cpu"))
    assert saved["step"] == metrics_a["steps"]
    for (name, weight_a), weight_b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(weight_b, weight_a, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokens, corpus_path) -> dict[int, Path]:
    """Runs of torchrun with one process on the whole batch, by gradient accumulation steps."""
    runs = {}
    for accum in (1, 2):
        out = tmp_path_factory.mktemp(f"one-process-accum{accum}")
        finish(pretrain(out, tokens, corpus_path, torchrun_nproc=1, grad_accum_steps=accum))
        runs[accum] = out
    return runs


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_like_one_process_on_the_whole_batch(one_process, tokens, corpus_path,
                                                                  no_process_left, accum):
    out = no_process_left
    # plain `python stages/pretrain.py` with train.nproc 2 relaunches itself under torchrun
    stderr = finish(pretrain(out, tokens, corpus_path, nproc=2, grad_accum_steps=accum))
    assert stderr.count("parameters on cpu × 2 processes") == 1  # rank 0 alone logs
    assert_same_training(one_process[accum], out)
    assert not (out / "resume").exists() or not any((out / "resume").iterdir())


def test_stopped_processes_resume_where_they_stopped(one_process, tokens, corpus_path, no_process_left):
    out = no_process_left
    settings = {"nproc": 2, "checkpoint_every": 2}
    run = pretrain(out, tokens, corpus_path, **settings)
    deadline = time.monotonic() + 120
    while not (out / "resume/pretrain.pt").exists():
        assert run.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)  # to the launcher: it passes the signal on to torchrun
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0
    assert "error: stopped by signal 15" in stderr and "run the stage again" in stderr
    assert not (out / "model").exists()

    stderr = finish(pretrain(out, tokens, corpus_path, **settings))
    assert "resuming from" in stderr
    assert_same_training(one_process[1], out)


def test_the_global_batch_is_shared_out_among_the_processes():
    tokens = np.arange(8 * 37 + 1, dtype=np.uint16)  # 37 windows of 8 tokens: 4 batches of 8
    loader_args = dict(context_length=8, stride=8, batch_size=8, seed=3)

    def batches(world_size: int, epoch: int) -> list[list[set[int]]]:
        """Each process's batches, as sets of window starts."""
        per_process = []
        for rank in range(world_size):
            loader = sharded_loader(tokens, processes=Processes(rank, rank, world_size, True), **loader_args)
            loader.sampler.set_epoch(epoch)
            per_process.append([set(inputs[:, 0].tolist()) for inputs, _ in loader])
        return per_process

    for epoch in (1, 2):
        (whole,) = batches(1, epoch)
        assert len(whole) == 4 and all(len(b) == 8 for b in whole)
        for world_size in (2, 4):
            shares = batches(world_size, epoch)
            assert all(len(b) == 8 // world_size for share in shares for b in share)
            assert [set.union(*parts) for parts in zip(*shares)] == whole
    assert batches(1, 1) != batches(1, 2)  # each epoch its own shuffle


def test_the_global_batch_must_split_evenly(tmp_path):
    assert per_process_batch(8, 4) == 2
    with pytest.raises(PipelineError, match=r"train\.batch_size \(6\).*train\.nproc.*multiple of 4"):
        per_process_batch(6, 4)
    params = write_params(tmp_path / "params.yaml", {"train": {"batch_size": 3, "nproc": 2}})
    with pytest.raises(PipelineError, match=r"train\.batch_size \(3\).*2 processes \(train\.nproc"):
        load_params(params)


def test_more_processes_than_gpus_is_one_line_before_torchrun_starts():
    cuda = torch.device("cuda")
    require_devices(2, cuda, cuda_devices=2)
    require_devices(4, torch.device("cpu"), cuda_devices=0)  # gloo processes share the CPU
    with pytest.raises(PipelineError, match=r"train\.nproc=2 starts one process per GPU, but this machine has 1 "
                                            r"CUDA device\(s\): set train\.nproc to 1 or fewer"):
        require_devices(2, cuda, cuda_devices=1)
