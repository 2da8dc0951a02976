"""Real corpora: Parquet, JSON lines (.gz, .zst) and text files, each document kept exact (a
literal <|endoftext|> in one is text), a dataset's own val split, rows without text, and
datasets by name from a stand-in Hugging Face Hub on localhost, online and from the cache."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import zstandard

from conftest import HOSTILE, run_stage, stage_args, stage_command, write_params
from gptpipe import corpus, documents
from gptpipe.corpus import tokenize_corpus
from gptpipe.download import download
from gptpipe.errors import PipelineError
from gptpipe.sources import read_manifest
from standin_hub import COMMIT, Repos, standin_hub

EOT = "<|endoftext|>"
GPT2 = tiktoken.get_encoding("gpt2")
# Documents a boundary-by-text corpus would cut or merge: the separator inside, alone, at the ends.
TRICKY = [f"GPT-2 marks the end of a text with {EOT}, which is also just text here.", EOT,
          f"{EOT} starts this one", f"and this one ends with {EOT}", "naïve café 東京 🙂\n\nwith a blank line",
          "   leading and trailing white space   "]


def stories(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the a painter said Gisburn had always thought Jack cheap genius his wife , . \n".split(" ")
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 60)))) for _ in range(n)]


def parquet_bytes(docs: list, field: str = "text", row_group_size: int = 4) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def jsonl_bytes(docs: list, field: str = "text") -> bytes:
    return "".join(json.dumps({field: doc, "meta": {"n": i}}) + "\n" for i, doc in enumerate(docs)).encode()


def by_document(docs: list[str]) -> list[int]:
    """Each document's ids as ordinary text, followed by <|endoftext|>."""
    return [i for doc in docs for i in [*GPT2.encode_ordinary(doc), GPT2.eot_token]]


def read_ids(tokens: Path, split: str) -> list[int]:
    return np.fromfile(tokens / f"{split}.bin", dtype=np.uint16).tolist()


@pytest.fixture
def shards(tmp_path) -> tuple[Path, list[str]]:
    """A folder of one corpus in every format, and its documents in the order they are read."""
    parts = [TRICKY[:3], stories(6, 1), TRICKY[3:], stories(5, 2), stories(2, 3)]
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(parquet_bytes(parts[0]))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(parts[1])))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(parts[2])))
    (folder / "d.json").write_bytes(jsonl_bytes(parts[3]))
    (folder / "e.txt").write_text(EOT.join(parts[4]), encoding="utf-8")  # one file, one document
    return folder, [*parts[0], *parts[1], *parts[2], *parts[3], EOT.join(parts[4])]


def test_every_document_is_its_ordinary_ids_and_a_separator_in_every_format(shards, tmp_path):
    folder, docs = shards
    files = download(str(folder), tmp_path / "raw")
    assert len(files) == 5 and all(f.local for f in files)
    meta = tokenize_corpus(tmp_path / "raw", tmp_path / "tokens", 0.6, 0.2, workers=2, chunk_chars=16)
    assert meta["documents"] == len(docs) and meta["split"]["by"] == "documents"
    ids = [i for split in ("train", "val", "test") for i in read_ids(tmp_path / "tokens", split)]
    assert ids == by_document(docs)  # in order, each whole in one split, the literal separator as text
    counts = [meta["splits"][s]["documents"] for s in ("train", "val", "test")]
    assert sum(counts) == len(docs) and min(counts) > 0
    assert read_ids(tmp_path / "tokens", "train") == by_document(docs[:counts[0]])


def test_a_datasets_own_val_split(shards, tmp_path):
    folder, docs = shards
    val = stories(3, 9)
    (tmp_path / "val.parquet").write_bytes(parquet_bytes(val))
    download(f"{folder}/*.json*", tmp_path / "raw", val_url=str(tmp_path / "val.parquet"))
    meta = tokenize_corpus(tmp_path / "raw", tmp_path / "tokens", 0.9, 0.25, workers=1)
    assert meta["split"]["val"] == "data.val_url" and meta["split"]["train_ratio"] is None
    assert read_ids(tmp_path / "tokens", "val") == by_document(val)
    train_and_test = docs[3:-1]  # the .json* files: b, c, d
    n_train = meta["splits"]["train"]["documents"]
    assert read_ids(tmp_path / "tokens", "train") + read_ids(tmp_path / "tokens", "test") == by_document(train_and_test)
    assert 0 < n_train < len(train_and_test) and list(meta["splits"]) == ["train", "val", "test"]


