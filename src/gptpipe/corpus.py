"""The corpus, streamed: its documents, the splits, and their GPT-2 token ids, encoded on all
cores without ever holding the whole text or all the ids.

The corpus is the download stage's folder (its manifest, gptpipe.sources) or one corpus file;
its documents come from gptpipe.documents (a file of text, or a row). The splits are
contiguous, in the order train | val | test:

- a corpus of one document (the book's story) is split by characters, as the book does: train
  is the first int(train_ratio × N) of its N characters; test (only when test_ratio > 0) starts
  at int((1 - test_ratio) × N); val is what lies between.
- several documents: each goes whole to the split in whose character range (as above, over the
  documents' characters in order) it starts.
- with data.val_url, its documents are the val split, and data.url's are train | test by
  test_ratio, by the same rules.

A split of one document is encoded as if its text were encoded in one call (the book's ids).
With several documents, each is encode_ordinary(document) followed by <|endoftext|>, as nanoGPT
lays out its corpora: a literal <|endoftext|> in a document is text, never a boundary. Text is
encoded in chunks cut only where GPT-2's pre-tokenizer cannot join across the cut (SAFE_CUT),
so chunking never changes an id.

Two passes, both in the encoding processes: the scan (each file checked and its documents'
lengths counted, a file per task), then the encoding. The documents of a Parquet file of several
documents are read by the encoding process that encodes them, a few row groups per task; those
of any other file are read by the stage's process and handed over in chunks. The stage's
process writes the ids in order.
"""

import re
import signal
import threading
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptpipe.cli import available_cpus
from gptpipe.documents import BadRows, RowRules, document_blocks, parquet_documents
from gptpipe.download import hash_local
from gptpipe.errors import PipelineError
from gptpipe.files import write_json, written_together
from gptpipe.sources import CorpusFile, file_format, read_manifest
from gptpipe.tokenizer import END_OF_TEXT, gpt2_encoding
from gptpipe.tokens import TOKEN_DTYPE, token_ids, token_writer

CHUNK_CHARS = 1 << 20
# An encoding process that reads row groups holds a task's text and ids whole: a Parquet file
# with a row group larger (in characters) is read by the stage's process, in pieces.
MAX_ROW_GROUP_CHARS = 1 << 23

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


def cut_chunks(text: str, chunk_chars: int) -> tuple[list[str], str]:
    """`text` cut at SAFE_CUT into chunks of at least `chunk_chars` characters, and the rest."""
    chunks, start = [], 0
    while (cut := SAFE_CUT.search(text, start + chunk_chars)) is not None:
        chunks.append(text[start:cut.start()])
        start = cut.start()
    return chunks, text[start:]


def corpus_files(corpus: Path) -> list[tuple[CorpusFile, Path]]:
    """Each file of the corpus and where its bytes are on this machine: the files of the download
    stage's manifest when `corpus` is its folder (a Hub file is fetched into huggingface_hub's
    cache if it is not there), else `corpus` itself, a corpus file of any format."""
    if not corpus.exists():
        raise PipelineError(f"corpus {corpus} not found: run the download stage first (dvc repro download)")
    if not corpus.is_dir():
        return [(CorpusFile(str(corpus), str(corpus), None, corpus.stat().st_size, ""), corpus)]
    located = []
    for file in read_manifest(corpus):
        if file.hub is not None:
            from gptpipe.hub import dataset_file  # huggingface_hub is imported only for Hub files
            path = dataset_file(file.hub["repo"], file.hub["commit"], file.hub["path"], "data.url")
        else:
            path = corpus / file.stored if file.stored else Path(file.local)
        located.append((file, path))
    return located


