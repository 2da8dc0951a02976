"""Stage download: resolve data.url (and data.val_url) to verified files, and list them in
data/raw/sources.json for tokenize; files from http(s) URLs are stored next to it."""

import logging
from collections.abc import Sequence

import _library  # noqa: F401  (this checkout's library first)
from gptpipe import cli
from gptpipe.download import download
from gptpipe.params import load_params

log = logging.getLogger("download")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", default="data/raw", help="folder for sources.json and the fetched files")
    args = parser.parse_args(argv)
    data = load_params(args.params).data

    files = download(data.url, args.out, data.sha256, val_url=data.val_url, max_bytes=data.max_bytes)
    log.info(f"{len(files):,} file(s), {sum(f.bytes for f in files):,} bytes, listed in {args.out}/sources.json")


if __name__ == "__main__":
    cli.run(main)
