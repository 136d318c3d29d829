"""The pipeline's stages, each read as setup -> fit -> save. The CLI calls one function per command."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console

from csnet import data as data_lib
from csnet import distributed, plots, runio, weightings
from csnet.compare import curve_series, panels, read_metrics, task_info, weights_moved
from csnet.data import DataConfig
from csnet.errors import CsnetError, UsageError
from csnet.accel import accelerate
from csnet.config import is_custom, trust_data
from csnet.models.network import ModelConfig, build_network, check_outputs, count_macs
from csnet.progress import RichReporter
from csnet.settings import from_dict
from csnet.units import PERCENT, with_unit
from csnet.train import TrainConfig, deterministic_algorithms, evaluate, fit, resolve_device, selection


def _config(command: str, device: torch.device, **sections) -> dict:
    return {"command": command, "argv": runio.command_line(), **sections, "environment": runio.environment(device)}


def check_code(model_cfg: ModelConfig, code: tuple[str, ...], origin: Path | None) -> None:
    """A run folder is data: the network it describes is rebuilt only from csnet's own backbones,
    unless the user names the run's ``module:function`` backbone (or, for a run of ``csnet.fit``, the
    function building its network) on this command line (``code``). Otherwise evaluating a downloaded
    run would import whatever module its folder holds."""
    own = model_cfg.network if model_cfg.arch == "custom" else model_cfg.backbone
    stray = [c for c in code if c != own and c != trust_data(c.partition("=")[2])]
    if stray and origin is not None:
        raise UsageError(f"--backbone {stray[0]} does not match {origin}, whose network uses "
                         f"{'the network builder' if model_cfg.arch == 'custom' else 'backbone'} {own} (with a run, "
                         "--backbone only names the run's own module:function, to allow importing it)")
    if own is not None and is_custom(own) and own not in code:
        raise UsageError(f"{origin or 'this network'} was built with your own "
                         f"{'network' if model_cfg.arch == 'custom' else 'backbone'} {own}; csnet never imports code "
                         f"that a run folder names. If you trust that code, name it on this command line: "
                         f"--backbone {own}")


def _build(model_cfg: ModelConfig, code: tuple[str, ...] = (), origin: Path | None = None,
           weights: Path | None = None, fast: bool = True):
    """The network of ``model_cfg``, with csnet's CPU kernels swapped in (``fast``, see csnet.accel);
    its ``accel`` attribute says which kernels applied."""
    check_code(model_cfg, code, origin)
    try:
        net = build_network(model_cfg, weights)
    except (RuntimeError, MemoryError, OverflowError) as e:  # sizes that cannot be allocated
        raise CsnetError(f"cannot build the network ({model_cfg.backbone}): {_first_line(e)}") from e
    net.accel = accelerate(net) if fast else None
    return net


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[:2])[:300] if lines else type(e).__name__


def _load_state(net, state: dict, path: Path) -> None:
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CsnetError(f"{path}: its weights do not fit its model config ({_first_line(e)})") from e


def _check_norm(norm, path: Path, model_cfg: ModelConfig):
    """Input statistics of a checkpoint: None, or finite mean and positive std: numbers for images,
    float32 vectors of one value per feature for tables."""
    if norm is None:
        return None
    ok = isinstance(norm, dict) and set(norm) == {"mean", "std"}
    for key in ("mean", "std") if ok else ():
        v = norm[key]
        if isinstance(v, torch.Tensor):  # per feature (N,) for tables, per channel (C, 1, 1) for images
            shape = (model_cfg.in_features,) if model_cfg.in_features else (model_cfg.in_channels, 1, 1)
            ok = ok and v.dtype == torch.float32 and tuple(v.shape) == shape
            ok = ok and bool(torch.isfinite(v).all()) and (key == "mean" or bool((v > 0).all()))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            ok = ok and torch.isfinite(torch.tensor(float(v))).item() and (key == "mean" or v > 0)
        else:
            ok = False
    if not ok:
        raise CsnetError(f"{path}: 'norm' should hold a finite mean and a positive std")
    return norm


def _weights(ckpt: dict, state: dict, path: Path, model_cfg: ModelConfig) -> dict:
    """A checkpoint's weights with the network's input statistics, checked. Checkpoints written before the
    statistics travelled inside the network (``InputNorm``) kept them beside the weights, as 'norm'."""
    norm = _check_norm(ckpt.get("norm"), path, model_cfg)
    if norm is not None and "input_norm.mean" not in state:
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        state = {**state, "input_norm.mean": as_tensor(norm["mean"]), "input_norm.std": as_tensor(norm["std"])}
    _check_input_norm(state, path, model_cfg)
    return state


def _check_input_norm(state: dict, path: Path, model_cfg: ModelConfig) -> None:
    """The input statistics in a state dict, if any: finite means, positive stds, of a shape that broadcasts
    over the network's inputs."""
    mean, std = state.get("input_norm.mean"), state.get("input_norm.std")
    if mean is None and std is None:
        return
    shapes = {(), (model_cfg.in_features,)} if model_cfg.in_features else {(), (1, 1, 1), (model_cfg.in_channels, 1, 1)}
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.is_floating_point()
            and std.is_floating_point() and tuple(mean.shape) in shapes and tuple(std.shape) in shapes
            and bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
        raise CsnetError(f"{path}: its input statistics (input_norm) should be a finite mean and a positive std, "
                         "one per channel or feature")


def _last_state(last: dict, path: Path) -> dict:
    """last.pt's weights with their input statistics, checked (see ``_weights``)."""
    return _weights(last, last["model"], path, ModelConfig.from_dict(last["model_config"], str(path)))


