"""Pretraining from params, as the pretrain stage runs it: `run_pretraining(params, paths)`.

Layered as setup (the model, optimizer, loaders and schedule the params describe: functions
that tests and benchmarks call to build exactly what the stage builds) → `pretrain` (resume,
the loop, the outputs) → gptpipe.train.train (the loop itself).

A resumable state is saved every train.checkpoint_every steps, on Ctrl-C/SIGTERM, and when
the outputs cannot be written, under paths.resume_dir; a later run with the same params and
tokens resumes from it (so a failed write of the outputs costs a re-run of the writes, not of
the training). The model (paths.model) holds weights and config only.

The outputs of a run are all of one run: the curves and metrics, rewritten at every evaluation
so that a run can be watched, are put back as they were if the run fails or is stopped
(gptpipe.files.put_back_on_failure), and the model and final report land together.
"""

import contextlib
import importlib
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptpipe.checkpoint import save_model
from gptpipe.data import require_windows, window_loader
from gptpipe.device import hold_freed_memory, require_memory, resolve_device
from gptpipe.distributed import AgreedStop, Processes, data_parallel, process_group, same_on_all, sharded_loader
from gptpipe.errors import PipelineError, os_error_message
from gptpipe.files import put_back_on_failure, written_together
from gptpipe.generate import generate
from gptpipe.model import GPTModel
from gptpipe.params import ModelParams, Params, TrainParams, resolve_architecture
from gptpipe.precision import allow_fast_float32, book_dropout, cheap_dropout_masks, resolve_precision
from gptpipe.report import TrainingReport
from gptpipe.resume import fingerprint, load_state, save_state
from gptpipe.tokenizer import decode, encode_prompt
from gptpipe.tokens import read_meta, read_split
from gptpipe.train import (Hooks, Loaders, LoopSettings, LRSchedule, Parallel, StopRequested, TrainingStopped,
                           TrainState, train, warmup_steps)
from gptpipe.weights import initial_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainPaths:
    tokens: Path  # the tokenize stage's directory
    model: Path  # the model directory to write
    plots: Path  # losses.csv and lr.csv go here
    metrics: Path  # training metrics (JSON)
    resume_dir: Path  # the resumable state; not a DVC output

    @property
    def resume_state(self) -> Path:
        return self.resume_dir / "pretrain.pt"

    @property
    def previous_report(self) -> Path:
        """Where the curves and metrics of the previous run wait while this one rewrites them."""
        return self.resume_dir / "previous"


# ---------------------------------------------------------------- setup

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW over all parameters, as the book does. The fused kernel (one pass over each
    tensor) is faster but rounds differently from the default one."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)


def setup_model(model_params: ModelParams, opts: TrainParams, device: torch.device
                ) -> tuple[GPTModel, torch.optim.AdamW, torch.dtype | None]:
    """The initial model on `device`, its optimizer, and the autocast dtype (None: fp32)."""
    # weights, gradients and AdamW's two moments: 16 bytes each (`auto` keys counted as the book's)
    n = resolve_architecture(model_params).n_parameters
    require_memory(16 * n, device, f"training a model of {n:,} parameters", "make model.emb_dim, "
                   "model.n_layers, model.vocab_size or model.context_length smaller")
    allow_fast_float32(device, opts.precision)
    # The optimizer's first call imports torch's compiler (torch._dynamo: seconds of Python);
    # importing it on another thread while the weights are drawn (C++, which releases the
    # GIL) hides most of that start-up time.
    compiler_import = threading.Thread(target=importlib.import_module, args=("torch._dynamo",))
    compiler_import.start()
    torch.manual_seed(opts.seed)  # fixes the initial weights, then the batch order and dropout
    model = initial_model(model_params, model_params.init_from).to(device)
    tokens_per_forward = opts.batch_size // opts.nproc * model.cfg.context_length  # one process's micro-batch
    amp_dtype = resolve_precision(opts.precision, device, tokens_per_forward)
    model.use_cheap_dropout(cheap_dropout_masks(device, opts.precision, opts.compile))
    model.use_book_dropout(book_dropout(device, opts.precision))
    compiler_import.join()
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, fused=opts.precision != "fp32")
    return model, optimizer, amp_dtype


def make_loaders(tokens_dir: Path, context_length: int, opts: TrainParams, processes: Processes,
                 device: torch.device) -> Loaders:
    """As in the book: training batches shuffled, the last partial one dropped; validation in
    order, every window. Under DDP each process loads its share of every global batch."""
    meta = read_meta(tokens_dir)
    tokens = {split: read_split(tokens_dir, split, meta) for split in ("train", "val")}
    for split, ids in tokens.items():
        require_windows(len(ids), context_length, split)
    shape = dict(context_length=context_length, stride=opts.stride, batch_size=opts.batch_size,
                 pin_memory=device.type == "cuda")
    val = window_loader(tokens["val"], **shape, shuffle=False, drop_last=False)
    if processes.distributed:
        # The logged train loss is measured on the first global batches in order, so that, like
        # the training itself, it does not depend on the number of processes.
        loaders = Loaders(sharded_loader(tokens["train"], **shape, processes=processes, seed=opts.seed), val,
                          eval_train=window_loader(tokens["train"], **shape, shuffle=False, drop_last=True))
    else:
        loaders = Loaders(window_loader(tokens["train"], **shape, shuffle=True, drop_last=True), val)
    if len(loaders.train) == 0:
        raise PipelineError(
            f"the train split gives {len(loaders.train.dataset)} windows, fewer than one batch of "
            f"train.batch_size={opts.batch_size} (a partial training batch is dropped): lower "
            f"train.batch_size or train.stride, or raise data.train_ratio")
    return loaders


