"""Real corpora through the Hub: the download and tokenize stages on a Parquet dataset served by
a stand-in Hugging Face Hub, against pyarrow + single-threaded tiktoken on the same files.

For each size, a seeded synthetic dataset (bench/synthetic.py's word model: documents of
about 1-4 kB, median 2 kB) is written once as --shards Parquet shards (8: 125 MB of text each
at 1 GB), 1,000 rows per row group (the row group of `datasets`' and datatrove's Parquet
writers), snappy, and kept under --work. The same number of shards at every size: the
download stage's memory depends on how many files huggingface_hub downloads at once
(gptpipe.hub.DATASET_DOWNLOADS) and how long they overlap, not on the corpus's size. tests/standin_hub.py serves it on localhost as
`hf://datasets/bench/synthetic-<size>MB`. In a scratch copy of the project (a git + DVC repo,
data.url naming the shards at the stand-in's commit, dvc.yaml cut to download and tokenize),
taking turns `--repeats` times:

- ours: the stages as the user runs them, dvc.yaml's commands as processes, with HF_ENDPOINT
  at the stand-in and HF_HOME a fresh, empty cache: `download` (huggingface_hub fetches the
  shards into its cache, the stage records the SHA-256 the Hub gives for each and writes the
  manifest), then `tokenize` (one scan pass, then encoding on every core);
- the baseline: one process that reads the same shards with pyarrow, a batch of 1,024 rows at
  a time as the stage reads them, and encodes each document with tiktoken's `encode_ordinary`
  on one thread, appending <|endoftext|> and writing uint16 ids (nanoGPT's prepare, without its
  process pool).

With --revision REV, the tokenize stage of that git revision of the project runs in the same
turns, on the same manifest and cache (the code before a change, side by side with it).

Each is timed as a whole process (imports included). Peak memory: ru_maxrss from wait4 (the
largest of the process and the encoding workers it reaped), and the process tree sampled every
50 ms: the sum of RSS (counts pages shared by the forked workers once per process) and the sum
of PSS (each shared page split among its sharers: the tree's real footprint). Throughput is MB of
document text (UTF-8) per second. The ids of both are checked to be the same bytes. On a
shared machine Linux's autogroup scheduler gives each busy session an equal share of the cores:
"cores busy" (CPU seconds over wall seconds) says whether a run had the two cores to itself.

Then, once per size: `dvc repro` of the two stages in the scratch repo on a fresh cache,
the bytes it leaves (allocated blocks, each file once) in the Hugging Face cache, data/raw,
data/tokens and .dvc/cache, again after `dvc config cache.type hardlink` + `dvc checkout
--relink`, and one pretrain epoch's data loading over the train split (context 256, stride
256, batch 2, shuffled; no model), whose peak memory must not grow with the corpus.

    python bench/bench_corpus.py                                  # 250 MB and 1 GB of text
    python bench/bench_corpus.py --revision 772af27               # and that revision's tokenize
    python bench/bench_corpus.py --sizes-mb 20 --repeats 1        # smoke test
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil  # a dependency of dvc

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ROWS_PER_GROUP = 1000
SAMPLE_EVERY_S = 0.05
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}


# The dataset.

def make_dataset(folder: Path, size_mb: float, n_shards: int, seed: int) -> dict:
    """`n_shards` shards of `size_mb` MB of text in all under folder/data, written once; their description."""
    info_path = folder / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq
    from synthetic import documents

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    n_bytes = int(size_mb * 1e6)
    names = [f"data/train-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)]
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    writer, shard, rows, text_bytes, documents_written, row_groups = None, -1, [], 0, 0, 0

    def flush() -> None:
        nonlocal rows, row_groups
        if rows:
            ids = range(documents_written - len(rows), documents_written)
            writer.write_table(pa.table({"id": list(ids), "text": rows}, schema=schema), row_group_size=ROWS_PER_GROUP)
            rows, row_groups = [], row_groups + 1

    print(f"writing {n_shards} shards of {size_mb:g} MB of text in all to {folder} ...", flush=True)
    for document in documents(n_bytes, seed):
        if (target := min(n_shards - 1, text_bytes * n_shards // n_bytes)) != shard:
            flush()
            if writer is not None:
                writer.close()
            shard = target
            writer = pq.ParquetWriter(folder / names[shard], schema, compression="snappy")
        rows.append(document)
        text_bytes += len(document.encode("utf-8"))
        documents_written += 1
        if len(rows) == ROWS_PER_GROUP:
            flush()
    flush()
    writer.close()
    info = {"files": names, "documents": documents_written, "text_bytes": text_bytes, "row_groups": row_groups,
            "rows_per_group": ROWS_PER_GROUP, "seed": seed,
            "parquet_bytes": sum((folder / name).stat().st_size for name in names)}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return info


# Measuring a process.

class TreeMemory(threading.Thread):
    """Samples the descendants of a process: the peak of the sums of their RSS and PSS (kB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak_rss_kb = self.peak_pss_kb = self.peak_processes = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_EVERY_S):
            self.sample()

    def sample(self) -> None:
        try:
            pids = [child.pid for child in self.process.children(recursive=True)]
        except psutil.Error:  # the process has ended
            return
        rss = pss = n = 0
        for pid in pids:
            try:
                rss += proc_kb(f"/proc/{pid}/status", "VmRSS:")
                pss += proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")
                n += 1
            except (OSError, StopIteration, ValueError):  # ended, or a zombie
                pass
        self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
        self.peak_processes = max(self.peak_processes, n)


