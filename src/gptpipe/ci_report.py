"""Reproduce the pipeline at two commits on a small params set and report what changed: the
params, `dvc metrics diff` and the loss curves of both runs. A pull request's CI job runs it
(.github/workflows/experiments.yml); `make experiment-report` runs it here.

    python -m gptpipe.ci_report --base main     # HEAD against main, into experiment-report/

Each commit runs as a DVC experiment (`dvc exp run -S` with every key of the params set) in
a temporary git worktree that shares this repository's DVC cache: stages that did not change
come from DVC's run cache, and this workspace stays as it is (uncommitted changes are not
part of the report). The report folder holds report.md (the tables and the image), loss.png,
dvc-plots/index.html (the `dvc plots diff` page) and report.json, from which
`--summary-link URL` prints report.md again with its files linked to URL: a GitHub step
summary shows no local image, so CI links it to the uploaded artifact.

This module drives DVC and git; the rest of the library knows nothing of either.
"""

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from gptpipe import cli
from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path, write_json, write_text

log = logging.getLogger("ci_report")

PARAMS_SET = ".ci/params-small.yaml"
LOSS_PLOTS = ["loss_by_step", "loss_by_tokens"]  # dvc.yaml's plot ids, drawn in loss.png
IMAGE, PAGE = "loss.png", "dvc-plots/index.html"


def command(args: Sequence[str], cwd: Path | str = ".", what: str = "") -> str:
    """Run a command, its output captured; a failure is a PipelineError with its error line
    (DVC's `ERROR:` line, else the last line it printed)."""
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit status {result.returncode}"]
        line = next((line for line in lines if line.startswith("ERROR:")), lines[-1]).removeprefix("ERROR:")
        raise PipelineError(f"{what or ' '.join(args[:3])} failed: {line.strip()}")
    return result.stdout


def dvc(*args: str, cwd: Path | str = ".") -> str:
    return command([sys.executable, "-m", "dvc", *args], cwd, f"dvc {' '.join(args[:2])}")


def load_params_set(path: Path, params_file: Path) -> dict[str, Any]:
    """The params set as `dvc exp run -S` keys (group.key) and values, each one a key of
    `params_file`."""
    try:
        groups = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PipelineError(f"{path} is not valid YAML ({' '.join(str(e).split())}); fix it")
    if not isinstance(groups, dict) or not all(isinstance(keys, dict) for keys in groups.values()):
        raise PipelineError(f"{path} must map params groups to keys and values, as params.yaml does "
                            f"(e.g. train: {{max_steps: 50}})")
    flat = {f"{group}.{key}": value for group, keys in groups.items() for key, value in keys.items()}
    for key in flat:
        if not has_key(params, key):
            raise PipelineError(f"{path}: {key} is not a key of {params_file}; use one of its keys")
    return flat


def has_key(params: Any, dotted: str) -> bool:
    group, key = dotted.split(".", 1)
    return isinstance(params, dict) and isinstance(params.get(group), dict) and key in params[group]


