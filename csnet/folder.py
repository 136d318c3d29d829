"""Your own images: ``--dataset folder:PATH``.

PATH holds the images (PNG or JPEG, gray or RGB, any size) and a table ``labels.csv`` with one
row per image: the column ``image`` names the image file (a path relative to PATH), every other
column is a task. A task column holds class labels, 0/1 values, numbers, or paths to per-pixel
targets: a PNG of class indices (segmentation) or a 16-bit PNG or ``.npy`` array (depth, given as
``TASK:depth``). Kinds are inferred as for tables (``csnet.tabular``); a column of target files is
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


def _root(name: str) -> Path:
    root = Path(name[len("folder:"):])
    if not root.is_dir():
        raise CsnetError(f"--dataset {name}: {root} is not a folder")
    if not (root / TABLE).is_file():
        raise CsnetError(f"--dataset {name}: no {TABLE} in {root} (one row per image: an '{IMAGE_COLUMN}' column "
                         "naming the file, one column per task)")
    return root


def _table(root: Path) -> pd.DataFrame:
    from csnet.tabular import _read

    path = root / TABLE
    df = _read(str(path))
    if IMAGE_COLUMN not in df.columns:
        raise CsnetError(f"{path}: no '{IMAGE_COLUMN}' column naming the image files (columns: "
                         f"{', '.join(map(str, df.columns))})")
    if df.empty:
        raise CsnetError(f"{path}: no rows")
    names = df[IMAGE_COLUMN]
    if names.isna().any():
        raise CsnetError(f"{path}: row {int(names.isna().to_numpy().nonzero()[0][0]) + 1} names no image")
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


def _read_image(path: Path, mode) -> torch.Tensor:
    import warnings

    from torchvision.io import decode_image

    if not path.is_file():
        raise CsnetError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 announces that torchcodec will take over its image decoders one day: said once
            # per image, it would drown the run's output; the decoders work as documented
            warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision")
            return decode_image(str(path), mode=mode)
    except (RuntimeError, ValueError, OSError) as e:
        raise CsnetError(f"{path}: not a readable image ({str(e).strip().splitlines()[0][:120]})") from None


def _read_target(path: Path) -> torch.Tensor:
    """A per-pixel target (H, W): a PNG (8- or 16-bit, one channel) or a 2-D .npy array."""
    from torchvision.io import ImageReadMode

    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)  # a data file: never unpickle code
        except (OSError, ValueError) as e:
            raise CsnetError(f"{path}: not a readable .npy array ({e})") from None
        if a.ndim != 2:
            raise CsnetError(f"{path}: a per-pixel target must be 2-D (H, W), found shape {a.shape}")
        return torch.from_numpy(a.astype(np.float32))
    t = _read_image(path, ImageReadMode.UNCHANGED)
    if t.shape[0] != 1:
        raise CsnetError(f"{path}: a per-pixel target must have one channel, found {t.shape[0]}")
    return t[0]


@lru_cache(maxsize=2)
def _decoded(root_text: str, table_mtime: int, size: int | None):
    """(images uint8 (N, C, S, S), {column: targets (N, S, S) float32 or None}, side): the folder read once."""
    from torchvision.io import ImageReadMode
    from torchvision.transforms.v2 import functional as TF

    root = Path(root_text)
    df = _table(root)
    paths = [root / str(p) for p in df[IMAGE_COLUMN]]
    raw = [_read_image(p, ImageReadMode.UNCHANGED) for p in paths]
    channels = 3 if any(r.shape[0] >= 3 for r in raw) else 1
    sides = {tuple(r.shape[1:]) for r in raw}
    if size is None:
        if len(sides) > 1 or next(iter(sides))[0] != next(iter(sides))[1]:
            raise UsageError(f"{root}: the images are not all square of one size (found {sorted(sides)[:3]}); "
                             "give --image-size S to resize them to S x S")
        size = next(iter(sides))[0]
    images = torch.empty(len(raw), channels, size, size, dtype=torch.uint8)
    for i, r in enumerate(raw):
        r = r[:3] if r.shape[0] >= 3 else r[:1]  # drop alpha
        if r.shape[0] != channels:
            r = r.expand(channels, -1, -1)  # gray to RGB
        images[i] = TF.resize(r, [size, size], antialias=True) if r.shape[1:] != (size, size) else r
    targets = {}
    for column in df.columns:
        if column in (IMAGE_COLUMN, SPLIT_COLUMN) or not _is_target_file(df[column]):
            continue
        out = torch.full((len(df), size, size), float("nan"))
        for i, (name, image_path) in enumerate(zip(df[column], paths)):
            if not isinstance(name, str):
                continue
            t = _read_target(root / name)
            if t.shape != raw[i].shape[1:]:
                raise CsnetError(f"{root / name}: {tuple(t.shape)} pixels, but its image {image_path.name} has "
                                 f"{tuple(raw[i].shape[1:])}; a per-pixel target must match its image")
            out[i] = TF.resize(t[None].float(), [size, size], interpolation=TF.InterpolationMode.NEAREST)[0] \
                if tuple(t.shape) != (size, size) else t.float()
        targets[column] = out
    return images, targets, size


def _load(name: str, size: int | None):
    root = _root(name)
    return _table(root), *_decoded(str(root.resolve()), (root / TABLE).stat().st_mtime_ns, size)


def folder_spec(name: str, kinds: dict[str, str], image_size: int | None = None):
    """Every column but the image (and split) column is a possible task; target-file columns are per-pixel."""
    from csnet.data import DatasetSpec
    from csnet.tabular import _infer

    df, images, targets, size = _load(name, image_size)
    tasks = {}
    for column in df.columns:
        if column in (IMAGE_COLUMN, SPLIT_COLUMN):
            continue
        given = kinds.get(column)
        if column in targets:
            kind = given or "segmentation"
            cls, _ = split_kind(kind, column)
            if not cls.dense:
                raise UsageError(f"task {column}: its cells name target files, so it is per-pixel: segmentation "
                                 f"or depth, not {cls.kind}")
            y = targets[column]
            classes = int(np.nanmax(np.where(y.numpy() == IGNORE, np.nan, y.numpy()))) + 1 \
                if cls.kind == "segmentation" else 1
            tasks[column] = TaskSpec(kind, classes)
        else:
            tasks[column] = _infer(df[column], given, str(Path(name[len("folder:"):]) / TABLE))
    return DatasetSpec(name, (), tasks, (), tuple(images.shape[1:]), loader=load_folder, backbone="fcn"
                       if any(split_kind(t.kind)[0].dense for t in tasks.values()) else "convnet")


def load_folder(cfg, spec, tasks):
    from csnet.data import Data, Split, holdout, starve, subset, test_subset
    from csnet.tabular import _classes, _targets

    if cfg.test_csv or cfg.label_columns:
        raise UsageError("--test-csv and --label-columns apply to --dataset csv:PATH")
    df, images, targets, _ = _load(cfg.dataset, cfg.image_size)
    table = str(Path(cfg.dataset[len("folder:"):]) / TABLE)
    classes = _classes(df, tasks)
    labels = {}
    for t, task in tasks.items():
        if t in targets:
            y = targets[t]
            # class maps as int64 with -1 for no label; depth as float with NaN
            labels[t] = torch.where(torch.isnan(y), -1.0, y).long() if task.kind == "segmentation" else y
        else:
            labels[t] = _targets(df, t, task, classes, table)
    everything = Split(images, labels)
    if SPLIT_COLUMN in df.columns:
        part = {s: torch.from_numpy((df[SPLIT_COLUMN] == s).to_numpy().nonzero()[0]) for s in ("train", "val", "test")}
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
    pixels = train.images.float()
    # per channel, shaped to broadcast over (N, C, H, W) batches
    mean = pixels.mean((0, 2, 3)).view(-1, 1, 1)
    std = pixels.std((0, 2, 3)).clamp_min(1e-6).view(-1, 1, 1)
    return Data(train=train, val=val, test=test, mean=mean, std=std, files={"labels": Path(table)})
