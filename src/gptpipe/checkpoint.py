"""The model a training run hands on: its weights and model config in one safetensors file.

safetensors holds tensors and a header of strings, nothing executable, and loads by
memory-mapping. The header carries the GPTConfig and the run's progress (step, epoch,
tokens seen) as JSON. A tied output head is stored once, as the token embedding. The
optimizer's moments and the RNG states are not here: they are resume state (gptpipe.resume),
so a DVC-cached model costs its weights only.

This module also holds the one safe torch.load of the project, for the torch files it reads
(resume state, the book's checkpoints): weights_only=True, never arbitrary unpickling.
"""

import codecs
import dataclasses
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path
from gptpipe.model import GPTModel, uninitialized_weights
from gptpipe.params import GPTConfig, parse_section

HEADER_KEY = "gptpipe"  # the header entry that marks a model file of this pipeline
FORMAT_VERSION = 1
# What file_kind finds: the two formats read here, by their first bytes.
SAFETENSORS = "a safetensors file"
TORCH_FILE = "a PyTorch file (torch.save)"


def save_model(path: str | Path, model: GPTModel, **progress: int) -> None:
    """Write `model`'s weights, config and `progress` (step=..., epoch=...) to `path`, atomically."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["out_head.weight"]  # the same tensor as tok_emb.weight
    header = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(model.cfg), "progress": progress}
    # One metadata entry: safetensors writes several in a random order (a Rust HashMap), so the
    # same model gave different bytes from run to run, and DVC a different hash.
    with atomic_path(path) as tmp:
        save_file({key: value.detach().contiguous() for key, value in state.items()}, tmp,
                  metadata={HEADER_KEY: json.dumps(header)})


def file_kind(path: Path) -> str:
    """What `path` holds, judged by its first bytes: SAFETENSORS (an 8-byte header length, then
    JSON), TORCH_FILE (a zip archive or a pickle), or a description of anything else."""
    if path.is_dir():
        return "a directory"
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30:
        return SAFETENSORS
    if head.startswith(b"PK\x03\x04") or len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return TORCH_FILE  # a zip archive, or a pickle (protocol 2 to 5)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character may be cut at byte 64
    except UnicodeDecodeError:
        return "a file of an unknown format"
    return "a text file" if all(c.isprintable() or c.isspace() for c in text) else "a file of an unknown format"


def require_usable_weights(state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Every weight a floating-point tensor of finite numbers: a NaN would only show as NaN logits."""
    for key, value in state.items():
        if not value.is_floating_point():
            raise PipelineError(f"{source}: weight {key} holds {value.dtype} values, not floating point; {fix}")
        # A NaN or an infinity makes the sum non-finite, so a finite sum settles it in one pass
        # with no temporary (30x faster on 650 MB); only a non-finite sum (or huge finite values
        # that overflow it) is checked element by element.
        if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
            raise PipelineError(f"{source}: weight {key} holds NaN or infinite values (a diverged or "
                                f"damaged model); {fix}")


def read_model_file(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The config, the weights (by GPTModel's names, the tied head included) and the progress
    stored in a model file of this pipeline."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"model file {path} not found: run the pretrain stage first (dvc repro pretrain)")
    if (kind := file_kind(path)) != SAFETENSORS:
        raise PipelineError(f"{path} is {kind}, not a model file of this pipeline (safetensors); re-run "
                            f"pretrain to write it, or give the path of one")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PipelineError(f"{path} is not a readable safetensors file ({e}); if it is a model "
                            f"of this pipeline, re-run pretrain to write it again") from e
    if HEADER_KEY not in metadata:
        raise PipelineError(f"{path} is a safetensors file but not a model of this pipeline (its header "
                            f"has no '{HEADER_KEY}' entry); a Hugging Face GPT-2 is a directory with "
                            f"config.json next to it")
    try:
        header = json.loads(metadata[HEADER_KEY])
        config = parse_section(GPTConfig, "model.", header["config"])
    except (json.JSONDecodeError, KeyError, TypeError, PipelineError) as e:
        raise PipelineError(f"{path} has a model header this version cannot read "
                            f"({str(e).removeprefix('params: ')}); re-run pretrain to write it again") from e
    require_usable_weights(state, str(path), "re-run pretrain to write it again")
    if config.tie_embeddings and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    return config, state, header.get("progress", {})


def load_model(path: str | Path, device: torch.device) -> tuple[GPTModel, dict[str, Any]]:
    """The model of a model file, on `device`, in eval mode; and its progress counters."""
    config, state, progress = read_model_file(path, device)
    with uninitialized_weights():
        model = GPTModel(config)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise PipelineError(f"the weights in {path} do not fit the model config stored with them "
                            f"({str(e).splitlines()[0]} ...); the file was altered or mixed from two "
                            f"runs: re-run pretrain") from e
    if config.tie_embeddings:  # assign=True replaced the shared Parameter with two
        model.out_head.weight = model.tok_emb.weight
    return model.to(device).eval(), progress


def torch_load(path: Path, what: str, fix: str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True: plain tensors and values, never code. `what` names the
    file for the error message, `fix` says what to do about an unreadable one."""
    if not path.exists():
        raise PipelineError(f"{what} {path} not found; {fix}")
    if (kind := file_kind(path)) != TORCH_FILE:
        raise PipelineError(f"{what} {path} is {kind}, not a PyTorch file (torch.save); {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to advise turning the check off; keep only what it found
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise PipelineError(f"{what} {path} holds objects other than tensors and plain values "
                            f"({found.group(1) if found else 'a pickled object'}), which are refused for "
                            f"safety: loading them could run code; {fix}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise PipelineError(f"{what} {path} is not a readable PyTorch file (truncated or another "
                            f"format?): {str(e).splitlines()[0] if str(e) else type(e).__name__}; {fix}") from e
