"""Hostile input, as users produce it: every params key, the params file itself, every file a
stage reads, every output path, signals, the stage scripts' own options. A failure must end
with exit status 1 and exactly one `error:` line naming the cause and the fix, no traceback,
no temporary file, and every earlier output byte for byte as it was; a legitimate extreme
must do exactly what the README says.

Stages run in this process through gptpipe.cli.run (conftest.run_stage_cli), on the tiniest
config that runs all their code; only real signals to real processes need subprocesses.
Other suites test single causes in depth (test_download, test_checkpoint, test_weights...).
"""

import contextlib
import dataclasses
import errno
import gzip
import importlib
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import HOSTILE, ROOT, run_stage, run_stage_cli, stage_args, stage_command, stage_module, write_params
from gptpipe import corpus, files
from gptpipe.checkpoint import HEADER_KEY, HF_CONFIG, HF_WEIGHTS, read_model, save_model
from gptpipe.download import download
from gptpipe.errors import Terminated
from gptpipe.generate import beam_search, generate, next_token
from gptpipe.model import GPTConfig, GPTModel
from gptpipe.params import Auto, GPT2_VOCAB_SIZE, Params, load_params
from gptpipe.report import TrainingReport

STAGES = ("download", "tokenize_corpus", "pretrain", "evaluate", "sample")
NOBODY = 65534


def args_for(script: str, ws: Path, **replace: str) -> list[str]:
    """stage_args, with options replaced (`out="..."` for --out) and tokenize on one process."""
    args = stage_args(script, ws) + (["--workers", "1"] if script == "tokenize_corpus" else [])
    for option, value in replace.items():
        args[args.index("--" + option.replace("_", "-")) + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, corpus_path) -> Path:
    """A folder laid out as a project (conftest.stage_args) holding every stage's outputs."""
    d = tmp_path_factory.mktemp("outputs")
    params = write_params(d / "params.yaml", HOSTILE, corpus_path)
    for script in STAGES:
        run_stage(script, params, *args_for(script, d))
    return d


@pytest.fixture
def ws(outputs, tmp_path) -> Path:
    """A copy of `outputs` to run a stage on."""
    return Path(shutil.copytree(outputs, tmp_path / "ws"))


@pytest.fixture
def open_ws(outputs) -> Path:
    """A copy of `outputs` that every user may traverse (pytest's temporary folders are their
    owner's alone), for the cases that run as another user."""
    base = Path(tempfile.mkdtemp(prefix="gptpipe-hostile-"))
    shutil.copytree(outputs, base / "ws")
    open_folders(base)
    yield base / "ws"
    open_folders(base)
    shutil.rmtree(base)


def open_folders(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)


@contextlib.contextmanager
def as_another_user():
    """Permission bits bind root only when it acts as someone else: nobody's effective ids for
    the block (nothing changes for a user who is not root)."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
    except PermissionError:
        pytest.skip("root without the right to change its effective user id")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_error(run, *phrases: str) -> str:
    assert run.status == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert len(run.errors) == 1, run.stderr
    for phrase in phrases:
        assert phrase in run.errors[0], run.errors[0]
    return run.errors[0]


def run_failing(script: str, ws: Path, *phrases: str, args: list[str] | None = None,
                new: tuple[str, ...] = (), user=contextlib.nullcontext) -> str:
    """Run a stage on `ws` (as `user`) that must fail cleanly: one error line holding `phrases`,
    and every file in `ws` byte for byte as it was, none added (a temporary file) but those named
    in `new`."""
    before = snapshot(ws)
    with user():
        run = run_stage_cli(script, ws / "params.yaml", *(args_for(script, ws) if args is None else args))
    error = assert_one_error(run, *phrases)
    after = snapshot(ws)
    for name in new:
        after.pop(name, None)
    assert sorted(after) == sorted(before)
    assert [name for name in before if after[name] != before[name]] == []
    return error


# What pretrain rewrites at every evaluation, so that a running experiment can be followed; a
# run that fails puts them back.
LIVE_REPORT = ("train.json", "plots/losses.csv", "plots/lr.csv")


def another_run(ws: Path, corpus_path: Path) -> None:
    """Params for a pretrain whose curves differ from those in `ws` (a rerun of the same params
    would write the same losses, and hide a curve left behind)."""
    write_params(ws / "params.yaml", {**HOSTILE, "train": {**HOSTILE["train"], "lr": 0.01}}, corpus_path)


@pytest.fixture
def live_rewrites(monkeypatch) -> list[dict[Path, bytes]]:
    """The files pretrain rewrites at every evaluation, as each rewrite left them: a failed run
    must have rewritten them before the test checks that they were put back."""
    seen = []
    original = TrainingReport.write

    def write(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append({path: path.read_bytes() for path in self.live_files})

    monkeypatch.setattr(TrainingReport, "write", write)
    return seen


def assert_rewritten_then_put_back(seen: list[dict[Path, bytes]], ws: Path) -> None:
    """The run's last rewrite differed from what is there now (run_failing checked that what
    is there is what was there before), and nothing it kept the previous files in remains."""
    assert seen and all(seen[-1][ws / name] != (ws / name).read_bytes() for name in LIVE_REPORT)
    assert not (ws / "resume/previous").exists()


# ---------------------------------------------------------------- every params key

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())
GROUP_TYPES = {f.name: f.type for f in dataclasses.fields(Params)}


def base_kind(group: str, key: str) -> Any:
    """The key's type, without null or `auto` where it also accepts those."""
    kind = typing.get_type_hints(GROUP_TYPES[group])[key]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None) and a != Auto]
    return kind


def wrong_types(kind: Any) -> list[Any]:
    if kind is Any or typing.get_origin(kind) is typing.Literal:
        return [3]
    return {int: ["3", 2.5], float: ["fast", True], bool: ["yes please", 1], str: [3]}[kind]


EXTREMES = {int: [2**64, -2**64], float: [math.inf, -math.inf, math.nan]}


def generic_cases():
    for group, keys in DEFAULTS.items():
        for key in keys:
            kind = base_kind(group, key)
            for value in wrong_types(kind):
                yield pytest.param(group, key, value, id=f"{group}.{key}-wrong-type-{value!r}")
            yield pytest.param(group, key, {"a": [1, {"b": None}]}, id=f"{group}.{key}-absurd")
            for value in EXTREMES.get(kind, []):
                yield pytest.param(group, key, value, id=f"{group}.{key}-extreme-{value}")


def run_params(tmp_path: Path, overrides: dict, corpus_path: Path):
    """The download stage on the corpus, the params changed by `overrides` (data.url's too)."""
    data = {"url": corpus_path.as_uri(), "sha256": None, **overrides.get("data", {})}
    params = write_params(tmp_path / "params.yaml", {**overrides, "data": data})
    return run_stage_cli("download", params, "--out", str(tmp_path / "raw"))


@pytest.mark.parametrize("group, key, value", list(generic_cases()))
def test_every_key_refuses_wrong_types_and_extremes(tmp_path, corpus_path, group, key, value):
    assert_one_error(run_params(tmp_path, {group: {key: value}}, corpus_path), f"{group}.{key}")
    assert not (tmp_path / "raw").exists()


