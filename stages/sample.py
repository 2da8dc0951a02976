"""Stage sample: generate text from sample.prompt with the trained model."""

import logging
from collections.abc import Sequence

import torch

from gptpipe import cli
from gptpipe.checkpoint import load_model
from gptpipe.device import resolve_device
from gptpipe.files import write_text
from gptpipe.generate import generate
from gptpipe.params import load_params
from gptpipe.tokenizer import END_OF_TEXT, decode, encode_prompt, gpt2_encoding

log = logging.getLogger("sample")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--checkpoint", default="data/model/checkpoint.pt", help="checkpoint to sample from")
    parser.add_argument("--out", default="data/samples/sample.txt", help="where to write the text")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    opts = params.sample
    device = resolve_device(params.train.device)

    model, _ = load_model(args.checkpoint, device)
    prompt = torch.tensor([encode_prompt(opts.prompt)], device=device)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    ids = generate(model, prompt, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k,
                   eos_id=gpt2_encoding().eot_token, generator=generator)
    text = decode(ids[0].tolist()).removesuffix(END_OF_TEXT)
    write_text(args.out, text + "\n")
    log.info(text)


if __name__ == "__main__":
    cli.run(main)
