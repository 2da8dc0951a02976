"""Stage sample: generate text from sample.prompt with the trained model."""

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
from gptpipe.device import resolve_device
from gptpipe.files import write_text
from gptpipe.generate import generate
from gptpipe.params import load_params
from gptpipe.precision import decoding_dtype
from gptpipe.tokenizer import END_OF_TEXT, decode, encode_prompt, gpt2_encoding

log = logging.getLogger("sample")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to sample from")
    parser.add_argument("--out", default="data/samples/sample.txt",
                        help="where to write the text; several samples each follow a header line")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    opts = params.sample
    device = resolve_device(params.train.device)
    amp_dtype = decoding_dtype(params.train.precision, device)

    model, _ = load_model(args.checkpoint, device)
    prompt = torch.tensor([encode_prompt(opts.prompt)], device=device)
    texts = []
    for i in range(opts.num_samples):
        seed = opts.seed + i
        ids = generate(model, prompt, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                       top_p=opts.top_p, eos_id=gpt2_encoding().eot_token,
                       generator=torch.Generator(device=device).manual_seed(seed),
                       num_beams=opts.num_beams, length_penalty=opts.length_penalty,
                       autocast_dtype=amp_dtype)
        text = decode(ids[0].tolist()).removesuffix(END_OF_TEXT)
        texts.append(text if opts.num_samples == 1 else
                     f"=== sample {i + 1} of {opts.num_samples} (seed {seed}) ===\n{text}\n")
        log.info(texts[-1])
    write_text(args.out, "\n".join(texts) + "\n")


if __name__ == "__main__":
    cli.run(main)