def make_schedule(opts: TrainParams, batches_per_epoch: int) -> LRSchedule:
    total_steps = opts.epochs * math.ceil(batches_per_epoch / opts.grad_accum_steps)
    if opts.max_steps is not None:
        total_steps = min(total_steps, opts.max_steps)
    return LRSchedule(opts.schedule, opts.lr, opts.initial_lr, opts.min_lr,
                      warmup_steps(opts.warmup_steps, total_steps), total_steps)


def loop_settings(opts: TrainParams) -> LoopSettings:
    return LoopSettings(opts.epochs, opts.eval_freq, opts.eval_iter, opts.grad_accum_steps, opts.grad_clip,
                        opts.max_steps, opts.checkpoint_every)


# ---------------------------------------------------------------- the run

def run_pretraining(params: Params, paths: PretrainPaths) -> TrainState:
    """Pretrain as one process, or as one of torchrun's processes when torchrun started this one."""
    hold_freed_memory()
    with process_group(resolve_device(params.train.device)) as (processes, device):
        if not processes.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        return pretrain(params, paths, processes, device)


def pretrain(params: Params, paths: PretrainPaths, processes: Processes, device: torch.device) -> TrainState:
    opts = params.train
    model, optimizer, amp_dtype = setup_model(params.model, opts, device)
    # after the model: an `auto` context length is the checkpoint's
    loaders = make_loaders(paths.tokens, model.cfg.context_length, opts, processes, device)
    schedule = make_schedule(opts, len(loaders.train))
    on_processes = f" × {processes.world_size} processes" if processes.distributed else ""
    parameters = sum(p.numel() for p in model.parameters())
    log.info(f"{parameters:,} parameters on {device}{on_processes}, "
             f"{'bf16 autocast' if amp_dtype else 'fp32'}; {len(loaders.train)} batches per epoch")

    meta = paths.tokens / "meta.json"
    run_id = fingerprint(params, meta.read_bytes() if meta.exists() else b"",
                         processes.world_size if processes.distributed else None)
    state = load_state(paths.resume_state, run_id, model, optimizer, device)
    resumed_step = state.step if state else 0
    if processes.distributed and not same_on_all(state.step if state else -1, device):
        raise PipelineError(f"the processes found different resumable states in {paths.resume_state}: it "
                            f"must be the same file on every machine (a shared filesystem), or absent on "
                            f"all; delete it to start fresh")

    def log_sample(epoch: int) -> None:  # the book's greedy sample after each epoch
        prompt = torch.tensor([encode_prompt(opts.start_context)], device=device)
        log.info(f"epoch {epoch} sample: {decode(generate(model, prompt, max_new_tokens=50)[0].tolist())!r}")

    forward, parallel = model, Parallel()
    if processes.distributed:
        forward = data_parallel(model, device)
        parallel = Parallel(processes.world_size, processes.is_main, forward.no_sync)
    if opts.compile:
        forward = torch.compile(forward)

    def keep_training() -> None:  # when the outputs cannot be written
        if state.step > resumed_step:
            save_state(paths.resume_state, run_id, model, optimizer, state)

    stop = AgreedStop(device) if processes.distributed else StopRequested()
    report = TrainingReport(schedule, paths.plots, paths.metrics, model.cfg, parameters)
    hooks = Hooks(save_state=lambda s: save_state(paths.resume_state, run_id, model, optimizer, s),
                  on_epoch_end=log_sample, on_evaluation=report.write, stop=stop)
    if processes.is_main:
        paths.resume_dir.mkdir(parents=True, exist_ok=True)  # where the training is kept
    previous = (put_back_on_failure(report.live_files, paths.previous_report) if processes.is_main
                else contextlib.nullcontext())
    try:
        # a stop request lets the final writes finish, and the putting back of the curves
        with stop.installed(), previous as kept:
            if processes.is_main:  # before training, so that a path in the way stops the stage now, not later
                report.write(state or TrainState())  # the curves so far (none, or a resumed run's)
            state = train(model, optimizer, loaders, loop_settings(opts), schedule, device=device,
                          amp_dtype=amp_dtype, state=state, hooks=hooks, parallel=parallel, forward=forward)
            if processes.is_main:
                write_outputs(model, state, opts.epochs, report, paths, keep_training)
                kept.discard()  # the run's outputs have landed, all together
    except TrainingStopped as e:
        raise PipelineError(f"{e}; the state is saved in {paths.resume_state}: run the stage again "
                            f"(dvc repro) to resume; the previous curves and metrics are back as they "
                            f"were") from e
    if processes.is_main:
        paths.resume_state.unlink(missing_ok=True)
    return state


def write_outputs(model: GPTModel, state: TrainState, epochs: int, report: TrainingReport, paths: PretrainPaths,
                  keep_training: Callable[[], None]) -> None:
    """The model and the report, landing together. If they cannot be written, `keep_training`
    saves the resumable state first (only then: it is the optimizer's moments too, three times
    the model), so the training is not lost."""
    try:
        with written_together():
            save_model(paths.model, model, step=state.step, epoch=min(state.epoch, epochs),
                       tokens_seen=state.tokens_seen)
            report.write(state)
    except OSError as e:
        keep_training()
        raise PipelineError(f"{os_error_message(e)}; the training is saved in {paths.resume_state}: run "
                            f"the stage again to write the outputs without training again") from e
