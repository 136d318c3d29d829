"""Image data sets held in memory as uint8 tensors, cut into batches without per-sample Python work.

Fashion-MNIST (Xiao et al. 2017) ships as four IDX files (LeCun's MNIST format:
a big-endian header of two zero bytes, a type byte (0x08 = uint8), a byte with
the number of dimensions, one uint32 per dimension, then the raw data).
Debian's ``dataset-fashion-mnist`` package puts them in
/usr/share/datasets/fashion-mnist/; torchvision downloads the same files.

Tasks follow a public TensorFlow reproduction of cross-stitch networks:
``fine`` is the 10 original classes and ``coarse`` groups them into
shoes / for women / other.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from csnet.errors import CsnetError, UsageError
from csnet.config import DataConfig  # noqa: F401  (re-exported: the data settings)
from csnet.tasks import MISSING, Task, TaskSpec, split_kind
from csnet.tasks import make as make_task

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
MISSING_LABEL = MISSING  # a sample without a class label for a task; its loss is masked out

# Coarse task of the TensorFlow reproduction: 0 shoes {5 sandal, 7 sneaker, 9 ankle boot},
# 1 for women {3 dress, 6 shirt, 8 bag}, 2 other {0 t-shirt, 1 trouser, 2 pullover, 4 coat}.
COARSE_OF_FINE = torch.tensor([2, 2, 2, 1, 2, 0, 1, 0, 1, 0])
COARSE_CLASSES = ("shoes", "for women", "other")
# A third task, so three columns can be stitched: where the item is worn. 0 upper body
# {0 t-shirt, 2 pullover, 4 coat, 6 shirt}, 1 lower body {1 trouser}, 2 whole body {3 dress},
# 3 footwear {5 sandal, 7 sneaker, 9 ankle boot}, 4 bag {8 bag}. Unlike coarse, it groups by
# shape, so it shares more with fine than coarse does.
BODY_OF_FINE = torch.tensor([0, 1, 0, 2, 0, 3, 0, 3, 4, 3])
BODY_CLASSES = ("upper body", "lower body", "whole body", "footwear", "bag")


@dataclass(frozen=True)
class Source:
    """One set of four IDX files under DATA_ROOT/folder, and the tasks its labels answer.

    ``labels`` maps a task to a lookup table from the file's label (None: the label itself);
    tasks the source does not answer get no label (-1) on its images.
    """

    folder: str
    how_to_get: str
    labels: dict[str, torch.Tensor | None]


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: its sources, tasks (name -> kind and size), input shape, and how it loads:
    ``loader(cfg, spec, tasks) -> Data`` (None: the IDX sources)."""

    name: str
    sources: tuple[Source, ...]
    tasks: dict[str, TaskSpec]
    default_tasks: tuple[str, ...]
    input_shape: tuple[int, ...] = (1, 28, 28)
    loader: object = None
    backbone: str = "convnet"  # the default column for this data's inputs


def classes(**sizes: int) -> dict[str, TaskSpec]:
    return {task: TaskSpec("classification", n) for task, n in sizes.items()}


FASHION = Source(
    "fashion-mnist",
    "install the Debian package (sudo apt-get install dataset-fashion-mnist), or on a machine with a network run "
    "torchvision.datasets.FashionMNIST(ROOT, download=True) and copy ROOT/FashionMNIST/raw to DATA_ROOT/fashion-mnist",
    {"fine": None, "coarse": COARSE_OF_FINE, "body": BODY_OF_FINE},
)
MNIST = Source(
    "mnist",
    "MNIST is not packaged here; on a machine with a network run torchvision.datasets.MNIST(ROOT, download=True) "
    "and copy ROOT/MNIST/raw to DATA_ROOT/mnist (the same four file names, plain or .gz)",
    {"mnist": None},
)

DATASETS = {
    "fashion": DatasetSpec("fashion", (FASHION,), classes(fine=10, coarse=3, body=5), ("fine", "coarse")),
    "mnist": DatasetSpec("mnist", (MNIST,), classes(mnist=10), ("mnist",)),
    # The two-domain notebook: the shuffled union of both, each image labelled for its own domain only.
    "mnist+fashion": DatasetSpec(
        "mnist+fashion",
        (MNIST, Source(FASHION.folder, FASHION.how_to_get, {"fashion": None})),
        classes(mnist=10, fashion=10), ("mnist", "fashion"),
    ),
}
# Sources that need more than the IDX reader register here, loaded when named (csnet.scenes, csnet.tabular).
EXTRA = {"fashion-scenes": "csnet.scenes"}