LR = DEFAULTS["train"]["lr"]
BOUNDARIES = [  # just outside each key's valid range, and relations between keys
    ({"data": {"url": ""}}, ["data.url", "is empty"]),
    ({"data": {"sha256": "B41E41A6" * 8}}, ["data.sha256 must be 64 lowercase hex digits"]),
    ({"data": {"max_bytes": 0}}, ["data.max_bytes must be null (no limit) or at least 1"]),
    ({"data": {"train_ratio": 1.0}}, ["data.train_ratio must be between 0 and 1"]),
    ({"data": {"train_ratio": 0}}, ["data.train_ratio must be between 0 and 1"]),
    ({"data": {"test_ratio": -0.01}}, ["data.test_ratio must be at least 0"]),
    ({"data": {"train_ratio": 0.6, "test_ratio": 0.4}}, ["data.train_ratio + data.test_ratio", "below 1"]),
    ({"model": {"vocab_size": 50256}}, ["model.vocab_size (50256) must be at least 50257", "50304"]),
    ({"model": {"context_length": 0}}, ["model.context_length must be at least 1"]),
    ({"model": {"emb_dim": 0}}, ["model.emb_dim must be at least 1"]),
    ({"model": {"n_heads": 0}}, ["model.n_heads must be at least 1"]),
    ({"model": {"n_heads": 5}}, ["model.n_heads (5) must divide model.emb_dim (768)"]),
    ({"model": {"n_layers": 0}}, ["model.n_layers must be at least 1"]),
    ({"model": {"drop_rate": 1.0}}, ["model.drop_rate must be in [0, 1)"]),
    ({"model": {"drop_rate": -0.1}}, ["model.drop_rate must be in [0, 1)"]),
    ({"model": {"init_from": " "}}, ["model.init_from is empty"]),
    ({"train": {"batch_size": 0}}, ["train.batch_size must be at least 1"]),
    ({"train": {"stride": 0}}, ["train.stride must be at least 1"]),
    ({"train": {"lr": 0}}, ["train.lr must be positive"]),
    ({"train": {"weight_decay": -1e-9}}, ["train.weight_decay must be >= 0"]),
    ({"train": {"epochs": -1}}, ["train.epochs must be >= 0"]),
    ({"train": {"eval_freq": 0}}, ["train.eval_freq must be at least 1"]),
    ({"train": {"eval_iter": 0}}, ["train.eval_iter must be at least 1"]),
    ({"train": {"seed": -1}}, ["train.seed must be a whole number from 0 to 2**63 - 1"]),
    ({"train": {"seed": 2**63}}, ["train.seed is 9223372036854775808, beyond a 64-bit integer"]),
    ({"train": {"device": "cuda:"}}, ["train.device must be auto, cpu, cuda, cuda:N or mps"]),
    ({"train": {"device": "CPU"}}, ["train.device must be auto, cpu, cuda, cuda:N or mps"]),
    ({"train": {"precision": "FP32"}}, ["train.precision must be one of auto, fp32, bf16"]),
    ({"train": {"schedule": "linear"}}, ["train.schedule must be one of constant, cosine"]),
    ({"train": {"warmup_steps": 1.5}}, ["train.warmup_steps must be a whole number of steps or a fraction"]),
    ({"train": {"warmup_steps": -1}}, ["train.warmup_steps must be"]),
    ({"train": {"initial_lr": 2 * LR}}, [f"train.initial_lr ({2 * LR}) must be in [0, train.lr] = [0, {LR}]"]),
    ({"train": {"initial_lr": -1e-9}}, ["train.initial_lr (-1e-09) must be in [0, train.lr]"]),
    ({"train": {"min_lr": 2 * LR}}, [f"train.min_lr ({2 * LR}) must be in [0, train.lr]", "decays"]),
    ({"train": {"grad_clip": 0}}, ["train.grad_clip must be null (no clipping) or positive"]),
    ({"train": {"grad_accum_steps": 0}}, ["train.grad_accum_steps must be at least 1"]),
    ({"train": {"max_steps": 0}}, ["train.max_steps must be null or at least 1"]),
    ({"train": {"checkpoint_every": 0}}, ["train.checkpoint_every must be null or at least 1"]),
    ({"train": {"nproc": 0}}, ["train.nproc must be at least 1"]),
    ({"train": {"nproc": 3}}, ["train.batch_size (2) is the global batch", "a multiple of 3"]),
    ({"train": {"learning_rate": 0.1}}, ["unknown key train.learning_rate", "valid keys are"]),
    ({"evaluate": {"batch_size": 0}}, ["evaluate.batch_size must be at least 1"]),
    ({"evaluate": {"max_tokens": 0}}, ["evaluate.max_tokens must be null (every window) or at least 1"]),
    ({"sample": {"max_new_tokens": -1}}, ["sample.max_new_tokens must be >= 0"]),
    ({"sample": {"temperature": -1e-9}}, ["sample.temperature must be >= 0 (0 means greedy)"]),
    ({"sample": {"top_k": 0}}, ["sample.top_k must be null (no limit) or at least 1"]),
    ({"sample": {"top_p": 0}}, ["sample.top_p must be in (0, 1]"]),
    ({"sample": {"top_p": 1.0000001}}, ["sample.top_p must be in (0, 1]"]),
    ({"sample": {"seed": -1}}, ["sample.seed must be a whole number from 0 to 2**63 - 1"]),
    ({"sample": {"seed": 2**63}}, ["sample.seed is 9223372036854775808, beyond a 64-bit integer"]),
    ({"sample": {"num_samples": 0}}, ["sample.num_samples must be at least 1"]),
    ({"sample": {"num_beams": 0}}, ["sample.num_beams must be at least 1"]),
    ({"sample": {"num_beams": 2}}, ["sample.num_beams (2) runs beam search", "set sample.temperature to 0"]),
    ({"sample": {"length_penalty": 10.5}}, ["sample.length_penalty must be in [-10.0, 10.0]"]),
    ({"sample": {"length_penalty": -10.5}}, ["sample.length_penalty must be in [-10.0, 10.0]"]),
]


@pytest.mark.parametrize("overrides, phrases", BOUNDARIES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else "")
def test_values_just_outside_the_range_name_the_key_and_the_range(tmp_path, corpus_path, overrides, phrases):
    assert_one_error(run_params(tmp_path, overrides, corpus_path), *phrases)
    assert not (tmp_path / "raw").exists()


LEGITIMATE = [  # (group, key, value written, value read): the edges of each range are valid
    ("data", "train_ratio", 0.999, 0.999), ("data", "test_ratio", 0.0, 0.0), ("data", "max_bytes", None, None),
    ("data", "sha256", None, None), ("model", "vocab_size", 50304, 50304), ("model", "drop_rate", 0.0, 0.0),
    ("model", "context_length", 1, 1), ("train", "lr", "1e-05", 1e-05), ("train", "epochs", 0, 0),
    ("train", "seed", 0, 0), ("train", "seed", 2**63 - 1, 2**63 - 1), ("train", "warmup_steps", 0.5, 0.5),
    ("train", "initial_lr", LR, LR), ("train", "min_lr", LR, LR), ("train", "grad_clip", 1e-300, 1e-300),
    ("train", "device", "cuda:7", "cuda:7"), ("train", "max_steps", 2**63 - 1, 2**63 - 1),
    ("evaluate", "max_tokens", 1, 1), ("sample", "prompt", "", ""), ("sample", "max_new_tokens", 0, 0),
    ("sample", "temperature", 0, 0.0), ("sample", "temperature", 5e-324, 5e-324),
    ("sample", "temperature", 1e300, 1e300), ("sample", "top_p", 1e-300, 1e-300), ("sample", "top_k", None, None),
    ("sample", "seed", 2**63 - 1, 2**63 - 1), ("sample", "length_penalty", -10, -10.0),
    ("sample", "length_penalty", 10.0, 10.0),
]


@pytest.mark.parametrize("group, key, written, read", LEGITIMATE)
def test_the_edges_of_each_range_are_accepted_as_written(tmp_path, group, key, written, read):
    params = load_params(write_params(tmp_path / "params.yaml", {group: {key: written}}))
    assert getattr(getattr(params, group), key) == read


