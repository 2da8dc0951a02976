import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from gptpipe import cli
from gptpipe.download import SHIPPED
from gptpipe.tokenizer import seed_tiktoken_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))  # where run_stage's stages find their _library module
seed_tiktoken_cache()  # tests that call tiktoken.get_encoding("gpt2") themselves run offline too
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"

# The tiny config of the pipeline tests: the same code paths as the book's run, in seconds.
TINY = {
    "model": {"context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2},
    "train": {"epochs": 1, "stride": 32, "batch_size": 4, "eval_freq": 10, "eval_iter": 2},
    "sample": {"max_new_tokens": 10},
}


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    """The book's corpus, as shipped with the package (checked against its pinned SHA-256)."""
    path = Path(str(SHIPPED / "the-verdict.txt"))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VERDICT_SHA256
    return path


@pytest.fixture(scope="session")
def corpus_path(verdict_path) -> Path:
    """A corpus for pipeline mechanics: the book's."""
    return verdict_path


def write_params(path: Path, overrides: dict, corpus: Path | None = None) -> Path:
    """The project's params.yaml with `overrides` ({group: {key: value}}) applied."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in overrides.items():
        params[group].update(values)
    if corpus is not None:
        params["data"].update(url=corpus.as_uri(), sha256=None)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# dvc exp run commits experiments to git: give it an identity on machines without one.
# Queue workers inherit it from `dvc queue start`.
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def run_dvc(project: Path, *args: str, timeout: float = 600) -> str:
    """Run the real dvc CLI in `project`; fail the test with its output if it fails."""
    # DVC keeps per-repo indexes under /var/tmp/dvc unless told otherwise: keep them in the
    # test's own temporary folder, for this repo, its clones and the queue's copies alike.
    env = {**os.environ, **GIT_IDENTITY, "DVC_SITE_CACHE_DIR": str(project.parent / "dvc-site-cache"),
           # the stages' `python` must be this interpreter, even outside an activated venv
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, env=env,
                            timeout=timeout)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def git_commit(project: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=project, check=True,
                   env={**os.environ, **GIT_IDENTITY})


class UniformModel(torch.nn.Module):
    """Gives every token the same probability: ln(vocab) nats per token, perplexity vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)

# The smallest config that runs every stage's code (test_hostile, test_corpora).
HOSTILE = {
    "model": {"context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 1},
    "train": {"epochs": 1, "stride": 16, "batch_size": 4, "eval_freq": 2, "eval_iter": 1, "max_steps": 3,
              "device": "cpu"},
    "evaluate": {"max_tokens": 64},
    "sample": {"max_new_tokens": 4},
}


def stage_args(script: str, d: Path) -> list[str]:
    """The path options of stages/<script>.py with every input and output in folder `d`, laid
    out as the pipeline lays out the project: raw/, tokens/, model/, plots/..."""
    return {
        "download": ["--out", f"{d}/raw"],
        "tokenize_corpus": ["--corpus", f"{d}/raw", "--out", f"{d}/tokens"],
        "pretrain": ["--tokens", f"{d}/tokens", "--model", f"{d}/model", "--plots", f"{d}/plots",
                     "--metrics", f"{d}/train.json", "--resume-dir", f"{d}/resume"],
        "evaluate": ["--tokens", f"{d}/tokens", "--model", f"{d}/model", "--out", f"{d}/eval.json"],
        "sample": ["--model", f"{d}/model", "--out", f"{d}/sample.txt"],
    }[script]


def stage_module(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{script}", ROOT / "stages" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage(script: str, params: Path, *args: str) -> None:
    """Run stages/<script>.py's main() in this process."""
    stage_module(script).main(["--params", str(params), *args])


@dataclass(frozen=True)
class StageRun:
    status: int
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def run_stage_cli(script: str, params: Path, *args: str) -> StageRun:
    """Run stages/<script>.py in this process as its command line runs it, through gptpipe.cli.run
    (a failure: one error line, exit status 1): its exit status and what it wrote to stderr.
    An exception that cli.run lets through (a traceback on the command line) fails the test."""
    module = stage_module(script)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            cli.run(module.main, ["--params", str(params), *args])
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    return StageRun(status, stderr.getvalue())


def stage_command(script: str, params: Path, *args: str) -> list[str]:
    """The command line that runs stages/<script>.py as a process of its own."""
    return [sys.executable, str(ROOT / "stages" / f"{script}.py"), "--params", str(params), *args]


def run_stage_process(script: str, params: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(script, params, *args), capture_output=True, text=True)


def make_tokens(directory: Path, params: Path) -> Path:
    """Download and tokenize the corpus `params` names into `directory`; the tokens folder."""
    run_stage("download", params, *stage_args("download", directory))
    run_stage("tokenize_corpus", params, *stage_args("tokenize_corpus", directory))
    return directory / "tokens"


PROJECT_FILES = [".dvc/config", ".dvc/.gitignore", ".dvc/plots", ".dvcignore", ".gitignore", "dvc.yaml",
                 "params.yaml", "stages", "src"]


@pytest.fixture
def dvc_project(tmp_path, corpus_path) -> Path:
    """A committed git repo holding a copy of the project, set to the tiny config."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source, target = ROOT / name, project / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    write_params(project / "params.yaml", TINY, corpus_path)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=project, check=True)
    git_commit(project, "project")
    return project
