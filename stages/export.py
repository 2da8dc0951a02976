"""Stage export: write the trained model as a Hugging Face GPT-2 directory (config.json + model.safetensors).

transformers.GPT2LMHeadModel.from_pretrained(directory) loads it. The stage reads no params:
everything it needs is in the model file.
"""

import logging
from collections.abc import Sequence

import torch

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.checkpoint import load_model
from gptpipe.weights import export_hf_gpt2

log = logging.getLogger("export")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", default="data/model/model.safetensors", help="model file to export")
    parser.add_argument("--out", default="data/export/hf-gpt2", help="directory to write")
    args = parser.parse_args(argv)

    model, _ = load_model(args.model, torch.device("cpu"))
    export_hf_gpt2(model, args.out)
    log.info(f"wrote {args.out}: a Hugging Face GPT-2 model "
             f"({'tied' if model.cfg.tie_embeddings else 'untied'} output head)")


if __name__ == "__main__":
    cli.run(main)
