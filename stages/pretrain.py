"""Stage pretrain: train the GPT on the train split, logging losses; write checkpoint, curves, metrics."""

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from gptpipe import cli
from gptpipe.checkpoint import save_checkpoint
from gptpipe.data import read_tokens, require_windows, window_loader
from gptpipe.device import resolve_device
from gptpipe.errors import PipelineError
from gptpipe.files import atomic_open, write_json
from gptpipe.generate import generate
from gptpipe.metrics import perplexity
from gptpipe.model import GPTModel
from gptpipe.params import load_params
from gptpipe.plotting import save_loss_figures
from gptpipe.tokenizer import decode, encode_prompt
from gptpipe.train import train
from gptpipe.weights import initial_model

log = logging.getLogger("pretrain")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tokens", default="data/tokens", help="directory written by the tokenize stage")
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to write")
    parser.add_argument("--losses", default="plots/losses.csv", help="loss log (CSV) to write")
    parser.add_argument("--figures", default="plots/figures", help="directory for PNG loss curves")
    parser.add_argument("--metrics", default="metrics/train.json", help="training metrics (JSON) to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg, opts = params.model, params.train
    device = resolve_device(opts.device)

    tokens = {split: read_tokens(Path(args.tokens) / f"{split}.bin") for split in ("train", "val")}
    for split, ids in tokens.items():
        require_windows(len(ids), cfg.context_length, split)
    # As in the book: the training batches are shuffled and the last partial one dropped;
    # validation keeps its order and every window.
    train_loader = window_loader(tokens["train"], cfg.context_length, opts.stride, opts.batch_size,
                                 shuffle=True, drop_last=True)
    val_loader = window_loader(tokens["val"], cfg.context_length, opts.stride, opts.batch_size,
                               shuffle=False, drop_last=False)
    if len(train_loader) == 0:
        raise PipelineError(
            f"the train split gives {len(train_loader.dataset)} windows, fewer than one batch of "
            f"train.batch_size={opts.batch_size} (a partial training batch is dropped): lower "
            f"train.batch_size or train.stride, or raise data.train_ratio")

    torch.manual_seed(opts.seed)  # fixes the initial weights, the batch order and dropout
    model = initial_model(cfg.config, cfg.init_from).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    log.info(f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
             f"{len(train_loader)} batches per epoch")

    def log_sample(epoch: int) -> None:
        prompt = torch.tensor([encode_prompt(opts.start_context)], device=device)
        ids = generate(model, prompt, max_new_tokens=50)
        log.info(f"epoch {epoch} sample: {decode(ids[0].tolist())!r}")

    result = train(model, optimizer, train_loader, val_loader, device, opts.epochs,
                   opts.eval_freq, opts.eval_iter, on_epoch_end=log_sample)

    save_checkpoint(args.checkpoint, model, optimizer, step=result.steps, epoch=opts.epochs,
                    tokens_seen=result.tokens_seen)
    losses = pd.DataFrame([asdict(r) for r in result.records],
                          columns=["step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr"])
    losses.insert(5, "train_perplexity", losses["train_loss"].map(perplexity))
    losses.insert(6, "val_perplexity", losses["val_loss"].map(perplexity))
    with atomic_open(args.losses) as f:
        losses.to_csv(f, index=False)
    save_loss_figures(losses, args.figures)
    last = result.records[-1] if result.records else None
    write_json(args.metrics, {
        "loss": {"train": last.train_loss if last else None, "val": last.val_loss if last else None},
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_seen / result.seconds, 1) if result.seconds else None,
        "wall_seconds": round(result.seconds, 2),
    })


if __name__ == "__main__":
    cli.run(main)
