"""Training and evaluation loops for any network whose forward returns {task: logits}.

Loss weighting is kept apart from the architecture: the total loss is the plain
sum of the task losses, as in the Fashion-MNIST reproduction. A sample with no
label for a task (label -1) adds nothing to that task's loss or accuracy.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from csnet import runio
from csnet.data import MISSING_LABEL, Data, Split, batches
from csnet.errors import CsnetError, UsageError
from csnet.models.network import CrossStitchNet, ModelConfig
from csnet.progress import Reporter

OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")


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
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.weight_decay >= 0, "--weight-decay must be 0 or more"),
            (self.stitch_lr_mult > 0, "--stitch-lr-mult must be positive"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"),
            (self.device in DEVICES, f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def resolve_device(name: str) -> tuple[torch.device, str | None]:
    """Turn auto/cpu/cuda into a device once; the note says when auto fell back to the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return torch.device("cpu"), "no CUDA device found; training on the CPU"
    return torch.device(name), None


def make_optimizer(net: CrossStitchNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Two parameter groups: the columns, and the unit weights at ``lr * stitch_lr_mult`` without decay.

    Weight decay would pull the mixing weights towards zero, i.e. towards switching
    the columns off, so it applies to the columns only.
    """
    unit_ids = {id(p) for p in net.unit_parameters()}
    column_params = [p for p in net.parameters() if id(p) not in unit_ids and p.requires_grad]
    groups = [{"params": column_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if unit_ids:
        groups.append({"params": net.unit_parameters(), "lr": cfg.lr * cfg.stitch_lr_mult, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


class _Tally:
    """Per-task sums of loss, correct predictions and labelled samples, kept on the device."""

    def __init__(self, tasks: list[str], device: torch.device):
        self.sums = {t: torch.zeros(3, device=device) for t in tasks}

    def add(self, task: str, loss_sum: torch.Tensor, correct: torch.Tensor, n: torch.Tensor) -> None:
        self.sums[task] += torch.stack([loss_sum.detach(), correct.float(), n.float()])

    def result(self) -> dict[str, dict[str, float]]:
        out = {}
        for task, s in self.sums.items():
            loss, correct, n = s.tolist()
            out[task] = {"loss": loss / n, "accuracy": correct / n} if n else {"loss": math.nan, "accuracy": math.nan}
        accs = [m["accuracy"] for m in out.values() if not math.isnan(m["accuracy"])]
        out["mean"] = {
            "loss": sum(m["loss"] for m in out.values() if not math.isnan(m["loss"])) / max(len(accs), 1),
            "accuracy": sum(accs) / len(accs) if accs else math.nan,
        }
        return out


def _task_terms(logits: torch.Tensor, y: torch.Tensor):
    """Summed loss, correct count and labelled count of one task in one batch, ignoring missing labels."""
    loss_sum = F.cross_entropy(logits, y, reduction="sum", ignore_index=MISSING_LABEL)
    labelled = y != MISSING_LABEL
    correct = ((logits.argmax(1) == y) & labelled).sum()
    return loss_sum, correct, labelled.sum()


@torch.no_grad()
def evaluate(net: CrossStitchNet, split: Split, *, mean: float, std: float, batch_size: int = 1000):
    """Per-task loss and accuracy on a split, plus their mean over tasks (task ``mean``)."""
    net.eval()
    tally = _Tally(net.tasks, split.images.device)
    for x, labels in batches(split, batch_size, mean=mean, std=std):
        for task, logits in net(x).items():
            tally.add(task, *_task_terms(logits, labels[task]))
    return tally.result()


def train_epoch(net, data: Data, opt, cfg: TrainConfig, gen: torch.Generator, epoch: int, reporter: Reporter):
    net.train()
    tally = _Tally(net.tasks, data.train.images.device)
    for step, (x, labels) in enumerate(batches(data.train, cfg.batch_size, mean=data.mean, std=data.std, generator=gen), 1):
        loss = 0.0
        for task, logits in net(x).items():
            loss_sum, correct, n = _task_terms(logits, labels[task])
            tally.add(task, loss_sum, correct, n)
            loss = loss + loss_sum / n.clamp_min(1)
        if not torch.isfinite(loss):
            raise CsnetError(
                f"training loss became {loss.item()} at epoch {epoch}, step {step}; "
                f"the last good checkpoint is kept; try a lower --lr (now {cfg.lr:g})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        reporter.step()
    metrics = tally.result()
    metrics["total"] = {"loss": sum(m["loss"] for t, m in metrics.items() if t != "mean" and not math.isnan(m["loss"]))}
    return metrics


def _epoch_line(epoch: int, epochs: int, train: dict, val: dict, test: dict, speed: float) -> str:
    accs = " ".join(f"{t} {m['accuracy']:.4f}" for t, m in val.items() if t != "mean")
    return (
        f"epoch {epoch}/{epochs}  train loss {train['total']['loss']:.4f}  "
        f"val acc {accs} (mean {val['mean']['accuracy']:.4f})  "
        f"test mean {test['mean']['accuracy']:.4f}  {speed:,.0f} ex/s"
    )


def fit(net: CrossStitchNet, model_cfg: ModelConfig, data: Data, cfg: TrainConfig, run: Path,
        device: torch.device, reporter: Reporter) -> dict:
    """Train for ``cfg.epochs``; after each epoch evaluate val and test, append metrics, save checkpoints.

    ``model.pt`` holds the weights of the best epoch by mean validation accuracy;
    ``last.pt`` the whole training state after the last epoch.
    """
    net.to(device)
    data = data.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(net, cfg)
    writer = runio.MetricsWriter(run / runio.METRICS)
    best = {"epoch": 0, "val_accuracy": -math.inf}
    steps = math.ceil(len(data.train) / cfg.batch_size)
    reporter.start(cfg.epochs, steps)
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            train = train_epoch(net, data, opt, cfg, gen, epoch, reporter)
            train_time = time.perf_counter() - t0
            train["all"] = {"examples_per_s": len(data.train) / train_time, "seconds": train_time}
            val = evaluate(net, data.val, mean=data.mean, std=data.std)
            test = evaluate(net, data.test, mean=data.mean, std=data.std)
            for split, values in (("train", train), ("val", val), ("test", test)):
                writer.write(epoch, split, values)
            state = {"model_config": model_cfg.to_dict(), "model": net.state_dict(), "epoch": epoch,
                     "norm": {"mean": data.mean, "std": data.std}}
            if val["mean"]["accuracy"] > best["val_accuracy"]:
                best = {"epoch": epoch, "val_accuracy": val["mean"]["accuracy"]}
                runio.save_checkpoint(run / runio.MODEL, {**state, "val_accuracy": best["val_accuracy"]})
            runio.save_checkpoint(run / runio.LAST, {
                **state, "optimizer": opt.state_dict(), "best": best, "train_config": asdict(cfg),
                "rng": {"torch": torch.get_rng_state(), "shuffle": gen.get_state()},
            })
            reporter.epoch(_epoch_line(epoch, cfg.epochs, train, val, test, train["all"]["examples_per_s"]))
    finally:
        writer.close()
        reporter.close()
    return best
