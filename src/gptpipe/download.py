"""The download stage: resolve data.url (and data.val_url) to files, verify them, and write the
manifest (gptpipe.sources) that tokenize reads.

Where each file's bytes come from and stay:

- hf://datasets/...: huggingface_hub's cache (its token, progress bars, resumed downloads and
  HF_HUB_OFFLINE); the manifest records the commit the revision named, and for a Git LFS file
  the SHA-256 the Hub gives (huggingface_hub names the cached file by it), which tokenize checks.
- a local path, directory or glob: read where it is; the manifest records its path and SHA-256,
  which tokenize checks again as it reads.
- an https/http/file URL: stored next to the manifest, as published (a .gz stays compressed).
  When its SHA-256 is pinned and those bytes are known here (a copy shipped with this package,
  the file the run in dvc.lock stored, in DVC's cache, or the one in the output folder), they
  are used without the network.

Every file is verified against the SHA-256 the params give for it, if any; the outputs are
written atomically, together, so a failure leaves the previous ones as they were.
"""

import configparser
import glob
import hashlib
import http.client
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

import yaml
from tqdm import tqdm

from gptpipe.errors import PipelineError
from gptpipe.files import atomic_path, written_together
from gptpipe.sources import (MANIFEST, CorpusFile, HubFiles, Source, file_format, parse_hub_files, parse_sources,
                             read_manifest, write_manifest)

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
SUPPORTED_SCHEMES = ("https", "http", "file")
# Corpora shipped with the package, found by their SHA-256: the default run needs no network.
SHIPPED = resources.files("gptpipe") / "corpora"


