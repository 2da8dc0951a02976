"""The corpus, streamed: where its documents and splits lie, and its GPT-2 token ids, encoded
on all cores without ever holding the whole text or all the ids.

data/raw/corpus.txt is UTF-8 text: one document, or several joined by <|endoftext|>. The
splits are contiguous, in the order train | val | test, over the N characters:

- one document: split by characters, as the book does. train is the first
  int(train_ratio × N) characters; test (only when test_ratio > 0) starts at
  int((1 - test_ratio) × N); val is what lies between.
- several documents: each document goes whole to the split in whose character range (as
  above) it starts; the <|endoftext|> between two splits belongs to neither.

Each split is encoded on its own, as if its text were encoded in one call: the text is read
in blocks and encoded in chunks cut only where GPT-2's pre-tokenizer cannot join across the
cut (SAFE_CUT), so chunking never changes an id.
"""

import codecs
import hashlib
import os
import re
import signal
import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptpipe.errors import PipelineError
from gptpipe.files import write_json, written_together
from gptpipe.tokenizer import END_OF_TEXT, encode, gpt2_encoding
from gptpipe.tokens import TOKEN_DTYPE, token_writer

READ_BYTES = 1 << 20
CHUNK_CHARS = 1 << 20

# Where a chunk may end. GPT-2's pre-tokenizer pattern (tiktoken's, for "gpt2"):
#   '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
# A piece that holds a space character holds only spaces, or is one leading " " before
# non-space characters. So between a non-space and a space character every piece ends, and
# no match before the cut looks past it (the lookahead (?!\S) and $ follow space runs, which
# end before the non-space); from the cut on, matching depends only on the text after it.
# Cutting after a newline is NOT safe by itself: "a \n\nb" is pieces " \n", "\n" whole, but
# " \n\n" (one BPE merge more) when a chunk ends after the second newline.
# [ \t\n\r] are space to Python and to tiktoken's regex alike; Python's \S (not str.isspace)
# is the stricter non-space: Unicode's White_Space, tiktoken's \s, is a subset of isspace.
SAFE_CUT = re.compile(r"(?<=\S)[ \t\n\r]")


@dataclass(frozen=True)
class CorpusScan:
    sha256: str
    bytes: int
    characters: int
    document_starts: np.ndarray  # the character offset at which each document begins; [0] first


