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
        array = np.asarray(ids)
        if array.size and int(array.max()) > np.iinfo(TOKEN_DTYPE).max:
            raise PipelineError(f"token id {int(array.max())} does not fit in {np.dtype(TOKEN_DTYPE).name}")
        self.file.write(array.astype(TOKEN_DTYPE).tobytes())
        self.count += int(array.size)


@contextmanager
def token_writer(path: str | Path) -> Iterator[TokenWriter]:
    """A token file written piece by piece, in place at `path` only once the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        yield TokenWriter(file)


def read_tokens(path: str | Path) -> np.ndarray:
    """Map a token file into memory without reading it (an empty file gives an empty array)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"token file {path} not found: run the tokenize stage first (dvc repro tokenize)")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def read_meta(tokens_dir: str | Path) -> dict[str, Any]:
    """The meta.json the tokenize stage wrote into `tokens_dir`."""
    path = Path(tokens_dir) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the tokenize stage first (dvc repro tokenize)") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e}): run the tokenize stage again") from e
