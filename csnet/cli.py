"""The ``csnet`` command line: one Typer app, each command calls one library function.

Errors a user can fix print one ``error: ...`` line and exit non-zero (2 for
usage errors); ``csnet --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
import warnings
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

# Only what --help and argument errors need: torch, torchvision, pandas and matplotlib are imported
# by the command that uses them (tests/test_cli.py checks sys.modules after --help).
from csnet import distributed, runio
from csnet.config import (BACKBONES, DATASETS, DataConfig, TrainConfig, defaults, is_custom, parse_image_size,
                          trust_data)
from csnet.errors import CsnetError, UsageError
from csnet.runio import default_out, run_path

try:  # Typer 0.2x vendors Click and raises its own exception types
    from typer import TyperException as _ParseError
except ImportError:  # older Typer runs on Click
    from click import ClickException as _ParseError

app = typer.Typer(
    name="csnet",
    help="Cross-stitch networks (Misra et al., CVPR 2016): pretrain, stitch, train, eval, compare.",
    no_args_is_help=True,
    add_completion=True,  # csnet --install-completion: Tab completes commands and options
    pretty_exceptions_enable=False,
)
# Off a terminal (make, CI, a log file) Rich would squeeze tables into 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
_state = {"debug": False}

# ------------------------------------------------------------------ shared options
# Defaults come from the config dataclasses, so each setting is declared once (read off the fields:
# building a TrainConfig would check its weighting, which imports torch).
_D, _T = defaults(DataConfig), defaults(TrainConfig)

DATASET_NAMES = ", ".join(DATASETS)
Dataset = Annotated[str, typer.Option(help=f"Data set: {DATASET_NAMES}, csv:PATH (numeric features, label columns named by --tasks), folder:PATH (images and a labels.csv), or module.path:function (your own torch Dataset).")]
DataRoot = Annotated[Optional[str], typer.Option(
    help="Folder holding fashion-mnist/ with the four IDX files [default: $CSNET_DATA_ROOT, ./data, /usr/share/datasets].")]
ValSize = Annotated[Optional[int], typer.Option(
    min=1, help="Training images (or rows) held out, seeded, for validation and model selection "
                "[default: 5000 images, a tenth of a table].")]
Starve = Annotated[Optional[list[str]], typer.Option(
    help="TASK=N: keep only N training labels of TASK (the paper's data-starved setting); repeatable.")]
LabelColumns = Annotated[Optional[str], typer.Option(
    help="For --dataset csv:PATH, every label column, comma-separated: none of them is read as a feature "
         "[default: the tasks].")]
ImageSize = Annotated[Optional[str], typer.Option(
    metavar="S|H,W", help="For --dataset folder:PATH, resize every image to S x S pixels, or to H x W [default: "
                          "their own size, if all share it].")]
Labels = Annotated[Optional[str], typer.Option(
    help="For --dataset folder:PATH, the label table (image paths in it stay relative to PATH) [default: PATH/labels.csv].")]
ImageColumn = Annotated[Optional[str], typer.Option(
    help="For --dataset folder:PATH, the table's column naming the image files [default: image].")]
StreamOpt = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="For folder:PATH and your own data set, read the items from disk as they are needed "
                                 "(--stream) or once into memory (--no-stream) [default: stream when the set would "
                                 "take more than a quarter of the machine's memory].")]
Workers = Annotated[Optional[int], typer.Option(
    min=0, max=256, help="Processes reading a streamed data set ahead of training (0: the training process) "
                         "[default: up to 4].")]
DataOption = Annotated[Optional[list[str]], typer.Option(
    help="KEY=VALUE passed to your own data set's function as a keyword argument (a string); repeatable.")]
TestCsv = Annotated[Optional[str], typer.Option(help="For --dataset csv:PATH, a separate test table [default: a seeded fifth of PATH].")]
TrainSize = Annotated[Optional[int], typer.Option(min=1, help="Train on this many images of the rest (seeded) [default: all].")]
TestSize = Annotated[Optional[int], typer.Option(min=1, help="Test on this many of the official test images (seeded), for quick runs [default: all].")]
SplitSeed = Annotated[int, typer.Option(help="Seed of the validation hold-out and the --train-size subset.")]
Epochs = Annotated[int, typer.Option(min=1, help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Examples per training step.")]
Lr = Annotated[float, typer.Option(help="Learning rate of the columns (must be > 0).")]
WeightDecay = Annotated[float, typer.Option(min=0.0, help="L2 weight decay on the columns (the reproduction: 1e-5).")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="adam or sgd.")]
Momentum = Annotated[float, typer.Option(min=0.0, help="SGD momentum.")]
StitchLrMult = Annotated[float, typer.Option(
    help="Learning-rate multiplier of the cross-stitch weights; the paper's best: 100-1000 with SGD.")]
Seed = Annotated[int, typer.Option(help="Seed of weight init, dropout and batch order.")]
Seeds = Annotated[Optional[str], typer.Option(
    help="Several seeds, comma-separated (e.g. 0,1,2): one run each in OUT/seed-N, a summary in OUT/summary.csv.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when present, else CPU), cpu or cuda.")]
Backbone = Annotated[Optional[str], typer.Option(
    help=f"Column architecture: {', '.join(BACKBONES)}, or module.path:function returning (nn.Module, "
         "[stitch point names]) (see docs/models.md). torchvision nets repeat a gray channel to RGB; VGG pads 28 px to 32. "
         "With --from or --resume: only the run's own module.path:function, to allow importing it. "
         "[default: convnet]")]
TrustBackbone = Annotated[Optional[str], typer.Option(
    "--backbone", help="The run's own module.path:function backbone (or, for a run of csnet.fit, the function "
                       "building its network), named to allow csnet to import it: csnet never imports code that "
                       "a run folder names.")]
Stitch = Annotated[Optional[str], typer.Option(
    help="Where units go: none (independent columns, summed loss), all (the backbone's default points: convnet "
         "pool1, pool2, fc, the paper's placement; mlp every hidden layer; resnet layer1..4; vgg every pool), "
         "convnet's after-pool (pool1, pool2) and after-fc (fc), or stage names, comma-separated. [default: all]")]
UnitMode = Annotated[Optional[str], typer.Option(
    help="channel: the paper's (T, T, C) weights; layer: one (T, T) matrix; dense: one (T*D, T*D) matrix over the "
         "flattened features, the Keras variant (huge: 157M weights after pool1 of the convnet). [default: channel]")]
UnitInit = Annotated[Optional[str], typer.Option(
    help="alpha-beta (--alpha on the diagonal, --beta off it), identity, convex (alpha, (1-alpha)/(T-1)), "
         "ones (every input the sum of all columns). [default: alpha-beta]")]
Weights = Annotated[Optional[Path], typer.Option(
    help="Local pretrained weights (a torchvision state dict) for every column of a torchvision backbone; "
         "loaded with weights_only=True; tensors of another shape (the head) are skipped.")]
Arch = Annotated[Optional[str], typer.Option(
    help="cross-stitch (one column per task, units at the stitch points); nddr (NDDR layers there, Gao et al. 2019); "
         "sluice (sluice units, Ruder et al. 2019); independent (columns side by side, no units: --stitch none); "
         "shared (hard parameter sharing, the paper's 'split' baseline: one trunk up to --share-until then a "
         "branch per task). [default: cross-stitch]")]
Subspaces = Annotated[Optional[int], typer.Option(help="--arch sluice: subspaces per layer [default: 2, as Ruder et al.].")]
ShareUntil = Annotated[Optional[str], typer.Option(help="With --arch shared: the last shared stage (convnet: pool1, pool2, fc).")]
FreezeColumns = Annotated[bool, typer.Option("--freeze-columns", help="Train only the units (the two-domain procedure).")]
TrainHeads = Annotated[bool, typer.Option("--train-heads", help="With --freeze-columns, train the output heads too.")]
Alpha = Annotated[Optional[float], typer.Option(help="Initial same-task unit weight [default: 0.9].")]
Beta = Annotated[Optional[float], typer.Option(help="Initial different-task unit weight [default: 0.1]; --alpha 1 --beta 0 is the identity.")]
BatchNorm = Annotated[Optional[bool], typer.Option("--batch-norm/--no-batch-norm", help="Batch norm after the convs [default: on].")]
Dropout = Annotated[Optional[float], typer.Option(help="Dropout probability before each output layer (the reproduction keeps 0.8) [default: 0.2].")]
Hidden = Annotated[Optional[str], typer.Option(help="mlp hidden sizes, comma-separated [default: 60,20].")]
Out = Annotated[Optional[Path], typer.Option(help="Run folder to create; an existing run is refused unless --force [default: runs/COMMAND-TIME].")]
Name = Annotated[Optional[str], typer.Option(help="Run name: the run goes to runs/NAME (a name, not a path).")]
Force = Annotated[bool, typer.Option("--force", help="Replace the run already in --out (only a csnet run's own files are removed).")]
LrSchedule = Annotated[str, typer.Option(help="constant, or cosine (annealed to 0 over --epochs).")]
Amp = Annotated[bool, typer.Option("--amp", help="bf16 autocast for the forward pass (for CUDA GPUs).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last/--no-channels-last",
                                           help="channels_last (NHWC) memory format for conv columns.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the network (slow to start; for long runs).")]
Deterministic = Annotated[bool, typer.Option("--deterministic", help="Use PyTorch's deterministic algorithms (CUDA: slower).")]
Select = Annotated[Optional[str], typer.Option(
    help="Model selection: the best epoch by this validation metric, TASK:METRIC (e.g. depth:abs_err; its "
         "direction comes from the task's kind) [default: the score, the mean of every task's primary metric].")]
WeightingOpt = Annotated[str, typer.Option(
    "--weighting", help="How the task losses combine: equal (their sum), fixed:TASK=W,... (static weights), uncertainty "
                        "(Kendall et al. 2018), dwa[:TEMPERATURE] (Liu et al. 2019, 2 by default), gradnorm[:ALPHA] "
                        "(Chen et al. 2018, 1.5 by default), pcgrad (Yu et al. 2020).")]
TensorBoard = Annotated[bool, typer.Option("--tensorboard", help="Also write the metrics as TensorBoard scalars to "
                                           "RUN/tensorboard/ (needs the optional tensorboard package).")]
Augment = Annotated[str, typer.Option(
    help="Training batches flipped left-right and/or cropped after padding by an eighth of the side, per sample, "
         "with per-pixel targets alike: none, or flip, crop, comma-separated (never at evaluation).")]
KeepLast = Annotated[bool, typer.Option("--keep-last", help="Keep last.pt (the whole training state) when the run ends, "
                                        "to extend it later with --resume --epochs N; removed otherwise.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-epoch lines.")]
Config = Annotated[Optional[Path], typer.Option(
    help="A TOML file whose keys are this command's options (train-size = 6000, tasks = [\"fine\", \"coarse\"]); "
         "options on the command line win; an unknown key is an error.")]


def _out(out: Path | None, name: str | None, command: str) -> Path:
    if out is not None and name is not None:
        raise UsageError("give --out PATH or --name NAME, not both")
    if name is not None:
        return run_path(name)
    return out or default_out(command)


def _given(ctx: typer.Context, names) -> list[str]:
    """The options among ``names`` that the user set on the command line."""
    return [f"--{n.replace('_', '-')}" for n in names
            if (src := ctx.get_parameter_source(n)) is not None and src.name in ("COMMANDLINE", "ENVIRONMENT")]


def _seed_list(ctx: typer.Context, seeds: str | None) -> list[int] | None:
    if seeds is None:
        return None
    if _given(ctx, ["seed"]):
        if not _given(ctx, ["seeds"]):
            return None  # --seed on the command line wins over seeds from a --config file
        raise UsageError("give --seed N or --seeds A,B,C, not both")
    seed_list = list(_parse_list(seeds, "--seeds", int))
    for seed in seed_list:
        TrainConfig(seed=seed)  # the range check, before the seeds' folder is made
    return seed_list


def _data_config(dataset, data_root, val_size, train_size, test_size, split_seed, starve=None,
                 test_csv=None, label_columns=None, image_size=None, labels=None, image_column=None,
                 stream=None, workers=None, data_option=None) -> DataConfig:
    counts = {}
    for item in starve or []:
        task, _, n = item.partition("=")
        if not task or not n.isdigit():
            raise UsageError(f"--starve takes TASK=N (N a whole number), got {item!r}")
        counts[task] = int(n)
    return DataConfig(dataset=dataset, data_root=data_root, val_size=val_size, train_size=train_size,
                      test_size=test_size, split_seed=split_seed, starve=counts or None, test_csv=test_csv,
                      label_columns=_parse_list(label_columns, "--label-columns") if label_columns else None,
                      image_size=image_size, labels=labels, image_column=image_column, stream=stream,
                      workers=workers, options=_options(data_option))


def _options(data_option: list[str] | None) -> dict[str, str] | None:
    """``--data-option KEY=VALUE`` pairs as keyword arguments of the data set's function."""
    options = {}
    for item in data_option or []:
        key, eq, value = item.partition("=")
        if not key.isidentifier() or not eq:
            raise UsageError(f"--data-option takes KEY=VALUE (KEY a Python name), got {item!r}")
        options[key] = value
    return options or None