def proc_kb(path: str, key: str) -> int:
    with open(path) as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


# Linux gives a new process the peak RSS of the memory it was started from (a fork of this
# benchmark) as its own ru_maxrss: the command is started by a small launcher process instead,
# which reports the command's wait4 usage (its peak RSS, or its encoding workers' if larger).
LAUNCHER = """import json, os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss, usage.ru_utime + usage.ru_stime], f)
"""


def measure(command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run `command` (an absolute executable first) to its end; its wall and CPU seconds and peak
    memory. Its output goes to `log`."""
    usage_file = log.with_suffix(".usage")
    load = os.getloadavg()[0]  # the machine's 1-minute load average just before: others' work, and ours
    with open(log, "w") as out:
        start = time.perf_counter()
        launcher = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(usage_file), *command], cwd=cwd,
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeMemory(launcher.pid)
        sampler.start()
        launcher.wait()
        seconds = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
    returncode, maxrss_kb, cpu_seconds = json.loads(usage_file.read_text()) if launcher.returncode == 0 else (-1, 0, 0)
    if returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{shlex.join(command)} failed (status {returncode}) in {cwd}:\n{tail}")
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "load_before": load, "maxrss_kb": maxrss_kb,
            "tree_rss_kb": sampler.peak_rss_kb, "tree_pss_kb": sampler.peak_pss_kb,
            "processes": sampler.peak_processes}


# The baseline and the data loading, each in its own process (--child).

def child_baseline(out: Path, files: list[str]) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import tiktoken

    from gptpipe.tokenizer import seed_tiktoken_cache
    seed_tiktoken_cache()  # offline: GPT-2's BPE files into tiktoken's cache
    encoding = tiktoken.get_encoding("r50k_base")  # GPT-2's ranks, the fast-loading file
    tokens = 0
    with open(out, "wb") as f:
        for path in files:
            # read as the tokenize stage reads (gptpipe.documents), which is cheaper than pyarrow's defaults
            parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
                ids: list[int] = []
                for text in batch.column(0).to_pylist():
                    ids.extend(encoding.encode_ordinary(text))
                    ids.append(encoding.eot_token)
                f.write(np.array(ids, dtype=np.uint16).tobytes())
                tokens += len(ids)
    return {"tokens": tokens}


def child_loader(tokens_file: Path, context_length: int, stride: int, batch_size: int) -> dict:
    import torch

    from gptpipe.data import window_loader
    from gptpipe.tokens import read_tokens
    torch.manual_seed(123)
    start = time.perf_counter()
    loader = window_loader(read_tokens(tokens_file), context_length, stride, batch_size, shuffle=True, drop_last=True)
    batches = sum(1 for _ in loader)
    return {"batches": batches, "loop_seconds": time.perf_counter() - start,
            "peak_anon_kb": proc_kb("/proc/self/status", "RssAnon:")}


# The scratch project.

def scratch_project(dest: Path, url: str, revision: str | None = None) -> Path:
    """The project (the working tree, or a git revision), cut to download and tokenize, reading
    `url`, as a git + DVC repo."""
    import yaml
    from bench_stages import copy_project, git_repo

    shutil.rmtree(dest, ignore_errors=True)
    project = copy_project(revision, dest)
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {name: dvc_yaml["stages"][name] for name in ("download", "tokenize")}
    dvc_yaml.pop("plots", None)
    dvc_yaml.pop("metrics", None)
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(url=url, sha256=None, max_bytes=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_repo(project)
    return project


def project_url(repo: str) -> str:
    from standin_hub import COMMIT
    return f"hf://datasets/{repo}@{COMMIT}/data/*.parquet"


def stage_command(project: Path, stage: str) -> list[str]:
    import yaml
    command = shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def environment(hf_home: Path, endpoint: str, work: Path) -> dict:
    """The stages' environment: huggingface_hub at the stand-in, with a cache of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    return env | GIT_IDENTITY | {
        "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
        "PYTHONPATH": str(ROOT / "src"),  # for the children; the stages put their own src/ first anyway
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "DVC_SITE_CACHE_DIR": str(work / "dvc-site-cache")}


