import json
import subprocess
import sys

import pytest
import torch

from gptpipe.errors import PipelineError
from gptpipe.precision import (CUDA_BF16_MIN_TOKENS, autocast, book_dropout, cheap_dropout_masks, choose_autocast,
                               decoding_dtype, resolve_precision)

CPU = torch.device("cpu")


def test_fp32_is_exact_and_auto_follows_the_hardware():
    assert resolve_precision("fp32", CPU, 512) is None
    amx = torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", CPU, 512) == (torch.bfloat16 if amx else None)
    assert resolve_precision("bf16", CPU, 512) == torch.bfloat16


@pytest.mark.parametrize("device_type, fast_bf16, tokens, expected", [
    ("cpu", True, 512, torch.bfloat16),     # AMX: faster at the book's shape already
    ("cpu", False, 1 << 20, None),          # AVX2/AVX-512 without AMX: bf16 is emulated
    ("cuda", True, 512, None),              # the book's batch on an H200: fp32 was faster
    ("cuda", True, CUDA_BF16_MIN_TOKENS, torch.bfloat16),
    ("cuda", True, 16 * 1024, torch.bfloat16),  # GPT-2's shape: bf16 2.8x
    ("cuda", False, 16 * 1024, None),       # before Ampere
    ("mps", True, 16 * 1024, None),
])
def test_auto_picks_the_faster_of_fp32_and_bf16_for_the_device_and_shape(device_type, fast_bf16, tokens, expected):
    assert choose_autocast(device_type, fast_bf16, tokens) == expected


def test_book_dropout_only_where_sdpa_would_not_draw_the_books_masks():
    assert book_dropout(torch.device("cuda"), "fp32")
    assert not book_dropout(CPU, "fp32")  # SDPA on the CPU draws them already
    assert not book_dropout(torch.device("cuda"), "auto")


def test_decoding_on_cpu_stays_fp32_under_auto():
    assert decoding_dtype("auto", CPU) is None
    assert decoding_dtype("bf16", CPU) == torch.bfloat16


def test_bf16_where_unsupported_is_an_error():
    with pytest.raises(PipelineError, match="train.precision is bf16 but mps"):
        resolve_precision("bf16", torch.device("mps"), 512)


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (a @ a).dtype == torch.float32


def test_cheap_dropout_masks_on_the_cpu_unless_fp32_is_asked_for():
    assert cheap_dropout_masks(CPU, "auto", compiled=False)  # bf16 with AMX, fp32 compute without
    assert cheap_dropout_masks(CPU, "bf16", compiled=False)
    assert not cheap_dropout_masks(CPU, "fp32", compiled=False)  # the book's masks
    assert not cheap_dropout_masks(torch.device("cuda"), "auto", compiled=False)
    assert not cheap_dropout_masks(CPU, "auto", compiled=True)


HELD_MEMORY_PROBE = """
import json, resource, sys, torch
from gptpipe.device import hold_freed_memory
held = "hold" in sys.argv and hold_freed_memory()
faults = []
for _ in range(20):  # like training steps: a big buffer allocated, touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(50_000_000).sum()  # 200 MB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([held, faults]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_held_freed_memory_is_reused_without_page_faults():
    def steps_with_fresh_pages(*args):
        out = subprocess.run([sys.executable, "-c", HELD_MEMORY_PROBE, *args], capture_output=True,
                             text=True, check=True).stdout
        held, faults = json.loads(out)
        return held, [f > 10_000 for f in faults]  # 200 MB is 48,828 pages of 4 kB
    held, fresh_held = steps_with_fresh_pages("hold")
    _, fresh_default = steps_with_fresh_pages()
    assert held
    assert all(fresh_default)  # by default every step gets fresh pages again
    # held: the heap grows over the first few steps (aligned blocks leave gaps), then settles
    assert not any(fresh_held[-8:])