def _load_model(run: Path):
    """The network config and weights (with the input statistics) stored in a run's model.pt, each checked."""
    path = runio.require_run(run) / runio.MODEL
    ckpt = runio.load_checkpoint(path)
    model_cfg = ModelConfig.from_dict(ckpt.get("model_config"), str(path))
    state = ckpt.get("model")
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise CsnetError(f"{path}: 'model' is not a set of named tensors")
    return model_cfg, _weights(ckpt, state, path, model_cfg)


def run_data_config(run: Path) -> DataConfig:
    if runio.is_group(run):
        run = next(iter(runio.group_members(run).values()))
    config = runio.read_config(run)
    data = runio.section(config, "data", run, optional="data" in config)  # null: a stitch across data sets
    if not data:
        raise UsageError(f"{run} does not record one data set (its columns came from different ones); pass --dataset")
    return from_dict(DataConfig, data, "data", str(run / runio.CONFIG))


def check_geometry(model_cfg: ModelConfig, data: data_lib.Data) -> None:
    """Targets of one sample per task and per split have the shapes the heads output; the inputs have the
    shape the network was built for. Checked on each split's first sample (its tensors are stacked)."""
    examples = {split: data.split(split).example() for split in ("train", "val", "test")}
    x = examples["train"][0]
    hw = tuple(x.shape[2:])
    for name, task in model_cfg.task_list().items():
        for split, (_, labels) in examples.items():
            got = tuple(labels[name].shape[1:])
            if got != task.target_shape(hw) and not (task.dense and got == (1, *hw)):
                what = "its image's size" if task.dense else f"{task.size} output(s)"
                raise CsnetError(f"task {name} ({task.kind}): {split} targets have shape {got or 'scalar'} per "
                                 f"sample; they should be {task.target_shape(hw) or 'a scalar'}, to match {what}")
    if x.dim() == 2:
        if x.shape[1] != model_cfg.in_features:
            raise UsageError(f"the network expects {model_cfg.in_features} features per row, "
                             f"the table has {x.shape[1]}")
        return
    if tuple(x.shape[1:]) != model_cfg.input_shape():
        raise UsageError(f"the network expects {'x'.join(map(str, model_cfg.input_shape()))} images, "
                         f"the data set has {'x'.join(map(str, x.shape[1:]))}")


def _fit_and_save(command: str, model_cfg: ModelConfig, state: dict | None, data_cfg: DataConfig,
                  train_cfg: TrainConfig, out: Path, console: Console, quiet: bool, source: Path | None,
                  force: bool = False, weights: Path | None = None, code: tuple[str, ...] = ()) -> Path:
    distributed.setup(train_cfg.device)
    main = distributed.world().is_main
    console = console if main else Console(quiet=True)

    def setup():
        nonlocal model_cfg
        if main:
            runio.ensure_new(out, force)  # before the slow part: a typo in --out should cost nothing
        device, note = resolve_device(train_cfg.device)
        torch.manual_seed(train_cfg.seed)
        net = _build(model_cfg, code, source, weights)  # a bad stitch point or backbone fails here, before the data
        check_training(model_cfg, train_cfg, net)  # a --select or --weighting that does not fit, before the data
        if state is not None:
            _load_state(net, state, source / runio.MODEL)
        if note:
            console.print(note, highlight=False)
        data = data_lib.load(data_cfg, model_cfg.task_list(), code)
        check_geometry(model_cfg, data)
        if model_cfg.needs_stats():  # regression heads learn standardized targets: the training split's statistics
            model_cfg = model_cfg.with_stats(data.target_stats(model_cfg.task_list()))
            torch.manual_seed(train_cfg.seed)  # the same initial weights as the network built above
            net = _build(model_cfg, code, source, weights)
            if state is not None:
                _load_state(net, state, source / runio.MODEL)
        net.input_norm.set(data.mean, data.std)  # this data's statistics, also after --from another run
        return device, net, data

    device, net, data = distributed.together(setup)  # one failing rank stops all, with one message
    return run_network(command, net, model_cfg, data, data_cfg, train_cfg, out, device, console, quiet, force,
                       source, weights)


def run_network(command: str, net, model_cfg: ModelConfig, data: data_lib.Data, data_cfg: DataConfig,
                train_cfg: TrainConfig, out: Path, device: torch.device, console: Console, quiet: bool,
                force: bool = False, source: Path | None = None, weights: Path | None = None) -> Path:
    """Create the run folder (config.json first), say what trains on what, and train: the part of every
    training command after its setup, and all of ``csnet.fit``."""
    main = distributed.world().is_main
    n_units = sum(p.numel() for p in net.unit_parameters())
    n_params = sum(p.numel() for p in net.parameters())

    def create():
        model_stats = {"parameters": n_params, "unit_parameters": n_units,
                       "macs_per_example": count_macs(net, torch.zeros_like(data.test.example()[0], dtype=torch.float32))}
        config = _config(
            command, device, data=asdict(data_cfg), model=model_cfg.to_dict(), train=asdict(train_cfg),
            source=str(Path(source).resolve()) if source else None, data_stats=_data_stats(data),
            weights={"path": str(weights), "sha256": runio.sha256(weights)} if weights else None,
            model_stats=model_stats, processes=distributed.world().size, accel=getattr(net, "accel", None),
            tasks={name: task.describe() for name, task in model_cfg.task_list().items()},
        )
        return runio.create_run(out, config, force)

    run = distributed.together(create, main_only=True) or out
    kinds = model_cfg.task_list()
    network = (f"your network ({model_cfg.network or type(net).__name__})" if model_cfg.arch == "custom" else
               f"{model_cfg.backbone}, "
               + (f"shared up to {model_cfg.share_until}" if model_cfg.arch == "shared" else
                  f"{'' if model_cfg.arch == 'cross-stitch' else model_cfg.arch + ', '}stitch {model_cfg.stitch}"))
    console.print(f"{command}: {', '.join(f'{t} ({task.spec})' for t, task in kinds.items())} on {data_cfg.dataset} "
                  f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test), {network}, "
                  f"{n_params:,} parameters ({n_units:,} in units), device {device}", highlight=False)
    if data.note:
        console.print(f"data: {data.note}", highlight=False)
    return _fit(net, model_cfg, data, train_cfg, run, device, console, quiet or not main, None)


