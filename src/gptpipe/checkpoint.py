"""Checkpoints: written atomically, loaded only with weights_only=True (no arbitrary unpickling)."""

import dataclasses
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path
from gptpipe.model import GPTConfig, GPTModel

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model: GPTModel, optimizer: torch.optim.Optimizer | None,
                    **progress: Any) -> None:
    """Save model and optimizer state, the model config and progress counters (step, epoch, ...)."""
    state = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(model.cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        **progress,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} not found: run the pretrain stage first (dvc repro pretrain)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise PipelineError(f"{path} holds objects other than tensors and plain values, which are "
                            f"refused for safety (weights_only=True); it was not loaded. {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise PipelineError(f"{path} is not a readable PyTorch checkpoint (truncated or another "
                            f"format?): {e}; re-run pretrain to write it again") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise PipelineError(f"{path} is a PyTorch file but not a checkpoint of this pipeline "
                            f"(no 'model' and 'config' entries)")
    return state


def load_model(path: str | Path, device: torch.device) -> tuple[GPTModel, dict[str, Any]]:
    """The model of a checkpoint, on `device`, in eval mode; and the checkpoint itself."""
    state = load_checkpoint(path, map_location=device)
    try:
        config = GPTConfig(**state["config"])
    except TypeError as e:
        raise PipelineError(f"{path} has a model config this version does not know ({e}); "
                            f"re-run pretrain to write it again") from e
    with torch.device("meta"):  # no time spent initialising weights that are overwritten
        model = GPTModel(config)
    try:
        model.load_state_dict(state["model"], assign=True)
    except RuntimeError as e:
        raise PipelineError(f"the weights in {path} do not fit the model config stored with them "
                            f"({str(e).splitlines()[0]} ...); the file was altered or mixed from two runs: "
                            f"re-run pretrain") from e
    if config.tie_embeddings:  # assign=True replaced the shared Parameter with two
        model.out_head.weight = model.tok_emb.weight
    return model.to(device).eval(), state
