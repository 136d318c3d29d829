"""Compare runs from their metrics.csv files: the test accuracy at each run's best validation epoch.

Model selection on validation, reporting on test, is what keeps the comparison
honest: picking the best test epoch would flatter every run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from csnet import plots, runio
from csnet.errors import CsnetError, UsageError


def read_metrics(run: Path) -> pd.DataFrame:
    path = runio.require_run(run) / runio.METRICS
    if not path.is_file():
        raise UsageError(f"{run} has no {runio.METRICS} (a stitched run that was never trained? "
                         f"train it with: csnet train --from {run})")
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise CsnetError(f"{path}: unreadable ({e})") from e
    missing = set(runio.METRIC_FIELDS) - set(df.columns)
    if missing or df.empty:
        raise CsnetError(f"{path}: not a csnet metrics file (missing {', '.join(sorted(missing)) or 'rows'})")
    return df


def summarize(df: pd.DataFrame) -> dict:
    """Best epoch by mean validation accuracy (the first, on ties) and the test accuracies there."""
    val = df[(df.split == "val") & (df.task == "mean") & (df.metric == "accuracy")].set_index("epoch").value
    if val.empty:
        raise CsnetError("metrics have no validation accuracy")
    best = int(val.idxmax())
    test = df[(df.split == "test") & (df.metric == "accuracy") & (df.epoch == best)]
    return {
        "epochs": int(df.epoch.max()),
        "best_epoch": best,
        "val_mean": float(val[best]),
        "test": dict(zip(test.task, test.value.astype(float))),
    }


def labels_for(runs: list[Path]) -> list[str]:
    """Folder names, or whole paths where two runs share a name."""
    names = [Path(r).name for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def compare(runs: list[Path], out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """One row per run: test accuracy per task and mean at the best validation epoch, and its
    difference from the first run in percentage points. Writes compare.csv and the plots to ``out``."""
    if len(runs) < 2:
        raise UsageError("compare needs at least two runs")
    labels = labels_for(runs)
    metrics = {label: read_metrics(run) for label, run in zip(labels, runs)}
    rows = []
    for label, run in zip(labels, runs):
        s = summarize(metrics[label])
        row = {"run": label, "path": str(run), "epochs": s["epochs"], "best_epoch": s["best_epoch"],
               "val_mean": s["val_mean"]}
        row.update({f"test_{t}": v for t, v in s["test"].items() if t != "mean"})
        row["test_mean"] = s["test"].get("mean")
        rows.append(row)
    table = pd.DataFrame(rows)
    acc_cols = [c for c in table.columns if c.startswith("test_")]
    # keep task columns in first-seen order, mean last
    acc_cols = [c for c in acc_cols if c != "test_mean"] + ["test_mean"]
    for col in acc_cols:
        table[f"diff_{col[5:]}_pp"] = (table[col] - table[col].iloc[0]) * 100
    table = table[["run", "path", "epochs", "best_epoch", "val_mean", *acc_cols,
                   *[f"diff_{c[5:]}_pp" for c in acc_cols]]]
    runio.new_folder(out)
    table.to_csv(out / "compare.csv", index=False, float_format="%.6g")
    figures = plots.curves(metrics, out)
    return table, figures
