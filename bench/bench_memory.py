"""Memory of the training windows: the book's GPTDatasetV1 against our TokenWindows.

The book's dataset copies every window into two tensors of int64 when it is built; ours is
a view of the token file per window. Both get the same tokens (tiktoken's GPT-2 encoding,
<|endoftext|> allowed, as GPTDatasetV1 encodes) and build windows of `--context-length`
tokens every `--stride` (stride 1: every possible window, the worst case); then every window
is read once. Each runs in its own process; the table shows the memory the dataset added
(RSS after building and reading every window, minus before) and the process's peak RSS
(ru_maxrss from wait4). The corpora: the book's the-verdict.txt and, for each `--mb`, that
many MB of seeded synthetic text (bench/synthetic.py).

    python bench/bench_memory.py                     # the-verdict and 2 MB, stride 1
    python bench/bench_memory.py --mb 0.05           # smoke test
"""

import argparse
import json
import sys
import time
from pathlib import Path

from common import run_child

BENCH = Path(__file__).resolve().parent


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(kind: str, text_path: Path, tokens_path: Path, context_length: int, stride: int) -> dict:
    import numpy as np
    import tiktoken
    import torch  # noqa: F401  (imported before measuring, by both)
    from llms_from_scratch.ch02 import GPTDatasetV1

    from gptpipe.data import TokenWindows
    from gptpipe.tokens import read_tokens
    text = text_path.read_text(encoding="utf-8")
    tokenizer = tiktoken.get_encoding("gpt2")
    before = rss_kb()
    start = time.perf_counter()
    if kind == "book":
        dataset = GPTDatasetV1(text, tokenizer, context_length, stride)
    else:
        dataset = TokenWindows(read_tokens(tokens_path), context_length, stride)
    build_seconds = time.perf_counter() - start
    checksum = 0
    for i in range(len(dataset)):  # read every window once
        x, y = dataset[i]
        if i in (0, len(dataset) - 1):
            checksum += int(np.asarray(x, dtype=np.int64).sum()) + int(np.asarray(y, dtype=np.int64).sum())
    return {"windows": len(dataset), "checksum": checksum, "build_seconds": build_seconds,
            "dataset_kb": rss_kb() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="*", default=[2.0], help="synthetic corpus sizes, MB")
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic corpora")
    parser.add_argument("--workdir", type=Path, default=BENCH / "results" / "data")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "memory.json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, text_path, tokens_path, context_length, stride = args.child
        print(json.dumps(child(kind, Path(text_path), Path(tokens_path), int(context_length), int(stride))))
        return

    sys.path.insert(0, str(BENCH))
    import numpy as np
    import tiktoken
    from common import find_corpus
    from synthetic import write_corpus

    args.workdir.mkdir(parents=True, exist_ok=True)
    corpora = {"the-verdict": find_corpus()}
    for size_mb in args.mb:
        path = args.workdir / f"synthetic-{size_mb:g}MB-seed{args.seed}.txt"
        if not path.is_file():
            write_corpus(path, int(size_mb * 1e6), args.seed)
        corpora[f"synthetic {size_mb:g} MB"] = path
    encoding = tiktoken.get_encoding("gpt2")
    rows = []
    for name, text_path in corpora.items():
        ids = encoding.encode(text_path.read_text(encoding="utf-8"), allowed_special={"<|endoftext|>"})
        tokens_path = args.workdir / f"{text_path.stem}.bin"
        np.array(ids, dtype=np.uint16).tofile(tokens_path)
        runs = {}
        for kind in ("book", "ours"):
            print(f"{name}: {kind} ...", flush=True)
            runs[kind] = run_child(__file__, kind, str(text_path), str(tokens_path), str(args.context_length), str(args.stride))
        if (runs["book"]["windows"], runs["book"]["checksum"]) != (runs["ours"]["windows"], runs["ours"]["checksum"]):
            raise SystemExit(f"{name}: the two datasets disagree: {runs}")
        rows.append({"corpus": name, "tokens": len(ids), "context_length": args.context_length,
                     "stride": args.stride, "windows": runs["ours"]["windows"], **{
                         f"{kind}_{key}": value for kind, run in runs.items() for key, value in run.items()
                         if key not in ("windows", "checksum")}})

    print(f"\n{'corpus':<20} {'tokens':>9} {'windows':>9}  {'dataset MB: book':>16} {'ours':>7}  "
          f"{'peak RSS MB: book':>17} {'ours':>7}")
    for r in rows:
        print(f"{r['corpus']:<20} {r['tokens']:9,} {r['windows']:9,}  {r['book_dataset_kb'] / 1024:16.1f} "
              f"{r['ours_dataset_kb'] / 1024:7.1f}  {r['book_peak_rss_kb'] / 1024:17.0f} "
              f"{r['ours_peak_rss_kb'] / 1024:7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