def model_input(spec: DatasetSpec, tasks, label_columns=None) -> dict:
    """ModelConfig settings for the data's input: image channels and size, or features per table row."""
    if len(spec.input_shape) == 1:
        return {"in_features": spec.input_shape[0] - len(set(tasks) | set(label_columns or ()))}
    channels, size, _ = spec.input_shape
    return {"in_channels": channels, "image_size": size}


def dataset_spec(name: str, kinds: dict[str, str] | None = None, image_size: int | None = None,
                 labels: str | None = None, image_column: str | None = None) -> DatasetSpec:
    """The data set called ``name``; ``kinds`` (task -> kind) are the kinds the user asked for, which a
    table's columns take and a built-in set's tasks must agree with."""
    if name.startswith("csv:"):
        from csnet.tabular import csv_spec

        return csv_spec(name, kinds or {})
    if name.startswith("folder:"):
        from csnet.folder import folder_spec

        return folder_spec(name, kinds or {}, image_size, labels, image_column)
    if name in EXTRA:
        import importlib

        spec = importlib.import_module(EXTRA[name]).SPEC
    elif name in DATASETS:
        spec = DATASETS[name]
    else:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join([*DATASETS, *EXTRA])}, csv:PATH, folder:PATH")
    for task, kind in (kinds or {}).items():
        have = spec.tasks.get(task)
        if have is not None and split_kind(kind, task)[0] is not split_kind(have.kind, task)[0]:
            raise UsageError(f"task {task} of {name} is a {have.kind} task; it cannot be trained as {kind} "
                             f"(leave the kind out, or give {task}:{split_kind(have.kind)[0].kind})")
    if kinds:
        spec = replace(spec, tasks={t: replace(ts, kind=kinds.get(t, ts.kind)) for t, ts in spec.tasks.items()})
    return spec


