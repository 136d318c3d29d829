"""Tables of numeric features with several label columns: ``--dataset csv:PATH --tasks a,b``.

The shape of the TensorFlow reproduction's face-embedding experiment (128-d features,
binary gender and age labels, MLP columns of 3 x 32); its data is not public, so any
CSV with that shape works. Every column that is not a task is a feature. An empty
label cell means the row has no label for that task.

A task column's kind is given (``--tasks age:regression``) or inferred (``csnet.cells``, which
the image-folder source shares).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csnet.config import DataConfig
from csnet.splits import Data, DatasetSpec, Split, holdout, starve, subset, test_subset
from csnet.errors import CsnetError, UsageError
from csnet.cells import class_values, encode_targets, infer_kind, read_table
from csnet.tasks import Task


def spec(name: str, kinds: dict[str, str], *_folder_options) -> DatasetSpec:
    """Every column is a possible task (its kind inferred unless ``kinds`` gives it) until --tasks picks."""
    df = read_table(name[4:])
    tasks = {c: infer_kind(df[c], kinds.get(c), name[4:]) for c in df.columns}
    return DatasetSpec(name, (), tasks, (), (len(df.columns),), loader=load_csv, backbone="mlp")


def label_columns(cfg: DataConfig, tasks) -> list[str]:
    """Every label column of the table: the tasks, plus --label-columns (a single-task run on a table
    with several labels must not read the other labels as features)."""
    return list(dict.fromkeys([*tasks, *(cfg.label_columns or ())]))


def _encode(df: pd.DataFrame, tasks: dict[str, Task], classes: dict[str, list], path: str,
            labels_cols: list[str]) -> Split:
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
    return Split(torch.from_numpy(values.copy()),
                 {t: encode_targets(df, t, task, classes, path) for t, task in tasks.items()})


def load_csv(cfg: DataConfig, spec: DatasetSpec, tasks: dict[str, Task]) -> Data:
    """Seeded split of the table into test (a fifth, unless --test-csv), validation (--val-size, default
    a tenth) and training rows; features z-scored per column with the training rows' statistics."""
    path = cfg.dataset[4:]
    if not tasks:
        raise UsageError(f"--dataset {cfg.dataset}: name the label columns with --tasks a,b")
    df = read_table(path)
    classes = class_values(df, tasks)
    labels_cols = label_columns(cfg, tasks)
    table = _encode(df, tasks, classes, path, labels_cols)
    n_features = table.images.shape[1]
    if n_features == 0:
        raise CsnetError(f"{path}: no feature columns left besides the tasks")
    order = torch.randperm(len(df), generator=torch.Generator().manual_seed(cfg.split_seed))
    if cfg.test_csv:
        test_df = read_table(cfg.test_csv)
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
    for t, task in tasks.items():
        if not bool(task.labelled(train.labels[t]).any()):
            raise CsnetError(f"{path}: no training row has a {t} target (the column is empty)")
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    mean, std = train.images.mean(0), train.images.std(0).clamp_min(1e-6)  # constant columns: no division by 0
    return Data(train=train, val=subset(pool, val_idx), test=test, mean=mean, std=std,
                files={"csv": Path(path), **({"test_csv": Path(cfg.test_csv)} if cfg.test_csv else {})})
