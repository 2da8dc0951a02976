"""Stage download: fetch the corpus named by data.url into data/raw/, checking data.sha256."""

import logging
from collections.abc import Sequence

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.download import download
from gptpipe.params import load_params

log = logging.getLogger("download")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", default="data/raw/corpus.txt", help="where to write the corpus")
    args = parser.parse_args(argv)
    data = load_params(args.params).data

    sha256 = download(data.url, args.out, data.sha256, max_bytes=data.max_bytes)
    log.info(f"wrote {args.out} (sha256 {sha256})")


if __name__ == "__main__":
    cli.run(main)