@dataclass
class Stream:
    """The documents of data.url (`val` False) or of data.val_url (`val` True) and how they are
    split: `names` are the splits in order, `bounds` where each begins, in documents when
    `by_documents`, else in characters of the stream's one document."""
    val: bool
    lengths: array  # the characters of each document
    names: list[str] | None = None
    bounds: list[int] | None = None
    by_documents: bool = True
    has_text: bool = False  # some character that is not white space

    def split_at(self, position: int) -> int:
        """The index in `names` of the split holding document (or character) `position`."""
        return bisect_right(self.bounds, position) - 1

    def parts(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(split index, start, stop) for the parts of the documents (or characters) from `start`
        to `end` that lie in one split each, in order."""
        while start < end:
            k = self.split_at(start)
            stop = min(end, self.bounds[k + 1]) if k + 1 < len(self.bounds) else end
            yield k, start, stop
            start = stop


@dataclass
class FileScan:
    """What the scan finds in one file: its documents' characters, whether any holds text that is
    not white space, the rows it skipped (data.bad_rows: skip), and in a Parquet file, for each
    row group that holds documents, how many and their characters."""
    lengths: array
    has_text: bool
    skipped: int
    row_groups: dict[int, tuple[int, int]] | None = None


def scan_file(file: CorpusFile, path: Path, rules: RowRules) -> FileScan:
    """One file checked against the SHA-256 the manifest records, and scanned."""
    if file.sha256 and hash_local(path, file.name)[0] != file.sha256:
        if file.hub is not None:
            from gptpipe.hub import cache_fix
            raise PipelineError(f"{file.name} in the Hugging Face cache does not have the sha256 the download "
                                f"stage recorded ({file.sha256}; the Hub's, for a Git LFS file): it is damaged; "
                                f"{cache_fix(path)}")
        cause = "changed since" if file.local else "is not the file"
        raise PipelineError(f"{file.name} {cause} the download stage recorded it (sha256 {file.sha256}): "
                            f"run the download stage again (dvc repro -f download), then the pipeline")
    rules = RowRules(rules.text_field, rules.bad_rows)  # counts this file's skipped rows
    lengths, has_text = array("q"), False
    if file_format(file.name)[0] == "parquet":
        row_groups: dict[int, tuple[int, int]] = {}
        for group, texts in parquet_documents(path, file.name, rules):
            if texts:
                sizes = [len(text) for text in texts]
                lengths.extend(sizes)
                has_text = has_text or not all(map(str.isspace, texts))
                documents, characters = row_groups.get(group, (0, 0))
                row_groups[group] = (documents + len(sizes), characters + sum(sizes))
        return FileScan(lengths, has_text, rules.skipped, row_groups)
    for starts, text in document_blocks(path, file.name, rules):
        if starts:
            lengths.append(0)
        lengths[-1] += len(text)
        has_text = has_text or not text.isspace()
    return FileScan(lengths, has_text, rules.skipped)


@dataclass
class FileDocuments:
    """Where a file's documents are: the index of its first in its stream, and in a Parquet file
    its row groups that hold documents (FileScan.row_groups)."""
    first: int
    row_groups: dict[int, tuple[int, int]] | None


def scan(files: Sequence[tuple[CorpusFile, Path]], rules: RowRules, pool: ProcessPoolExecutor | None = None,
         window: int = 1) -> tuple[dict[bool, Stream], list[FileDocuments]]:
    """One pass over the corpus, a file per task in `pool` (or here): each file checked, the
    characters of every document, per stream, and each file's documents; the skipped rows are
    counted in `rules`."""
    streams = {val: Stream(val, array("q")) for val in (False, True)}
    tasks = ((scan_file, (file, path, rules)) for file, path in files)
    held = []
    for (file, _), found in zip(files, in_order(pool, tasks, window)):
        stream = streams[file.split == "val"]
        held.append(FileDocuments(len(stream.lengths), found.row_groups))
        stream.lengths.extend(found.lengths)
        stream.has_text = stream.has_text or found.has_text
        rules.skipped += found.skipped
    return streams, held


def plan(streams: dict[bool, Stream], train_ratio: float, test_ratio: float) -> list[str]:
    """Set each stream's splits (see the module's docstring); the names of all splits, in order."""
    main, val = streams[False], streams[True]
    for stream, key in ((main, "data.url"), (val, "data.val_url")):
        if (stream.lengths or not stream.val) and not stream.has_text:
            raise PipelineError(f"{key} holds no text (its files or rows are empty or white space): check {key}")
    if val.lengths:
        main.names, ratios = (["train", "test"], [1 - test_ratio]) if test_ratio > 0 else (["train"], [])
        val.names, val.bounds, val.by_documents = ["val"], [0], len(val.lengths) > 1
    else:
        main.names = ["train", "val", "test"] if test_ratio > 0 else ["train", "val"]
        ratios = [train_ratio, 1 - test_ratio] if test_ratio > 0 else [train_ratio]
    lengths = np.frombuffer(main.lengths, dtype=np.int64)
    n = int(lengths.sum())
    cuts = [int(ratio * n) for ratio in ratios]
    if len(lengths) == 1:
        main.by_documents, main.bounds = False, [0, *cuts]
    else:
        # The first document of each split: the first to start at or after its cut.
        starts = np.cumsum(lengths) - lengths
        main.bounds = [0, *np.searchsorted(starts, cuts, side="left").tolist()]
        edges = [*main.bounds, len(lengths)]
        for k, name in enumerate(main.names):
            if edges[k + 1] <= edges[k]:
                share = [0.0, *ratios, 1.0]
                raise PipelineError(
                    f"the {name} split gets no document: of the {len(lengths)} documents, each goes whole to the "
                    f"split where it starts, and none starts in the {name} part of the text ({share[k]:.1%} to "
                    f"{share[k + 1]:.1%} of the characters). Change data.train_ratio or data.test_ratio, or use "
                    f"more documents")
    return [*main.names[:1], *(["val"] if val.lengths else []), *main.names[1:]]


def segments(file: CorpusFile, path: Path, stream: Stream, first: int,
             rules: RowRules) -> Iterator[tuple[tuple, str, bool, str]]:
    """(segment, split name, whether it ends with <|endoftext|>, text) for a file whose first
    document is document `first` of `stream`, in order. A segment is the text encoded as one: a
    document, or the part of a one-document stream in one split."""
    document, offset = first - 1, 0  # offset: characters into the current document
    for starts, text in document_blocks(path, file.name, rules):
        if starts:
            document += 1
            offset = 0
        if stream.by_documents:
            yield (stream.val, document), stream.names[stream.split_at(document)], True, text
            continue
        for k, start, stop in stream.parts(offset, offset + len(text)):  # the text in each split
            yield (stream.val, k), stream.names[k], False, text[start - offset:stop - offset]
        offset += len(text)


def pieces(segments: Iterable[tuple[tuple, str, bool, str]],
           chunk_chars: int) -> Iterator[tuple[str, list[str], list[bool]]]:
    """Work for the encoders: (split, texts, whether each ends with <|endoftext|>), each about
    `chunk_chars` characters or a split's last; a segment is cut only at SAFE_CUT."""
    split, texts, ends, size = None, [], [], 0
    current, pending, eot = None, "", False

    def finish(text: str, ends_segment: bool) -> Iterator[tuple[str, list[str], list[bool]]]:
        nonlocal texts, ends, size
        if not text and not ends_segment:
            return
        texts.append(text)
        ends.append(ends_segment)
        size += len(text)
        if size >= chunk_chars:
            yield split, texts, ends
            texts, ends, size = [], [], 0

    for segment, name, segment_eot, text in segments:
        if segment != current:
            if current is not None:
                yield from finish(pending, eot)
            if name != split and texts:
                yield split, texts, ends
                texts, ends, size = [], [], 0
            current, split, eot, pending = segment, name, segment_eot, ""
        chunks, pending = cut_chunks(pending + text, chunk_chars)
        for chunk in chunks:
            yield from finish(chunk, False)
    if current is not None:
        yield from finish(pending, eot)
    if texts:
        yield split, texts, ends


