"""Stage tokenize: GPT-2 BPE token ids of the train and val splits, plus split metadata.

(Not named tokenize.py: run as a script, that name would shadow the standard library's
tokenize module, which torch imports.)
"""

import hashlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# Use the library next to this script, the copy dvc.yaml tracks, not an installed one:
# a queued experiment runs in its own copy of the repository.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptpipe import cli
from gptpipe.data import TOKEN_DTYPE, split_text, write_tokens
from gptpipe.errors import PipelineError
from gptpipe.files import write_json
from gptpipe.params import load_params
from gptpipe.tokenizer import encode, gpt2_encoding

log = logging.getLogger("tokenize")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--corpus", default="data/raw/corpus.txt", help="the UTF-8 text to tokenize")
    parser.add_argument("--out", default="data/tokens", help="directory for <split>.bin and meta.json")
    args = parser.parse_args(argv)
    data = load_params(args.params).data

    raw = Path(args.corpus).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{args.corpus} is not UTF-8 ({e}); convert it, e.g. "
                            f"`iconv -f latin1 -t utf-8`, and point data.url at the result") from e
    if not text.strip():
        raise PipelineError(f"{args.corpus} is empty: check data.url")

    out = Path(args.out)
    splits = {}
    for split, part in zip(("train", "val"), split_text(text, data.train_ratio)):
        n_tokens = write_tokens(out / f"{split}.bin", encode(part))
        splits[split] = {"file": f"{split}.bin", "characters": len(part), "tokens": n_tokens}
        log.info(f"{split}: {len(part):,} characters, {n_tokens:,} tokens")
    write_json(out / "meta.json", {
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "tokenizer": "gpt2",
        "vocab_size": gpt2_encoding().n_vocab,
        "dtype": TOKEN_DTYPE.__name__,
        "split": {"by": "characters", "train_ratio": data.train_ratio},
        "splits": splits,
    })


if __name__ == "__main__":
    cli.run(main)
