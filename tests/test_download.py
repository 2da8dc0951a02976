"""download(): every source kind, and every failure leaving nothing behind, against a local HTTP server."""

import gzip
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gptpipe.download import download
from gptpipe.errors import PipelineError
from gptpipe.params import load_params

ROOT = Path(__file__).resolve().parents[1]
GOOD = b"I HAD always thought Jack Gisburn rather a cheap genius.\n" * 100
LARGE = b"x" * 5000
GZIPPED = gzip.compress(GOOD, mtime=0)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/corpus.txt":
            self.send_body(GOOD, len(GOOD))
        elif self.path == "/corpus.txt.gz":
            self.send_body(GZIPPED, len(GZIPPED))
        elif self.path == "/large.txt":
            self.send_body(LARGE, len(LARGE))
        elif self.path == "/large-unsized.txt":  # no Content-Length: the body ends when the server closes
            self.send_body(LARGE, None)
        elif self.path == "/truncated.txt":  # declares all of GOOD, sends 100 bytes, closes
            self.send_body(GOOD[:100], len(GOOD))
        elif self.path == "/redirect-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/corpus.txt")
            self.end_headers()
        elif self.path == "/broken":
            self.send_error(500)
        else:
            self.send_error(404)

    def send_body(self, body: bytes, content_length: int | None) -> None:
        self.send_response(200)
        if content_length is not None:
            self.send_header("Content-Length", str(content_length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    """Loopback requests must reach the test server, not a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def local_corpus(tmp_path) -> Path:
    path = tmp_path / "src" / "corpus.txt"
    path.parent.mkdir()
    path.write_bytes(GOOD)
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GOOD_SHA256 = hashlib.sha256(GOOD).hexdigest()


def test_http_download_verifies_and_returns_sha256(server, out_dir):
    dest = out_dir / "corpus.txt"
    assert download(f"{server}/corpus.txt", dest, GOOD_SHA256) == GOOD_SHA256
    assert dest.read_bytes() == GOOD
    assert list(out_dir.iterdir()) == [dest]


@pytest.mark.parametrize("as_url", [Path.as_uri, str], ids=["file-url", "plain-path"])
def test_local_download_verifies_and_returns_sha256(local_corpus, out_dir, as_url):
    dest = out_dir / "corpus.txt"
    assert download(as_url(local_corpus), dest, GOOD_SHA256) == GOOD_SHA256
    assert dest.read_bytes() == GOOD
    assert list(out_dir.iterdir()) == [dest]


@pytest.mark.parametrize("path", ["/large.txt", "/large-unsized.txt"])
def test_download_of_exactly_max_bytes_succeeds(server, out_dir, path):
    dest = out_dir / "large.txt"
    assert download(server + path, dest, max_bytes=len(LARGE)) == hashlib.sha256(LARGE).hexdigest()
    assert dest.read_bytes() == LARGE


# (url template, download() keywords, words the message must contain).
# {server}: the test server; {closed}: a loopback port nobody listens on; {src}: local_corpus's folder.
FAILURES = {
    "http-404": ("{server}/missing.txt", {}, ["HTTP 404", "data.url"]),
    "http-500": ("{server}/broken", {}, ["HTTP 500", "try again later"]),
    "unreachable": ("http://127.0.0.1:{closed}/x", {},
                    ["cannot reach", "data.url", "local path", "file://"]),
    "checksum": ("{server}/corpus.txt", {"sha256": "0" * 64},
                 ["checksum mismatch", "data.sha256", GOOD_SHA256]),
    "truncated": ("{server}/truncated.txt", {}, ["truncated", f"100 of {len(GOOD)} bytes", "run the stage again"]),
    "content-length-over-max": ("{server}/large.txt", {"max_bytes": 4999},
                                ["data.max_bytes=4999", "raise data.max_bytes", "null"]),
    "streamed-over-max": ("{server}/large-unsized.txt", {"max_bytes": 4999},
                          ["data.max_bytes=4999", "raise data.max_bytes"]),
    # Only 100 bytes arrive, so only the up-front Content-Length check can name max_bytes here.
    "declared-over-max-checked-first": ("{server}/truncated.txt", {"max_bytes": 200},
                                        ["data.max_bytes=200"]),
    "local-over-max": ("{src}/corpus.txt", {"max_bytes": 10}, ["data.max_bytes=10"]),
    "ftp-scheme": ("ftp://127.0.0.1/corpus.txt", {}, ["data.url", "'ftp'", "https, http, file"]),
    "s3-scheme": ("s3://bucket/corpus.txt", {}, ["data.url", "'s3'", "https, http, file"]),
    "redirect-to-ftp": ("{server}/redirect-ftp", {}, ["ftp://", "not http or https"]),
    "file-url-with-host": ("file://src/corpus.txt", {}, ["data.url", "file:///"]),
    "local-missing": ("{src}/nope.txt", {}, ["nope.txt", "missing", "data.url"]),
    "glob-matching-nothing": ("{src}/*.nomatch", {}, ["a glob that holds no files", "data.url"]),
}


@pytest.mark.parametrize("template, kwargs, words", FAILURES.values(), ids=FAILURES.keys())
def test_failure_names_cause_and_fix_and_leaves_nothing(server, local_corpus, out_dir,
                                                        template, kwargs, words):
    url = template.format(server=server, closed=closed_port(), src=local_corpus.parent)
    with pytest.raises(PipelineError) as excinfo:
        download(url, out_dir / "corpus.txt", timeout=10, **kwargs)
    for word in words:
        assert word in str(excinfo.value)
    assert list(out_dir.iterdir()) == []


def write_params(path: Path, **data) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(data)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("max_bytes, error", [(None, None), (1, None), (0, "data.max_bytes must be null"),
                                              ("100MB", "data.max_bytes must be int")])
def test_max_bytes_param_validation(tmp_path, max_bytes, error):
    path = write_params(tmp_path / "params.yaml", max_bytes=max_bytes)
    if error is None:
        assert load_params(path).data.max_bytes == max_bytes
    else:
        with pytest.raises(PipelineError, match=error):
            load_params(path)


def test_max_bytes_defaults_to_100_mb():
    assert load_params(ROOT / "params.yaml").data.max_bytes == 100_000_000


@pytest.mark.parametrize("case", ["unreachable", "over-max-bytes"])
def test_stage_reports_one_error_line_without_traceback(tmp_path, local_corpus, case):
    if case == "unreachable":
        data, words = {"url": f"http://127.0.0.1:{closed_port()}/x"}, ["cannot reach"]
    else:  # the stage must pass data.max_bytes on
        data, words = {"url": str(local_corpus), "sha256": None, "max_bytes": 10}, ["data.max_bytes=10"]
    params = write_params(tmp_path / "params.yaml", **data)
    out = tmp_path / "out" / "corpus.txt"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "stages/download.py", "--params", str(params),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists() and list(out.parent.iterdir()) == []


# Several sources: data.url as a list, a directory or a glob; .gz; per-source checksums.

SEPARATOR = b"<|endoftext|>"
OTHER = "Le peintre dit: « voilà » — 画家\n".encode() * 3


@pytest.fixture
def documents(tmp_path) -> Path:
    """A folder of three documents, one in a subfolder, one gzipped, plus a hidden file."""
    folder = tmp_path / "docs"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_bytes(GOOD)
    (folder / "b" / "c.txt").write_bytes(OTHER)
    (folder / "d.txt.gz").write_bytes(gzip.compress(b"last document", mtime=0))
    (folder / ".hidden").write_bytes(b"not a document")
    return folder


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_list_of_sources_is_joined_with_endoftext(server, local_corpus, out_dir):
    dest = out_dir / "corpus.txt"
    other = local_corpus.with_name("other.txt")
    other.write_bytes(OTHER)
    expected = GOOD + SEPARATOR + OTHER + SEPARATOR + GOOD
    sources = [f"{server}/corpus.txt", {"url": str(other), "sha256": sha256(OTHER)},
               {"url": local_corpus.as_uri(), "sha256": None}]
    assert download(sources, dest, sha256(expected)) == sha256(expected)
    assert dest.read_bytes() == expected
    assert list(out_dir.iterdir()) == [dest]


def test_directory_and_glob_take_files_sorted_by_path_skipping_hidden(documents, out_dir):
    dest = out_dir / "corpus.txt"
    download(str(documents), dest)
    assert dest.read_bytes() == SEPARATOR.join([GOOD, OTHER, b"last document"])
    download(f"{documents}/**/*.txt", dest)
    assert dest.read_bytes() == SEPARATOR.join([GOOD, OTHER])


@pytest.mark.parametrize("where", ["local", "http"])
def test_gz_is_decompressed_and_its_checksum_is_of_the_compressed_file(server, tmp_path, out_dir, where):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(GZIPPED)
    url = str(path) if where == "local" else f"{server}/corpus.txt.gz"
    dest = out_dir / "corpus.txt"
    # data.sha256 checks what is written; a source's own sha256, the file as fetched
    assert download([{"url": url, "sha256": sha256(GZIPPED)}], dest, sha256(GOOD)) == sha256(GOOD)
    assert dest.read_bytes() == GOOD


def test_multi_member_gz_is_read_whole(tmp_path, out_dir):
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(b"first half, ", mtime=0) + gzip.compress(b"second half", mtime=0))
    download(str(path), out_dir / "corpus.txt")
    assert (out_dir / "corpus.txt").read_bytes() == b"first half, second half"


# (sources, download() keywords, words the message must contain); {src}: local_corpus's folder
MULTI_FAILURES = {
    "source-checksum": (lambda src: [str(src / "corpus.txt"), {"url": str(src / "other.txt"), "sha256": "0" * 64}],
                        {}, ["checksum mismatch", str(Path("other.txt")), sha256(OTHER), "data.url"]),
    "joined-checksum": (lambda src: [str(src / "corpus.txt"), str(src / "other.txt")], {"sha256": "0" * 64},
                        ["checksum mismatch", "joined from 2 files", "data.sha256",
                         sha256(GOOD + SEPARATOR + OTHER)]),
    "max-bytes-over-all-sources": (lambda src: [str(src / "corpus.txt"), str(src / "other.txt")],
                                   {"max_bytes": len(GOOD) + 10}, ["the corpus reaches", "data.max_bytes"]),
    "gz-decompressed-over-max": (lambda src: str(src / "big.gz"), {"max_bytes": 1000}, ["data.max_bytes=1000"]),
    "not-gzip": (lambda src: str(src / "fake.gz"), {}, ["not a valid gzip file", "rename"]),
    "truncated-gz": (lambda src: str(src / "cut.gz"), {}, ["not a valid gzip file"]),
    "checksum-on-a-directory": (lambda src: [{"url": str(src), "sha256": "0" * 64}], {},
                                ["a directory", "one file", "{url: ..., sha256: ...}"]),
    "bad-item": (lambda src: [str(src / "corpus.txt"), 5], {}, ["data.url item 2", "5"]),
    "bad-item-key": (lambda src: [{"url": str(src / "corpus.txt"), "md5": "x"}], {}, ["data.url item 1", "md5"]),
    "bad-item-sha256": (lambda src: [{"url": str(src / "corpus.txt"), "sha256": "ABC"}], {},
                        ["data.url item 1", "64 lowercase hex"]),
    "empty-list": (lambda src: [], {}, ["data.url", "non-empty list"]),
    "empty-directory": (lambda src: str(src / "empty"), {}, ["a directory that holds no files"]),
    "missing-in-list": (lambda src: [str(src / "corpus.txt"), str(src / "nope.txt")], {}, ["nope.txt", "missing"]),
}


@pytest.mark.parametrize("sources, kwargs, words", MULTI_FAILURES.values(), ids=MULTI_FAILURES.keys())
def test_multi_source_failure_names_cause_and_fix_and_leaves_nothing(local_corpus, out_dir, sources,
                                                                     kwargs, words):
    src = local_corpus.parent
    (src / "other.txt").write_bytes(OTHER)
    (src / "big.gz").write_bytes(gzip.compress(b"y" * 5000))  # 5000 bytes unpacked, a few dozen packed
    (src / "fake.gz").write_bytes(GOOD)
    (src / "cut.gz").write_bytes(GZIPPED[:-20])
    (src / "empty").mkdir()
    with pytest.raises(PipelineError) as excinfo:
        download(sources(src), out_dir / "corpus.txt", **kwargs)
    for word in words:
        assert word in str(excinfo.value)
    assert list(out_dir.iterdir()) == []


def test_a_directory_holding_the_output_is_refused(local_corpus):
    with pytest.raises(PipelineError, match="includes the output"):
        download(str(local_corpus.parent), local_corpus)
    assert local_corpus.read_bytes() == GOOD


@pytest.mark.parametrize("url, error", [
    (["a.txt", {"url": "b.txt.gz", "sha256": GOOD_SHA256}], None),
    ("corpus/*.txt", None),
    ([], "data.url"),
    ([{"sha256": GOOD_SHA256}], "data.url item 1 must have the keys url"),
    ([{"url": "a.txt", "sha256": "abc"}], "data.url item 1: sha256 must be 64 lowercase hex digits"),
    ({"url": "a.txt"}, "data.url must be a URL or path, or a non-empty list"),
])
def test_url_param_validation(tmp_path, url, error):
    path = write_params(tmp_path / "params.yaml", url=url)
    if error is None:
        assert load_params(path).data.url == url
    else:
        with pytest.raises(PipelineError, match=f"^params: {error}"):
            load_params(path)


def test_stage_reads_a_list_of_sources_from_params(tmp_path, local_corpus, documents):
    params = write_params(tmp_path / "params.yaml", sha256=None,
                          url=[str(local_corpus), {"url": str(documents / "d.txt.gz"),
                                                   "sha256": sha256((documents / "d.txt.gz").read_bytes())}])
    out = tmp_path / "out" / "corpus.txt"
    result = subprocess.run([sys.executable, "stages/download.py", "--params", str(params), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == GOOD + SEPARATOR + b"last document"
