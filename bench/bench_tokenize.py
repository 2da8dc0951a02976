"""Tokenize throughput and memory at scale: our streaming, multi-process tokenize stage against
single-threaded tiktoken, and the memory of one pretrain epoch's data loading.

For each size, a seeded synthetic corpus (bench/synthetic.py: GPT-2's whole-word tokens,
Zipf-weighted, in documents joined by <|endoftext|>) is tokenized

- by tiktoken's encode_ordinary on one thread, 1 MB of text at a time (the baseline), and
- by gptpipe.corpus.tokenize_corpus, the tokenize stage's function (scan, split, encode on
  `--workers` processes, write the token files), for each worker count;

then one pretrain epoch's data loading iterates the window loader over the train split (the
book's context 256, stride 256, batch 2, shuffled; no model). Each runs in its own process:
its peak RSS is ru_maxrss from wait4, and the child also samples its anonymous RSS (memory
that is not file pages: the loader's memory-mapped tokens count in RSS as page cache the
kernel may drop, and grow with the corpus by nature, so the anonymous peak is the one that
must stay flat). Throughput is corpus bytes over the wall time of the work, imports excluded.

    python bench/bench_tokenize.py                                   # 100 MB and 400 MB
    python bench/bench_tokenize.py --sizes-mb 2 8 --workers 2        # smoke test
"""

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

from common import run_child

BENCH = Path(__file__).resolve().parent
READ_CHARS = 1 << 20


class PeakMemory:
    """Samples this process's anonymous RSS (RssAnon) every few milliseconds, keeping the max."""

    def __init__(self, every_s: float = 0.005):
        self.every_s = every_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, rss_anon_kb())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, rss_anon_kb())


def rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


# What each child process measures; it prints one JSON line.

def child_baseline(corpus: Path) -> dict:
    import tiktoken
    encoding = tiktoken.get_encoding("gpt2")
    tokens = 0
    with PeakMemory() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        with open(corpus, encoding="utf-8") as f:
            while text := f.read(READ_CHARS):
                tokens += len(encoding.encode_ordinary(text))
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "tokens": tokens, "peak_anon_kb": memory.peak_kb}


def child_tokenize(corpus: Path, out: Path, workers: int) -> dict:
    from gptpipe.corpus import tokenize_corpus
    from gptpipe.tokenizer import gpt2_encoding
    gpt2_encoding()  # loading the BPE files is not tokenizing
    with PeakMemory() as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        meta = tokenize_corpus(corpus, out, 0.9, workers=workers)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    workers_usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the encoding processes, ended
    return {"seconds": seconds, "cpu_seconds": cpu_seconds + workers_usage.ru_utime + workers_usage.ru_stime,
            "tokens": tokens, "documents": meta["documents"], "peak_anon_kb": memory.peak_kb,
            "worker_peak_rss_kb": workers_usage.ru_maxrss}


def child_loader(tokens_dir: Path, context_length: int, stride: int, batch_size: int) -> dict:
    import torch
    from gptpipe.data import window_loader
    from gptpipe.tokens import read_tokens
    torch.manual_seed(123)
    with PeakMemory() as memory:
        start = time.perf_counter()
        loader = window_loader(read_tokens(tokens_dir / "train.bin"), context_length, stride, batch_size,
                               shuffle=True, drop_last=True)
        batches = sum(1 for _ in loader)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "batches": batches, "peak_anon_kb": memory.peak_kb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 400], help="corpus sizes, MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))],
                        help="tokenize thread counts to measure")
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic corpus")
    parser.add_argument("--workdir", type=Path, default=BENCH / "results" / "data",
                        help="where corpora (kept and reused) and token files go")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "tokenize.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"baseline": lambda: child_baseline(Path(rest[0])),
                  "tokenize": lambda: child_tokenize(Path(rest[0]), Path(rest[1]), int(rest[2])),
                  "loader": lambda: child_loader(Path(rest[0]), *map(int, rest[1:]))}[kind]()
        print(json.dumps(result))
        return

    sys.path.insert(0, str(BENCH))
    from synthetic import write_corpus

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size_mb in args.sizes_mb:
        corpus = args.workdir / f"synthetic-{size_mb:g}MB-seed{args.seed}.txt"
        if not corpus.is_file():
            print(f"writing {corpus} ...", flush=True)
            write_corpus(corpus, int(size_mb * 1e6), args.seed)
        n_bytes = corpus.stat().st_size
        tokens_dir = args.workdir / f"tokens-{size_mb:g}MB"
        print(f"{size_mb:g} MB: baseline ...", flush=True)
        runs = {"tiktoken encode_ordinary, 1 thread": run_child(__file__, "baseline", str(corpus))}
        for workers in args.workers:
            print(f"{size_mb:g} MB: tokenize, {workers} worker(s) ...", flush=True)
            runs[f"tokenize stage, {workers} worker(s)"] = run_child(__file__, "tokenize", str(corpus), str(tokens_dir),
                                                                      str(workers))
        print(f"{size_mb:g} MB: one epoch of data loading ...", flush=True)
        runs["pretrain data loading, 1 epoch"] = run_child(__file__, "loader", str(tokens_dir), str(args.context_length),
                                                           str(args.stride), str(args.batch_size))
        baseline_s = runs["tiktoken encode_ordinary, 1 thread"]["seconds"]
        for name, run in runs.items():
            tokenizing = "tokens" in run
            rows.append({"size_mb": n_bytes / 1e6, "run": name, **run,
                         "mb_per_s": n_bytes / 1e6 / run["seconds"] if tokenizing else None,
                         "speedup": baseline_s / run["seconds"] if tokenizing else None})

    print(f"\n{'corpus':>8}  {'run':<36} {'MB/s':>7} {'vs 1 thread':>11} {'CPU s/MB':>8} "
          f"{'peak RSS':>9} {'peak anon':>9} {'worker RSS':>10}")
    for r in rows:
        tokenizing = r["speedup"] is not None
        speed = f"{r['mb_per_s']:7.2f}" if tokenizing else f"{'':>7}"
        speedup = f"{r['speedup']:10.2f}x" if tokenizing else f"({r['seconds']:.1f} s)"
        cpu = f"{r['cpu_seconds'] / r['size_mb']:8.3f}" if tokenizing else f"{'':>8}"
        print(f"{r['size_mb']:6.0f}MB  {r['run']:<36} {speed} {speedup:>11} {cpu} "
              f"{r['peak_rss_kb'] / 1024:7.0f}MB {r['peak_anon_kb'] / 1024:7.0f}MB "
              f"{r.get('worker_peak_rss_kb', 0) / 1024:8.0f}MB")
    if len(args.sizes_mb) > 1:
        print(f"\npeak memory, {args.sizes_mb[-1]:g} MB over {args.sizes_mb[0]:g} MB (goal: within 10%):")
        for name in dict.fromkeys(r["run"] for r in rows):
            same = [r for r in rows if r["run"] == name]
            small, large = same[0], same[-1]
            print(f"  {name:<36} RSS {large['peak_rss_kb'] / small['peak_rss_kb']:.2f}x, "
                  f"anonymous {large['peak_anon_kb'] / small['peak_anon_kb']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "cores": len(os.sched_getaffinity(0)),
                                    "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")


if __name__ == "__main__":
    main()