def local_path(url: str) -> Path | None:
    """The filesystem path a file:// URL or plain path points to; None for http(s) and hf://."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):  # file://data/x.txt would silently read /x.txt
            raise PipelineError(f"data.url {url!r} names host {parsed.netloc!r}; a file:// URL needs "
                                f"an absolute path (file:///path/to/file), or give a plain path")
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and url[1:3] in (":\\", ":/")):
        return Path(url)  # a plain path (a Windows drive letter parses as a scheme)
    if parsed.scheme not in (*SUPPORTED_SCHEMES, "hf"):
        raise PipelineError(f"data.url {url!r} has scheme {parsed.scheme!r}; supported are "
                            f"https, http, file, hf://datasets/..., or a plain local path")
    return None


def expand_local(source: Source, path: Path) -> list[Path]:
    """The files a local source names: itself for a file; for a directory every file under it,
    for a glob every file it matches, sorted by path (hidden files are skipped)."""
    if path.is_file():
        return [path]
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
    return files


@dataclass
class Download:
    """The state of one run of the stage: the output folder, the files resolved so far, the bytes
    they hold (for data.max_bytes), and the files the previous run stored there."""
    out_dir: Path
    max_bytes: int | None
    timeout: float
    previous: dict[str, tuple[Path, str]]  # sha256 -> a file an earlier run stored, and where it is
    pinned: str | None = None  # data.sha256, while data.url's one source is resolved
    files: list[CorpusFile] = field(default_factory=list)
    total: int = 0

    def count(self, name: str, size: int | None) -> None:
        """Refuse a corpus over max_bytes once `name` adds `size` bytes (None: unknown yet)."""
        if size is None or self.max_bytes is None or self.total + size <= self.max_bytes:
            if size is not None:
                self.total += size
            return
        total = self.total + size
        what = f"{name} has at least {size} bytes" if self.total == 0 else \
            f"the corpus reaches at least {total} bytes with {name}"
        raise PipelineError(
            f"{what}, more than data.max_bytes={self.max_bytes}; if it is meant to be that big, raise "
            f"data.max_bytes in params.yaml (or set it to null for no limit), "
            f"e.g. `dvc exp run -S data.max_bytes={2 * total}`")

    def store_name(self, url: str) -> str:
        name = Path(urlparse(url).path).name or "corpus"
        taken = {f.stored for f in self.files}
        return name if name not in taken and name != MANIFEST else f"{len(self.files):05d}-{name}"


def download(url: str | Sequence[str | Mapping[str, Any] | Source], out_dir: str | Path,
             sha256: str | None = None, *, val_url: Any = None, max_bytes: int | None = None,
             timeout: float = 60.0) -> list[CorpusFile]:
    """Resolve and verify the corpus `url` names (one source or several, see parse_sources),
    and `val_url`'s (the val split's, or None), into `out_dir`: the manifest sources.json and
    the files fetched from http(s) URLs. `sha256`, if given, must be the SHA-256 of the one file
    `url` names. Return the manifest's files.

    On any failure the previous outputs are left untouched and no temporary file remains."""
    out_dir = Path(out_dir)
    previous = previous_stored(out_dir)
    known = {f.sha256: (out_dir / f.stored, "the file this stage stored before") for f in previous}
    run = Download(out_dir, max_bytes, timeout, stored_in_dvc_cache(out_dir) | known)
    with written_together():
        for key, value, split in (("data.url", url, None), ("data.val_url", val_url, "val")):
            if value is None:
                continue
            sources = parse_sources(value, key)
            if key == "data.url" and len(sources) == 1:
                run.pinned = sha256  # the one file data.sha256 checks: its bytes may be known here
            for source in sources:
                resolve(source, key, split, run)
            named = [f for f in run.files if f.split == split]
            if not any(f.bytes for f in named):  # refused here, where the param is the cause
                what = named[0].name if len(named) == 1 else f"every file {key} names"
                raise PipelineError(f"{what} is empty: point {key} at the corpus")
        main = [f for f in run.files if f.split is None]
        if sha256 is not None:
            if len(main) != 1:
                raise PipelineError(f"data.sha256 checks one file, but data.url names {len(main)}; give each "
                                    f"file's sha256 in data.url ({{url: ..., sha256: ...}}), or set data.sha256 "
                                    f"to null")
            require_checksum(main[0].name, f"data.sha256={sha256}", sha256, main[0].sha256,
                             "fix data.url, or set data.sha256 to the new hash (or null) if the change is intended")
        write_manifest(out_dir, run.files)
    stored = {f.stored for f in run.files}
    for old in previous:  # what the previous run stored and this one did not
        if old.stored and old.stored not in stored:
            (out_dir / old.stored).unlink(missing_ok=True)
    return run.files


def previous_stored(out_dir: Path) -> list[CorpusFile]:
    """The files the previous run stored in `out_dir` (none when there was none, or it is unreadable)."""
    try:
        return [f for f in read_manifest(out_dir) if f.stored and (out_dir / f.stored).is_file()]
    except (PipelineError, OSError):
        return []


def stored_in_dvc_cache(out_dir: Path) -> dict[str, tuple[Path, str]]:
    """The files the download stage stored in `out_dir` in the run dvc.lock records, found in
    DVC's cache (`dvc repro` removes the output folder before it runs the stage): sha256 ->
    (the cached file, where it is). Nothing when out_dir is not a DVC output of this project."""
    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text(encoding="utf-8"))
        outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
        folder = next(out["md5"] for out in outs if Path(out["path"]) == out_dir and out["md5"].endswith(".dir"))
        config = configparser.ConfigParser()
        config.read([".dvc/config", ".dvc/config.local"])
        cache = Path(".dvc") / config.get("cache", "dir", fallback="cache") / "files" / "md5"
        listing = {entry["relpath"]: cache / entry["md5"][:2] / entry["md5"][2:]
                   for entry in json.loads((cache / folder[:2] / folder[2:]).read_text())}
        manifest = json.loads(listing[MANIFEST].read_text())
        return {f["sha256"]: (listing[f["stored"]], f"in DVC's cache ({listing[f['stored']]}), stored by the run "
                                                   f"dvc.lock records")
                for f in manifest["files"] if f.get("stored") in listing}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration, yaml.YAMLError,
            configparser.Error):
        return {}  # no dvc.lock, no such output, an older layout: nothing known


def resolve(source: Source, key: str, split: str | None, run: Download) -> None:
    """Add the files `source` names to `run`: verified, and fetched if they come from http(s)."""
    hub_files = parse_hub_files(source.url)
    if hub_files is not None:
        return resolve_hub(source, hub_files, key, split, run)
    path = local_path(source.url)
    if path is None:
        return fetch(source, split, run)
    for file in expand_local(source, path):
        if file.resolve().is_relative_to(run.out_dir.resolve()):
            raise PipelineError(f"{key} includes {file}, inside the download stage's output folder "
                                f"{run.out_dir}; point it at the sources only")
        file_format(file.name)
        digest, size = hash_local(file, source.url, run)
        require_checksum(str(file), f"the sha256 {source.sha256} given for it in {key}", source.sha256, digest,
                         "fix its url, or its sha256 if the change is intended")
        run.files.append(CorpusFile(source.url, str(file), split, size, digest, local=str(file)))


def resolve_hub(source: Source, files: HubFiles, key: str, split: str | None, run: Download) -> None:
    from gptpipe.hub import dataset_files, lfs_sha256  # huggingface_hub is imported only for Hub sources

    if source.sha256 is not None and any(c in files.pattern for c in "*?["):
        raise PipelineError(f"{key} {source.url!r} is a glob, but a sha256 checks one file; drop the sha256 "
                            f"(a commit after @ pins the bytes) or name one file")
    remaining = None if run.max_bytes is None else run.max_bytes - run.total
    commit, found = dataset_files(files, key, remaining)
    for name, path in found:
        file_format(name)
        if (digest := lfs_sha256(path)) is not None:  # not read here: tokenize checks it as it reads the file
            size = path.stat().st_size
            run.count(str(path), size)
        else:
            digest, size = hash_local(path, source.url, run)
        hub_url = f"hf://datasets/{files.repo}@{commit}/{name}"
        require_checksum(hub_url, f"the sha256 {source.sha256} given for it in {key}", source.sha256, digest,
                         "fix its url, or its sha256 if the change is intended")
        run.files.append(CorpusFile(source.url, hub_url, split, size, digest,
                           hub={"repo": files.repo, "commit": commit, "path": name}))


def fetch(source: Source, split: str | None, run: Download) -> None:
    """Store the file an http(s) URL names in the output folder: from a copy known here when its
    SHA-256 is pinned, else from the network."""
    file_format(source.url)
    name = run.store_name(source.url)
    with atomic_path(run.out_dir / name) as tmp:
        pinned = source.sha256 or run.pinned
        known = known_copy(pinned, run.previous)
        if known is not None:
            log.info(f"{source.url}: sha256 {pinned} is {known[1]}; not downloaded")
            run.count(source.url, known[0].stat().st_size)
            shutil.copyfile(known[0], tmp)
            size, digest = tmp.stat().st_size, pinned
        else:
            with open(tmp, "wb") as out:
                size, digest = copy_remote(source.url, out, run)
        require_checksum(source.url, f"the sha256 {source.sha256} given for it in data.url", source.sha256, digest,
                         "fix its url, or its sha256 if the change is intended")
    run.files.append(CorpusFile(source.url, source.url, split, size, digest, stored=name))


def known_copy(sha256: str | None, previous: dict[str, tuple[Path, str]]) -> tuple[Path, str] | None:
    """A file on this machine holding the bytes of SHA-256 `sha256`, verified, and where it is
    from (for the log); None when no such copy is known or `sha256` is None."""
    if sha256 is None:
        return None
    candidates = [(Path(str(p)), "the copy shipped with gptpipe") for p in SHIPPED.iterdir() if p.is_file()]
    if sha256 in previous:
        candidates.append(previous[sha256])
    for path, where in candidates:
        if hash_local(path, str(path))[0] == sha256:
            return path, f"{where} ({path})"
    return None


def hash_local(path: Path, url: str, run: Download | None = None) -> tuple[str, int]:
    """The SHA-256 and size of a local file, read in blocks; counted towards data.max_bytes in `run`."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            if run is not None:
                run.count(str(path), os.fstat(f.fileno()).st_size)
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
                size += len(block)
    except OSError as e:
        raise PipelineError(f"cannot read {path} ({e.strerror}); check {url} and the file's "
                            f"permissions") from e
    return digest.hexdigest(), size


