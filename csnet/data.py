"""Where a run's data comes from: one registry of sources, each a module behind one small interface.

``dataset_spec(name)`` says what a data set is (its tasks and input shape) without reading it;
``load(cfg, tasks)`` reads it into ``csnet.splits.Data``. The sources:

- ``fashion``, ``mnist``, ``mnist+fashion``: IDX files (``csnet.idx``);
- ``fashion-scenes``: the multi-task scene benchmark made from Fashion-MNIST (``csnet.scenes``);
- ``csv:PATH``: a table of features and labels (``csnet.tabular``);
- ``folder:PATH``: images and a label table (``csnet.folder``);
- ``module.path:function``: your own ``torch.utils.data.Dataset`` (``csnet.pydata``).

No source imports another; each imports ``csnet.splits`` for what they all return.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from csnet.config import FIT_DATA, DataConfig, is_custom, trust_data
from csnet.errors import UsageError
from csnet.idx import (BODY_OF_FINE, COARSE_OF_FINE, DATASETS, FASHION, MISSING_LABEL, MNIST,
                       Source, load_idx, locate, read_idx)
from csnet.splits import Data, DatasetSpec, Split, Stream, batches, shard_size
from csnet.tasks import Task, split_kind
from csnet.tasks import make as make_task

__all__ = ["BODY_OF_FINE", "COARSE_OF_FINE", "DATASETS", "EXTRA", "FASHION", "MISSING_LABEL", "MNIST", "Data",
           "DataConfig", "DatasetSpec", "Source", "Split", "Stream", "batches", "check_tasks", "dataset_spec", "load",
           "locate", "model_input", "read_idx", "shard_size"]

# Sources that need more than the IDX reader register here, imported when named.
EXTRA = {"fashion-scenes": "csnet.scenes"}
PREFIXED = {"csv:": "csnet.tabular", "folder:": "csnet.folder"}


def model_input(spec: DatasetSpec, tasks, label_columns=None) -> dict:
    """ModelConfig settings for the data's input: image channels and size, or features per table row."""
    if len(spec.input_shape) == 1:
        return {"in_features": spec.input_shape[0] - len(set(tasks) | set(label_columns or ()))}
    channels, h, w = spec.input_shape
    return {"in_channels": channels, "image_size": h if h == w else (h, w)}


def dataset_spec(name: str, kinds: dict[str, str] | None = None, image_size: int | None = None,
                 labels: str | None = None, image_column: str | None = None,
                 code: tuple[str, ...] | None = None, options: dict | None = None) -> DatasetSpec:
    """The data set called ``name``; ``kinds`` (task -> kind) are the kinds the user asked for, which a
    table's columns take and a built-in set's tasks must agree with. ``code``: the ``module:function``
    data sets this command line names, the only ones imported (None: whatever ``name`` says)."""
    for prefix, module in PREFIXED.items():
        if name.startswith(prefix):
            return importlib.import_module(module).spec(name, kinds or {}, image_size, labels, image_column)
    if is_custom(name):
        from csnet.pydata import spec as python_spec

        if code is not None and trust_data(name) not in code:
            raise UsageError(f"this run reads its data with your own function {name}; csnet never imports code "
                             f"that a run folder names. If you trust that code, name it on this command line: "
                             f"--dataset {name}")
        return python_spec(name, kinds or {}, options)
    if name == FIT_DATA:
        raise UsageError("this run was trained from Python (csnet.fit) on Datasets csnet cannot make again: name "
                         "the function that makes them, --dataset module.path:function (or resume it with "
                         "csnet.fit(..., resume=True))")
    if name in EXTRA:
        spec = importlib.import_module(EXTRA[name]).SPEC
    elif name in DATASETS:
        spec = DATASETS[name]
    else:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join([*DATASETS, *EXTRA])}, csv:PATH, folder:PATH, "
                         "or module.path:function for your own")
    for task, kind in (kinds or {}).items():
        have = spec.tasks.get(task)
        if have is not None and split_kind(kind, task)[0] is not split_kind(have.kind, task)[0]:
            raise UsageError(f"task {task} of {name} is a {have.kind} task; it cannot be trained as {kind} "
                             f"(leave the kind out, or give {task}:{split_kind(have.kind)[0].kind})")
    if kinds:
        spec = replace(spec, tasks={t: replace(ts, kind=kinds.get(t, ts.kind)) for t, ts in spec.tasks.items()})
    return spec


def check_tasks(dataset: str, tasks, image_size: int | None = None, labels: str | None = None,
                image_column: str | None = None, code: tuple[str, ...] | None = None,
                options: dict | None = None) -> tuple[DatasetSpec, dict[str, Task]]:
    """The data set and its tasks as Task objects (``tasks`` may be names: the data set's own kinds)."""
    given = {name: task.spec for name, task in tasks.items()} if isinstance(tasks, dict) else {}
    spec = dataset_spec(dataset, given, image_size, labels, image_column, code, options)
    for name in tasks:
        if name not in spec.tasks:
            raise UsageError(f"unknown task {name!r} for {dataset}; valid: {', '.join(spec.tasks)}")
    if not isinstance(tasks, dict):
        tasks = {t: make_task(t, spec.tasks[t].kind, spec.tasks[t].size) for t in tasks}
    return spec, tasks


def load(cfg: DataConfig, tasks: dict[str, Task] | list[str], code: tuple[str, ...] | None = None) -> Data:
    """Load a data set for ``tasks`` (name -> Task, or names): its source's splits and training statistics.

    Every source holds out validation samples by ``split_seed`` alone, so runs with different
    training seeds are compared on the same samples.
    """
    spec, tasks = check_tasks(cfg.dataset, tasks, cfg.image_size, cfg.labels, cfg.image_column, code, cfg.options)
    if (cfg.test_csv or cfg.label_columns) and not cfg.dataset.startswith("csv:"):
        raise UsageError("--test-csv and --label-columns apply to --dataset csv:PATH")
    return (spec.loader or load_idx)(cfg, spec, tasks)
