"""Stage evaluate: cross-entropy and perplexity of the trained model over every train and val window."""

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# Use the library next to this script, the copy dvc.yaml tracks, not an installed one:
# a queued experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptpipe import cli
from gptpipe.checkpoint import load_model
from gptpipe.data import read_tokens, window_loader
from gptpipe.device import resolve_device
from gptpipe.files import write_json
from gptpipe.metrics import loader_loss
from gptpipe.params import load_params

log = logging.getLogger("evaluate")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--tokens", default="data/tokens", help="directory written by the tokenize stage")
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to evaluate")
    parser.add_argument("--out", default="metrics/eval.json", help="metrics (JSON) to write")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    device = resolve_device(params.train.device)

    model, _ = load_model(args.checkpoint, device)
    report = {}
    for split in ("train", "val"):
        # The same windows the model trained on (context length from the checkpoint,
        # train.stride), all of them, in order.
        tokens = read_tokens(Path(args.tokens) / f"{split}.bin")
        loader = window_loader(tokens, model.cfg.context_length, params.train.stride,
                               params.evaluate.batch_size, shuffle=False, drop_last=False)
        loss = loader_loss(model, loader, device)
        report[split] = {"loss": loss.loss, "perplexity": loss.perplexity, "tokens": loss.tokens}
        log.info(f"{split}: loss {loss.loss:.4f}, perplexity {loss.perplexity:.2f} over {loss.tokens:,} tokens")
    write_json(args.out, report)


if __name__ == "__main__":
    cli.run(main)
