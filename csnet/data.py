"""Image data sets held in memory as uint8 tensors, cut into batches without per-sample Python work.

Fashion-MNIST (Xiao et al. 2017) ships as four IDX files (LeCun's MNIST format:
a big-endian header of two zero bytes, a type byte (0x08 = uint8), a byte with
the number of dimensions, one uint32 per dimension, then the raw data).
Debian's ``dataset-fashion-mnist`` package puts them in
/usr/share/datasets/fashion-mnist/; torchvision downloads the same files.

Tasks follow the TensorFlow reproduction of cross-stitch networks described in
CONTEXT.md: ``fine`` is the 10 original classes and ``coarse`` groups them into
shoes / for women / other.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from csnet.errors import CsnetError, UsageError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
MISSING_LABEL = -1  # a sample without a label for a task; its loss is masked out

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
class DatasetSpec:
    """What a named data set is: its folder under the data root and its tasks (name -> number of classes)."""

    name: str
    folder: str
    tasks: dict[str, int]
    how_to_get: str
    default_tasks: tuple[str, ...]


DATASETS = {
    "fashion": DatasetSpec(
        name="fashion",
        folder="fashion-mnist",
        tasks={"fine": 10, "coarse": 3, "body": 5},
        how_to_get=(
            "install the Debian package (sudo apt-get install dataset-fashion-mnist), "
            "or on a machine with a network run "
            "torchvision.datasets.FashionMNIST(ROOT, download=True) and copy ROOT/FashionMNIST/raw "
            "to DATA_ROOT/fashion-mnist"
        ),
        default_tasks=("fine", "coarse"),
    ),
}


@dataclass(frozen=True)
class DataConfig:
    """Which data a run uses and how it is split; recorded in config.json so eval sees the same split."""

    dataset: str = "fashion"
    data_root: str | None = None
    val_size: int = 5000
    train_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def _fine_labels(fine: torch.Tensor, task: str) -> torch.Tensor:
    if task == "fine":
        return fine.long()
    if task == "coarse":
        return COARSE_OF_FINE[fine.long()]
    if task == "body":
        return BODY_OF_FINE[fine.long()]
    raise UsageError(f"unknown task {task!r} for fashion; valid: fine, coarse, body")


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


def locate(spec: DatasetSpec, data_root: Path | None = None) -> dict[str, Path]:
    """The four IDX files of a data set: under ``data_root`` if given, else the first default root that has all."""
    roots = [Path(data_root)] if data_root is not None else default_roots()
    for root in roots:
        files = _files_in(root / spec.folder)
        if files is not None:
            return files
    searched = ", ".join(str(r / spec.folder) for r in roots)
    raise CsnetError(
        f"{spec.name} data not found (searched {searched}; each needs {', '.join(IDX_FILES.values())}, "
        f"plain or .gz): {spec.how_to_get}"
    )


# ---------------------------------------------------------------- splits and batches


@dataclass
class Split:
    """Images kept as uint8 (N, C, H, W) and one int64 label vector per task (-1 = no label)."""

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
    mean: float
    std: float
    num_classes: dict[str, int]
    files: dict[str, Path]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise UsageError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)

    def to(self, device: torch.device) -> "Data":
        return Data(self.train.to(device), self.val.to(device), self.test.to(device),
                    self.mean, self.std, self.num_classes, self.files)


def check_tasks(dataset: str, tasks) -> DatasetSpec:
    spec = dataset_spec(dataset)
    for task in tasks:
        if task not in spec.tasks:
            raise UsageError(f"unknown task {task!r} for {dataset}; valid: {', '.join(spec.tasks)}")
    return spec


def load(cfg: DataConfig, tasks: list[str] | tuple[str, ...]) -> Data:
    """Load a data set, hold out a seeded validation set, and optionally keep a seeded training subset.

    The validation hold-out depends only on ``split_seed``, so runs with different
    training seeds are compared on the same images.
    """
    spec = check_tasks(cfg.dataset, tasks)
    val_size, train_size = cfg.val_size, cfg.train_size
    files = locate(spec, Path(cfg.data_root) if cfg.data_root else None)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.dim() != 3 or labels.dim() != 1:
            raise CsnetError(f"{files[f'{part}_images']}: expected images (N, H, W) and labels (N,)")
        if images.shape[0] != labels.shape[0]:
            raise CsnetError(
                f"{files[f'{part}_labels']}: {labels.shape[0]} labels for {images.shape[0]} images"
            )
        if int(labels.max()) >= 10:
            raise CsnetError(f"{files[f'{part}_labels']}: label {int(labels.max())} outside 0..9")

    n_train = arrays["train_images"].shape[0]
    if not 0 < val_size < n_train:
        raise UsageError(f"--val-size must be between 1 and {n_train - 1} (the training set has {n_train} images)")
    if train_size is not None and not 0 < train_size <= n_train - val_size:
        raise UsageError(
            f"--train-size must be between 1 and {n_train - val_size} "
            f"({n_train} training images minus {val_size} held out for validation)"
        )

    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, rest = order[:val_size], order[val_size:]
    train_idx = rest[:train_size] if train_size is not None else rest

    n_test = arrays["test_images"].shape[0]
    test_idx = None
    if cfg.test_size is not None:
        if not 0 < cfg.test_size <= n_test:
            raise UsageError(f"--test-size must be between 1 and {n_test}")
        test_idx = torch.randperm(n_test, generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.test_size]

    def make(images: torch.Tensor, fine: torch.Tensor, idx: torch.Tensor | None) -> Split:
        if idx is not None:
            images, fine = images[idx], fine[idx]
        return Split(images.unsqueeze(1).contiguous(), {t: _fine_labels(fine, t) for t in tasks})

    train = make(arrays["train_images"], arrays["train_labels"], train_idx)
    pixels = train.images.float()
    return Data(
        train=train,
        val=make(arrays["train_images"], arrays["train_labels"], val_idx),
        test=make(arrays["test_images"], arrays["test_labels"], test_idx),
        mean=float(pixels.mean()),
        std=float(pixels.std()),
        num_classes={t: spec.tasks[t] for t in tasks},
        files=files,
    )


def batches(split: Split, batch_size: int, *, mean: float, std: float, generator: torch.Generator | None = None,
            start: int = 0):
    """Yield (z-scored float images, {task: labels}) batches; shuffled when a generator is given.

    ``start`` skips that many samples of the (shuffled) order, after drawing the whole
    order, so a resumed epoch sees exactly the batches the interrupted one had left.

    Images stay uint8 in memory and are converted one batch at a time, which keeps
    the resident set four times smaller than a float copy of the data set.
    """
    n = len(split)
    device = split.images.device
    order = torch.randperm(n, generator=generator).to(device) if generator is not None else None
    for first in range(start, n, batch_size):
        if order is None:
            sl = slice(first, first + batch_size)
            images, labels = split.images[sl], {t: y[sl] for t, y in split.labels.items()}
        else:
            idx = order[first:first + batch_size]
            images, labels = split.images[idx], {t: y[idx] for t, y in split.labels.items()}
        yield (images.float() - mean) / std, labels
