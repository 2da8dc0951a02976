"""`dvc plots show` writes a page that renders without internet: DVC's configuration points it
at vega/plots-template.html (make install), which inlines Vega, Vega-Lite and vega-embed
from npm instead of loading them from a CDN."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, run_dvc
from gptpipe.params import GPTConfig
from gptpipe.report import TrainingReport
from gptpipe.train import LogRecord, LRSchedule, TrainState

TEMPLATE = ROOT / "vega" / "plots-template.html"
pytestmark = pytest.mark.skipif(not TEMPLATE.is_file(), reason="vega/plots-template.html is built by make install")


def test_plots_page_renders_offline(tmp_path):
    configured = subprocess.run([sys.executable, "-m", "dvc", "config", "plots.html_template"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    assert (ROOT / ".dvc" / configured).resolve() == TEMPLATE, "make install sets dvc config plots.html_template"

    # a project with this one's plot definitions, its template, and a run's report
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    shutil.copy2(ROOT / "dvc.yaml", project)
    shutil.copy2(ROOT / ".dvc/config", project / ".dvc")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    run_dvc(project, "config", "--local", "plots.html_template", str(TEMPLATE))
    state = TrainState(step=20, tokens_seen=2560, seconds=1.0, records=[
        LogRecord(step, 1, 128 * (step + 1), 10 - step / 5, 10.5 - step / 6, 4e-4, 1.0) for step in range(0, 20, 5)])
    TrainingReport(LRSchedule("cosine", 4e-4, 0.0, 0.0, 5, 20), project / "plots", project / "metrics/train.json",
                   GPTConfig(), 1).write(state)

    run_dvc(project, "plots", "show", "-o", "page")
    html = (project / "page/index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc=", html) and "cdn.jsdelivr" not in html
    charts = html.count("vegaEmbed(")
    assert charts >= 4  # loss by step and by tokens, perplexity, learning rate

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium to render the page (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                              (project / "page/index.html").as_uri()],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile})
    # vega-embed draws each chart into an element of class "marks"
    assert dom.stdout.count('class="marks"') == charts, dom.stderr[-2000:]
