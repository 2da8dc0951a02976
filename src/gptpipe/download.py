"""Fetch the corpus: one or several https/http/file URLs, local paths, directories or globs,
each verified, gzip-decompressed when its name ends in .gz, joined into one file written
atomically.

Each file is a document. Documents are joined with <|endoftext|> between them, GPT-2's
document separator, so the tokenize stage can tell where one ends and the next begins. A
single file is copied byte for byte.
"""

import glob
import gzip
import hashlib
import http.client
import io
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path
from gptpipe.tokenizer import END_OF_TEXT

CHUNK_BYTES = 1 << 20
SUPPORTED_SCHEMES = ("https", "http", "file")
SEPARATOR = END_OF_TEXT.encode()  # GPT-2's document separator
SHA256_HEX_DIGITS = 64


@dataclass(frozen=True)
class Source:
    url: str  # https/http/file URL or local path; a local path may be a directory or a glob
    sha256: str | None = None  # of the file as fetched, before any decompression


def parse_sources(value: str | Sequence[str | Mapping[str, Any] | Source]) -> list[Source]:
    """data.url as a list of sources: a string, or a list whose items are strings or
    {url: ..., sha256: ...} mappings."""
    if isinstance(value, str):
        items: Sequence[Any] = [value]
    elif isinstance(value, Sequence) and value:
        items = value
    else:
        raise PipelineError(f"data.url must be a URL or path, or a non-empty list of them, got {value!r}")
    sources = []
    for i, item in enumerate(items, 1):
        where = "data.url" if isinstance(value, str) else f"data.url item {i}"
        if isinstance(item, Mapping):
            unknown = set(item) - {"url", "sha256"}
            if unknown or "url" not in item:
                raise PipelineError(f"{where} must have the keys url and (optionally) sha256, "
                                    f"got {sorted(item)}")
            item = Source(item["url"], item.get("sha256"))
        elif isinstance(item, str):
            item = Source(item)
        elif not isinstance(item, Source):
            raise PipelineError(f"{where} must be a URL or path, or {{url: ..., sha256: ...}}, got {item!r}")
        if not isinstance(item.url, str) or not item.url:
            raise PipelineError(f"{where} has an empty url: give an https/http/file URL or a local path")
        if item.sha256 is not None and not is_sha256(item.sha256):
            raise PipelineError(f"{where}: sha256 must be {SHA256_HEX_DIGITS} lowercase hex digits "
                                f"or null, got {item.sha256!r}")
        sources.append(item)
    return sources


def is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == SHA256_HEX_DIGITS
            and all(c in "0123456789abcdef" for c in value))


def local_path(url: str) -> Path | None:
    """The filesystem path a file:// URL or plain path points to; None for http(s)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):  # file://data/x.txt would silently read /x.txt
            raise PipelineError(f"data.url {url!r} names host {parsed.netloc!r}; a file:// URL needs "
                                f"an absolute path (file:///path/to/file), or give a plain path")
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):
        return Path(url)  # a plain path (a Windows drive letter parses as a scheme)
    if parsed.scheme not in SUPPORTED_SCHEMES:
        raise PipelineError(f"data.url {url!r} has scheme {parsed.scheme!r}; supported are "
                            f"https, http, file, or a plain local path")
    return None


def expand(source: Source) -> list[Source]:
    """The files a source names: itself for a URL or a file; for a directory every file under
    it, for a glob every file it matches, sorted by path (hidden files are skipped)."""
    path = local_path(source.url)
    if path is None or path.is_file():
        return [source]
    if path.is_dir():
        what = "a directory"
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif any(c in str(path) for c in "*?["):
        what = "a glob"
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file())
    elif path.exists():
        raise PipelineError(f"data.url points to {path}, which is neither a file nor a directory (a "
                            f"device or a pipe?); set data.url to the corpus file, a directory or a glob")
    else:
        raise PipelineError(f"data.url points to {path}, which is missing; set data.url to the corpus "
                            f"file, a directory or a glob (relative paths start at the project root)")
    if not files:
        raise PipelineError(f"data.url {source.url!r} is {what} that holds no files; point data.url "
                            f"at the corpus files")
    if source.sha256 is not None:
        raise PipelineError(f"data.url {source.url!r} is {what}, but a sha256 checks one file; name "
                            f"the files one by one as {{url: ..., sha256: ...}}, or drop the sha256")
    return [Source(str(p)) for p in files]


def download(url: str | Sequence[str | Mapping[str, Any] | Source], dest: str | Path,
             sha256: str | None = None, *, max_bytes: int | None = None, timeout: float = 60.0) -> str:
    """Write the corpus that `url` names (one source or several, see parse_sources) to `dest`
    and return the SHA-256 of `dest`; `sha256`, if given, must match it. With one
    uncompressed file, `dest` is a copy of it, so that is also the file's own SHA-256.

    On any failure `dest` is left untouched and no temporary file remains next to it.
    """
    dest = Path(dest)
    files = [file for source in parse_sources(url) for file in expand(source)]
    for file in files:
        path = local_path(file.url)
        if path is not None and path.resolve() == dest.resolve():
            raise PipelineError(f"data.url includes the output {dest} itself; point it at the sources only")
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        corpus = CorpusWriter(out)
        for i, file in enumerate(tqdm(files, desc="sources", unit="file", leave=False, disable=len(files) == 1)):
            if i:
                corpus.write(SEPARATOR)
            fetch(file, corpus, max_bytes, timeout)
        actual = corpus.digest.hexdigest()
        what = files[0].url if len(files) == 1 else f"the corpus joined from {len(files)} files"
        if corpus.written == 0:  # refused here, where data.url is the cause, not later by tokenize
            raise PipelineError(f"{what} is empty: point data.url at the corpus")
        require_checksum(what, f"data.sha256={sha256}", sha256, actual,
                         "fix data.url, or set data.sha256 to the new hash (or null) if the change is intended")
    return actual


def require_checksum(what: str, where: str, expected: str | None, actual: str, fix: str) -> None:
    """Refuse a file whose SHA-256 is not the one the params give for it (`expected`; None: unchecked)."""
    if expected and actual != expected:
        raise PipelineError(f"checksum mismatch for {what}: expected {where}, got {actual}. The file is "
                            f"corrupt or a different version; {fix}")


class CorpusWriter:
    """The output file, counting and hashing what is written."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.digest.update(data)
        self.written += len(data)


