"""Fetch the corpus from an https/http/file URL or a local path, verified and written atomically."""

import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path

CHUNK_BYTES = 1 << 20
SUPPORTED_SCHEMES = ("https", "http", "file")


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


def download(url: str, dest: str | Path, sha256: str | None = None, *,
             max_bytes: int | None = None, timeout: float = 60.0) -> str:
    """Copy `url` to `dest` and return its SHA-256.

    On any failure `dest` is left untouched and no temporary file remains next to it.
    """
    source = local_path(url)
    if source is not None and not source.is_file():
        what = "a directory" if source.is_dir() else "missing"
        raise PipelineError(f"data.url points to {source}, which is {what}; set data.url to the "
                            f"corpus file (relative paths start at the project root)")
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        if source is not None:
            actual = copy_local(source, url, out, max_bytes)
        else:
            actual = copy_remote(url, out, max_bytes, timeout)
        if sha256 and actual != sha256:
            raise PipelineError(
                f"checksum mismatch for {url}: expected data.sha256={sha256}, got {actual}. The file "
                f"is corrupt or a different version; fix data.url, or set data.sha256 to the new "
                f"hash (or null) if the change is intended")
    return actual


def copy_local(source: Path, url: str, out: BinaryIO, max_bytes: int | None) -> str:
    try:
        f = open(source, "rb")
    except OSError as e:
        raise PipelineError(f"cannot read {source} ({e.strerror}); check data.url and the file's "
                            f"permissions") from e
    with f:
        _, sha256 = copy(f.read, out, source.stat().st_size, url, max_bytes)
    return sha256


def copy_remote(url: str, out: BinaryIO, max_bytes: int | None, timeout: float) -> str:
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
            received, sha256 = copy(response.read, out, expected, url, max_bytes)
        except (OSError, http.client.HTTPException) as e:
            raise PipelineError(f"download of {url} broke off ({e}); run the stage again") from e
    if expected is not None and received != expected:
        raise PipelineError(f"download of {url} was truncated: got {received} of {expected} bytes "
                            f"(the connection closed early); run the stage again")
    return sha256


def copy(read: Callable[[int], bytes], out: BinaryIO, size: int | None, url: str,
         max_bytes: int | None) -> tuple[int, str]:
    """Stream `read` into `out`, stopping once more than `max_bytes` arrive; return the byte
    count and SHA-256 of what was copied."""
    check_size(size, url, max_bytes)
    digest = hashlib.sha256()
    received = 0
    with progress_bar(size, Path(urlparse(url).path).name) as bar:
        while chunk := read(CHUNK_BYTES):
            received += len(chunk)
            check_size(received, url, max_bytes)
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return received, digest.hexdigest()


def check_size(size: int | None, url: str, max_bytes: int | None) -> None:
    if size is not None and max_bytes is not None and size > max_bytes:
        raise PipelineError(
            f"{url} has at least {size} bytes, more than data.max_bytes={max_bytes}; if it is meant "
            f"to be that big, raise data.max_bytes in params.yaml (or set it to null for no limit), "
            f"e.g. `dvc exp run -S data.max_bytes={2 * size}`")


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; allow only http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise PipelineError(f"{req.full_url} redirects to {newurl}, which is not http or https; "
                                f"set data.url to an https/http/file URL or a local path")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def progress_bar(total: int | None, name: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", leave=False)
