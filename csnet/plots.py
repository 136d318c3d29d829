"""Figures drawn from the runs' files alone (never from models), each as PNG and as PDF (vector).

Curves: each task's primary test metric and the score against epoch, and the training loss;
one colour per run, the same in every panel and in the legend (Okabe and Ito's colour-blind-safe
palette); over seeds the mean line with a shaded 95% t-interval band, the interval compare's
tables report. Fractions (accuracy, mIoU, AP, δ1) are drawn in percent, errors in the target's
units, each named on its axis. Unit heatmaps share one zero-centred diverging scale.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from csnet.errors import CsnetError  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
LINESTYLES = ["-", "--", ":", "-."]


def colours(labels) -> dict[str, str]:
    """One colour per run, fixed by its place in the comparison."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _save(fig, path: Path, legend: bool = True, order=(), tight: bool = True) -> Path:
    """PNG for reading, PDF for papers. The legend sits outside the axes, below them: every line once, from
    whichever panel has it (a run may lack a task), in ``order`` (the runs' order) where given. ``tight``:
    tight_layout first (not for a figure with a colorbar spanning its panels, which it cannot place)."""
    if legend:
        found = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                found.setdefault(label, handle)
        rank = {label: i for i, label in enumerate(order)}
        labels = sorted(found, key=lambda label: rank.get(label, len(rank)))
        handles = [found[label] for label in labels]
        if handles:
            fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
                       fontsize=8, frameon=False)
    if tight:
        fig.tight_layout()
    try:
        for suffix in (".png", ".pdf"):
            fig.savefig(path.with_suffix(suffix), dpi=150, bbox_inches="tight")
    except OSError as e:  # a full disk, a read-only folder
        raise CsnetError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return path


def _axis_label(metric: str, unit: str) -> str:
    return f"{metric} [{unit}]" if unit else metric


def _line(ax, rows: pd.DataFrame, scale: float, colour: str, label: str, style: str = "-") -> None:
    """The mean over seeds, and its 95% band where there are several seeds."""
    rows = rows.sort_values("epoch")
    ax.plot(rows.epoch, rows["mean"] * scale, style, color=colour, marker="o", markersize=3, label=label)
    band = rows.dropna(subset=["low", "high"])
    if len(band):
        low, high = band.low * scale, band.high * scale
        if scale == 100.0:  # a t-interval can pass 0 or 100%, which a fraction cannot
            low, high = low.clip(0, 100), high.clip(0, 100)
        ax.fill_between(band.epoch, low, high, color=colour, alpha=0.2, linewidth=0)


def _epochs(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def test_metrics(series: dict[str, pd.DataFrame], path: Path, panels: list[tuple[str, str, str]]) -> Path:
    """One panel per (task, metric, unit) of ``panels`` (each task's primary metric, then the score), one line
    per run. ``series``: run -> curve_series table (split, task, metric, epoch, mean, low, high)."""
    return _save(test_metrics_figure(series, panels), path, order=list(series))


def test_metrics_figure(series: dict[str, pd.DataFrame], panels: list[tuple[str, str, str]]):
    colour = colours(series)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, (task, metric, unit) in zip(axes[0], panels):
        scale = 100.0 if unit == "%" else 1.0
        for label, df in series.items():
            rows = df[(df.split == "test") & (df.task == task) & (df.metric == metric)]
            if task == "mean" and rows.empty:  # a run of an older csnet: its score was the mean accuracy
                rows = df[(df.split == "test") & (df.task == task) & (df.metric == "accuracy")]
            if len(rows):
                _line(ax, rows, scale, colour[label], label)
        ax.set_title("score (mean of the tasks)" if task == "mean" else task, fontsize=9)
        ax.set_ylabel(_axis_label(f"test {metric}", unit))
        _epochs(ax)
        if unit == "%":  # matplotlib's margins would show ticks past 100%
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, 0.0), min(high, 100.5))
    return fig


def train_loss(series: dict[str, pd.DataFrame], path: Path) -> Path:
    """Total training loss (sum over tasks) per epoch, one line per run."""
    colour = colours(series)
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for label, df in series.items():
        _line(ax, df[(df.split == "train") & (df.metric == "loss") & (df.task == "total")], 1.0, colour[label], label)
    ax.set_title("training loss (sum over tasks)", fontsize=9)
    ax.set_ylabel("loss")
    _epochs(ax)
    return _save(fig, path)


