"""What a training run reports, each file written atomically:

- <plots>/losses.csv: one row per logged evaluation (dvc.yaml draws it with `dvc plots show`);
- <plots>/lr.csv: the learning rate of every optimizer step;
- <plots>/figures/*.png: the same curves as images, which open without a browser or internet;
- the metrics JSON: the last logged losses, steps, tokens seen and speed.
"""

import csv
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gptpipe.files import atomic_open, atomic_path, write_json  # noqa: E402
from gptpipe.metrics import perplexity  # noqa: E402
from gptpipe.train import LRSchedule, TrainState  # noqa: E402

Table = list[dict[str, float]]

LOSS_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "train_perplexity",
                "val_perplexity", "lr", "grad_norm"]
FIGURES = {  # file name: (table, x column, y columns, y label)
    "loss_by_step.png": ("losses", "step", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "loss_by_tokens.png": ("losses", "tokens_seen", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "perplexity.png": ("losses", "step", ["train_perplexity", "val_perplexity"], "perplexity"),
    "lr.png": ("lrs", "step", ["lr"], "learning rate"),
}


def loss_table(state: TrainState) -> Table:
    return [{**asdict(r), "train_perplexity": perplexity(r.train_loss), "val_perplexity": perplexity(r.val_loss)}
            for r in state.records]


def lr_table(state: TrainState, schedule: LRSchedule) -> Table:
    return [{"step": step, "lr": schedule.lr_at(step)} for step in range(state.step)]


def write_csv(path: Path, table: Table, columns: list[str]) -> None:
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: format_value(row[key]) for key in columns} for row in table)


def format_value(value: float) -> str | float:
    """NaN (a grad_norm not measured) as an empty cell, as pandas writes it."""
    return "" if isinstance(value, float) and value != value else value


def write_report(state: TrainState, schedule: LRSchedule, plots_dir: str | Path, metrics_path: str | Path,
                 figures: bool = True) -> None:
    """Write the curves and metrics of `state`; the PNG figures too unless `figures` is False."""
    plots_dir = Path(plots_dir)
    tables = {"losses": loss_table(state), "lrs": lr_table(state, schedule)}
    write_csv(plots_dir / "losses.csv", tables["losses"], LOSS_COLUMNS)
    write_csv(plots_dir / "lr.csv", tables["lrs"], ["step", "lr"])
    if figures:
        for name, (table, x, ys, ylabel) in FIGURES.items():
            save_figure(tables[table], x, ys, ylabel, plots_dir / "figures" / name)
    last = state.records[-1] if state.records else None
    write_json(metrics_path, {
        "loss": {"train": last.train_loss if last else None, "val": last.val_loss if last else None},
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": round(state.tokens_seen / state.seconds, 1) if state.seconds else None,
        "wall_seconds": round(state.seconds, 2),
    })


def save_figure(table: Table, x: str, ys: list[str], ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for y in ys:
        ax.plot([row[x] for row in table], [row[y] for row in table], label=y.replace("_", " "),
                linestyle="-." if y.startswith("val") else "-")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
