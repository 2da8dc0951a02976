"""Cross-entropy over windows, and perplexity."""

import math
from dataclasses import dataclass
from itertools import islice

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
