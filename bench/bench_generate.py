"""Decoding speed: the book's generate_text_simple (no KV cache) against ours, and what the
faster modes cost in agreement and loss.

Both models hold the same weights: the book's GPTModel randomly initialised with a fixed seed,
or, with --model, a model of the pipeline (data/model after `dvc repro`), whose agreement
numbers mean more than a random model's. Variants take turns, `--repeats` times each after a
warm-up; the table shows median tokens/s, the speed-up over
the book and MFU (model FLOPs per token × tokens/s over a matmul peak of this run).

- greedy decoding of --new-tokens at batch 1: the book; ours in fp32, with int8 weights
  (sample.quantize: int8), with bf16 autocast (--bf16); torchao's int8 (--torchao);
- --samples N sampled continuations (temperature 1, top-k 25): decoded one after another,
  and as one batch (sample.num_samples N), tokens/s over all N;
- agreement: the share of greedy tokens equal to fp32's over a fixed set of prompts (the
  first sentences of the-verdict), and the val loss of each mode (evaluate's loss on the
  first 8 val windows).

    python bench/bench_generate.py --model data/model
    python bench/bench_generate.py --small --new-tokens 20 --repeats 1   # smoke test
"""

import argparse
import copy
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from llms_from_scratch.ch04 import generate_text_simple

sys.path.insert(0, str(Path(__file__).parent))
from common import BOOK_CONFIG, ROOT, find_corpus, machine, matmul_peak, timed  # noqa: E402

from gptpipe.checkpoint import load_model  # noqa: E402
from gptpipe.data import split_text, window_loader  # noqa: E402
from gptpipe.generate import generate  # noqa: E402
from gptpipe.metrics import evaluate_loader  # noqa: E402
from gptpipe.model import GPTModel, from_book_state_dict  # noqa: E402
from gptpipe.params import GPTConfig  # noqa: E402
from gptpipe.quantize import quantize_for_decoding  # noqa: E402
from gptpipe.tokenizer import encode  # noqa: E402

SMALL = {"emb_dim": 64, "n_heads": 4, "n_layers": 2}
CPU = torch.device("cpu")


def flops_per_token(model: GPTModel, prompt_len: int, new_tokens: int) -> float:
    """2 per matmul weight (embedding lookups are not matmuls) plus QK^T and attention × V
    over the context each new token attends to."""
    cfg = model.cfg
    lookups = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - lookups
    contexts = [min(prompt_len + i, cfg.context_length) for i in range(new_tokens)]
    return 2 * matmul_params + 4 * cfg.n_layers * cfg.emb_dim * statistics.mean(contexts)


def to_book_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of model.from_book_state_dict, for loading a model file into the book's model."""
    renamed = {}
    for key, value in state.items():
        if "norm" in key:
            key = key.removesuffix(".weight") + ".scale" if key.endswith(".weight") else key
            key = key.removesuffix(".bias") + ".shift" if key.endswith(".bias") else key
        renamed[key] = value
    return renamed


def models(args) -> tuple[BookGPTModel, GPTModel]:
    if args.model:
        ours, _ = load_model(args.model, CPU)
        book = BookGPTModel(dataclasses.asdict(ours.cfg)).eval()
        book.load_state_dict(to_book_state_dict(ours.state_dict()), strict=False)  # its masks are buffers
        return book, ours
    cfg = GPTConfig(**{**BOOK_CONFIG, **(SMALL if args.small else {})})
    torch.manual_seed(args.seed)
    book = BookGPTModel(dataclasses.asdict(cfg)).eval()  # the book reads the keys it knows
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(from_book_state_dict(book.state_dict()))
    return book, ours


