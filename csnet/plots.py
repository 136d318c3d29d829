"""Figures drawn from metrics.csv alone (never from models): the seed-003 comparison plots.

Test accuracy per task against epoch and total training loss against epoch, one
line per run, as in the Fashion-MNIST cross-stitch reproduction's figures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def test_accuracy(metrics: dict[str, pd.DataFrame], path: Path) -> Path:
    """One panel per task (and the mean over tasks), one line per run."""
    tasks = []
    for df in metrics.values():
        for t in df.loc[(df.split == "test") & (df.metric == "accuracy"), "task"].unique():
            if t not in tasks and t != "mean":
                tasks.append(t)
    panels = tasks + ["mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        for label, df in metrics.items():
            rows = df[(df.split == "test") & (df.metric == "accuracy") & (df.task == task)]
            if len(rows):
                ax.plot(rows.epoch, rows.value, marker="o", label=label)
        ax.set_title(f"test accuracy: {task}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def train_loss(metrics: dict[str, pd.DataFrame], path: Path) -> Path:
    """Total training loss (sum over tasks) per epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, df in metrics.items():
        rows = df[(df.split == "train") & (df.metric == "loss") & (df.task == "total")]
        ax.plot(rows.epoch, rows.value, marker="o", label=label)
    ax.set_title("training loss (sum over tasks)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def curves(metrics: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [test_accuracy(metrics, out_dir / "test_accuracy.png"), train_loss(metrics, out_dir / "train_loss.png")]
