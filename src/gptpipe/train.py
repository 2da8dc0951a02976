"""The pretraining loop of the book's chapter 5, readable top to bottom.

With the defaults (constant lr, no clipping, no accumulation, fp32) and the same seed on the
same CPU it takes the same steps as the book's train_model_simple: the same batches in the
same order, the same dropout masks, the same evaluations. Everything else is opt-in:
bf16 autocast, torch.compile, a warmup+cosine schedule, clipping, gradient accumulation,
periodic resumable checkpoints.
"""

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from gptpipe.errors import PipelineError
from gptpipe.metrics import batch_loss, loader_loss
from gptpipe.precision import autocast

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- speed: precision, optimizer

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   fused: bool) -> torch.optim.AdamW:
    """AdamW over all parameters, as the book does. The fused kernel (one pass over each
    tensor) is faster but rounds differently from the default one."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=fused or None)


# ---------------------------------------------------------------- learning-rate schedule

@dataclass(frozen=True)
class LRSchedule:
    """constant: `peak_lr` throughout. cosine: linear warmup from `initial_lr` to `peak_lr`
    over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    kind: str
    peak_lr: float
    initial_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        if self.kind == "constant":
            return self.peak_lr
        if step < self.warmup_steps:
            return self.initial_lr + (self.peak_lr - self.initial_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(warmup: float, total_steps: int) -> int:
    """train.warmup_steps: a number of steps (>= 1), or a fraction of all steps (< 1)."""
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


# ---------------------------------------------------------------- state and logs

@dataclass(frozen=True)
class LogRecord:
    step: int  # index of the optimizer step just taken (0-based, as the book prints it)
    epoch: int  # 1-based
    tokens_seen: int
    train_loss: float
    val_loss: float
    lr: float
    grad_norm: float  # global gradient norm of this step, before clipping


@dataclass
class TrainState:
    """Progress, all a resume needs beside model and optimizer state."""
    step: int = 0  # optimizer steps taken
    epoch: int = 1  # the epoch in progress, 1-based
    batches_done: int = 0  # micro-batches of this epoch already consumed
    tokens_seen: int = 0
    # torch's RNG state when this epoch's loader was created: recreating the loader from it
    # gives the same shuffled order, so a resume can skip the batches already done.
    epoch_rng_state: torch.Tensor | None = None
    records: list[LogRecord] = field(default_factory=list)
    seconds: float = 0.0


class StopRequested:
    """Set by SIGINT/SIGTERM; the loop checks it between optimizer steps, so a stop never
    lands in the middle of an update."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequested"]:
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def requested(self) -> bool:
        return self.signal is not None

    def handle(self, signum: int, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum


class TrainingStopped(Exception):
    """Raised after the state was saved on a stop request."""


# ---------------------------------------------------------------- the loop

@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    eval_freq: int
    eval_iter: int
    grad_accum_steps: int = 1
    grad_clip: float | None = None
    max_steps: int | None = None
    checkpoint_every: int | None = None


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader: DataLoader,
          val_loader: DataLoader, device: torch.device, settings: LoopSettings,
          schedule: LRSchedule, amp_dtype: torch.dtype | None = None,
          state: TrainState | None = None,
          save_state: Callable[[TrainState], None] | None = None,
          on_epoch_end: Callable[[int], None] | None = None,
          stop: StopRequested | None = None,
          eval_model: torch.nn.Module | None = None,
          sync_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
          eval_train_loader: DataLoader | None = None,
          main_process: bool = True,
          world_size: int = 1) -> TrainState:
    """Train until `settings.epochs` epochs (or `max_steps` steps) are done, from `state` if given.

    Every `eval_freq` steps, log the mean loss of `eval_iter` batches of each split.
    `save_state(state)` runs every `checkpoint_every` steps and when a stop is requested.
    `eval_model` is the module to evaluate (the unwrapped one under DDP or torch.compile);
    `sync_context(is_last_micro_batch)` lets DDP skip gradient sync on earlier micro-batches.
    `eval_train_loader` gives the train batches of the logged train loss (default: `train_loader`,
    as the book). Under DDP each of the `world_size` processes trains on its own share of every
    batch: tokens_seen counts them all, and only the `main_process` evaluates and shows progress.
    """
    state = state or TrainState()
    eval_model = eval_model or model
    eval_train_loader = eval_train_loader or train_loader
    accum = settings.grad_accum_steps
    start = time.perf_counter() - state.seconds
    while state.epoch <= settings.epochs and not done(state, settings):
        model.train()
        batches = epoch_batches(train_loader, state)
        n_batches = len(train_loader)
        progress = tqdm(total=n_batches, initial=state.batches_done, leave=False,
                        desc=f"epoch {state.epoch}/{settings.epochs}", disable=not main_process)
        for inputs, targets in batches:
            index = state.batches_done
            group_start = index - index % accum
            group_size = min(accum, n_batches - group_start)  # the last group may be short
            last_in_group = index == group_start + group_size - 1
            with sync_context(last_in_group) if sync_context else contextlib.nullcontext():
                with autocast(device, amp_dtype):
                    loss = batch_loss(model, inputs.to(device, non_blocking=True),
                                      targets.to(device, non_blocking=True))
                (loss / group_size).backward()
            if not torch.isfinite(loss):
                raise PipelineError(
                    f"the training loss became {loss.item()} at step {state.step} (epoch {state.epoch}); "
                    f"the weights are not saved from this point. Lower train.lr, set train.grad_clip, "
                    f"or use train.precision: fp32; a resume starts from the last good checkpoint")
            state.batches_done += 1
            state.tokens_seen += inputs.numel() * world_size
            progress.update(1)
            if not last_in_group:
                continue

            lr = schedule.lr_at(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            evaluating = main_process and state.step % settings.eval_freq == 0
            grad_norm = math.nan
            if settings.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip).item()
            elif evaluating:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = state.step
            state.step += 1

            if evaluating:
                with autocast(device, amp_dtype):
                    train_loss = loader_loss(eval_model, eval_train_loader, device, settings.eval_iter).loss
                    val_loss = loader_loss(eval_model, val_loader, device, settings.eval_iter).loss
                record = LogRecord(step, state.epoch, state.tokens_seen, train_loss, val_loss, lr,
                                   grad_norm)
                state.records.append(record)
                log.info(f"epoch {state.epoch} step {step:06d}: train loss {train_loss:.3f}, "
                         f"val loss {val_loss:.3f}")
            state.seconds = time.perf_counter() - start
            if save_state and settings.checkpoint_every and state.step % settings.checkpoint_every == 0:
                save_state(state)
            if stop is not None and stop.requested():
                if save_state:
                    save_state(state)
                raise TrainingStopped(f"stopped by signal {stop.signal} after step {step}")
            if done(state, settings):
                break
        progress.close()
        if state.batches_done >= n_batches:
            if on_epoch_end is not None:
                on_epoch_end(state.epoch)
            state.epoch += 1
            state.batches_done = 0
    state.seconds = time.perf_counter() - start
    return state


def done(state: TrainState, settings: LoopSettings) -> bool:
    return settings.max_steps is not None and state.step >= settings.max_steps


def epoch_batches(loader: DataLoader, state: TrainState) -> Iterator:
    """This epoch's batches, past those a resumed state has done already.

    The shuffled order comes from torch's global RNG when the loader's iterator is created
    (as in the book). A fresh epoch records that RNG state; a resumed epoch recreates the
    iterator from it, skips the batches done, and restores the RNG state it resumed with.
    """
    if hasattr(loader.sampler, "set_epoch"):  # DistributedSampler: seed + epoch fixes the order
        loader.sampler.set_epoch(state.epoch)
    if state.batches_done == 0:
        state.epoch_rng_state = torch.get_rng_state()
        return iter(loader)
    resumed_rng = torch.get_rng_state()
    torch.set_rng_state(state.epoch_rng_state)
    batches = iter(loader)
    for _ in range(state.batches_done):
        next(batches)
    torch.set_rng_state(resumed_rng)
    return batches