def _data_stats(data: data_lib.Data) -> dict:
    as_json = lambda v: v.tolist() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return {"train": len(data.train), "val": len(data.val), "test": len(data.test), "mean": as_json(data.mean),
            "std": as_json(data.std), "files": {k: {"path": str(v), "sha256": runio.sha256(v)} for k, v in data.files.items()}}


def _fit(net, model_cfg, data, train_cfg, run, device, console, quiet, resume) -> Path:
    with deterministic_algorithms(train_cfg.deterministic):
        best = fit(net, model_cfg, data, train_cfg, run, device, RichReporter(console, quiet), resume)
    if not distributed.world().is_main:
        return run
    _outputs(run)
    _drop_last(run, train_cfg)
    if best.get("selected_by", "val score") == "val score":
        what = f"val score {with_unit(best['val_score'], PERCENT)}"
    else:
        task, metric = best["selected_by"].removeprefix("val ").rsplit(" ", 1)
        unit = model_cfg.task_list()[task].units.get(metric, "") if task in model_cfg.tasks else ""
        what = f"{best['selected_by']} {with_unit(abs(best['val_score']), unit)}"
    console.print(f"best epoch {best['epoch']} ({what}); run saved in {run}", highlight=False)
    return run


def _drop_last(run: Path, train_cfg: TrainConfig) -> None:
    """A run that ended normally needs last.pt no more (model.pt holds the best epoch); only the last step,
    after every closing file is written, so a run stopped before that can still finish from it."""
    if not train_cfg.keep_last:
        (run / runio.LAST).unlink(missing_ok=True)


def _finished(run: Path, train_cfg: TrainConfig) -> bool:
    """A run that ended normally and removed its last.pt: every epoch in metrics.csv, closing files written."""
    metrics = run / runio.METRICS
    if not runio.has_rows(metrics) or _incomplete(run):
        return False
    try:
        return int(read_metrics(run).epoch.max()) >= train_cfg.epochs
    except CsnetError:
        return False


def _outputs(run: Path) -> None:
    """The figures a finished run keeps in RUN/plots, drawn from its files."""
    (run / "plots").mkdir(exist_ok=True)
    metrics = read_metrics(run)
    tasks = [t for t in dict.fromkeys(metrics.task) if t not in ("mean", "total", "all")]
    plots.curves({run.name: curve_series({0: metrics})}, run / "plots", panels(task_info(run, tasks)),
                 weights=weights_moved([metrics]))
    plots.alpha_plots(run)


def _complete(run: Path, last: dict, code: tuple[str, ...], console: Console) -> Path:
    """A run whose last epoch is done but which was stopped before its closing files (alpha_final.csv,
    plots): write them from last.pt, which holds the final weights."""
    from csnet.train import write_final_alpha

    model_cfg = ModelConfig.from_dict(last["model_config"], str(run / runio.LAST))
    net = _build(model_cfg, code, run, fast=False)
    _load_state(net, _last_state(last, run / runio.LAST), run / runio.LAST)
    if net.units and not (run / runio.ALPHA_FINAL).is_file():
        write_final_alpha(net, run / runio.ALPHA_FINAL)
    _outputs(run)
    _drop_last(run, _train_config(runio.read_config(run), run))
    console.print(f"{run} had finished training; its closing files are written now", highlight=False)
    return run


def _incomplete(run: Path) -> bool:
    """Stopped after its last epoch but before the files written at the end."""
    plots_dir = run / "plots"
    return not (plots_dir.is_dir() and any(plots_dir.glob("*.png"))) or (
        (run / runio.ALPHA).is_file() and not (run / runio.ALPHA_FINAL).is_file())


def _seeds_folder(seeds: list[int], out: Path, force: bool, plan: dict | None = None) -> Path:
    """OUT/ for OUT/seed-N runs, marked by OUT/seeds.json so compare reads it as one entry. ``plan`` is
    what every seed runs, so ``train --resume OUT`` can also start the seeds an interruption never reached."""
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {','.join(map(str, seeds))} repeats a seed")
    runio.new_folder(out, force)
    runio.write_json(out / runio.SEEDS, {"seeds": seeds, **({"plan": plan} if plan else {})})
    return out


def _plan(command: str, data_cfg: DataConfig, model_cfg: ModelConfig | None, train_cfg: TrainConfig,
          from_run: Path | None, weights: Path | None) -> dict:
    # absolute paths: --resume may be run from another folder
    return {"command": command, "data": asdict(data_cfg), "model": model_cfg.to_dict() if model_cfg else None,
            "train": asdict(train_cfg), "from": str(Path(from_run).resolve()) if from_run else None,
            "weights": str(Path(weights).resolve()) if weights else None}


