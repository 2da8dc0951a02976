"""Atomic writes: a killed process never leaves a half-written file that a later stage trusts.

Every output is written to a temporary file next to it and renamed into place only when it is
complete. On any failure (an exception, Ctrl-C, SIGTERM: see gptpipe.cli) the temporary file is
removed and the previous output stays as it was. Inside `written_together()`, the renames of
all the block's outputs wait for the block's end, so a stage's outputs never mix two runs.
Files that a long block rewrites as it goes (pretrain's live curves) are put back by
`put_back_on_failure` if the block fails.
"""

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# Below this much free space, a failed write is taken to be the full disk's doing (see os_error_of).
NEARLY_FULL_BYTES = 1 << 20

_pending: ContextVar[list[tuple[Path, Path]] | None] = ContextVar("pending_renames", default=None)


@cache
def output_mode() -> int:
    """The mode a new file gets under the process's umask (0666 & ~umask), as DVC's own outputs;
    mkstemp creates 0600, which other users could not read."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    An error while writing it is reported for `path`, as the OSError it is (see os_error_of)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # the folder takes no new file: say so for the output, not for a random name
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    tmp = Path(name)
    pending = _pending.get()
    handed_over = False
    try:
        yield tmp
        os.chmod(tmp, output_mode())  # after the block: a library may have replaced the file (safetensors does)
        if pending is None:
            os.replace(tmp, path)
        else:
            pending.append((tmp, path))
            handed_over = True
    except Exception as e:
        found = os_error_of(e, tmp, path)
        if found is e:
            raise
        raise found from e
    finally:
        if not handed_over:
            tmp.unlink(missing_ok=True)


@contextmanager
def written_together() -> Iterator[None]:
    """Atomic writes inside the block land together when it ends: a failure or a signal before
    then leaves every previous output in place (the renames themselves take microseconds).
    Inside another such block, they land with that block's."""
    if _pending.get() is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _pending.set(pending)
    try:
        yield
        for _, path in pending:  # the one rename that fails for a reason known beforehand
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        for tmp, path in pending:
            os.replace(tmp, path)
    finally:
        _pending.reset(token)
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)


class KeptFiles:
    """See put_back_on_failure."""

    def __init__(self, paths: Iterable[Path], keep_dir: Path):
        self.keep_dir = keep_dir
        keep_dir.mkdir(parents=True, exist_ok=True)
        # path: (its previous bytes kept under keep_dir, or None where there was no file; its identity)
        self.kept: dict[Path, tuple[Path | None, tuple | None]] = {}
        for i, path in enumerate(paths):
            copy = keep_dir / f"{i}.{path.name}"
            copy.unlink(missing_ok=True)  # left by a killed run: the workspace may have changed since
            if path.is_file():
                try:
                    os.link(path, copy)  # no bytes copied, and putting it back is a rename
                except OSError:  # another file system, or a file of another user (protected_hardlinks)
                    shutil.copy2(path, copy)
            self.kept[path] = (copy if path.is_file() else None, identity(path))

    def put_back(self) -> None:
        for path, (copy, before) in self.kept.items():
            if identity(path) == before:
                continue  # not rewritten
            try:
                if copy is None:
                    path.unlink(missing_ok=True)
                    continue
                try:
                    os.replace(copy, path)
                except OSError:  # across file systems
                    with atomic_path(path) as tmp:
                        shutil.copyfile(copy, tmp)
            except OSError as e:
                log.warning(f"could not put {path} back as it was ({e.strerror or e}): it shows the failed "
                            f"run; `dvc checkout` restores the outputs dvc.lock names")

    def discard(self) -> None:
        """Keep the files as they are now, whatever happens next."""
        for copy, _ in self.kept.values():
            if copy is not None:
                copy.unlink(missing_ok=True)
        self.kept = {}
        try:
            self.keep_dir.rmdir()
        except OSError:
            pass  # not empty: something else lives there


def identity(path: Path) -> tuple | None:
    """What changes when a file is replaced or rewritten; None when there is none."""
    try:
        st = path.stat()
    except OSError:  # none there, or no way to it (which the writes will report)
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@contextmanager
def put_back_on_failure(paths: Iterable[Path], keep_dir: Path) -> Iterator[KeptFiles]:
    """The files at `paths` as they are when the block starts, put back byte for byte if the
    block raises anything, Ctrl-C and SIGTERM included (one that did not exist is removed again);
    after `kept.discard()`, or at the block's end, they stay as the block left them. The block
    must rewrite them by atomic writes (a new file renamed into place): the previous ones are
    kept as hard links in `keep_dir`, so putting them back is a rename, which a full disk allows
    too. A process killed outright (SIGKILL) leaves the block's files and the links."""
    kept = KeptFiles(paths, keep_dir)
    try:
        yield kept
    except BaseException:
        kept.put_back()
        raise
    finally:
        kept.discard()


def os_error_of(e: BaseException, tmp: Path, path: Path) -> BaseException:
    """The OSError behind a failed write of `path` through its temporary file `tmp`, naming `path`;
    `e` itself when it is not about the write. Libraries that write files themselves report a
    failed write in their own exception type: safetensors with the OS error's number ("os error
    28"), torch.save as a bare RuntimeError ("unexpected pos ..."), so a full disk is recognised
    by the space left on it."""
    if isinstance(e, OSError):
        if e.filename in (None, str(tmp)):
            return OSError(e.errno, e.strerror, str(path))
        return e
    if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
        number = re.search(r"\(os error (\d+)\)", str(e))
        if number:
            code = int(number.group(1))
            return OSError(code, os.strerror(code), str(path))
        if shutil.disk_usage(path.parent).free < NEARLY_FULL_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return e


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, data: Any) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
