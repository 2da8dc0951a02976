"""Decoding speed: the book's generate_text_simple (no KV cache) against ours, and what the
faster modes cost in agreement and loss.

Both models hold the same weights: the book's GPTModel randomly initialised with a fixed seed,
or, with --model, a model of the pipeline (data/model after `dvc repro`), whose agreement
numbers mean more than a random model's. Variants take turns, `--repeats` times each after a
warm-up; the table shows median tokens/s, the speed-up over
the book and MFU (model FLOPs per token × tokens/s over a matmul peak of this run).

- greedy decoding of --new-tokens at batch 1: the book; ours in fp32, with int8 weights
  (sample.quantize: int8), with bf16 autocast (--bf16); torchao's int8 (--torchao); torch's
  weight-only int8 kernel (--int8pack);
- --samples N sampled continuations (temperature 1, top-k 25): decoded one after another,
  and as one batch (sample.num_samples N), tokens/s over all N;
- agreement: the share of greedy tokens equal to fp32's over a fixed set of prompts (the
  first sentences of the-verdict), and the val loss of each mode (evaluate's loss on the
  first 8 val windows);
- against llama.cpp on the same weights (bench/llama_cpp.py builds it outside the repository on
  first use; skipped with a message where it cannot): our model directory, with GPT-2's tokenizer
  files, converted by llama.cpp's own convert_hf_to_gguf.py (f32) and quantized by its llama-quantize (Q8_0); --llama-tokens new
  tokens after a 1-token prompt (llama-bench's tg test), --threads threads each, ours fp32 vs
  its f32 and ours int8 vs its Q8_0, taking turns --llama-rounds times (best and median).

    python bench/bench_generate.py --model data/model
    python bench/bench_generate.py --small --new-tokens 20 --repeats 1 --no-llama-cpp   # smoke test
"""

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from llms_from_scratch.ch04 import generate_text_simple

sys.path.insert(0, str(Path(__file__).parent))
import llama_cpp  # noqa: E402
from common import BOOK_CONFIG, ROOT, find_corpus, machine, matmul_peak, timed  # noqa: E402

from gptpipe.checkpoint import load_model, save_model  # noqa: E402
from gptpipe.data import split_text, window_loader  # noqa: E402
from gptpipe.generate import generate  # noqa: E402
from gptpipe.metrics import evaluate_loader  # noqa: E402
from gptpipe.model import GPTModel, from_book_state_dict  # noqa: E402
from gptpipe.params import GPTConfig  # noqa: E402
from gptpipe.quantize import prepare_for_decoding  # noqa: E402
from gptpipe.tokenizer import encode, gpt2_encoding, hf_tokenizer_files  # noqa: E402

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