# ---------------------------------------------------------------- params.yaml itself

def params_text(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


DEFAULT_TEXT = (ROOT / "params.yaml").read_text()
LR_LINE = DEFAULT_TEXT.splitlines().index("  lr: 0.0004") + 1
PARAMS_FILES = {  # what params.yaml holds: its text (bytes, a folder, or None: absent), what the error says
    "missing": (None, ["not found", "--params"]),
    "empty": ("", ["must map stage groups to their keys, got NoneType"]),
    "a list": ("- data\n- model\n", ["must map stage groups to their keys, got list"]),
    "not YAML": ("data: [1, 2\n", ["line 2, column 1", "fix the YAML there"]),
    "tabs": ("data:\n\turl: x\n", ["line 2", "fix the YAML there"]),
    "not UTF-8": ("lr: caf\u00e9".encode("latin-1"), ["is not UTF-8 text", "save it as UTF-8"]),
    "a directory": (Path("."), ["params.yaml is a directory where a file is expected"]),
    "a key twice": (params_text(DEFAULT_TEXT, "  lr: 0.0004\n", "  lr: 0.0004\n  lr: 0.001\n"),
                    [f"line {LR_LINE + 1}, column 3: key 'lr' is given a second time (first on line {LR_LINE})",
                     "DVC refuses"]),
    "an unknown group": (DEFAULT_TEXT + "optimizer:\n  lr: 0.1\n", ["unknown key optimizer in params.yaml"]),
    "a key missing": (params_text(DEFAULT_TEXT, "  seed: 123\n", ""), ["missing key train.seed; add it"]),
    "a group twice": (DEFAULT_TEXT + "train:\n  lr: 0.001\n",
                      [f"key 'train' is given a second time (first on line "
                       f"{DEFAULT_TEXT.splitlines().index('train:') + 1})", "keep one of them"]),
}


@pytest.mark.parametrize("case", PARAMS_FILES)
def test_a_params_file_that_is_not_right(tmp_path, case):
    content, phrases = PARAMS_FILES[case]
    path = tmp_path / "params.yaml"
    if isinstance(content, Path):
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert_one_error(run_stage_cli("download", path, "--out", str(tmp_path / "raw")), *phrases)
    assert not (tmp_path / "raw").exists()


def test_dvc_refuses_a_key_given_twice_too():
    """The rule is DVC's own: its params loader refuses the file we refuse."""
    from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml

    with pytest.raises(YAMLFileCorruptedError):
        parse_yaml(PARAMS_FILES["a key twice"][0], "params.yaml")
    parse_yaml(DEFAULT_TEXT, "params.yaml")


def test_an_unreadable_params_file(open_ws):
    (open_ws / "params.yaml").chmod(0)
    run_failing("download", open_ws, "permission denied for", "params.yaml", user=as_another_user)


# ---------------------------------------------------------------- every file a stage reads

def write(path: Path, content: bytes | str | None) -> None:
    """Put `content` at `path` in place of what is there: bytes, text, a folder (content None)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
        (path / "inside.txt").write_text("not what was expected")
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def cut(path: Path, n_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:-n_bytes])


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def tiny_state(**config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**{**vars(GPTConfig()), **HOSTILE["model"], **config})).state_dict()


def spoil_model(ws: Path, weights=lambda state: None, header=lambda header: None) -> None:
    """The model directory in `ws`, its weights (GPT-2's names) and gptpipe header changed in place."""
    state = load_file(ws / "model" / HF_WEIGHTS)
    weights(state)
    save_file(state, ws / "model" / HF_WEIGHTS, metadata={"format": "pt"})
    edit_json(ws / "model" / HF_CONFIG, lambda config: header(config[HEADER_KEY]))


def source(ws: Path, name: str, content: bytes | str) -> None:
    """Make `content` the corpus: the file `name`, listed by the download stage."""
    write(ws / name, content)
    write_params(ws / "params.yaml", HOSTILE, ws / name)
    run_stage("download", ws / "params.yaml", *args_for("download", ws))


def parquet(values: list, field: str = "text") -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({field: pa.array(values, None if values else pa.string())}), buffer)
    return buffer.getvalue()


def init_from(ws: Path, corpus_path: Path, path: Path) -> None:
    write_params(ws / "params.yaml", {**HOSTILE, "model": {**HOSTILE["model"], "init_from": str(path)}}, corpus_path)


RANDOM_BYTES = bytes(range(7, 256)) * 4
INPUTS = {  # case: (stage, how to spoil its input in ws (and the corpus), what the error says)
    # download: data.url
    "source missing": ("download", lambda ws, c: write_params(ws / "params.yaml", HOSTILE, ws / "nope.txt"),
                       ["data.url points to", "nope.txt, which is missing"]),
    "source empty": ("download", lambda ws, c: (write(ws / "src.txt", b""), write_params(
        ws / "params.yaml", HOSTILE, ws / "src.txt")), ["src.txt is empty: point data.url at the corpus"]),
    "source truncated": ("download", lambda ws, c: (write(ws / "src.txt", c.read_bytes()[:-9]), write_params(
        ws / "params.yaml", {**HOSTILE, "data": {"url": str(ws / "src.txt"), "sha256": DEFAULTS["data"]["sha256"]}}
    )), ["checksum mismatch", "data.sha256"]),
    "source a folder of nothing": ("download", lambda ws, c: (write(ws / "src", None), (ws / "src/inside.txt").unlink(),
                                                              write_params(ws / "params.yaml", HOSTILE, ws / "src")),
                                   ["is a directory that holds no files"]),
    "source a device": ("download", lambda ws, c: write_params(ws / "params.yaml", HOSTILE, Path(os.devnull)),
                        ["which is neither a file nor a directory (a device or a pipe?)"]),
    "source a compressed Parquet file": ("download", lambda ws, c: (write(ws / "src.parquet.gz", "x"), write_params(
        ws / "params.yaml", HOSTILE, ws / "src.parquet.gz")), ["src.parquet.gz: a Parquet file compresses its own"]),
    # tokenize: the download stage's manifest, and the files it lists
    "manifest missing": ("tokenize_corpus", lambda ws, c: (ws / "raw/sources.json").unlink(),
                         ["sources.json not found: run the download stage first"]),
    "manifest not JSON": ("tokenize_corpus", lambda ws, c: write(ws / "raw/sources.json", "{"),
                          ["sources.json is not a manifest of the download stage", "run the download stage again"]),
    "manifest of nothing": ("tokenize_corpus", lambda ws, c: write(ws / "raw/sources.json", '{"files": []}'),
                            ["sources.json lists no files", "run the download stage again"]),
    "manifest a folder": ("tokenize_corpus", lambda ws, c: write(ws / "raw/sources.json", None),
                          ["sources.json is a directory where a file is expected"]),
    "corpus only blanks": ("tokenize_corpus", lambda ws, c: source(ws, "src.txt", "  \n\n "),
                           ["data.url holds no text", "check data.url"]),
    "corpus cut in a character": ("tokenize_corpus", lambda ws, c: source(ws, "src.txt", c.read_bytes() + b"\xc3"),
                                  ["src.txt is not UTF-8", "unexpected end of data"]),
    "corpus latin-1": ("tokenize_corpus", lambda ws, c: source(ws, "src.txt", "caf\u00e9".encode("latin-1")),
                       ["is not UTF-8", "iconv"]),
    "corpus changed since download": ("tokenize_corpus", lambda ws, c: (source(ws, "src.txt", c.read_bytes()),
                                                                        write(ws / "src.txt", "edited")),
                                      ["src.txt changed since the download stage recorded it", "dvc repro -f download"]),
    "corpus gone since download": ("tokenize_corpus", lambda ws, c: (source(ws, "src.txt", c.read_bytes()),
                                                                     (ws / "src.txt").unlink()),
                                   ["cannot read", "src.txt (No such file or directory)"]),
    # tokenize: corpora as they ship, spoiled
    "parquet truncated": ("tokenize_corpus", lambda ws, c: source(ws, "a.parquet", parquet(["a story"] * 50)[:-100]),
                          ["a.parquet is not a readable Parquet file", "download it again"]),
    "parquet without the field": ("tokenize_corpus", lambda ws, c: source(ws, "a.parquet", parquet(["x"], "story")),
                                  ["a.parquet has no column 'text' (it has story)", "set data.text_field"]),
    "parquet of numbers": ("tokenize_corpus", lambda ws, c: source(ws, "a.parquet", parquet([1, 2])),
                           ["a.parquet: column 'text' holds int64, not text", "data.text_field"]),
    "jsonl line not JSON": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl", '{"text": "a"}\n{"text": "b\n'),
                            ["a.jsonl line 2 is not JSON", "one object per line"]),
    "jsonl line an array": ("tokenize_corpus", lambda ws, c: source(ws, "a.json", '[{"text": "a"}, {"text": "b"}]\n'),
                            ["a.json line 1 is a JSON list, not an object", "each line must be one object"]),
    "jsonl row without the field": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl", '{"text": "a"}\n{"body": 1}\n'),
                                    ["a.jsonl row 2 has no field 'text'", "data.bad_rows to skip"]),
    "jsonl row null": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl", '{"text": "a"}\n{"text": null}\n'),
                       ["a.jsonl row 2 has null in the field 'text'"]),
    "jsonl invalid UTF-8": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl", b'{"text": "caf\xe9"}\n'),
                            ["a.jsonl line 1 is not UTF-8", "invalid continuation byte"]),
    "jsonl.gz not gzip": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl.gz", '{"text": "plain"}\n'),
                          ["a.jsonl.gz is not a valid gzip file", "rename it"]),
    "jsonl.gz truncated": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl.gz", gzip.compress(
        b'{"text": "a story"}\n' * 100)[:-30]), ["a.jsonl.gz is not a valid gzip file", "ended before the end-of-stream marker"]),
    "jsonl.zst not zstd": ("tokenize_corpus", lambda ws, c: source(ws, "a.jsonl.zst", '{"text": "plain"}\n'),
                           ["a.jsonl.zst is not a valid zstd file"]),
    # pretrain and evaluate: the tokens
    "meta.json missing": ("pretrain", lambda ws, c: (ws / "tokens/meta.json").unlink(),
                          ["meta.json not found: run the tokenize stage first"]),
    "meta.json empty": ("evaluate", lambda ws, c: write(ws / "tokens/meta.json", b""),
                        ["meta.json is not valid JSON", "run the tokenize stage again"]),
    "meta.json truncated": ("pretrain", lambda ws, c: cut(ws / "tokens/meta.json", 30), ["is not valid JSON"]),
    "meta.json a list": ("evaluate", lambda ws, c: write(ws / "tokens/meta.json", "[1, 2]"),
                         ["is not a meta.json of the tokenize stage", "run the tokenize stage again"]),
    "meta.json of other tokens": ("pretrain", lambda ws, c: edit_json(ws / "tokens/meta.json",
                                                                      lambda m: m.update(dtype="uint32")),
                                  ["describes tokens of dtype 'uint32'", "run the tokenize stage again"]),
    "meta.json a folder": ("pretrain", lambda ws, c: write(ws / "tokens/meta.json", None),
                           ["meta.json is a directory where a file is expected"]),
    "meta.json disagrees": ("pretrain", lambda ws, c: edit_json(
        ws / "tokens/meta.json", lambda m: m["splits"]["train"].update(tokens=m["splits"]["train"]["tokens"] + 1)),
        ["train.bin holds", "but its meta.json says", "run the tokenize stage again"]),
    "meta.json of a bigger vocabulary": ("evaluate", lambda ws, c: edit_json(
        ws / "tokens/meta.json", lambda m: m.update(vocab_size=60000)),
        ["the model's vocab_size is 50257, fewer than the 60,000 token ids", "evaluate the model that pretrain"]),
    "train.bin missing": ("pretrain", lambda ws, c: (ws / "tokens/train.bin").unlink(),
                          ["train.bin not found: run the tokenize stage first"]),
    "train.bin empty": ("pretrain", lambda ws, c: write(ws / "tokens/train.bin", b""),
                        ["train.bin holds 0 tokens, but its meta.json says"]),
    "train.bin one byte short": ("pretrain", lambda ws, c: cut(ws / "tokens/train.bin", 1),
                                 ["not a whole number of 2-byte token ids", "run the tokenize stage again"]),
    "val.bin one token short": ("evaluate", lambda ws, c: cut(ws / "tokens/val.bin", 2),
                                ["val.bin holds", "but its meta.json says"]),
    "val.bin one byte short": ("evaluate", lambda ws, c: cut(ws / "tokens/val.bin", 1),
                               ["not a whole number of 2-byte token ids"]),
    "train.bin a folder": ("pretrain", lambda ws, c: write(ws / "tokens/train.bin", None),
                           ["train.bin is not a file: run the tokenize stage first"]),
    # evaluate, sample: the model directory
    "model missing": ("sample", lambda ws, c: shutil.rmtree(ws / "model"),
                      ["model", "not found: run the pretrain stage first"]),
    "model a file": ("evaluate", lambda ws, c: (shutil.rmtree(ws / "model"), write(ws / "model", "weights\n")),
                     ["is a text file, not a model of this pipeline (a directory of config.json and"]),
    "model weights missing": ("sample", lambda ws, c: (ws / "model" / HF_WEIGHTS).unlink(),
                              ["model.safetensors not found", "is not a whole model of this pipeline", "re-run"]),
    "model weights empty": ("evaluate", lambda ws, c: write(ws / "model" / HF_WEIGHTS, b""),
                            ["model.safetensors is an empty file, not a safetensors file", "re-run pretrain"]),
    "model weights truncated": ("sample", lambda ws, c: cut(ws / "model" / HF_WEIGHTS, 1000),
                                ["not a readable safetensors file", "re-run pretrain"]),
    "model weights a text file": ("sample", lambda ws, c: write(ws / "model" / HF_WEIGHTS, "weights\n"),
                                  ["is a text file, not a safetensors file"]),
    "model weights random bytes": ("evaluate", lambda ws, c: write(ws / "model" / HF_WEIGHTS, RANDOM_BYTES),
                                   ["is a file of an unknown format, not a safetensors file"]),
    "model weights a torch file": ("evaluate", lambda ws, c: torch.save(tiny_state(), ws / "model" / HF_WEIGHTS),
                                   ["is a PyTorch file (torch.save), not a safetensors file"]),
    "model weights a folder": ("sample", lambda ws, c: write(ws / "model" / HF_WEIGHTS, None),
                               ["model.safetensors is a directory, not a safetensors file"]),
    "model weights of another program": ("evaluate", lambda ws, c: save_file({"w": torch.zeros(2)},
                                                                             ws / "model" / HF_WEIGHTS),
                                         ["model.safetensors lacks the GPT-2 weight 'wte.weight'", "re-run pretrain"]),
    "model with NaN weights": ("sample", lambda ws, c: spoil_model(
        ws, weights=lambda state: state["transformer.ln_f.weight"].fill_(math.nan)),
        ["weight transformer.ln_f.weight holds NaN or infinite values", "re-run pretrain"]),
    "model with integer weights": ("evaluate", lambda ws, c: spoil_model(
        ws, weights=lambda state: state.update({"transformer.wpe.weight": state["transformer.wpe.weight"].long()})),
        ["weight transformer.wpe.weight holds torch.int64 values, not floating point"]),
    "model config.json missing": ("sample", lambda ws, c: (ws / "model" / HF_CONFIG).unlink(),
                                  ["config.json not found", "is not a whole model of this pipeline"]),
    "model config.json truncated": ("evaluate", lambda ws, c: cut(ws / "model" / HF_CONFIG, 30),
                                    ["config.json is not valid JSON", "re-run pretrain"]),
    "model config.json of another program": ("sample", lambda ws, c: write(ws / "model" / HF_CONFIG, "{}"),
                                             ["config.json has no 'gptpipe' entry", "not a model of this pipeline"]),
    "model header of the wrong types": ("evaluate", lambda ws, c: spoil_model(
        ws, header=lambda header: header["config"].update(emb_dim="8")),
        ["has a model header this version cannot read (model.emb_dim must be int"]),
    # pretrain: model.init_from
    "init_from missing": ("pretrain", lambda ws, c: init_from(ws, c, ws / "nope.pth"),
                          ["model.init_from: ", "nope.pth does not exist"]),
    "init_from empty": ("pretrain", lambda ws, c: (write(ws / "w.pth", b""), init_from(ws, c, ws / "w.pth")),
                        ["model.init_from: ", "w.pth is an empty file, not a checkpoint; expected scratch"]),
    "init_from a text file": ("pretrain", lambda ws, c: (write(ws / "w.pth", "hello"), init_from(ws, c, ws / "w.pth")),
                              ["w.pth is a text file, not a checkpoint"]),
    "init_from random bytes": ("pretrain", lambda ws, c: (write(ws / "w.bin", RANDOM_BYTES),
                                                          init_from(ws, c, ws / "w.bin")),
                               ["w.bin is a file of an unknown format, not a checkpoint"]),
    "init_from a truncated torch file": ("pretrain", lambda ws, c: (torch.save(tiny_state(), ws / "w.pth"),
                                                                    cut(ws / "w.pth", 300),
                                                                    init_from(ws, c, ws / "w.pth")),
                                         ["w.pth is not a readable PyTorch file (truncated or another format?)"]),
    "init_from a truncated model": ("pretrain", lambda ws, c: (cut(ws / "model" / HF_WEIGHTS, 1000),
                                                               init_from(ws, c, ws / "model")),
                                    ["not a readable safetensors file"]),
    "init_from a dict of numbers": ("pretrain", lambda ws, c: (torch.save({"tok_emb.weight": 5}, ws / "w.pth"),
                                                               init_from(ws, c, ws / "w.pth")),
                                    ["w.pth holds a 'tok_emb.weight' but not the tensors of the book's GPTModel"]),
    "init_from a folder without config.json": ("pretrain", lambda ws, c: (write(ws / "hf", None),
                                                                          init_from(ws, c, ws / "hf")),
                                               ["directory", "has no config.json; expected scratch"]),
    "init_from config.json a list": ("pretrain", lambda ws, c: (write(ws / "hf", None),
                                                                write(ws / "hf/config.json", "[]"),
                                                                init_from(ws, c, ws / "hf")),
                                     ["config.json holds a JSON list, not the mapping of a Hugging Face config.json"]),
    "init_from weights a text file": ("pretrain", lambda ws, c: (
        shutil.copytree(ws / "model", ws / "hf"), write(ws / "hf/model.safetensors", "text"),
        init_from(ws, c, ws / "hf")), ["model.safetensors is a text file, not a safetensors file"]),
    # pretrain: the resumable state
    "resume state empty": ("pretrain", lambda ws, c: write(ws / "resume/pretrain.pt", b""),
                           ["the resumable state", "is an empty file", "delete it to start the run fresh"]),
    "resume state truncated": ("pretrain", lambda ws, c: (write(ws / "resume/pretrain.pt", b""),
                                                          torch.save({"x": torch.zeros(100)},
                                                                     ws / "resume/pretrain.pt"),
                                                          cut(ws / "resume/pretrain.pt", 200)),
                               ["is not a readable PyTorch file", "delete it to start the run fresh"]),
    "resume state a folder": ("pretrain", lambda ws, c: write(ws / "resume/pretrain.pt", None),
                              ["pretrain.pt is a directory, not a PyTorch file"]),
}