def test_a_parquet_file_is_read_a_few_pages_at_a_time(tmp_path):
    """Even a file of one row group: pyarrow's defaults would hold its whole text column (with
    pre_buffer, every row group's) while the rows are read."""
    path = tmp_path / "one-row-group.parquet"
    rows = [f"{i} " + "a word " * 150 for i in range(24_000)]  # 25 MB
    pq.write_table(pa.table({"text": rows}), path, row_group_size=len(rows), compression="none", use_dictionary=False)
    peak, rows = 0, 0
    for _, texts in documents.parquet_documents(path, path.name, documents.RowRules()):
        peak = max(peak, pa.total_allocated_bytes())
        rows += len(texts)
    assert rows == 24_000
    assert peak < path.stat().st_size / 3, (peak, path.stat().st_size)


BAD_ROWS = [{"text": "fine"}, {"title": "no text field"}, {"text": None}, {"text": 42}, {"text": "also fine"}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_rows_without_text_stop_the_stage_naming_file_and_row_or_are_skipped_and_counted(tmp_path, fmt):
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in BAD_ROWS))
    else:  # Parquet has a schema: no missing field, but nulls
        path.write_bytes(parquet_bytes(["fine", None, "also fine", None], row_group_size=2))
    with pytest.raises(PipelineError, match=rf"rows.{fmt} row 2 has (no field|null in the field) 'text': set "
                                            r"data.text_field .* data.bad_rows to skip"):
        tokenize_corpus(path, tmp_path / "t", 0.5)
    assert not (tmp_path / "t").exists()
    meta = tokenize_corpus(path, tmp_path / "t", 0.2, bad_rows="skip")
    assert meta["skipped_rows"] == (3 if fmt == "jsonl" else 2) and meta["documents"] == 2
    assert read_ids(tmp_path / "t", "train") + read_ids(tmp_path / "t", "val") == by_document(["fine", "also fine"])


