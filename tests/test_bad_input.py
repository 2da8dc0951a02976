"""Bad input stops a stage with one clear line (cause and fix), exit status 1, no traceback,
and no output left behind. Download failures are in test_download.py, checkpoint files in
test_checkpoint.py, a non-finite loss in test_train.py, kills in test_faults.py."""

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY, stage_args, write_params
from conftest import run_stage_process as run_stage
from gptpipe.checkpoint import save_model
from gptpipe.model import GPTConfig, GPTModel


def assert_clean_failure(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.mark.parametrize("overrides, phrases", [
    ({"model": {"n_heads": 5}}, ["model.n_heads (5) must divide model.emb_dim"]),
    ({"train": {"lr": "fast"}}, ["train.lr must be float", "'fast'"]),
    ({"train": {"lr": -1}}, ["train.lr must be positive"]),
    ({"train": {"epochs": 2.5}}, ["train.epochs must be int"]),
    ({"train": {"device": "gpu"}}, ["train.device must be auto, cpu, cuda, cuda:N or mps"]),
    ({"train": {"precision": "fp16"}}, ["train.precision must be one of auto, fp32, bf16"]),
    ({"train": {"learning_rate": 0.1}}, ["unknown key train.learning_rate", "valid keys are"]),
    ({"optimizer": {"lr": 0.1}}, ["unknown key optimizer"]),
    ({"data": {"train_ratio": 1.2}}, ["data.train_ratio must be between 0 and 1"]),
    ({"sample": {"top_k": 0}}, ["sample.top_k must be null"]),
])
def test_bad_params(tmp_path, corpus_path, overrides, phrases):
    params = write_params(tmp_path / "params.yaml", {k: v for k, v in overrides.items() if k != "optimizer"},
                          corpus_path)
    if "optimizer" in overrides:
        params.write_text(params.read_text() + "optimizer:\n  lr: 0.1\n")
    result = run_stage("download", params, *stage_args("download", tmp_path / "raw"))
    assert_clean_failure(result, *phrases)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_missing_params_file(tmp_path):
    assert_clean_failure(run_stage("download", tmp_path / "nope.yaml"), "not found", "--params")


def prepare_tokens(tmp_path: Path, corpus: Path, overrides: dict | None = None) -> Path:
    params = write_params(tmp_path / "params.yaml", overrides or TINY, corpus)
    for name in ("download", "tokenize_corpus"):
        result = run_stage(name, params, *stage_args(name, tmp_path))
        assert result.returncode == 0, result.stderr
    return params


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_device_that_is_not_there(tmp_path, corpus_path, device):
    if device.startswith("cuda") and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} exists here")
    params = prepare_tokens(tmp_path, corpus_path, {**TINY, "train": {**TINY["train"], "device": device}})
    result = run_stage("pretrain", params, *stage_args("pretrain", tmp_path))
    assert_clean_failure(result, f"train.device is {device!r}", "set train.device to auto or cpu")
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("content, phrases", [
    (b"", ["is empty", "data.url"]),
    (b"   \n\n ", ["is empty", "data.url"]),
    ("caf\u00e9 cr\u00e8me".encode("latin-1"), ["is not UTF-8", "iconv"]),
])
def test_corpus_that_cannot_be_tokenized(tmp_path, content, phrases):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(content)
    params = write_params(tmp_path / "params.yaml", TINY, corpus)
    assert run_stage("download", params, *stage_args("download", tmp_path)).returncode == 0
    result = run_stage("tokenize_corpus", params, *stage_args("tokenize_corpus", tmp_path))
    assert_clean_failure(result, *phrases)
    assert not (tmp_path / "tokens").exists() or not list((tmp_path / "tokens").iterdir())


def test_corpus_too_small_for_one_window(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("Every effort moves you. " * 30)  # about 150 tokens: val gets 15
    params = prepare_tokens(tmp_path, corpus)
    result = run_stage("pretrain", params, *stage_args("pretrain", tmp_path))
    assert_clean_failure(result, "the val split has", "model.context_length=32", "data.train_ratio")
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "plots").exists()


def tiny_model(path: Path) -> None:
    torch.manual_seed(0)
    save_model(path, GPTModel(GPTConfig(**{**vars(GPTConfig()), **TINY["model"]})), step=0)


def test_evaluate_refuses_a_truncated_model_file(tmp_path, corpus_path):
    params = prepare_tokens(tmp_path, corpus_path)
    tiny_model(tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    result = run_stage("evaluate", params, *stage_args("evaluate", tmp_path))
    assert_clean_failure(result, "not a readable safetensors file", "re-run pretrain")
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("prompt", ["", "word " * 100])
def test_empty_and_overlong_prompts_are_handled(tmp_path, corpus_path, prompt):
    """An empty prompt samples from <|endoftext|>; a prompt longer than the context window
    is seen through its last context_length tokens (documented in the README)."""
    params = write_params(tmp_path / "params.yaml",
                          {**TINY, "sample": {"prompt": prompt, "max_new_tokens": 5}}, corpus_path)
    tiny_model(tmp_path / "model.safetensors")
    result = run_stage("sample", params, *stage_args("sample", tmp_path))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "sample.txt").read_text()
    assert text.startswith(prompt) and len(text) > len(prompt)


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    import errno

    from gptpipe import cli
    from gptpipe.files import write_text

    target = tmp_path / "out.txt"
    target.write_text("previous")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def main(argv):
        monkeypatch.setattr("os.fsync", no_space)  # the disk fills as the file is flushed
        write_text(target, "new")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main)
    assert exit_info.value.code == 1
    assert "error: no space left on the device" in capsys.readouterr().err
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