@pytest.mark.parametrize("case", INPUTS)
def test_an_input_that_is_missing_empty_truncated_or_of_another_kind(ws, corpus_path, case):
    script, spoil, phrases = INPUTS[case]
    spoil(ws, corpus_path)
    run_failing(script, ws, *phrases)


UNREADABLE = {  # stage: the input made unreadable
    "download": "src.txt", "tokenize_corpus": "raw/sources.json", "pretrain": "tokens/train.bin",
    "evaluate": "tokens/meta.json", "sample": "model/model.safetensors",
}


@pytest.mark.parametrize("script", UNREADABLE)
def test_an_unreadable_input(open_ws, corpus_path, script):
    if script == "download":  # its output is written as the input is read: a folder it may write to
        shutil.copy(corpus_path, open_ws / "src.txt")
        write_params(open_ws / "params.yaml", HOSTILE, open_ws / "src.txt")
        open_ws.chmod(0o777)
    (open_ws / UNREADABLE[script]).chmod(0)
    error = run_failing(script, open_ws, UNREADABLE[script].split("/")[-1], user=as_another_user)
    assert "permission" in error.lower()


# ---------------------------------------------------------------- every output path

IN_THE_WAY = [  # (stage, output, what stands in its place, what the error says)
    ("download", "raw", "a file", ["raw exists and is not a directory"]),
    ("download", "raw/sources.json", "a folder", ["sources.json is a directory where a file is expected"]),
    ("tokenize_corpus", "tokens", "a file", ["tokens exists and is not a directory"]),
    ("tokenize_corpus", "tokens/train.bin", "a folder", ["train.bin is a directory where a file is expected"]),
    ("tokenize_corpus", "tokens/meta.json", "a folder", ["meta.json is a directory"]),
    ("pretrain", "model", "a file", ["model exists and is not a directory", "the training is saved in"]),
    ("pretrain", "model/model.safetensors", "a folder", ["model.safetensors is a directory", "the training is saved"]),
    ("pretrain", "model/config.json", "a folder", ["config.json is a directory", "the training is saved in"]),
    # the curves and metrics are first written before training (a running experiment shows them):
    # a path there that cannot take them stops the stage before any training
    ("pretrain", "plots", "a file", ["plots exists and is not a directory"]),
    ("pretrain", "train.json", "a folder", ["train.json is a directory"]),
    ("pretrain", "resume", "a file", ["resume exists and is not a directory"]),
    ("evaluate", "eval.json", "a folder", ["eval.json is a directory where a file is expected"]),
    ("sample", "sample.txt", "a folder", ["sample.txt is a directory where a file is expected"]),
]