def _typed(ctx: typer.Context, name: str, value):
    """``value`` if the user typed option ``name`` on this command line, else None: code named only in a
    --config file (perhaps a downloaded run's config.json) is never trusted to be imported."""
    return value if _given(ctx, [name]) else None


def _trusted(dataset: str | None) -> tuple[str, ...]:
    """The user's own data set named on this command line: code it may import (see ``_code``)."""
    return (trust_data(dataset),) if dataset is not None and is_custom(dataset) else ()


def _code(backbone: str | None, with_run: str | None = None) -> tuple[str, ...]:
    """The code the user named on this command line: a ``module:function`` backbone, or nothing."""
    if backbone is None:
        return ()
    if with_run and not is_custom(backbone):
        raise UsageError(f"--backbone {backbone} cannot be used with {with_run} (the network comes from the run; "
                         "--backbone there only names the run's own module.path:function, to allow importing it)")
    return (backbone,) if is_custom(backbone) else ()


def _parse_list(text: str, option: str, cast=str) -> tuple:
    try:
        items = tuple(cast(s.strip()) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"{option} takes a comma-separated list, got {text!r}") from None
    if not items:
        raise UsageError(f"{option} is empty")
    return items


def _task_kinds(items) -> tuple[list[str], dict[str, str]]:
    """``["gender", "age:regression"]`` -> task names and the kinds given ({"age": "regression"})."""
    names, kinds = [], {}
    for item in items:
        name, _, kind = item.partition(":")
        if not name:
            raise UsageError(f"--tasks: {item!r} has no task name (write TASK or TASK:KIND)")
        names.append(name)
        if kind:
            kinds[name] = kind
    return names, kinds


