"""The IDX data sets: MNIST, Fashion-MNIST and their union, held in memory as uint8 tensors.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from csnet.errors import CsnetError
from csnet.splits import Data, DatasetSpec, Split, holdout, starve, subset, test_subset
from csnet.tasks import MISSING, Task, TaskSpec

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


def load_idx(cfg, spec: DatasetSpec, tasks: dict[str, Task]) -> Data:
    """The IDX sets: hold out a seeded validation set from the training files, and optionally keep a seeded
    training subset.

    The validation hold-out depends only on ``split_seed``, so runs with different
    training seeds are compared on the same images.
    """
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