class Int8PackLinear(torch.nn.Module):
    """nn.Linear through torch's weight-only int8 kernel, torch.ops.aten._weight_int8pack_mm:
    int8 weights with a bf16 scale per output channel, bf16 activations (its vectorized path on
    x86), the output back in fp32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = torch.round(weight / scale[:, None]).to(torch.int8)
        self.scale, self.bias = scale.bfloat16(), linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).bfloat16(), self.weight, self.scale)
        y = y.float().view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8pack(model: torch.nn.Module) -> torch.nn.Module:
    for name, child in model.named_children():
        setattr(model, name, Int8PackLinear(child) if isinstance(child, torch.nn.Linear) else int8pack(child))
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


def against_llama_cpp(args, ours: GPTModel, fp32: torch.nn.Module, int8: torch.nn.Module) -> list[dict] | str:
    """Rows of ours against llama.cpp on the same weights, or the reason they were skipped."""
    try:
        llama = llama_cpp.build(args.llama_cpp)
        with tempfile.TemporaryDirectory() as tmp:
            hf = Path(tmp) / "hf"  # our model directory, with GPT-2's tokenizer files for the converter
            save_model(hf, ours, step=0)
            for name, data in hf_tokenizer_files().items():
                (hf / name).write_bytes(data)
            gguf = llama_cpp.convert(llama, hf, Path(tmp))
            prompt = torch.tensor([[gpt2_encoding().eot_token]])
            n = args.llama_tokens
            pairs = {("ours fp32", "llama.cpp f32"): (lambda: generate(fp32, prompt, n), gguf["f32"]),
                     ("ours int8 (sample.quantize)", "llama.cpp Q8_0"): (lambda: generate(int8, prompt, n), gguf["Q8_0"])}
            for run, _ in pairs.values():
                run()  # warm-up (llama-bench warms up itself)
            rates: dict[str, list[float]] = {name: [] for pair in pairs for name in pair}
            for round_ in range(args.llama_rounds):
                for (name, llama_name), (run, path) in pairs.items():
                    rates[name].append(n / timed(run))
                    rates[llama_name].append(llama_cpp.decode_tokens_per_second(llama, path, n, args.threads))
                print(f"round {round_ + 1}/{args.llama_rounds}: " +
                      ", ".join(f"{name} {r[-1]:.1f}" for name, r in rates.items()), flush=True)
    except llama_cpp.Unavailable as e:
        return f"llama.cpp rows skipped: {e}"
    rows = []
    for name, llama_name in pairs:
        for row_name in (name, llama_name):
            r = rates[row_name]
            rows.append({"variant": row_name, "best_tokens_per_s": round(max(r), 2),
                         "median_tokens_per_s": round(statistics.median(r), 2), "rounds": [round(x, 2) for x in r],
                         "best_vs_llama_cpp": round(max(r) / max(rates[llama_name]), 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="a model of the pipeline, e.g. data/model (default: random weights)")
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8, help="sampled continuations, one after another and as a batch (at least 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help=f"a tiny model ({SMALL}) for a smoke test")
    parser.add_argument("--bf16", action="store_true", help="also bf16 autocast (slow where bf16 is emulated)")
    parser.add_argument("--torchao", action="store_true", help="also torchao's int8 (pip install torchao)")
    parser.add_argument("--int8pack", action="store_true",
                        help="also torch's weight-only int8 kernel (_weight_int8pack_mm, bf16 activations)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=2, help="torch's threads, and llama.cpp's")
    parser.add_argument("--llama-cpp", type=Path, default=Path("~/.cache/gptpipe-bench/llama.cpp"),
                        help="where llama.cpp is built (on first use) and run from")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out the rows against llama.cpp")
    parser.add_argument("--llama-tokens", type=int, default=128)
    parser.add_argument("--llama-rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/generate.json")
    args = parser.parse_args()
    if args.samples < 2:
        parser.error("--samples must be at least 2: the batch of samples is compared with the samples one after another")

    torch.set_num_threads(args.threads)
    book, ours = models(args)
    cfg = ours.cfg
    fp32 = prepare_for_decoding(copy.deepcopy(ours), "none", CPU)  # as the sample stage decodes
    int8 = prepare_for_decoding(copy.deepcopy(ours), "int8", CPU)
    prompt = torch.tensor([encode(args.prompt)])
    n = args.new_tokens
    variants: dict[str, tuple[Callable[[int], torch.Tensor], torch.dtype]] = {
        "book generate_text_simple": (lambda k: generate_text_simple(book, prompt, k, cfg.context_length),
                                      torch.float32),
        "ours fp32": (lambda k: generate(fp32, prompt, k), torch.float32),
        "ours int8 (sample.quantize)": (lambda k: generate(int8, prompt, k), torch.float32),
    }
    modes = {"int8 (sample.quantize)": (int8, None)}
    if args.bf16:
        variants["ours bf16 autocast"] = (lambda k: generate(ours, prompt, k, autocast_dtype=torch.bfloat16),
                                          torch.bfloat16)
        modes["bf16 autocast"] = (ours, torch.bfloat16)
    if args.int8pack:
        packed = int8pack(prepare_for_decoding(copy.deepcopy(ours), "none", CPU))
        variants["ours int8 weight-only (_weight_int8pack_mm)"] = (lambda k: generate(packed, prompt, k), torch.float32)
        modes["int8 weight-only (_weight_int8pack_mm)"] = (packed, None)
    if args.torchao:
        ao = torchao_int8(copy.deepcopy(ours))
        variants["ours torchao int8"] = (lambda k: generate(ao, prompt, k), torch.float32)
        modes["torchao int8"] = (ao, None)

    def samples(batched: bool) -> torch.Tensor:
        seeds = [torch.Generator().manual_seed(args.seed + i) for i in range(args.samples)]
        options = dict(temperature=1.0, top_k=25)
        if batched:
            return generate(fp32, prompt.repeat(args.samples, 1), n, generator=seeds, **options)
        return torch.cat([generate(fp32, prompt, n, generator=g, **options) for g in seeds])

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
    quality = agreement_and_loss(ours, {"fp32": (fp32, None), **modes}, prompts,
                                 np.array(encode(val_text), dtype=np.uint16))

    llama_rows = "llama.cpp rows left out (--no-llama-cpp)" if args.no_llama_cpp else against_llama_cpp(args, ours, fp32, int8)

    print(f"\n{machine()}; weights: {args.model or 'random (seed ' + str(args.seed) + ')'}")
    print(f"{'variant':46} {'tokens/s':>9} {'vs book':>8} {'MFU':>7}  same tokens as the book")
    for row in rows:
        mfu = f"{row['mfu']:7.2%}" if row["mfu"] is not None else f"{'':>7}"
        print(f"{row['variant']:46} {row['tokens_per_s']:9.2f} {row['speedup_vs_book']:7.2f}x {mfu}  "
              f"{'' if row['same_tokens_as_book'] is None else row['same_tokens_as_book']}")
    print(f"the batch of samples equals the samples one after another: {batch_equals_sequential}")
    print(f"{'mode':40} {'greedy tokens = fp32':>21} {'val loss':>9}")
    for name, q in quality.items():
        print(f"{name:40} {q['greedy_tokens_equal_to_fp32']:>21.1%} {q['val_loss']:>9.4f}")
    if isinstance(llama_rows, str):
        print(llama_rows)
    else:
        print(f"\n{args.llama_tokens} new tokens after a 1-token prompt, {args.threads} threads, "
              f"{args.llama_rounds} rounds taking turns (llama.cpp built from llama-cpp-python "
              f"{llama_cpp.LLAMA_CPP_PYTHON}'s sdist)")
        print(f"{'variant':30} {'best tok/s':>11} {'median':>8} {'best vs llama.cpp':>18}")
        for row in llama_rows:
            print(f"{row['variant']:30} {row['best_tokens_per_s']:11.1f} {row['median_tokens_per_s']:8.1f} "
                  f"{row['best_vs_llama_cpp']:17.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(), "config": dataclasses.asdict(cfg), "weights": str(args.model or "random"),
        "new_tokens": n, "repeats": args.repeats, "flops_per_token": flops,
        "matmul_peak_flops": {str(k): v for k, v in peaks.items()}, "results": rows,
        "batch_equals_sequential": batch_equals_sequential, "agreement_and_loss": quality,
        "threads": args.threads, "against_llama_cpp": llama_rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
