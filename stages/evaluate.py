"""Stage evaluate: cross-entropy, perplexity and bits per byte of the trained model on each split.

Every window of train, val and (when tokenize made one) test, in order; or, with
evaluate.max_tokens, the first max_tokens // context_length windows of each.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.checkpoint import load_model
from gptpipe.device import resolve_device
from gptpipe.files import write_json
from gptpipe.metrics import evaluate_splits
from gptpipe.params import load_params
from gptpipe.precision import resolve_precision

log = logging.getLogger("evaluate")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tokens", type=Path, default="data/tokens", help="directory written by the tokenize stage")
    parser.add_argument("--model", default="data/model", help="model directory to evaluate")
    parser.add_argument("--out", default="metrics/eval.json", help="metrics (JSON) to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    device = resolve_device(params.train.device)

    model, _ = load_model(args.model, device)
    amp_dtype = resolve_precision(params.train.precision, device,
                                  params.evaluate.batch_size * model.cfg.context_length)
    results = evaluate_splits(model, args.tokens, params.train.stride, params.evaluate.batch_size,
                              params.evaluate.max_tokens, device, amp_dtype)
    for split, result in results.items():
        log.info(f"{split}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
                 f"{result.bits_per_byte:.4f} bits per byte over {result.tokens:,} tokens")
    write_json(args.out, {split: {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens,
                                  "bits_per_byte": r.bits_per_byte} for split, r in results.items()})


if __name__ == "__main__":
    cli.run(main)