def loss_weights(series: dict[str, pd.DataFrame], path: Path) -> Path:
    """Each task's loss weight against epoch (the run's --weighting): colour per run, line style per task."""
    colour = colours(series)
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for label, df in series.items():
        rows = df[(df.split == "train") & (df.metric == "loss_weight")]
        for i, (task, r) in enumerate(rows.groupby("task", sort=False)):
            _line(ax, r, 1.0, colour[label], f"{label}: {task}", LINESTYLES[i % len(LINESTYLES)])
    ax.set_title("loss weight per task", fontsize=9)
    ax.set_ylabel("weight")
    _epochs(ax)
    return _save(fig, path)


def curves(series: dict[str, pd.DataFrame], out_dir: Path, panels: list[tuple[str, str, str]],
           weights: bool = False) -> list[Path]:
    """test_metrics and train_loss (and loss_weights where a weighting moved the weights: the plain sum's are
    1 throughout), each as .png and .pdf; returns the PNGs' paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [test_metrics(series, out_dir / "test_metrics.png", panels),
               train_loss(series, out_dir / "train_loss.png")]
    if weights:
        figures.append(loss_weights(series, out_dir / "loss_weights.png"))
    return figures


# ---------------------------------------------------------------- what the units learned (paper, section 5.4)


def _points(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df.point))


def alpha_heatmaps(final: pd.DataFrame, path: Path) -> Path:
    """Per stitch point, the T x T matrix of mean weights (target task = row, source task = column), all
    panels on one zero-centred diverging scale (weights can be negative)."""
    points = _points(final)
    tasks = list(dict.fromkeys(final.target))
    mats = {p: final[final.point == p].groupby(["target", "source"]).value.mean().unstack().loc[tasks, tasks]
            for p in points}
    top = max(float(np.nanmax(np.abs(m.values))) for m in mats.values()) or 1.0
    fig, axes = plt.subplots(1, len(points), figsize=(3.0 * len(points) + 1.0, 3.0), squeeze=False)
    for k, (ax, point) in enumerate(zip(axes[0], points)):
        m = mats[point].values
        im = ax.imshow(m, cmap="PuOr_r", vmin=-top, vmax=top)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks if k == 0 else [])  # the rows are the same tasks in every panel
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                dark = abs(m[i, j]) > 0.6 * top  # white on the saturated ends, black elsewhere
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
        ax.set_title(point, fontsize=9)
        ax.set_xlabel("source task")
    axes[0][0].set_ylabel("target task")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.046, label="mean unit weight")
    return _save(fig, path, legend=False, tight=False)


def alpha_histograms(final: pd.DataFrame, path: Path) -> Path:
    """Per stitch point, the distribution over channels of same-task and different-task weights."""
    points = _points(final)
    fig, axes = plt.subplots(1, len(points), figsize=(3.4 * len(points), 2.9), squeeze=False)
    for ax, point in zip(axes[0], points):
        rows = final[final.point == point]
        same = rows[rows.target == rows.source].value
        other = rows[rows.target != rows.source].value
        ax.hist([same, other], bins=30, color=PALETTE[:2],
                label=["same task (alpha_S)", "different task (alpha_D)"])
        ax.set_title(point, fontsize=9)
        ax.set_xlabel("weight")
    axes[0][0].set_ylabel("channels")
    return _save(fig, path)


def alpha_trajectories(alpha: pd.DataFrame, path: Path) -> Path:
    """Per stitch point, the mean weight of every (target, source) pair against epoch (0 = init): colour per
    target task, solid for its own column's weight, dashed for another's."""
    points = _points(alpha)
    colour = colours(dict.fromkeys(alpha.target))
    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.0), squeeze=False)
    for ax, point in zip(axes[0], points):
        rows = alpha[alpha.point == point]
        for (target, source), r in rows.groupby(["target", "source"], sort=False):
            ax.plot(r.epoch, r["mean"], "-" if target == source else "--", color=colour[target], marker=".",
                    label=f"{source} → {target}")
        ax.set_title(point, fontsize=9)
        _epochs(ax)
    axes[0][0].set_ylabel("mean weight")
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
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * sum(len(_points(f)) for f in finals.values())), 3.2))
    labels, same, other = [], [], []
    for run, final in finals.items():
        for point in _points(final):
            rows = final[final.point == point]
            labels.append(f"{run}\n{point}")
            same.append(rows[rows.target == rows.source].value.mean())
            other.append(rows[rows.target != rows.source].value.mean())
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], same, width=0.4, color=PALETTE[0], label="same task (alpha_S)")
    ax.bar([i + 0.2 for i in x], other, width=0.4, color=PALETTE[1], label="different task (alpha_D)")
    ax.axhline(0, color="k", linewidth=0.6)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("mean final weight")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