def _model_config(spec, tasks, *, stitch, label_columns=None, **given):
    """ModelConfig from the options the user gave; unset ones keep the dataclass defaults."""
    from csnet.data import model_input
    from csnet.models.network import ModelConfig

    kw = {k: v for k, v in given.items() if v is not None}
    kw.update(model_input(spec, tasks, _parse_list(label_columns, "--label-columns") if label_columns else None))
    if "in_features" in kw:
        kw.setdefault("backbone", "mlp")
    kw.setdefault("backbone", spec.backbone)
    for t in tasks:
        if spec.tasks[t].problem:
            raise UsageError(spec.tasks[t].problem)
    if "hidden" in kw:
        kw["hidden"] = _parse_list(kw["hidden"], "--hidden", int)
    return ModelConfig(tasks=tuple(tasks), num_classes=tuple(spec.tasks[t].size for t in tasks),
                       kinds=tuple(spec.tasks[t].kind for t in tasks), stitch=stitch, **kw)



# ------------------------------------------------------------------ commands


def _start(device: str | None = None):
    """What a command that trains or evaluates does first (after parsing, so --help stays light): keep
    freed memory in the process, join the other processes under torchrun (only rank 0 prints), and
    hand back the stages module that runs the command."""
    from csnet import stages
    from csnet.train import keep_freed_memory

    keep_freed_memory()
    if device is not None:
        _join(device)
    return stages