def encode_texts(texts: Sequence[str], ends: Sequence[bool]) -> tuple[np.ndarray, int]:
    """The ids of `texts` in order, each encoded as ordinary text (a literal <|endoftext|> is
    text), followed by the <|endoftext|> id where `ends` says so; and the bytes the ids stand
    for: the texts' UTF-8 and <|endoftext|>'s 13 each (tokenizer.token_byte_lengths)."""
    encoding = gpt2_encoding()
    eot = np.array([encoding.eot_token], dtype=np.uint32)
    to_numpy = getattr(encoding, "encode_to_numpy", None)  # tiktoken >= 0.9 builds it without a Python list
    parts = []
    for text, end in zip(texts, ends):
        if to_numpy is not None:
            parts.append(to_numpy(text, allowed_special=set(), disallowed_special=()))
        else:
            parts.append(np.array(encoding.encode_ordinary(text), dtype=np.uint32))
        if end:
            parts.append(eot)
    ids = token_ids(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32))
    n_bytes = sum(len(text.encode("utf-8")) for text in texts) + sum(ends) * len(END_OF_TEXT.encode())
    return ids, n_bytes


Encoded = list[tuple[str, np.ndarray, int, int]]  # (split, its ids, the bytes they stand for, characters)


def encode_piece(split: str, texts: Sequence[str], ends: Sequence[bool]) -> Encoded:
    """A piece of pieces(), encoded."""
    return [(split, *encode_texts(texts, ends), sum(map(len, texts)))]


