"""What a training run reports, each file written atomically:

- <plots>/losses.csv: one row per logged evaluation (dvc.yaml draws it with `dvc plots show`);
- <plots>/lr.csv: the learning rate of every optimizer step;
- <plots>/figures/*.png: the same curves as images, which open without a browser or internet;
- the metrics JSON: the last logged losses, steps, tokens seen and speed.
"""

from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gptpipe.files import atomic_open, atomic_path, write_json  # noqa: E402
from gptpipe.metrics import perplexity  # noqa: E402
from gptpipe.train import LRSchedule, TrainState  # noqa: E402

LOSS_COLUMNS = ["step", "epoch", "tokens_seen", "train_loss", "val_loss", "train_perplexity",
                "val_perplexity", "lr", "grad_norm"]
FIGURES = {  # file name: (table, x column, y columns, y label)
    "loss_by_step.png": ("losses", "step", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "loss_by_tokens.png": ("losses", "tokens_seen", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "perplexity.png": ("losses", "step", ["train_perplexity", "val_perplexity"], "perplexity"),
    "lr.png": ("lrs", "step", ["lr"], "learning rate"),
}


def loss_table(state: TrainState) -> pd.DataFrame:
    losses = pd.DataFrame([asdict(r) for r in state.records],
                          columns=[c for c in LOSS_COLUMNS if not c.endswith("perplexity")])
    losses["train_perplexity"] = losses["train_loss"].map(perplexity)
    losses["val_perplexity"] = losses["val_loss"].map(perplexity)
    return losses[LOSS_COLUMNS]


def lr_table(state: TrainState, schedule: LRSchedule) -> pd.DataFrame:
    return pd.DataFrame({"step": range(state.step), "lr": [schedule.lr_at(s) for s in range(state.step)]})


def write_report(state: TrainState, schedule: LRSchedule, plots_dir: str | Path, metrics_path: str | Path,
                 figures: bool = True) -> None:
    """Write the curves and metrics of `state`; the PNG figures too unless `figures` is False."""
    plots_dir = Path(plots_dir)
    tables = {"losses": loss_table(state), "lrs": lr_table(state, schedule)}
    for name, table in (("losses.csv", tables["losses"]), ("lr.csv", tables["lrs"])):
        with atomic_open(plots_dir / name) as f:
            table.to_csv(f, index=False)
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


def save_figure(table: pd.DataFrame, x: str, ys: list[str], ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for y in ys:
        ax.plot(table[x], table[y], label=y.replace("_", " "), linestyle="-." if y.startswith("val") else "-")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
