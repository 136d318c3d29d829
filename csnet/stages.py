"""The pipeline's stages, each read as setup -> fit -> save. The CLI calls one function per command."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console

from csnet import data as data_lib
from csnet import distributed, plots, runio
from csnet.compare import read_metrics
from csnet.data import DataConfig
from csnet.errors import CsnetError, UsageError
from csnet.models.network import ModelConfig, build_network, count_macs
from csnet.progress import RichReporter
from csnet.settings import from_dict
from csnet.train import TrainConfig, deterministic_algorithms, evaluate, fit, resolve_device


def _write_config(run: Path, command: str, device: torch.device, **sections) -> None:
    runio.write_json(run / runio.CONFIG, {"command": command, **sections, "environment": runio.environment(device)})


def _load_model(run: Path):
    """The network config, weights and input statistics stored in a run's model.pt."""
    ckpt = runio.load_checkpoint(runio.require_run(run) / runio.MODEL)
    try:
        return ModelConfig.from_dict(ckpt["model_config"]), ckpt["model"], ckpt.get("norm")
    except (KeyError, TypeError) as e:
        raise CsnetError(f"{run / runio.MODEL}: checkpoint has no usable model config ({e})") from e


def run_data_config(run: Path) -> DataConfig:
    if runio.is_group(run):
        run = next(iter(runio.group_members(run).values()))
    config = runio.read_config(run)
    if not config.get("data"):
        raise UsageError(f"{run} does not record one data set (its columns came from different ones); pass --dataset")
    return from_dict(DataConfig, config["data"], "data")


def _check_geometry(model_cfg: ModelConfig, data: data_lib.Data) -> None:
    if data.train.images.dim() == 2:
        if data.train.images.shape[1] != model_cfg.in_features:
            raise UsageError(f"the network expects {model_cfg.in_features} features per row, "
                             f"the table has {data.train.images.shape[1]}")
        return
    _, channels, size, _ = data.train.images.shape
    if (channels, size) != (model_cfg.in_channels, model_cfg.image_size):
        raise UsageError(
            f"the network expects {model_cfg.in_channels}x{model_cfg.image_size}x{model_cfg.image_size} images, "
            f"the data set has {channels}x{size}x{size}"
        )


def _fit_and_save(command: str, model_cfg: ModelConfig, state: dict | None, data_cfg: DataConfig,
                  train_cfg: TrainConfig, out: Path, console: Console, quiet: bool, source: Path | None,
                  force: bool = False, weights: Path | None = None) -> Path:
    distributed.setup(train_cfg.device)
    main = distributed.world().is_main
    console = console if main else Console(quiet=True)

    def setup():
        if main:
            runio.ensure_new(out, force)  # before the slow part: a typo in --out should cost nothing
        device, note = resolve_device(train_cfg.device)
        torch.manual_seed(train_cfg.seed)
        net = build_network(model_cfg, weights)  # a bad stitch point or backbone fails here, before the data loads
        if state is not None:
            net.load_state_dict(state)
        if note:
            console.print(note, highlight=False)
        data = data_lib.load(data_cfg, model_cfg.tasks)
        _check_geometry(model_cfg, data)
        return device, net, data

    device, net, data = distributed.together(setup)  # one failing rank stops all, with one message
    n_units = sum(p.numel() for p in net.unit_parameters())
    n_params = sum(p.numel() for p in net.parameters())

    def create():
        run = runio.create_run(out, force)
        model_stats = {"parameters": n_params, "unit_parameters": n_units,
                       "macs_per_example": count_macs(net, torch.zeros_like(data.test.images[:1], dtype=torch.float32))}
        _write_config(
            run, command, device, data=asdict(data_cfg), model=model_cfg.to_dict(), train=asdict(train_cfg),
            source=str(source) if source else None, data_stats=_data_stats(data),
            weights={"path": str(weights), "sha256": runio.sha256(weights)} if weights else None,
            model_stats=model_stats, processes=distributed.world().size,
        )
        return run

    run = distributed.together(create, main_only=True) or out
    console.print(f"{command}: {', '.join(model_cfg.tasks)} on {data_cfg.dataset} "
                  f"({len(data.train)} train / {len(data.val)} val / {len(data.test)} test), "
                  f"{model_cfg.backbone}, "
                  + (f"shared up to {model_cfg.share_until}" if model_cfg.arch == "shared" else f"stitch {model_cfg.stitch}")
                  + f", {n_params:,} parameters "
                  f"({n_units:,} in units), device {device}", highlight=False)
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
    plots.curves({run.name: read_metrics(run)}, run / "plots")
    plots.alpha_plots(run)
    console.print(f"best epoch {best['epoch']} (val mean accuracy {best['val_accuracy']:.4f}); run saved in {run}",
                  highlight=False)
    return run


