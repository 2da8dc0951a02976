"""download(): every source kind, the manifest, and every failure leaving nothing behind, against a
local HTTP server. (Hugging Face datasets: test_corpora.py.)"""

import gzip
import hashlib
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import VERDICT_SHA256, run_stage
from gptpipe.download import SHIPPED, download
from gptpipe.errors import PipelineError
from gptpipe.params import load_params
from gptpipe.sources import read_manifest

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


def only_file(out_dir: Path, files):
    assert len(files) == 1
    return files[0]


def test_http_download_is_stored_as_published_and_listed(server, out_dir):
    file = only_file(out_dir, download(f"{server}/corpus.txt", out_dir, GOOD_SHA256))
    assert (file.sha256, file.bytes, file.stored) == (GOOD_SHA256, len(GOOD), "corpus.txt")
    assert (out_dir / "corpus.txt").read_bytes() == GOOD
    assert sorted(p.name for p in out_dir.iterdir()) == ["corpus.txt", "sources.json"]
    assert read_manifest(out_dir) == [file]


@pytest.mark.parametrize("as_url", [Path.as_uri, str], ids=["file-url", "plain-path"])
def test_a_local_file_is_verified_and_read_where_it_is(local_corpus, out_dir, as_url):
    file = only_file(out_dir, download(as_url(local_corpus), out_dir, GOOD_SHA256))
    assert (file.sha256, file.local, file.stored) == (GOOD_SHA256, str(local_corpus), None)
    assert [p.name for p in out_dir.iterdir()] == ["sources.json"]  # no copy of the text


@pytest.mark.parametrize("path", ["/large.txt", "/large-unsized.txt"])
def test_download_of_exactly_max_bytes_succeeds(server, out_dir, path):
    file = only_file(out_dir, download(server + path, out_dir, max_bytes=len(LARGE)))
    assert file.sha256 == hashlib.sha256(LARGE).hexdigest()
    assert (out_dir / file.stored).read_bytes() == LARGE


