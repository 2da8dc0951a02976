"""The Hugging Face Hub: GPT-2 checkpoints named in `model.init_from`, and dataset files named in
`data.url` (hf://datasets/..., see gptpipe.sources).

`gpt2`, `gpt2-medium`, `gpt2-large` and `gpt2-xl` are OpenAI's models in openai-community/,
each at a pinned commit, so that the same params load the same weights. Any other repo id
(`org/name`) is read at its `main` branch, or at the revision after an `@`:
`org/name@<commit, branch or tag>`.

Only config.json and model.safetensors are downloaded, by huggingface_hub into its own cache
(HF_HOME, HF_HUB_CACHE), with its progress bars, its resuming of interrupted downloads, its
token (HF_TOKEN, `hf auth login`) and its offline mode (HF_HUB_OFFLINE=1: the cache only).
"""

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, resolve_revision, snapshot_download
from huggingface_hub.errors import (DryRunError, EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                    LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
                                    RevisionResolutionError)
from huggingface_hub.utils import filter_repo_objects

from gptpipe.errors import PipelineError
from gptpipe.sources import HubFiles, is_sha256

log = logging.getLogger(__name__)

# name: (repo, commit). The commits are each repository's main branch as it has stood since the
# safetensors files were added; docs/weights.md says how they were checked.
GPT2_SIZES = {
    "gpt2": ("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e"),
    "gpt2-medium": ("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"),
    "gpt2-large": ("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519"),
    "gpt2-xl": ("openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2"),
}
HUB_ID = re.compile(r"(?P<repo>gpt2(?:-medium|-large|-xl)?|[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
# Dataset files downloaded at once, and the bytes each reads at a time. huggingface_hub's
# defaults, 8 downloads of 10 MB chunks (each chunk gathered in a buffer, then copied out), made
# the stage's peak 250-350 MB, higher the longer the downloads overlapped; 2 of 1 MiB keep it
# under 50 MB however large the shards, as fast over localhost (bench/bench_corpus.py).
DATASET_DOWNLOADS = 2
DATASET_CHUNK_BYTES = 1 << 20
# Names that are files, not repositories: a missing local checkpoint is reported as such.
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".json")


@dataclass(frozen=True)
class HubCheckpoint:
    repo: str
    revision: str

    def __str__(self) -> str:
        return f"{self.repo} at revision {self.revision}"


def parse_hub_id(text: str) -> HubCheckpoint | None:
    """The repository and revision `text` names (gpt2..., org/name, org/name@revision), or None."""
    match = HUB_ID.fullmatch(text)
    if match is None or text.endswith(FILE_SUFFIXES):
        return None
    name, revision = match["repo"], match["revision"]
    if name in GPT2_SIZES:
        repo, pinned = GPT2_SIZES[name]
        return HubCheckpoint(repo, revision or pinned)
    return HubCheckpoint(name, revision or constants.DEFAULT_REVISION)


def download(checkpoint: HubCheckpoint, filenames: tuple[str, ...], source: str) -> Path:
    """The snapshot directory holding `filenames` of `checkpoint` in huggingface_hub's cache,
    downloaded first unless they are there. `source` is model.init_from, for messages."""
    where = f"model.init_from={source}: {checkpoint}"
    log.info(f"{where} (Hugging Face cache: {constants.HF_HUB_CACHE})")
    revision = checkpoint.revision
    filename = filenames[0]
    with hub_errors(where, f"model.init_from={checkpoint.repo}", lambda: (
            f"the repository has no {filename}; a GPT-2 checkpoint here is {' + '.join(filenames)} (a "
            f"pytorch_model.bin is not read: unpickling it could run code)"), f"; nor is there a local path {source}"):
        for filename in filenames:
            path = Path(hf_hub_download(checkpoint.repo, filename, revision=revision))
            # The snapshot folder is named by the commit: the later files come from that same
            # commit even if a branch moves meanwhile.
            revision = path.parent.name
    if not COMMIT.fullmatch(checkpoint.revision):
        log.info(f"{checkpoint.revision} is commit {revision}: model.init_from={checkpoint.repo}@{revision} "
                 f"loads these weights even after the repository changes")
    return path.parent


