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

from gptpipe.errors import PipelineError, interruption
from gptpipe.metrics import batch_loss, evaluate_loader
from gptpipe.precision import autocast

log = logging.getLogger(__name__)


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
            raise interruption(signum)
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


@dataclass(frozen=True)
class Loaders:
    train: DataLoader
    val: DataLoader
    # the train batches of the logged train loss; None: `train`'s, as the book does
    eval_train: DataLoader | None = None


@dataclass(frozen=True)
class Hooks:
    """What the loop calls out to; each is optional."""
    save_state: Callable[[TrainState], None] | None = None  # every checkpoint_every steps, and on a stop
    on_epoch_end: Callable[[int], None] | None = None  # with the 1-based epoch just finished
    on_evaluation: Callable[[TrainState], None] | None = None  # after each logged evaluation
    stop: StopRequested | None = None  # checked after every optimizer step


@dataclass(frozen=True)
class Parallel:
    """This process's part when several train together (gptpipe.distributed); the defaults are
    one process. Each process trains on its own share of every batch: tokens_seen counts all
    `world_size` shares, and only the main process evaluates, shows progress and calls hooks."""
    world_size: int = 1
    is_main: bool = True
    # DDP's no_sync: gradients are averaged across processes on an accumulation group's last
    # micro-batch only
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def micro_step(forward: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               device: torch.device, amp_dtype: torch.dtype | None, group_size: int = 1) -> torch.Tensor:
    """Forward and backward of one of `group_size` micro-batches that make an optimizer step
    (their gradients add up to the mean's); returns its loss."""
    with autocast(device, amp_dtype):
        loss = batch_loss(forward, inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))
    (loss / group_size).backward()
    return loss


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                   grad_clip: float | None, want_norm: bool) -> float:
    """Set the lr, clip, step and clear the gradients; the global gradient norm before clipping
    (NaN when neither clipping nor `want_norm` asked for it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = math.nan
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    elif want_norm:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loaders: Loaders,
          settings: LoopSettings, schedule: LRSchedule, *, device: torch.device,
          amp_dtype: torch.dtype | None = None, state: TrainState | None = None,
          hooks: Hooks = Hooks(), parallel: Parallel = Parallel(),
          forward: torch.nn.Module | None = None) -> TrainState:
    """Train until `settings.epochs` epochs (or `max_steps` steps) are done, from `state` if given.

    Every `eval_freq` steps, log the mean loss of `eval_iter` batches of each split. `forward`
    is the module that takes the training steps when it is not `model` itself (`model` wrapped
    by DDP or torch.compile); `model` is what is evaluated and clipped.
    """
    state = state or TrainState()
    forward = model if forward is None else forward  # (a compiled module has no truth value)
    eval_train_loader = loaders.eval_train or loaders.train
    accum = settings.grad_accum_steps
    start = time.perf_counter() - state.seconds
    while state.epoch <= settings.epochs and not done(state, settings):
        forward.train()
        batches = epoch_batches(loaders.train, state)
        n_batches = len(loaders.train)
        progress = tqdm(total=n_batches, initial=state.batches_done, leave=False,
                        desc=f"epoch {state.epoch}/{settings.epochs}", disable=not parallel.is_main)
        for inputs, targets in batches:
            index = state.batches_done
            group_start = index - index % accum
            group_size = min(accum, n_batches - group_start)  # the last group may be short
            last_in_group = index == group_start + group_size - 1
            with contextlib.nullcontext() if last_in_group else parallel.no_sync():
                loss = micro_step(forward, inputs, targets, device, amp_dtype, group_size)
            if not torch.isfinite(loss):
                raise PipelineError(
                    f"the training loss became {loss.item()} at step {state.step} (epoch {state.epoch}); "
                    f"the weights are not saved from this point. Lower train.lr, set train.grad_clip, "
                    f"or use train.precision: fp32; a resume starts from the last good checkpoint")
            state.batches_done += 1
            state.tokens_seen += inputs.numel() * parallel.world_size
            progress.update(1)
            if not last_in_group:
                continue

            lr = schedule.lr_at(state.step)
            evaluating = parallel.is_main and state.step % settings.eval_freq == 0
            grad_norm = optimizer_step(model, optimizer, lr, settings.grad_clip, want_norm=evaluating)
            step = state.step
            state.step += 1

            if evaluating:
                with autocast(device, amp_dtype):
                    train_loss = evaluate_loader(model, eval_train_loader, device, settings.eval_iter).loss
                    val_loss = evaluate_loader(model, loaders.val, device, settings.eval_iter).loss
                state.records.append(LogRecord(step, state.epoch, state.tokens_seen, train_loss, val_loss, lr,
                                               grad_norm))
                log.info(f"epoch {state.epoch} step {step:06d}: train loss {train_loss:.3f}, "
                         f"val loss {val_loss:.3f}")
            state.seconds = time.perf_counter() - start
            if evaluating and hooks.on_evaluation:
                hooks.on_evaluation(state)
            if parallel.is_main and hooks.save_state and settings.checkpoint_every \
                    and state.step % settings.checkpoint_every == 0:
                hooks.save_state(state)
            if hooks.stop is not None and hooks.stop.requested():
                if parallel.is_main and hooks.save_state:
                    hooks.save_state(state)
                raise TrainingStopped(f"stopped by signal {hooks.stop.signal} after step {step}")
            if done(state, settings):
                break
        progress.close()
        if state.batches_done >= n_batches:
            if parallel.is_main and hooks.on_epoch_end:
                hooks.on_epoch_end(state.epoch)
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
