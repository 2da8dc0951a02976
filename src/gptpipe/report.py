"""What a training run reports, each file written atomically, at every logged evaluation and
at the end, so that `dvc plots show`, `dvc metrics show`, `dvc exp show` and the VS Code
extension follow a run while it trains:

- <plots>/losses.csv: one row per logged evaluation (dvc.yaml draws it with `dvc plots show`);
- <plots>/lr.csv: the learning rate of every optimizer step;
- the metrics JSON: the last logged losses, steps, tokens seen, speed, and the architecture
  the run trains (its `auto` params resolved).
"""

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptpipe.files import atomic_open, write_json, written_together
from gptpipe.metrics import perplexity
from gptpipe.params import GPTConfig
from gptpipe.train import LRSchedule, TrainState

LOSS_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "train_perplexity",
                "val_perplexity", "lr", "grad_norm"]
LR_COLUMNS = ["step", "lr"]


class TrainingReport:
    """The report files of one run. A write formats only the rows added since the previous
    one, so an evaluation late in a long run costs writing the files, not reformatting every
    step so far."""

    def __init__(self, schedule: LRSchedule, plots_dir: str | Path, metrics_path: str | Path,
                 architecture: GPTConfig, parameters: int):
        self.schedule = schedule
        self.plots_dir = Path(plots_dir)
        self.metrics_path = Path(metrics_path)
        self.architecture = {**asdict(architecture), "parameters": parameters}
        self.columns = {"losses.csv": LOSS_COLUMNS, "lr.csv": LR_COLUMNS}
        self.rows: dict[str, list[tuple]] = {name: [] for name in self.columns}
        self.lines = {name: [csv_line(columns)] for name, columns in self.columns.items()}

    @property
    def live_files(self) -> list[Path]:
        """What every write rewrites."""
        return [self.plots_dir / name for name in self.lines] + [self.metrics_path]

    def write(self, state: TrainState) -> None:
        """Write the curves and metrics of `state`."""
        for record in state.records[len(self.rows["losses.csv"]):]:
            self.add("losses.csv", {**asdict(record), "train_perplexity": perplexity(record.train_loss),
                                    "val_perplexity": perplexity(record.val_loss)})
        for step in range(len(self.rows["lr.csv"]), state.step):
            self.add("lr.csv", {"step": step, "lr": self.schedule.lr_at(step)})
        last = state.records[-1] if state.records else None
        with written_together():  # the curves and the metrics of one moment, or none of them
            for name, lines in self.lines.items():
                with atomic_open(self.plots_dir / name) as f:
                    f.write("".join(lines))
            write_json(self.metrics_path, {
                "loss": {"train": last.train_loss if last else None, "val": last.val_loss if last else None},
                "steps": state.step,
                "tokens_seen": state.tokens_seen,
                "tokens_per_second": round(state.tokens_seen / state.seconds, 1) if state.seconds else None,
                "wall_seconds": round(state.seconds, 2),
                "architecture": self.architecture,  # not "model", which dvc exp show would mix with the params
            })

    def add(self, table: str, values: dict[str, Any]) -> None:
        row = tuple(values[column] for column in self.columns[table])
        self.rows[table].append(row)
        self.lines[table].append(csv_line(row))


def csv_line(values: tuple | list) -> str:
    """A CSV row of names and numbers (none needs quoting); NaN, a gradient norm not
    measured, as an empty cell."""
    return ",".join("" if isinstance(v, float) and math.isnan(v) else str(v) for v in values) + "\n"
