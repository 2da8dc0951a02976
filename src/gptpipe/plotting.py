"""PNG loss curves, for users who cannot load `dvc plots show`'s chart library from a CDN."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from gptpipe.files import atomic_path  # noqa: E402

FIGURES = {  # file name: (x column, y columns, y label)
    "loss_by_step.png": ("step", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "loss_by_tokens.png": ("tokens_seen", ["train_loss", "val_loss"], "cross-entropy (nats/token)"),
    "perplexity.png": ("step", ["train_perplexity", "val_perplexity"], "perplexity"),
}


def save_loss_figures(losses: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (x, ys, ylabel) in FIGURES.items():
        save_figure(losses, x, ys, ylabel, out_dir / name)
    return [out_dir / name for name in FIGURES]


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