def encode_row_groups(path: Path, name: str, rules: RowRules, row_groups: list[int],
                      splits: list[tuple[str, int]]) -> Encoded:
    """The documents of `row_groups` of a Parquet file, read here, each encoded and followed by
    <|endoftext|> (encode_texts): `splits` names the split of each, in order, as (split, how many
    documents go to it)."""
    texts = (text for _, batch in parquet_documents(path, name, rules, row_groups) for text in batch)
    encoded = []
    for split, count in splits:
        encoded += encode_piece(split, list(islice(texts, count)), [True] * count)
    return encoded


def row_group_tasks(row_groups: dict[int, tuple[int, int]], chunk_chars: int) -> Iterator[list[int]]:
    """Consecutive row groups (FileScan.row_groups) of at least `chunk_chars` characters, or the file's last."""
    task, characters = [], 0
    for group, (_, group_characters) in row_groups.items():
        task.append(group)
        characters += group_characters
        if characters >= chunk_chars:
            yield task
            task, characters = [], 0
    if task:
        yield task


def encoding_tasks(files: Sequence[tuple[CorpusFile, Path]], held: Sequence[FileDocuments],
                   streams: dict[bool, Stream], rules: RowRules,
                   chunk_chars: int) -> Iterator[tuple[Callable[..., Encoded], tuple]]:
    """The encoding work, in corpus order, as in_order's tasks. A Parquet file of a stream of
    several documents is read by the encoding processes, a few row groups per task, and this
    process only writes the ids they hand back; any other file is read here and handed over in
    pieces (so is a Parquet file with a row group over MAX_ROW_GROUP_CHARS characters)."""
    here: list[tuple[CorpusFile, Path, FileDocuments]] = []  # files to read here, in order

    def pieces_here() -> Iterator[tuple[Callable[..., Encoded], tuple]]:
        blocks = chain.from_iterable(segments(file, path, streams[file.split == "val"], documents.first, rules)
                                     for file, path, documents in here)
        for piece in pieces(blocks, chunk_chars):
            yield encode_piece, piece
        here.clear()

    for (file, path), documents in zip(files, held):
        stream, groups = streams[file.split == "val"], documents.row_groups
        if not (stream.by_documents and groups and max(c for _, c in groups.values()) <= MAX_ROW_GROUP_CHARS):
            here.append((file, path, documents))
            continue
        yield from pieces_here()
        first = documents.first
        for task in row_group_tasks(groups, chunk_chars):
            count = sum(groups[group][0] for group in task)
            splits = [(stream.names[k], stop - start) for k, start, stop in stream.parts(first, first + count)]
            yield encode_row_groups, (path, file.name, rules, task, splits)
            first += count
    yield from pieces_here()


