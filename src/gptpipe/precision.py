"""Numeric precision: bf16 autocast where the hardware is fast at it, fp32 otherwise."""

import contextlib

import torch

from gptpipe.errors import PipelineError


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto, fp32, bf16) on `device`; None means fp32.

    auto uses bf16 where the hardware multiplies it fast: CPUs with AMX tiles, CUDA GPUs
    from Ampere on. Elsewhere bf16 is emulated and slower than fp32.
    """
    if precision == "fp32":
        return None
    fast_bf16 = (torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
                 if device.type == "cuda" else
                 device.type == "cpu" and torch.cpu._is_amx_tile_supported())
    if precision == "bf16":
        if device.type == "mps" or (device.type == "cuda" and not fast_bf16):
            raise PipelineError(f"train.precision is bf16 but {device} does not support it; "
                                f"use train.precision: auto or fp32")
        return torch.bfloat16
    return torch.bfloat16 if fast_bf16 else None


def allow_fast_float32(device: torch.device, precision: str) -> None:
    """On CUDA, let float32 matmuls use TF32 tensor cores unless fp32 was asked for exactly."""
    if device.type == "cuda" and precision != "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def decoding_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for generating text. Decoding one token at a time is bound by
    reading the weights, not by arithmetic: on CPU, bf16 autocast (which reads the fp32
    weights to cast them) is not reliably faster than fp32 (bench/bench_generate.py compares
    them) and changes the tokens, so `auto` keeps fp32 there."""
    if precision == "auto" and device.type == "cpu":
        return None
    return resolve_precision(precision, device)


def cheap_dropout_masks(device: torch.device, amp_dtype: torch.dtype | None, compiled: bool) -> bool:
    """Whether training should draw dropout masks with model.cheap_keep_mask. On the CPU's bf16
    path, torch's one-draw-per-element masks were a sixth of the step; in fp32 the book's exact
    masks are kept (the book's numbers reproduce), on CUDA torch's masks are cheap already, and
    under torch.compile the compiler fuses its own mask generation (and the in-place random_
    of cheap masks would break its graph)."""
    return device.type == "cpu" and amp_dtype is not None and not compiled
