"""Shared by the benchmarks: the book's default config, its corpus, a matmul peak."""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from gptpipe.params import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
# The defaults of GPTConfig are the book's model; the book's code reads the keys it knows.
BOOK_CONFIG = dataclasses.asdict(GPTConfig())


def find_corpus() -> Path:
    """The book's story, as shipped with the package."""
    return ROOT / "src/gptpipe/corpora/the-verdict.txt"


def matmul_peak(dtype: "torch.dtype", n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n matmul on this machine."""
    import torch
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    import platform

    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_child(script: str, *args: str) -> dict:
    """Run `script --child ARGS` for one measurement in a fresh process: the JSON it prints
    last, plus its peak RSS (kB). (torch is imported here only inside functions, so that
    importing this module does not inflate a child's memory.)"""
    process = subprocess.Popen([sys.executable, script, "--child", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"child {args} failed with status {process.returncode}: rerun it by hand "
                         f"with `python {script} --child {' '.join(args)}` to see why")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_kb": usage.ru_maxrss}
