"""Token files: a split is a flat array of uint16 token ids (GPT-2's 50,257 ids fit), written
piece by piece and atomically, read back with numpy.memmap without reading the file.
This module needs numpy only (no torch), so the tokenize stage starts fast.
"""

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path

TOKEN_DTYPE = np.uint16


def write_tokens(path: str | Path, ids: Sequence[int] | np.ndarray) -> int:
    with token_writer(path) as writer:
        writer.write(ids)
    return writer.count


class TokenWriter:
    """Appends token ids to an open token file."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.count = 0

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        array = token_ids(ids)
        self.file.write(array.tobytes())
        self.count += int(array.size)


def token_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """`ids` as an array of TOKEN_DTYPE; an id that does not fit is an error."""
    array = np.asarray(ids)
    if array.dtype == TOKEN_DTYPE:
        return array
    if array.size and int(array.max()) > np.iinfo(TOKEN_DTYPE).max:
        raise PipelineError(f"token id {int(array.max())} does not fit in {np.dtype(TOKEN_DTYPE).name}")
    return array.astype(TOKEN_DTYPE)


@contextmanager
def token_writer(path: str | Path) -> Iterator[TokenWriter]:
    """A token file written piece by piece, in place at `path` only once the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        yield TokenWriter(file)


RETOKENIZE = "run the tokenize stage again (dvc repro tokenize)"


def read_tokens(path: str | Path) -> np.ndarray:
    """Map a token file into memory without reading it (an empty file gives an empty array)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise PipelineError(f"token file {path} {what}: run the tokenize stage first (dvc repro tokenize)")
    size, itemsize = path.stat().st_size, np.dtype(TOKEN_DTYPE).itemsize
    if size % itemsize:
        raise PipelineError(f"token file {path} has {size:,} bytes, not a whole number of "
                            f"{itemsize}-byte token ids: it was cut short or is not a token file; {RETOKENIZE}")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def read_split(tokens_dir: str | Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """The token file of `split`, which must hold as many tokens as meta.json (`meta`) says."""
    path = Path(tokens_dir) / f"{split}.bin"
    tokens = read_tokens(path)
    expected = meta["splits"][split]["tokens"]
    if len(tokens) != expected:
        raise PipelineError(f"token file {path} holds {len(tokens):,} tokens, but its meta.json says "
                            f"{expected:,}: they come from different runs or the file was altered; {RETOKENIZE}")
    return tokens


def read_meta(tokens_dir: str | Path) -> dict[str, Any]:
    """The meta.json the tokenize stage wrote into `tokens_dir`, checked for what readers use:
    a train and a val split (and maybe test) with their token counts, the dtype, the vocabulary."""
    path = Path(tokens_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the tokenize stage first (dvc repro tokenize)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON ({e}): {RETOKENIZE}") from e
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not (isinstance(splits, dict) and {"train", "val"} <= set(splits) <= {"train", "val", "test"}
            and all(isinstance(info, dict) and type(info.get("tokens")) is int and info["tokens"] >= 0
                    for info in splits.values())):
        raise PipelineError(f"{path} is not a meta.json of the tokenize stage (it needs splits train, val "
                            f"and maybe test, each with its number of tokens): {RETOKENIZE}")
    if meta.get("dtype") != np.dtype(TOKEN_DTYPE).name or type(meta.get("vocab_size")) is not int:
        raise PipelineError(f"{path} describes tokens of dtype {meta.get('dtype')!r} and vocab_size "
                            f"{meta.get('vocab_size')!r}; this version reads {np.dtype(TOKEN_DTYPE).name} "
                            f"GPT-2 ids: {RETOKENIZE}")
    return meta


def require_vocab(meta: dict[str, Any], vocab_size: int, what: str, fix: str) -> None:
    """A model of `vocab_size` token ids (`what` names it) must cover every id the tokens may hold."""
    if vocab_size < meta["vocab_size"]:
        raise PipelineError(f"{what} is {vocab_size}, fewer than the {meta['vocab_size']:,} token ids of "
                            f"the tokens' tokenizer ({meta.get('tokenizer', 'unknown')}): {fix}")
