"""Your own data set: ``--dataset module.path:function`` on the command line, or Datasets given to ``csnet.fit``.

The convention (the same as ``--backbone module.path:function``):

- ``function(split, **options)`` is called with ``split`` = ``"train"``, ``"val"`` and ``"test"`` (and the
  ``--data-option KEY=VALUE`` pairs, as strings) and returns a ``torch.utils.data.Dataset``;
- item ``i`` is ``(image, {task: target})``: ``image`` a (C, H, W) tensor, uint8 (0..255) or float;
  a target is what the task's kind reads (``csnet.tasks``): a class number (-1: no label) for
  classification, a number or vector of numbers (NaN: none) for regression, 0/1 values for binary and
  multilabel, an (H, W) map of class numbers (255: no label) for segmentation, an (H, W) map of values
  (NaN or <= 0: none) for depth;
- the Dataset says its tasks in an attribute ``tasks``: ``{name: kind}`` or ``{name: (kind, size)}``, the
  size being the number of classes (classification, segmentation) or outputs (e.g.
  ``{"digit": ("classification", 10), "ink": "regression", "mask": ("segmentation", 2)}``).

Sets that fit in memory are read once into tensors (the fast path); larger ones, or any with
``--stream``, are read item by item by ``--workers`` processes. Inputs are z-scored per channel
with the training split's statistics, as for image folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from csnet.errors import CsnetError, UsageError
from csnet.splits import (Data, DatasetSpec, Split, Stream, channel_stats, pixel_sums, starve, stream_workers,
                          streamed_note, streams, subset, test_subset, train_subset)
from csnet.tasks import IGNORE, Task, TaskSpec, split_kind

SPLITS = ("train", "val", "test")


def task_specs(tasks, where: str) -> dict[str, TaskSpec]:
    """``{name: kind or (kind, size)}`` as TaskSpecs, each kind checked."""
    if not isinstance(tasks, dict) or not tasks:
        raise UsageError(f"{where}: tasks must be a non-empty dict {{name: kind or (kind, size)}}, "
                         f"found {type(tasks).__name__}")
    specs = {}
    for name, kind in tasks.items():
        size = 1
        if isinstance(kind, (tuple, list)) and len(kind) == 2:
            kind, size = kind
        if not isinstance(name, str) or not name or not isinstance(kind, str) or not isinstance(size, int) \
                or isinstance(size, bool) or size < 1:
            raise UsageError(f"{where}: task {name!r}: give kind or (kind, size), e.g. ('classification', 10); "
                             f"found {tasks[name]!r}")
        split_kind(kind, name)
        specs[name] = TaskSpec(kind, size)
    return specs


def _made(name: str, options: tuple, split: str):
    """The Dataset ``name`` returns for ``split``; made once per process and function (``_making``)."""
    from csnet.usercode import load_function

    return _making(load_function(name, "--dataset"), name, options, split)


@lru_cache(maxsize=8)
def _making(function, name: str, options: tuple, split: str):
    try:
        made = function(split, **dict(options))
    except Exception as e:  # the user's code: whatever it raises is one line, not a traceback
        args = ", ".join([repr(split), *(f"{k}={v!r}" for k, v in options)])
        raise CsnetError(f"--dataset {name}: {name.partition(':')[2]}({args}) raised {type(e).__name__}: {e}") from e
    return check_dataset(made, f"--dataset {name} ({split})")


def check_dataset(made, where: str):
    if not (hasattr(made, "__getitem__") and hasattr(made, "__len__")) or isinstance(made, (list, tuple, dict, str)):
        raise UsageError(f"{where}: expected a torch.utils.data.Dataset (with __getitem__ and __len__), "
                         f"got {type(made).__name__}")
    try:
        n = len(made)
    except Exception as e:
        raise CsnetError(f"{where}: len() raised {type(e).__name__}: {e}") from e
    if n == 0:
        raise CsnetError(f"{where}: the Dataset is empty")
    return made


def _item(made, i: int, where: str):
    try:
        item = made[i]
    except Exception as e:
        raise CsnetError(f"{where}: item {i} raised {type(e).__name__}: {e}") from e
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor)
            and isinstance(item[1], dict)):
        raise CsnetError(f"{where}: item {i} should be (image tensor, {{task: target}}), found "
                         f"{type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else ""))
    if item[0].dim() != 3 or not (item[0].dtype == torch.uint8 or item[0].is_floating_point()):
        raise CsnetError(f"{where}: item {i}'s image should be a (C, H, W) uint8 or float tensor, found "
                         f"{item[0].dtype} {tuple(item[0].shape)}")
    return item


def spec(name: str, kinds: dict[str, str], options: dict | None = None) -> DatasetSpec:
    """What ``name`` returns for the training split: its tasks (with the kinds ``--tasks`` gives, which must
    agree with the Dataset's) and its input shape."""
    made = _made(name, tuple(sorted((options or {}).items())), "train")
    return spec_of(made, f"--dataset {name}", kinds, name)


def spec_of(made, where: str, kinds: dict[str, str], name: str = "python") -> DatasetSpec:
    tasks = task_specs(getattr(made, "tasks", None), f"{where}: its Dataset's 'tasks' attribute")
    for task, kind in kinds.items():
        if task in tasks and split_kind(kind, task)[0] is not split_kind(tasks[task].kind, task)[0]:
            raise UsageError(f"task {task} of {where} is a {tasks[task].kind} task; it cannot be trained as {kind}")
        if task in tasks:
            tasks[task] = TaskSpec(kind, tasks[task].size)
    image = _item(made, 0, where)[0]
    dense = any(split_kind(t.kind)[0].dense for t in tasks.values())
    return DatasetSpec(name, (), tasks, tuple(tasks), tuple(image.shape), loader=load_python,
                       backbone="fcn" if dense else "convnet")


def _whole_classes(task: Task, y: torch.Tensor, where: str) -> None:
    """Class numbers as the kind reads them, checked before they are cast (2.9 would become 2, 257 a 1):
    whole numbers from 0 to size - 1, or -1 (and 255 in a class map) for no label."""
    v = y.double()
    ok = (v == v.round()) & (((v >= 0) & (v < task.size)) | (v == -1))
    if task.kind == "segmentation":
        ok |= v == IGNORE
    if not bool(ok.all()):
        bad = v[~ok][0].item()
        none = "-1 or 255" if task.kind == "segmentation" else "-1"
        raise CsnetError(f"{where}: target {task.name} holds {bad:g}; a {task.kind} task of size {task.size} takes "
                         f"whole class numbers from 0 to {task.size - 1} ({none}: no label)")


def _encode(task: Task, y, where: str) -> torch.Tensor:
    """One item's target in the encoding ``task`` reads."""
    try:
        y = torch.as_tensor(y)
        if task.kind in ("classification", "segmentation"):
            _whole_classes(task, y, where)
        if task.kind == "classification":
            return y.long().reshape(())
        if task.kind == "segmentation":
            y = y.reshape(y.shape[-2:]).long()
            return torch.where(y < 0, IGNORE, y).to(torch.uint8) if task.size <= IGNORE else \
                torch.where(y == IGNORE, -1, y)
        if task.dense:
            return y.reshape(y.shape[-2:]).float()
        return y.float().reshape(task.size)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CsnetError(f"{where}: target {task.name} does not fit a {task.kind} task of size {task.size} "
                         f"({str(e).splitlines()[0]})") from e


@dataclass
class Encoded(torch.utils.data.Dataset):
    """The user's Dataset with each item's targets in csnet's encodings, the same for both ways of reading."""

    made: object
    tasks: dict[str, Task]
    where: str

    def __len__(self) -> int:
        return len(self.made)

    def __getitem__(self, i: int):
        image, targets = _item(self.made, i, self.where)
        missing = [t for t in self.tasks if t not in targets]
        if missing:
            raise CsnetError(f"{self.where}: item {i} has no target {missing[0]!r} (it has {', '.join(targets)})")
        return image, {t: _encode(task, targets[t], f"{self.where}: item {i}") for t, task in self.tasks.items()}


def _bytes(items: Encoded) -> int:
    image, targets = items[0]
    per_item = image.numel() * image.element_size() + sum(y.numel() * y.element_size() for y in targets.values())
    return per_item * len(items)


def _in_memory(items: Encoded, workers: int) -> Split:
    loader = torch.utils.data.DataLoader(items, batch_size=256, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))  # see Stream._load
    try:
        parts = list(loader)
    except RuntimeError as e:  # items that do not stack: shapes differ
        raise CsnetError(f"{items.where}: items do not stack into batches ({str(e).splitlines()[0]}); every image "
                         "and every target of a task must have one shape") from e
    return Split(torch.cat([x for x, _ in parts]), {t: torch.cat([y[t] for _, y in parts]) for t in items.tasks})