@pytest.mark.parametrize("script, output, thing, phrases", IN_THE_WAY)
def test_something_in_the_way_of_an_output(ws, corpus_path, live_rewrites, script, output, thing, phrases):
    write(ws / output, None if thing == "a folder" else "in the way")
    trained = script == "pretrain" and output.startswith("model")
    if trained:
        another_run(ws, corpus_path)
    saved = ("resume/pretrain.pt",) if trained else ()  # pretrain keeps its training
    run_failing(script, ws, *phrases, new=saved)
    if trained:  # the curves and metrics it rewrote while training are back as they were
        assert_rewritten_then_put_back(live_rewrites, ws)


def test_a_failed_final_write_keeps_the_training_and_the_rerun_only_writes(ws, outputs, caplog):
    write(ws / "model/model.safetensors", None)
    run_failing("pretrain", ws, "model.safetensors is a directory", new=("resume/pretrain.pt",))
    shutil.rmtree(ws / "model/model.safetensors")
    caplog.set_level(logging.INFO)
    assert run_stage_cli("pretrain", ws / "params.yaml", *args_for("pretrain", ws)).status == 0
    steps = HOSTILE["train"]["max_steps"]
    assert f"resuming from {ws / 'resume/pretrain.pt'}: epoch 1, step {steps}" in caplog.text
    assert "train loss" not in caplog.text.split("resuming from")[1]  # no step was trained again
    assert_same_model(ws / "model", outputs / "model")
    assert json.loads((ws / "train.json").read_text())["steps"] == steps
    assert not (ws / "resume/pretrain.pt").exists()


