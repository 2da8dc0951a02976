"""Stage export: write the trained model as a Hugging Face GPT-2 directory (config.json + model.safetensors).

transformers.GPT2LMHeadModel.from_pretrained(directory) loads it. The stage reads no params:
everything it needs is in the checkpoint.
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
from gptpipe.weights import export_hf_gpt2

log = logging.getLogger("export")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to export")
    parser.add_argument("--out", default="data/export/hf-gpt2", help="directory to write")
    args = parser.parse_args(argv)

    model, _ = load_model(args.checkpoint, torch.device("cpu"))
    export_hf_gpt2(model, args.out)
    log.info(f"wrote {args.out}: a Hugging Face GPT-2 model "
             f"({'tied' if model.cfg.tie_embeddings else 'untied'} output head)")


if __name__ == "__main__":
    cli.run(main)
