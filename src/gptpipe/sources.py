"""What data.url names, and the manifest that the download stage hands to tokenize.

A source is an https/http/file URL, a local path (a file, a directory or a glob), or files of a
dataset on the Hugging Face Hub: `hf://datasets/<org>/<name>[@<revision>]/<path or glob>`.

The download stage resolves every source to files and writes `sources.json`, the manifest: for
each file where its bytes are, their size and SHA-256, and for a Hub file the commit. The bytes of
a file stay where they already are (the Hugging Face cache, the user's own folder); only a file
fetched from an http(s) URL is stored, as published, next to the manifest. So text is kept at most
once outside the source's own cache.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from gptpipe.errors import PipelineError
from gptpipe.files import write_json

MANIFEST = "sources.json"
SHA256_HEX_DIGITS = 64
HUB_DATASET = re.compile(r"hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?/(?P<pattern>.+)")


@dataclass(frozen=True)
class Source:
    url: str  # see the module's docstring
    sha256: str | None = None  # of the file as published, before any decompression


@dataclass(frozen=True)
class HubFiles:
    """Files of a Hugging Face dataset repository: `pattern` (a path or a glob) at `revision`."""
    repo: str
    revision: str
    pattern: str

    def __str__(self) -> str:
        return f"{self.pattern} of dataset {self.repo} at revision {self.revision}"


def parse_hub_files(url: str) -> HubFiles | None:
    """The dataset files an hf://datasets/ URL names; None for any other URL. A revision holding
    a slash (refs/convert/parquet) is written with %2F, as HfFileSystem writes it."""
    if not url.startswith("hf://"):
        return None
    match = HUB_DATASET.fullmatch(url)
    if match is None:
        raise PipelineError(f"data.url {url!r} is not a Hugging Face dataset path; write "
                            f"hf://datasets/<org>/<name>@<revision>/<file or glob>, e.g. hf://datasets/"
                            f"roneneldan/TinyStories@main/data/validation-*.parquet")
    return HubFiles(match["repo"], unquote(match["revision"] or "main"), match["pattern"])


def parse_sources(value: str | Sequence[str | Mapping[str, Any] | Source], key: str = "data.url") -> list[Source]:
    """A data.url value as a list of sources: a string, or a list whose items are strings or
    {url: ..., sha256: ...} mappings."""
    if isinstance(value, str):
        items: Sequence[Any] = [value]
    elif isinstance(value, Sequence) and value:
        items = value
    else:
        raise PipelineError(f"{key} must be a URL or path, or a non-empty list of them, got {value!r}")
    sources = []
    for i, item in enumerate(items, 1):
        where = key if isinstance(value, str) else f"{key} item {i}"
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
            raise PipelineError(f"{where} has an empty url: give an https/http/file URL, a local path or "
                                f"an hf://datasets/ path")
        if item.sha256 is not None and not is_sha256(item.sha256):
            raise PipelineError(f"{where}: sha256 must be {SHA256_HEX_DIGITS} lowercase hex digits "
                                f"or null, got {item.sha256!r}")
        parse_hub_files(item.url)
        sources.append(item)
    return sources


def is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == SHA256_HEX_DIGITS
            and all(c in "0123456789abcdef" for c in value))


# File formats, by name: the text field of each row of Parquet and JSON lines is a document; a
# file of any other name is one document of UTF-8 text. Any but Parquet may be compressed.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
ROW_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def file_format(name: str) -> tuple[str, str | None]:
    """(format, compression) of a file named `name`: format parquet, jsonl or text; compression
    gzip, zstd or None."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes.pop()
    kind = ROW_FORMATS.get(suffixes[-1], "text") if suffixes else "text"
    if kind == "parquet" and compression:
        raise PipelineError(f"{name}: a Parquet file compresses its own columns and is read as it is; "
                            f"decompress it, or name the .parquet file itself")
    return kind, compression


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus, as the manifest records it. Its bytes are in exactly one place:
    `stored` (a name next to the manifest), `local` (a path on this machine), or `hub` (repo,
    commit and path of a Hugging Face dataset file, in huggingface_hub's cache)."""
    source: str  # the data.url (or data.val_url) item it came from
    name: str  # for messages: a URL, a path, or hf://datasets/repo@commit/path
    split: str | None  # "val" for data.val_url's files; None: drawn by data.train_ratio/test_ratio
    bytes: int
    sha256: str
    stored: str | None = None
    local: str | None = None
    hub: dict[str, str] | None = None


def write_manifest(out_dir: Path, files: Sequence[CorpusFile]) -> None:
    write_json(out_dir / MANIFEST, {"files": [{k: v for k, v in asdict(f).items() if v is not None or k == "split"}
                                              for f in files]})


def read_manifest(out_dir: Path) -> list[CorpusFile]:
    path = out_dir / MANIFEST
    rerun = "run the download stage again (dvc repro download)"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        files = [CorpusFile(**entry) for entry in raw["files"]]
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the download stage first (dvc repro download)") from None
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PipelineError(f"{path} is not a manifest of the download stage ({e}): {rerun}") from None
    if not files:
        raise PipelineError(f"{path} lists no files: {rerun}")
    return files