def assert_same_model(a: Path, b: Path) -> None:
    """The same weights and progress."""
    config_a, weights_a, progress_a = read_model(a)
    config_b, weights_b, progress_b = read_model(b)
    assert (config_a, progress_a) == (config_b, progress_b) and weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


UNWRITABLE = {  # stage: the folder it cannot write to
    "download": ".", "tokenize_corpus": "tokens", "pretrain": ".", "evaluate": ".", "sample": ".",
}


@pytest.mark.parametrize("script", UNWRITABLE)
def test_an_unwritable_output_folder(open_ws, script):
    folder = open_ws / UNWRITABLE[script]
    folder.chmod(0o555)
    (open_ws / "resume").chmod(0o777)  # pretrain may still save its training
    error = run_failing(script, open_ws, "permission denied for", new=("resume/pretrain.pt",), user=as_another_user)
    assert ".tmp" not in error


def test_pretrain_with_an_unwritable_model_folder(open_ws, corpus_path, live_rewrites):
    """It trains, rewriting the curves and metrics as it goes, then cannot write the model: the
    curves and metrics are put back (as another user, they were kept as copies, not hard links)."""
    another_run(open_ws, corpus_path)
    for folder in (open_ws, open_ws / "plots", open_ws / "resume"):
        folder.chmod(0o777)
    (open_ws / "model").chmod(0o555)
    error = run_failing("pretrain", open_ws, "permission denied for", "model", "the training is saved in",
                        new=("resume/pretrain.pt",), user=as_another_user)
    assert ".tmp" not in error
    assert_rewritten_then_put_back(live_rewrites, open_ws)


@contextlib.contextmanager
def full_disk(mount_point: Path, previous: dict[str, Path]):
    """A small tmpfs at `mount_point` holding copies of `previous` (name there: source), then
    filled up to the last byte."""
    mount_point.mkdir(parents=True)
    size = sum(p.stat().st_size for source in previous.values() for p in [source, *source.rglob("*")]
               if p.is_file()) + (1 << 20)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                           capture_output=True)
    if os.geteuid() != 0 or mount.returncode != 0:
        pytest.skip("filling a disk needs a small tmpfs: root, with the right to mount")
    try:
        for name, source in previous.items():
            if source.is_dir():
                shutil.copytree(source, mount_point / name)
            else:
                shutil.copy(source, mount_point / name)
        fd = os.open(mount_point / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while os.write(fd, bytes(1 << 16)):
                pass
        os.close(fd)
        yield
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


FULL = {  # stage: the outputs placed on the full disk (option: name there)
    "download": {"out": "raw"}, "tokenize_corpus": {"out": "tokens"},
    # the model, written after training (the curves and metrics are written before it: a full
    # disk there stops the stage before training, as a path in the way does)
    "pretrain": {"model": "model"},
    "evaluate": {"out": "eval.json"}, "sample": {"out": "sample.txt"},
}


@pytest.mark.parametrize("script", FULL)
def test_a_full_disk(ws, outputs, corpus_path, live_rewrites, script):
    full = ws / "full"
    if script == "pretrain":
        another_run(ws, corpus_path)
    with full_disk(full, {name: outputs / name for name in FULL[script].values()}):
        args = args_for(script, ws, **{option: full / name for option, name in FULL[script].items()})
        error = run_failing(script, ws, "no space left on the device writing", str(full), args=args,
                            new=("resume/pretrain.pt",))
    if script == "pretrain":
        assert "the training is saved in" in error
        assert_rewritten_then_put_back(live_rewrites, ws)


def test_a_disk_that_fills_as_the_file_is_flushed(tmp_path, monkeypatch, capsys):
    """Without a disk to fill (no right to mount), as the file is flushed."""
    from gptpipe import cli

    target = tmp_path / "out.txt"
    target.write_text("previous")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def main(argv):
        monkeypatch.setattr("os.fsync", no_space)
        files.write_text(target, "new")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main)
    assert exit_info.value.code == 1
    assert f"error: no space left on the device writing {target}" in capsys.readouterr().err
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("error, errno_found", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), errno.ENOSPC),
    (type("SafetensorError", (Exception,), {})("I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (type("SafetensorError", (Exception,), {})("I/O error: Permission denied (os error 13)"), errno.EACCES),
])
def test_libraries_that_write_files_themselves_report_the_os_error(tmp_path, monkeypatch, error, errno_found):
    """torch.save and safetensors wrap a failed write in their own exception types (found on a
    full tmpfs); the disk's free space tells a full disk from another failure."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with pytest.raises(OSError) as found:
        with files.atomic_path(tmp_path / "model.bin"):
            raise error
    assert found.value.errno == errno_found and found.value.filename == str(tmp_path / "model.bin")
    assert list(tmp_path.iterdir()) == []


def test_files_kept_on_another_file_system_are_copied_back(tmp_path, monkeypatch):
    """Where the folder that keeps the previous files is on another file system (no hard link,
    no rename across), they are kept as copies and copied back; a file that was not there
    before is removed again."""
    previous, new, keep = tmp_path / "plots/losses.csv", tmp_path / "train.json", tmp_path / "resume/previous"
    previous.parent.mkdir()
    previous.write_text("the previous run's")
    rename = os.replace

    def cross_device(*args):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    monkeypatch.setattr(os, "replace", lambda src, dst: cross_device() if Path(src).parent == keep
                        else rename(src, dst))
    with pytest.raises(KeyboardInterrupt):
        with files.put_back_on_failure([previous, new], keep):
            files.write_text(previous, "this run's")
            files.write_text(new, "{}")
            raise KeyboardInterrupt
    assert previous.read_text() == "the previous run's" and not new.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["losses.csv", "plots", "resume"]


def test_outputs_get_the_mode_of_the_umask(tmp_path):
    previous = os.umask(0o027)
    files.output_mode.cache_clear()
    try:
        files.write_text(tmp_path / "a.txt", "x")
        with files.written_together():
            files.write_json(tmp_path / "b.json", {})
    finally:
        os.umask(previous)
        files.output_mode.cache_clear()
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("a.txt", "b.json")} == {0o640}


# ---------------------------------------------------------------- signals

@pytest.fixture
def signals_raise():
    """While the test runs, SIGINT raises KeyboardInterrupt and SIGTERM Terminated, whatever this
    process inherited: should a stage let one through, pytest survives it. A process started in
    the background by a non-interactive shell (`nohup .ci/run &`) ignores SIGINT, and Python then
    installs no KeyboardInterrupt handler, so a Ctrl-C test would see nothing happen. Processes the
    test starts get SIGINT's default action (exec resets a handler, never an ignored signal)."""
    def raise_terminated(signum, frame):
        raise Terminated

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, raise_terminated)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


