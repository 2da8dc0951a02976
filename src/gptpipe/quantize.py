"""Fewer bytes per weight for decoding: one token at a time reads every weight once, so on a
CPU decoding is bound by memory, not arithmetic.

`int8` stores each nn.Linear's weight as int8 with a scale per output channel and quantizes
the activations on the fly (dynamic quantization), through torch's own quantized kernels
(fbgemm: AVX2, AVX-512 VNNI). The attention's query, key and value projections are first fused
into one (GPTModel.fuse_qkv), as they are for fp32 decoding on the CPU: a token's matrix
products are small enough that each call's fixed cost counts. Of torch's int8 kernels, fbgemm's
was the fastest per token (bench/README.md): `torch.ops.aten._weight_int8pack_mm` (int8
weights, bf16 activations; `python bench/bench_generate.py --int8pack`) and torchao's eager int8
(`--torchao`) were slower, torchao's since its CPU kernels come from torch.compile, and
compiling costs more than a sample stage's whole run. The weights are packed for fbgemm here
rather than through torch.ao.quantization.quantize_dynamic, whose modules pack each weight three
times (a second of the sample stage's start). torch 2.13 (pinned by this project) ships the
fbgemm path, marked deprecated; bench/README.md lists its speed, its agreement with fp32's
tokens and its effect on the loss.
"""

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from gptpipe.cli import available_cpus
from gptpipe.errors import PipelineError
from gptpipe.model import GPTModel, int8_linear


class Int8Linear(torch.nn.Module):
    """An nn.Linear with its weight in int8, a symmetric scale per output channel (as torch's
    per-channel weight observer chooses it), packed for fbgemm; activations quantized per call."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        # max |w| per row without an |w| copy; 3x faster than vector_norm's inf-norm, the same values
        largest = torch.maximum(weight.amax(dim=1), -weight.amin(dim=1))
        scales = (largest / 127.5).clamp(min=torch.finfo(torch.float32).eps)
        qweight = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                             torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The packed weight is a TorchScript object: dispatching the op asks it for
        # __torch_function__, which it answers by raising and catching a C++ exception, every call
        # (a third of a small product's time). With torch functions off the op is not asked.
        with torch._C.DisableTorchFunctionSubclass():
            return int8_linear(x, self.packed)


def to_int8(module: torch.nn.Module) -> None:
    """Replace every nn.Linear inside `module` by an Int8Linear, on every CPU at once (fbgemm packs
    a weight on one thread: 1.1 s of the sample stage on 2 CPUs, 0.55 s so), each fp32 weight
    freed as soon as its int8 copy is in its place."""
    places = [(parent, name) for parent in module.modules()
              for name, child in parent.named_children() if isinstance(child, torch.nn.Linear)]

    def replace(place: tuple[torch.nn.Module, str]) -> None:
        parent, name = place
        setattr(parent, name, Int8Linear(getattr(parent, name)))

    with warnings.catch_warnings(), ThreadPoolExecutor(available_cpus()) as pool:
        warnings.simplefilter("ignore")  # quantized tensors are marked deprecated in torch 2.13
        # (here, not in the threads: catch_warnings changes the whole process's filters)
        list(pool.map(replace, places))


def store_wide_weights_transposed(module: torch.nn.Module) -> None:
    """Keep each Linear weight inside `module` that has more outputs than inputs (the fused
    query-key-value projection, the first feed-forward layer, the output head) in memory as
    [in, out], the same values seen through a transposed view. A one-token product x @ W.T then
    runs as MKL's product over W.T's rows, which lie contiguous along the long side, instead of
    one short dot product per output. On 2 cores of the development machine, a token's products
    in order over the 124M model's weights (cold: the 493 MB they read is more than its L3) took
    20.7 ms instead of 22.8, the head 5.4 instead of 6.7; the narrow products gained nothing
    (bench/README.md). The copies take 0.12 s for the 124M model; each dot product's terms are
    then summed in another order."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear) and layer.out_features > layer.in_features:
                layer.weight.data = transposed_copy(layer.weight.data).t()


def transposed_copy(matrix: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """matrix.t().contiguous(), copied `rows` rows at a time so that each piece's writes stay in
    the caches: torch copies a transposed matrix in one pass across the whole destination, 112 ms
    for the 50,257 x 768 head on the development machine, against 69 ms so."""
    out = matrix.new_empty(matrix.shape[1], matrix.shape[0])
    for start in range(0, matrix.shape[0], rows):
        out[:, start:start + rows].copy_(matrix[start:start + rows].t())
    return out


def prepare_for_decoding(model: GPTModel, quantize: str, device: torch.device) -> torch.nn.Module:
    """`model` as the sample stage decodes with it, changed in place. On the CPU: the query, key
    and value projections fused, then for `quantize` int8 every linear layer in int8, and
    otherwise the wide products' weights stored transposed (store_wide_weights_transposed).
    fp32 computes the same dot products, summed in another order: the same greedy tokens on the
    book's model and on the tests' models, logits within 2e-6 of the model's own (the 124M model
    after one step, the book's prompt: 1.9e-6 on logits up to 5.8)."""
    if quantize != "none" and device.type != "cpu":
        raise PipelineError(f"sample.quantize: {quantize} runs on the CPU's int8 kernels, and the model is on "
                            f"{device}: set sample.quantize to none, or train.device to cpu")
    if device.type == "cpu":
        model.fuse_qkv()
        if quantize == "int8":
            to_int8(model)
        else:
            store_wide_weights_transposed(model)
    return model