def fetch(source: Source, corpus: CorpusWriter, max_bytes: int | None, timeout: float) -> None:
    path = local_path(source.url)
    if path is not None:
        actual = copy_local(path, source.url, corpus, max_bytes)
    else:
        actual = copy_remote(source.url, corpus, max_bytes, timeout)
    require_checksum(source.url, f"the sha256 {source.sha256} given for it in data.url", source.sha256, actual,
                     "fix its url, or its sha256 if the change is intended")


def copy_local(source: Path, url: str, corpus: CorpusWriter, max_bytes: int | None) -> str:
    try:
        f = open(source, "rb")
    except OSError as e:
        raise PipelineError(f"cannot read {source} ({e.strerror}); check data.url and the file's "
                            f"permissions") from e
    with f:
        _, sha256 = copy(f.read, corpus, source.stat().st_size, url, max_bytes)
    return sha256


def copy_remote(url: str, corpus: CorpusWriter, max_bytes: int | None, timeout: float) -> str:
    try:
        response = urllib.request.build_opener(HttpOnlyRedirects).open(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        fix = "check that data.url names an existing file" if e.code < 500 else \
            "the server is failing; try again later, or point data.url at another copy"
        raise PipelineError(f"downloading {url} failed: HTTP {e.code} {e.reason}; {fix}") from e
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise PipelineError(
            f"cannot reach {url} ({getattr(e, 'reason', e)}). Without network, download the file "
            f"elsewhere and set data.url to its local path or a file:// URL, e.g. "
            f"`dvc exp run -S data.url=/path/to/the-verdict.txt`") from e
    with response:
        expected = response.length  # Content-Length as parsed by http.client; None if not sent
        try:
            received, sha256 = copy(response.read, corpus, expected, url, max_bytes)
        except (OSError, http.client.HTTPException) as e:
            raise PipelineError(f"download of {url} broke off ({e}); run the stage again") from e
    if expected is not None and received != expected:
        raise PipelineError(f"download of {url} was truncated: got {received} of {expected} bytes "
                            f"(the connection closed early); run the stage again")
    return sha256


def copy(read: Callable[[int], bytes], corpus: CorpusWriter, size: int | None, url: str,
         max_bytes: int | None) -> tuple[int, str]:
    """Stream `read` into `corpus`, decompressing a .gz, stopping once the corpus would exceed
    `max_bytes`; return the byte count and SHA-256 of what was read (before decompression)."""
    gzipped = Path(urlparse(url).path).suffix == ".gz"
    start = corpus.written
    if not gzipped:  # a compressed size says little about the corpus size
        check_size(size, start, url, max_bytes)
    with progress_bar(size, Path(urlparse(url).path).name) as bar:
        raw = RawReader(read, bar.update)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            while chunk := stream.read(CHUNK_BYTES):
                check_size(corpus.written + len(chunk) - start, start, url, max_bytes)
                corpus.write(chunk)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise PipelineError(f"{url} is not a valid gzip file ({e}); a name ending in .gz is "
                                f"decompressed: check the file, or rename it if it is plain text") from e
    return raw.received, raw.digest.hexdigest()


class RawReader(io.RawIOBase):
    """A readable stream over `read` that hashes and counts the bytes as they pass."""

    def __init__(self, read: Callable[[int], bytes], on_read: Callable[[int], Any]):
        self._read = read
        self._on_read = on_read
        self.digest = hashlib.sha256()
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._read(min(len(buffer), CHUNK_BYTES))
        buffer[:len(chunk)] = chunk
        self.digest.update(chunk)
        self.received += len(chunk)
        self._on_read(len(chunk))
        return len(chunk)


def check_size(size: int | None, before: int, url: str, max_bytes: int | None) -> None:
    """Refuse a corpus over max_bytes: `before` bytes from earlier files, plus `size` from `url`."""
    if size is None or max_bytes is None or before + size <= max_bytes:
        return
    total = before + size
    what = f"{url} has at least {size} bytes" if before == 0 else \
        f"the corpus reaches at least {total} bytes with {url}"
    raise PipelineError(
        f"{what}, more than data.max_bytes={max_bytes}; if it is meant to be that big, raise "
        f"data.max_bytes in params.yaml (or set it to null for no limit), "
        f"e.g. `dvc exp run -S data.max_bytes={2 * total}`")


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; allow only http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise PipelineError(f"{req.full_url} redirects to {newurl}, which is not http or https; "
                                f"set data.url to an https/http/file URL or a local path")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def progress_bar(total: int | None, name: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", leave=False)
