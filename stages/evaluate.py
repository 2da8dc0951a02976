"""Stage evaluate: cross-entropy, perplexity and bits per byte of the trained model on each split.

Every window of train, val and (when tokenize made one) test, in order; or, with
evaluate.max_tokens, the first max_tokens // context_length windows of each.
"""

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

# Use the library next to this script, the copy dvc.yaml tracks, not an installed one:
# a queued experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptpipe import cli
from gptpipe.checkpoint import load_model
from gptpipe.corpus import read_meta, token_byte_lengths
from gptpipe.data import first_windows, read_tokens, require_windows, window_loader
from gptpipe.device import resolve_device
from gptpipe.errors import PipelineError
from gptpipe.files import write_json
from gptpipe.metrics import evaluate_windows
from gptpipe.params import load_params
from gptpipe.precision import autocast, resolve_precision

log = logging.getLogger("evaluate")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tokens", default="data/tokens", help="directory written by the tokenize stage")
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to evaluate")
    parser.add_argument("--out", default="metrics/eval.json", help="metrics (JSON) to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    device = resolve_device(params.train.device)
    amp_dtype = resolve_precision(params.train.precision, device)
    stride, max_tokens = params.train.stride, params.evaluate.max_tokens

    model, _ = load_model(args.checkpoint, device)
    context_length = model.cfg.context_length
    if max_tokens is not None and max_tokens < context_length:
        raise PipelineError(f"evaluate.max_tokens={max_tokens} is less than one window of "
                            f"{context_length} target tokens (the model's context length): raise it, "
                            f"or set it to null to evaluate every window")
    report = {}
    for split in read_meta(args.tokens)["splits"]:
        # The same windows the model trained on (context length from the checkpoint,
        # train.stride), in order: all of them, or the first max_tokens // context_length.
        tokens = read_tokens(Path(args.tokens) / f"{split}.bin")
        require_windows(len(tokens), context_length, split)
        if max_tokens is not None:
            tokens = first_windows(tokens, context_length, stride, max_tokens // context_length)
        loader = window_loader(tokens, context_length, stride, params.evaluate.batch_size,
                               shuffle=False, drop_last=False)
        with torch.inference_mode(), autocast(device, amp_dtype):
            result = evaluate_windows(model, loader, device, token_byte_lengths())
        report[split] = {"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                         "bits_per_byte": result.bits_per_byte}
        log.info(f"{split}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
                 f"{result.bits_per_byte:.4f} bits per byte over {result.tokens:,} tokens")
    write_json(args.out, report)


if __name__ == "__main__":
    cli.run(main)