def data_from(made: dict, tasks: dict[str, Task], cfg, where: str) -> Data:
    """Data from three Datasets (``made``: split -> Dataset): in memory when they fit, else streamed."""
    items = {s: Encoded(made[s], tasks, f"{where} ({s})") for s in SPLITS}
    shapes = {s: tuple(items[s][0][0].shape) for s in SPLITS}
    if len(set(shapes.values())) > 1:
        raise CsnetError(f"{where}: the splits' images have different shapes: {shapes}")
    size = sum(_bytes(i) for i in items.values())
    stream = streams(cfg.stream, size)
    workers = stream_workers(cfg.workers) if stream else cfg.workers or 0
    n = sum(len(i) for i in items.values())
    if stream:
        train, val, test = (Stream(items[s], torch.arange(len(items[s])), tasks, workers) for s in SPLITS)
        note = streamed_note(f"{n:,} items ({size / 1e6:,.0f} MB) read", workers, bool(cfg.stream))
    else:
        train, val, test = (_in_memory(items[s], workers) for s in SPLITS)
        note = f"{n:,} items held in memory ({size / 1e6:,.1f} MB)"
    for split, name in ((train, "train"), (val, "val"), (test, "test")):  # every item, before any subset
        _check_targets(split, tasks, f"{where} ({name})")
    train = subset(train, train_subset(len(train), cfg))
    test = subset(test, test_subset(len(test), cfg))
    for t, task in tasks.items():
        if not bool(task.labelled(train.targets(t)).any()):
            raise CsnetError(f"{where}: no training item has a {t} target")
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    mean, std = _statistics(train)
    return Data(train=train, val=val, test=test, mean=mean, std=std, files={}, note=note)