def _seeds_folder(seeds: list[int], out: Path, force: bool) -> Path:
    """OUT/ for OUT/seed-N runs, marked by OUT/seeds.json so compare reads it as one entry."""
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {','.join(map(str, seeds))} repeats a seed")
    runio.new_folder(out, force)
    runio.write_json(out / runio.SEEDS, {"seeds": seeds})
    return out


def over_seeds(seeds: list[int], out: Path, force: bool, console: Console, one) -> Path:
    """Run ``one(seed, OUT/seed-N)`` for every seed; OUT/seeds.json marks the folder as one entry for
    compare, OUT/summary.csv holds each task's test accuracy over the seeds (mean, std, 95% CI)."""
    from csnet.compare import write_summary

    distributed.together(lambda: _seeds_folder(seeds, out, force), main_only=True)
    for seed in seeds:
        console.print(f"[seed {seed}]", highlight=False)
        one(seed, out / f"seed-{seed}")
    if not distributed.world().is_main:
        return out
    summary = write_summary(out)
    console.print(f"over {len(seeds)} seeds: " + "; ".join(
        f"{r.task} {100 * r['mean']:.2f} ± {100 * r['std']:.2f}" for _, r in summary.iterrows()) +
        f"; summary in {out / runio.SUMMARY}", highlight=False)
    return out


def pretrain(task: str, data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, out: Path,
             console: Console, quiet: bool = False, force: bool = False, weights: Path | None = None,
             seeds: list[int] | None = None) -> Path:
    """One single-task column: what the paper initialises each column of a cross-stitch net from."""
    if seeds:
        return over_seeds(seeds, out, force, console, lambda seed, folder: pretrain(
            task, data_cfg, model_cfg, replace(train_cfg, seed=seed), folder, console, quiet, weights=weights))
    return _fit_and_save("pretrain", model_cfg, None, data_cfg, train_cfg, out, console, quiet, None, force, weights)


def train(data_cfg: DataConfig, model_cfg: ModelConfig | None, train_cfg: TrainConfig, out: Path,
          console: Console, quiet: bool = False, from_run: Path | None = None, force: bool = False,
          weights: Path | None = None, seeds: list[int] | None = None) -> Path:
    """Train a network from scratch (``model_cfg``) or continue one saved in ``from_run``.

    ``from_run`` may be a --seeds folder: seed N then starts from its seed-N network.
    """
    sources = runio.group_members(from_run) if from_run is not None and runio.is_group(from_run) else None
    if sources is not None:
        seeds = seeds or list(sources)
        missing = [s for s in seeds if s not in sources]
        if missing:
            raise UsageError(f"{from_run} has no seed {', '.join(map(str, missing))} (it has {', '.join(map(str, sources))})")
    if seeds:
        return over_seeds(seeds, out, force, console, lambda seed, folder: train(
            data_cfg, model_cfg, replace(train_cfg, seed=seed), folder, console, quiet,
            from_run=sources[seed] if sources else from_run, weights=weights))
    state = None
    if from_run is not None:
        model_cfg, state, _ = _load_model(from_run)
        spec = data_lib.dataset_spec(data_cfg.dataset)
        missing = [t for t in model_cfg.tasks if t not in spec.tasks]
        if missing:
            raise UsageError(f"{from_run} has columns for tasks {list(model_cfg.tasks)}, "
                             f"but {data_cfg.dataset} has no task {', '.join(missing)} (its tasks: {', '.join(spec.tasks)})")
    return _fit_and_save("train", model_cfg, state, data_cfg, train_cfg, out, console, quiet, from_run, force,
                         weights)