def _finish_seeds(seeds: list[int], out: Path, console: Console, one) -> Path:
    """Run ``one(seed, OUT/seed-N)`` for every seed, then write OUT/summary.csv."""
    from csnet.compare import write_summary
    from csnet.train import Interrupted

    for seed in seeds:
        console.print(f"[seed {seed}]", highlight=False)
        try:
            one(seed, out / f"seed-{seed}")
        except Interrupted as e:
            raise Interrupted(f"{e}; to finish every seed: csnet train --resume {out}") from None
    if not distributed.world().is_main:
        return out
    summary = write_summary(out)
    console.print(f"over {len(seeds)} seeds: " + "; ".join(
        f"{r.task} {r.metric} {r['mean']:.4g} ± {r['std']:.2g}{' ' + r.unit if r.unit else ''}"
        for _, r in summary.iterrows()) +
        f"; summary in {out / runio.SUMMARY}", highlight=False)
    return out


def over_seeds(seeds: list[int], out: Path, force: bool, console: Console, one, plan: dict) -> Path:
    """Run ``one(seed, OUT/seed-N)`` for every seed; OUT/seeds.json marks the folder as one entry for
    compare, OUT/summary.csv holds each task's test accuracy over the seeds (mean, std, 95% CI)."""
    distributed.together(lambda: _seeds_folder(seeds, out, force, plan), main_only=True)
    return _finish_seeds(seeds, out, console, one)


def check_training(model_cfg: ModelConfig | None, train_cfg: TrainConfig, net=None) -> None:
    """The settings that depend on the tasks (--select, --weighting), checked before any folder is made;
    with ``net``, also that the weighting can train that network."""
    if train_cfg.tensorboard and (problem := runio.tensorboard_problem()):
        raise UsageError(problem)
    if model_cfg is None:
        return
    if train_cfg.augment != "none" and model_cfg.in_features:
        raise UsageError("--augment flips and crops images; this run's inputs are rows of a table")
    tasks = model_cfg.task_list()
    selection(train_cfg, tasks)
    weighting = weightings.make(train_cfg.weighting, tasks, train_cfg.seed)
    if net is not None:
        weighting.check(net)
    if train_cfg.deterministic and train_cfg.device != "cpu" and torch.cuda.is_available() and \
            any(t.dense for t in tasks.values()):
        raise UsageError("--deterministic with per-pixel tasks on CUDA: PyTorch has no deterministic backward for "
                         "bilinear upsampling and per-pixel cross-entropy there; leave --deterministic out, or "
                         "train with --device cpu")


def pretrain(task: str, data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: Path,
             console: Console, quiet: bool = False, force: bool = False, weights: Path | None = None,
             seeds: list[int] | None = None, code: tuple[str, ...] = ()) -> Path:
    """One single-task column: what the paper initialises each column of a cross-stitch net from."""
    check_training(model_cfg, train_cfg)
    if seeds:
        return over_seeds(seeds, out, force, console, lambda seed, folder: pretrain(
            task, data_cfg, model_cfg, replace(train_cfg, seed=seed), folder, console, quiet, weights=weights,
            code=code), _plan("pretrain", data_cfg, model_cfg, train_cfg, None, weights))
    return _fit_and_save("pretrain", model_cfg, None, data_cfg, train_cfg, out, console, quiet, None, force, weights,
                         code)


def train(data_cfg: DataConfig, model_cfg: ModelConfig | None, train_cfg: TrainConfig, out: Path,
          console: Console, quiet: bool = False, from_run: Path | None = None, force: bool = False,
          weights: Path | None = None, seeds: list[int] | None = None, code: tuple[str, ...] = ()) -> Path:
    """Train a network from scratch (``model_cfg``) or continue one saved in ``from_run``.

    ``from_run`` may be a --seeds folder: seed N then starts from its seed-N network.
    """
    sources = runio.group_members(from_run) if from_run is not None and runio.is_group(from_run) else None
    if sources is not None:
        seeds = seeds or list(sources)
        missing = [s for s in seeds if s not in sources]
        if missing:
            raise UsageError(f"{from_run} has no seed {', '.join(map(str, missing))} (it has {', '.join(map(str, sources))})")
    check_training(model_cfg, train_cfg)
    if seeds:
        return over_seeds(seeds, out, force, console, lambda seed, folder: train(
            data_cfg, model_cfg, replace(train_cfg, seed=seed), folder, console, quiet,
            from_run=sources[seed] if sources else from_run, weights=weights, code=code),
            _plan("train", data_cfg, model_cfg, train_cfg, from_run, weights))
    state = None
    if from_run is not None:
        model_cfg, state = _load_model(from_run)
        if data_cfg.dataset.startswith("folder:") and data_cfg.image_size is None:
            data_cfg = replace(data_cfg, image_size=model_cfg.image_size)  # the size the network was built for
        spec = data_lib.dataset_spec(data_cfg.dataset, dict(zip(model_cfg.tasks, model_cfg.kinds)),
                                     data_cfg.image_size, data_cfg.labels, data_cfg.image_column, code,
                                     data_cfg.options)
        missing = [t for t in model_cfg.tasks if t not in spec.tasks]
        if missing:
            raise UsageError(f"{from_run} has columns for tasks {list(model_cfg.tasks)}, "
                             f"but {data_cfg.dataset} has no task {', '.join(missing)} (its tasks: {', '.join(spec.tasks)})")
    return _fit_and_save("train", model_cfg, state, data_cfg, train_cfg, out, console, quiet, from_run, force,
                         weights, code)


