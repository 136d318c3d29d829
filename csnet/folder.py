"""Your own images: ``--dataset folder:PATH``.

PATH holds the images (PNG or JPEG, gray or RGB, any size) and a table ``labels.csv`` (or the
table ``--labels FILE`` names) with one row per image: the column ``image`` (or ``--image-column``)
names the image file (a path relative to PATH), every other column is a task. A task column holds class labels, 0/1 values, numbers, or paths to per-pixel
targets: a PNG of class indices (segmentation) or a 16-bit PNG or ``.npy`` array (depth, given as
``TASK:depth``). Kinds are inferred as for tables (``csnet.cells``); a column of target files is
``segmentation`` unless named ``:depth``. An optional column ``split`` (train / val / test) fixes
the splits; without it a seeded fifth of the rows is the test set and a tenth of the rest
validation. An empty cell is a missing label.

Images are decoded with torchvision's I/O (``decode_image``), resized to ``--image-size S`` (S x S)
or ``H,W`` (default: their own size, when every image has it) with antialiased bilinear
interpolation, targets with nearest-neighbour. Gray images are read as RGB when any image is RGB.
A folder that fits in memory is held as uint8 (targets in their kinds' encodings); a larger one is read
image by image (``Items``, ``csnet.splits.Stream``); both are made by the same calls. The network
z-scores its inputs per channel with the training split's statistics (``InputNorm``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


def _fit_image(r: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """A decoded image at the set's (height, width) and channel count: what both the in-memory and the
    streamed paths hold, made by the same calls so they hold the same bytes."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(r.shape[1:]) != size:
        r = TF.resize(r, list(size), antialias=True)
    return r.expand(channels, -1, -1)


