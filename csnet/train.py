"""Training and evaluation loops for any network whose forward returns {task: output}.

Each task's loss and metrics come from its kind (``csnet.tasks``); the loop names no kind.
Loss weighting is kept apart from the architecture: the total loss is the plain
sum of the task losses, as in the Fashion-MNIST reproduction. A sample with no
label for a task adds nothing to that task's loss or metrics.

The best epoch is the one with the highest validation ``score``: the mean over tasks of
each task's primary metric (all higher-is-better fractions: accuracy, mean AP, R², mIoU,
δ1), or the one metric ``--select TASK:METRIC`` names.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from csnet import augment, distributed, runio, weightings
from csnet.splits import Data, Split, Stream, batches, shard_size
from csnet.errors import CsnetError, UsageError
from csnet.models.network import CrossStitchNet, ModelConfig
from csnet.progress import Reporter
from csnet.config import TrainConfig  # noqa: F401  (re-exported: the training settings)
from csnet.settings import MAX_SEED
from csnet.state import StopRequest, capture_rng, restore_rng
from csnet.tasks import HIGHER, Task
from csnet.units import PERCENT, with_unit

@contextmanager
def deterministic_algorithms(on: bool):
    """PyTorch's deterministic kernels for the duration of a run (then the previous setting again)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if on:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def resolve_device(name: str) -> tuple[torch.device, str | None]:
    """Turn auto/cpu/cuda into a device once; the note says when auto fell back to the CPU.
    Under torchrun each process takes the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", distributed.world().local_rank) if distributed.world().active \
            else torch.device("cuda"), None
    if name == "auto":
        return torch.device("cpu"), "no CUDA device found; training on the CPU"
    return torch.device(name), None


def freeze(net: CrossStitchNet, cfg: TrainConfig) -> None:
    """With ``freeze_columns``, columns keep their weights (heads too, unless ``train_heads``)."""
    if not cfg.freeze_columns:
        return
    if not hasattr(net, "columns"):
        raise UsageError("--freeze-columns applies to cross-stitch networks (columns and units), not to --arch "
                         "shared or a network of your own")
    for column in net.columns.values():
        for p in column.stages.parameters():
            p.requires_grad_(False)
        for p in column.head.parameters():
            p.requires_grad_(cfg.train_heads)


def set_train_mode(net: CrossStitchNet, cfg: TrainConfig) -> None:
    """Train mode, except that frozen stages keep their batch-norm statistics as they were."""
    net.train()
    if cfg.freeze_columns:
        for column in net.columns.values():
            for m in column.stages.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def make_optimizer(net: CrossStitchNet, cfg: TrainConfig, weighting: nn.Module | None = None) -> torch.optim.Optimizer:
    """Parameter groups: the columns; the unit weights at ``lr * stitch_lr_mult`` without decay; the
    loss weighting's own parameters (log-variances, GradNorm's weights) at ``lr`` without decay.

    Weight decay would pull the mixing weights towards zero, i.e. towards switching
    the columns off, so it applies to the columns only.
    """
    unit_ids = {id(p) for p in net.unit_parameters()}
    column_params = [p for p in net.parameters() if id(p) not in unit_ids and p.requires_grad]
    groups = [{"params": column_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}] if column_params else []
    if unit_ids:
        groups.append({"params": net.unit_parameters(), "lr": cfg.lr * cfg.stitch_lr_mult, "weight_decay": 0.0})
    if not groups:
        raise UsageError("nothing to train: --freeze-columns on a network without units (add --train-heads?)")
    own = list(weighting.parameters()) if weighting is not None else []
    if own:
        groups.append({"params": own, "lr": cfg.lr, "weight_decay": 0.0})
    # The fused kernels update every tensor in one pass instead of one pass per operation: on the
    # CPU the Adam step went from about 13 to 4 ms per batch of the Fashion pair (csnet bench).
    make = (lambda **kw: torch.optim.Adam(groups, lr=cfg.lr, **kw)) if cfg.optimizer == "adam" else \
        (lambda **kw: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kw))
    if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"]):
        try:
            return make(fused=True)
        except (TypeError, RuntimeError):  # no fused step for this optimizer on this device
            pass
    return make()


class _Tally:
    """Per task, the float64 vector its kind sums over batches: loss sum, loss count, then the
    sums its metrics are computed from. Kept on the device; added over processes under torchrun."""

    def __init__(self, tasks: dict[str, Task], device: torch.device):
        self.tasks = tasks
        self.sums = {t: torch.zeros(2 + task.stat_size(), dtype=torch.float64, device=device)
                     for t, task in tasks.items()}

    def add(self, task: str, loss_sum: torch.Tensor, n: torch.Tensor, stats: torch.Tensor) -> None:
        self.sums[task] += torch.cat([loss_sum.detach().double().view(1), n.double().view(1), stats])

    def reduce(self) -> "_Tally":
        """Sum every rank's tallies (under torchrun); a no-op on one process."""
        for s in self.sums.values():
            distributed.sum_(s)
        return self

    def _labelled(self) -> dict[str, dict[str, float]]:
        """{task: {loss, metrics...}} of the tasks that had labels, in task order."""
        return {t: self.tasks[t].result(s) for t, s in self.sums.items() if s[1].item()}

    def result(self) -> dict[str, dict[str, float]]:
        """Per task, and over tasks (``mean``): the mean loss and the score (mean of the primary metrics).
        A task without labels has no values (NaN) and no part in the mean; a NaN of a task that had
        labels makes the mean NaN."""
        labelled = self._labelled()
        out = {t: labelled.get(t) or self.tasks[t].result(s) for t, s in self.sums.items()}
        primaries = [m[self.tasks[t].primary] for t, m in labelled.items()]
        out["mean"] = {"loss": sum(m["loss"] for m in labelled.values()) / len(labelled) if labelled else math.nan,
                       "score": sum(primaries) / len(primaries) if primaries else math.nan}
        return out

    def total_loss(self) -> float:
        """The training objective's value: the sum of the per-task mean losses (tasks that had labels)."""
        labelled = self._labelled()
        return sum(m["loss"] for m in labelled.values()) if labelled else math.nan