def _start_again(plan: dict, seed: int | None, out: Path, console: Console, quiet: bool, code: tuple[str, ...],
                 source: Path) -> Path:
    """Run ``plan`` (see ``_plan``) from its first step in ``out``, replacing what an interrupted start left."""
    where = str(source)
    if plan.get("command") not in ("train", "pretrain"):
        raise CsnetError(f"{where}: 'command' should be train or pretrain, found {plan.get('command')!r}")
    for key in ("from", "weights"):
        if not isinstance(plan.get(key), (str, type(None))):
            raise CsnetError(f"{where}: {key!r} should be a path or null, found {plan.get(key)!r}")
    data_cfg = from_dict(DataConfig, plan.get("data"), "data", where)
    train_cfg = TrainConfig.from_dict(plan.get("train"), where)
    if seed is not None:
        train_cfg = replace(train_cfg, seed=seed)
    from_run = Path(plan["from"]) if plan.get("from") else None
    weights = Path(plan["weights"]) if plan.get("weights") else None
    model_cfg = ModelConfig.from_dict(plan["model"], where) if plan.get("model") is not None else None
    if model_cfg is not None:
        check_code(model_cfg, code, source)
    if from_run is not None:
        if runio.is_group(from_run):
            members = runio.group_members(from_run)
            if train_cfg.seed not in members:
                raise UsageError(f"{from_run} has no seed {train_cfg.seed}")
            from_run = members[train_cfg.seed]
        return train(data_cfg, None, train_cfg, out, console, quiet, from_run=from_run, force=True, code=code)
    if model_cfg is None:
        raise CsnetError(f"{where}: records neither a network ('model') nor a run it started from ('from')")
    if plan["command"] == "pretrain":
        return _fit_and_save("pretrain", model_cfg, None, data_cfg, train_cfg, out, console, quiet, None, True,
                             weights, code)
    return train(data_cfg, model_cfg, train_cfg, out, console, quiet, force=True, weights=weights, code=code)


def _with(plan: dict, epochs: int | None, device: str | None) -> dict:
    """The plan with --epochs and --device of the resuming command line applied."""
    given = {k: v for k, v in (("epochs", epochs), ("device", device)) if v is not None}
    if not given or not isinstance(plan.get("train"), dict):  # a damaged plan is reported by _start_again
        return plan
    return {**plan, "train": {**plan["train"], **given}}


def _train_config(config: dict, run: Path) -> TrainConfig:
    return TrainConfig.from_dict(runio.section(config, "train", run), str(run / runio.CONFIG))


def _plan_of_run(config: dict, run: Path) -> dict:
    """What a run's config.json says it runs, as a plan for ``_start_again``."""
    weights = runio.section(config, "weights", run, optional=True)
    return {"command": config.get("command"), "data": runio.section(config, "data", run),
            "model": None if config.get("source") else runio.section(config, "model", run),
            "train": runio.section(config, "train", run), "from": config.get("source"),
            "weights": weights.get("path") if weights else None}


def _check_last(last: dict, path: Path) -> dict:
    """The parts of last.pt that resume reads, checked before they are used."""
    needed = ("position", "best", "optimizer", "rng", "model_config", "model")
    missing = [k for k in needed if not isinstance(last.get(k), dict)]
    if missing:
        hint = " (it looks like a copy of model.pt)" if "epoch" in last and "position" not in last else ""
        raise CsnetError(f"{path}: not a training checkpoint: no {', '.join(missing)}{hint}")
    position, best = last["position"], last["best"]
    if "val_score" not in best and "val_accuracy" in best:  # an older csnet's name for the same number
        best["val_score"] = best.pop("val_accuracy")
    whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    if not (whole(position.get("epoch"), 1) and whole(position.get("step"), 0)
            and whole(position.get("world_size", 1), 1)):
        raise CsnetError(f"{path}: 'position' should hold a whole epoch (from 1) and step, found {position}")
    if not (whole(best.get("epoch"), 0) and isinstance(best.get("val_score"), (int, float))):
        raise CsnetError(f"{path}: 'best' should hold an epoch and a validation score, found {best}")
    return last


def _has_results(run: Path) -> bool:
    """A model.pt or an epoch in metrics.csv: work a restart must never throw away."""
    return (run / runio.MODEL).exists() or runio.has_rows(run / runio.METRICS)


def _no_last(run: Path, train_cfg: TrainConfig) -> UsageError:
    return UsageError(f"{run} has finished its {train_cfg.epochs} epoch(s) and, as every run that ends normally, "
                      f"removed its {runio.LAST}: to train further, start a new run with --from {run} (or train "
                      "with --keep-last to extend a run later with --resume --epochs N)")


def status(run: Path, epochs: int | None = None) -> str:
    """``finished``, ``interrupted`` (last.pt to continue from), ``unstarted`` (no checkpoint and no
    results yet: stopped before its first epoch ended, or never begun), or ``kept`` (results but no
    last.pt, e.g. deleted to save space: nothing to continue from, and nothing to throw away)."""
    if not (run / runio.LAST).is_file():
        if not ((run / runio.CONFIG).is_file() and _has_results(run)):
            return "unstarted"
        train_cfg = _train_config(runio.read_config(run), run)
        if not _finished(run, train_cfg) or train_cfg.keep_last:
            return "kept"
        if epochs is not None and epochs > train_cfg.epochs:
            raise _no_last(run, train_cfg)
        return "finished"
    if not (run / runio.CONFIG).is_file():
        return "unstarted"
    train_cfg = _train_config(runio.read_config(run), run)
    last = _check_last(runio.load_checkpoint(run / runio.LAST), run / runio.LAST)
    done = last["position"]["epoch"] > (epochs or train_cfg.epochs)
    return "finished" if done and (epochs is not None or not _incomplete(run)) else "interrupted"


