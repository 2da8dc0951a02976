import pytest
import torch

from gptpipe.errors import PipelineError
from gptpipe.precision import autocast, decoding_dtype, resolve_precision

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
