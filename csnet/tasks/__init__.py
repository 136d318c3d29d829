"""Task kinds: one file each, named once here. The rest of csnet reaches them through ``Task``.

A kind is written ``kind`` or ``kind:loss`` (``regression:l1``), in config files and on the
command line (``--tasks gender,age:regression``).
"""

from __future__ import annotations

from dataclasses import dataclass

from csnet.errors import UsageError
from csnet.tasks.base import HIGHER, LOWER, Task
from csnet.tasks.classification import MISSING, Classification
from csnet.tasks.depth import Depth
from csnet.tasks.multilabel import Binary, Multilabel
from csnet.tasks.regression import Regression
from csnet.tasks.segmentation import IGNORE, Segmentation

KINDS: dict[str, type[Task]] = {
    "classification": Classification,
    "binary": Binary,
    "multilabel": Multilabel,
    "regression": Regression,
    "segmentation": Segmentation,
    "depth": Depth,
}

__all__ = ["HIGHER", "IGNORE", "KINDS", "LOWER", "MISSING", "Task", "TaskSpec", "kind_of", "make", "split_kind"]


@dataclass(frozen=True)
class TaskSpec:
    """What a data set says about one of its tasks: the kind (with its loss) and the output size."""

    kind: str
    size: int
    problem: str | None = None  # why the task cannot be trained with the kind inferred for it


def split_kind(spec: str, task: str = "") -> tuple[type[Task], str | None]:
    """``regression:l1`` -> (Regression, "l1"), checking both parts."""
    name, _, loss = spec.partition(":")
    if name not in KINDS:
        where = f"task {task}: " if task else ""
        raise UsageError(f"{where}unknown task kind {name!r}; valid: {', '.join(KINDS)}")
    cls = KINDS[name]
    if loss and loss not in cls.losses:
        raise UsageError(f"task {task}: {name} takes the loss {' or '.join(cls.losses)}, not {loss!r}")
    return cls, loss or None


def kind_of(spec: str) -> type[Task]:
    return split_kind(spec)[0]


def make(name: str, spec: str, size: int, stats=None) -> Task:
    cls, loss = split_kind(spec, name)
    return cls(name, size, loss, stats)