def _join(device: str) -> None:
    global console
    if distributed.launched():
        distributed.setup(device)
        if not distributed.world().is_main:
            console = Console(quiet=True)


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False):
    _state["debug"] = debug


@app.command()
def pretrain(
    ctx: typer.Context,
    task: Annotated[Optional[str], typer.Option(
        help="The single task this column learns (fashion: fine, coarse, body), as TASK or TASK:KIND; not needed "
             "where the data set has one task (mnist).")] = None,
    dataset: Dataset = _D.dataset, data_root: DataRoot = None, val_size: ValSize = _D.val_size,
    train_size: TrainSize = None, test_size: TestSize = None, split_seed: SplitSeed = _D.split_seed,
    starve: Starve = None, test_csv: TestCsv = None, label_columns: LabelColumns = None, image_size: ImageSize = None,
    labels: Labels = None, image_column: ImageColumn = None, stream: StreamOpt = None, workers: Workers = None,
    data_option: DataOption = None,
    backbone: Backbone = None, batch_norm: BatchNorm = None, dropout: Dropout = None, hidden: Hidden = None,
    weights: Weights = None,
    epochs: Epochs = _T.epochs, batch_size: BatchSize = _T.batch_size, lr: Lr = _T.lr,
    weight_decay: WeightDecay = _T.weight_decay, optimizer: OptimizerOpt = _T.optimizer,
    momentum: Momentum = _T.momentum, lr_schedule: LrSchedule = _T.lr_schedule, seed: Seed = _T.seed,
    seeds: Seeds = None, select: Select = None, device: Device = _T.device, deterministic: Deterministic = False,
    amp: Amp = False, channels_last: ChannelsLast = True, compile: Compile = False, keep_last: KeepLast = False,
    tensorboard: TensorBoard = False, augment: Augment = _T.augment,
    out: Out = None, name: Name = None, force: Force = False, quiet: Quiet = False, config: Config = None,
):
    """Train one single-task column: the network each cross-stitch column starts from."""
    stages = _start(device)
    from csnet.data import dataset_spec

    image_size = parse_image_size(image_size)
    seed_list = _seed_list(ctx, seeds)
    names, kinds = _task_kinds([task] if task is not None else [])
    code = _code(_typed(ctx, "backbone", backbone)) + _trusted(_typed(ctx, "dataset", dataset))
    spec = dataset_spec(dataset, kinds, image_size, labels, image_column, code, _options(data_option))
    if task is None:
        if len(spec.tasks) != 1:
            raise UsageError(f"--task is needed: {dataset} has the tasks {', '.join(spec.tasks)}")
        task = next(iter(spec.tasks))
    task = names[0] if names else task
    if task not in spec.tasks:
        raise UsageError(f"unknown task {task!r} for {dataset}; valid: {', '.join(spec.tasks)}")
    model_cfg = _model_config(spec, [task], stitch="none", label_columns=label_columns, backbone=backbone,
                              batch_norm=batch_norm, dropout=dropout, hidden=hidden)
    stages.pretrain(
        task, _data_config(dataset, data_root, val_size, train_size, test_size, split_seed, starve, test_csv,
                           label_columns, image_size, labels, image_column, stream, workers, data_option),
        model_cfg,
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                    momentum=momentum, lr_schedule=lr_schedule, seed=seed, device=device, deterministic=deterministic,
                    amp=amp, channels_last=channels_last, compile=compile, select=select, keep_last=keep_last, tensorboard=tensorboard, augment=augment),
        _out(out, name, f"pretrain-{task}"), console, quiet, force, weights, seed_list,
        code=code,
    )


@app.command()
def stitch(
    runs: Annotated[list[Path], typer.Argument(help="Two or more single-task pretrain runs, one per column.")],
    stitch: Annotated[str, typer.Option(help="Where units go: none, all, a named placement or stage names (as for train).")] = "all",
    alpha: Annotated[float, typer.Option(help="Initial same-task unit weight.")] = 0.9,
    beta: Annotated[float, typer.Option(help="Initial different-task unit weight.")] = 0.1,
    unit_mode: UnitMode = None, unit_init: UnitInit = None,
    arch: Annotated[str, typer.Option(help="How the columns are mixed: cross-stitch, nddr or sluice (see train).")] = "cross-stitch",
    subspaces: Subspaces = None,
    tasks: Annotated[Optional[str], typer.Option(help="Column names, comma-separated [default: each run's task].")] = None,
    backbone: TrustBackbone = None,
    out: Out = None, name: Name = None, force: Force = False,
):
    """Build a cross-stitch network from pretrained columns and save it as a run (no training)."""
    run = _start().stitch(runs, stitch=stitch, alpha=alpha, beta=beta, out=_out(out, name, "stitch"),
                        tasks=list(_parse_list(tasks, "--tasks")) if tasks is not None else None, force=force,
                        unit_mode=unit_mode or "channel", unit_init=unit_init or "alpha-beta",
                        code=_code(backbone, "stitch"), arch=arch, subspaces=subspaces or 2)
    console.print(f"stitched {len(runs)} columns (units: {stitch}); saved in {run}; "
                  f"train it with: csnet train --from {run}", highlight=False)