def resume(run: Path, console: Console, *, epochs: int | None = None, device: str | None = None,
           quiet: bool = False) -> Path:
    """Continue a run from RUN/last.pt: weights, optimizer, schedule, RNG states, epoch and step, best so far.

    On the CPU the finished run's metrics.csv equals an uninterrupted run's (timings aside).
    """
    config = runio.read_config(run)
    if config.get("command") not in ("train", "pretrain"):
        raise UsageError(f"{run} is a {config.get('command')} run; only train and pretrain runs can be resumed")
    train_cfg = TrainConfig.from_dict(config["train"])
    distributed.setup(device or train_cfg.device)
    w = distributed.world()
    console = console if w.is_main else Console(quiet=True)

    def setup():
        nonlocal train_cfg
        last = runio.load_checkpoint(run / runio.LAST)
        if epochs is not None and epochs != train_cfg.epochs and train_cfg.lr_schedule != "constant":
            raise UsageError(f"{run} uses a {train_cfg.lr_schedule} schedule fixed by its --epochs {train_cfg.epochs}; "
                             "resume it without --epochs")
        train_cfg = replace(train_cfg, epochs=epochs or train_cfg.epochs, device=device or train_cfg.device)
        position = last["position"]
        if position["epoch"] > train_cfg.epochs:
            raise UsageError(f"{run} has finished its {position['epoch'] - 1} epochs; pass --epochs N "
                             f"(more than {position['epoch'] - 1}) to train further")
        saved_world = position.get("world_size", 1)
        if position["step"] and saved_world != w.size:
            how = f"torchrun --nproc-per-node {saved_world} -m csnet" if saved_world > 1 else "csnet (without torchrun)"
            raise UsageError(f"{run} stopped mid-epoch with {saved_world} process(es), and an epoch's shards depend "
                             f"on their number; resume it with {how} train --resume {run}")
        model_cfg = ModelConfig.from_dict(last["model_config"])
        dev, note = resolve_device(train_cfg.device)
        if note:
            console.print(note, highlight=False)
        data = data_lib.load(from_dict(DataConfig, config["data"], "data"), model_cfg.tasks)
        _check_geometry(model_cfg, data)
        net = build_network(model_cfg)
        net.load_state_dict(last["model"])
        return last, position, model_cfg, dev, data, net

    last, position, model_cfg, dev, data, net = distributed.together(setup)
    config["train"] = asdict(train_cfg)
    config.setdefault("resumed", []).append({"epoch": position["epoch"], "step": position["step"],
                                             "processes": w.size, "environment": runio.environment(dev)})
    if w.is_main:
        runio.write_json(run / runio.CONFIG, config)
    where = f"epoch {position['epoch']}" + (f", step {position['step']}" if position["step"] else "")
    console.print(f"resuming {run} at {where} of {train_cfg.epochs}, device {dev}", highlight=False)
    return _fit(net, model_cfg, data, train_cfg, run, dev, console, quiet or not w.is_main, last)


