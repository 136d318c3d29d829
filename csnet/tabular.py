"""Tables of numeric features with several label columns: ``--dataset csv:PATH --tasks a,b``.

The shape of the TensorFlow reproduction's face-embedding experiment (128-d features,
binary gender and age labels, MLP columns of 3 x 32); its data is not public, so any
CSV with that shape works. Every column that is not a task is a feature. An empty
label cell means the row has no label for that task.

A task column's kind is given (``--tasks age:regression``) or inferred: 0/1 values (or
true/false) are ``binary``, other whole numbers and text ``classification`` (at most 100
classes, else the user must say which), any other numbers ``regression``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csnet.data import Data, DataConfig, DatasetSpec, Split, holdout, starve, subset, test_subset
from csnet.errors import CsnetError, UsageError
from csnet.tasks import MISSING, Task, TaskSpec, split_kind

MAX_CLASSES = 100  # more distinct values than this in a column is more likely a number than a class


def _read(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise CsnetError(f"{path}: file not found")
    stat = p.stat()
    return _read_version(path, stat.st_mtime_ns, stat.st_size)  # a file edited since is read again


@lru_cache(maxsize=4)
def _read_version(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    try:
        # only an empty cell is missing: a "nan" or "NA" written in a cell is an error csnet reports
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:
        raise CsnetError(f"{path}: not a readable CSV ({e})") from e


def _infer(column: pd.Series, given: str | None, path: str) -> TaskSpec:
    """The kind and size of a task read from ``column``: the kind given, or the one its values suggest."""
    values = column.dropna()
    name = column.name
    if given is not None:
        cls, _ = split_kind(given, name)
        if cls.dense or cls.kind == "multilabel":
            raise UsageError(f"task {name}: a table cell holds one value, so {cls.kind} does not apply; "
                             "give each label as its own binary column")
        size = int(values.nunique()) if cls.kind == "classification" else 1
        return TaskSpec(given, size)
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if not numeric and len(values) and values.map(_is_number).all():
        # every cell a number, yet pandas read text: some cell says nan or inf
        bad = _bad_cell(path, column.to_frame(), column.notna() & ~column.map(_finite), name,
                        f"is not a finite number; leave the cell empty where a row has no {name} target")
        return TaskSpec("regression", 1, problem=str(bad))  # an error once the column is chosen as a task
    if pd.api.types.is_bool_dtype(values) or (numeric and set(values.unique()) <= {0, 1}) or \
            set(map(str, values.unique())) <= {"true", "false", "True", "False"} and len(values):
        return TaskSpec("binary", 1)
    if numeric and not (values == values.round()).all():
        return TaskSpec("regression", 1)
    n = int(values.nunique())
    if n > MAX_CLASSES:
        return TaskSpec("classification", n, problem=(
            f"task {name} has {n} distinct values; as classes that is more than {MAX_CLASSES}. Say what it is: "
            f"--tasks {name}:regression for a quantity, or {name}:classification for that many classes"))
    return TaskSpec("classification", n)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _finite(value) -> bool:
    return _is_number(value) and np.isfinite(float(value))


def csv_spec(name: str, kinds: dict[str, str]) -> DatasetSpec:
    """Every column is a possible task (its kind inferred unless ``kinds`` gives it) until --tasks picks."""
    df = _read(name[4:])
    tasks = {c: _infer(df[c], kinds.get(c), name[4:]) for c in df.columns}
    return DatasetSpec(name, (), tasks, (), (len(df.columns),), loader=load_csv, backbone="mlp")


def _classes(df: pd.DataFrame, tasks: dict[str, Task]) -> dict[str, list]:
    return {t: sorted(df[t].dropna().unique().tolist()) for t, task in tasks.items() if task.kind == "classification"}


def _bad_cell(path: str, df: pd.DataFrame, mask, column: str, what: str) -> CsnetError:
    row = int(np.asarray(mask).nonzero()[0][0])
    return CsnetError(f"{path}: row {row + 1} (line {row + 2}), column {column}: {df[column].iloc[row]!r} {what}")


def _targets(df: pd.DataFrame, name: str, task: Task, classes: dict[str, list], path: str) -> torch.Tensor:
    """One task's column in the encoding its kind reads (csnet.tasks)."""
    col = df[name]
    present = col.notna().to_numpy()
    if task.kind == "classification":
        index = {v: i for i, v in enumerate(classes[name])}
        unknown = set(col.dropna().unique()) - set(index)
        if unknown:
            raise CsnetError(f"{path}: {name} has value(s) {sorted(unknown)[:3]} not seen in the training table")
        return torch.tensor([index[v] if ok else MISSING for v, ok in zip(col, present)])
    if task.kind == "binary":
        text = col.astype(str).str.lower()
        value = text.map({"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "true": 1.0, "false": 0.0})
        bad = present & value.isna().to_numpy()
        if bad.any():
            raise _bad_cell(path, df, bad, name, "is not 0, 1, true or false (a binary task)")
        return torch.from_numpy(value.to_numpy(dtype="float32").copy()).unsqueeze(1)
    number = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64")
    bad = present & ~np.isfinite(number)
    if bad.any():
        raise _bad_cell(path, df, bad, name, "is not a finite number; leave the cell empty where a row has no "
                                             f"{name} target")
    return torch.from_numpy(number.astype("float32")).unsqueeze(1)


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
    return Split(torch.from_numpy(values.copy()), {t: _targets(df, t, task, classes, path) for t, task in tasks.items()})


def load_csv(cfg: DataConfig, spec: DatasetSpec, tasks: dict[str, Task]) -> Data:
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
    for t, task in tasks.items():
        if not bool(task.labelled(train.labels[t]).any()):
            raise CsnetError(f"{path}: no training row has a {t} target (the column is empty)")
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    mean, std = train.images.mean(0), train.images.std(0).clamp_min(1e-6)  # constant columns: no division by 0
    return Data(train=train, val=subset(pool, val_idx), test=test, mean=mean, std=std,
                files={"csv": Path(path), **({"test_csv": Path(cfg.test_csv)} if cfg.test_csv else {})})
