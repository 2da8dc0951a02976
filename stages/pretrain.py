"""Stage pretrain: train the GPT on the train split, logging losses; write checkpoint, curves, metrics.

A resumable state is saved every train.checkpoint_every steps and on Ctrl-C/SIGTERM under
--resume-dir, which is not a DVC output (DVC deletes outputs before re-running a stage).
Re-running with the same params and tokens resumes from it; otherwise training starts fresh.

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) it trains with DistributedDataParallel;
with train.nproc > 1 and no torchrun around it, it relaunches itself under torchrun.
"""

import argparse
import hashlib
import json
import logging
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

# Use the library next to this script, the copy dvc.yaml tracks, not an installed one:
# a queued experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptpipe import cli
from gptpipe.checkpoint import load_checkpoint, save_checkpoint
from gptpipe.data import read_tokens, require_windows, window_loader
from gptpipe.device import hold_freed_memory, resolve_device
from gptpipe.distributed import (AgreedStop, Processes, data_parallel, process_group, run_torchrun,
                                 same_on_all, sharded_loader, under_torchrun)
from gptpipe.errors import PipelineError
from gptpipe.files import atomic_open, write_json
from gptpipe.generate import generate
from gptpipe.metrics import perplexity
from gptpipe.model import GPTModel
from gptpipe.params import Params, load_params
from gptpipe.plotting import save_figure, save_loss_figures
from gptpipe.precision import allow_fast_float32, cheap_dropout_masks, resolve_precision
from gptpipe.tokenizer import decode, encode_prompt
from gptpipe.train import (LogRecord, LoopSettings, LRSchedule, StopRequested, TrainingStopped,
                           TrainState, make_optimizer, train, warmup_steps)
from gptpipe.weights import initial_model

log = logging.getLogger("pretrain")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tokens", default="data/tokens", help="directory written by the tokenize stage")
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to write")
    parser.add_argument("--losses", default="plots/losses.csv", help="loss log (CSV) to write")
    parser.add_argument("--figures", default="plots/figures", help="directory for PNG loss curves")
    parser.add_argument("--metrics", default="metrics/train.json", help="training metrics (JSON) to write")
    parser.add_argument("--resume-dir", default="data/resume", help="where the resumable state lives")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if params.train.nproc > 1 and not under_torchrun():
        status = run_torchrun(params.train.nproc, Path(__file__).resolve(),
                              sys.argv[1:] if argv is None else argv)
        if status != 0:
            sys.exit(status)
        return
    with process_group(resolve_device(params.train.device)) as (processes, device):
        if not processes.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        pretrain(args, params, processes, device)