def resume(run: Path, console: Console, *, epochs: int | None = None, device: str | None = None,
           quiet: bool = False, code: tuple[str, ...] = ()) -> Path:
    """Continue a run from RUN/last.pt: weights, optimizer, schedule, RNG states, epoch and step, best so far.

    On the CPU the finished run's metrics.csv equals an uninterrupted run's (timings aside). A --seeds
    folder continues every seed: the interrupted one exactly, then the ones not yet begun. A run
    stopped before its first checkpoint starts again from its config.json.
    """
    run = Path(run)
    if runio.is_group(run):
        return _resume_group(run, console, epochs=epochs, device=device, quiet=quiet, code=code)
    if runio.is_partial(run) or (run.is_dir() and not any(run.iterdir())):
        raise UsageError(f"{run} was stopped before it wrote {runio.CONFIG}, so its settings are unknown: "
                         "rerun the command that made it, with --force")
    config = runio.read_config(run)
    source = run / runio.CONFIG
    if config.get("command") not in ("train", "pretrain"):
        raise UsageError(f"{run} is a {config.get('command')} run; only train and pretrain runs can be resumed")
    train_cfg = _train_config(config, run)
    if distributed.world().is_main:
        runio.remove_stale_temporaries(run)  # half-written files of the write a kill interrupted
    if not (run / runio.LAST).is_file():
        if _finished(run, train_cfg) and not train_cfg.keep_last:
            raise _no_last(run, train_cfg)
        if _has_results(run):
            raise UsageError(f"{run} has results but no {runio.LAST} to continue from; it is left as it is "
                             "(train a new run, or replace this one with --force)")
        console.print(f"{run} stopped before its first checkpoint: starting it again", highlight=False)
        return _start_again(_with(_plan_of_run(config, run), epochs, device), None, run, console, quiet, code, source)
    distributed.setup(device or train_cfg.device)
    w = distributed.world()
    console = console if w.is_main else Console(quiet=True)

    def setup():
        nonlocal train_cfg
        if train_cfg.tensorboard and (problem := runio.tensorboard_problem()):
            raise UsageError(problem)  # before config.json records a resume that cannot start
        last = _check_last(runio.load_checkpoint(run / runio.LAST), run / runio.LAST)
        if epochs is not None and epochs != train_cfg.epochs and train_cfg.lr_schedule != "constant":
            raise UsageError(f"{run} uses a {train_cfg.lr_schedule} schedule fixed by its --epochs {train_cfg.epochs}; "
                             "resume it without --epochs")
        train_cfg = replace(train_cfg, epochs=epochs or train_cfg.epochs, device=device or train_cfg.device)
        position = last["position"]
        if position["epoch"] > train_cfg.epochs:
            if epochs is None and _incomplete(run):
                return last, None, None, None, None, None
            raise UsageError(f"{run} has finished its {position['epoch'] - 1} epochs; pass --epochs N "
                             f"(more than {position['epoch'] - 1}) to train further")
        saved_world = position.get("world_size", 1)
        if position["step"] and saved_world != w.size:
            how = f"torchrun --nproc-per-node {saved_world} -m csnet" if saved_world > 1 else "csnet (without torchrun)"
            raise UsageError(f"{run} stopped mid-epoch with {saved_world} process(es), and an epoch's shards depend "
                             f"on their number; resume it with {how} train --resume {run}")
        model_cfg = ModelConfig.from_dict(last["model_config"], str(run / runio.LAST))
        dev, note = resolve_device(train_cfg.device)
        if note:
            console.print(note, highlight=False)
        data = data_lib.load(from_dict(DataConfig, runio.section(config, "data", run), "data", str(source)),
                             model_cfg.task_list(), code)
        check_geometry(model_cfg, data)
        net = _build(model_cfg, code, run)
        _load_state(net, _last_state(last, run / runio.LAST), run / runio.LAST)
        return last, position, model_cfg, dev, data, net

    last, position, model_cfg, dev, data, net = distributed.together(setup)
    if position is None:
        return _complete(run, last, code, console) if w.is_main else run
    config["train"] = asdict(train_cfg)
    config.setdefault("resumed", []).append({"epoch": position["epoch"], "step": position["step"],
                                             "processes": w.size, "environment": runio.environment(dev),
                                             "accel": net.accel})
    if w.is_main:
        runio.write_json(run / runio.CONFIG, config)
    where = f"epoch {position['epoch']}" + (f", step {position['step']}" if position["step"] else "")
    console.print(f"resuming {run} at {where} of {train_cfg.epochs}, device {dev}", highlight=False)
    return _fit(net, model_cfg, data, train_cfg, run, dev, console, quiet or not w.is_main, last)


