"""Bits per byte, evaluate.max_tokens, and the evaluate stage's report (train, val, test)."""

import json
import math

import numpy as np
import pytest
import tiktoken
import torch

from conftest import ROOT, UniformModel, run_stage, write_params
from gptpipe.checkpoint import save_model
from gptpipe.corpus import tokenize_corpus
from gptpipe.data import TokenWindows, first_windows, window_loader
from gptpipe.tokens import read_tokens
from gptpipe.errors import PipelineError
from gptpipe.metrics import Evaluation, evaluate_loader
from gptpipe.model import GPTConfig, GPTModel
from gptpipe.params import load_params
from gptpipe.tokenizer import token_byte_lengths

GPT2 = tiktoken.get_encoding("gpt2")
CPU = torch.device("cpu")


def target_bytes(tokens: np.ndarray, context_length: int, stride: int) -> int:
    """The UTF-8 bytes of every window's targets, decoded by tiktoken."""
    windows = TokenWindows(tokens, context_length, stride)
    return sum(len(GPT2.decode_bytes(windows[i][1].tolist())) for i in range(len(windows)))


def test_token_byte_lengths_are_the_decoded_bytes():
    lengths = token_byte_lengths()
    assert len(lengths) == GPT2.n_vocab
    ids = GPT2.encode("Every effort moves you, naïve 東京 🙂<|endoftext|>", allowed_special="all")
    assert int(lengths[ids].sum()) == len("Every effort moves you, naïve 東京 🙂<|endoftext|>".encode())
    assert lengths[GPT2.eot_token] == len("<|endoftext|>")


@pytest.mark.parametrize("stride", [8, 3])
def test_uniform_model_bits_per_byte(verdict_path, stride):
    tokens = np.array(GPT2.encode(verdict_path.read_text(encoding="utf-8")[:3000]), dtype=np.uint16)
    loader = window_loader(tokens, 8, stride, batch_size=5, shuffle=False, drop_last=False)
    result = evaluate_loader(UniformModel(GPT2.n_vocab), loader, CPU, token_bytes=token_byte_lengths())
    n_bytes = target_bytes(tokens, 8, stride)
    assert result.tokens == len(loader.dataset) * 8 and result.bytes == n_bytes
    assert result.loss == pytest.approx(math.log(GPT2.n_vocab))
    assert result.bits_per_byte == pytest.approx(math.log2(GPT2.n_vocab) * result.tokens / n_bytes)


def test_counting_bytes_does_not_change_the_loss():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=GPT2.n_vocab, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    tokens = np.random.default_rng(0).integers(0, GPT2.n_vocab, 200).astype(np.uint16)
    loader = window_loader(tokens, 8, 8, batch_size=3, shuffle=False, drop_last=False)
    result = evaluate_loader(model, loader, CPU, token_bytes=token_byte_lengths())
    assert result.loss == evaluate_loader(model, loader, CPU).loss and result.bytes > 0
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert model.training  # left as it was found


def test_empty_evaluation_is_nan():
    empty = Evaluation(0.0, 0, 0)
    assert math.isnan(empty.loss) and math.isnan(empty.bits_per_byte)


@pytest.mark.parametrize("n, context, stride, n_windows", [(100, 8, 8, 3), (100, 8, 3, 5), (100, 8, 8, 50),
                                                           (9, 8, 8, 1)])
def test_first_windows_are_the_first_windows(n, context, stride, n_windows):
    tokens = np.arange(n, dtype=np.uint16)
    every = TokenWindows(tokens, context, stride)
    first = TokenWindows(first_windows(tokens, context, stride, n_windows), context, stride)
    assert len(first) == min(n_windows, len(every))
    for i in range(len(first)):
        assert all((a == b).all() for a, b in zip(first[i], every[i]))


# The stage, on the book's corpus with a test split and a small model.