def pretrain(args: argparse.Namespace, params: Params, processes: Processes, device: torch.device) -> None:
    cfg, opts = params.model, params.train
    amp_dtype = resolve_precision(opts.precision, device)
    allow_fast_float32(device, opts.precision)
    hold_freed_memory()

    tokens = {split: read_tokens(Path(args.tokens) / f"{split}.bin") for split in ("train", "val")}
    for split, ids in tokens.items():
        require_windows(len(ids), cfg.context_length, split)
    # As in the book: the training batches are shuffled and the last partial one dropped;
    # validation keeps its order and every window.
    pin_memory = device.type == "cuda"
    loader_args = dict(context_length=cfg.context_length, stride=opts.stride, batch_size=opts.batch_size,
                       pin_memory=pin_memory)
    if processes.distributed:
        # Each process trains on its share of every global batch. The logged train loss is
        # measured on the first global batches of the windows in order, so that, like the
        # training itself, it does not depend on the number of processes.
        train_loader = sharded_loader(tokens["train"], cfg.context_length, opts.stride, opts.batch_size,
                                      processes, opts.seed, pin_memory)
        eval_train_loader = window_loader(tokens["train"], **loader_args, shuffle=False, drop_last=True)
    else:
        train_loader = window_loader(tokens["train"], **loader_args, shuffle=True, drop_last=True)
        eval_train_loader = train_loader  # the book evaluates on the shuffled training batches
    val_loader = window_loader(tokens["val"], **loader_args, shuffle=False, drop_last=False)
    if len(train_loader) == 0:
        raise PipelineError(
            f"the train split gives {len(train_loader.dataset)} windows, fewer than one batch of "
            f"train.batch_size={opts.batch_size} (a partial training batch is dropped): lower "
            f"train.batch_size or train.stride, or raise data.train_ratio")

    torch.manual_seed(opts.seed)  # fixes the initial weights, the batch order and dropout
    model = initial_model(cfg.config, cfg.init_from).to(device)
    model.use_cheap_dropout(cheap_dropout_masks(device, amp_dtype, opts.compile))
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, fused=opts.precision != "fp32")
    on_processes = f" × {processes.world_size} processes" if processes.distributed else ""
    log.info(f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}{on_processes}, "
             f"{'bf16 autocast' if amp_dtype else 'fp32'}; {len(train_loader)} batches per epoch")

    steps_per_epoch = math.ceil(len(train_loader) / opts.grad_accum_steps)
    total_steps = opts.epochs * steps_per_epoch
    if opts.max_steps is not None:
        total_steps = min(total_steps, opts.max_steps)
    schedule = LRSchedule(opts.schedule, opts.lr, opts.initial_lr, opts.min_lr,
                          warmup_steps(opts.warmup_steps, total_steps), total_steps)
    settings = LoopSettings(opts.epochs, opts.eval_freq, opts.eval_iter, opts.grad_accum_steps,
                            opts.grad_clip, opts.max_steps, opts.checkpoint_every)

    resume_path = Path(args.resume_dir) / "pretrain.pt"
    run_id = fingerprint(params, Path(args.tokens), processes)
    state = resume(resume_path, run_id, model, optimizer, device)
    if processes.distributed and not same_on_all(state.step if state else -1, device):
        raise PipelineError(f"the processes found different resumable states in {resume_path}: it must be "
                            f"the same file on every machine (a shared filesystem), or absent on all; "
                            f"delete it to start fresh")

    def save_state(state: TrainState) -> None:
        save_checkpoint(resume_path, model, optimizer, run_id=run_id, rng=rng_states(),
                        train_state={**asdict(state), "records": [asdict(r) for r in state.records]})
        log.info(f"saved resumable state at step {state.step} to {resume_path}")

    def log_sample(epoch: int) -> None:
        prompt = torch.tensor([encode_prompt(opts.start_context)], device=device)
        ids = generate(model, prompt, max_new_tokens=50)
        log.info(f"epoch {epoch} sample: {decode(ids[0].tolist())!r}")

    trained_model, sync_context = model, None
    if processes.distributed:
        trained_model, sync_context = data_parallel(model, device)
    if opts.compile:
        trained_model = torch.compile(trained_model)
    # Only rank 0 evaluates, logs and writes files; every process takes every training step.
    main_process = processes.is_main
    try:
        with (AgreedStop(device) if processes.distributed else StopRequested()).installed() as stop:
            state = train(trained_model, optimizer, train_loader, val_loader, device, settings, schedule,
                          amp_dtype, state, save_state if main_process else None,
                          on_epoch_end=log_sample if main_process else None, stop=stop,
                          eval_model=model, sync_context=sync_context, eval_train_loader=eval_train_loader,
                          main_process=main_process, world_size=processes.world_size)
    except TrainingStopped as e:
        raise PipelineError(f"{e}; the state is saved in {resume_path}: run the stage again "
                            f"(dvc repro) to resume") from e

    if main_process:
        save_checkpoint(args.checkpoint, model, optimizer, step=state.step,
                        epoch=min(state.epoch, opts.epochs), tokens_seen=state.tokens_seen)
        write_logs(state, schedule, args.losses, args.figures, args.metrics)
        resume_path.unlink(missing_ok=True)


def fingerprint(params: Params, tokens_dir: Path, processes: Processes) -> str:
    """Identifies a run: a saved state is resumed only by a run with the same params, data and
    number of processes (a plain process, which has the book's data order, is none)."""
    meta = (tokens_dir / "meta.json").read_bytes() if (tokens_dir / "meta.json").exists() else b""
    text = json.dumps({"model": asdict(params.model), "train": asdict(params.train),
                       "processes": processes.world_size if processes.distributed else None},
                      sort_keys=True)
    return hashlib.sha256(text.encode() + meta).hexdigest()


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_states(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def resume(path: Path, run_id: str, model: GPTModel, optimizer: torch.optim.Optimizer,
           device: torch.device) -> TrainState | None:
    if not path.exists():
        return None
    saved = load_checkpoint(path, map_location=device)
    if saved.get("run_id") != run_id:
        log.info(f"{path} was saved by a run with other params or data: starting fresh")
        return None
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    restore_rng_states(saved["rng"])
    fields = saved["train_state"]
    state = TrainState(**{**fields, "records": [LogRecord(**r) for r in fields["records"]]})
    log.info(f"resuming from {path}: epoch {state.epoch}, step {state.step}")
    return state


def write_logs(state: TrainState, schedule: LRSchedule, losses_path: str, figures_dir: str,
               metrics_path: str) -> None:
    columns = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr", "grad_norm"]
    losses = pd.DataFrame([asdict(r) for r in state.records], columns=columns)
    losses.insert(5, "train_perplexity", losses["train_loss"].map(perplexity))
    losses.insert(6, "val_perplexity", losses["val_loss"].map(perplexity))
    with atomic_open(losses_path) as f:
        losses.to_csv(f, index=False)
    save_loss_figures(losses, figures_dir)
    # The lr of every step (losses.csv has only the evaluated ones), next to losses.csv
    lrs = pd.DataFrame({"step": range(state.step), "lr": [schedule.lr_at(s) for s in range(state.step)]})
    with atomic_open(Path(losses_path).with_name("lr.csv")) as f:
        lrs.to_csv(f, index=False)
    save_figure(lrs, "step", ["lr"], "learning rate", Path(figures_dir) / "lr.png")
    last = state.records[-1] if state.records else None
    write_json(metrics_path, {
        "loss": {"train": last.train_loss if last else None, "val": last.val_loss if last else None},
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": round(state.tokens_seen / state.seconds, 1) if state.seconds else None,
        "wall_seconds": round(state.seconds, 2),
    })


if __name__ == "__main__":
    cli.run(main)
