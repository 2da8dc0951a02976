"""What every stage script shares: argument parsing conventions and error reporting."""

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence

from gptpipe.errors import PipelineError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="the params file to read")
    return p


def run(main: Callable[[Sequence[str] | None], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one line on stderr and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(None)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # atomic writes leave the previous version of the file in place
        print(f"error: no space left on the device writing {e.filename or 'an output'}; free space "
              f"(e.g. `dvc gc` for old cache entries) or move the DVC cache (`dvc cache dir`)",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