def _fit_target(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(t[None], list(size), interpolation=TF.InterpolationMode.NEAREST)[0] \
        if tuple(t.shape) != size else t


def _encode_dense(y: torch.Tensor, task) -> torch.Tensor:
    """Float maps (NaN: no file) in the encoding the task reads: uint8 class maps with 255 unlabelled (-1 in
    the files too), long ones past 255 classes, float depth."""
    if task.kind != "segmentation":
        return y
    y = torch.where(torch.isnan(y) | (y == -1), float(IGNORE), y)
    return y.to(torch.uint8) if task.size <= IGNORE else torch.where(y == IGNORE, -1.0, y).long()


@dataclass(frozen=True)
class _Scan:
    """What one read of the whole folder learns: the (height, width) and channels, per image its pixel sums,
    per target column its class summary or the problem reading it, and, where the set fits in memory, the
    decoded images (uint8 (N, C, H, W)) and target maps (float32 (N, H, W), NaN where a row names no file)."""

    size: tuple[int, int]
    channels: int
    shapes: tuple
    sums: torch.Tensor  # (N, 2, C) float64: per image and channel, the sum of values and of squares
    columns: dict  # target column -> (number of classes, problem) or the error reading it (a string)
    images: torch.Tensor | None
    targets: dict


def _summary(values: torch.Tensor) -> tuple[bool, int]:
    """(whether any value is not a whole class number, the largest class) of one class map."""
    values = values[~torch.isnan(values)]
    values = values[(values != IGNORE) & (values != -1)]
    bad = not bool(torch.isfinite(values).all()) or not bool((values == values.round()).all()) or \
        bool((values < 0).any())
    return bad, int(values.max()) if len(values) and not bad else -1


def _classes_of(column: str, bad: bool, top: int) -> tuple[int, str | None]:
    """(number of classes, or the problem) of a column of class maps: whole numbers, 255 or -1 unlabelled."""
    from csnet.cells import MAX_CLASSES

    if bad:
        return 0, (f"task {column}: its maps hold values that are not whole class numbers (0, 1, ...; 255 or -1 for "
                   f"no label); give {column}:depth for a map of values")
    n = top + 1
    if n < 2:
        return n, (f"task {column}: its maps hold {n} class(es) besides 255, which marks unlabelled pixels; store a "
                   "binary mask as 0 and 1")
    if n > MAX_CLASSES:
        return n, (f"task {column}: its maps hold classes up to {n - 1}, more than {MAX_CLASSES}; for a map of "
                   f"values give {column}:depth")
    return n, None


def _target_columns(lay: Layout, df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in (lay.image, SPLIT_COLUMN) and _is_target_file(df[c])]


def _decoded(lay: Layout, size: tuple[int, int] | None, keep: bool) -> _Scan:
    """The folder read once, each image resized as soon as it is decoded; kept only when ``keep``."""
    root = lay.root
    df = _table(lay)
    paths = [_inside(lay, str(p), i, lay.image) for i, p in enumerate(df[lay.image])]
    shapes, kept, sums, colour = [], [], [], False
    for path in paths:
        r = _read_image(path)
        shapes.append(tuple(r.shape[1:]))
        if size is None and shapes[-1] != shapes[0]:
            raise UsageError(f"{root}: the images are not all of one size (found {shapes[0]} and {shapes[-1]}); "
                             "give --image-size S (or H,W) to resize them to S x S (or H x W)")
        r = _fit_image(r, size or shapes[0], r.shape[0])
        colour = colour or r.shape[0] == 3
        c = r.double()  # exact sums of whole numbers: the same statistics however the images are read later
        sums.append(torch.stack([c.sum((1, 2)), c.square().sum((1, 2))]).expand(2, 3))  # gray: one value thrice
        if keep:
            kept.append(r)
    size = size or shapes[0]
    channels = 3 if colour else 1
    images = None
    if keep:
        images = torch.empty(len(kept), channels, *size, dtype=torch.uint8)
        for i, r in enumerate(kept):
            images[i] = r.expand(channels, -1, -1)  # gray to RGB where another image is in colour
        del kept
    columns, targets = {}, {}
    for column in _target_columns(lay, df):
        try:
            columns[column], targets[column] = _targets_of(lay, df, column, paths, shapes, size, keep)
        except CsnetError as e:  # an error only once a run chooses this column as a task
            columns[column] = str(e)
    return _Scan(size, channels, tuple(shapes), torch.stack(sums)[:, :, :channels], columns, images, targets)


def _targets_of(lay: Layout, df: pd.DataFrame, column: str, paths, shapes, size: tuple[int, int], keep: bool):
    """(class summary, stacked maps or None) of one column of target files, every file checked."""
    out = torch.full((len(df), *size), float("nan")) if keep else None
    bad, top = False, -1
    for i, name in enumerate(df[column]):
        if not isinstance(name, str):
            continue
        t = _read_target(_inside(lay, name, i, column))
        if tuple(t.shape) != shapes[i]:
            raise CsnetError(f"{lay.root / name}: {tuple(t.shape)} pixels, but its image {paths[i].name} has "
                             f"{shapes[i]}; a per-pixel target must match its image")
        t = _fit_target(t, size)
        b, m = _summary(t)
        bad, top = bad or b, max(top, m)
        if keep:
            out[i] = t
    return _classes_of(column, bad, top), out


def _estimate(lay: Layout, df: pd.DataFrame, size: tuple[int, int] | None) -> int:
    """Bytes the folder takes in memory at its size: three channels per pixel (colour unless every image
    is gray, which only the whole read tells) and four per pixel of each target column."""
    h, w = size or _read_image(_inside(lay, str(df[lay.image].iloc[0]), 0, lay.image)).shape[1:]
    return len(df) * h * w * (3 + 4 * len(_target_columns(lay, df)))


# The last scan of a folder, by (layout, table version, size): the spec and the load of one command read
# the folder once; a streamed run drops the images a first look kept.
_SCANS: dict = {}


def _load(lay: Layout, size, keep: bool | None = None):
    """(table, scan) at ``size`` (S, (H, W) or None: the images' own); ``keep``: hold the images (None: when
    they fit in memory, or as the last scan did)."""
    from csnet.config import image_hw

    size = image_hw(size) if size is not None else None
    stat = lay.table.stat()
    lay = Layout(lay.root.resolve(), lay.table.resolve(), lay.image)
    df = _table(lay)
    key = (lay, (stat.st_mtime_ns, stat.st_size), size)
    have = _SCANS.get(key)
    if keep is None and have is None:
        from csnet.splits import memory_limit

        keep = _estimate(lay, df, size) <= memory_limit()
    if have is not None and (keep is None or have.images is not None or not keep):
        scan = have if keep is not False else replace(have, images=None, targets={})
    else:
        scan = _decoded(lay, size, keep)
    _SCANS.clear()  # one folder at a time
    _SCANS[key] = scan
    return df, scan


def spec(name: str, kinds: dict[str, str], image_size: int | None = None, labels: str | None = None,
         image_column: str | None = None):
    """Every column but the image (and split) column is a possible task; target-file columns are per-pixel."""
    from csnet.cells import infer_kind
    from csnet.splits import DatasetSpec

    lay = layout(name, labels, image_column)
    df, scan = _load(lay, image_size)
    tasks = {}
    for column in df.columns:
        if column in (lay.image, SPLIT_COLUMN):
            continue
        given = kinds.get(column)
        if column in scan.columns:
            kind = given or "segmentation"
            cls, _ = split_kind(kind, column)
            if not cls.dense:
                raise UsageError(f"task {column}: its cells name target files, so it is per-pixel: segmentation "
                                 f"or depth, not {cls.kind}")
            found = scan.columns[column]
            if isinstance(found, str):  # a file of this column could not be read
                tasks[column] = TaskSpec(kind, 1, problem=found)
            elif cls.kind == "segmentation":
                tasks[column] = TaskSpec(kind, *found)
            else:
                tasks[column] = TaskSpec(kind, 1)
        else:
            tasks[column] = infer_kind(df[column], given, str(lay.table))
    return DatasetSpec(name, (), tasks, (), (scan.channels, *scan.size), loader=load_folder,
                       backbone="fcn" if any(split_kind(t.kind)[0].dense for t in tasks.values()) else "convnet")


@dataclass
class Items(torch.utils.data.Dataset):
    """The folder's rows read one at a time, for data that does not fit in memory: item i is (image uint8
    (C, S, S), {task: target}), made by the same calls as the in-memory tensors."""

    lay: Layout
    images: list[Path]
    size: tuple[int, int]
    channels: int
    scalar: dict[str, torch.Tensor]  # task -> every row's target, from the table
    dense: dict[str, list]  # task -> every row's target file (None: unlabelled)
    tasks: dict

    def __len__(self) -> int:
        return len(self.images)

    def _dense(self, task: str, i: int) -> torch.Tensor:
        name = self.dense[task][i]
        t = _fit_target(_read_target(self.lay.root / name), self.size) if name is not None else \
            torch.full(self.size, float("nan"))
        return _encode_dense(t, self.tasks[task])

    def __getitem__(self, i: int):
        image = _fit_image(_read_image(self.images[i]), self.size, self.channels)
        return image, {**{t: y[i] for t, y in self.scalar.items()}, **{t: self._dense(t, i) for t in self.dense}}

    def targets(self, task: str, index: torch.Tensor) -> torch.Tensor:
        if task in self.scalar:
            return self.scalar[task][index]
        return torch.stack([self._dense(task, i) for i in index.tolist()])


def _parts(df: pd.DataFrame, cfg, table: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row numbers of the train, validation and test splits: the table's split column, else seeded."""
    from csnet.splits import holdout, test_subset, train_subset

    if SPLIT_COLUMN in df.columns:
        if cfg.val_size is not None:
            raise UsageError(f"{table} has a '{SPLIT_COLUMN}' column, which fixes the validation set: leave --val-size out")
        part = {s: torch.from_numpy((df[SPLIT_COLUMN] == s).to_numpy().nonzero()[0]) for s in ("train", "val", "test")}
        kept = train_subset(len(part["train"]), cfg, " (the rows of split train)")
        empty = [s for s, idx in part.items() if len(idx) == 0]
        if empty:
            raise CsnetError(f"{table}: no row has split {empty[0]}")
        train, val, test = part["train"], part["val"], part["test"]
        if kept is not None:
            train = train[kept]
    else:
        order = torch.randperm(len(df), generator=torch.Generator().manual_seed(cfg.split_seed))
        n_test = max(1, len(df) // 5)
        test, pool = order[:n_test], order[n_test:]
        val_idx, train_idx = holdout(len(pool), cfg, max(1, len(pool) // 10), "images")
        train, val = pool[train_idx], pool[val_idx]
    chosen = test_subset(len(test), cfg)
    return train, val, test if chosen is None else test[chosen]


def load_folder(cfg, spec, tasks):
    """The splits, in memory when the folder fits (``--stream`` / ``--no-stream`` decide otherwise), read item
    by item by ``--workers`` processes when not; inputs z-scored per channel with the training split's statistics."""
    from csnet.cells import class_values, encode_targets
    from csnet.splits import Data, Split, Stream, channel_stats, starve, stream_workers, streamed_note

    lay = layout(cfg.dataset, cfg.labels, cfg.image_column)
    df, scan = _load(lay, cfg.image_size, None if cfg.stream is None else not cfg.stream)
    table = str(lay.table)
    for t in tasks:
        if isinstance(scan.columns.get(t), str):
            raise CsnetError(scan.columns[t])
    classes = class_values(df, tasks)
    scalar = {t: encode_targets(df, t, task, classes, table) for t, task in tasks.items() if t not in scan.columns}
    rows = _parts(df, cfg, table)
    streaming = scan.images is None
    h, w = scan.size
    size_mb = len(df) * scan.channels * h * w / 1e6
    if streaming:
        workers = stream_workers(cfg.workers)
        dense = {t: [v if isinstance(v, str) else None for v in df[t]] for t in tasks if t in scan.columns}
        items = Items(lay, [_inside(lay, str(p), i, lay.image) for i, p in enumerate(df[lay.image])], scan.size,
                      scan.channels, scalar, dense, tasks)
        train, val, test = (Stream(items, r, tasks, workers) for r in rows)
        note = streamed_note(f"{len(df):,} images ({size_mb:,.0f} MB at {h}x{w}) read from disk", workers,
                             bool(cfg.stream))
    else:
        labels = {**scalar, **{t: _encode_dense(scan.targets[t], task) for t, task in tasks.items()
                               if t in scan.columns}}
        everything = Split(scan.images, labels)
        train, val, test = (everything.subset(r) for r in rows)
        note = f"{len(df):,} images held in memory ({size_mb:,.1f} MB at {h}x{w})"
    for t, task in tasks.items():
        if not bool(task.labelled(train.targets(t)).any()):
            raise CsnetError(f"{table}: no training image has a {t} target (the column is empty)")
    if cfg.starve:
        train = starve(train, cfg.starve, cfg.split_seed, tasks)
    sums = scan.sums[rows[0]].sum(0)
    mean, std = channel_stats(sums[0], sums[1], len(rows[0]) * h * w)
    return Data(train=train, val=val, test=test, mean=mean, std=std, files={"labels": Path(table)}, note=note)
