"""Training throughput: this project's train step against the book's, side by side.

Both train the book's default config (124M, context 256, batch 2) on the same batches of
the-verdict from the same weights. Each variant runs in a fresh process of its own, set up
as its code sets itself up (the book's code as a user runs it; ours as the pretrain stage
does), and the variants take turns, `--repeats` times. The table shows median tokens/s, the
ratio to the book, and model FLOP utilisation against matmul peaks measured in the same run.

    python bench/bench_train.py                 # the book, ours in fp32, auto and bf16 (bf16: AMX CPUs only)
    python bench/bench_train.py --compile       # also torch.compile variants
    python bench/bench_train.py --profile       # where each step spends its time
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BOOK_CONFIG, ROOT, find_corpus, machine, matmul_peak, median, run_child, timed  # noqa: E402

# name: (code, precision, torch.compile, hold freed memory). Ours holds freed memory as
# gptpipe.pretrain.run_pretraining does; "book + held memory" is the book's code with that setting, to show
# how much of the gain the setting alone gives.
VARIANTS = {
    "book (fp32)": ("book", "fp32", False, False),
    "book + held memory": ("book", "fp32", False, True),
    "ours fp32": ("ours", "fp32", False, True),
    "ours auto": ("ours", "auto", False, True),
    "ours bf16": ("ours", "bf16", False, True),
}
COMPILED = {"ours bf16 compiled": ("ours", "bf16", True, True)}
# On a CPU without AMX tiles bf16 matmuls are emulated (minutes for the peak's 4096² product)
# and `auto` trains in fp32: the bf16 rows are then left out.
BF16_ONLY = ("ours bf16", "ours bf16 compiled")

# operator name fragments -> where the time goes (the first group that matches)
OPERATOR_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),
    "attention softmax and mask": ("softmax", "masked_fill", "attention", "aten::where", "aten::all",
                                   "isneginf"),
    "dropout masks": ("bernoulli", "random_"),
    "optimizer": ("adam", "_foreach"),
    "dtype casts and copies": ("aten::copy_",),
    "filling new buffers": ("aten::fill_", "aten::zero_"),
}


def batches(n: int, batch_size: int, context: int) -> list:
    import numpy as np

    from gptpipe.data import split_text, window_loader
    from gptpipe.tokenizer import encode
    train_text, _ = split_text(find_corpus().read_text(encoding="utf-8"), 0.9)
    tokens = np.array(encode(train_text), dtype=np.uint16)
    loader = window_loader(tokens, context, context, batch_size, shuffle=False, drop_last=True)
    all_batches = list(loader)
    return [all_batches[i % len(all_batches)] for i in range(n)]


def book_step_fn(state_dict):
    import torch
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


def our_step_fn(book_weights: Path, precision: str, compile_model: bool):
    """Our model, optimizer and step, built by the library functions the pretrain stage uses,
    starting from the book's weights (model.init_from takes the book's model.pth)."""
    import torch

    from gptpipe.params import load_params
    from gptpipe.pretrain import setup_model
    from gptpipe.train import micro_step, optimizer_step
    cpu = torch.device("cpu")
    params = load_params(ROOT / "params.yaml")
    opts = dataclasses.replace(params.train, precision=precision, compile=compile_model, device="cpu")
    model, optimizer, amp_dtype = setup_model(dataclasses.replace(params.model, init_from=str(book_weights)),
                                              opts, cpu)
    forward = torch.compile(model) if compile_model else model
    forward.train()

    def step(x, y):  # one step of gptpipe.train.train, without logging
        micro_step(forward, x, y, cpu, amp_dtype)
        optimizer_step(model, optimizer, opts.lr, opts.grad_clip, want_norm=False)
    return step


def flops_per_token(cfg: dict) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (all but the embedding tables)
    plus attention scores and values, 12·layers·emb·context (forward + backward)."""
    d, layers, vocab, ctx = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"], cfg["context_length"]
    weights = layers * 12 * d * d + d * vocab
    return 6 * weights + 12 * layers * d * ctx


