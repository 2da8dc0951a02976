import errno
import signal


class PipelineError(Exception):
    """A failure the user can act on: the message names the cause and the fix.

    Stage scripts print it without a traceback and exit non-zero.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, raised like Ctrl-C's KeyboardInterrupt wherever the program was."""


def interruption(signum: int) -> KeyboardInterrupt:
    """The exception that stops the program at once on signal `signum` (SIGINT or SIGTERM)."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def os_error_message(e: OSError) -> str:
    """An operating-system error as one line: what happened to which path, and what to do."""
    path = e.filename if e.filename is not None else "an output"
    replace = "remove or rename it, or choose another path"
    messages = {
        errno.ENOSPC: f"no space left on the device writing {path}; free space (e.g. `dvc gc` for old "
                      f"cache entries) or move the DVC cache (`dvc cache dir`)",
        errno.EDQUOT: f"disk quota exceeded writing {path}; free space or choose another path",
        errno.EACCES: f"permission denied for {path}; check its permissions and those of its folder, "
                      f"or choose another path",
        errno.EROFS: f"{path} is on a read-only file system; choose a path on a writable one",
        errno.EISDIR: f"{path} is a directory where a file is expected; {replace}",
        errno.ENOTDIR: f"a part of {path} is a file where a directory is expected; {replace}",
        errno.EEXIST: f"{path} exists and is not a directory, where a directory is expected; {replace}",
        errno.ENOENT: f"{path} does not exist; check the path",
        errno.ENAMETOOLONG: f"the name {path} is too long for the file system; choose a shorter path",
    }
    messages[errno.EPERM] = messages[errno.EACCES]
    return messages.get(e.errno, f"{e.strerror or e or type(e).__name__} ({path}); check the path, its "
                                 f"permissions and the device")
