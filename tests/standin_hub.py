"""A stand-in for the Hugging Face Hub on localhost, for huggingface_hub pointed at it with
HF_ENDPOINT: the API calls and file downloads it makes for models and datasets, answered as the
Hub answers them (the commit in X-Repo-Commit; a Git LFS file's SHA-256 in X-Linked-Etag, a git
file's blob hash as ETag; a failure's kind in X-Error-Code). Used by the tests and by
bench/bench_corpus.py; nothing leaves the machine."""

import functools
import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 1 << 20
# What the Hub keeps in Git LFS: what a repository's default .gitattributes sends there (among
# them these types) and files too large for git (the large files served from disk here).
LFS_SUFFIXES = (".parquet", ".gz", ".zst", ".safetensors", ".bin")


@dataclass
class Repos:
    """What the stand-in serves: per "models/org/name" or "datasets/org/name", its files (bytes,
    or a Path whose bytes are read as served) at `main` and at COMMIT."""
    files: dict[str, dict[str, bytes | Path]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)


def size_of(body: bytes | Path) -> int:
    return body.stat().st_size if isinstance(body, Path) else len(body)


def is_lfs(name: str, body: bytes | Path) -> bool:
    return isinstance(body, Path) or name.endswith(LFS_SUFFIXES)


def etag_of(name: str, body: bytes | Path) -> str:
    """As the Hub names a file: a Git LFS file by its SHA-256, a file in git by its git blob hash."""
    if isinstance(body, Path):
        return file_sha256(body, body.stat().st_size, body.stat().st_mtime_ns)
    if is_lfs(name, body):
        return hashlib.sha256(body).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


@functools.cache
def file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The SHA-256 of a served file, computed once per version of it (its size and mtime)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def handler_for(repos: Repos) -> type[BaseHTTPRequestHandler]:
    class StandInHub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self.answer(send_body=False)

        def do_GET(self) -> None:
            self.answer(send_body=True)

        def answer(self, send_body: bool) -> None:
            path = unquote(urlparse(self.path).path).lstrip("/")
            repos.requests.append(f"{self.command} {path}")
            if path.startswith("api/"):
                return self.api(path[len("api/"):])
            kind = "datasets" if path.startswith("datasets/") else "models"
            repo, _, rest = path.removeprefix("datasets/").partition("/resolve/")
            revision, _, name = rest.partition("/")
            files = self.repo_files(kind, repo, revision)
            if files is None:
                return
            if name not in files:
                return self.fail(404, "EntryNotFound")
            body = files[name]
            etag = etag_of(name, body)
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            if is_lfs(name, body):  # what huggingface_hub names the blob by, before ETag
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(size_of(body)))
            self.send_header("Content-Length", str(size_of(body)))
            self.end_headers()
            if send_body:
                if isinstance(body, Path):
                    with open(body, "rb") as f:
                        while chunk := f.read(CHUNK):
                            self.wfile.write(chunk)
                else:
                    self.wfile.write(body)

        def api(self, path: str) -> None:
            """{kind}/{org}/{name}/revision/{rev} and {kind}/{org}/{name}/tree/{rev}[/{path}]."""
            kind, _, rest = path.partition("/")
            parts = rest.split("/")
            repo, what, revision = "/".join(parts[:2]), parts[2] if len(parts) > 2 else "", \
                parts[3] if len(parts) > 3 else "main"
            files = self.repo_files(kind, repo, revision)
            if files is None:
                return
            if what == "revision":
                return self.json({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in sorted(files)]})
            if what == "tree":
                prefix = "/".join(parts[4:])
                entries = [{"type": "file", "path": name, "size": size_of(body),
                            "oid": hashlib.sha1(name.encode()).hexdigest()}
                           for name, body in sorted(files.items()) if name.startswith(prefix)]
                return self.json(entries)
            self.fail(404, "EntryNotFound")

        def repo_files(self, kind: str, repo: str, revision: str) -> dict[str, bytes | Path] | None:
            key = f"{kind}/{repo}"
            if key in repos.gated:
                return self.fail(401, "GatedRepo")
            if key not in repos.files:
                return self.fail(404, "RepoNotFound")
            if revision not in ("main", COMMIT):
                return self.fail(404, "RevisionNotFound")
            return repos.files[key]

        def json(self, value) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def fail(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return StandInHub


@contextmanager
def standin_hub(repos: Repos) -> Iterator[str]:
    """Serve `repos` on localhost while the block runs; yields the endpoint for HF_ENDPOINT."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(repos))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