def resolve_commit(ref: str, fix: str) -> str:
    try:
        return command(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"]).strip()
    except PipelineError:
        raise PipelineError(f"{ref} names no commit in this repository; {fix}") from None


def run_experiment(commit: str, name: str, overrides: dict[str, Any], cache_dir: str) -> None:
    """`dvc exp run` of `commit` with `overrides`, named `name`, in a temporary worktree that
    shares `cache_dir`; DVC's output goes to this process's output, as the run goes."""
    refs = command(["git", "for-each-ref", "--format=%(refname)", f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"])
    if refs.strip():  # a report of this commit made before: run it again with today's params set
        dvc("exp", "remove", name)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        worktree = Path(tmp) / "repo"
        command(["git", "worktree", "add", "--detach", "--quiet", str(worktree), commit])
        try:
            dvc("config", "--local", "cache.dir", cache_dir, cwd=worktree)
            sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
            log.info(f"reproducing {commit[:7]} as experiment {name}")
            run = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "--name", name, *sets], cwd=worktree)
            if run.returncode != 0:
                raise PipelineError(f"`dvc exp run` of {commit[:7]} failed (its output is above); fix the "
                                    f"pipeline at that commit, or run it by hand there")
        finally:
            command(["git", "worktree", "remove", "--force", str(worktree)])


def encoding(spec: dict[str, Any], channel: str) -> dict[str, Any]:
    """The first encoding of `channel` in a Vega-Lite spec, at its top or in its layers."""
    found = spec.get("encoding", {}).get(channel)
    for layer in spec.get("layer", []):
        found = found or encoding(layer, channel)
    return found


def draw_losses(plots: dict[str, list[dict]], path: Path) -> list[str]:
    """loss.png: the loss charts of `dvc plots diff --json` as the page draws them: its titles,
    labels and colours, validation dashed. Returns what it drew, a line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = [item["content"] for plot in LOSS_PLOTS for item in plots.get(plot, []) if item["type"] == "vega"]
    if not charts:
        raise PipelineError(f"dvc.yaml defines none of the plots {', '.join(LOSS_PLOTS)} that loss.png draws; "
                            f"keep one of them")
    fig, axes = plt.subplots(1, len(charts), figsize=(6 * len(charts), 4.5), squeeze=False)
    drawn = []
    for ax, chart in zip(axes[0], charts):
        x_axis, y_axis = encoding(chart, "x"), encoding(chart, "y")
        x, y = x_axis["field"], y_axis["field"]
        curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for point in chart["data"]["values"]:
            curves.setdefault((point["rev"], point.get("field", y)), []).append((float(point[x]), float(point[y])))
        scale = (encoding(chart, "color") or {}).get("scale", {})  # the page's colour of each experiment
        colors = dict(zip(scale.get("domain", []), scale.get("range", [])))
        for (rev, column), points in curves.items():
            ax.plot(*zip(*points), color=colors.get(rev), linestyle="--" if column.startswith("val") else "-",
                    label=f"{rev} {column}")
        ax.set(title=chart["title"]["text"], xlabel=x_axis["title"], ylabel=y_axis["title"])
        ax.grid(alpha=0.3)
        ax.legend()
        drawn += [f"{chart['title']['text']}: {rev} {column}, {len(points)} points"
                  for (rev, column), points in curves.items()]
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return drawn


def markdown(report: dict[str, Any], link: str | None = None) -> str:
    """The report in Markdown; with `link`, its files are at that address (a CI artifact), else
    next to report.md."""
    base, head = report["base"], report["head"]
    params_set = ", ".join(f"`{key}={json.dumps(value)}`" for key, value in report["params_set"].items())
    lines = [
        f"## Experiments: {head['ref']} against {base['ref']}",
        "",
        f"Both commits reproduced with `dvc exp run` on the small params set `{report['params_set_file']}`: "
        f"{params_set}.",
    ]
    if report["not_applied_to_base"]:
        lines.append(f"Not applied to the base, whose params.yaml lacks them: "
                     f"{', '.join(f'`{key}`' for key in report['not_applied_to_base'])}.")
    lines += [
        "",
        "| | ref | commit | experiment |",
        "| --- | --- | --- | --- |",
        f"| base | `{base['ref']}` | {base['commit'][:7]} | {base['experiment']} |",
        f"| head | `{head['ref']}` | {head['commit'][:7]} | {head['experiment']} |",
        "",
        "### Params that changed",
        "",
        report["params_diff"] or "None: both ran the same params.",
        "",
        "### Metrics (`dvc metrics diff`, the metrics that changed)",
        "",
        report["metrics_diff"] or "None changed.",
        "",
        "### Loss curves",
        "",
    ]
    if link:
        lines.append(f"`{IMAGE}` (train and validation loss of both) and the `dvc plots diff` page "
                     f"`{PAGE}` (every chart, both experiments overlaid; it renders offline) are in this "
                     f"job's artifact: [download it]({link}).")
    else:
        lines += [f"![train and validation loss of both]({IMAGE})", "",
                  f"The `dvc plots diff` page, every chart with both experiments overlaid: [{PAGE}]({PAGE})."]
    return "\n".join(lines) + "\n"


def table_rows(table: str) -> str:
    """A Markdown table DVC printed, or "" where it has no row (DVC prints the header alone)."""
    lines = table.strip().splitlines()
    return "\n".join(lines) if len(lines) > 2 else ""


def make_report(base_ref: str, params_set_file: Path, out: Path) -> dict[str, Any]:
    if not Path("dvc.yaml").is_file() or not Path("params.yaml").is_file():
        raise PipelineError("no dvc.yaml and params.yaml here; run from the project's root")
    params_set = load_params_set(params_set_file, Path("params.yaml"))
    command(["git", "rev-parse", "--git-dir"])  # fails with git's own line outside a repository
    base_commit = resolve_commit(base_ref, "fetch it (e.g. `git fetch origin main`) or pass another --base")
    head_commit = resolve_commit("HEAD", "commit the project first: `dvc exp run` runs commits")
    if command(["git", "status", "--porcelain", "--untracked-files=no"]).strip():
        log.info("note: uncommitted changes are not part of the report, which compares commits")
    base_params = yaml.safe_load(command(["git", "show", f"{base_commit}:params.yaml"]))
    base_overrides = {key: value for key, value in params_set.items() if has_key(base_params, key)}
    cache_dir = str(Path(dvc("cache", "dir").strip()).resolve())
    base = {"ref": base_ref, "commit": base_commit, "experiment": f"base-{base_commit[:7]}"}
    head = {"ref": "HEAD", "commit": head_commit, "experiment": f"head-{head_commit[:7]}"}
    run_experiment(base_commit, base["experiment"], base_overrides, cache_dir)
    run_experiment(head_commit, head["experiment"], params_set, cache_dir)

    revisions = [base["experiment"], head["experiment"]]
    out.mkdir(parents=True, exist_ok=True)  # dvc plots diff --out makes the last folder only
    dvc("plots", "diff", *revisions, "--out", str(out / Path(PAGE).parent))
    plots = json.loads(dvc("plots", "diff", *revisions, "--json", "--targets", *LOSS_PLOTS))["data"]
    report = {
        "base": base, "head": head,
        "params_set_file": str(params_set_file), "params_set": params_set,
        "not_applied_to_base": sorted(set(params_set) - set(base_overrides)),
        "params_diff": table_rows(dvc("params", "diff", *revisions, "--md")),
        "metrics_diff": table_rows(dvc("metrics", "diff", *revisions, "--md")),
        "image_curves": draw_losses(plots, out / IMAGE),
    }
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.StageArgumentParser(prog="python -m gptpipe.ci_report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", default="main", help="the commit to compare HEAD with (a branch, tag or sha)")
    parser.add_argument("--params-set", type=Path, default=Path(PARAMS_SET),
                        help="params.yaml keys and values both runs override (YAML, grouped as params.yaml)")
    parser.add_argument("--out", type=Path, default=Path("experiment-report"), help="the report's folder")
    parser.add_argument("--summary-link", metavar="URL",
                        help="run nothing: print --out's report.md with its files linked to URL")
    args = parser.parse_args(argv)
    if args.summary_link:
        try:
            report = json.loads((args.out / "report.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PipelineError(f"{args.out / 'report.json'} does not exist; make the report first "
                                f"(python -m gptpipe.ci_report --out {args.out})") from None
        sys.stdout.write(markdown(report, args.summary_link))
        return
    make_report(args.base, args.params_set, args.out)
    log.info(f"wrote {args.out / 'report.md'}, {args.out / IMAGE} and {args.out / PAGE}")


if __name__ == "__main__":
    cli.run(main)