POINTS = {  # where a signal lands: (module, function) after whose call it is sent
    "start": {"": ("gptpipe.params", "load_params")},
    "work": {"download": ("gptpipe.download", "hash_local"),
             "tokenize_corpus": ("gptpipe.tokens:TokenWriter", "write"),
             "evaluate": ("gptpipe.metrics", "batch_loss"), "sample": ("gptpipe.generate", "next_token")},
    "write": {"": ("gptpipe.files", "output_mode")},  # a temporary file written, not yet renamed
}


def signal_after(monkeypatch, target: str, name: str, signum: int) -> None:
    """Send `signum` to this process right after the first call of `name` in `target` (a module,
    or module:Class)."""
    module_name, _, class_name = target.partition(":")
    owner = importlib.import_module(module_name)
    owner = getattr(owner, class_name) if class_name else owner
    original = getattr(owner, name)
    sent = []

    def signalling(*args, **kwargs):
        result = original(*args, **kwargs)
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(owner, name, signalling)


SIGNAL_CASES = [(script, point, signum) for script in STAGES if script != "pretrain"
                for point in POINTS for signum in (signal.SIGTERM, signal.SIGINT)
                if signum == signal.SIGTERM or point == "work"]


@pytest.mark.parametrize("script, point, signum", SIGNAL_CASES,
                         ids=[f"{s}-{p}-{signal.Signals(n).name}" for s, p, n in SIGNAL_CASES])
def test_a_signal_stops_a_stage_cleanly(ws, monkeypatch, signals_raise, script, point, signum):
    target, name = POINTS[point].get(script) or POINTS[point][""]
    signal_after(monkeypatch, target, name, signum)
    what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    run_failing(script, ws, f"stopped by {what} before the stage finished", "previous outputs are unchanged")


def test_pretrain_stops_cleanly_before_training(ws, monkeypatch, signals_raise):
    signal_after(monkeypatch, "gptpipe.params", "load_params", signal.SIGTERM)
    run_failing("pretrain", ws, "stopped by SIGTERM before the stage finished")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_pretrain_stopped_while_training_saves_its_state(ws, corpus_path, monkeypatch, signals_raise, live_rewrites,
                                                         signum):
    """Stopped after its first step and evaluation: the state is saved, and the curves and
    metrics of that evaluation give way to the previous ones."""
    another_run(ws, corpus_path)
    signal_after(monkeypatch, "gptpipe.train", "optimizer_step", signum)
    run_failing("pretrain", ws, f"stopped by signal {signum} after step 0; the state is saved in", "to resume",
                "the previous curves and metrics are back", new=("resume/pretrain.pt",))
    assert (ws / "resume/pretrain.pt").is_file()
    assert_rewritten_then_put_back(live_rewrites, ws)


def test_pretrain_stopped_twice_stops_at_once_and_puts_the_curves_back(ws, corpus_path, monkeypatch, signals_raise,
                                                                       live_rewrites):
    """A second Ctrl-C does not wait for the step to end: no state is saved, and the curves of
    the evaluation before it give way to the previous ones all the same."""
    another_run(ws, corpus_path)
    from gptpipe import train
    original = train.optimizer_step
    steps = []

    def step_then_ctrl_c(*args, **kwargs):
        result = original(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train, "optimizer_step", step_then_ctrl_c)
    run_failing("pretrain", ws, "stopped by Ctrl-C (SIGINT) before the stage finished")
    assert_rewritten_then_put_back(live_rewrites, ws)


def test_pretrain_finishes_its_outputs_when_stopped_while_writing_them(ws, outputs, monkeypatch, signals_raise):
    """The training is done: a stop request during the seconds of writing lets them finish."""
    signal_after(monkeypatch, "gptpipe.pretrain", "save_model", signal.SIGTERM)  # the final writes
    shutil.rmtree(ws / "model")
    assert run_stage_cli("pretrain", ws / "params.yaml", *args_for("pretrain", ws)).status == 0
    assert_same_model(ws / "model", outputs / "model")
    assert not (ws / "resume/pretrain.pt").exists()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM to the stage", "Ctrl-C to its process group"])
def test_a_real_signal_stops_tokenize_and_its_workers(ws, corpus_path, signals_raise, signum, to_group):
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs Linux's /proc/PID/task/PID/children")
    (ws / "big.txt").write_text(corpus_path.read_text() * 300)
    before = snapshot(ws / "tokens")
    command = stage_command("tokenize_corpus", ws / "params.yaml", "--corpus", str(ws / "big.txt"),
                            "--out", str(ws / "tokens"), "--workers", "2")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (list((ws / "tokens").glob(".*.tmp")) and len(children(process.pid)) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "tokenize ended before the signal"
            time.sleep(0.01)
        workers = children(process.pid)
        os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:  # the session holds the stage and its workers: none outlives a failed test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [
        f"error: stopped by {what} before the stage finished; its previous outputs are unchanged: run it again"]
    assert snapshot(ws / "tokens") == before
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []


# ---------------------------------------------------------------- the stage scripts' own options

OPTIONS = [  # (stage, arguments after the paths, what the error says)
    ("tokenize_corpus", ["--workers", "-1"], ["argument --workers: must be at least 1, got -1", "see --help"]),
    ("tokenize_corpus", ["--workers", "0"], ["argument --workers: must be at least 1, got 0"]),
    ("tokenize_corpus", ["--workers", "all"], ["must be a whole number of at least 1, got 'all'"]),
    ("evaluate", ["--batch-size", "3"], ["unrecognized arguments: --batch-size 3", "see --help"]),
    ("sample", ["--out"], ["argument --out: expected one argument"]),
    ("pretrain", ["--resume-dir"], ["argument --resume-dir: expected one argument"]),
]


@pytest.mark.parametrize("script, extra, phrases", OPTIONS)
def test_bad_options_are_one_line_like_bad_params(ws, script, extra, phrases):
    run_failing(script, ws, *phrases, args=args_for(script, ws) + extra)


def test_help_still_answers(capsys):
    from gptpipe import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(stage_module("tokenize_corpus").main, ["--help"])
    assert exit_info.value.code == 0 and "--workers" in capsys.readouterr().out


# ---------------------------------------------------------------- relations and semantics

def test_a_model_too_big_for_the_machine_is_refused_before_it_is_built(ws, corpus_path):
    write_params(ws / "params.yaml", {**HOSTILE, "model": {**HOSTILE["model"], "n_layers": 10**9}}, corpus_path)
    run_failing("pretrain", ws, "training a model of", "parameters needs at least", "make model.emb_dim")


def test_an_allocation_that_fails_is_one_line(ws, corpus_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 221032623508553728 bytes.")

    monkeypatch.setattr("gptpipe.pretrain.initial_model", refuse)
    run_failing("pretrain", ws, "out of memory (", "make the model or the batches smaller")


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_a_device_that_is_not_there(ws, corpus_path, device):
    if device.startswith("cuda") and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} exists here")
    write_params(ws / "params.yaml", {**HOSTILE, "train": {**HOSTILE["train"], "device": device}}, corpus_path)
    run_failing("pretrain", ws, f"train.device is {device!r}", "set train.device to auto or cpu")


def test_a_corpus_too_small_for_one_window(ws):
    source(ws, "src.txt", "Every effort moves you. " * 30)  # 180 tokens: val gets 18, context is 16
    assert run_stage_cli("tokenize_corpus", ws / "params.yaml", *args_for("tokenize_corpus", ws)).status == 0
    write_params(ws / "params.yaml", {**HOSTILE, "model": {**HOSTILE["model"], "context_length": 32}})
    run_failing("pretrain", ws, "the val split has", "model.context_length=32", "data.train_ratio")


