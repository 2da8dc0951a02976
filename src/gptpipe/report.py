"""What a training run reports, each file written atomically, at every logged evaluation and
at the end, so that `dvc plots show`, `dvc metrics show`, `dvc exp show` and the VS Code
extension follow a run while it trains:

- <plots>/losses.csv: one row per logged evaluation (dvc.yaml draws it with `dvc plots show`);
- <plots>/lr.csv: the learning rate of every optimizer step;
- the metrics JSON: the last logged losses, steps, tokens seen, speed, and the architecture
  the run trains (its `auto` params resolved);
- at the end only, <plots>/figures/*.png: the same curves as images (drawing them takes
  about a second).
"""

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gptpipe.files import atomic_open, atomic_path, write_json, written_together  # noqa: E402
from gptpipe.metrics import perplexity  # noqa: E402
from gptpipe.params import GPTConfig  # noqa: E402
from gptpipe.train import LRSchedule, TrainState  # noqa: E402

LOSS_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "train_perplexity",
                "val_perplexity", "lr", "grad_norm"]
LR_COLUMNS = ["step", "lr"]
FIGURES = {  # file name: (table, x column, y columns, y label)
    "loss_by_step.png": ("losses.csv", "step", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "loss_by_tokens.png": ("losses.csv", "tokens_seen", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "perplexity.png": ("losses.csv", "step", ["train_perplexity", "val_perplexity"], "perplexity"),
    "lr.png": ("lr.csv", "step", ["lr"], "learning rate"),
}


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
        """What every write rewrites (the figures wait for the end)."""
        return [self.plots_dir / name for name in self.lines] + [self.metrics_path]

    def write(self, state: TrainState, figures: bool = False) -> None:
        """Write the curves and metrics of `state`; the PNG figures too if `figures`."""
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
            if figures:
                for name, (table, x, ys, ylabel) in FIGURES.items():
                    self.save_figure(table, x, ys, ylabel, self.plots_dir / "figures" / name)
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

    def save_figure(self, table: str, x: str, ys: list[str], ylabel: str, path: Path) -> None:
        columns = self.columns[table]
        fig, ax = plt.subplots(figsize=(6, 4))
        for y in ys:
            ax.plot([row[columns.index(x)] for row in self.rows[table]],
                    [row[columns.index(y)] for row in self.rows[table]],
                    label=y.replace("_", " "), linestyle="-." if y.startswith("val") else "-")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)


def csv_line(values: tuple | list) -> str:
    """A CSV row of names and numbers (none needs quoting); NaN, a gradient norm not
    measured, as an empty cell."""
    return ",".join("" if isinstance(v, float) and math.isnan(v) else str(v) for v in values) + "\n"
