"""Cross-entropy over windows, perplexity, and bits per byte."""

import math
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def batch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one batch."""
    logits = model(inputs)  # (batch, seq, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@dataclass(frozen=True)
class Loss:
    loss: float  # mean cross-entropy per target token, in nats
    tokens: int  # target tokens it was measured on

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


@torch.no_grad()
def loader_loss(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                max_batches: int | None = None) -> Loss:
    """Token-weighted mean loss over the first `max_batches` batches (all when None).

    Leaves the model in the mode it found it in.
    """
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for inputs, targets in islice(loader, max_batches):
        n = targets.numel()
        total += batch_loss(model, inputs.to(device), targets.to(device)).item() * n
        tokens += n
    model.train(was_training)
    return Loss(total / tokens if tokens else math.nan, tokens)


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


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                     token_bytes: np.ndarray) -> Evaluation:
    """Cross-entropy over every batch of `loader` and the bytes of its target tokens, whose
    lengths `token_bytes` gives by token id. Leaves the model in the mode it found it in."""
    lengths = torch.as_tensor(token_bytes)
    was_training = model.training
    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    for inputs, targets in loader:
        n = targets.numel()
        nats += batch_loss(model, inputs.to(device), targets.to(device)).item() * n
        tokens += n
        n_bytes += int(lengths[targets].sum())
    model.train(was_training)
    return Evaluation(nats, tokens, n_bytes)