def selection(cfg: TrainConfig, tasks: dict[str, Task]):
    """(name, value of a validation result to maximise): the score, or --select's metric (negated when
    lower is better)."""
    if cfg.select is None:
        return "val score", lambda val: val["mean"]["score"]
    task, metric = cfg.select.split(":")
    if task not in tasks:
        raise UsageError(f"--select {cfg.select}: no task {task} in this run (tasks: {', '.join(tasks)})")
    directions = tasks[task].metrics
    if metric not in directions:
        raise UsageError(f"--select {cfg.select}: a {tasks[task].kind} task has the metrics {', '.join(directions)}")
    sign = 1.0 if directions[metric] == HIGHER else -1.0
    return f"val {task} {metric}", lambda val: sign * val[task][metric]


def make_forward(net: CrossStitchNet, cfg: TrainConfig, device: torch.device):
    """The forward pass as the run wants it: channels_last inputs and weights, bf16 autocast, compiled.
    Logits come back in float32 so losses and accuracies are computed in full precision."""
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    module = torch.compile(net) if cfg.compile else net

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            out = module(x)
        return {t: o.float() for t, o in out.items()}

    return forward


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    By default every tensor above 128 KiB is its own mmap, returned at free, so each training
    step of the Fashion pair took about 4,000 page faults (measured with getrusage) while it
    allocated the same activations again; each fault zeroes a fresh 4 KiB page. With these two
    settings the steps take none, and the stitched pair trained about 4% faster on 2 cores.
    Freed memory stays in the process for the next step; the peak RSS of a full-data
    ``csnet train`` did not grow (2,497 MiB before, 2,123 to 2,456 MiB in the benchmark runs
    after). Process-wide, so only the CLI calls it; a no-op (False) where the C library is not
    glibc (mallopt missing, or refusing the settings).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # 32 MiB is glibc's largest mmap threshold on 64-bit: a Fashion batch's biggest activation
    # (128 x 32 x 28 x 28 floats) is 12.3 MiB; whole data sets still get their own mmap.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def eval_batch_size(device: torch.device) -> int:
    """Batch size for evaluation. A GPU wants large batches (fewer launches). On the CPU small ones
    are faster: at 1,000 the Fashion convnet's activations (100 MB after the first conv) fall out
    of cache, and evaluating the 10,000 test images took 4.5 s, against 2.3 s at 128."""
    return 1000 if device.type == "cuda" else 128


