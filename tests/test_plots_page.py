"""`dvc plots show` and `dvc plots diff`: the charts dvc.yaml defines, each once, each with every
value of its curves against its real x, on a page that renders without internet (DVC's
configuration points it at vega/plots-template.html, which inlines Vega, Vega-Lite and
vega-embed from npm instead of loading them from a CDN)."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from conftest import GIT_IDENTITY, ROOT, git_commit, run_dvc
from gptpipe.params import GPTConfig
from gptpipe.report import TrainingReport
from gptpipe.train import LogRecord, LRSchedule, TrainState

TEMPLATE = ROOT / "vega" / "plots-template.html"
pytestmark = pytest.mark.skipif(not TEMPLATE.is_file(), reason="vega/plots-template.html is built by make install")

CHARTS = {  # dvc.yaml's plot id: (curve file in plots/, x column, y columns)
    "loss_by_step": ("losses.csv", "step", ["train_loss", "val_loss"]),
    "loss_by_tokens": ("losses.csv", "tokens_seen", ["train_loss", "val_loss"]),
    "learning_rate": ("lr.csv", "step", ["lr"]),
    "grad_norm": ("losses.csv", "step", ["grad_norm"]),
}
SVG = "{http://www.w3.org/2000/svg}"
Curves = dict[tuple[str, str], list[tuple[float, float]]]  # (revision, y column): [(x, y), ...]


def write_run(project: Path, schedule: LRSchedule, tokens_per_step: int, loss_offset: float) -> None:
    """A 20-step run's report, logged every 5 steps, as pretrain writes it."""
    records = [LogRecord(step, 1, tokens_per_step * (step + 1), 10 - step / 5 - loss_offset,
                         10.5 - step / 6 - loss_offset, schedule.lr_at(step), 1.0 + step / 10 - loss_offset)
               for step in range(0, 20, 5)]
    state = TrainState(step=20, tokens_seen=20 * tokens_per_step, seconds=1.0, records=records)
    TrainingReport(schedule, project / "plots", project / "metrics/train.json", GPTConfig(), 1).write(state)


@pytest.fixture
def project(tmp_path) -> Path:
    """A git repo with this project's plot definitions and templates, its page template, and two
    committed runs: HEAD~1 at a constant lr of 4e-4, HEAD with a cosine schedule peaking at
    1e-3 and twice the tokens per step."""
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    shutil.copy2(ROOT / "dvc.yaml", project)
    shutil.copy2(ROOT / ".dvc/config", project / ".dvc")
    shutil.copytree(ROOT / ".dvc/plots", project / ".dvc/plots")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    run_dvc(project, "config", "--local", "plots.html_template", str(TEMPLATE))
    write_run(project, LRSchedule("constant", 4e-4, 0.0, 0.0, 0, 20), tokens_per_step=128, loss_offset=0.0)
    git_commit(project, "a run at a constant lr")
    write_run(project, LRSchedule("cosine", 1e-3, 0.0, 0.0, 5, 20), tokens_per_step=256, loss_offset=0.5)
    git_commit(project, "a run with a cosine schedule")
    return project


def committed_curves(project: Path, revisions: dict[str, str], chart: str) -> Curves:
    """What `chart` must show: its columns in each revision's committed curve file."""
    file, x, ys = CHARTS[chart]
    curves = {}
    for label, revision in revisions.items():
        text = subprocess.run(["git", "show", f"{revision}:plots/{file}"], cwd=project, check=True,
                              capture_output=True, text=True, env={**os.environ, **GIT_IDENTITY}).stdout
        rows = list(csv.DictReader(io.StringIO(text)))
        for y in ys:
            curves[label, y] = [(float(row[x]), float(row[y])) for row in rows]
    return curves


def shown_curves(chart_json: list[dict], chart: str) -> Curves:
    """The curves in one chart of `dvc plots show/diff --json`: DVC names each point's revision
    and, where a chart has several y columns, its column."""
    (spec,) = [item["content"] for item in chart_json if item["type"] == "vega"]
    _, x, ys = CHARTS[chart]
    assert spec["encoding"]["x"]["field"] == x
    curves: Curves = {}
    for point in spec["data"]["values"]:
        y = point.get("field", ys[0])
        curves.setdefault((point["rev"], y), []).append((float(point[x]), float(point[y])))
    return curves


def test_each_chart_once_with_every_value(project):
    shown = json.loads(run_dvc(project, "plots", "show", "--json"))["data"]
    assert sorted(shown) == sorted(CHARTS)  # no chart twice, none lost, no images
    for chart in CHARTS:
        assert shown_curves(shown[chart], chart) == committed_curves(project, {"workspace": "HEAD"}, chart), chart

    diff = json.loads(run_dvc(project, "plots", "diff", "HEAD~1", "HEAD", "--json"))["data"]
    assert sorted(diff) == sorted(CHARTS)
    for chart in CHARTS:  # both runs, overlaid in the same chart
        revisions = {"HEAD~1": "HEAD~1", "HEAD": "HEAD"}
        assert shown_curves(diff[chart], chart) == committed_curves(project, revisions, chart), chart