def resume_network(run: Path, net, data: data_lib.Data, console: Console, *, epochs: int | None = None,
                   quiet: bool = False) -> Path:
    """Continue ``run`` from its last.pt with a network and data the caller made (``csnet.fit(resume=True)``):
    the checks and the loop of ``--resume``, without rebuilding either from the run's files. Nothing is
    written before every check has passed."""
    config = runio.read_config(runio.require_run(run))
    train_cfg = _train_config(config, run)
    if not (run / runio.LAST).is_file():
        raise (_no_last(run, train_cfg) if _finished(run, train_cfg) else
               UsageError(f"{run} has no {runio.LAST} to continue from"))
    last = _check_last(runio.load_checkpoint(run / runio.LAST), run / runio.LAST)
    if epochs is not None and epochs != train_cfg.epochs and train_cfg.lr_schedule != "constant":
        raise UsageError(f"{run} uses a {train_cfg.lr_schedule} schedule fixed by its epochs={train_cfg.epochs}; "
                         "resume it without epochs=")
    train_cfg = replace(train_cfg, epochs=epochs or train_cfg.epochs)
    if last["position"]["epoch"] > train_cfg.epochs:
        raise UsageError(f"{run} has finished its {last['position']['epoch'] - 1} epochs; pass epochs= (more than "
                         f"{last['position']['epoch'] - 1}) to train further")
    model_cfg = ModelConfig.from_dict(last["model_config"], str(run / runio.LAST))
    check_geometry(model_cfg, data)
    check_outputs(net, model_cfg.task_list(), torch.zeros(2, *model_cfg.input_shape()))
    _load_state(net, _last_state(last, run / runio.LAST), run / runio.LAST)
    device, _ = resolve_device(train_cfg.device)
    config["train"] = asdict(train_cfg)
    config.setdefault("resumed", []).append({"epoch": last["position"]["epoch"], "step": last["position"]["step"],
                                             "processes": 1, "environment": runio.environment(device)})
    runio.write_json(run / runio.CONFIG, config)
    console.print(f"resuming {run} at epoch {last['position']['epoch']} of {train_cfg.epochs}, device {device}",
                  highlight=False)
    return _fit(net, model_cfg, data, train_cfg, run, device, console, quiet, last)


def _resume_group(group: Path, console: Console, *, epochs: int | None, device: str | None, quiet: bool,
                  code: tuple[str, ...]) -> Path:
    """Finish every seed of a --seeds folder, then write its summary.csv."""
    info = runio.read_group(group)
    plan = info.get("plan")
    for folder in runio.group_members(group).values():  # a seed that cannot go on stops all, before any trains
        if folder.is_dir() and not folder.is_symlink():
            status(folder, epochs)

    def one(seed: int, folder: Path) -> None:
        if folder.is_symlink():
            raise UsageError(f"{folder} is a link; --resume only writes into the --seeds folder's own seed folders")
        state = status(folder, epochs)
        if state == "finished":
            console.print(f"{folder}: finished", highlight=False)
        elif state == "kept":
            console.print(f"{folder}: has results but no {runio.LAST}; left as it is", highlight=False)
        elif state == "interrupted" or (folder / runio.CONFIG).is_file():  # continues, or starts it again
            resume(folder, console, epochs=epochs, device=device, quiet=quiet, code=code)
        elif plan is None:
            raise UsageError(f"{folder} was never started, and {group / runio.SEEDS} (from an older csnet) does not "
                             "record what it runs: rerun the command that made the folder, with --force")
        else:
            _start_again(_with(plan, epochs, device), seed, folder, console, quiet, code, group / runio.SEEDS)

    return _finish_seeds(list(runio.group_members(group)), group, console, one)


