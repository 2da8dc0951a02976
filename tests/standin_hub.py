"""A stand-in for the Hugging Face Hub on localhost, for huggingface_hub pointed at it with
HF_ENDPOINT: the API calls and file downloads it makes for models and datasets, answered as the
Hub answers them (the commit in X-Repo-Commit, the content hash as ETag, a failure's kind in
X-Error-Code). Used by the tests and by bench/bench_corpus.py; nothing leaves the machine."""

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


@dataclass
class Repos:
    """What the stand-in serves: per "models/org/name" or "datasets/org/name", its files (bytes,
    or a Path whose bytes are read as served) at `main` and at COMMIT."""
    files: dict[str, dict[str, bytes | Path]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)


def size_of(body: bytes | Path) -> int:
    return body.stat().st_size if isinstance(body, Path) else len(body)


def etag_of(body: bytes | Path) -> str:
    if isinstance(body, Path):  # large served files: their path and size stand in for a hash
        return hashlib.sha256(f"{body}:{body.stat().st_size}".encode()).hexdigest()
    return hashlib.sha256(body).hexdigest()


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
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag_of(body)}"')
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