@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Option(
        help=f"Data set: {DATASET_NAMES}, csv:PATH (numeric features, label columns named by --tasks), "
             "folder:PATH (images and a labels.csv), or module.path:function (your own torch Dataset; with a run, "
             "it names the run's own, to allow importing it) [default: fashion, or the --from run's].")] = None,
    tasks: Annotated[Optional[str], typer.Option(
        help="Tasks, comma-separated, each TASK or TASK:KIND (kinds: classification, binary, multilabel, regression, "
             "segmentation, depth; a loss after a second colon, e.g. age:regression:l1). fashion: fine, coarse, body; "
             "fashion-scenes: segment, depth, presence, count; csv:PATH: its columns, kind inferred when not "
             "given. [default: the data set's, fashion: fine,coarse].")] = None,
    from_run: Annotated[Optional[Path], typer.Option("--from", help="Start from this run's saved network (e.g. a stitch run).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run from its last checkpoint (with --epochs N: up to N).")] = None,
    data_root: DataRoot = None, val_size: ValSize = _D.val_size,
    train_size: TrainSize = None, test_size: TestSize = None, split_seed: SplitSeed = _D.split_seed,
    starve: Starve = None, test_csv: TestCsv = None, label_columns: LabelColumns = None, image_size: ImageSize = None,
    labels: Labels = None, image_column: ImageColumn = None, stream: StreamOpt = None, workers: Workers = None,
    data_option: DataOption = None,
    backbone: Backbone = None, arch: Arch = None, share_until: ShareUntil = None, subspaces: Subspaces = None,
    stitch: Stitch = None, unit_mode: UnitMode = None, unit_init: UnitInit = None,
    alpha: Alpha = None, beta: Beta = None,
    batch_norm: BatchNorm = None, dropout: Dropout = None, hidden: Hidden = None, weights: Weights = None,
    freeze_columns: FreezeColumns = False, train_heads: TrainHeads = False,
    epochs: Epochs = _T.epochs, batch_size: BatchSize = _T.batch_size, lr: Lr = _T.lr,
    weight_decay: WeightDecay = _T.weight_decay, optimizer: OptimizerOpt = _T.optimizer,
    momentum: Momentum = _T.momentum, stitch_lr_mult: StitchLrMult = _T.stitch_lr_mult,
    lr_schedule: LrSchedule = _T.lr_schedule, seed: Seed = _T.seed, seeds: Seeds = None, select: Select = None,
    weighting: WeightingOpt = _T.weighting, device: Device = _T.device, deterministic: Deterministic = False,
    amp: Amp = False, channels_last: ChannelsLast = True, compile: Compile = False, keep_last: KeepLast = False,
    tensorboard: TensorBoard = False, augment: Augment = _T.augment,
    out: Out = None, name: Name = None, force: Force = False, quiet: Quiet = False, config: Config = None,
):
    """Train a cross-stitch network (or the independent baseline, --stitch none) from scratch, --from a run,
    or --resume an interrupted one."""
    stages = _start(device if resume is None else None)  # a resumed run joins once it has read its device
    from csnet.data import dataset_spec

    if resume is not None:
        allowed = {"resume", "epochs", "device", "quiet", "ctx", "config", "backbone", "dataset"}
        given = _given(ctx, [n for n in ctx.params if n not in allowed])
        if given:
            raise UsageError(f"{', '.join(given)} cannot be used with --resume (the run keeps its settings; "
                             "only --epochs and --device may change)")
        if dataset is not None and (not is_custom(dataset) or dataset != stages.run_data_config(resume).dataset):
            raise UsageError(f"--dataset {dataset} cannot be used with --resume (with a run, --dataset only names the "
                             "run's own module.path:function data set, to allow importing it)")
        stages.resume(resume, console, quiet=quiet,
                      epochs=epochs if _given(ctx, ["epochs"]) else None,
                      device=device if _given(ctx, ["device"]) else None,
                      code=_code(_typed(ctx, "backbone", backbone), "--resume")
                      + _trusted(_typed(ctx, "dataset", dataset)))
        return
    image_size = parse_image_size(image_size)
    seed_list = _seed_list(ctx, seeds)
    model_opts = dict(backbone=backbone, arch=arch, share_until=share_until, subspaces=subspaces, stitch=stitch, unit_mode=unit_mode, unit_init=unit_init, alpha=alpha,
                      beta=beta, batch_norm=batch_norm, dropout=dropout, hidden=hidden)
    model_cfg = None
    code = _code(_typed(ctx, "backbone", backbone), "--from" if from_run is not None else None) \
        + _trusted(_typed(ctx, "dataset", dataset))
    if from_run is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in model_opts.items() if v is not None and k != "backbone"]
        given += [flag for flag, v in (("--tasks", tasks), ("--weights", weights)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} cannot be used with --from (the network comes from {from_run})")
        try:
            before = stages.run_data_config(from_run)
        except UsageError:  # a stitch of columns from different data sets: --dataset is needed
            if dataset is None:
                raise
            before = None
        if before is not None and dataset in (None, before.dataset):  # the run's data: its settings come along
            dataset, image_size = before.dataset, image_size if image_size is not None else before.image_size
            labels, image_column = labels or before.labels, image_column or before.image_column
            if data_option is None and before.options:
                data_option = [f"{k}={v}" for k, v in before.options.items()]
            stream = stream if stream is not None else before.stream
            workers = workers if workers is not None else before.workers
    else:
        dataset = dataset or _D.dataset
        task_list, kinds = _task_kinds(_parse_list(tasks, "--tasks")) if tasks is not None else (None, {})
        spec = dataset_spec(dataset, kinds, image_size, labels, image_column, code, _options(data_option))
        task_list = task_list or list(spec.default_tasks)
        if not task_list:
            raise UsageError(f"--dataset {dataset} has no default tasks: name the label columns with --tasks a,b")
        unknown = [t for t in task_list if t not in spec.tasks]
        if unknown:
            raise UsageError(f"unknown task {unknown[0]!r} for {dataset}; valid: {', '.join(spec.tasks)}")
        default_stitch = "none" if arch in ("shared", "independent") else "all"
        if subspaces is not None and arch != "sluice":
            raise UsageError("--subspaces applies to --arch sluice")
        model_cfg = _model_config(spec, task_list, stitch=model_opts.pop("stitch") or default_stitch,
                                  label_columns=label_columns, **model_opts)
    stages.train(
        _data_config(dataset, data_root, val_size, train_size, test_size, split_seed, starve, test_csv,
                     label_columns, image_size, labels, image_column, stream, workers, data_option), model_cfg,
        TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                    momentum=momentum, stitch_lr_mult=stitch_lr_mult, lr_schedule=lr_schedule,
                    freeze_columns=freeze_columns, train_heads=train_heads, seed=seed, device=device,
                    deterministic=deterministic, amp=amp, channels_last=channels_last, compile=compile,
                    select=select, weighting=weighting, keep_last=keep_last,
                    tensorboard=tensorboard, augment=augment),
        _out(out, name, "train"), console, quiet, from_run=from_run, force=force, weights=weights, seeds=seed_list,
        code=code,
    )


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    dataset: Annotated[Optional[str], typer.Option(
        help="Data set to evaluate on; needed for a stitch of columns from different data sets, and to name the run's "
             "own module.path:function data set, to allow importing it [default: the run's].")] = None,
    device: Device = _T.device, data_root: DataRoot = None, backbone: TrustBackbone = None,
):
    """Evaluate a run's saved network: per-task loss and metrics, the mean loss and the score; writes RUN/eval.csv."""
    metrics, not_saved = _start().eval_run(run, split, device, data_root, console, dataset,
                                                   _code(backbone, "eval") + _trusted(dataset))
    from csnet.compare import task_info
    from csnet.units import PERCENT, with_unit

    units = {t: i["units"] for t, i in task_info(run, [t for t in metrics if t != "mean"]).items()}
    units["mean"] = {"score": PERCENT}
    table = Table(title=f"{run} ({split})")
    for col in ("task", "loss", "metrics"):
        table.add_column(col, justify="right" if col == "loss" else "left")
    for task, m in metrics.items():
        table.add_row(task, f"{m['loss']:.4f}", "  ".join(f"{k} {with_unit(v, units[task].get(k, ''))}"
                                                          for k, v in m.items() if k != "loss"))
    console.print(table)
    if not_saved is not None:
        raise CsnetError(f"the metrics above were not saved: {not_saved}")
    console.print(f"written to {run / 'eval.csv'}", highlight=False)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more trained runs or --seeds folders; the first is the baseline.")],
    reference: Annotated[Optional[list[Path]], typer.Option(
        help="Single-task reference run(s) for Δm, e.g. --reference runs/pre-fine --reference runs/pre-coarse "
             "[default: the first run].")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for compare.csv, REPORT.md and the plots [default: runs/compare-TIME].")] = None,
    allow_mismatch: Annotated[bool, typer.Option(
        "--allow-mismatch", help="Compare runs tested on different data (data set, test examples, split seed or "
                                 "data files); REPORT.md then records the difference.")] = False,
):
    """Compare runs: test accuracy at the best validation epoch, mean ± std and 95% CI over seeds,
    paired differences with p-values, Δm, model size; writes compare.csv, REPORT.md and plots."""
    from csnet.compare import compare as compare_runs, format_rows

    out = out or default_out("compare")
    table, figures = compare_runs(runs, out, reference or None, allow_mismatch)
    for note in table.attrs.get("notes", []):
        print(f"warning: {note}", file=sys.stderr)
    header, cells = format_rows(table)
    view = Table(title=f"each task's primary test metric and the score at the best validation epoch "
                       f"(difference from {table.run.iloc[0]}: points for percentages)")
    for i, h in enumerate(header):
        view.add_column(h, justify="left" if i == 0 else "right")
    for row in cells:
        view.add_row(*row)
    console.print(view)
    console.print(f"table: {out / 'compare.csv'}\nreport: {out / 'REPORT.md'}\n"
                  f"plots: {', '.join(str(f) for f in figures)}", highlight=False)


