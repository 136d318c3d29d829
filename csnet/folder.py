"""Your own images: ``--dataset folder:PATH``.

PATH holds the images (PNG or JPEG, gray or RGB, any size) and a table ``labels.csv`` (or the
table ``--labels FILE`` names) with one row per image: the column ``image`` (or ``--image-column``)
names the image file (a path relative to PATH), every other column is a task. A task column holds class labels, 0/1 values, numbers, or paths to per-pixel
targets: a PNG of class indices (segmentation) or a 16-bit PNG or ``.npy`` array (depth, given as
``TASK:depth``). Kinds are inferred as for tables (``csnet.cells``); a column of target files is
``segmentation`` unless named ``:depth``. An optional column ``split`` (train / val / test) fixes
the splits; without it a seeded fifth of the rows is the test set and a tenth of the rest
validation. An empty cell is a missing label.

Images are decoded with torchvision's I/O (``decode_image``), resized to ``--image-size S``
(square; default: the first image's side, when every image has it) with antialiased bilinear
interpolation, targets with nearest-neighbour. Gray images are read as RGB when any image is RGB.
Everything is held in memory as uint8 (targets in their kinds' encodings); inputs are z-scored per
channel with the training split's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csnet.errors import CsnetError, UsageError
from csnet.tasks import IGNORE, TaskSpec, split_kind

TABLE = "labels.csv"
IMAGE_COLUMN = "image"
SPLIT_COLUMN = "split"
TARGET_SUFFIXES = (".png", ".npy")


@dataclass(frozen=True)
class Layout:
    """Where a folder's parts are: its root (image paths are relative to it), its label table (ROOT/labels.csv
    or --labels FILE) and the table's column naming the images (``image`` or --image-column)."""

    root: Path
    table: Path
    image: str


def layout(name: str, labels: str | None = None, image_column: str | None = None) -> Layout:
    root = Path(name[len("folder:"):])
    image = image_column or IMAGE_COLUMN
    if not root.is_dir():
        raise CsnetError(f"--dataset {name}: {root} is not a folder")
    table = Path(labels) if labels else root / TABLE
    if labels and not table.is_file():
        raise CsnetError(f"--labels {labels}: no such file")
    if not table.is_file():
        raise CsnetError(f"--dataset {name}: no {TABLE} in {root} (one row per image: an '{image}' column "
                         "naming the file, one column per task; or name another table with --labels FILE)")
    return Layout(root, table, image)


def _table(lay: Layout) -> pd.DataFrame:
    from csnet.cells import read_table

    path, image = lay.table, lay.image
    df = read_table(str(path))
    if image not in df.columns:
        raise CsnetError(f"{path}: no '{image}' column naming the image files (columns: "
                         f"{', '.join(map(str, df.columns))}; --image-column names another)")
    if df.empty:
        raise CsnetError(f"{path}: no rows")
    names = df[image]
    if names.isna().any():
        raise CsnetError(f"{path}: row {int(names.isna().to_numpy().nonzero()[0][0]) + 1} names no image (its "
                         f"'{image}' cell is empty)")
    twice = names[names.duplicated()]
    if len(twice):
        raise CsnetError(f"{path}: {twice.iloc[0]!r} is named by more than one row; each image once")
    if SPLIT_COLUMN in df.columns:
        bad = ~df[SPLIT_COLUMN].isin(["train", "val", "test"])
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise CsnetError(f"{path}: row {row + 1}, column {SPLIT_COLUMN}: {df[SPLIT_COLUMN].iloc[row]!r} is not "
                             "train, val or test")
    return df


def _is_target_file(column: pd.Series) -> bool:
    values = column.dropna()
    return len(values) > 0 and values.map(lambda v: isinstance(v, str) and v.lower().endswith(TARGET_SUFFIXES)).all()


def _inside(lay: Layout, name: str, row: int, column: str) -> Path:
    """ROOT/name, for a name that stays inside ROOT (the table's paths are relative to the data set's folder)."""
    path = lay.root / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(lay.root.resolve()):
        raise CsnetError(f"{lay.table}: row {row + 1}, column {column}: {name!r} is not a path inside {lay.root}")
    return path


def _decode(path: Path, mode, what: str) -> torch.Tensor:
    import warnings

    from torchvision.io import decode_image

    try:
        with warnings.catch_warnings():
            # torchvision 0.29 announces that torchcodec will take over its image decoders one day: said once
            # per image, it would drown the run's output; the decoders work as documented
            warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision")
            return decode_image(str(path), mode=mode)
    except (RuntimeError, ValueError, OSError) as e:
        raise CsnetError(f"{path}: not a readable {what} ({str(e).strip().splitlines()[0][:120]})") from None