@dataclass(frozen=True)
class Split:
    name: str
    start: int  # its characters are the corpus's [start, end)
    end: int
    documents: int  # documents wholly or partly in it


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def text_blocks(path: Path) -> Iterator[tuple[bytes, str]]:
    """The raw bytes of `path` and their text, block by block; a character cut by a block
    boundary is decoded with the next block. Ends with an empty block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PipelineError(f"corpus {path} not found: run the download stage first (dvc repro download)")
    with f:
        while True:
            raw = f.read(READ_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise PipelineError(f"{path} is not UTF-8 ({e.reason} near byte {offset + e.start}); "
                                    f"convert it, e.g. `iconv -f latin1 -t utf-8`, and point data.url "
                                    f"at the result") from e
            yield raw, text
            if not raw:
                return
            offset += len(raw)


def scan_corpus(path: str | Path) -> CorpusScan:
    """One pass over the corpus: its SHA-256, size, and where its documents begin."""
    path = Path(path)
    digest = hashlib.sha256()
    n_bytes = n_chars = 0
    starts = array("q", [0])
    tail = ""  # the end of the text before this block, where a separator may begin
    has_text = False
    for raw, text in text_blocks(path):
        digest.update(raw)
        n_bytes += len(raw)
        window = tail + text
        window_start = n_chars - len(tail)
        found = window.find(END_OF_TEXT)
        while found >= 0:
            starts.append(window_start + found + len(END_OF_TEXT))
            found = window.find(END_OF_TEXT, found + len(END_OF_TEXT))
        has_text = has_text or (text != "" and not text.isspace())
        n_chars += len(text)
        tail = window[-(len(END_OF_TEXT) - 1):]
    if not has_text:
        raise PipelineError(f"{path} is empty: check data.url")
    return CorpusScan(digest.hexdigest(), n_bytes, n_chars, np.frombuffer(starts, dtype=np.int64))


def plan_splits(scan: CorpusScan, train_ratio: float, test_ratio: float = 0.0) -> list[Split]:
    """The character range of each split (see the module's docstring)."""
    names = ["train", "val", "test"] if test_ratio > 0 else ["train", "val"]
    n = scan.characters
    cuts = [int(train_ratio * n), int((1 - test_ratio) * n)] if test_ratio > 0 else [int(train_ratio * n)]
    starts = scan.document_starts
    if len(starts) == 1:
        bounds = [0, *cuts, n]
        return [Split(name, a, b, 1) for name, a, b in zip(names, bounds, bounds[1:])]
    # The index of the first document of each split: the first to start at or after its cut.
    firsts = [0, *(int(i) for i in np.searchsorted(starts, cuts, side="left")), len(starts)]
    ratios = [0.0, *(c / n for c in cuts), 1.0]
    splits = []
    for k, name in enumerate(names):
        first, stop = firsts[k], firsts[k + 1]
        if stop <= first:
            raise PipelineError(
                f"the {name} split gets no document: of the corpus's {len(starts)} documents (joined "
                f"by <|endoftext|>), each goes whole to the split where it starts, and none starts in "
                f"the {name} part of the text ({ratios[k]:.1%} to {ratios[k + 1]:.1%} of the "
                f"characters). Change data.train_ratio or data.test_ratio, or use more documents")
        end = int(starts[stop]) - len(END_OF_TEXT) if stop < len(starts) else n
        splits.append(Split(name, int(starts[first]), end, stop - first))
    return splits


def cut_chunks(text: str, chunk_chars: int) -> tuple[list[str], str]:
    """`text` cut at SAFE_CUT into chunks of at least `chunk_chars` characters, and the rest."""
    chunks, start = [], 0
    while (cut := SAFE_CUT.search(text, start + chunk_chars)) is not None:
        chunks.append(text[start:cut.start()])
        start = cut.start()
    return chunks, text[start:]


def split_pieces(path: str | Path, splits: Sequence[Split],
                 chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[int, str]]:
    """(split index, text) in corpus order: each split's text in chunks (see cut_chunks), the
    last one of each split possibly shorter; text outside every split is left out.

    Holds about two chunks at a time, more only where text runs on without a SAFE_CUT."""
    k = 0
    pending = ""
    offset = 0  # of this block's first character in the corpus
    for _, text in text_blocks(Path(path)):
        end = offset + len(text)
        while k < len(splits):
            lo, hi = max(splits[k].start, offset), min(splits[k].end, end)
            if lo < hi:
                pending += text[lo - offset:hi - offset]
            if splits[k].end > end:
                break  # the split goes on in the next block
            chunks, rest = cut_chunks(pending, chunk_chars)
            yield from ((k, chunk) for chunk in chunks)
            if rest:
                yield k, rest
            pending = ""
            k += 1
        chunks, pending = cut_chunks(pending, chunk_chars)
        yield from ((k, chunk) for chunk in chunks)
        offset = end


def encode_ids(text: str) -> np.ndarray:
    """tokenizer.encode's ids as an array (tiktoken >= 0.9 builds it without a Python list)."""
    encoding = gpt2_encoding()
    if hasattr(encoding, "encode_to_numpy"):
        return encoding.encode_to_numpy(text, allowed_special={END_OF_TEXT})
    return np.array(encode(text), dtype=np.uint32)


def encode_pieces(pieces: Iterable[tuple[int, str]], workers: int) -> Iterator[tuple[int, str, np.ndarray]]:
    """(key, text, ids) for each (key, text), in order, encoded in `workers` processes. Unlike
    tiktoken's encode_batch, which takes every text at once, at most 2 × workers pieces are in
    flight. Processes, not threads: on 2 cores, threads reached 1.5× one thread's speed and
    processes 1.8-2.2× (tiktoken keeps the GIL for part of each call)."""
    if workers == 1:
        for key, text in pieces:
            yield key, text, encode_ids(text)
        return
    gpt2_encoding()  # loaded once here: forked workers inherit it
    pool = ProcessPoolExecutor(max_workers=workers, initializer=worker_signals)
    try:
        # The first submit forks every worker. A signal handler that raised in fork's at-fork
        # hooks would be printed and lost there ("Exception ignored"): hold signals until done.
        with signals_held(), suppress(BrokenProcessPool):
            pool.submit(int)
        in_flight: deque = deque()
        for key, text in pieces:
            in_flight.append((key, text, pool.submit(encode_ids, text)))
            if len(in_flight) >= 2 * workers:
                done_key, done_text, done_ids = in_flight.popleft()
                yield done_key, done_text, done_ids.result()
        for done_key, done_text, done_ids in in_flight:
            yield done_key, done_text, done_ids.result()
    except BrokenProcessPool as e:
        raise PipelineError("an encoding process of the tokenize stage ended abruptly (killed, or out of "
                            "memory?): run the stage again, with fewer --workers if memory is short") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # also on Ctrl-C or SIGTERM: no process outlives the stage


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are acted on when it ends. (Blocking them in
    this thread would not do: another thread, tqdm's monitor, may receive them, and Python then
    runs the handler in this thread all the same.)"""
    if threading.current_thread() is not threading.main_thread():  # only it handles signals
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


def worker_signals() -> None:
    """In an encoding process: Ctrl-C reaches the whole process group, and the stage stops its
    workers itself; SIGTERM ends a worker at once (it holds no file), not as the stage's handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def tokenize_corpus(corpus: str | Path, out_dir: str | Path, train_ratio: float, test_ratio: float = 0.0,
                    *, workers: int | None = None, chunk_chars: int = CHUNK_CHARS) -> dict[str, Any]:
    """Write <split>.bin (flat token ids, see tokens.read_tokens) for train, val and, when
    test_ratio > 0, test, then meta.json, into `out_dir`; return the meta."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    scan = scan_corpus(corpus)
    splits = plan_splits(scan, train_ratio, test_ratio)
    n_bytes = [0] * len(splits)
    with written_together(), ExitStack() as stack:  # the token files and meta.json land together
        writers = [stack.enter_context(token_writer(out_dir / f"{split.name}.bin")) for split in splits]
        bar = stack.enter_context(tqdm(total=scan.bytes, unit="B", unit_scale=True, desc="tokenize", leave=False))
        pieces = split_pieces(corpus, splits, chunk_chars)
        # closing: on an error the encoding processes stop now, not when the generator is collected
        encoded = stack.enter_context(closing(encode_pieces(pieces, workers or available_cores())))
        for k, text, ids in encoded:
            writers[k].write(ids)
            size = len(text.encode("utf-8"))
            n_bytes[k] += size
            bar.update(size)
        meta = {
            "source_sha256": scan.sha256,
            "tokenizer": "gpt2",
            "vocab_size": gpt2_encoding().n_vocab,
            "dtype": TOKEN_DTYPE.__name__,
            "split": {"by": "characters" if len(scan.document_starts) == 1 else "documents",
                      "train_ratio": train_ratio, "test_ratio": test_ratio},
            "documents": len(scan.document_starts),
            "characters": scan.characters,
            "bytes": scan.bytes,
            "splits": {split.name: {"file": f"{split.name}.bin", "characters": split.end - split.start,
                                    "bytes": n_bytes[k], "documents": split.documents,
                                    "tokens": writers[k].count}
                       for k, split in enumerate(splits)},
        }
        write_json(out_dir / "meta.json", meta)
    if test_ratio == 0:
        (out_dir / "test.bin").unlink(missing_ok=True)  # left by an earlier run with a test split
    return meta