@app.command()
def bench(
    examples: Annotated[int, typer.Option(min=256, help="Training images per throughput measurement.")] = 4096,
    quick: Annotated[bool, typer.Option("--quick", help="Skip the 8-task and batch-size scans and the epoch run.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for bench.csv [default: runs/bench-TIME].")] = None,
):
    """Measure training throughput side by side: unstitched columns, csnet's stitched network (with
    and without its compiled CPU kernels) and a straightforward implementation, against the
    machine's measured matmul peak (CPU); then a two-epoch full-data run's memory and epoch time."""
    import csv as csv_lib

    _start()
    from csnet.bench import epoch_overhead, fmt, run, verdict

    out = runio.new_folder(out or default_out("bench"))
    results = run(examples, quick)
    if not quick:
        results.update(epoch_overhead())
    table = Table(title=f"csnet bench ({results['threads']} threads, data: {results['data']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target")
    for key, value in results.items():
        table.add_row(key, fmt(value), verdict(key, value))
    console.print(table)
    with open(out / "bench.csv", "w", newline="") as f:
        csv_lib.writer(f).writerows([("measure", "value", "target"),
                                     *((k, v, verdict(k, v)) for k, v in results.items())])
    console.print(f"written to {out / 'bench.csv'}", highlight=False)


# ------------------------------------------------------------------ entry point


