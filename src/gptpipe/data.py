"""Token files on disk and the sliding windows the model trains on.

A split is a flat array of uint16 token ids (GPT-2's 50,257 ids fit), readable with
numpy.memmap, so a window is a slice of the file, never a copy held per window.
"""

import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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


def split_text(text: str, train_ratio: float) -> tuple[str, str]:
    """Split by characters at int(train_ratio * len(text)), as the book does."""
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]


class TokenWindows(Dataset):
    """Input/target pairs of `context_length` tokens, one starting every `stride` tokens.

    The target is the input shifted by one token. Items are views into `tokens`. When
    `tokens` is a memory-mapped file, the pages read are released from this process every
    `release_every` windows, so its resident memory does not grow with the corpus.
    """

    release_every = 256  # shuffled reads touch pages everywhere: each maps 64 KiB around it

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int):
        self.tokens = tokens
        self.context_length = context_length
        self.starts = range(0, len(tokens) - context_length, stride)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        self.reads += 1
        if self.reads % self.release_every == 0:
            release_pages(self.tokens)
        start = self.starts[i]
        end = start + self.context_length
        return self.tokens[start:end], self.tokens[start + 1:end + 1]


def release_pages(tokens: np.ndarray) -> None:
    """Drop the pages of a memory-mapped token file from this process's resident set. The
    kernel keeps them in its page cache, so reading them again costs a page fault, not I/O;
    the mapping is read-only, so nothing is lost."""
    mapping = getattr(tokens, "_mmap", None)  # where np.memmap (and its slices) keep the mmap
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def first_windows(tokens: np.ndarray, context_length: int, stride: int, n_windows: int) -> np.ndarray:
    """The shortest prefix of `tokens` that holds the first `n_windows` windows (all, if fewer)."""
    return tokens[:(n_windows - 1) * stride + context_length + 1] if n_windows >= 1 else tokens[:0]


def collate_windows(batch: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*batch)
    return (torch.from_numpy(np.stack(inputs).astype(np.int64)),
            torch.from_numpy(np.stack(targets).astype(np.int64)))


def window_loader(tokens: np.ndarray, context_length: int, stride: int, batch_size: int,
                  shuffle: bool, drop_last: bool, pin_memory: bool = False) -> DataLoader:
    """Batches of windows. Shuffling draws from torch's global RNG, as the book's loader does,
    so `torch.manual_seed` fixes the order. `pin_memory` (for CUDA) lets batches be copied to
    the GPU while it computes."""
    return DataLoader(TokenWindows(tokens, context_length, stride), batch_size=batch_size,
                      shuffle=shuffle, drop_last=drop_last, collate_fn=collate_windows,
                      pin_memory=pin_memory)


def require_windows(n_tokens: int, context_length: int, split: str) -> None:
    """The book's sanity check, as an error: a split must hold at least one full window."""
    if n_tokens <= context_length:
        raise PipelineError(
            f"the {split} split has {n_tokens} tokens, too few for one window of "
            f"model.context_length={context_length} (+1 for the target): lower model.context_length, "
            f"change data.train_ratio (or data.test_ratio) so the {split} split gets more text, or use "
            f"a larger corpus")
