"""Fewer bytes per weight for decoding: one token at a time reads every weight once, so on a
CPU decoding is bound by memory, not arithmetic.

`int8` stores each nn.Linear's weight as int8 with a scale per output channel and quantizes
the activations on the fly (dynamic quantization), through torch's own quantized kernels
(fbgemm: AVX2, AVX-512 VNNI). The attention's query, key and value projections are first fused
into one (GPTModel.fuse_qkv), as they are for fp32 decoding on the CPU: a token's matrix
products are small enough that each call's fixed cost counts. Of torch's int8 kernels, fbgemm's was the fastest per token
(bench/README.md): `torch.ops.aten._weight_int8pack_mm` (int8 weights, bf16 activations) and
torchao's eager int8 (`python bench/bench_generate.py --torchao`) were slower, torchao's since its
CPU kernels come from torch.compile, and compiling costs more than a sample stage's whole run.
torch 2.13 (pinned by this project) ships the fbgemm path, marked deprecated; bench/README.md
lists its speed, its agreement with fp32's tokens and its effect on the loss.
"""

import warnings

import torch

from gptpipe.errors import PipelineError
from gptpipe.model import GPTModel


def prepare_for_decoding(model: GPTModel, quantize: str, device: torch.device) -> torch.nn.Module:
    """`model` as the sample stage decodes with it, changed in place: on the CPU with the query,
    key and value projections fused (fp32 computes the same dot products, so the same tokens),
    and for `quantize` int8 with int8 linear layers (CPU only)."""
    if quantize != "none" and device.type != "cpu":
        raise PipelineError(f"sample.quantize: {quantize} runs on the CPU's int8 kernels, and the model is on "
                            f"{device}: set sample.quantize to none, or train.device to cpu")
    if device.type == "cpu":
        model.fuse_qkv()
    if quantize == "none":
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of torch.ao.quantization
        per_channel = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        return torch.ao.quantization.quantize_dynamic(model, per_channel, dtype=torch.qint8, inplace=True)