def _config_defaults(command, argv: list[str]) -> dict | None:
    """``--config FILE``: its keys become the command's defaults (the command line still wins). A TOML
    file's keys are the option names (``train-size`` or ``train_size``); an unknown key is an error. A
    run's ``config.json`` repeats that run's settings (``_run_options``)."""
    i = next((k for k, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if i is None:
        return None
    if argv[i].startswith("--config="):
        path = Path(argv[i].split("=", 1)[1])
    elif i + 1 < len(argv):
        path = Path(argv[i + 1])
    else:
        raise UsageError("--config needs a FILE.toml or a run's config.json")
    sub = next((a for a in argv[:i] if a in command.commands), None)
    if sub is None:
        raise UsageError("--config goes after the command, e.g. csnet train --config FILE.toml")
    try:
        text = path.read_text(encoding="utf-8")
        values = _run_options(json.loads(text), sub, path) if path.suffix == ".json" else tomllib.loads(text)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start}); TOML and JSON files are UTF-8") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {path}: not valid JSON ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from e
    params = {p.name: p for p in command.commands[sub].params}
    defaults = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        name = {"from": "from_run"}.get(name, name)
        if name not in params or name in ("config", "ctx"):
            valid = ", ".join(sorted({"from_run": "from"}.get(n, n).replace("_", "-")
                                     for n in params if n not in ("config", "ctx")))
            raise UsageError(f"--config {path}: unknown key {key!r} for csnet {sub}; valid: {valid}")
        if isinstance(value, list) and not getattr(params[name], "multiple", False):
            value = ",".join(map(str, value))  # tasks = ["fine", "coarse"] -> "fine,coarse"
        if value == "" or value == []:
            raise UsageError(f"--config {path}: {key} is empty")
        defaults[name] = value
    return {sub: defaults}


# the model's config.json keys that are worked out from the data, not chosen: never options
_DERIVED = {"num_classes", "kinds", "target_stats", "in_channels", "image_size", "in_features", "tasks"}


def _run_options(config, sub: str, path: Path) -> dict:
    """The options that repeat a run, read from its config.json: its data and training settings, its
    --weights, and its network's (its tasks with their kinds, backbone, units...) or, for a run that
    started --from another, that source. What csnet worked out itself (class counts, input shape, target
    statistics) is left to be worked out again; settings left at None or at their defaults are left out
    (a pretrain run records the units' defaults, which pretrain has no options for, and --subspaces is
    refused without --arch sluice)."""
    from csnet.models.network import ModelConfig

    if not isinstance(config, dict) or config.get("command") not in ("train", "pretrain"):
        raise UsageError(f"--config {path}: not the config.json of a train or pretrain run")
    if isinstance(config.get("model"), dict) and config["model"].get("arch") == "custom":
        raise UsageError(f"--config {path}: a run of csnet.fit trains a network of your own; repeat it from Python "
                         "(its config.json records the settings)")
    if sub not in ("train", "pretrain"):
        raise UsageError(f"--config {path}: a run's config.json configures train or pretrain, not {sub}")
    sections = {k: config.get(k) if isinstance(config.get(k), dict) else {} for k in ("data", "model", "train")}
    options = {}
    for section, cls in (("data", DataConfig), ("train", TrainConfig), ("model", ModelConfig)):
        if section == "model" and config.get("source"):
            continue  # the network comes from the source run
        usual = vars(defaults(cls))
        options.update({k: v for k, v in sections[section].items() if v is not None and not (
            section == "model" and k in _DERIVED) and not (k in usual and _same(v, usual[k]))})
    if isinstance(options.get("starve"), dict):
        options["starve"] = [f"{t}={n}" for t, n in options["starve"].items()]
    if isinstance(options.get("options"), dict):
        options["data_option"] = [f"{k}={v}" for k, v in options.pop("options").items()]
    weights = config.get("weights")
    if isinstance(weights, dict) and isinstance(weights.get("path"), str):
        options["weights"] = weights["path"]
    if config.get("source"):
        options["from"] = config["source"]
        return options
    model = sections["model"]
    names, kinds = list(model.get("tasks") or []), list(model.get("kinds") or [])
    tasks = [f"{t}:{k}" if k else t for t, k in zip(names, kinds + [""] * (len(names) - len(kinds)))]
    if sub == "pretrain":
        if len(tasks) != 1:
            raise UsageError(f"--config {path}: a run of {len(tasks)} tasks is repeated by csnet train, not pretrain")
        options["task"] = tasks[0]
        options.pop("stitch", None)  # a column is trained without units
    else:
        options["tasks"] = tasks
    return options


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b


