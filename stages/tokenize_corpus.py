"""Stage tokenize: GPT-2 BPE token ids of the train, val (and test) splits, plus split metadata.

The corpus (the download stage's folder, or one corpus file) is streamed and encoded on all
cores; see gptpipe.corpus for how the splits are drawn (by characters for one document, by
document for several) and gptpipe.documents for what a document is.

(Not named tokenize.py: run as a script, that name would shadow the standard library's
tokenize module.)
"""

import logging
from collections.abc import Sequence

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.corpus import tokenize_corpus
from gptpipe.params import load_params

log = logging.getLogger("tokenize")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--corpus", default="data/raw",
                        help="the download stage's folder (sources.json), or one text, JSON-lines or Parquet file")
    parser.add_argument("--out", default="data/tokens", help="directory for <split>.bin and meta.json")
    parser.add_argument("--workers", type=cli.positive_int, default=cli.available_cpus(),
                        help="encoding processes, at least 1 (the ids do not depend on it)")
    args = parser.parse_args(argv)
    data = load_params(args.params).data

    meta = tokenize_corpus(args.corpus, args.out, data.train_ratio, data.test_ratio, text_field=data.text_field,
                           bad_rows=data.bad_rows, workers=args.workers)
    skipped = f", {meta['skipped_rows']:,} row(s) without text skipped" if meta["skipped_rows"] else ""
    log.info(f"{meta['documents']:,} document(s), split by {meta['split']['by']}{skipped}")
    for split, info in meta["splits"].items():
        log.info(f"{split}: {info['characters']:,} characters, {info['tokens']:,} tokens")


if __name__ == "__main__":
    cli.run(main)