@pytest.mark.parametrize("workers", [1, 2])
def test_row_groups_read_by_the_encoding_processes_give_the_ids_of_rows_read_here(tmp_path, monkeypatch, workers):
    """The row groups of Parquet files are read by the encoding processes, a few per task, the
    documents of other files by the stage's process: the ids and meta.json are those of every
    file read by the stage's process, with rows skipped inside row groups and splits that begin
    inside one."""
    rows = [None if i % 7 == 3 else "" if i % 11 == 5 else doc for i, doc in enumerate(stories(40, 5))]
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.parquet").write_bytes(parquet_bytes(rows[:25], row_group_size=4))
    (tmp_path / "src/b.jsonl").write_bytes(jsonl_bytes(rows[25:30]))
    (tmp_path / "src/c.parquet").write_bytes(parquet_bytes(rows[30:], row_group_size=3))
    download(str(tmp_path / "src"), tmp_path / "raw")
    for where, limit in (("workers", corpus.MAX_ROW_GROUP_CHARS), ("here", 0)):
        monkeypatch.setattr(corpus, "MAX_ROW_GROUP_CHARS", limit)
        tokenize_corpus(tmp_path / "raw", tmp_path / where, 0.5, 0.2, bad_rows="skip", workers=workers, chunk_chars=200)
    for name in ("train.bin", "val.bin", "test.bin", "meta.json"):
        assert (tmp_path / "workers" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    meta = json.loads((tmp_path / "here/meta.json").read_text())
    counts = [meta["splits"][split]["documents"] for split in ("train", "val", "test")]
    kept = [row for row in rows if row]
    assert meta["skipped_rows"] == rows.count(None) and sum(counts) == len(kept)
    assert [i for split in ("train", "val", "test") for i in read_ids(tmp_path / "here", split)] == by_document(kept)
    # val begins at row 21 (counting from 0) of a.parquet, inside its row group of rows 20-23; test
    # at row 4 of c.parquet (row 34 of all), inside its row group of rows 3-5
    assert counts == [16, 10, 5]


def test_the_text_field_is_a_param(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(parquet_bytes(["one story", "another story"], field="story"))
    with pytest.raises(PipelineError, match=r"has no column 'text' \(it has story, id\): set data.text_field"):
        tokenize_corpus(path, tmp_path / "t", 0.5)
    tokenize_corpus(path, tmp_path / "t", 0.2, text_field="story")
    assert read_ids(tmp_path / "t", "val") == by_document(["another story"])


# The Hugging Face Hub, stood in for on localhost.

def hub_repos(shards: Path) -> Repos:
    val = parquet_bytes(stories(12, 7))
    files = {f"data/{p.name}": p.read_bytes() for p in sorted(shards.iterdir())}
    return Repos({"datasets/test-org/stories": {**files, "val/validation.parquet": val, "README.md": b"# card"}},
                 gated={"datasets/test-org/gated"})


def run_download(params: Path, out: Path, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    """The download stage as a process: huggingface_hub reads HF_* when imported."""
    return run_with_hub(stage_command("download", params, "--out", str(out)), hf_home, **env)


def run_with_hub(command: list[str], hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    environment |= {"HF_HOME": str(hf_home), "NO_PROXY": "127.0.0.1", **env}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    """huggingface_hub in this process reads its cache in tmp_path and never the network."""
    from huggingface_hub import constants
    hf_home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_a_dataset_by_name_through_the_hub_then_offline_from_its_cache(shards, tmp_path, hf_cache):
    """data.url and data.val_url name files of a dataset repo (Parquet, JSON lines .gz/.zst,
    text); download records the commit `main` resolved to; the whole pipeline runs on it, then
    again with HF_HUB_OFFLINE=1 and the Hub gone, from the cache huggingface_hub laid out."""
    folder, docs = shards
    repos = hub_repos(folder)
    params = write_params(tmp_path / "params.yaml", HOSTILE | {"data": {
        "url": "hf://datasets/test-org/stories/data/*", "val_url": "hf://datasets/test-org/stories@main/val/*",
        "sha256": None, "train_ratio": 0.9}})
    with standin_hub(repos) as endpoint:
        result = run_download(params, tmp_path / "online" / "raw", hf_cache, HF_ENDPOINT=endpoint)
    assert result.returncode == 0, result.stderr
    assert f"main is commit {COMMIT}" in result.stderr
    files = read_manifest(tmp_path / "online" / "raw")
    assert [f.name for f in files] == [f"hf://datasets/test-org/stories@{COMMIT}/{p}" for p in (
        "data/a.parquet", "data/b.jsonl.gz", "data/c.jsonl.zst", "data/d.json", "data/e.txt", "val/validation.parquet")]
    assert [f.split for f in files] == [None] * 5 + ["val"]
    assert all(f.hub["commit"] == COMMIT and f.stored is None for f in files)
    assert list((tmp_path / "online" / "raw").iterdir()) == [tmp_path / "online" / "raw" / "sources.json"]
    snapshot = hf_cache / "hub/datasets--test-org--stories/snapshots" / COMMIT
    assert (snapshot / "data/a.parquet").read_bytes() == (folder / "a.parquet").read_bytes()

    # The Hub is gone: offline, the cache serves the same files.
    result = run_download(params, tmp_path / "offline" / "raw", hf_cache, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "offline" / "raw") == files

    for run in ("online", "offline"):
        ws = tmp_path / run
        for script in ("tokenize_corpus", "pretrain", "evaluate", "sample"):
            run_stage(script, params, *stage_args(script, ws))
        assert read_ids(ws / "tokens", "train") == by_document(docs)
        assert json.loads((ws / "eval.json").read_text())["val"]["tokens"] > 0
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "online/tokens" / name).read_bytes() == (tmp_path / "offline/tokens" / name).read_bytes()


DOWNLOAD_MEMORY = """
import os, sys, tracemalloc
from standin_hub import Repos, standin_hub
shard = os.urandom(24 << 20)
repos = Repos(files={"datasets/org/big": {"data/a.jsonl.zst": shard, "data/b.jsonl.zst": shard[::-1]}})
with standin_hub(repos) as endpoint:
    os.environ.update(HF_ENDPOINT=endpoint, HF_HOME=sys.argv[1], NO_PROXY="127.0.0.1")
    from gptpipe import hub  # huggingface_hub reads HF_* when imported
    from gptpipe.sources import HubFiles
    tracemalloc.start()
    _, found = hub.dataset_files(HubFiles("org/big", "main", "data/*"), "data.url", None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sorted(path.read_bytes() for _, path in found) == sorted([shard, shard[::-1]])
    print(peak)
"""


def test_dataset_files_download_a_chunk_at_a_time_not_ten_megabytes(tmp_path):
    """Two 24 MB shards through huggingface_hub: the Python memory the download holds (the
    stand-in Hub's included) stays a few MB, where huggingface_hub's 10 MB chunks held 56 MB."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(Path(corpus.__file__).parents[1])])
    result = subprocess.run([sys.executable, "-c", DOWNLOAD_MEMORY, str(tmp_path / "hf")], capture_output=True,
                            text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 16e6


def test_a_hub_files_sha256_is_the_one_the_hub_gives_and_a_damaged_copy_says_how_to_clear_it(shards, tmp_path):
    """huggingface_hub names a Git LFS file's blob by the SHA-256 the Hub gives for it: download
    records that without reading the file (a damaged blob is recorded as the Hub's hash), a
    file kept in git is hashed; tokenize checks every file as it reads it, and its error names
    what to delete so that the file comes anew."""
    folder, docs = shards
    hf_home, ws = tmp_path / "hf", tmp_path / "ws"
    params = write_params(tmp_path / "params.yaml", {"data": {"url": "hf://datasets/test-org/stories/data/*",
                                                              "sha256": None, "train_ratio": 0.5}})
    snapshot = hf_home / "hub/datasets--test-org--stories/snapshots" / COMMIT
    with standin_hub(hub_repos(folder)) as endpoint:
        assert run_download(params, ws / "raw", hf_home, HF_ENDPOINT=endpoint).returncode == 0
        blobs = {f.hub["path"]: (snapshot / f.hub["path"]).resolve() for f in read_manifest(ws / "raw")}
        assert [name for name, blob in blobs.items() if len(blob.name) == 64] == [
            "data/a.parquet", "data/b.jsonl.gz", "data/c.jsonl.zst"]  # in LFS; d.json and e.txt in git
        damaged = blobs["data/a.parquet"]
        damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")
        result = run_download(params, ws / "raw", hf_home, HF_ENDPOINT=endpoint)
        assert result.returncode == 0, result.stderr
        files = read_manifest(ws / "raw")
        assert [f.sha256 for f in files] == [hashlib.sha256((folder / Path(f.hub["path"]).name).read_bytes()).hexdigest()
                                             for f in files]  # the Hub's, not the damaged blob's

        tokenize = stage_command("tokenize_corpus", params, *stage_args("tokenize_corpus", ws))
        result = run_with_hub(tokenize, hf_home, HF_ENDPOINT=endpoint)
        assert result.returncode == 1 and result.stderr.splitlines()[-1] == (
            f"error: hf://datasets/test-org/stories@{COMMIT}/data/a.parquet in the Hugging Face cache does not "
            f"have the sha256 the download stage recorded ({files[0].sha256}; the Hub's, for a Git LFS file): it "
            f"is damaged; delete {snapshot / 'data/a.parquet'} and its blob {damaged} from the Hugging Face cache, "
            f"then run the pipeline again (the file is downloaded anew)")
        (snapshot / "data/a.parquet").unlink()
        damaged.unlink()
        result = run_with_hub(tokenize, hf_home, HF_ENDPOINT=endpoint)
    assert result.returncode == 0, result.stderr
    assert read_ids(ws / "tokens", "train") + read_ids(ws / "tokens", "val") == by_document(docs)


HUB_FAILURES = {
    "no such repo": ("hf://datasets/test-org/nothing/data/*", ["no such repository", "hf auth login"]),
    "gated": ("hf://datasets/test-org/gated/x.parquet", ["the repository is gated", "hf auth login"]),
    "no such revision": ("hf://datasets/test-org/stories@v9/data/*",
                         ["no such revision", "data.url=hf://datasets/test-org/stories@<revision>"]),
    "no file matches": ("hf://datasets/test-org/stories/data/*.arrow", ["no file of the repository matches",
                                                                        "'data/*.arrow'", "/tree/main"]),
    "over max_bytes": ("hf://datasets/test-org/stories/data/*", ["data.max_bytes=100", "raise data.max_bytes"]),
    "not a dataset path": ("hf://models/test-org/stories", ["not a Hugging Face dataset path"]),
}


@pytest.mark.parametrize("url, words", HUB_FAILURES.values(), ids=HUB_FAILURES.keys())
def test_hub_failures_are_one_line_naming_repo_revision_and_cause(shards, tmp_path, url, words):
    params = write_params(tmp_path / "params.yaml", {"data": {
        "url": url, "sha256": None, "max_bytes": 100 if "max_bytes" in str(words) else None}})
    with standin_hub(hub_repos(shards[0])) as endpoint:
        result = run_download(params, tmp_path / "raw", tmp_path / "hf", HF_ENDPOINT=endpoint)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: "), result.stderr
    assert not any(line.startswith("Traceback") for line in lines), result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_an_unreachable_hub_without_offline_mode_uses_the_cache_or_says_what_to_do(shards, tmp_path):
    """No network and HF_HUB_OFFLINE unset (a laptop on a train): the cache answers for a
    branch it has seen, and without it the error names the Hub, the cache and both fixes."""
    params = write_params(tmp_path / "params.yaml", {"data": {"url": "hf://datasets/test-org/stories/data/*",
                                                              "sha256": None}})
    with standin_hub(hub_repos(shards[0])) as endpoint:
        assert run_download(params, tmp_path / "online", tmp_path / "hf", HF_ENDPOINT=endpoint).returncode == 0
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    result = run_download(params, tmp_path / "cached", tmp_path / "hf", HF_ENDPOINT=closed)
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "cached") == read_manifest(tmp_path / "online")

    result = run_download(params, tmp_path / "raw", tmp_path / "empty", HF_ENDPOINT=closed)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "is unreachable" in last and "set HF_HOME to a cache that holds them" in last, result.stderr


def test_offline_without_the_files_in_the_cache_says_so(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"data": {"url": "hf://datasets/test-org/stories/data/*",
                                                              "sha256": None}})
    result = run_download(params, tmp_path / "raw", tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "is not in the Hugging Face cache" in result.stderr and "HF_HUB_OFFLINE is set" in result.stderr