def torchao_int8(model: GPTModel) -> GPTModel:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def agreement_and_loss(reference: GPTModel, variants: dict[str, tuple[GPTModel, torch.dtype | None]],
                       prompts: list[torch.Tensor], val: np.ndarray) -> dict[str, dict[str, float]]:
    expected = [generate(reference, p, 50)[0, p.shape[1]:] for p in prompts]
    loader = window_loader(val, reference.cfg.context_length, reference.cfg.context_length, 2, shuffle=False,
                           drop_last=False)
    results = {}
    for name, (model, dtype) in variants.items():
        same = [(generate(model, p, 50, autocast_dtype=dtype)[0, p.shape[1]:] == e).float().mean().item()
                for p, e in zip(prompts, expected)]
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = evaluate_loader(model, loader, CPU, max_batches=4).loss
        results[name] = {"greedy_tokens_equal_to_fp32": round(statistics.mean(same), 3), "val_loss": round(loss, 4)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model of the pipeline, e.g. data/model (default: random weights)")
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help=f"a tiny model ({SMALL}) for a smoke test")
    parser.add_argument("--bf16", action="store_true", help="also bf16 autocast (slow where bf16 is emulated)")
    parser.add_argument("--torchao", action="store_true", help="also torchao's int8 (pip install torchao)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/generate.json")
    args = parser.parse_args()

    book, ours = models(args)
    cfg = ours.cfg
    int8 = quantize_for_decoding(copy.deepcopy(ours), "int8", CPU)
    prompt = torch.tensor([encode(args.prompt)])
    n = args.new_tokens
    variants: dict[str, tuple[Callable[[int], torch.Tensor], torch.dtype]] = {
        "book generate_text_simple": (lambda k: generate_text_simple(book, prompt, k, cfg.context_length),
                                      torch.float32),
        "ours fp32": (lambda k: generate(ours, prompt, k), torch.float32),
        "ours int8 (sample.quantize)": (lambda k: generate(int8, prompt, k), torch.float32),
    }
    modes = {"int8 (sample.quantize)": (int8, None)}
    if args.bf16:
        variants["ours bf16 autocast"] = (lambda k: generate(ours, prompt, k, autocast_dtype=torch.bfloat16),
                                          torch.bfloat16)
        modes["bf16 autocast"] = (ours, torch.bfloat16)
    if args.torchao:
        ao = torchao_int8(copy.deepcopy(ours))
        variants["ours torchao int8"] = (lambda k: generate(ao, prompt, k), torch.float32)
        modes["torchao int8"] = (ao, None)

    def samples(batched: bool) -> torch.Tensor:
        seeds = [torch.Generator().manual_seed(args.seed + i) for i in range(args.samples)]
        options = dict(temperature=1.0, top_k=25)
        if batched:
            return generate(ours, prompt.repeat(args.samples, 1), n, generator=seeds, **options)
        return torch.cat([generate(ours, prompt, n, generator=g, **options) for g in seeds])

    sample_variants = {f"{args.samples} samples one after another": lambda: samples(False),
                       f"{args.samples} samples as one batch": lambda: samples(True)}

    peaks = {torch.float32: matmul_peak(torch.float32),
             **({torch.bfloat16: matmul_peak(torch.bfloat16)} if args.bf16 else {})}
    for run, _ in variants.values():
        run(min(n, 8))  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, *sample_variants]}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, (run, _) in variants.items():
            out = []
            seconds[name].append(timed(lambda: out.append(run(n))))
            outputs[name] = out[0]
        for name, run in sample_variants.items():
            out = []
            seconds[name].append(timed(lambda: out.append(run())))
            outputs[name] = out[0]

    flops = flops_per_token(ours, prompt.shape[1], n)
    book_rate = n / statistics.median(seconds["book generate_text_simple"])
    rows = []
    for name, (_, dtype) in variants.items():
        rate = n / statistics.median(seconds[name])
        rows.append({"variant": name, "tokens_per_s": round(rate, 2), "runs_s": seconds[name],
                     "speedup_vs_book": round(rate / book_rate, 2), "mfu": flops * rate / peaks[dtype],
                     "same_tokens_as_book": bool(torch.equal(outputs[name], outputs["book generate_text_simple"]))})
    for name in sample_variants:
        rate = args.samples * n / statistics.median(seconds[name])
        rows.append({"variant": name, "tokens_per_s": round(rate, 2), "runs_s": seconds[name],
                     "speedup_vs_book": round(rate / book_rate, 2), "mfu": None, "same_tokens_as_book": None})
    batch_equals_sequential = bool(torch.equal(*(outputs[name] for name in sample_variants)))

    _, val_text = split_text(find_corpus().read_text(encoding="utf-8"), 0.9)
    sentences = [s.strip() + "." for s in find_corpus().read_text(encoding="utf-8").split(".")[:8]]
    prompts = [torch.tensor([encode(s)[-32:]]) for s in sentences]
    quality = agreement_and_loss(ours, {"fp32": (ours, None), **modes}, prompts,
                                 np.array(encode(val_text), dtype=np.uint16))

    print(f"\n{machine()}; weights: {args.model or 'random (seed ' + str(args.seed) + ')'}")
    print(f"{'variant':34} {'tokens/s':>9} {'vs book':>8} {'MFU':>7}  same tokens as the book")
    for row in rows:
        mfu = f"{row['mfu']:7.2%}" if row["mfu"] is not None else f"{'':>7}"
        print(f"{row['variant']:34} {row['tokens_per_s']:9.2f} {row['speedup_vs_book']:7.2f}x {mfu}  "
              f"{'' if row['same_tokens_as_book'] is None else row['same_tokens_as_book']}")
    print(f"the batch of samples equals the samples one after another: {batch_equals_sequential}")
    print(f"{'mode':26} {'greedy tokens = fp32':>21} {'val loss':>9}")
    for name, q in quality.items():
        print(f"{name:26} {q['greedy_tokens_equal_to_fp32']:>21.1%} {q['val_loss']:>9.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(), "config": dataclasses.asdict(cfg), "weights": str(args.model or "random"),
        "new_tokens": n, "repeats": args.repeats, "flops_per_token": flops,
        "matmul_peak_flops": {str(k): v for k, v in peaks.items()}, "results": rows,
        "batch_equals_sequential": batch_equals_sequential, "agreement_and_loss": quality}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