def test_pinned_bytes_known_here_need_no_network(out_dir, caplog):
    """The book's story, pinned by data.sha256, comes from the copy shipped with the package;
    once stored, a run by hand takes it from the previous output. The URL is never asked."""
    url = f"http://127.0.0.1:{closed_port()}/the-verdict.txt"
    with caplog.at_level(logging.INFO, logger="gptpipe.download"):
        file = only_file(out_dir, download(url, out_dir, VERDICT_SHA256))
    assert "the copy shipped with gptpipe" in caplog.text and "not downloaded" in caplog.text
    assert (out_dir / file.stored).read_bytes() == (SHIPPED / "the-verdict.txt").read_bytes()
    other = f"http://127.0.0.1:{closed_port()}/elsewhere/story.txt"
    stored = out_dir / "story.txt"
    stored.write_bytes(GOOD)
    (out_dir / "sources.json").write_text(json.dumps({"files": [{
        "source": other, "name": other, "split": None, "bytes": len(GOOD), "sha256": GOOD_SHA256,
        "stored": "story.txt"}]}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptpipe.download"):
        assert only_file(out_dir, download(other, out_dir, GOOD_SHA256)).stored == "story.txt"
    assert "the file this stage stored before" in caplog.text and stored.read_bytes() == GOOD


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
        download(url, out_dir, timeout=10, **kwargs)
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
        data, words = {"url": f"http://127.0.0.1:{closed_port()}/x", "sha256": None}, ["cannot reach"]
    else:  # the stage must pass data.max_bytes on
        data, words = {"url": str(local_corpus), "sha256": None, "max_bytes": 10}, ["data.max_bytes=10"]
    params = write_params(tmp_path / "params.yaml", **data)
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run([sys.executable, "stages/download.py", "--params", str(params),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert list(out.iterdir()) == []


# Several sources: data.url as a list, a directory or a glob; .gz; per-source checksums.

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


def test_a_list_of_sources_is_listed_in_order(server, local_corpus, out_dir):
    other = local_corpus.with_name("other.txt")
    other.write_bytes(OTHER)
    sources = [f"{server}/corpus.txt", {"url": str(other), "sha256": sha256(OTHER)},
               {"url": local_corpus.as_uri(), "sha256": None}]
    files = download(sources, out_dir, val_url=f"{server}/corpus.txt.gz")
    assert [(f.source, f.sha256, f.split) for f in files] == [
        (f"{server}/corpus.txt", GOOD_SHA256, None), (str(other), sha256(OTHER), None),
        (local_corpus.as_uri(), GOOD_SHA256, None), (f"{server}/corpus.txt.gz", sha256(GZIPPED), "val")]
    assert [f.stored for f in files] == ["corpus.txt", None, None, "corpus.txt.gz"]
    assert (out_dir / "corpus.txt.gz").read_bytes() == GZIPPED  # as published: it stays compressed
    assert read_manifest(out_dir) == files


def test_directory_and_glob_take_files_sorted_by_path_skipping_hidden(documents, out_dir):
    names = [Path(f.local).relative_to(documents).as_posix() for f in download(str(documents), out_dir)]
    assert names == ["a.txt", "b/c.txt", "d.txt.gz"]
    names = [Path(f.local).relative_to(documents).as_posix() for f in download(f"{documents}/**/*.txt", out_dir)]
    assert names == ["a.txt", "b/c.txt"]


def test_files_stored_by_the_previous_run_and_not_this_one_are_removed(server, out_dir):
    download(f"{server}/corpus.txt", out_dir)
    (out_dir / "notes.md").write_text("the user's own file")
    download(f"{server}/large.txt", out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["large.txt", "notes.md", "sources.json"]


# (sources, download() keywords, words the message must contain); {src}: local_corpus's folder
MULTI_FAILURES = {
    "source-checksum": (lambda src: [str(src / "corpus.txt"), {"url": str(src / "other.txt"), "sha256": "0" * 64}],
                        {}, ["checksum mismatch", str(Path("other.txt")), sha256(OTHER), "data.url"]),
    "sha256-of-several": (lambda src: [str(src / "corpus.txt"), str(src / "other.txt")], {"sha256": "0" * 64},
                          ["data.sha256 checks one file", "data.url names 2", "{url: ..., sha256: ...}"]),
    "max-bytes-over-all-sources": (lambda src: [str(src / "corpus.txt"), str(src / "other.txt")],
                                   {"max_bytes": len(GOOD) + 10}, ["the corpus reaches", "data.max_bytes"]),
    "parquet-compressed": (lambda src: str(src / "rows.parquet.gz"), {}, ["compresses its own columns"]),
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
    (src / "rows.parquet.gz").write_bytes(GZIPPED)
    (src / "empty").mkdir()
    with pytest.raises(PipelineError) as excinfo:
        download(sources(src), out_dir, **kwargs)
    for word in words:
        assert word in str(excinfo.value)
    assert list(out_dir.iterdir()) == []


def test_a_source_inside_the_output_folder_is_refused(local_corpus):
    with pytest.raises(PipelineError, match="inside the download stage's output folder"):
        download(str(local_corpus.parent), local_corpus.parent)
    assert [p.name for p in local_corpus.parent.iterdir()] == ["corpus.txt"]


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
                                                   "sha256": sha256((documents / "d.txt.gz").read_bytes())}],
                          val_url=str(documents / "b"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "stages/download.py", "--params", str(params), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [(f.local, f.split) for f in read_manifest(out)] == [
        (str(local_corpus), None), (str(documents / "d.txt.gz"), None), (str(documents / "b" / "c.txt"), "val")]


def test_under_dvc_a_pinned_file_stored_before_comes_from_the_dvc_cache(server, dvc_project):
    """`dvc repro` removes data/raw before download runs again (here: data.max_bytes changed);
    the file the run in dvc.lock stored is then taken from DVC's cache, not the network."""
    from conftest import run_dvc

    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["data"].update(url=f"{server}/corpus.txt", sha256=GOOD_SHA256)
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_dvc(dvc_project, "repro", "download")
    stored = dvc_project / "data/raw/corpus.txt"
    assert stored.read_bytes() == GOOD
    params["data"].update(url=f"http://127.0.0.1:{closed_port()}/corpus.txt", max_bytes=10**9)  # no network
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_dvc(dvc_project, "repro", "download")  # the URL is unreachable: the bytes can only be DVC's
    assert stored.read_bytes() == GOOD and read_manifest(stored.parent)[0].stored == "corpus.txt"


def test_the_default_download_runs_with_the_network_blocked(tmp_path, monkeypatch, caplog):
    """The project's own params.yaml (the book's story at its GitHub URL, its SHA-256 pinned)
    with every connection refused: the shipped copy is used and the stage says so."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("the network is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with caplog.at_level(logging.INFO):
        run_stage("download", ROOT / "params.yaml", "--out", str(tmp_path / "raw"))
    assert "the copy shipped with gptpipe" in caplog.text
    (file,) = read_manifest(tmp_path / "raw")
    assert file.source == load_params(ROOT / "params.yaml").data.url and file.sha256 == VERDICT_SHA256
    assert (tmp_path / "raw" / file.stored).read_bytes() == (SHIPPED / "the-verdict.txt").read_bytes()