@contextmanager
def encoding_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes for the scan and the encoding, or None for 1 (all in this process).
    Processes, not threads: on 2 cores, threads reached 1.5x one thread's speed and processes
    1.8-2.2x (tiktoken keeps the GIL for part of each call)."""
    if workers == 1:
        yield None
        return
    gpt2_encoding()  # loaded once here: forked workers inherit it
    pool = ProcessPoolExecutor(max_workers=workers, initializer=worker_signals)
    try:
        # The first submit forks every worker. A signal handler that raised in fork's at-fork
        # hooks would be printed and lost there ("Exception ignored"): hold signals until done.
        with signals_held(), suppress(BrokenProcessPool):
            pool.submit(int)
        yield pool
    except BrokenProcessPool as e:
        raise PipelineError("an encoding process of the tokenize stage ended abruptly (killed, or out of "
                            "memory?): run the stage again, with fewer --workers if memory is short") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # also on Ctrl-C or SIGTERM: no process outlives the stage


def in_order(pool: ProcessPoolExecutor | None, tasks: Iterable[tuple[Callable[..., Any], tuple]],
             window: int) -> Iterator[Any]:
    """function(*args) for each (function, args) of `tasks`, in order, computed in `pool` with at
    most `window` tasks in flight, or here when `pool` is None. (Unlike tiktoken's encode_batch,
    which takes every text at once: the memory held does not grow with the corpus.)"""
    if pool is None:
        for function, args in tasks:
            yield function(*args)
        return
    in_flight: deque = deque()
    for function, args in tasks:
        in_flight.append(pool.submit(function, *args))
        if len(in_flight) >= window:
            yield in_flight.popleft().result()
    for result in in_flight:
        yield result.result()


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
                    *, text_field: str = "text", bad_rows: BadRows = "error", workers: int | None = None,
                    chunk_chars: int = CHUNK_CHARS) -> dict[str, Any]:
    """Write <split>.bin (flat token ids, see tokens.read_tokens) for train, val and, when
    test_ratio > 0, test, then meta.json, into `out_dir`; return the meta. `corpus` is the
    download stage's folder or one corpus file; `text_field` and `bad_rows` are gptpipe.documents'
    RowRules."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    files = corpus_files(corpus)
    rules = RowRules(text_field, bad_rows)
    encoding = gpt2_encoding()
    if any(file_format(file.name)[0] == "parquet" for file, _ in files):
        # before the encoding processes fork, which then share its modules (imported in each, ~30 MB apiece)
        import pyarrow.parquet  # noqa: F401
    with written_together(), ExitStack() as stack:  # the token files and meta.json land together
        # one pool for both passes: on an error its processes stop when the block unwinds
        workers = workers or available_cpus()
        pool = stack.enter_context(encoding_pool(workers))
        streams, held = scan(files, rules, pool, window=2 * workers)
        names = plan(streams, train_ratio, test_ratio)
        counts = {name: {"documents": 0, "characters": 0, "bytes": 0} for name in names}
        for stream in streams.values():
            if not stream.lengths:
                continue
            lengths = np.frombuffer(stream.lengths, dtype=np.int64)
            edges = [*stream.bounds, len(lengths) if stream.by_documents else int(lengths.sum())]
            for k, name in enumerate(stream.names):
                counts[name]["documents"] = edges[k + 1] - edges[k] if stream.by_documents else 1
                counts[name]["characters"] = int(lengths[edges[k]:edges[k + 1]].sum()) if stream.by_documents \
                    else edges[k + 1] - edges[k]
        writers = {name: stack.enter_context(token_writer(out_dir / f"{name}.bin")) for name in names}
        bar = stack.enter_context(tqdm(total=sum(c["characters"] for c in counts.values()), unit="char",
                                       unit_scale=True, desc="tokenize", leave=False))
        tasks = encoding_tasks(files, held, streams, RowRules(text_field, bad_rows), chunk_chars)
        for encoded in in_order(pool, tasks, 2 * workers):
            for split, ids, n_bytes, characters in encoded:
                writers[split].write(ids)
                counts[split]["bytes"] += n_bytes
                bar.update(characters)
        meta = {
            "tokenizer": "gpt2",
            "vocab_size": encoding.n_vocab,
            "dtype": TOKEN_DTYPE.__name__,
            "split": {"by": "documents" if streams[False].by_documents else "characters",
                      "train_ratio": None if streams[True].lengths else train_ratio, "test_ratio": test_ratio,
                      "val": "data.val_url" if streams[True].lengths else "data.url"},
            "documents": sum(len(s.lengths) for s in streams.values()),
            "skipped_rows": rules.skipped,
            "characters": sum(c["characters"] for c in counts.values()),
            "bytes": sum(file.bytes for file, _ in files),
            "sources": [{"name": file.name, "sha256": file.sha256, "bytes": file.bytes} for file, _ in files],
            "splits": {name: {"file": f"{name}.bin", **counts[name], "tokens": writers[name].count}
                       for name in names},
        }
        write_json(out_dir / "meta.json", meta)
    if "test" not in names:
        (out_dir / "test.bin").unlink(missing_ok=True)  # left by an earlier run with a test split
    return meta
