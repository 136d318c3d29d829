"""Cells of a label table, read the same way by every source that has one (csv:PATH, folder:PATH).

A task column's kind is given (``--tasks age:regression``) or inferred: 0/1 values (or true/false)
are ``binary``, other whole numbers and text ``classification`` (at most 100 classes, else the user
must say which), any other numbers ``regression``. Only an empty cell is a missing label.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csnet.errors import CsnetError, UsageError
from csnet.tasks import MISSING, Task, TaskSpec, split_kind

MAX_CLASSES = 100  # more distinct values than this in a column is more likely a number than a class


def read_table(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise CsnetError(f"{path}: file not found")
    stat = p.stat()
    return read_version(path, stat.st_mtime_ns, stat.st_size)  # a file edited since is read again


@lru_cache(maxsize=4)
def read_version(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    try:
        # only an empty cell is missing: a "nan" or "NA" written in a cell is an error csnet reports
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:
        raise CsnetError(f"{path}: not a readable CSV ({e})") from e


def infer_kind(column: pd.Series, given: str | None, path: str) -> TaskSpec:
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
    if not numeric and len(values) and values.map(is_number).all():
        # every cell a number, yet pandas read text: some cell says nan or inf
        bad = bad_cell(path, column.to_frame(), column.notna() & ~column.map(is_finite), name,
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


def is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def is_finite(value) -> bool:
    return is_number(value) and np.isfinite(float(value))


def class_values(df: pd.DataFrame, tasks: dict[str, Task]) -> dict[str, list]:
    return {t: sorted(df[t].dropna().unique().tolist()) for t, task in tasks.items() if task.kind == "classification"}


def bad_cell(path: str, df: pd.DataFrame, mask, column: str, what: str) -> CsnetError:
    row = int(np.asarray(mask).nonzero()[0][0])
    return CsnetError(f"{path}: row {row + 1} (line {row + 2}), column {column}: {df[column].iloc[row]!r} {what}")


def encode_targets(df: pd.DataFrame, name: str, task: Task, classes: dict[str, list],
                   path: str) -> torch.Tensor:
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
            raise bad_cell(path, df, bad, name, "is not 0, 1, true or false (a binary task)")
        return torch.from_numpy(value.to_numpy(dtype="float32").copy()).unsqueeze(1)
    number = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float64")
    bad = present & ~np.isfinite(number)
    if bad.any():
        raise bad_cell(path, df, bad, name, "is not a finite number; leave the cell empty where a row has no "
                                             f"{name} target")
    return torch.from_numpy(number.astype("float32")).unsqueeze(1)