def _statistics(train: Split | Stream):
    """Per-channel mean and std of the training images, from float64 sums (uint8 images: exact)."""
    if isinstance(train, Split):
        (total, squares), values = pixel_sums(train.images), train.images.numel() // train.images.shape[1]
    else:
        seen = train.seen()
        (total, squares), values = seen["sums"], seen["values"]
    return channel_stats(total, squares, values)


def _check_targets(split: Split | Stream, tasks: dict[str, Task], where: str) -> None:
    """0/1 where a kind wants it (binary, multilabel): a wrong target is one line naming the item, not a
    loss computed on values the kind does not define. (Class numbers are checked as items are read.)"""
    for t, task in tasks.items():
        if task.kind not in ("binary", "multilabel"):
            continue
        flat = split.targets(t).reshape(len(split), -1)
        bad = ~torch.isnan(flat) & (flat != 0) & (flat != 1)
        rows = bad.any(1).nonzero()
        if len(rows):
            i = int(rows[0])
            item = int(split.index[i]) if isinstance(split, Stream) else i
            raise CsnetError(f"{where}: item {item}: target {t} holds {flat[i][bad[i]][0].item():g}; a {task.kind} "
                             "task takes 0 or 1 (NaN: no label)")


def load_python(cfg, spec: DatasetSpec, tasks: dict[str, Task]) -> Data:
    if cfg.val_size is not None:
        raise UsageError(f"--dataset {cfg.dataset} gives its own validation split: leave --val-size out")
    options = tuple(sorted((cfg.options or {}).items()))
    made = {s: _made(cfg.dataset, options, s) for s in SPLITS}
    return data_from(made, tasks, cfg, f"--dataset {cfg.dataset}")