def require_checksum(what: str, where: str, expected: str | None, actual: str, fix: str) -> None:
    """Refuse a file whose SHA-256 is not the one the params give for it (`expected`; None: unchecked)."""
    if expected and actual != expected:
        raise PipelineError(f"checksum mismatch for {what}: expected {where}, got {actual}. The file is "
                            f"corrupt or a different version; {fix}")


def copy_remote(url: str, out: BinaryIO, run: Download) -> tuple[int, str]:
    """Stream `url` into `out`; return the byte count and SHA-256."""
    try:
        response = urllib.request.build_opener(HttpOnlyRedirects).open(url, timeout=run.timeout)
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
        run.count(url, expected)
        try:
            received, sha256 = copy(response.read, out, url, run, expected)
        except (OSError, http.client.HTTPException) as e:
            raise PipelineError(f"download of {url} broke off ({e}); run the stage again") from e
    if expected is not None and received != expected:
        raise PipelineError(f"download of {url} was truncated: got {received} of {expected} bytes "
                            f"(the connection closed early); run the stage again")
    return received, sha256


def copy(read: Callable[[int], bytes], out: BinaryIO, url: str, run: Download, size: int | None) -> tuple[int, str]:
    """Stream `read` into `out` with a progress bar; return the byte count and SHA-256. When the
    `size` was not known beforehand, each block counts towards data.max_bytes as it comes."""
    digest, received = hashlib.sha256(), 0
    with progress_bar(size, Path(urlparse(url).path).name) as bar:
        while chunk := read(CHUNK_BYTES):
            if size is None:
                run.count(url, len(chunk))
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, digest.hexdigest()


class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; allow only http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise PipelineError(f"{req.full_url} redirects to {newurl}, which is not http or https; "
                                f"set data.url to an https/http/file URL or a local path")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def progress_bar(total: int | None, name: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", leave=False)
