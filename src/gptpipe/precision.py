"""Numeric precision: bf16 autocast where the hardware is fast at it, fp32 otherwise."""

import contextlib

import torch

from gptpipe.errors import PipelineError


# Under `auto` on CUDA, bf16 from this many tokens per forward on: below it the casts to
# bf16 cost more than the faster matmuls save. Measured on an H200: at 512 tokens (the book's
# batch 2 × 256) fp32 trained 1.26× faster than bf16, at 16,384 (16 × 1024) bf16 2.8× faster;
# bench/bench_gpu.py measures both shapes on the GPU at hand.
CUDA_BF16_MIN_TOKENS = 4096


def choose_autocast(device_type: str, fast_bf16: bool, tokens_per_forward: int) -> torch.dtype | None:
    """`auto`'s choice from the device's facts and the work's shape: bf16 where it is faster
    than fp32, else None (fp32). CPUs with AMX tiles multiply bf16 fast at every shape; CUDA
    GPUs from Ampere on, for large enough batches; elsewhere bf16 is emulated and slower."""
    if not fast_bf16:
        return None
    if device_type == "cuda":
        return torch.bfloat16 if tokens_per_forward >= CUDA_BF16_MIN_TOKENS else None
    return torch.bfloat16 if device_type == "cpu" else None


def resolve_precision(precision: str, device: torch.device, tokens_per_forward: int) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto, fp32, bf16) on `device` for forwards of
    `tokens_per_forward` tokens (batch × sequence); None means fp32."""
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
    return choose_autocast(device.type, fast_bf16, tokens_per_forward)


def allow_fast_float32(device: torch.device, precision: str) -> None:
    """On CUDA, let float32 matmuls use TF32 tensor cores unless fp32 was asked for exactly."""
    if device.type == "cuda" and precision != "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def decoding_dtype(precision: str, device: torch.device, batch_size: int = 1) -> torch.dtype | None:
    """The autocast dtype for generating text, one token per row and step. On the CPU, bf16
    autocast (which reads the fp32 weights to cast them) is not reliably faster than fp32 for
    decoding (bench/bench_generate.py compares them) and changes the tokens, so `auto` keeps
    fp32 there; on CUDA a step's few tokens are far below CUDA_BF16_MIN_TOKENS."""
    if precision == "auto" and device.type == "cpu":
        return None
    return resolve_precision(precision, device, batch_size)


def cheap_dropout_masks(device: torch.device, precision: str, compiled: bool) -> bool:
    """Whether training should draw dropout masks with model.cheap_keep_mask: on the CPU
    unless train.precision is fp32, where the book's exact masks are kept (the book's numbers
    reproduce). torch's CPU dropout draws one random number per element, a sixth of a bf16
    step and a twentieth of an fp32 one (bench/bench_train.py --profile). On CUDA torch's
    masks are cheap already, and under torch.compile the compiler fuses its own mask
    generation (the in-place random_ of cheap masks would break its graph)."""
    return device.type == "cpu" and precision != "fp32" and not compiled


def book_dropout(device: torch.device, precision: str) -> bool:
    """Whether training should spell attention out with the book's dropout: where fp32 must
    give the book's numbers and SDPA would not (on CUDA its kernels draw their own masks)."""
    return precision == "fp32" and device.type != "cpu"