def _read_image(path: Path, what: str = "image") -> torch.Tensor:
    """(C, H, W) uint8, C = 3 (RGB) or 1: palette and CMYK images come out as RGB, 16-bit ones scaled to 8."""
    from torchvision.io import ImageReadMode
    from torchvision.transforms.v2 import functional as TF

    if not path.is_file():
        raise CsnetError(f"{path}: {what} file not found")
    t = _decode(path, ImageReadMode.RGB, "image")
    if t.dim() != 3:
        raise CsnetError(f"{path}: one still image expected, found a tensor of shape {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = TF.to_dtype(t, torch.uint8, scale=True)
    # a gray image decoded as RGB has three equal channels: keep one
    return t[:1] if torch.equal(t[0], t[1]) and torch.equal(t[0], t[2]) else t


def _read_target(path: Path) -> torch.Tensor:
    """A per-pixel target (H, W) as float32: a one-channel PNG (8 or 16 bits, values as stored) or a 2-D
    .npy array of booleans, integers or floats."""
    from torchvision.io import ImageReadMode

    if not path.is_file():
        raise CsnetError(f"{path}: target file not found")
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)  # a data file: never unpickle code
        except (OSError, ValueError, EOFError) as e:
            raise CsnetError(f"{path}: not a readable .npy array ({e})") from None
        if a.ndim != 2 or a.dtype.kind not in "buif":
            raise CsnetError(f"{path}: a per-pixel target must be a 2-D array of numbers, found {a.dtype} {a.shape}")
        return torch.from_numpy(a.astype(np.float32))
    t = _decode(path, ImageReadMode.UNCHANGED, "PNG")
    if t.dim() != 3 or t.shape[0] != 1:
        raise CsnetError(f"{path}: a per-pixel target must have one channel, found shape {tuple(t.shape)}")
    return t[0].float()


@lru_cache(maxsize=2)
def _decoded(lay: Layout, table_version: tuple, size: int | None):
    """(images uint8 (N, C, S, S), {column: targets (N, S, S) float32, or the problem reading them}, side):
    the folder read once, each image resized as soon as it is decoded."""
    from torchvision.transforms.v2 import functional as TF

    root = lay.root
    df = _table(lay)
    paths = [_inside(lay, str(p), i, lay.image) for i, p in enumerate(df[lay.image])]
    shapes, kept = [], []
    for path in paths:
        r = _read_image(path)
        shapes.append(tuple(r.shape[1:]))
        if size is None and (shapes[-1] != shapes[0] or shapes[0][0] != shapes[0][1]):
            raise UsageError(f"{root}: the images are not all square of one size (found {shapes[0]} and "
                             f"{shapes[-1]}); give --image-size S to resize them to S x S")
        side = size or shapes[0][0]
        kept.append(TF.resize(r, [side, side], antialias=True) if shapes[-1] != (side, side) else r)
    size = size or shapes[0][0]
    channels = 3 if any(r.shape[0] == 3 for r in kept) else 1
    images = torch.empty(len(kept), channels, size, size, dtype=torch.uint8)
    for i, r in enumerate(kept):
        images[i] = r.expand(channels, -1, -1)  # gray to RGB where another image is in colour
    del kept
    targets = {}
    for column in df.columns:
        if column in (lay.image, SPLIT_COLUMN) or not _is_target_file(df[column]):
            continue
        try:
            targets[column] = _targets_of(lay, df, column, paths, shapes, size)
        except CsnetError as e:  # an error only once a run chooses this column as a task
            targets[column] = str(e)
    return images, targets, size