def test_corpora_at_the_edges_give_a_correct_result(tmp_path):
    """An empty shard among others, a document that is only <|endoftext|>, and a single
    document of 100 MB in one JSON line (held whole, as a row must be), encoded in chunks."""
    gpt2 = corpus.gpt2_encoding()
    eot, word = gpt2.eot_token, gpt2.encode_ordinary(" word")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.parquet").write_bytes(parquet([]))  # a shard with no rows
    (tmp_path / "src/b.jsonl").write_text(json.dumps({"text": "<|endoftext|>"}) + "\n")
    repeats = 100_000_000 // len(" word")
    (tmp_path / "src/c.jsonl").write_text(json.dumps({"text": "word" + " word" * (repeats - 1)}) + "\n")
    (tmp_path / "src/d.jsonl.gz").write_bytes(gzip.compress(b""))  # an empty compressed shard
    corpus.tokenize_corpus(tmp_path / "src/b.jsonl", tmp_path / "one", 0.5)  # one document: text, no separator
    assert read_ids(tmp_path / "one", "train") == gpt2.encode_ordinary("<|endo")
    assert read_ids(tmp_path / "one", "val") == gpt2.encode_ordinary("ftext|>")
    files = download(str(tmp_path / "src"), tmp_path / "raw")
    assert [f.bytes > 0 for f in files] == [True, True, True, True]
    meta = corpus.tokenize_corpus(tmp_path / "raw", tmp_path / "tokens", 1e-7, workers=2)  # val: the big one
    assert meta["documents"] == 2 and meta["splits"]["val"]["documents"] == 1
    assert read_ids(tmp_path / "tokens", "train") == [*gpt2.encode_ordinary("<|endoftext|>"), eot]
    val = np.fromfile(tmp_path / "tokens/val.bin", dtype=np.uint16)
    assert len(val) == repeats + 1 and val[-1] == eot and val[0] == gpt2.encode_ordinary("word")[0]
    assert (val[1:-1] == word[0]).all()


def read_ids(tokens: Path, split: str) -> list[int]:
    return np.fromfile(tokens / f"{split}.bin", dtype=np.uint16).tolist()


PADDED = GPTConfig(vocab_size=50304, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)


@pytest.fixture(scope="module")
def padded_model() -> GPTModel:
    """A padded vocabulary whose padding ids the untrained model would pick above all others."""
    torch.manual_seed(0)
    model = GPTModel(PADDED).eval()
    with torch.no_grad():
        model.out_head.weight[GPT2_VOCAB_SIZE:] = 5.0
        model.final_norm.bias.fill_(1.0)  # every padding logit is then 40, the others near 0
    return model


def test_a_padded_vocabulary_never_yields_an_id_the_tokenizer_lacks(padded_model, tmp_path):
    prompt = torch.tensor([[464, 318]])
    with torch.no_grad():
        assert padded_model(prompt)[0, -1].argmax() >= GPT2_VOCAB_SIZE  # the test has teeth
    runs = [generate(padded_model, prompt, 6), beam_search(padded_model, prompt, 4, num_beams=3, eos_id=50256)]
    runs += [generate(padded_model, prompt, 6, temperature=t, top_k=k, top_p=p,
                      generator=torch.Generator().manual_seed(s))
             for s in range(2) for t, k, p in [(1.0, None, 1.0), (100.0, None, 0.9), (1e-30, 50, 1.0)]]
    for ids in runs:
        assert int(ids[0, 2:].max()) < GPT2_VOCAB_SIZE
    save_model(tmp_path / "model", padded_model)
    params = write_params(tmp_path / "params.yaml", {"train": {"device": "cpu"}, "sample": {"max_new_tokens": 3}})
    assert run_stage_cli("sample", params, *stage_args("sample", tmp_path)).status == 0


def test_any_positive_temperature_is_a_distribution_tiny_ones_tend_to_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    greedy = logits.argmax(dim=-1, keepdim=True)
    for temperature in (5e-324, 1e-300, 1e-30):
        for seed in range(5):
            picked = next_token(logits, temperature, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(picked, greedy)
    tie = torch.tensor([[3.0, 3.0, -1.0]])  # in the limit, the tied best tokens share the draws
    assert {next_token(tie, 1e-300, generator=torch.Generator().manual_seed(s)).item() for s in range(40)} == {0, 1}
    flat = {next_token(logits[:1], 1e300, generator=torch.Generator().manual_seed(s)).item() for s in range(100)}
    assert len(flat) > 30  # a huge temperature is close to uniform


def test_top_p_sums_the_probabilities_exactly_at_the_boundary():
    """Three equal tokens: two of them hold 2/3 (each float32 1/3 is 0.33333334), so top_p=2/3
    keeps two. Summed in float32, their mass rounds to 0.6666666 and a third token slipped in."""
    draws = {next_token(torch.zeros(1, 3), 1.0, top_p=2 / 3, generator=torch.Generator().manual_seed(s)).item()
             for s in range(60)}
    assert len(draws) == 2


def test_seeds_at_the_top_of_the_range_sample(ws, corpus_path):
    write_params(ws / "params.yaml", {**HOSTILE, "sample": {**HOSTILE["sample"], "seed": 2**63 - 1,
                                                            "num_samples": 2}}, corpus_path)
    assert run_stage_cli("sample", ws / "params.yaml", *args_for("sample", ws)).status == 0
    assert f"(seed {2**63})" in (ws / "sample.txt").read_text()


@pytest.mark.parametrize("prompt", ["", "word " * 100])
def test_empty_and_overlong_prompts_are_handled(ws, corpus_path, prompt):
    """An empty prompt samples from <|endoftext|>; a prompt longer than the context window is
    seen through its last context_length tokens (README)."""
    write_params(ws / "params.yaml", {**HOSTILE, "sample": {"prompt": prompt, "max_new_tokens": 5}}, corpus_path)
    assert run_stage_cli("sample", ws / "params.yaml", *args_for("sample", ws)).status == 0
    text = (ws / "sample.txt").read_text()
    assert text.startswith(prompt) and len(text) > len(prompt)


BEAM_CFG = GPTConfig(vocab_size=12, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


def transformers_beam(model: GPTModel, tmp_path: Path, prompt: list[int], max_new: int, beams: int,
                      length_penalty: float, eos_id: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    save_model(tmp_path / "hf", model)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, num_beams=beams, do_sample=False,
                      length_penalty=length_penalty, early_stopping="never", eos_token_id=eos_id,
                      pad_token_id=eos_id)[0].tolist()
    new = out[len(prompt):]
    return prompt + (new[:new.index(eos_id) + 1] if eos_id in new else new)


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 2.0])
def test_beam_search_keeps_an_end_of_text_only_among_the_steps_best_as_transformers(tmp_path, length_penalty):
    """With length_penalty <= 0 a short continuation wins, so keeping the best end-of-text
    candidate of every step, however unlikely, returned just <|endoftext|>. The end of text
    chosen here is the 4th most likely first token: outside 2 beams, within 6."""
    torch.manual_seed(3)
    model = GPTModel(BEAM_CFG).eval()
    prompt = [1, 2, 3]
    with torch.no_grad():
        eos_id = int(model(torch.tensor([prompt]))[0, -1].argsort(descending=True)[3])
    for beams in (2, 6):
        ours = beam_search(model, torch.tensor([prompt]), 5, beams, length_penalty, eos_id)[0].tolist()
        assert ours == transformers_beam(model, tmp_path / str(beams), prompt, 5, beams, length_penalty, eos_id)
        if beams == 2:
            assert ours[3] != eos_id  # not the empty continuation
