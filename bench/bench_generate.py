"""Greedy generation speed: the book's generate_text_simple (no KV cache) against ours.

Both models hold the same weights (the book's GPTModel, randomly initialised with a fixed
seed, loaded into ours). Runs alternate between the variants, `--repeats` times each, after
one warm-up each; the table shows the median tokens per second, the speed-up over the book,
and MFU: model FLOPs per generated token (2 x the matmul parameters + the attention over the
context) times tokens/s, over the peak of a 4096 x 4096 matmul measured in the same run.

    python bench/bench_generate.py                        # the full measurement (124M, 200 tokens)
    python bench/bench_generate.py --small --new-tokens 20 --repeats 1   # smoke test
"""

import argparse
import dataclasses
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from llms_from_scratch.ch04 import generate_text_simple

from gptpipe.files import write_json
from gptpipe.generate import generate
from gptpipe.model import GPTConfig, GPTModel, from_book_state_dict
from gptpipe.tokenizer import encode

SMALL = {"emb_dim": 64, "n_heads": 4, "n_layers": 2}


def matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` size x size matmuls in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * size**3 / best


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def flops_per_token(cfg: GPTConfig, model: GPTModel, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs per generated token: 2 per matmul weight (embedding lookups are not matmuls)
    plus QK^T and attention-weights x V over the context each new token attends to."""
    lookups = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    matmul_params = sum(p.numel() for p in model.parameters()) - lookups
    contexts = [min(prompt_len + i, cfg.context_length) for i in range(new_tokens)]
    attention = 4 * cfg.n_layers * cfg.emb_dim * statistics.mean(contexts)
    return 2 * matmul_params + attention


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context-length", type=int, default=GPTConfig.context_length)
    parser.add_argument("--small", action="store_true", help=f"a tiny model ({SMALL}) for a smoke test")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    args = parser.parse_args()

    cfg = GPTConfig(context_length=args.context_length, **(SMALL if args.small else {}))
    torch.manual_seed(args.seed)
    book = BookGPTModel(dataclasses.asdict(cfg)).eval()  # the book reads the keys it knows
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(from_book_state_dict(book.state_dict()))
    prompt = torch.tensor([encode(args.prompt)])
    n = args.new_tokens

    variants: dict[str, tuple[Callable[[int], torch.Tensor], torch.dtype]] = {
        "book generate_text_simple": (lambda k: generate_text_simple(book, prompt, k, cfg.context_length),
                                      torch.float32),
        "ours, KV cache, fp32": (lambda k: generate(ours, prompt, k), torch.float32),
    }
    if not args.no_bf16:
        variants["ours, KV cache, bf16 autocast"] = (
            lambda k: generate(ours, prompt, k, autocast_dtype=torch.bfloat16), torch.bfloat16)

    peaks = {torch.float32: matmul_peak(torch.float32), torch.bfloat16: matmul_peak(torch.bfloat16)}
    for run, _ in variants.values():
        run(min(n, 8))  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, (run, _) in variants.items():
            outputs[name], elapsed = timed(lambda: run(n))
            seconds[name].append(elapsed)

    book_ids = outputs["book generate_text_simple"]
    flops = flops_per_token(cfg, ours, prompt.shape[1], n)
    rows = []
    for name, (_, dtype) in variants.items():
        tokens_per_s = n / statistics.median(seconds[name])
        same = outputs[name].shape == book_ids.shape and bool(torch.equal(outputs[name], book_ids))
        rows.append({"variant": name, "tokens_per_s": tokens_per_s, "seconds": seconds[name],
                     "mfu": flops * tokens_per_s / peaks[dtype], "peak_dtype": str(dtype),
                     "same_tokens_as_book": same})
    baseline = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_book"] = row["tokens_per_s"] / baseline

    print(f"\n{'variant':32} {'tokens/s':>9} {'vs book':>8} {'MFU':>7}  same tokens as book")
    for row in rows:
        print(f"{row['variant']:32} {row['tokens_per_s']:9.2f} {row['speedup_vs_book']:7.2f}x "
              f"{row['mfu']:7.2%}  {row['same_tokens_as_book']}")
    print(f"matmul peak 4096x4096: fp32 {peaks[torch.float32] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks[torch.bfloat16] / 1e9:.1f} GFLOP/s; {flops / 1e6:.1f} MFLOP per token; "
          f"{torch.get_num_threads()} threads, {cpu_name()}")

    write_json(args.out, {
        "config": dataclasses.asdict(cfg), "prompt": args.prompt, "new_tokens": n,
        "repeats": args.repeats, "flops_per_token": flops,
        "matmul_peak_flops": {str(k): v for k, v in peaks.items()},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": cpu_name(), "results": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
