"""``csnet.fit``: csnet's training loop on your own network and Datasets, from Python.

It writes the same run folder as ``csnet train`` (config.json, metrics.csv, model.pt, alpha.csv,
plots/), so ``csnet compare`` reads it next to command-line runs, and ``csnet eval`` and
``csnet train --resume`` take it when the run names the functions that make its data and its network
(``dataset=`` and ``network=``, each a ``module.path:function``; see ``csnet.pydata`` for the
Dataset convention).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from rich.console import Console

from csnet.config import FIT_DATA, DataConfig, TrainConfig
from csnet.errors import UsageError

__all__ = ["fit"]


def fit(net: torch.nn.Module, *, train=None, val=None, test=None, tasks: dict | None = None,
        out: str | Path, epochs: int | None = None, dataset: str | None = None, network: str | None = None,
        data_options: dict[str, str] | None = None, stream: bool | None = None, workers: int | None = None,
        resume: bool = False, force: bool = False, quiet: bool = False, **settings) -> Path:
    """Train ``net`` on your data with csnet's loop and write a run folder at ``out``; returns its path.

    ``net``: a network whose forward returns ``{task: output}`` (``csnet.stitch`` of your columns, or any
    module). ``train``, ``val``, ``test``: Datasets whose items are ``(image, {task: target})``.
    ``dataset="module.path:function"``: the function that makes them (``function(split, **data_options)``),
    recorded so the command line can make them again; given alone, fit calls it. ``tasks``: ``{name: kind or (kind, size)}`` (default:
    the training Dataset's ``tasks`` attribute). ``network="module.path:function"`` names a function
    returning a network like ``net``, recorded so ``csnet eval`` can rebuild it. ``resume=True``
    continues the run in ``out`` from its last checkpoint (``epochs``: up to that many; default: the run's).
    ``epochs`` of a new run: 1 unless given.
    ``settings``: any ``csnet train`` training option by its Python name (``batch_size=64``,
    ``lr=3e-4``, ``weighting="uncertainty"``, ``seed=1``, ``device="cuda"``, ``augment="flip"`` ...).
    """
    from csnet import data as data_lib
    from csnet import pydata, runio, stages
    from csnet.train import resolve_device
    from csnet.models.network import ModelConfig, as_network, check_outputs
    from csnet.tasks import make as make_task

    console = Console(quiet=quiet)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"csnet.fit got unknown setting(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(known - {'epochs'}))}")
    train_cfg = TrainConfig(epochs=epochs or 1, **settings)
    given = [s for s in (train, val, test) if s is not None]
    if len(given) not in (0, 3) or (not given and dataset is None):
        raise UsageError("csnet.fit needs train=, val= and test= Datasets, or dataset='module.path:function'")
    data_cfg = DataConfig(dataset=dataset or FIT_DATA, split_seed=train_cfg.seed, stream=stream, workers=workers,
                          options=data_options)
    if tasks is None and not given:  # the data set function's own, as --dataset module.path:function reads them
        specs = pydata.spec(dataset, {}, data_options).tasks
    else:
        specs = pydata.task_specs(tasks if tasks is not None else getattr(train, "tasks", None), "csnet.fit tasks")
    task_objs = {name: make_task(name, s.kind, s.size) for name, s in specs.items()}
    if not given:
        data = data_lib.load(data_cfg, task_objs)  # named in this Python call: trusted
    else:
        made = {"train": train, "val": val, "test": test}
        for split, ds in made.items():
            pydata.check_dataset(ds, f"csnet.fit {split}=")
        data = pydata.data_from(made, task_objs, data_cfg, "csnet.fit")
    net = as_network(net)
    out = Path(out)
    if resume:
        return stages.resume_network(out, net, data, console, epochs=epochs, quiet=quiet)
    image = data.train.example()[0]
    model_cfg = ModelConfig(tasks=tuple(specs), num_classes=tuple(s.size for s in specs.values()),
                            kinds=tuple(s.kind for s in specs.values()), arch="custom", network=network,
                            stitch="none", in_channels=image.shape[1], image_size=tuple(image.shape[2:]))
    if model_cfg.needs_stats():  # the statistics standardized kinds' losses are computed with
        model_cfg = model_cfg.with_stats(data.target_stats(model_cfg.task_list()))
    stages.check_training(model_cfg, train_cfg, net)
    stages.check_geometry(model_cfg, data)  # targets and inputs of the shapes the network answers, before
    check_outputs(net, model_cfg.task_list(), torch.zeros(2, *model_cfg.input_shape()))  # anything is written
    net.input_norm.set(data.mean, data.std)  # the training split's statistics, kept in model.pt
    runio.ensure_new(out, force)  # before anything is written: an existing run is refused unless force
    device, note = resolve_device(train_cfg.device)
    if note:
        console.print(note, highlight=False)
    torch.manual_seed(train_cfg.seed)  # dropout's draws; the network's initial weights are the caller's
    return stages.run_network("train", net, model_cfg, data, data_cfg, train_cfg, out, device, console, quiet,
                              force)
