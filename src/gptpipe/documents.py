"""The documents of a corpus file, streamed: a file of text is one document; each row of a
Parquet or JSON-lines file is one, its text in the field data.text_field names. Where a document
begins and ends comes from the file's structure, never from what its text says: a literal
<|endoftext|> in a document is text.

Parquet is read a few pages at a time (pyarrow), JSON lines line by line, text in blocks, so
no file is ever held whole. gzip and zstd (.gz, .zst) are decompressed as they are read.
"""

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, Literal

from gptpipe.errors import PipelineError
from gptpipe.sources import file_format

READ_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
MISSING = object()
BadRows = Literal["error", "skip"]


@dataclass
class RowRules:
    """How rows are read: the field that holds the text, and what a row without text text gets
    (`error`: the stage stops, naming the file and row; `skip`: the row is left out and counted)."""
    text_field: str = "text"
    bad_rows: BadRows = "error"
    skipped: int = 0

    def text_of(self, value: Any, name: str, row: int) -> str | None:
        """The row's text, or None for a row to skip."""
        if isinstance(value, str):
            return value
        what = ("has no field" if value is MISSING else "has null in the field" if value is None
                else f"has a {type(value).__name__}, not text, in the field")
        if self.bad_rows == "skip":
            self.skipped += 1
            return None
        raise PipelineError(f"{name} row {row} {what} {self.text_field!r}: set data.text_field to the field that "
                            f"holds the text, or data.bad_rows to skip to leave such rows out (they are counted "
                            f"in meta.json)")


def document_blocks(path: Path, name: str, rules: RowRules) -> Iterator[tuple[bool, str]]:
    """(starts a document, text) for the documents of the file at `path`, in order; `name` is the
    file as the user knows it, for messages. A document may come in several blocks (a long text
    file), never empty ones; an empty document (an empty file, an empty row) is left out."""
    kind, compression = file_format(name)
    if kind == "parquet":
        for _, texts in parquet_documents(path, name, rules):
            for text in texts:
                yield True, text
        return
    with opened(path, name, compression) as stream:
        if kind == "jsonl":
            for row, value in jsonl_rows(stream, name, rules.text_field):
                text = rules.text_of(value, name, row)
                if text:
                    yield True, text
        else:
            first = True
            for text in text_blocks(stream, name):
                if text:
                    yield first, text
                    first = False


@contextmanager
def opened(path: Path, name: str, compression: str | None) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed; a corrupt compressed file is one error naming it."""
    try:
        with open(path, "rb") as raw:
            if compression == "gzip":
                stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")
            elif compression == "zstd":
                import zstandard  # only for .zst files
                stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True),
                                           READ_BYTES)
            else:
                stream = raw
            yield stream
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise PipelineError(f"{name} is not a valid gzip file ({e or 'it ends early'}): download it again, or "
                            f"rename it if it is not compressed") from e
    except Exception as e:
        if type(e).__name__ != "ZstdError":
            raise
        raise PipelineError(f"{name} is not a valid zstd file ({e}): download it again, or rename it if it is "
                            f"not compressed") from e


def text_blocks(stream: BinaryIO, name: str) -> Iterator[str]:
    """The UTF-8 text of `stream` in blocks; a character cut by a block boundary is decoded with
    the next block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    while True:
        raw = stream.read(READ_BYTES)
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise PipelineError(f"{name} is not UTF-8 ({e.reason} near byte {offset + e.start}); convert it, e.g. "
                                f"`iconv -f latin1 -t utf-8`, and point data.url at the result") from e
        if text:
            yield text
        if not raw:
            return
        offset += len(raw)


def jsonl_rows(stream: BinaryIO, name: str, field: str) -> Iterator[tuple[int, Any]]:
    """(line number, the value of `field`) for each line of JSON lines; blank lines are skipped."""
    for row, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            raise PipelineError(f"{name} line {row} is not UTF-8 ({e.reason}): fix the file") from e
        except ValueError as e:
            raise PipelineError(f"{name} line {row} is not JSON ({e}): a {Path(name).suffix or 'JSON'} file is "
                                f"read as JSON lines, one object per line (a JSON array converts with "
                                f"`jq -c '.[]'`)") from e
        if not isinstance(record, dict):
            raise PipelineError(f"{name} line {row} is a JSON {type(record).__name__}, not an object with a "
                                f"{field!r} field: each line must be one object")
        yield row, record.get(field, MISSING)


def parquet_documents(path: Path, name: str, rules: RowRules,
                      row_groups: Iterable[int] | None = None) -> Iterator[tuple[int, list[str]]]:
    """(row group, its documents in a batch of its rows) for the rows of a Parquet file, a batch
    at a time, in the `row_groups` given (default: all, in order). A row without text is as
    `rules` say; an empty document is left out."""
    import pyarrow as pa  # only for Parquet files
    import pyarrow.parquet as pq

    try:
        # Not pyarrow's defaults, which read each row group's column whole (buffer_size 0) and,
        # with pre_buffer, every row group of the file at once (memory as large as the file's
        # text): pages are read through a READ_BYTES buffer, a row group at a time.
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BYTES)
    except (pa.ArrowException, OSError) as e:
        raise PipelineError(f"{name} is not a readable Parquet file ({e}); it may be truncated: download it "
                            f"again") from e
    field = rules.text_field
    with parquet:
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise PipelineError(f"{name} has no column {field!r} (it has {', '.join(schema.names) or 'none'}): "
                                f"set data.text_field to the column that holds the text")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise PipelineError(f"{name}: column {field!r} holds {kind}, not text: set data.text_field to the "
                                f"column that holds the text")
        sizes = [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]
        first_rows = list(accumulate(sizes, initial=0))
        for group in range(len(sizes)) if row_groups is None else row_groups:
            row = first_rows[group]  # rows before this one in the file
            try:
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[field],
                                                  use_threads=False):
                    texts = []
                    for value in batch.column(0).to_pylist():
                        row += 1
                        if text := rules.text_of(value, name, row):
                            texts.append(text)
                    yield group, texts
            except (pa.ArrowException, OSError) as e:
                raise PipelineError(f"{name} is damaged after row {row} ({e}): download it again") from e