_DEFAULT = re.compile(r"\s*\[default: ([^\]]+)\]\.?\s*$")
_METAVARS = {"int": "INTEGER", "float": "FLOAT", "Path": "PATH", "str": "TEXT"}


def _help_as_written(command):
    """Help that shows what it was written to show, in the form command-line tools use.

    Typer renders help strings as Rich markup, which took every bracketed part (``(nn.Module, [names])``)
    for a style tag and dropped it: escaped here. A trailing ``[default: X]`` (an option whose default
    depends on other settings, so its Python default is None) becomes Typer's own default display, so
    every default shows once and alike. Values are named INTEGER / FLOAT / TEXT / PATH and flags
    take none (Typer 0.2x writes ``<bool>`` and ``<list[Path]>``); arguments show as ``RUN...``.
    """
    from rich.markup import escape

    def without_metavar(get_help_option):
        def get(ctx):
            option = get_help_option(ctx)
            if option is not None:
                option.metavar = ""
            return option
        return get

    for sub in [command, *getattr(command, "commands", {}).values()]:
        sub.get_help_option = without_metavar(sub.get_help_option)
        if sub.help:
            # a docstring's line breaks are not paragraph breaks (the commands' list kept them)
            sub.help = escape("\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(sub.help).split("\n\n")))
        for param in sub.params:
            if getattr(param, "help", None):
                found = _DEFAULT.search(param.help)
                if found:
                    param.help, param.show_default = param.help[:found.start()].rstrip() + ".", found.group(1)
                    param.help = param.help.replace("..", ".")
                param.help = escape(param.help)
            bare = param.bare_type() if hasattr(param, "bare_type") else "str"
            kind = _METAVARS.get(bare.removeprefix("list[").removesuffix("]"), "TEXT")
            if param.param_type_name == "argument":
                usage = (param.metavar or param.name.upper().rstrip("S")) + ("..." if param.nargs != 1 else "")
                param.get_usage_pieces = lambda ctx, usage=usage, required=param.required: [
                    usage if required else f"[{usage}]"]
                param.display_type_rich = lambda ctx, kind=kind: kind
            elif param.metavar is None:
                param.metavar = "" if getattr(param, "is_flag", False) else kind
    return command


def _refuse_empty(command, argv: list[str]) -> None:
    """``--tasks ""`` must not quietly mean the default: an option given an empty value is an error."""
    sub = next((a for a in argv if a in command.commands), None)
    if sub is None:
        return
    takes_value = {opt for p in command.commands[sub].params if p.param_type_name == "option"
                   and not getattr(p, "is_flag", False) for opt in p.opts}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in takes_value and ((eq and not value.strip()) or
                                    (not eq and i + 1 < len(argv) and not argv[i + 1].strip())):
            raise UsageError(f"{name} is empty")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code. User errors become one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _one_line_warning
    _state["debug"] = "--debug" in argv[:1]
    runio.set_command_line(["csnet", *argv])
    command = _help_as_written(typer.main.get_command(app))
    rank = int(distributed.launched() and os.environ.get("RANK", "0"))
    try:
        sub = next((a for a in argv if a in command.commands), None)
        if distributed.launched() and sub not in (None, "train", "pretrain"):
            raise UsageError(f"csnet {sub} runs in one process; start it without torchrun "
                             "(only train and pretrain run under torchrun)")
        _refuse_empty(command, argv)
        default_map = _config_defaults(command, argv)
        code = command.main(args=argv or ["--help"], prog_name="csnet", standalone_mode=False,
                            **({"default_map": default_map} if default_map else {}))
        return code if isinstance(code, int) else 0
    except (CsnetError, _ParseError) as e:
        if _state["debug"]:
            raise
        message = e.format_message() if isinstance(e, _ParseError) else str(e)
        # Under torchrun every rank meets the same bad option or data; rank 0 alone reports it
        # (an error only one rank met comes to rank 0 through distributed.together).
        if rank == 0:
            print(f"{getattr(e, 'label', 'error')}: {message}", file=sys.stderr)
        else:
            # torchrun stops every worker as soon as one exits: leave rank 0 the moment it needs to
            # print the message this rank keeps to itself
            time.sleep(3)
        return e.exit_code
    except RuntimeError as e:  # gloo and nccl report a lost peer as DistError or a plain RuntimeError
        if _state["debug"] or not distributed.world().active:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: process {rank} stopped: {first} (when another process stopped first, its message "
              "is above)", file=sys.stderr)
        return 1
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 1
    except OSError as e:  # storage faults that no narrower handler named: still one line, never a traceback
        if _state["debug"]:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
        if "csnet.folder" in sys.modules:  # a folder's scan serves one command: the next one reads the files again
            sys.modules["csnet.folder"]._SCANS.clear()


def run() -> None:
    sys.exit(main())