def dataset_files(files: HubFiles, key: str, max_bytes: int | None) -> tuple[str, list[tuple[str, Path]]]:
    """The commit that `files`' revision names and, for each file it matches, sorted by path, its
    path in the repository and in huggingface_hub's cache, downloaded first unless it is there.
    Online, the matching files' sizes are checked against `max_bytes` before anything is
    downloaded; offline (HF_HUB_OFFLINE=1, or the Hub unreachable), the cache alone answers.
    `key` names the param, for messages."""
    where = f"{key}: {files}"
    log.info(f"{where} (Hugging Face cache: {constants.HF_HUB_CACHE})")
    no_match = f"no file of the repository matches {files.pattern!r}; check the path (case matters) on " \
               f"{constants.ENDPOINT}/datasets/{files.repo}/tree/{files.revision}"
    with hub_errors(where, f"{key}=hf://datasets/{files.repo}", lambda: no_match):
        # The commit the revision names now (recorded in the cache's refs/, which answer offline),
        # so that the size check and the download see the same files.
        revision = resolve_revision(files.repo, repo_type="dataset", revision=files.revision)
        try:
            planned = snapshot_download(files.repo, repo_type="dataset", revision=revision,
                                        allow_patterns=files.pattern, dry_run=True)
        except DryRunError:  # neither the Hub nor the cache's listing of that commit: the cache decides below
            planned = None
        if planned is not None:
            if not planned:
                raise PipelineError(f"{where}: {no_match}")
            total = sum(info.file_size or 0 for info in planned)
            if max_bytes is not None and total > max_bytes:
                raise PipelineError(f"{where}: its {len(planned)} file(s) hold {total:,} bytes, more than "
                                    f"data.max_bytes={max_bytes}; if that is intended, raise data.max_bytes "
                                    f"(or set it to null), e.g. `dvc exp run -S data.max_bytes={2 * total}`")
        with download_chunks(DATASET_CHUNK_BYTES):
            folder = Path(snapshot_download(files.repo, repo_type="dataset", revision=revision,
                                            allow_patterns=files.pattern, max_workers=DATASET_DOWNLOADS))
    names = sorted(filter_repo_objects((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                                       allow_patterns=files.pattern))
    if not names:
        raise PipelineError(f"{where}: {no_match}" if planned is not None else
                            f"{where}: no file matching it is in the Hugging Face cache {constants.HF_HUB_CACHE}, "
                            f"and the Hub cannot be reached (HF_HUB_OFFLINE or no network): run once with network")
    if not COMMIT.fullmatch(files.revision):
        log.info(f"{files.revision} is commit {folder.name}: hf://datasets/{files.repo}@{folder.name}/"
                 f"{files.pattern} names these bytes even after the repository changes")
    return folder.name, [(name, folder / name) for name in names]


def dataset_file(repo: str, commit: str, path: str, key: str) -> Path:
    """One file of a dataset at a commit, from huggingface_hub's cache or downloaded into it."""
    where = f"{key}: {path} of dataset {repo} at commit {commit}"
    with hub_errors(where, f"{key}=hf://datasets/{repo}", lambda: "the repository has no such file at that commit"):
        return Path(hf_hub_download(repo, path, repo_type="dataset", revision=commit))


def lfs_sha256(path: Path) -> str | None:
    """The SHA-256 of a Git LFS file in huggingface_hub's cache, as the Hub gave it, without
    reading the file: a snapshot's file links to a blob named by the file's etag, which for an LFS
    file is its SHA-256 (for a file in git, its 40-digit git hash). None when the name does not
    say (not an LFS file, or a cache without symlinks). huggingface_hub checks a download's size,
    not this hash: the tokenize stage checks it as it reads the file."""
    if not path.is_symlink():
        return None
    blob = path.resolve()
    return blob.name if blob.parent.name == "blobs" and is_sha256(blob.name) else None


def cache_fix(path: Path) -> str:
    """How to remove a damaged file from huggingface_hub's cache so that it is downloaded again."""
    blob = path.resolve()
    where = f"{path} and its blob {blob}" if blob != path else str(path)
    return f"delete {where} from the Hugging Face cache, then run the pipeline again (the file is downloaded anew)"


@contextmanager
def download_chunks(size: int) -> Iterator[None]:
    """huggingface_hub's downloads read `size` bytes at a time inside the block (it reads the
    module constant at each download; there is no argument for it)."""
    default, constants.DOWNLOAD_CHUNK_SIZE = constants.DOWNLOAD_CHUNK_SIZE, size
    try:
        yield
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = default


@contextmanager
def hub_errors(where: str, param: str, missing_file: Callable[[], str], not_found: str = "") -> Iterator[None]:
    """huggingface_hub's failures inside the block as one-line PipelineErrors that start with
    `where`. `param` is how the user names the repository (for the fix), `missing_file` says what
    is missing when the Hub has no such file, `not_found` adds to a missing repository's message."""
    try:
        yield
    except (LocalEntryNotFoundError, RevisionResolutionError):
        if constants.HF_HUB_OFFLINE:
            raise PipelineError(f"{where} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                                f"HF_HUB_OFFLINE is set: run once with network (HF_HUB_OFFLINE unset), or set "
                                f"HF_HOME to a cache that holds it") from None
        raise PipelineError(f"{where} cannot be downloaded: the Hugging Face Hub ({constants.ENDPOINT}) is "
                            f"unreachable and the files are not in the cache {constants.HF_HUB_CACHE}; check the "
                            f"network or proxy (HTTPS_PROXY), or set HF_HOME to a cache that holds them (and "
                            f"HF_HUB_OFFLINE=1 not to wait for the network)") from None
    except GatedRepoError:
        raise PipelineError(f"{where}: the repository is gated; accept its conditions on its page at "
                            f"{constants.ENDPOINT} and log in with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise PipelineError(f"{where}: no such repository on the Hugging Face Hub, or it is private and "
                            f"needs a token (`hf auth login` or HF_TOKEN){not_found}") from None
    except RevisionNotFoundError:
        raise PipelineError(f"{where}: the repository has no such revision; give a commit, branch or tag "
                            f"of it after @ ({param}@<revision>)") from None
    except EntryNotFoundError:
        raise PipelineError(f"{where}: {missing_file()}") from None
    except HfHubHTTPError as e:
        raise PipelineError(f"{where}: the Hugging Face Hub answered {first_line(e)}; check the token "
                            f"(HF_TOKEN, `hf auth login`) or try again later") from None
    except OSError as e:
        raise PipelineError(f"{where}: writing the download to {constants.HF_HUB_CACHE} failed: {e}; free "
                            f"space there or set HF_HOME to another folder") from None


def first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
