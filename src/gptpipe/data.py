"""The sliding windows the model trains on, batched by torch's DataLoader.

A window is a slice of a token file mapped into memory (gptpipe.tokens), never a copy held
per window.
"""

import mmap

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptpipe.errors import PipelineError


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
