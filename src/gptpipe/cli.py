"""What every stage script shares: argument parsing conventions, error reporting, the CPUs it
may use.

`run` is the one place where a stage's failures become one `error:` line and exit status 1:
a PipelineError, any OSError (gptpipe.errors.os_error_message), running out of memory, bad
command-line options, and Ctrl-C or SIGTERM. SIGTERM is raised as an exception, like Ctrl-C's
KeyboardInterrupt, so that every atomic writer removes its temporary file on the way out and
the previous outputs stay in place (pretrain catches both signals itself, to save its state).
"""

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from tqdm import tqdm

from gptpipe.errors import PipelineError, Terminated, os_error_message


def raise_terminated(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


class StageArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad option is a failure like a bad param: one line, exit status 1 (argparse: 2, with usage)."""
        raise PipelineError(f"{message}; see --help")


def available_cpus() -> int:
    """The CPUs (hardware threads) this process may run on: its affinity mask, which a
    container's or taskset's limit sets, else all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parser(description: str) -> argparse.ArgumentParser:
    p = StageArgumentParser(description=description.strip().split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="the params file to read")
    return p


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def out_of_memory(e: BaseException) -> bool:
    # torch reports a failed CPU allocation as a plain RuntimeError, a CUDA one as OutOfMemoryError
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def fail(message: str) -> NoReturn:
    # tqdm.write first clears a progress bar left open on stderr (a loop cut short), so that the
    # error gets a line of its own
    tqdm.write("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
    sys.exit(1)


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's main(argv) (None: the command line); every failure becomes one line on
    stderr and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # huggingface_hub's HTTP client logs every request
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main(argv)
    except PipelineError as e:
        fail(str(e))
    except OSError as e:
        fail(os_error_message(e))  # atomic writes leave the previous version of the file in place
    except KeyboardInterrupt as e:
        fail(f"stopped by {'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C (SIGINT)'} before the "
             f"stage finished; its previous outputs are unchanged: run it again")
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        fail(f"out of memory ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); make the "
             f"model or the batches smaller (model.*, train.batch_size, evaluate.batch_size) or free memory")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if argv is None:
            # The process ends next. Python's shutdown runs full garbage collections over every
            # object torch created (~1 s, measured with perf); frozen objects are skipped.
            gc.freeze()