CONTEXT = 16


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, verdict_path):
    """Token splits of the-verdict's first 8,000 characters (train | val | test) and a small
    random model."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "corpus.txt").write_text(verdict_path.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    tokenize_corpus(root / "corpus.txt", root / "tokens", 0.8, 0.1)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=GPT2.n_vocab, context_length=CONTEXT, emb_dim=16, n_heads=2, n_layers=1))
    save_model(root / "model", model, step=0, epoch=0, tokens_seen=0)
    return root, model.eval()


def run_evaluate(root, tmp_path, **evaluate) -> dict:
    params = write_params(tmp_path / "params.yaml", {"train": {"stride": CONTEXT, "device": "cpu"},
                                                     "evaluate": {"batch_size": 4, **evaluate}})
    out = tmp_path / "eval.json"
    run_stage("evaluate", params, "--tokens", str(root / "tokens"), "--model", str(root / "model"),
              "--out", str(out))
    return json.loads(out.read_text())


def test_stage_reports_every_split_with_bits_per_byte(evaluated, tmp_path):
    root, model = evaluated
    report = run_evaluate(root, tmp_path, max_tokens=None)
    assert list(report) == ["train", "val", "test"]
    for split, metrics in report.items():
        tokens = read_tokens(root / "tokens" / f"{split}.bin")
        loader = window_loader(tokens, CONTEXT, CONTEXT, 4, shuffle=False, drop_last=False)
        expected = evaluate_loader(model, loader, CPU)
        assert set(metrics) == {"loss", "perplexity", "tokens", "bits_per_byte"}
        assert metrics["tokens"] == expected.tokens == len(loader.dataset) * CONTEXT
        assert metrics["loss"] == pytest.approx(expected.loss)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        nats = metrics["loss"] * metrics["tokens"]
        assert metrics["bits_per_byte"] == pytest.approx(
            nats / (math.log(2) * target_bytes(tokens, CONTEXT, CONTEXT)))


def test_stage_max_tokens_takes_the_first_windows(evaluated, tmp_path):
    root, model = evaluated
    max_tokens = 5 * CONTEXT + 7  # five whole windows of targets
    report = run_evaluate(root, tmp_path, max_tokens=max_tokens)
    for split, metrics in report.items():
        tokens = read_tokens(root / "tokens" / f"{split}.bin")
        first_five = window_loader(tokens[:5 * CONTEXT + 1], CONTEXT, CONTEXT, 4, shuffle=False, drop_last=False)
        assert metrics["tokens"] == 5 * CONTEXT
        assert metrics["loss"] == pytest.approx(evaluate_loader(model, first_five, CPU).loss)


def test_stage_without_test_split_reports_train_and_val(evaluated, tmp_path):
    root, _ = evaluated
    tokenize_corpus(root / "corpus.txt", tmp_path / "tokens", 0.9)
    (tmp_path / "model").symlink_to(root / "model")
    assert list(run_evaluate(tmp_path, tmp_path, max_tokens=None)) == ["train", "val"]


def test_stage_max_tokens_below_one_window_is_an_error(evaluated, tmp_path):
    root, _ = evaluated
    with pytest.raises(PipelineError, match=f"evaluate.max_tokens=10 is less than one window of {CONTEXT}"):
        run_evaluate(root, tmp_path, max_tokens=10)


@pytest.mark.parametrize("value, error", [(None, None), (1, None), (0, "evaluate.max_tokens must be null"),
                                          (2.5, "evaluate.max_tokens must be int")])
def test_max_tokens_validation(tmp_path, value, error):
    path = write_params(tmp_path / "params.yaml", {"evaluate": {"max_tokens": value}})
    if error is None:
        assert load_params(path).evaluate.max_tokens == value
    else:
        with pytest.raises(PipelineError, match=error):
            load_params(path)


def test_max_tokens_defaults_to_every_window():
    assert load_params(ROOT / "params.yaml").evaluate.max_tokens is None