@torch.inference_mode()
def evaluate(net: CrossStitchNet, split: Split | Stream, tasks: dict[str, Task], *,
             batch_size: int | None = None, forward=None):
    """Per-task loss and metrics on a split, plus the mean loss and score over tasks (task ``mean``)."""
    net.eval()
    forward = forward or net
    device = split.device
    batch_size = batch_size or eval_batch_size(device)
    tally = _Tally(tasks, device)
    w = distributed.world()
    if w.active:  # every rank evaluates every size-th sample; no sample is left out or counted twice
        split = split.shard(w.rank, w.size)
    for x, labels in batches(split, batch_size):
        for task, out in forward(x).items():
            tally.add(task, *tasks[task].terms(out, labels[task]))
    return tally.reduce().result()


def train_epoch(net, data: Data, tasks: dict[str, Task], opt, cfg: TrainConfig, gen: torch.Generator, epoch: int,
                reporter: Reporter, stop: StopRequest, start_step: int = 0, tally: _Tally | None = None,
                forward=None, weighting: weightings.Weighting | None = None, on_step=None):
    """One pass over the training set, from batch ``start_step`` on (a resumed epoch skips the batches done).
    ``on_step(step, loss)``, where given, sees every step's summed loss (reading it waits for the device).

    Returns (metrics, steps done, tally); metrics is None when a stop was requested before the end.
    """
    set_train_mode(net, cfg)
    forward = forward or net
    device = data.train.device
    tally = tally or _Tally(tasks, device)
    weighting = weighting or weightings.make("equal", tasks)
    step = start_step
    w = distributed.world()
    augments, dense = augment.parse(cfg.augment), {t for t, task in tasks.items() if task.dense}
    for x, labels in batches(data.train, cfg.batch_size, generator=gen,
                             start=start_step * cfg.batch_size, shard=(w.rank, w.size)):
        step += 1
        if augments:
            x, labels = augment.augment(x, labels, dense, augments, augment.generator(cfg.seed, epoch, step, w.rank),
                                        fill=net.input_norm.mean)
        if weighting.per_task_gradients and w.active:
            distributed.broadcast_buffers(net)  # what DDP's forward does: every rank runs rank 0's statistics
        losses, present = {}, {}
        for task, out in forward(x).items():
            loss_sum, n, stats = tasks[task].terms(out, labels[task])
            tally.add(task, loss_sum, n, stats)
            losses[task] = loss_sum / n.clamp_min(1)
            present[task] = (n > 0).to(loss_sum.dtype)
        loss = sum(losses.values())
        # decided by all ranks together: one rank stopping alone would leave the others in a collective
        if distributed.any_(not bool(torch.isfinite(loss)), device):
            losses = distributed.gather(loss.item())  # every rank is here: the decision was collective
            bad = next(r for r, v in enumerate(losses) if not math.isfinite(v))
            raise NonFiniteLoss(f"training loss became {losses[bad]} at epoch {epoch}, step {step}"
                                f"{f' on rank {bad}' if w.active else ''}; try a lower --lr (now {cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        weighting.backward(losses, net, present)
        if weighting.per_task_gradients:  # computed outside DDP's hooks: average them here
            distributed.average_gradients([p for g in opt.param_groups for p in g["params"]])
        opt.step()
        weighting.after_step()
        reporter.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
        if distributed.any_(stop.requested is not None, device):
            return None, step, tally.reduce()
    metrics = tally.reduce().result()
    metrics["total"] = {"loss": tally.total_loss()}
    return metrics, step, tally


class _Trainable(nn.Module):
    """The network and its loss weighting as one module, so DDP averages the weighting's gradients too;
    its forward is the network's."""

    def __init__(self, net: nn.Module, weighting: nn.Module):
        super().__init__()
        self.net, self.weighting = net, weighting

    def forward(self, x):
        return self.net(x)


class NonFiniteLoss(CsnetError):
    """The loss became NaN or infinite: stop before the optimizer step spreads it into the weights."""


class Interrupted(CsnetError):
    """A stop requested by SIGINT/SIGTERM, after the checkpoint was written: exit 130 like a shell."""

    exit_code = 130
    label = "interrupted"


def _epoch_line(epoch: int, epochs: int, train: dict, val: dict, test: dict, speed: float,
                tasks: dict[str, Task]) -> str:
    primaries = " ".join(f"{t} {task.primary} {with_unit(val[t][task.primary], task.units.get(task.primary, ''))}"
                         for t, task in tasks.items())
    return (
        f"epoch {epoch}/{epochs}  train loss (sum) {train['total']['loss']:.4f}  "
        f"val {primaries} (score {with_unit(val['mean']['score'], PERCENT)})  "
        f"test score {with_unit(test['mean']['score'], PERCENT)}  {speed:,.0f} ex/s"
    )


def alpha_pairs(net: CrossStitchNet):
    """(point, target, source, weights over channels as a float32 CPU vector) for every stitch point and task
    pair: what alpha.csv, alpha_final.csv and TensorBoard's α histograms are made of."""
    for point, unit in net.units.items():
        w = unit.mixing_weights().detach().float().cpu()
        for i, target in enumerate(net.tasks):
            for j, source in enumerate(net.tasks):
                yield point, target, source, w[i, j].reshape(-1)


def alpha_rows(net: CrossStitchNet, epoch: int) -> list[tuple]:
    """alpha.csv rows: per stitch point, target and source task, mean and std of the weights over channels
    (what the paper's section 5.4 plots to show how much each task takes from the others)."""
    return [(epoch, point, target, source, f"{v.mean().item():.6g}", f"{v.std(unbiased=False).item():.6g}")
            for point, target, source, v in alpha_pairs(net)]


def alpha_tensors(net: CrossStitchNet) -> dict[str, torch.Tensor]:
    """TensorBoard's α histograms: per stitch point and (source, target) pair, the weights over channels."""
    return {f"alpha/{point}/{source}->{target}": v for point, target, source, v in alpha_pairs(net)}


def write_final_alpha(net: CrossStitchNet, path: Path) -> None:
    """Every per-channel weight at the end of training: point, target, source, channel, value."""
    lines = ["point,target,source,channel,value"]
    for point, target, source, v in alpha_pairs(net):
        lines += [f"{point},{target},{source},{c},{x:.6g}" for c, x in enumerate(v.tolist())]
    runio.atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """None for a constant learning rate; cosine annealing to 0 over ``cfg.epochs`` epochs."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return None


def _check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Every per-weight state tensor (Adam's moments, SGD's momentum) of a loaded optimizer has its
    weight's shape and dtype: the fused steps write through them without checking, so a damaged
    last.pt would otherwise corrupt memory instead of failing."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if key == "step":
                    ok = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
                else:
                    ok = isinstance(value, torch.Tensor) and value.shape == p.shape and value.dtype == p.dtype
                if not ok:
                    raise ValueError(f"optimizer state {key!r} does not fit a weight of shape {tuple(p.shape)}")


def fit(net: CrossStitchNet, model_cfg: ModelConfig, data: Data, cfg: TrainConfig, run: Path,
        device: torch.device, reporter: Reporter, resume: dict | None = None) -> dict:
    """Train until ``cfg.epochs``; after each epoch evaluate val and test, append metrics, save checkpoints.

    ``model.pt`` holds the weights of the best epoch by validation score (or ``cfg.select``);
    ``last.pt`` the whole training state: after each epoch, or after the batch at
    which SIGINT/SIGTERM arrived. ``resume`` is such a last.pt, whose weights the
    caller has already loaded into ``net``.
    """
    w = distributed.world()
    main = w.is_main  # under torchrun only rank 0 writes the run folder
    tasks = model_cfg.task_list()
    selected, chosen = selection(cfg, tasks)
    net.to(device)
    data = data.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)  # the same batch order on every rank, cut into shards
    freeze(net, cfg)
    weighting = weightings.make(cfg.weighting, tasks, cfg.seed).to(device)
    eval_forward = make_forward(net, cfg, device)
    forward = eval_forward
    opt = make_optimizer(net, cfg, weighting)  # before DDP, which refuses a module with nothing to train less clearly
    if w.active and not weighting.per_task_gradients:
        # DDP averages gradients over ranks, the weighting's own (log-variances) too. Evaluation runs the
        # plain module: DDP's forward would broadcast buffers, a collective, and ranks evaluate different
        # numbers of batches. Weightings that take per-task gradients average them themselves.
        ddp = nn.parallel.DistributedDataParallel(_Trainable(net, weighting),
                                                  device_ids=[device.index] if device.type == "cuda" else None)
        forward = make_forward(ddp, cfg, device)
    sched = make_scheduler(opt, cfg)
    best = {"epoch": 0, "val_score": -math.inf}
    epoch, step, tally = 1, 0, None
    if resume is not None:
        try:
            opt.load_state_dict(resume["optimizer"])
            _check_optimizer_state(opt)
            if resume.get("weighting") is not None or list(weighting.state_dict()):
                weighting.load_state_dict(resume["weighting"])
            if sched is not None:
                sched.load_state_dict(resume["scheduler"])
            by_rank = resume.get("rng_by_rank") or []
            restore_rng(by_rank[w.rank] if len(by_rank) == w.size else resume["rng"], gen)
            saved_tally = resume.get("tally")
            if saved_tally is not None and not (
                    isinstance(saved_tally, dict) and set(saved_tally) == set(tasks)
                    and all(isinstance(v, torch.Tensor) and v.shape == (2 + tasks[t].stat_size(),)
                            and v.dtype == torch.float64 for t, v in saved_tally.items())):
                raise ValueError("the tally of the interrupted epoch does not fit the tasks")
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CsnetError(f"{run / runio.LAST}: its optimizer, schedule or RNG state does not fit this run "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        if w.rank and len(by_rank) != w.size:  # another number of processes: fresh dropout streams
            torch.manual_seed((cfg.seed + 1_000_003 * w.rank + 7_919 * resume["position"]["epoch"]) % MAX_SEED)
        epoch, step, best = resume["position"]["epoch"], resume["position"]["step"], resume["best"]
        if resume.get("tally") is not None and main:  # the sum over all ranks; the others start at zero
            tally = _Tally(tasks, device)
            tally.sums = {t: v.to(device) for t, v in resume["tally"].items()}
    elif w.rank:
        torch.manual_seed((cfg.seed + 1_000_003 * w.rank) % MAX_SEED)  # dropout masks differ between ranks
    def network() -> dict:
        """What rebuilds and runs the network (its input statistics included): the part model.pt and last.pt
        share."""
        return {"model_config": model_cfg.to_dict(), "model": net.state_dict()}

    def checkpoint(position: dict, shuffle_state: torch.Tensor, partial: _Tally | None) -> None:
        rngs = distributed.gather(capture_rng(gen, shuffle_state))  # every rank's dropout stream
        if not main:
            return
        runio.save_checkpoint(run / runio.LAST, {
            **network(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
            "weighting": weighting.state_dict(),
            "train_config": asdict(cfg), "best": best, "position": {**position, "world_size": w.size},
            "tally": {t: v.cpu() for t, v in partial.sums.items()} if partial else None,
            "rng": rngs[0], "rng_by_rank": rngs if w.active else None,
        })

    keep = epoch if resume is not None else None
    per_rank = shard_size(len(data.train), w.size)
    per_epoch = math.ceil(per_rank / cfg.batch_size)
    writer = runio.MetricsWriter(run / runio.METRICS, keep_before_epoch=keep,
                                 tensorboard=run / runio.TENSORBOARD if cfg.tensorboard else None,
                                 first_step=(epoch - 1) * per_epoch + step) if main else None
    # steps counted over the whole run (epoch read when called), so a resumed run continues the curve
    on_step = (lambda s, loss: writer.step_loss((epoch - 1) * per_epoch + s, loss)) \
        if writer is not None and cfg.tensorboard else None
    alphas = runio.CsvAppender(run / runio.ALPHA, runio.ALPHA_FIELDS, keep) if net.units and main else None
    if alphas is not None and resume is None:
        alphas.rows(alpha_rows(net, 0))  # the initialisation, so trajectories start where training did
    reporter.start(cfg.epochs - epoch + 1, per_epoch)
    resume_hint = (f"resume with: torchrun --nproc-per-node {w.size} (and the same node options) -m csnet train "
                   f"--resume {run}" if w.active else f"resume with: csnet train --resume {run}")
    try:
        with StopRequest(on_second=f"The last good checkpoint, {run / runio.LAST}, is untouched; {resume_hint}",
                         second_stops=not w.active, announce=main) as stop:
            while epoch <= cfg.epochs:
                epoch_start = gen.get_state()  # batch order of this epoch, replayed on resume
                resumed_at = step
                t0 = time.perf_counter()
                try:
                    train, step, tally = train_epoch(net, data, tasks, opt, cfg, gen, epoch, reporter, stop, step,
                                                     tally, forward, weighting, on_step)
                except NonFiniteLoss as e:
                    kept = (f"the last good checkpoint, {run / runio.LAST}, is kept"
                            if (run / runio.LAST).exists() else "no checkpoint was written")
                    raise NonFiniteLoss(f"{e}; {kept}") from None
                if train is None:
                    checkpoint({"epoch": epoch, "step": step}, epoch_start, tally)
                    raise Interrupted(f"by {stop.requested or 'a signal to another rank'} at epoch {epoch}, "
                                      f"step {step}; checkpoint saved in {run / runio.LAST}; {resume_hint}")
                train_time = time.perf_counter() - t0
                # examples of all ranks; a resumed epoch ran only part of the shard
                done = (per_rank - min(per_rank, resumed_at * cfg.batch_size)) * w.size
                train["all"] = {"examples_per_s": done / train_time, "seconds": train_time}
                distributed.broadcast_buffers(net)  # rank 0's batch-norm statistics: the ones model.pt keeps
                val = evaluate(net, data.val, tasks, forward=eval_forward)
                test = evaluate(net, data.test, tasks, forward=eval_forward)
                used = weighting.weights()  # what this epoch's losses were weighted by (DWA: fixed per epoch)
                weighting.epoch_end({t: train[t]["loss"] for t in tasks})
                if main:
                    for t, w_t in used.items():
                        train[t]["loss_weight"] = w_t
                    for split, values in (("train", train), ("val", val), ("test", test)):
                        writer.write(epoch, split, values)
                if alphas is not None:
                    alphas.rows(alpha_rows(net, epoch))
                    if cfg.tensorboard:
                        writer.histograms(epoch, alpha_tensors(net))
                if sched is not None:
                    sched.step()
                if chosen(val) > best["val_score"]:
                    best = {"epoch": epoch, "val_score": chosen(val), "selected_by": selected}
                    if main:
                        runio.save_checkpoint(run / runio.MODEL, {
                            **network(), "epoch": epoch, "val_score": best["val_score"]})
                checkpoint({"epoch": epoch + 1, "step": 0}, gen.get_state(), None)
                # the whole epoch: training, evaluation, metrics and checkpoints (the benchmark compares
                # it with the training steps' "seconds")
                if main:
                    writer.write(epoch, "train", {"all": {"epoch_seconds": time.perf_counter() - t0}})
                reporter.epoch(_epoch_line(epoch, cfg.epochs, train, val, test, train["all"]["examples_per_s"], tasks))
                epoch, step, tally = epoch + 1, 0, None
                if distributed.any_(stop.requested is not None, device) and epoch <= cfg.epochs:
                    raise Interrupted(f"by {stop.requested or 'a signal to another rank'} after epoch {epoch - 1}; "
                                      f"checkpoint saved in {run / runio.LAST}; {resume_hint}")
        if net.units and main:
            write_final_alpha(net, run / runio.ALPHA_FINAL)
    finally:
        if writer is not None:
            writer.close()
        if alphas is not None:
            alphas.close()
        reporter.close()
    return best
