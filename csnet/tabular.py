"""Tables of numeric features with several label columns: ``--dataset csv:PATH --tasks a,b``.

The shape of the TensorFlow reproduction's face-embedding experiment (128-d features,
binary gender and age labels, MLP columns of 3 x 32); its data is not public, so any
CSV with that shape works. Every column that is not a task is a feature. An empty
label cell means the row has no label for that task.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csnet.data import MISSING_LABEL, Data, DataConfig, DatasetSpec, Split, holdout, starve, subset, test_subset
from csnet.errors import CsnetError, UsageError


def _read(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise CsnetError(f"{path}: file not found")
    stat = p.stat()
    return _read_version(path, stat.st_mtime_ns, stat.st_size)  # a file edited since is read again


@lru_cache(maxsize=4)
def _read_version(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise CsnetError(f"{path}: not a readable CSV ({e})") from e


def csv_spec(name: str) -> DatasetSpec:
    """Every column is a possible task (its classes are its distinct values) until --tasks picks."""
    df = _read(name[4:])
    tasks = {c: int(df[c].dropna().nunique()) for c in df.columns}
    return DatasetSpec(name, (), tasks, (), (len(df.columns),))


def _classes(df: pd.DataFrame, tasks) -> dict[str, list]:
    return {t: sorted(df[t].dropna().unique().tolist()) for t in tasks}


def label_columns(cfg: DataConfig, tasks) -> list[str]:
    """Every label column of the table: the tasks, plus --label-columns (a single-task run on a table
    with several labels must not read the other labels as features)."""
    return list(dict.fromkeys([*tasks, *(cfg.label_columns or ())]))


def _encode(df: pd.DataFrame, tasks, classes: dict[str, list], path: str, labels_cols: list[str]) -> Split:
    missing = [c for c in labels_cols if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(df.columns)})")
    features = df.drop(columns=labels_cols)
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise CsnetError(f"{path}: feature column(s) {', '.join(bad)} are not numeric (name label columns with "
                         "--tasks or --label-columns)")
    if features.isna().any().any():
        raise CsnetError(f"{path}: empty feature cells in {', '.join(features.columns[features.isna().any()])}")
    with np.errstate(over="ignore"):  # 1e39 is finite in the file, inf in float32: reported below
        values = features.to_numpy(dtype="float32")
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i[0]) for i in bad.nonzero())
        raise CsnetError(f"{path}: row {row + 1} (line {row + 2}), column {features.columns[col]}: "
                         f"{float(features.iat[row, col]):g} is not a finite float32 number; features must be finite")
    labels = {}
    for t in tasks:
        index = {v: i for i, v in enumerate(classes[t])}
        unknown = set(df[t].dropna().unique()) - set(index)
        if unknown:
            raise CsnetError(f"{path}: {t} has value(s) {sorted(unknown)[:3]} not seen in the training table")
        labels[t] = torch.tensor([index.get(v, MISSING_LABEL) if pd.notna(v) else MISSING_LABEL for v in df[t]])
    return Split(torch.from_numpy(values), labels)


def load_csv(cfg: DataConfig, spec: DatasetSpec, tasks) -> Data:
    """Seeded split of the table into test (a fifth, unless --test-csv), validation (--val-size, default
    a tenth) and training rows; features z-scored per column with the training rows' statistics."""
    path = cfg.dataset[4:]
    if not tasks:
        raise UsageError(f"--dataset {cfg.dataset}: name the label columns with --tasks a,b")
    df = _read(path)
    classes = _classes(df, tasks)
    labels_cols = label_columns(cfg, tasks)
    table = _encode(df, tasks, classes, path, labels_cols)
    n_features = table.images.shape[1]
    if n_features == 0:
        raise CsnetError(f"{path}: no feature columns left besides the tasks")
    order = torch.randperm(len(df), generator=torch.Generator().manual_seed(cfg.split_seed))
    if cfg.test_csv:
        test_df = _read(cfg.test_csv)
        if list(test_df.columns) != list(df.columns):
            raise CsnetError(f"{cfg.test_csv}: columns differ from {path}")
        test, rest = _encode(test_df, tasks, classes, cfg.test_csv, labels_cols), order
    else:
        n_test = max(1, len(df) // 5)
        test = subset(table, order[:n_test])
        rest = order[n_test:]
    test = subset(test, test_subset(len(test), cfg))
    pool = subset(table, rest)
    val_idx, train_idx = holdout(len(pool), cfg, max(1, len(pool) // 10), "rows")
    train = subset(pool, train_idx)
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed)
    mean, std = train.images.mean(0), train.images.std(0).clamp_min(1e-6)  # constant columns: no division by 0
    return Data(train=train, val=subset(pool, val_idx),
                test=test, mean=mean, std=std, num_classes={t: len(classes[t]) for t in tasks},
                files={"csv": Path(path), **({"test_csv": Path(cfg.test_csv)} if cfg.test_csv else {})})