def disk_bytes(*roots: Path) -> int:
    """Allocated bytes of the files under `roots`, each file (inode) once, symlinks not followed."""
    seen, total = set(), 0
    for root in roots:
        if not root.exists():
            continue
        for folder, _, names in os.walk(root):
            for name in names:
                st = os.lstat(os.path.join(folder, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def same_ids(baseline: Path, splits: list[Path]) -> bool:
    """Whether the baseline's ids are the splits' files, concatenated in order."""
    import hashlib
    ours, theirs = hashlib.sha256(), hashlib.sha256()
    for path in splits:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                ours.update(block)
    with open(baseline, "rb") as f:
        while block := f.read(1 << 24):
            theirs.update(block)
    return ours.digest() == theirs.digest()


def ids_per_text_byte(path: Path) -> float:
    """Bytes of uint16 token ids per byte of the text in `path` (one document)."""
    from gptpipe.tokenizer import gpt2_encoding
    text = path.read_text(encoding="utf-8")
    return 2 * len(gpt2_encoding().encode_ordinary(text)) / len(text.encode("utf-8"))


# One size.

def bench_size(size_mb: float, args, endpoint: str, repos) -> dict:
    from standin_hub import etag_of
    dataset = args.work / f"synthetic-{size_mb:g}MB-{args.shards}shards-seed{args.seed}"
    info = make_dataset(dataset, size_mb, args.shards, args.seed)
    repo = f"bench/synthetic-{size_mb:g}MB"
    repos.files[f"datasets/{repo}"] = {name: dataset / name for name in info["files"]}
    for name in info["files"]:  # the SHA-256 the Hub gives for each (Git LFS) file, computed before the runs
        etag_of(name, dataset / name)
    run_dir = args.work / f"run-{size_mb:g}MB"
    project = scratch_project(run_dir / "project", project_url(repo))
    hf_home, logs = run_dir / "hf", run_dir / "logs"
    logs.mkdir(exist_ok=True)
    env = environment(hf_home, endpoint, args.work)
    text_mb = info["text_bytes"] / 1e6
    runs: dict[str, list[dict]] = {"download": [], "tokenize": [], "baseline": []}
    if args.revision:
        other = scratch_project(run_dir / f"project-{args.revision}", project_url(repo), args.revision)
        runs[f"tokenize at {args.revision}"] = []

    def ours(r: int) -> None:
        shutil.rmtree(hf_home, ignore_errors=True)
        shutil.rmtree(project / "data", ignore_errors=True)
        for stage in ("download", "tokenize"):
            print(f"  {size_mb:g} MB, run {r + 1}: {stage} ...", flush=True)
            runs[stage].append(measure(stage_command(project, stage), project, env, logs / f"{stage}-{r}.log"))

    def baseline(r: int) -> None:
        print(f"  {size_mb:g} MB, run {r + 1}: baseline ...", flush=True)
        files = [str(dataset / name) for name in info["files"]]
        runs["baseline"].append(measure([sys.executable, __file__, "--child", "baseline", str(run_dir / "baseline.bin"),
                                         *files], ROOT, env, logs / f"baseline-{r}.log"))

    def revision(r: int) -> None:  # the other revision's tokenize, on this tree's manifest and cache
        print(f"  {size_mb:g} MB, run {r + 1}: tokenize at {args.revision} ...", flush=True)
        shutil.rmtree(other / "data", ignore_errors=True)
        shutil.copytree(project / "data/raw", other / "data/raw")
        runs[f"tokenize at {args.revision}"].append(measure(stage_command(other, "tokenize"), other, env,
                                                            logs / f"tokenize-{args.revision}-{r}.log"))

    sides = [ours, *([revision] if args.revision else []), baseline]
    for r in range(args.repeats):  # taking turns: ours first in even runs, the baseline first in odd ones
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side(r)

    meta = json.loads((project / "data/tokens/meta.json").read_text())
    splits = [project / "data/tokens" / f"{name}.bin" for name in meta["splits"]]
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    if not same_ids(run_dir / "baseline.bin", splits):
        raise SystemExit(f"{size_mb:g} MB: the tokenize stage's ids differ from the baseline's: see {run_dir}")
    if args.revision and not same_ids(run_dir / "baseline.bin", [other / "data/tokens" / s.name for s in splits]):
        raise SystemExit(f"{size_mb:g} MB: the ids of tokenize at {args.revision} differ from the baseline's")
    if meta["documents"] != info["documents"]:
        raise SystemExit(f"{size_mb:g} MB: tokenize counted {meta['documents']} documents, the dataset has "
                         f"{info['documents']}")

    print(f"  {size_mb:g} MB: one epoch of data loading ...", flush=True)
    loader = measure([sys.executable, __file__, "--child", "loader", str(splits[0]), "256", "256", "2"], ROOT, env,
                     logs / "loader.log")
    loader |= json.loads((logs / "loader.log").read_text().strip().splitlines()[-1])

    print(f"  {size_mb:g} MB: dvc repro ...", flush=True)
    shutil.rmtree(hf_home, ignore_errors=True)
    shutil.rmtree(project / "data", ignore_errors=True)
    repro = measure([sys.executable, "-m", "dvc", "repro"], project, env, logs / "dvc-repro.log")
    where = {"Hugging Face cache": hf_home, "data/raw": project / "data/raw", "data/tokens": project / "data/tokens",
             ".dvc/cache": project / ".dvc/cache"}
    disk = {name: disk_bytes(path) for name, path in where.items()}
    disk["all of them"] = disk_bytes(*where.values())
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink"], cwd=project, env=env,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "--relink"], cwd=project, env=env, check=True,
                   capture_output=True)
    disk["all of them, cache.type hardlink"] = disk_bytes(*where.values())
    return {"size_mb": size_mb, "text_mb": text_mb, "dataset": info, "tokens": tokens, "runs": runs,
            "loader": loader, "dvc_repro": repro, "disk_bytes": disk}


# The report.

def spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) < 2:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def report(results: list[dict], cores: int) -> list[str]:
    runs = [m for r in results for side in r["runs"].values() for m in side]
    loads = [m["load_before"] for m in runs]
    lines = [(f"{cores} cores; medians of {len(results[0]['runs']['baseline'])} run(s), (min-max) in brackets; "
              f"1-minute load average before each run {min(loads):.1f}-{max(loads):.1f}"), ""]
    lines += [("| text | run | seconds | MB of text/s | vs baseline | CPU s | cores busy | peak RSS, one process | "
               "tree: sum of RSS | tree: sum of PSS |"), "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        runs, mb = result["runs"], result["text_mb"]
        both = [{"seconds": d["seconds"] + t["seconds"], "cpu_seconds": d["cpu_seconds"] + t["cpu_seconds"]}
                for d, t in zip(runs["download"], runs["tokenize"])]
        base = statistics.median(r["seconds"] for r in runs["baseline"])
        rows = [("pyarrow + tiktoken `encode_ordinary`, 1 process", runs["baseline"], True),
                ("`download` (fresh Hugging Face cache)", runs["download"], True),
                ("`tokenize`", runs["tokenize"], True),
                *((f"`tokenize` at {name[len('tokenize at '):]}", runs[name], True)
                  for name in runs if name.startswith("tokenize at ")),
                ("`download` + `tokenize`", both, False),
                ("`dvc repro` (download + tokenize + caching, 1 run)", [result["dvc_repro"]], True)]
        for name, measured, memory in rows:
            seconds = [m["seconds"] for m in measured]
            peaks = (f"| {spread([m['maxrss_kb'] / 1024 for m in measured])} MB "
                     f"| {spread([m['tree_rss_kb'] / 1024 for m in measured])} MB "
                     f"| {spread([m['tree_pss_kb'] / 1024 for m in measured])} MB |") if memory else "| | | |"
            lines.append(f"| {mb:,.0f} MB | {name} | {spread(seconds)} | {spread([mb / s for s in seconds])} | "
                         f"{base / statistics.median(seconds):.2f}x | {spread([m['cpu_seconds'] for m in measured])} | "
                         f"{spread([m['cpu_seconds'] / m['seconds'] for m in measured])} {peaks}")
        loader = result["loader"]
        lines.append(f"| {mb:,.0f} MB | one epoch of pretrain data loading ({loader['batches']:,} batches, 1 run) | "
                     f"{loader['seconds']:.1f} | | | {loader['cpu_seconds']:.1f} | | {loader['maxrss_kb'] / 1024:.0f} MB "
                     f"(anonymous {loader['peak_anon_kb'] / 1024:.0f} MB) | | {loader['tree_pss_kb'] / 1024:.0f} MB |")
    lines += ["", "CPU seconds per MB of text (the stages' include their encoding processes'):"]
    for result in results:
        per_mb = {side: statistics.median(m["cpu_seconds"] for m in result["runs"][side]) / result["text_mb"]
                  for side in ("baseline", "download", "tokenize")}
        lines.append(f"- {result['text_mb']:,.0f} MB: baseline {per_mb['baseline']:.4f}, download "
                     f"{per_mb['download']:.4f}, tokenize {per_mb['tokenize']:.4f}")
    if len(results) > 1:
        small, large = results[0], results[-1]
        lines += ["", (f"peak memory at {large['text_mb']:,.0f} MB over {small['text_mb']:,.0f} MB of text "
                       f"(medians; goal: within 1.1x):")]
        for stage in ("download", "tokenize", *(name for name in small["runs"] if name.startswith("tokenize at "))):
            for key, what in (("maxrss_kb", "one process"), ("tree_pss_kb", "tree PSS"), ("tree_rss_kb", "tree RSS")):
                a = statistics.median(m[key] for m in small["runs"][stage])
                b = statistics.median(m[key] for m in large["runs"][stage])
                lines.append(f"- `{stage}`, {what}: {b / a:.2f}x")
        lines.append(f"- data loading, one process: {large['loader']['maxrss_kb'] / small['loader']['maxrss_kb']:.2f}x,"
                     f" anonymous: {large['loader']['peak_anon_kb'] / small['loader']['peak_anon_kb']:.2f}x")
    lines += ["", "| text | where | MB | MB per GB of text |", "| --- | --- | --- | --- |"]
    for result in results:
        gb = result["dataset"]["text_bytes"] / 1e9
        for name, n in result["disk_bytes"].items():
            lines.append(f"| {result['text_mb']:,.0f} MB | {name} | {n / 1e6:,.1f} | {n / 1e6 / gb:,.1f} |")
    lines += [""]
    for result in results:
        info = result["dataset"]
        lines.append(f"{result['text_mb']:,.0f} MB of text: {info['documents']:,} documents, {len(info['files'])} "
                     f"shards, {info['row_groups']:,} row groups, {info['parquet_bytes'] / 1e6:,.0f} MB of Parquet; "
                     f"{result['tokens']:,} tokens, {2 * result['tokens'] / info['text_bytes']:.3f} bytes of ids "
                     f"per byte of text")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[250, 1000], help="MB of text per dataset")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, taking turns")
    parser.add_argument("--shards", type=int, default=8, help="Parquet files per dataset")
    parser.add_argument("--revision", help="a git revision whose tokenize stage runs side by side too")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic datasets")
    parser.add_argument("--work", type=Path, default=BENCH / "results" / "corpus",
                        help="where the datasets (kept and reused), caches and scratch projects go")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "corpus.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"baseline": lambda: child_baseline(Path(rest[0]), rest[1:]),
                  "loader": lambda: child_loader(Path(rest[0]), *map(int, rest[1:]))}[kind]()
        print(json.dumps(result))
        return

    sys.path[:0] = [str(BENCH), str(ROOT / "tests")]  # synthetic, bench_stages; standin_hub
    from standin_hub import Repos, standin_hub

    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    repos = Repos()
    results = []
    with standin_hub(repos) as endpoint:
        for size_mb in args.sizes_mb:
            results.append(bench_size(size_mb, args, endpoint, repos))
    verdict = ids_per_text_byte(ROOT / "src/gptpipe/corpora/the-verdict.txt")
    cores = len(os.sched_getaffinity(0))
    lines = report(results, cores)
    lines.append(f"the-verdict: {verdict:.3f} bytes of ids per byte of text")
    print("\n" + "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "cores": cores, "the_verdict_id_bytes_per_text_byte": verdict,
                                    "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")


if __name__ == "__main__":
    main()
