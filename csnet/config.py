"""Every setting of a run, declared once: the data and the training dataclasses (their defaults
are the CLI's), and the names the command line lists in its help.

Nothing here imports torch, so ``csnet --help`` and argument errors answer at once; the
registries that build these things (``csnet.data``, ``csnet.models``) are checked against
the names below by the tests.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from types import SimpleNamespace

from csnet.errors import UsageError
from csnet.settings import MAX_SEED, from_dict

# Built-in data sets (csnet.data.DATASETS and EXTRA) and column architectures
# (csnet.models.network.BACKBONES; the torchvision ones are built by csnet.models.backbones).
DATASETS = ("fashion", "mnist", "mnist+fashion", "fashion-scenes")
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg16_bn")
BACKBONES = ("convnet", "fcn", "mlp", *TORCHVISION_BACKBONES)


def defaults(cls) -> SimpleNamespace:
    """A settings dataclass's defaults as attributes, without building (and checking) an instance."""
    return SimpleNamespace(**{f.name: f.default for f in fields(cls) if f.default is not MISSING})


def is_custom(name: str) -> bool:
    """A user's own column or data set, ``module.path:function``: code, so never imported because a file
    names it (``csv:PATH`` and ``folder:PATH`` name files)."""
    return ":" in name and not name.startswith(("csv:", "folder:"))


def image_hw(size) -> tuple[int, int]:
    """An image size as (height, width): ``S`` is S x S, ``(H, W)`` or ``[H, W]`` as given."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def as_image_size(size, option: str = "--image-size"):
    """A size as settings keep it: ``S`` for a square (so square runs read as before), ``(H, W)`` otherwise;
    each side a whole number from 1 to 65535."""
    if size is None:
        return None
    ok = isinstance(size, int) and not isinstance(size, bool) or (
        isinstance(size, (list, tuple)) and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in size))
    if not ok or not all(1 <= v <= 65_535 for v in image_hw(size)):
        raise UsageError(f"{option} takes S or H,W, each from 1 to 65535 pixels, got {size!r}")
    h, w = image_hw(size)
    return h if h == w else (h, w)


def parse_image_size(text: str | None):
    """``--image-size 64`` -> 64; ``--image-size 48,64`` -> (48, 64)."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    except ValueError:
        raise UsageError(f"--image-size takes S or H,W (whole numbers of pixels), got {text!r}") from None
    return as_image_size(parts[0] if len(parts) == 1 else tuple(parts))


# The data set name a run of csnet.fit records when it was given Datasets rather than a module.path:function.
FIT_DATA = "csnet.fit"


def trust_data(name: str) -> str:
    """The entry of a command's trusted code (``--backbone``, ``--dataset`` names) that allows importing the
    data set ``name``; ``=`` cannot occur in a module path, so it never names a backbone."""
    return f"dataset={name}"


@dataclass(frozen=True)
class DataConfig:
    """Which data a run uses and how it is split; recorded in config.json so eval sees the same split.

    ``starve``: task -> number of training labels kept (the paper's data-starved setting).
    """

    dataset: str = "fashion"
    data_root: str | None = None
    val_size: int | None = None  # default: 5,000 images, or a tenth of a CSV table
    train_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0
    starve: dict[str, int] | None = None
    test_csv: str | None = None
    label_columns: tuple[str, ...] | None = None  # csv: every label column, never a feature (default: the tasks)
    # folder: images resized to S x S, or H x W given as (H, W) (default: their own size, if all share it)
    image_size: int | tuple[int, int] | None = None
    labels: str | None = None  # folder: the label table (default: PATH/labels.csv)
    image_column: str | None = None  # folder: the table's column naming the images (default: image)
    stream: bool | None = None  # folder / your own Dataset: read items as needed (default: when the set is too big)
    workers: int | None = None  # processes reading a streamed set (default: up to 4)
    options: dict[str, str] | None = None  # your own data set: keyword arguments of its function

    def __post_init__(self):
        if not 0 <= self.split_seed <= MAX_SEED:
            raise UsageError(f"--split-seed must be a whole number from 0 to {MAX_SEED} (2^63 - 1), "
                             f"got {self.split_seed}")
        for option, n in (("--val-size", self.val_size), ("--train-size", self.train_size),
                          ("--test-size", self.test_size)):
            if n is not None and n < 1:
                raise UsageError(f"{option} must be at least 1, got {n}")
        for task, n in (self.starve or {}).items():
            if n < 0:
                raise UsageError(f"--starve {task}={n}: the number of labels kept must be 0 or more")
        if self.dataset == "":
            raise UsageError("--dataset is empty")
        object.__setattr__(self, "image_size", as_image_size(self.image_size))
        for option, value in (("--image-size", self.image_size), ("--labels", self.labels),
                              ("--image-column", self.image_column)):
            if value is not None and not self.dataset.startswith("folder:"):
                raise UsageError(f"{option} applies to --dataset folder:PATH")
        streams = self.dataset.startswith("folder:") or is_custom(self.dataset) or self.dataset == FIT_DATA
        for option, value in (("--stream", self.stream), ("--workers", self.workers)):
            if value is not None and not streams:
                raise UsageError(f"{option} applies to --dataset folder:PATH and your own module.path:function "
                                 "(the other data sets are always held in memory)")
        if self.workers is not None and not 0 <= self.workers <= 256:
            raise UsageError(f"--workers must be from 0 to 256, got {self.workers}")
        if self.options and not is_custom(self.dataset):
            raise UsageError("--data-option applies to your own --dataset module.path:function")



OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
MAX_COUNT = 2 ** 31 - 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Defaults are the reproduction's: Adam, lr 1e-3, batch 128, L2 1e-5."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"
    momentum: float = 0.9
    # The paper scales the units' learning rate by 10^2..10^3, with SGD. Adam's steps do
    # not grow with the gradient scale, so with Adam a multiplier of 1 is the safe default.
    stitch_lr_mult: float = 1.0
    lr_schedule: str = "constant"
    # Train only the units (and, with train_heads, the output heads): the two-domain notebook's procedure.
    freeze_columns: bool = False
    train_heads: bool = False
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    # Speed: bf16 autocast (CUDA), torch.compile. channels_last (NHWC) is on by default: oneDNN's
    # convolutions, batch norm and pooling are all faster in it on the CPU (the Fashion pair trained
    # about 1.3x faster), and on CUDA it was level or slightly ahead (docs/speed.md).
    amp: bool = False
    channels_last: bool = True
    compile: bool = False
    # Model selection: None for the mean of the tasks' primary metrics ("score"), or TASK:METRIC.
    select: str | None = None
    # How the task losses become the step's gradients (csnet.weightings): equal (their sum), fixed:T=W,...,
    # uncertainty, dwa[:TEMPERATURE], gradnorm[:ALPHA], pcgrad.
    weighting: str = "equal"
    # last.pt (the whole training state, several times model.pt's size) is removed when the run ends
    # normally; kept with keep_last, to extend the run later with --resume --epochs N.
    keep_last: bool = False
    # metrics.csv's values also as TensorBoard scalars in RUN/tensorboard/ (the optional tensorboard package)
    tensorboard: bool = False
    # Training batches flipped and/or cropped (csnet.augment): none, or flip, crop, comma-separated.
    augment: str = "none"

    def __post_init__(self):
        finite = math.isfinite
        checks = [
            (1 <= self.epochs <= MAX_COUNT, f"--epochs must be from 1 to {MAX_COUNT:,}"),
            (1 <= self.batch_size <= MAX_COUNT, f"--batch-size must be from 1 to {MAX_COUNT:,}"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED} (2^63 - 1), "
                                         f"got {self.seed}"),
            (finite(self.lr) and self.lr > 0, "--lr must be a positive number"),
            (finite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be a finite number, 0 or more"),
            (finite(self.momentum) and self.momentum >= 0, "--momentum must be a finite number, 0 or more"),
            (finite(self.stitch_lr_mult) and self.stitch_lr_mult > 0, "--stitch-lr-mult must be a positive number"),
            (self.lr_schedule in SCHEDULES, f"unknown --lr-schedule {self.lr_schedule!r}; valid: {', '.join(SCHEDULES)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if not isinstance(self.weighting, str) or not self.weighting:
            raise UsageError("--weighting is empty")
        from csnet import augment, weightings  # torch: only once a run is being set up

        weightings.check_name(self.weighting)
        if not isinstance(self.augment, str):
            raise UsageError("--augment takes none or flip, crop")
        augment.parse(self.augment)
        if self.freeze_columns and self.weighting.partition(":")[0] == "gradnorm":
            raise UsageError("--weighting gradnorm measures gradients in the columns, which --freeze-columns freezes")
        if self.select is not None and not (isinstance(self.select, str) and self.select.count(":") == 1
                                            and all(self.select.split(":"))):
            raise UsageError(f"--select takes TASK:METRIC (e.g. depth:abs_err), got {self.select!r}")

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "TrainConfig":
        return from_dict(cls, d, "training", source)