def stitch(sources: list[Path], *, stitch: str, alpha: float, beta: float, out: Path,
           tasks: list[str] | None = None, force: bool = False, unit_mode: str = "channel",
           unit_init: str = "alpha-beta", code: tuple[str, ...] = (), arch: str = "cross-stitch",
           subspaces: int = 2) -> Path:
    """Build a cross-stitch network whose columns start from single-task runs ("pretrain, then stitch",
    the initialisation the paper prefers, section 4). Saves it as a run folder; no training."""
    if len(sources) < 2:
        raise UsageError("stitch needs at least two pretrained runs")
    groups = [runio.is_group(s) for s in sources]
    if any(groups):
        if not all(groups):
            raise UsageError("stitch takes either single runs or --seeds folders, not a mix")
        members = [runio.group_members(s) for s in sources]
        common = [seed for seed in members[0] if all(seed in m for m in members[1:])]
        if not common:
            raise UsageError(f"the --seeds folders {', '.join(map(str, sources))} share no seed")
        return over_seeds_stitch(common, members, out, force, stitch=stitch, alpha=alpha, beta=beta, tasks=tasks,
                                 unit_mode=unit_mode, unit_init=unit_init, code=code, arch=arch, subspaces=subspaces)
    runio.ensure_new(out, force)
    loaded = [_load_model(s) for s in sources]
    for src, (cfg, _) in zip(sources, loaded):
        if len(cfg.tasks) != 1 or cfg.arch not in ("cross-stitch", "independent"):
            raise UsageError(f"{src} has {len(cfg.tasks)} task(s) ({', '.join(cfg.tasks)}, arch {cfg.arch}); "
                             "stitch takes single-task pretrain runs")
        check_code(cfg, code, src)
    first_arch = loaded[0][0].column_arch()
    for src, (cfg, _) in zip(sources[1:], loaded[1:]):
        theirs = cfg.column_arch()
        diff = [f"{k} {first_arch.get(k)} vs {theirs.get(k)}" for k in sorted(set(first_arch) | set(theirs))
                if first_arch.get(k) != theirs.get(k)]
        if diff:
            raise UsageError(f"columns differ: {sources[0]} and {src} have {'; '.join(diff)}")
    data_cfgs = [runio.section(runio.read_config(s), "data", s, optional=True) for s in sources]
    same_data = all(d == data_cfgs[0] for d in data_cfgs)
    names = tasks or [cfg.tasks[0] for cfg, _ in loaded]
    if len(names) != len(sources):
        raise UsageError(f"--tasks names {len(names)} columns for {len(sources)} runs")
    if len(set(names)) != len(names):
        raise UsageError(f"two columns would share a task name ({', '.join(names)}); name them with --tasks")
    columns = [next(iter(c.task_list().values())) for c, _ in loaded]  # each source's one task
    model_cfg = ModelConfig(tasks=tuple(names), num_classes=tuple(t.size for t in columns),
                            kinds=tuple(t.spec for t in columns), target_stats=tuple(t.stats for t in columns),
                            stitch=stitch, alpha=alpha, beta=beta, unit_mode=unit_mode, unit_init=unit_init,
                            arch=arch, subspaces=subspaces,
                            **loaded[0][0].column_arch())
    net = _build(model_cfg, code, sources[0], fast=False)
    for src, name, (cfg, state) in zip(sources, names, loaded):
        prefix = f"columns.{cfg.tasks[0]}."
        _load_state(net.columns[name], {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                    src / runio.MODEL)
    # config.json first: a stitch stopped before model.pt is a run that --force replaces
    run = runio.create_run(out, _config("stitch", torch.device("cpu"), data=data_cfgs[0] if same_data else None,
                                        model=model_cfg.to_dict(), sources=[str(s) for s in sources]), force)
    # one input normalisation for all columns; columns from different data sets get the statistics
    # of whatever data set the network is later trained or evaluated on (the identity until then)
    first = loaded[0][1]
    if same_data and "input_norm.mean" in first:
        net.input_norm.set(first["input_norm.mean"], first["input_norm.std"])
    runio.save_checkpoint(run / runio.MODEL, {"model_config": model_cfg.to_dict(), "model": net.state_dict(),
                                              "epoch": 0})
    return run


def over_seeds_stitch(seeds, members, out, force, **kw) -> Path:
    """Stitch seed N of every source into OUT/seed-N (no training, so no summary)."""
    _seeds_folder(seeds, out, force)
    for seed in seeds:
        stitch([m[seed] for m in members], out=out / f"seed-{seed}", **kw)
    return out


def eval_run(run: Path, split: str, device_name: str = "auto", data_root: str | None = None,
             console: Console | None = None, dataset: str | None = None,
             code: tuple[str, ...] = ()) -> tuple[dict, CsnetError | None]:
    """Evaluate a run's saved network on a split; writes (or updates that split's rows in) RUN/eval.csv.

    Returns the metrics and, when eval.csv could not be written (read-only storage, a full disk),
    that error: the metrics are still worth printing.
    """
    if split not in ("val", "test"):
        raise UsageError(f"unknown split {split!r}; valid: test, val")
    model_cfg, state = _load_model(run)
    norm_from_data = False
    config = runio.read_config(run)
    base = runio.section(config, "data", run, optional=True)  # null: a stitch across data sets
    own = from_dict(DataConfig, base, "data", str(run / runio.CONFIG)) if base else None
    if dataset is not None and (own is None or dataset != own.dataset):
        # another data set, with the split settings the run (or its first source) used, and its own statistics
        sources = config.get("sources")
        if not base and isinstance(sources, list) and sources and isinstance(sources[0], str):
            base = runio.section(runio.read_config(Path(sources[0])), "data", Path(sources[0]), optional=True)
        data_cfg = replace(from_dict(DataConfig, base, "data", str(run / runio.CONFIG)) if base else DataConfig(),
                           dataset=dataset, starve=None, image_size=None, labels=None, image_column=None,
                           stream=None, workers=None, options=None)
        if dataset.startswith("folder:"):  # the network takes images of the size it was built for
            data_cfg = replace(data_cfg, image_size=model_cfg.image_size)
        if is_custom(dataset):  # your own data set gives its splits itself
            data_cfg = replace(data_cfg, val_size=None, train_size=None)
        norm_from_data = True
    else:
        data_cfg = own or run_data_config(run)  # the run's own data (without it: says to pass --dataset)
    if data_root:
        data_cfg = replace(data_cfg, data_root=data_root)
    device, note = resolve_device(device_name)
    if note and console:
        console.print(note, highlight=False)
    tasks = model_cfg.task_list()
    data = data_lib.load(data_cfg, tasks, code)
    check_geometry(model_cfg, data)
    net = _build(model_cfg, code, run)
    _load_state(net, state, run / runio.MODEL)
    if norm_from_data or "input_norm.mean" not in state:  # another data set, or a stitch across data sets
        net.input_norm.set(data.mean, data.std)
    net.to(device)
    metrics = evaluate(net, data.split(split).to(device), tasks)
    try:
        _write_eval_csv(run / "eval.csv", split, metrics)
    except CsnetError as e:
        return metrics, e
    return metrics, None


def _write_eval_csv(path: Path, split: str, metrics: dict) -> None:
    fields = ["split", "task", "metric", "value"]
    rows = []
    if path.is_file():  # keep the other split's rows
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != fields:
                    raise ValueError(f"its header is {reader.fieldnames}, not {fields}")
                rows = [r for r in reader if r.get("split") != split]
        except (OSError, ValueError, csv.Error) as e:
            raise CsnetError(f"{path}: not a csnet eval table ({e}); move it away to write a new one") from e
    rows += [{"split": split, "task": t, "metric": m, "value": f"{v:.6g}"}
             for t, ms in metrics.items() for m, v in ms.items()]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    runio.atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
