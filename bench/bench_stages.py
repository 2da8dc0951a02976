"""What the user waits for: the pipeline's commands against the book's code as a process,
each stage's fixed cost, and what one experiment adds to the DVC cache.

The pipeline runs in a git copy of the project: the working tree, and with --baseline REV
also a git revision of this project. The book's code runs as bench/book_process.py. All side
by side in the same run, taking turns `--repeats` times (medians reported), on the book's
config and the-verdict, with train.epochs (default 1) and train.precision (default auto):

- `dvc repro -f -s pretrain` against the book's training loop for the same epochs with its
  evaluations and epoch samples, as a process that saves model.pth;
- `dvc repro -f -s sample` (200 greedy tokens) against the book's `generate` in a process
  that loads model.pth;
- each stage's own command (dvc.yaml's cmd, without DVC): download of a local file, tokenize,
  pretrain with its training loop's time (metrics/train.json's wall_seconds) and the fixed
  cost, their difference (imports, setup, writing the outputs), evaluate, sample with 0 new
  tokens (its fixed cost) and with 200;
- with --cache (--cache-only: nothing else): what one `dvc exp run -S train.lr=5e-4`
  (train.max_steps 1) adds to .dvc/cache;
- with --sample-only, the sample stage alone, on a model after one optimizer step (the book's
  after none: its generate costs the same for any weights): `dvc repro -f -s sample` and the
  stage's command, 200 greedy tokens, with sample.quantize none and int8, and its fixed cost
  (0 tokens), against the book's sample process.

    python bench/bench_stages.py --baseline 5c5db96 --cache
    python bench/bench_stages.py --sample-only --repeats 5
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, find_corpus, machine, median  # noqa: E402

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
# the stages' `python` is this interpreter
ENV = {**os.environ, **GIT_IDENTITY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def copy_project(rev: str | None, dest: Path) -> Path:
    """The project at git revision `rev`, or the working tree (uncommitted changes included)."""
    dest.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes((ROOT / name).read_bytes())
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            tarfile.open(fileobj=f).extractall(dest, filter="data")
    return dest


def set_params(project: Path, overrides: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for group, values in overrides.items():
        params[group].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(project: Path, stage: str) -> float:
    """Run dvc.yaml's command of `stage` in `project`; its wall time in seconds."""
    command = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    start = time.perf_counter()
    result = subprocess.run(command, shell=True, cwd=project, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed in {project}:\n{result.stderr[-3000:]}")
    return seconds


def dvc(project: Path, *args: str) -> float:
    """Run the dvc CLI in `project`; its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=ENV, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed in {project}:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def git_repo(project: Path) -> None:
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=project, env=ENV, check=True, capture_output=True)


def measure_pipeline(project: Path) -> dict[str, float]:
    times = {"dvc repro -f -s pretrain": dvc(project, "repro", "-f", "-s", "pretrain"),
             "dvc repro -f -s sample (200 tokens)": dvc(project, "repro", "-f", "-s", "sample")}
    times |= {f"{stage} (command)": run_stage(project, stage) for stage in ("download", "tokenize", "pretrain")}
    times["pretrain loop"] = json.loads((project / "metrics/train.json").read_text())["wall_seconds"]
    times["pretrain fixed cost"] = times["pretrain (command)"] - times["pretrain loop"]
    times["evaluate (command)"] = run_stage(project, "evaluate")
    set_params(project, {"sample": {"max_new_tokens": 0}})
    times["sample, 0 tokens: fixed cost (command)"] = run_stage(project, "sample")
    set_params(project, {"sample": {"max_new_tokens": 200}})
    times["sample, 200 tokens (command)"] = run_stage(project, "sample")
    if "export" in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]:  # a baseline before 19
        times["export (command)"] = run_stage(project, "export")
    return times


def measure_sample(project: Path) -> dict[str, float]:
    """The sample stage alone: through DVC and as its command, fp32 and int8, and its fixed cost."""
    times = {}
    for quantize in ("none", "int8"):
        set_params(project, {"sample": {"quantize": quantize, "max_new_tokens": 200}})
        times[f"dvc repro -f -s sample (200 tokens, {quantize})"] = dvc(project, "repro", "-f", "-s", "sample")
        times[f"sample, 200 tokens, {quantize} (command)"] = run_stage(project, "sample")
        set_params(project, {"sample": {"max_new_tokens": 0}})
        times[f"sample, 0 tokens, {quantize}: fixed cost (command)"] = run_stage(project, "sample")
    set_params(project, {"sample": {"quantize": "none", "max_new_tokens": 200}})
    return times


def book_sample(work: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).with_name("book_process.py")), "sample", str(work),
                    "--new-tokens", "200"], env=ENV, capture_output=True, check=True)
    return time.perf_counter() - start


def measure_book(work: Path, corpus: Path, epochs: int, sample_only: bool = False) -> dict[str, float]:
    script = str(Path(__file__).with_name("book_process.py"))
    if sample_only:
        if not (work / "model.pth").exists():  # an untrained model: the book's generate costs the same
            subprocess.run([sys.executable, script, "pretrain", str(corpus), str(work), "--epochs", "0"],
                           env=ENV, capture_output=True, check=True)
        seconds = book_sample(work)
        return {f"dvc repro -f -s sample (200 tokens, {q})": seconds for q in ("none", "int8")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, script, "pretrain", str(corpus), str(work), "--epochs", str(epochs)],
                            env=ENV, capture_output=True, text=True, check=True)
    times = {"dvc repro -f -s pretrain": time.perf_counter() - start,
             "pretrain loop": json.loads(result.stdout.strip().splitlines()[-1])["loop_seconds"]}
    times["pretrain fixed cost"] = times["dvc repro -f -s pretrain"] - times["pretrain loop"]
    times["dvc repro -f -s sample (200 tokens)"] = book_sample(work)
    return times


def cache_growth(project: Path) -> dict[str, int]:
    """Bytes that one `dvc exp run` adds to .dvc/cache, and the model output's own size."""
    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size

    def cache_bytes() -> int:
        return size(project / ".dvc/cache")

    set_params(project, {"train": {"max_steps": 1}})
    git_repo(project)
    dvc(project, "repro")
    before = cache_bytes()
    dvc(project, "exp", "run", "-S", "train.lr=5e-4")
    outputs = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["pretrain"]["outs"]
    model = next(project / out for out in outputs if out.startswith("data/model"))
    return {"added_bytes": cache_bytes() - before, "model_output_bytes": size(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision to measure side by side with the working tree")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cache", action="store_true", help="also measure one dvc exp run's cache growth")
    parser.add_argument("--cache-only", action="store_true", help="measure the cache growth only, no timings")
    parser.add_argument("--sample-only", action="store_true",
                        help="time the sample stage only (fp32 and int8), on a model after one step")
    parser.add_argument("--out", default=str(ROOT / "bench/results/stages.json"))
    args = parser.parse_args()

    revs = {"working tree": None, **({f"baseline {args.baseline}": args.baseline} if args.baseline else {})}
    overrides = {"data": {"url": str(find_corpus())},
                 "train": {"epochs": args.epochs, "precision": args.precision},
                 "sample": {"temperature": 0.0, "max_new_tokens": 200}}
    if args.sample_only:
        overrides["train"]["max_steps"] = 1
    names = ["the book's code", *revs]
    times: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in names}
    cache = {}
    if args.cache_only:
        args.cache, args.repeats = True, 0
    with tempfile.TemporaryDirectory() as tmp:
        projects = {}
        for i, (name, rev) in enumerate(revs.items() if args.repeats else []):
            projects[name] = copy_project(rev, Path(tmp) / f"project{i}")
            set_params(projects[name], overrides)
            git_repo(projects[name])
            dvc(projects[name], "repro")  # every stage once, so the timed ones find their inputs
        for repeat in range(args.repeats):
            for name in names:
                if name == names[0]:
                    measured = measure_book(Path(tmp) / "book", find_corpus(), args.epochs, args.sample_only)
                else:
                    measured = (measure_sample if args.sample_only else measure_pipeline)(projects[name])
                for key, seconds in measured.items():
                    times[name][key].append(seconds)
                print(f"repeat {repeat + 1}/{args.repeats} {name}: " + ", ".join(
                    f"{key} {values[-1]:.1f} s" for key, values in times[name].items()), flush=True)
        if args.cache:
            for i, (name, rev) in enumerate(revs.items()):
                project = copy_project(rev, Path(tmp) / f"cache{i}")
                set_params(project, overrides)
                cache[name] = cache_growth(project)

    print(f"\n{machine()}; {args.epochs} epoch(s), train.precision {args.precision}, medians of {args.repeats}")
    if args.repeats:
        print("(the book's rows under the dvc commands are its process for the same work)")
        print(f"{'seconds':<40}" + "".join(f"{name:>22}" for name in names))
        for key in times[names[1]]:
            cells = [f"{median(times[name][key]):>22.2f}" if key in times[name] else f"{'':>22}" for name in names]
            print(f"{key:<40}" + "".join(cells))
        for key in times[names[0]]:
            if not key.startswith("dvc repro"):
                continue
            book = median(times[names[0]][key])
            print(f"{key}: " + ", ".join(f"{name} {book / median(times[name][key]):.2f}x the book" for name in revs))
    for name, growth in cache.items():
        print(f"{name}: one dvc exp run added {growth['added_bytes']:,} bytes to .dvc/cache "
              f"(model output {growth['model_output_bytes']:,} bytes)")
    results = {"machine": machine(), "epochs": args.epochs, "precision": args.precision,
               "seconds": {name: {key: {"median": round(median(v), 2), "runs": [round(x, 2) for x in v]}
                                  for key, v in times[name].items()} for name in names},
               "cache": cache}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