def profile(step, data) -> dict[str, float]:
    """Share of operator time per group of OPERATOR_GROUPS."""
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x, y in data:
            step(x, y)
    seconds = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            group = next((g for g, keys in OPERATOR_GROUPS.items() if any(k in event.key for k in keys)),
                         "other")
            seconds[group] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    return {group: round(s / total, 3) for group, s in sorted(seconds.items(), key=lambda kv: -kv[1])}


def child(variant: str, warmup: int, steps: int, with_profile: bool) -> None:
    """One measurement in this fresh process: print {"tokens_per_second": ...} as JSON."""
    import torch
    from llms_from_scratch.ch04 import GPTModel as BookGPT

    from gptpipe.device import hold_freed_memory
    code, precision, compile_model, held_memory = {**VARIANTS, **COMPILED}[variant]
    if held_memory:
        hold_freed_memory()
    torch.manual_seed(123)
    weights = BookGPT(BOOK_CONFIG).state_dict()
    if code == "book":
        step = book_step_fn(weights)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(weights, Path(tmp) / "model.pth")
            step = our_step_fn(Path(tmp) / "model.pth", precision, compile_model)
    data = batches(warmup + steps, 2, BOOK_CONFIG["context_length"])
    for x, y in data[:warmup]:
        step(x, y)
    seconds = timed(lambda: [step(x, y) for x, y in data[warmup:]])
    result = {"tokens_per_second": steps * data[0][0].numel() / seconds}
    if with_profile:
        result["profile"] = profile(step, data[warmup:warmup + 3])
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--profile", action="store_true", help="break down the book's step and ours under auto")
    parser.add_argument("--out", default=str(ROOT / "bench/results/train.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--with-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.warmup, args.steps, args.with_profile)

    import torch
    fast_bf16 = torch.cpu._is_amx_tile_supported()
    variants = {name: variant for name, variant in {**VARIANTS, **(COMPILED if args.compile else {})}.items()
                if fast_bf16 or name not in BF16_ONLY}
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16) if fast_bf16 else None}
    timing = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    rates = defaultdict(list)
    for repeat in range(args.repeats):
        for name in variants:
            rates[name].append(run_child(__file__, name, *timing)["tokens_per_second"])
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {rates[name][-1]:.0f} tokens/s", flush=True)

    flops = flops_per_token(BOOK_CONFIG)
    book = median(rates["book (fp32)"])
    results = {"machine": machine(), "config": BOOK_CONFIG, "batch_size": 2,
               "matmul_peak_tflops": {k: round(v / 1e12, 3) for k, v in peaks.items() if v},
               "train_flops_per_token": flops, "variants": {}}
    print(f"\n{machine()}")
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s" +
          (f", bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s" if fast_bf16 else ", no bf16 (no AMX: auto trains fp32)"))
    print(f"{'variant':<22}{'tokens/s':>10}{'vs book':>9}{'MFU':>8}")
    for name, values in rates.items():
        rate = median(values)
        precision = variants[name][1]
        peak = peaks["bf16" if precision == "bf16" or (precision == "auto" and fast_bf16) else "fp32"]
        mfu = rate * flops / peak
        results["variants"][name] = {"tokens_per_second": round(rate, 1), "runs": [round(v, 1) for v in values],
                                     "ratio_to_book": round(rate / book, 2), "mfu": round(mfu, 3)}
        print(f"{name:<22}{rate:>10.0f}{rate / book:>8.2f}x{mfu:>8.1%}")
    if args.profile:
        for name in ("ours auto", "book (fp32)"):
            shares = run_child(__file__, name, *timing, "--with-profile")["profile"]
            results.setdefault("profile", {})[name] = shares
            print(f"{name}, share of operator time:", shares)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
