"""The pretraining loop of the book's chapter 5, readable top to bottom.

With the same seed, params and CPU it takes the same steps as the book's train_model_simple:
the same batches in the same order, the same dropout masks, the same evaluations.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from gptpipe.metrics import batch_loss, loader_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogRecord:
    step: int  # index of the optimizer step just taken (0-based, as the book prints it)
    epoch: int  # 1-based
    tokens_seen: int
    train_loss: float
    val_loss: float
    lr: float


@dataclass
class TrainResult:
    records: list[LogRecord] = field(default_factory=list)
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader: DataLoader,
          val_loader: DataLoader, device: torch.device, epochs: int, eval_freq: int, eval_iter: int,
          on_epoch_end: Callable[[int], None] | None = None) -> TrainResult:
    """Train for `epochs`; every `eval_freq` steps, log the mean loss of `eval_iter` batches
    of each split. `on_epoch_end(epoch)` runs after each epoch (the stage logs a sample there)."""
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for inputs, targets in tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False):
            optimizer.zero_grad()
            loss = batch_loss(model, inputs.to(device), targets.to(device))
            loss.backward()
            optimizer.step()
            step = result.steps
            result.steps += 1
            result.tokens_seen += inputs.numel()
            if step % eval_freq == 0:
                record = LogRecord(step=step, epoch=epoch, tokens_seen=result.tokens_seen,
                                   train_loss=loader_loss(model, train_loader, device, eval_iter).loss,
                                   val_loss=loader_loss(model, val_loader, device, eval_iter).loss,
                                   lr=optimizer.param_groups[0]["lr"])
                result.records.append(record)
                log.info(f"epoch {epoch} step {step:06d}: train loss {record.train_loss:.3f}, "
                         f"val loss {record.val_loss:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    result.seconds = time.perf_counter() - start
    return result
