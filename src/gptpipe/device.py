import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch

from gptpipe.cli import available_cpus
from gptpipe.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"train.device is {name!r} but this machine has no usable CUDA GPU "
                                f"(torch.cuda.is_available() is False); set train.device to auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"train.device is {name!r} but only {torch.cuda.device_count()} "
                                f"CUDA device(s) exist; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("train.device is 'mps' but MPS is not available here; set train.device to auto or cpu")
    return device


def device_memory(device: torch.device) -> int | None:
    """The bytes of memory `device` has in all (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def require_memory(n_bytes: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse at once what could only end in an allocation failure, or hours of building a model
    that cannot fit (a million layers allocate one small tensor at a time)."""
    total = device_memory(device)
    if total is not None and n_bytes > total:
        raise PipelineError(f"{what} needs at least {n_bytes / 2**30:,.1f} GiB, more than the "
                            f"{total / 2**30:,.1f} GiB of {device}: {fix}")


def hold_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    By default glibc gives every allocation over 32 MB its own mapping and unmaps it on free.
    A training step of the book's model allocates several 75-150 MB buffers (the logits, the
    embedding and output-head gradients, bf16 weight copies) and frees them again, so each step
    gets fresh pages, which the kernel zero-fills on first touch: a sizeable share of a CPU step
    (bench/bench_train.py measures the book's code with and without this setting, "book + held
    memory"). The price is a few percent more peak memory: the heap grows over the first steps
    until its free blocks fit the buffers. Returns False, changing nothing, where the C
    library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    # no separate mappings for big blocks, and never trim the heap (a threshold of -1)
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


@contextlib.contextmanager
def decoding_threads(device: torch.device) -> Iterator[None]:
    """Inside the block, on the CPU, torch's intra-op threads are every CPU this process may run
    on, unless OMP_NUM_THREADS or MKL_NUM_THREADS chose them.

    torch starts with one thread per physical core, right for compute-bound work such as
    training. Decoding one token at a time reads every weight once per token and waits on memory,
    and a core's second hardware thread keeps more reads in flight: where the CPUs are hardware
    threads of fewer cores (a 2-CPU VM is often one core's two threads), torch would decode with
    half of them, as llama.cpp does only when told to (its -t).
    """
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        yield
        return
    before, wanted = torch.get_num_threads(), available_cpus()
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if wanted != before:
            torch.set_num_threads(before)