# ---------------------------------------------------------------- IDX files


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file (plain or .gz) into a uint8 tensor, checking header and length."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CsnetError(f"{path}: not a readable gzip file ({e})") from e
    except OSError as e:
        raise CsnetError(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) < 4:
        raise CsnetError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    zero1, zero2, dtype, ndim = raw[:4]
    if zero1 or zero2 or dtype != 0x08 or ndim not in (1, 3):
        raise CsnetError(
            f"{path}: not a uint8 IDX file (magic bytes {raw[:4].hex()}, expected 00000801 or 00000803)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CsnetError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if 0 in dims:
        raise CsnetError(f"{path}: header says {'x'.join(map(str, dims))}: a data set with an empty dimension")
    expected = 1
    for d in dims:
        expected *= d
    found = len(raw) - header
    if found != expected:
        shape = "x".join(map(str, dims))
        what = "truncated" if found < expected else "too long"
        raise CsnetError(f"{path}: {what}: header says {shape} = {expected} bytes of data, file has {found}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def default_roots() -> list[Path]:
    """Search order for data: $CSNET_DATA_ROOT, ./data, /usr/share/datasets."""
    roots = []
    if os.environ.get("CSNET_DATA_ROOT"):
        roots.append(Path(os.environ["CSNET_DATA_ROOT"]))
    roots += [Path("data"), SYSTEM_DATA_ROOT]
    return roots


def _files_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def locate(source: Source | DatasetSpec, data_root: Path | None = None) -> dict[str, Path]:
    """The four IDX files of a source (or a one-source data set): under ``data_root`` if given,
    else the first default root that has all four."""
    if isinstance(source, DatasetSpec):
        source = source.sources[0]
    roots = [Path(data_root)] if data_root is not None else default_roots()
    for root in roots:
        files = _files_in(root / source.folder)
        if files is not None:
            return files
    searched = ", ".join(str(r / source.folder) for r in roots)
    raise CsnetError(
        f"{source.folder} data not found (searched {searched}; each needs {', '.join(IDX_FILES.values())}, "
        f"plain or .gz): {source.how_to_get}"
    )


# ---------------------------------------------------------------- splits and batches


@dataclass
class Split:
    """Images kept as uint8 (N, C, H, W) (or float features (N, F)) and one target tensor per task,
    indexed by sample on its first dimension, in the encoding its kind reads (``csnet.tasks``)."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), {t: y.to(device) for t, y in self.labels.items()})


@dataclass
class Data:
    """Train / validation / test splits plus the training-set statistics used to z-score every batch."""

    train: Split
    val: Split
    test: Split
    mean: float | torch.Tensor  # a tensor of per-feature statistics for tables
    std: float | torch.Tensor
    files: dict[str, Path]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise UsageError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)

    def to(self, device: torch.device) -> "Data":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731 (per-feature stats)
        return Data(self.train.to(device), self.val.to(device), self.test.to(device),
                    move(self.mean), move(self.std), self.files)

    def target_stats(self, tasks: dict[str, Task]) -> dict[str, tuple]:
        """(mean, std) of each standardized task's training targets: what its head learns around."""
        return {name: task.statistics(self.train.labels[name]) for name, task in tasks.items() if task.standardized}


def check_tasks(dataset: str, tasks, image_size: int | None = None, labels: str | None = None,
                image_column: str | None = None) -> tuple[DatasetSpec, dict[str, Task]]:
    """The data set and its tasks as Task objects (``tasks`` may be names: the data set's own kinds)."""
    given = {name: task.spec for name, task in tasks.items()} if isinstance(tasks, dict) else {}
    spec = dataset_spec(dataset, given, image_size, labels, image_column)
    for name in tasks:
        if name not in spec.tasks:
            raise UsageError(f"unknown task {name!r} for {dataset}; valid: {', '.join(spec.tasks)}")
    if not isinstance(tasks, dict):
        tasks = {t: make_task(t, spec.tasks[t].kind, spec.tasks[t].size) for t in tasks}
    return spec, tasks


def _read_source(source: Source, data_root: Path | None, tasks) -> tuple[dict, dict[str, Path]]:
    """Images (N, 1, H, W) and per-task labels of a source's train and test files."""
    files = locate(source, data_root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    parts = {}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.dim() != 3 or labels.dim() != 1:
            raise CsnetError(f"{files[f'{part}_images']}: expected images (N, H, W) and labels (N,)")
        if images.shape[0] != labels.shape[0]:
            raise CsnetError(f"{files[f'{part}_labels']}: {labels.shape[0]} labels for {images.shape[0]} images")
        if int(labels.max()) >= 10:
            raise CsnetError(f"{files[f'{part}_labels']}: label {int(labels.max())} outside 0..9")
        raw = labels.long()
        task_labels = {}
        for task in tasks:
            if task not in source.labels:
                task_labels[task] = torch.full_like(raw, MISSING_LABEL)
            else:
                table = source.labels[task]
                task_labels[task] = raw if table is None else table[raw]
        parts[part] = Split(images.unsqueeze(1).contiguous(), task_labels)
    return parts, files


def _concat(splits: list[Split]) -> Split:
    if len(splits) == 1:
        return splits[0]
    shapes = {s.images.shape[1:] for s in splits}
    if len(shapes) > 1:
        raise CsnetError(f"the data set's sources have different image shapes: {sorted(shapes)}")
    return Split(torch.cat([s.images for s in splits]), {t: torch.cat([s.labels[t] for s in splits])
                                                         for t in splits[0].labels})


def subset(split: Split, idx: torch.Tensor | None) -> Split:
    if idx is None:
        return split
    return Split(split.images[idx], {t: y[idx] for t, y in split.labels.items()})


def starve(split: Split, counts: dict[str, int], seed: int, tasks: dict[str, Task]) -> Split:
    """Keep only ``counts[task]`` labelled samples of each named task (seeded choice among the labelled
    ones); the rest become unlabelled for that task: the paper's data-starved setting."""
    labels = dict(split.labels)
    for name, n in counts.items():
        if name not in labels:
            raise UsageError(f"--starve {name}={n}: no task {name} in this run (tasks: {', '.join(labels)})")
        labelled = tasks[name].labelled(labels[name]).nonzero().squeeze(1)
        if not 0 <= n <= len(labelled):
            raise UsageError(f"--starve {name}={n}: the training set has {len(labelled)} {name} labels")
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))
        labels[name] = tasks[name].unlabel(labels[name], labelled[order[n:]])
    return Split(split.images, labels)


def holdout(n: int, cfg: DataConfig, default_val: int, what: str = "images"):
    """Seeded indices: validation hold-out, then the training subset of the rest."""
    val_size = default_val if cfg.val_size is None else cfg.val_size
    if not 0 < val_size < n:
        raise UsageError(f"--val-size must be between 1 and {n - 1} (the training set has {n} {what})")
    if cfg.train_size is not None and not 0 < cfg.train_size <= n - val_size:
        raise UsageError(f"--train-size must be between 1 and {n - val_size} "
                         f"({n} training {what} minus {val_size} held out for validation)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, rest = order[:val_size], order[val_size:]
    return val_idx, rest[:cfg.train_size] if cfg.train_size is not None else rest


def test_subset(n: int, cfg: DataConfig) -> torch.Tensor | None:
    if cfg.test_size is None:
        return None
    if not 0 < cfg.test_size <= n:
        raise UsageError(f"--test-size must be between 1 and {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.test_size]


def load(cfg: DataConfig, tasks: dict[str, Task] | list[str]) -> Data:
    """Load a data set for ``tasks`` (name -> Task, or names), hold out a seeded validation set, and optionally
    keep a seeded training subset.

    The validation hold-out depends only on ``split_seed``, so runs with different
    training seeds are compared on the same images.
    """
    spec, tasks = check_tasks(cfg.dataset, tasks, cfg.image_size, cfg.labels, cfg.image_column)
    if spec.loader is not None:
        return spec.loader(cfg, spec, tasks)
    if cfg.test_csv or cfg.label_columns:
        raise UsageError("--test-csv and --label-columns apply to --dataset csv:PATH")
    root = Path(cfg.data_root) if cfg.data_root else None
    parts, files = [], {}
    for source in spec.sources:
        part, source_files = _read_source(source, root, tasks)
        parts.append(part)
        prefix = "" if len(spec.sources) == 1 else f"{source.folder}/"
        files.update({prefix + k: v for k, v in source_files.items()})
    full_train = _concat([p["train"] for p in parts])
    full_test = _concat([p["test"] for p in parts])
    val_idx, train_idx = holdout(len(full_train), cfg, 5000)
    train = subset(full_train, train_idx)
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    pixels = train.images.float()
    return Data(
        train=train,
        val=subset(full_train, val_idx),
        test=subset(full_test, test_subset(len(full_test), cfg)),
        mean=float(pixels.mean()),
        std=float(pixels.std()),
        files=files,
    )


def batches(split: Split, batch_size: int, *, mean, std, generator: torch.Generator | None = None,
            start: int = 0, shard: tuple[int, int] = (0, 1)):
    """Yield (z-scored float images, {task: labels}) batches; shuffled when a generator is given.

    ``start`` skips that many samples of the (shuffled) order, after drawing the whole
    order, so a resumed epoch sees exactly the batches the interrupted one had left.

    ``shard=(rank, size)``: this process's share when ``size`` processes train together.
    Every rank draws the same order (same generator state) and takes every ``size``-th
    sample of it; the order is first cut to a multiple of ``size``, so all ranks take the
    same number of steps (DDP's collectives need every rank at every step).

    Images stay uint8 in memory and are converted one batch at a time, which keeps
    the resident set four times smaller than a float copy of the data set.
    """
    n = len(split)
    device = split.images.device
    order = torch.randperm(n, generator=generator).to(device) if generator is not None else None
    rank, size = shard
    if size > 1:
        order = (order if order is not None else torch.arange(n, device=device))[:n // size * size][rank::size]
    count = n if order is None else len(order)
    for first in range(start, count, batch_size):
        if order is None:
            sl = slice(first, first + batch_size)
            images, labels = split.images[sl], {t: y[sl] for t, y in split.labels.items()}
        else:
            idx = order[first:first + batch_size]
            images, labels = split.images[idx], {t: y[idx] for t, y in split.labels.items()}
        yield (images.float() - mean) / std, labels


def shard_size(n: int, size: int) -> int:
    """Samples each of ``size`` ranks takes from ``n`` (see ``batches``)."""
    return n if size == 1 else n // size
