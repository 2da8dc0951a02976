"""GPT-2 checkpoints from the Hugging Face Hub: names and repo ids, and the download through
huggingface_hub against a stand-in hub on localhost (HF_ENDPOINT), with its one-line errors.
Nothing leaves the machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from gptpipe.hub import GPT2_SIZES, HubCheckpoint, parse_hub_id
from standin_hub import COMMIT, Repos, standin_hub

# repo: the files it serves at main and at COMMIT
REPOS = {"test-org/tiny-gpt2": {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"weights" * 1000},
         "test-org/bin-only": {"config.json": b'{"model_type": "gpt2"}', "pytorch_model.bin": b"pickle"}}
GATED = "test-org/gated"


@pytest.fixture
def hub_endpoint():
    with standin_hub(Repos({f"models/{repo}": files for repo, files in REPOS.items()},
                           gated={f"models/{GATED}"})) as endpoint:
        yield endpoint


DOWNLOAD = """
import sys
from gptpipe.errors import PipelineError
from gptpipe.hub import download, parse_hub_id
for source in sys.argv[1:]:
    try:
        print("ok", download(parse_hub_id(source), ("config.json", "model.safetensors"), source))
    except PipelineError as e:
        print("error", e)
"""


def download_in_a_process(sources: list[str], hf_home: Path, **env: str) -> list[str]:
    """One line per source: "ok <snapshot folder>" or "error <message>". huggingface_hub reads
    HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE when imported, hence a process of its own."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("HF_") and key != "HUGGING_FACE_HUB_TOKEN"}
    environment |= {"HF_HOME": str(hf_home), "NO_PROXY": "127.0.0.1", "PYTHONPATH": str(ROOT / "src"), **env}
    result = subprocess.run([sys.executable, "-c", DOWNLOAD, *sources], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(sources), result.stdout  # one line each: messages are single lines
    return lines


def test_names_and_repo_ids():
    assert parse_hub_id("gpt2") == HubCheckpoint(*GPT2_SIZES["gpt2"])
    assert parse_hub_id("gpt2-xl") == HubCheckpoint("openai-community/gpt2-xl", GPT2_SIZES["gpt2-xl"][1])
    assert parse_hub_id("gpt2-medium@main") == HubCheckpoint("openai-community/gpt2-medium", "main")
    assert parse_hub_id("org/name") == HubCheckpoint("org/name", "main")
    assert parse_hub_id("org/name.v2@refs/pr/1") == HubCheckpoint("org/name.v2", "refs/pr/1")
    for local in ("models/warm.safetensors", "checkpoints/model.pth", "/abs/path", "a/b/c", "./gpt2", "distilgpt2"):
        assert parse_hub_id(local) is None, local
    assert all(len(commit) == 40 for _, commit in GPT2_SIZES.values())


def test_download_into_the_cache_and_one_line_errors(hub_endpoint, tmp_path):
    sources = ["test-org/tiny-gpt2", f"test-org/tiny-gpt2@{COMMIT}", "test-org/nothing", GATED,
               "test-org/tiny-gpt2@v9", "test-org/bin-only"]
    main, pinned, missing, gated, revision, bin_only = download_in_a_process(
        sources, tmp_path / "hf", HF_ENDPOINT=hub_endpoint)

    snapshot = tmp_path / "hf/hub/models--test-org--tiny-gpt2/snapshots" / COMMIT
    assert main == pinned == f"ok {snapshot}"
    for name, content in REPOS["test-org/tiny-gpt2"].items():
        assert (snapshot / name).is_symlink() and (snapshot / name).read_bytes() == content
    assert (snapshot.parents[1] / "refs/main").read_text() == COMMIT

    where = "error model.init_from={0}: {1} at revision {2}: "
    assert missing.startswith(where.format("test-org/nothing", "test-org/nothing", "main")
                              + "no such repository on the Hugging Face Hub, or it is private")
    assert gated.startswith(where.format(GATED, GATED, "main") + "the repository is gated")
    assert "hf auth login" in gated
    assert revision.startswith(where.format("test-org/tiny-gpt2@v9", "test-org/tiny-gpt2", "v9")
                               + "the repository has no such revision")
    assert bin_only.startswith(where.format("test-org/bin-only", "test-org/bin-only", "main")
                               + "the repository has no model.safetensors")

    # Offline, what is in the cache loads and what is not is named, with the fix.
    cached, absent = download_in_a_process([f"test-org/tiny-gpt2@{COMMIT}", "gpt2"], tmp_path / "hf",
                                           HF_HUB_OFFLINE="1")
    assert cached == f"ok {snapshot}"
    assert absent.startswith(f"error model.init_from=gpt2: openai-community/gpt2 at revision "
                             f"{GPT2_SIZES['gpt2'][1]} is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in absent
