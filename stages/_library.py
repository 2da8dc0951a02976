"""Put this checkout's src/ first on sys.path, so that a stage imports the library next to it,
the copy dvc.yaml tracks, and not an installed one: a queued experiment runs in its own
copy of the repository, while an editable install points at the workspace's src/.

Every stage script imports this module before gptpipe.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
