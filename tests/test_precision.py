import json
import subprocess
import sys

import pytest
import torch

from gptpipe.errors import PipelineError
from gptpipe.precision import autocast, cheap_dropout_masks, decoding_dtype, resolve_precision

CPU = torch.device("cpu")


def test_fp32_is_exact_and_auto_follows_the_hardware():
    assert resolve_precision("fp32", CPU) is None
    amx = torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if amx else None)
    assert resolve_precision("bf16", CPU) == torch.bfloat16


def test_decoding_on_cpu_stays_fp32_under_auto():
    assert decoding_dtype("auto", CPU) is None
    assert decoding_dtype("bf16", CPU) == torch.bfloat16


def test_bf16_where_unsupported_is_an_error():
    with pytest.raises(PipelineError, match="train.precision is bf16 but mps"):
        resolve_precision("bf16", torch.device("mps"))


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (a @ a).dtype == torch.float32


def test_cheap_dropout_masks_only_on_the_cpu_bf16_path():
    assert cheap_dropout_masks(CPU, torch.bfloat16, compiled=False)
    assert not cheap_dropout_masks(CPU, None, compiled=False)  # fp32: the book's masks
    assert not cheap_dropout_masks(torch.device("cuda"), torch.bfloat16, compiled=False)
    assert not cheap_dropout_masks(CPU, torch.bfloat16, compiled=True)


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