def axis_scale(svg: ElementTree.Element, axis: str) -> tuple[float, float]:
    """(slope, offset) from data values to pixels, fitted through the tick labels the axis
    shows: a label that does not name the value at its position breaks the fit."""
    (group,) = [g for g in svg.iter(f"{SVG}g") if g.get("aria-roledescription") == "axis"
                and g.get("aria-label", "").startswith(f"{axis.upper()}-axis")]
    (labels,) = [g for g in group.iter(f"{SVG}g") if "role-axis-label" in g.get("class", "")]
    ticks = []
    for text in labels.iter(f"{SVG}text"):
        x, y = map(float, re.fullmatch(r"translate\(([-\d.]+),([-\d.]+)\)", text.get("transform")).groups())
        ticks.append((float(text.text.replace(",", "")), x if axis == "x" else y))
    values = {value for value, _ in ticks}
    assert len(values) >= 3, f"the {axis} axis shows only {sorted(values)}"
    mean_value = sum(v for v, _ in ticks) / len(ticks)
    mean_pixel = sum(p for _, p in ticks) / len(ticks)
    slope = (sum((v - mean_value) * (p - mean_pixel) for v, p in ticks)
             / sum((v - mean_value) ** 2 for v, _ in ticks))
    for value, pixel in ticks:  # evenly spaced labels on a linear scale
        assert abs(mean_pixel + slope * (value - mean_value) - pixel) < 1, (axis, ticks)
    return slope, mean_pixel - slope * mean_value


def drawn_curves(svg: ElementTree.Element) -> dict[tuple[str, str | None], list[tuple[float, float]]]:
    """Each line's vertices in pixels, by the revision and column Vega's label names."""
    lines = {}
    for path in svg.iter(f"{SVG}path"):
        if path.get("aria-roledescription") == "line mark":
            label = dict(part.split(": ", 1) for part in path.get("aria-label").split("; "))
            points = re.findall(r"[ML]([-\d.e]+),([-\d.e]+)", path.get("d"))
            lines[label["rev"], label.get("field")] = [(float(x), float(y)) for x, y in points]
    return lines


def rendered_charts(page: Path) -> dict[str, ElementTree.Element]:
    """Each chart of a `dvc plots` page as headless Chromium draws it, by its plot id."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium to render the page (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                              page.as_uri()],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    # vega-embed draws each chart into an <svg class="marks"> (the templates ask for SVG) inside
    # the <div> DVC names after the plot's id
    charts = re.findall(r'<div id="(\w+)"[^>]*>.*?(<svg [^>]*class="marks".*?</svg>)', dom.stdout, re.S)
    assert sorted(chart for chart, _ in charts) == sorted(CHARTS), dom.stderr[-2000:]
    return {chart: ElementTree.fromstring(svg) for chart, svg in charts}


def assert_drawn_true(svg: ElementTree.Element, chart: str, expected: Curves) -> None:
    """Every curve of `expected` is one line with a vertex per value, where the axes' labels
    say that value is."""
    x_slope, x_offset = axis_scale(svg, "x")
    y_slope, y_offset = axis_scale(svg, "y")
    lines = drawn_curves(svg)
    assert len(lines) == len(expected), (chart, sorted(lines))
    for (revision, column), points in expected.items():
        drawn = lines[revision, column if len(CHARTS[chart][2]) > 1 else None]
        assert len(drawn) == len(points), (chart, revision, column)
        for (x, y), (px, py) in zip(points, drawn):
            # y labels sit 3 pixels below their tick (text baseline)
            assert abs(x_slope * x + x_offset - px) < 1 and abs(y_slope * y + y_offset - py) < 4, \
                (chart, revision, column, x, y, px, py)


def y_labels(svg: ElementTree.Element) -> list[str]:
    (group,) = [g for g in svg.iter(f"{SVG}g") if g.get("aria-label", "").startswith("Y-axis")]
    return [text.text for g in group.iter(f"{SVG}g") if "role-axis-label" in g.get("class", "")
            for text in g.iter(f"{SVG}text")]


def test_plots_page_renders_offline(project):
    configured = subprocess.run([sys.executable, "-m", "dvc", "config", "plots.html_template"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    assert (ROOT / ".dvc" / configured).resolve() == TEMPLATE, "make install sets dvc config plots.html_template"

    # one run: the constant-lr run of HEAD~1 in the workspace
    subprocess.run(["git", "checkout", "-q", "HEAD~1", "--", "plots"], cwd=project, check=True)
    run_dvc(project, "plots", "show", "-o", "show")
    # two runs overlaid
    run_dvc(project, "plots", "diff", "HEAD~1", "HEAD", "-o", "diff")
    for page in ("show", "diff"):
        html = (project / page / "index.html").read_text(encoding="utf-8")
        assert not re.search(r"<script[^>]*\ssrc=", html) and "cdn.jsdelivr" not in html
        assert html.count("vegaEmbed(") == len(CHARTS)

    shown = rendered_charts(project / "show/index.html")
    for chart, svg in shown.items():
        expected = committed_curves(project, {"workspace": "HEAD~1"}, chart)
        assert_drawn_true(svg, chart, expected)
    # its lr of 4e-4 reads as 4e-4, on an axis from 0
    assert {"0", "4e-4"} <= set(y_labels(shown["learning_rate"])), y_labels(shown["learning_rate"])

    for chart, svg in rendered_charts(project / "diff/index.html").items():
        assert_drawn_true(svg, chart, committed_curves(project, {"HEAD~1": "HEAD~1", "HEAD": "HEAD"}, chart))
