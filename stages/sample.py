"""Stage sample: generate text from sample.prompt with the trained model."""

import logging
from collections.abc import Sequence

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.checkpoint import load_model
from gptpipe.device import resolve_device
from gptpipe.files import write_text
from gptpipe.generate import sample_texts
from gptpipe.params import load_params
from gptpipe.precision import decoding_dtype
from gptpipe.quantize import prepare_for_decoding

log = logging.getLogger("sample")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--model", default="data/model", help="model directory to sample from")
    parser.add_argument("--out", default="data/samples/sample.txt",
                        help="where to write the text; several samples each follow a header line")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    opts = params.sample
    device = resolve_device(params.train.device)

    model, _ = load_model(args.model, device)
    model = prepare_for_decoding(model, opts.quantize, device)
    texts = sample_texts(model, opts, device, decoding_dtype(params.train.precision, device, opts.num_samples))
    if opts.num_samples > 1:
        texts = [f"=== sample {i + 1} of {opts.num_samples} (seed {opts.seed + i}) ===\n{text}\n"
                 for i, text in enumerate(texts)]
    for text in texts:
        log.info(text)
    write_text(args.out, "\n".join(texts) + "\n")


if __name__ == "__main__":
    cli.run(main)
