"""Cross-entropy over windows, perplexity, and bits per byte."""

import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gptpipe.data import first_windows, require_windows, window_loader
from gptpipe.errors import PipelineError
from gptpipe.model import eval_mode
from gptpipe.precision import autocast
from gptpipe.tokenizer import token_byte_lengths
from gptpipe.tokens import read_meta, read_split, require_vocab


def batch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch."""
    logits = model(inputs)  # (batch, seq, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@dataclass(frozen=True)
class Evaluation:
    """Cross-entropy summed over target tokens, and the UTF-8 bytes those tokens stand for."""
    nats: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        """Mean cross-entropy per target token, in nats."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """The loss per byte of text instead of per token, in bits: comparable across tokenizers."""
        return self.nats / (math.log(2) * self.bytes) if self.bytes else math.nan


@torch.inference_mode()
def evaluate_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                    max_batches: int | None = None, token_bytes: np.ndarray | None = None) -> Evaluation:
    """Cross-entropy over the first `max_batches` batches of `loader` (all when None), in eval
    mode; and, when `token_bytes` gives the UTF-8 length of each token id, the bytes of the
    target tokens. With max_batches this is the book's calc_loss_loader, without it the
    evaluate stage's full pass."""
    lengths = None if token_bytes is None else torch.as_tensor(token_bytes)
    nats, tokens, n_bytes = 0.0, 0, 0
    with eval_mode(model):
        for inputs, targets in islice(loader, max_batches):
            n = targets.numel()
            nats += batch_loss(model, inputs.to(device), targets.to(device)).item() * n
            tokens += n
            if lengths is not None:
                n_bytes += int(lengths[targets].sum())
    return Evaluation(nats, tokens, n_bytes)


def evaluate_splits(model: torch.nn.Module, tokens_dir: Path, stride: int, batch_size: int,
                    max_tokens: int | None, device: torch.device, amp_dtype: torch.dtype | None
                    ) -> dict[str, Evaluation]:
    """Evaluate every split the tokenize stage wrote (train, val, and test if any) on the windows
    the model trained on (its context length, `stride`), in order: all of them, or the first
    max_tokens // context_length."""
    context_length = model.cfg.context_length
    if max_tokens is not None and max_tokens < context_length:
        raise PipelineError(f"evaluate.max_tokens={max_tokens} is less than one window of "
                            f"{context_length} target tokens (the model's context length): raise it, "
                            f"or set it to null to evaluate every window")
    meta = read_meta(tokens_dir)
    require_vocab(meta, model.cfg.vocab_size, "the model's vocab_size",
                  "it was not trained on these tokens; evaluate the model that pretrain makes from them")
    results = {}
    for split in meta["splits"]:
        tokens = read_split(tokens_dir, split, meta)
        require_windows(len(tokens), context_length, split)
        if max_tokens is not None:
            tokens = first_windows(tokens, context_length, stride, max_tokens // context_length)
        loader = window_loader(tokens, context_length, stride, batch_size, shuffle=False, drop_last=False)
        with autocast(device, amp_dtype):
            results[split] = evaluate_loader(model, loader, device, token_bytes=token_byte_lengths())
    return results