def _targets_of(lay: Layout, df: pd.DataFrame, column: str, paths, shapes, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    out = torch.full((len(df), size, size), float("nan"))
    for i, name in enumerate(df[column]):
        if not isinstance(name, str):
            continue
        t = _read_target(_inside(lay, name, i, column))
        if tuple(t.shape) != shapes[i]:
            raise CsnetError(f"{lay.root / name}: {tuple(t.shape)} pixels, but its image {paths[i].name} has "
                             f"{shapes[i]}; a per-pixel target must match its image")
        out[i] = TF.resize(t[None], [size, size], interpolation=TF.InterpolationMode.NEAREST)[0] \
            if tuple(t.shape) != (size, size) else t
    return out


def _classes_of(column: str, y: torch.Tensor) -> tuple[int, str | None]:
    """(number of classes, or the problem) of a column of class maps: whole numbers, 255 or -1 unlabelled."""
    from csnet.cells import MAX_CLASSES

    values = y[~torch.isnan(y)]
    values = values[(values != IGNORE) & (values != -1)]
    if not bool(torch.isfinite(values).all()) or not bool((values == values.round()).all()) or \
            bool((values < 0).any()):
        return 0, (f"task {column}: its maps hold values that are not whole class numbers (0, 1, ...; 255 or -1 for "
                   f"no label); give {column}:depth for a map of values")
    n = int(values.max()) + 1 if len(values) else 0
    if n < 2:
        return n, (f"task {column}: its maps hold {n} class(es) besides 255, which marks unlabelled pixels; store a "
                   "binary mask as 0 and 1")
    if n > MAX_CLASSES:
        return n, (f"task {column}: its maps hold classes up to {n - 1}, more than {MAX_CLASSES}; for a map of "
                   f"values give {column}:depth")
    return n, None


def _load(lay: Layout, size: int | None):
    stat = lay.table.stat()
    lay = Layout(lay.root.resolve(), lay.table.resolve(), lay.image)
    return _table(lay), *_decoded(lay, (stat.st_mtime_ns, stat.st_size), size)


def folder_spec(name: str, kinds: dict[str, str], image_size: int | None = None, labels: str | None = None,
                image_column: str | None = None):
    """Every column but the image (and split) column is a possible task; target-file columns are per-pixel."""
    from csnet.data import DatasetSpec
    from csnet.cells import infer_kind

    lay = layout(name, labels, image_column)
    df, images, targets, size = _load(lay, image_size)
    tasks = {}
    for column in df.columns:
        if column in (lay.image, SPLIT_COLUMN):
            continue
        given = kinds.get(column)
        if column in targets:
            kind = given or "segmentation"
            cls, _ = split_kind(kind, column)
            if not cls.dense:
                raise UsageError(f"task {column}: its cells name target files, so it is per-pixel: segmentation "
                                 f"or depth, not {cls.kind}")
            y = targets[column]
            if isinstance(y, str):  # a file of this column could not be read
                tasks[column] = TaskSpec(kind, 1, problem=y)
            elif cls.kind == "segmentation":
                tasks[column] = TaskSpec(kind, *_classes_of(column, y))
            else:
                tasks[column] = TaskSpec(kind, 1)
        else:
            tasks[column] = infer_kind(df[column], given, str(lay.table))
    return DatasetSpec(name, (), tasks, (), tuple(images.shape[1:]), loader=load_folder, backbone="fcn"
                       if any(split_kind(t.kind)[0].dense for t in tasks.values()) else "convnet")


def load_folder(cfg, spec, tasks):
    from csnet.data import Data, Split, holdout, starve, subset, test_subset
    from csnet.cells import class_values, encode_targets

    if cfg.test_csv or cfg.label_columns:
        raise UsageError("--test-csv and --label-columns apply to --dataset csv:PATH")
    lay = layout(cfg.dataset, cfg.labels, cfg.image_column)
    df, images, targets, _ = _load(lay, cfg.image_size)
    table = str(lay.table)
    classes = class_values(df, tasks)
    labels = {}
    for t, task in tasks.items():
        if t in targets:
            y = targets[t]
            if isinstance(y, str):
                raise CsnetError(y)
            if task.kind == "segmentation":  # uint8 class maps, 255 for no label (-1 in the files too)
                y = torch.where(torch.isnan(y) | (y == -1), float(IGNORE), y)
                labels[t] = y.to(torch.uint8) if task.size <= IGNORE else torch.where(y == IGNORE, -1.0, y).long()
            else:
                labels[t] = y
        else:
            labels[t] = encode_targets(df, t, task, classes, table)
    everything = Split(images, labels)
    if SPLIT_COLUMN in df.columns:
        if cfg.val_size is not None:
            raise UsageError(f"{table} has a '{SPLIT_COLUMN}' column, which fixes the validation set: leave --val-size out")
        part = {s: torch.from_numpy((df[SPLIT_COLUMN] == s).to_numpy().nonzero()[0]) for s in ("train", "val", "test")}
        if cfg.train_size is not None and cfg.train_size > len(part["train"]):
            raise UsageError(f"--train-size must be between 1 and {len(part['train'])} (the rows of split train)")
        empty = [s for s, idx in part.items() if len(idx) == 0]
        if empty:
            raise CsnetError(f"{table}: no row has split {empty[0]}")
        train, val, test = (subset(everything, part[s]) for s in ("train", "val", "test"))
        train = subset(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed))
                       [:cfg.train_size]) if cfg.train_size else train
    else:
        order = torch.randperm(len(df), generator=torch.Generator().manual_seed(cfg.split_seed))
        n_test = max(1, len(df) // 5)
        test, pool = subset(everything, order[:n_test]), subset(everything, order[n_test:])
        val_idx, train_idx = holdout(len(pool), cfg, max(1, len(pool) // 10), "images")
        train, val = subset(pool, train_idx), subset(pool, val_idx)
    test = subset(test, test_subset(len(test), cfg))
    for t, task in tasks.items():
        if not bool(task.labelled(train.labels[t]).any()):
            raise CsnetError(f"{table}: no training image has a {t} target (the column is empty)")
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    # per channel, shaped to broadcast over (N, C, H, W) batches; summed in float64 without a float copy
    x = train.images
    total, squares = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(256):  # a float copy of 256 images at a time, not of the whole set
        c = chunk.double()
        total += c.sum((0, 2, 3))
        squares += c.square().sum((0, 2, 3))
    n = x.numel() // x.shape[1]
    mean = total / n
    var = (squares / n - mean.square()) * n / max(n - 1, 1)
    mean, std = mean.float().view(-1, 1, 1), var.clamp_min(0).sqrt().float().clamp_min(1e-6).view(-1, 1, 1)
    return Data(train=train, val=val, test=test, mean=mean, std=std, files={"labels": Path(table)})