def stitch(sources: list[Path], *, stitch: str, alpha: float, beta: float, out: Path,
           tasks: list[str] | None = None, force: bool = False, unit_mode: str = "channel",
           unit_init: str = "alpha-beta") -> Path:
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
                                 unit_mode=unit_mode, unit_init=unit_init)
    runio.ensure_new(out, force)
    loaded = [_load_model(s) for s in sources]
    for src, (cfg, _, _) in zip(sources, loaded):
        if len(cfg.tasks) != 1 or cfg.arch != "cross-stitch":
            raise UsageError(f"{src} has {len(cfg.tasks)} task(s) ({', '.join(cfg.tasks)}, arch {cfg.arch}); "
                             "stitch takes single-task pretrain runs")
    first_arch = loaded[0][0].column_arch()
    for src, (cfg, _, _) in zip(sources[1:], loaded[1:]):
        arch = cfg.column_arch()
        diff = [f"{k} {first_arch.get(k)} vs {arch.get(k)}" for k in sorted(set(first_arch) | set(arch))
                if first_arch.get(k) != arch.get(k)]
        if diff:
            raise UsageError(f"columns differ: {sources[0]} and {src} have {'; '.join(diff)}")
    data_cfgs = [runio.read_config(s).get("data") for s in sources]
    same_data = all(d == data_cfgs[0] for d in data_cfgs)
    names = tasks or [cfg.tasks[0] for cfg, _, _ in loaded]
    if len(names) != len(sources):
        raise UsageError(f"--tasks names {len(names)} columns for {len(sources)} runs")
    if len(set(names)) != len(names):
        raise UsageError(f"two columns would share a task name ({', '.join(names)}); name them with --tasks")
    model_cfg = ModelConfig(tasks=tuple(names), num_classes=tuple(c.num_classes[0] for c, _, _ in loaded),
                            stitch=stitch, alpha=alpha, beta=beta, unit_mode=unit_mode, unit_init=unit_init,
                            **loaded[0][0].column_arch())
    net = build_network(model_cfg)
    for name, (cfg, state, _) in zip(names, loaded):
        prefix = f"columns.{cfg.tasks[0]}."
        net.columns[name].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    run = runio.create_run(out, force)
    # one input normalisation for all columns; columns from different data sets get the statistics
    # of whatever data set the network is later trained or evaluated on
    runio.save_checkpoint(run / runio.MODEL, {"model_config": model_cfg.to_dict(), "model": net.state_dict(),
                                              "epoch": 0, "norm": loaded[0][2] if same_data else None})
    _write_config(run, "stitch", torch.device("cpu"), data=data_cfgs[0] if same_data else None,
                  model=model_cfg.to_dict(), sources=[str(s) for s in sources])
    return run


def over_seeds_stitch(seeds, members, out, force, **kw) -> Path:
    """Stitch seed N of every source into OUT/seed-N (no training, so no summary)."""
    _seeds_folder(seeds, out, force)
    for seed in seeds:
        stitch([m[seed] for m in members], out=out / f"seed-{seed}", **kw)
    return out


def eval_run(run: Path, split: str, device_name: str = "auto", data_root: str | None = None,
             console: Console | None = None, dataset: str | None = None) -> dict:
    """Evaluate a run's saved network on a split; writes (or updates that split's rows in) RUN/eval.csv."""
    if split not in ("val", "test"):
        raise UsageError(f"unknown split {split!r}; valid: test, val")
    model_cfg, state, norm = _load_model(run)
    if dataset is not None:
        # another data set, with the split settings the run (or its first source) used, and its own statistics
        config = runio.read_config(run)
        base = config.get("data") or (runio.read_config(Path(config["sources"][0])).get("data")
                                      if config.get("sources") else None)
        data_cfg = replace(from_dict(DataConfig, base, "data") if base else DataConfig(), dataset=dataset,
                           starve=None)
        norm = None
    else:
        data_cfg = run_data_config(run)
    if data_root:
        data_cfg = replace(data_cfg, data_root=data_root)
    device, note = resolve_device(device_name)
    if note and console:
        console.print(note, highlight=False)
    data = data_lib.load(data_cfg, model_cfg.tasks)
    _check_geometry(model_cfg, data)
    net = build_network(model_cfg)
    net.load_state_dict(state)
    net.to(device)
    norm = norm or {"mean": data.mean, "std": data.std}
    mean, std = (v.to(device) if isinstance(v, torch.Tensor) else v for v in (norm["mean"], norm["std"]))
    metrics = evaluate(net, data.split(split).to(device), mean=mean, std=std)
    _write_eval_csv(run / "eval.csv", split, metrics)
    return metrics


def _write_eval_csv(path: Path, split: str, metrics: dict) -> None:
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("split") != split]
    rows += [{"split": split, "task": t, "metric": m, "value": f"{v:.6g}"}
             for t, ms in metrics.items() for m, v in ms.items()]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["split", "task", "metric", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    runio.atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
