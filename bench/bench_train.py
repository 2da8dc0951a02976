"""Training throughput: this project's train step against the book's, side by side.

Both train the book's default config (124M, context 256, batch 2) on the same batches of
the-verdict from the same weights. Variants run alternately, each `--repeats` times;
the table shows median tokens/s, the ratio to the book, and model FLOP utilisation
against matmul peaks measured in the same run.

    python bench/bench_train.py                 # fp32 and bf16, ours vs the book
    python bench/bench_train.py --compile       # also torch.compile variants
    python bench/bench_train.py --profile       # where our bf16 step spends its time
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BOOK_CONFIG, ROOT, find_corpus, machine, matmul_peak, median, timed  # noqa: E402

from gptpipe.data import split_text, window_loader  # noqa: E402
from gptpipe.metrics import batch_loss  # noqa: E402
from gptpipe.model import GPTConfig, GPTModel, from_book_state_dict  # noqa: E402
from gptpipe.tokenizer import encode  # noqa: E402
from gptpipe.precision import autocast  # noqa: E402
from gptpipe.train import make_optimizer  # noqa: E402


def batches(n: int, batch_size: int, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train_text, _ = split_text(find_corpus().read_text(encoding="utf-8"), 0.9)
    tokens = np.array(encode(train_text), dtype=np.uint16)
    loader = window_loader(tokens, context, context, batch_size, shuffle=False, drop_last=True)
    all_batches = list(loader)
    return [all_batches[i % len(all_batches)] for i in range(n)]


def book_step_fn(state_dict):
    from llms_from_scratch.ch04 import GPTModel as BookGPT
    from llms_from_scratch.ch05 import calc_loss_batch
    model = BookGPT(BOOK_CONFIG)
    model.load_state_dict(state_dict)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    def step(x, y):  # the body of the book's train_model_simple
        optimizer.zero_grad()
        loss = calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        optimizer.step()
    return step


def our_step_fn(state_dict, amp_dtype, compile_model):
    model = GPTModel(GPTConfig(**BOOK_CONFIG))
    model.load_state_dict(from_book_state_dict(state_dict))
    model.train()
    optimizer = make_optimizer(model, 4e-4, 0.1, fused=amp_dtype is not None)
    forward = torch.compile(model) if compile_model else model
    cpu = torch.device("cpu")

    def step(x, y):  # the body of gptpipe.train.train, without logging
        with autocast(cpu, amp_dtype):
            loss = batch_loss(forward, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def flops_per_token(cfg: dict) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (all but the embedding tables)
    plus attention scores and values, 12·layers·emb·context (forward + backward)."""
    d, layers, vocab, ctx = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"], cfg["context_length"]
    weights = layers * 12 * d * d + d * vocab
    return 6 * weights + 12 * layers * d * ctx


def profile(step, data) -> dict[str, float]:
    groups = {"matmul": ("mm", "addmm", "bmm", "linear", "matmul"),
              "attention": ("attention", "sdpa", "flash"),
              "optimizer": ("adam", "_foreach", "fused"),
              "loss": ("cross_entropy", "log_softmax", "nll_loss")}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in data:
            step(x, y)
    seconds = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            name = event.key.lower()
            group = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other")
            seconds[group] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    return {group: round(s / total, 3) for group, s in sorted(seconds.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--profile", action="store_true", help="break down our bf16 step by operator")
    parser.add_argument("--out", default=str(ROOT / "bench/results/train.json"))
    args = parser.parse_args()

    torch.manual_seed(123)
    from llms_from_scratch.ch04 import GPTModel as BookGPT
    weights = BookGPT(BOOK_CONFIG).state_dict()
    data = batches(args.warmup + args.steps, 2, BOOK_CONFIG["context_length"])
    tokens_per_step = data[0][0].numel()

    variants = {"book (fp32)": book_step_fn(weights),
                "ours fp32": our_step_fn(weights, None, False),
                "ours bf16": our_step_fn(weights, torch.bfloat16, False)}
    if args.compile:
        variants["ours fp32 compiled"] = our_step_fn(weights, None, True)
        variants["ours bf16 compiled"] = our_step_fn(weights, torch.bfloat16, True)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}

    rates = defaultdict(list)
    for repeat in range(args.repeats):
        for name, step in variants.items():
            for x, y in data[:args.warmup]:
                step(x, y)
            seconds = timed(lambda: [step(x, y) for x, y in data[args.warmup:]])
            rates[name].append(args.steps * tokens_per_step / seconds)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {rates[name][-1]:.0f} tokens/s", flush=True)

    flops = flops_per_token(BOOK_CONFIG)
    book = median(rates["book (fp32)"])
    results = {"machine": machine(), "config": BOOK_CONFIG, "batch_size": 2,
               "matmul_peak_tflops": {k: round(v / 1e12, 3) for k, v in peaks.items()},
               "train_flops_per_token": flops, "variants": {}}
    print(f"\n{machine()}")
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s")
    print(f"{'variant':<22}{'tokens/s':>10}{'vs book':>9}{'MFU':>8}")
    for name, values in rates.items():
        rate = median(values)
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        mfu = rate * flops / peak
        results["variants"][name] = {"tokens_per_second": round(rate, 1), "runs": [round(v, 1) for v in values],
                                     "ratio_to_book": round(rate / book, 2), "mfu": round(mfu, 3)}
        print(f"{name:<22}{rate:>10.0f}{rate / book:>8.2f}x{mfu:>8.1%}")
    if args.profile:
        results["profile_bf16"] = profile(variants["ours bf16"], data[:3])
        print("ours bf16, share of operator time:", results["profile_bf16"])
        results["profile_book"] = profile(variants["book (fp32)"], data[:3])
        print("book fp32, share of operator time:", results["profile_book"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
