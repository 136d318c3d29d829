"""Figures drawn from metrics.csv alone (never from models): the seed-003 comparison plots.

Each task's primary test metric against epoch (accuracy for classification, as in the
Fashion-MNIST cross-stitch reproduction's figures) and total training loss against epoch,
one line per run.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from csnet.errors import CsnetError  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:  # a full disk, a read-only folder
        raise CsnetError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return path


def test_metrics(metrics: dict[str, pd.DataFrame], path: Path, primary: dict[str, str] | None = None) -> Path:
    """One panel per task (its primary metric: accuracy unless ``primary`` names another) and one for the
    score (the mean over tasks), one line per run."""
    primary = primary or {}
    tasks = []
    for df in metrics.values():
        for t in df.loc[df.split == "test", "task"].unique():
            if t not in tasks and t not in ("mean", "total", "all"):
                tasks.append(t)
    panels = [(t, primary.get(t, "accuracy")) for t in tasks] + [("mean", "score")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        for label, df in metrics.items():
            rows = df[(df.split == "test") & (df.task == task) & (df.metric == metric)]
            if task == "mean" and rows.empty:  # a run of an older csnet: its score was the mean accuracy
                rows = df[(df.split == "test") & (df.task == task) & (df.metric == "accuracy")]
            if len(rows):
                ax.plot(rows.epoch, rows.value, marker="o", label=label)
        ax.set_title(f"test {metric}: {task}" if task != "mean" else "test score (mean of the tasks' metrics)",
                     fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
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


def loss_weights(metrics: dict[str, pd.DataFrame], path: Path) -> Path:
    """Each task's loss weight against epoch (the run's --weighting), one line per run and task."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, df in metrics.items():
        rows = df[(df.split == "train") & (df.metric == "loss_weight")]
        for task, r in rows.groupby("task", sort=False):
            ax.plot(r.epoch, r.value, marker="o", label=f"{label}: {task}" if len(metrics) > 1 else task)
    ax.set_title("loss weight per task")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def curves(metrics: dict[str, pd.DataFrame], out_dir: Path, primary: dict[str, str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [test_metrics(metrics, out_dir / "test_metrics.png", primary),
               train_loss(metrics, out_dir / "train_loss.png")]
    # drawn where a weighting moved the weights: the plain sum's are 1 throughout
    if any(((df.metric == "loss_weight") & (df.value != 1)).any() for df in metrics.values()):
        figures.append(loss_weights(metrics, out_dir / "loss_weights.png"))
    return figures


# ---------------------------------------------------------------- what the units learned (paper, section 5.4)


def _points(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df.point))


def alpha_heatmaps(final: pd.DataFrame, path: Path) -> Path:
    """Per stitch point, the T x T matrix of mean weights (target task = row, source task = column)."""
    points = _points(final)
    tasks = list(dict.fromkeys(final.target))
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2), squeeze=False)
    for ax, point in zip(axes[0], points):
        m = final[final.point == point].groupby(["target", "source"]).value.mean().unstack().loc[tasks, tasks]
        im = ax.imshow(m.values, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{m.values[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(point)
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0][0].set_ylabel("target task")
    return _save(fig, path)


def alpha_histograms(final: pd.DataFrame, path: Path) -> Path:
    """Per stitch point, the distribution over channels of same-task and different-task weights."""
    points = _points(final)
    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.0), squeeze=False)
    for ax, point in zip(axes[0], points):
        rows = final[final.point == point]
        same = rows[rows.target == rows.source].value
        other = rows[rows.target != rows.source].value
        ax.hist([same, other], bins=30, label=["same task (alpha_S)", "different task (alpha_D)"])
        ax.set_title(point)
        ax.set_xlabel("weight")
    axes[0][0].set_ylabel("channels")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def alpha_trajectories(alpha: pd.DataFrame, path: Path) -> Path:
    """Per stitch point, the mean weight of every (target, source) pair against epoch (0 = init)."""
    points = _points(alpha)
    fig, axes = plt.subplots(1, len(points), figsize=(3.8 * len(points), 3.2), squeeze=False)
    for ax, point in zip(axes[0], points):
        rows = alpha[alpha.point == point]
        for (target, source), r in rows.groupby(["target", "source"], sort=False):
            style = "-" if target == source else "--"
            ax.plot(r.epoch, r["mean"], style, marker=".", label=f"{source} -> {target}")
        ax.set_title(point)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean weight")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path)


def alpha_plots(run: Path) -> list[Path]:
    """The three figures of a run whose network has units; none for one without."""
    alpha_csv, final_csv = run / "alpha.csv", run / "alpha_final.csv"
    if not final_csv.is_file():
        return []
    final = pd.read_csv(final_csv)
    out = run / "plots"
    figures = [alpha_heatmaps(final, out / "alpha_heatmap.png"), alpha_histograms(final, out / "alpha_hist.png")]
    if alpha_csv.is_file():
        figures.append(alpha_trajectories(pd.read_csv(alpha_csv), out / "alpha_trajectory.png"))
    return figures


def alpha_side_by_side(finals: dict[str, pd.DataFrame], path: Path) -> Path:
    """Runs' final mean same-task and different-task weights per stitch point, side by side."""
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * sum(len(_points(f)) for f in finals.values())), 3.4))
    labels, same, other = [], [], []
    for run, final in finals.items():
        for point in _points(final):
            rows = final[final.point == point]
            labels.append(f"{run}\n{point}")
            same.append(rows[rows.target == rows.source].value.mean())
            other.append(rows[rows.target != rows.source].value.mean())
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], same, width=0.4, label="same task (alpha_S)")
    ax.bar([i + 0.2 for i in x], other, width=0.4, label="different task (alpha_D)")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("mean final weight")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
