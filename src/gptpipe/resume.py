"""Resumable training state: what an interrupted run needs to continue bit for bit.

One torch file (read back with weights_only=True): the model and optimizer state, the RNG
states of torch, CUDA, numpy and Python, the loop's TrainState, and the fingerprint of the run
that saved it. It lives outside DVC's outputs (data/resume/), because DVC deletes a stage's
outputs before re-running it, and because an experiment's cached model should cost its
weights, not three times its weights.
"""

import hashlib
import json
import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gptpipe.checkpoint import torch_load
from gptpipe.files import atomic_path
from gptpipe.params import Params
from gptpipe.train import LogRecord, TrainState

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


def fingerprint(params: Params, tokens_meta: bytes, world_size: int | None) -> str:
    """Identifies a run: a saved state is resumed only by a run with the same model and train
    params, the same tokens (their meta.json) and the same number of processes (None for a
    plain process, whose data order is the book's)."""
    text = json.dumps({"model": asdict(params.model), "train": asdict(params.train),
                       "processes": world_size}, sort_keys=True)
    return hashlib.sha256(text.encode() + tokens_meta).hexdigest()


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_states(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(path: Path, run_id: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               state: TrainState) -> None:
    saved = {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states(),
        "train_state": {**asdict(state), "records": [asdict(r) for r in state.records]},
    }
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)
    log.info(f"saved resumable state at step {state.step} to {path}")


def load_state(path: Path, run_id: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device) -> TrainState | None:
    """Restore model, optimizer and RNG states from `path` when a run with the same fingerprint
    saved it; the TrainState to continue from, or None to start fresh."""
    if not path.exists():
        return None
    saved = torch_load(path, "the resumable state", "delete it to start the run fresh", map_location=device)
    if not isinstance(saved, dict) or saved.get("run_id") != run_id \
            or saved.get("format_version") != FORMAT_VERSION:
        log.info(f"{path} was saved by a run with other params or data: starting fresh")
        return None
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    restore_rng_states(saved["rng"])
    fields = saved["train_state"]
    state = TrainState(**{**fields, "records": [LogRecord(**r) for r in fields["records"]]})
    log.info(f"resuming from {path}: epoch {state.epoch}, step {state.step}")
    return state
