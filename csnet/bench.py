"""`csnet bench`: training throughput of the Fashion-MNIST pair, measured side by side in one run.

Compares, on this machine and in this process: the two convnet columns without units,
csnet's stitched network (units after pool1, pool2, fc), and a straightforward
implementation written here for comparison only (one small unit module per task
pair whose products are stacked and summed; torchvision's FashionMNIST with
ToTensor/Normalize transforms through a DataLoader). It also measures the
machine's float32 matrix-multiply peak, so the fraction of the FLOP limit is a
ratio of two numbers taken minutes apart on the same cores.
"""

from __future__ import annotations

import gzip
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from csnet import data as data_lib
from csnet.models.network import ModelConfig, build_network, count_macs


def matmul_peak(seconds: float = 2.0) -> float:
    """Best float32 GFLOP/s of square matrix products (2 n^3 FLOP each) on this device."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def _fashion_or_synthetic(n: int):
    """(uint8 images (n, 1, 28, 28), fine labels, source folder or None) of real Fashion-MNIST when
    installed, else random images (the timing does not depend on pixel values)."""
    try:
        files = data_lib.locate(data_lib.DATASETS["fashion"])
        images = data_lib.read_idx(files["train_images"])[:n].unsqueeze(1)
        labels = data_lib.read_idx(files["train_labels"])[:n].long()
        return images, labels, files["train_images"].parent
    except Exception:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), \
            torch.randint(0, 10, (n,), generator=g), None


def _step_fn(net, opt):
    def step(x, labels):
        out = net(x)
        loss = sum(nn.functional.cross_entropy(out[t], labels[t]) for t in out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _time_tensor_batches(net, images, labels_by_task, batch: int, warmup: int = 3) -> float:
    """Examples/s of training steps on batches cut from in-memory uint8 tensors (csnet's way)."""
    net.train()
    step = _step_fn(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    mean, std = images.float().mean().item(), images.float().std().item()
    split = data_lib.Split(images, labels_by_task)
    gen = torch.Generator().manual_seed(0)
    for i, (x, y) in enumerate(data_lib.batches(split, batch, mean=mean, std=std, generator=gen)):
        if i == warmup:
            break
        step(x, y)
    t0 = time.perf_counter()
    for x, y in data_lib.batches(split, batch, mean=mean, std=std, generator=gen):
        step(x, y)
    return len(images) / (time.perf_counter() - t0)


class _PairUnit(nn.Module):
    """The straightforward unit: one (C,) weight per (target, source) pair, products stacked and summed."""

    def __init__(self, channels: int, value: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), value))

    def forward(self, x):
        return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))


class _StraightforwardNet(nn.Module):
    def __init__(self, columns: dict[str, nn.Module], points: list[str]):
        super().__init__()
        self.columns = nn.ModuleDict(columns)
        tasks = list(columns)
        first = next(iter(columns.values()))
        self.points = points
        self.pairs = nn.ModuleDict({
            p: nn.ModuleList([nn.ModuleList([_PairUnit(first.channels[p], 0.9 if i == j else 0.1)
                                             for j in range(len(tasks))]) for i in range(len(tasks))])
            for p in points})

    def forward(self, x):
        cols = list(self.columns.values())
        xs = [x] * len(cols)
        for name in cols[0].stages:
            xs = [c.stages[name](h) for c, h in zip(cols, xs)]
            if name in self.pairs:
                xs = [torch.stack([u(h) for u, h in zip(row, xs)]).sum(0) for row in self.pairs[name]]
        return {t: c.head(h) for t, c, h in zip(self.columns, cols, xs)}


def _time_dataloader(net, folder: Path | None, n: int, batch: int, warmup: int = 3) -> float:
    """Examples/s of the same training steps fed by torchvision's dataset, transforms and DataLoader."""
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    if folder is not None:
        # torchvision reads the uncompressed IDX files from ROOT/FashionMNIST/raw
        root = Path(tempfile.mkdtemp(prefix="csnet-bench-"))
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for path in data_lib.locate(data_lib.DATASETS["fashion"]).values():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                (raw / path.name.removesuffix(".gz")).write_bytes(f.read())
        dataset = torchvision.datasets.FashionMNIST(str(root), train=True, transform=tf)
    else:
        dataset = torchvision.datasets.FakeData(n, (1, 28, 28), 10, transform=transforms.ToTensor())
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, shuffle=True)
    net.train()
    step = _step_fn(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    coarse = data_lib.COARSE_OF_FINE
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            break
        step(x, {"fine": y, "coarse": coarse[y]})
    t0 = time.perf_counter()
    for x, y in loader:
        step(x, {"fine": y, "coarse": coarse[y]})
    return n / (time.perf_counter() - t0)


def _net(tasks: int, stitch: str):
    torch.manual_seed(0)
    names = ("fine", "coarse") if tasks == 2 else tuple(f"t{i}" for i in range(tasks))
    return build_network(ModelConfig(tasks=names, num_classes=(10,) * tasks, stitch=stitch)), names


def run(n: int = 4096, quick: bool = False) -> dict:
    """Every measurement; returns {name: value} for the table and bench.csv."""
    torch.manual_seed(0)
    images, fine, folder = _fashion_or_synthetic(n)
    two = {"fine": fine, "coarse": data_lib.COARSE_OF_FINE[fine]}
    r = {"data": str(folder) if folder else "synthetic", "threads": torch.get_num_threads()}
    r["matmul_gflops"] = matmul_peak()
    stitched, _ = _net(2, "all")
    macs = count_macs(stitched, torch.zeros(1, 1, 28, 28))
    r["train_mflop_per_example"] = 3 * 2 * macs / 1e6  # forward + backward (about twice the forward)
    r["flop_limit_examples_per_s"] = r["matmul_gflops"] * 1e3 / r["train_mflop_per_example"]
    r["unstitched"] = _time_tensor_batches(_net(2, "none")[0], images, two, 128)
    r["csnet"] = _time_tensor_batches(stitched, images, two, 128)
    naive_cols, _ = _net(2, "none")
    straightforward = _StraightforwardNet(dict(naive_cols.columns), ["pool1", "pool2", "fc"])
    r["straightforward"] = _time_dataloader(straightforward, folder, n, 128)
    r["csnet_vs_straightforward"] = r["csnet"] / r["straightforward"]
    r["stitch_overhead_2"] = 1 - r["csnet"] / r["unstitched"]
    r["fraction_of_flop_limit"] = r["csnet"] / r["flop_limit_examples_per_s"]
    for tasks in ((4, 8) if not quick else (4,)):
        m = max(512, n // tasks)
        labels = {name: fine[:m] for name in _net(tasks, "none")[1]}
        none = _time_tensor_batches(_net(tasks, "none")[0], images[:m], labels, 128)
        stitch = _time_tensor_batches(_net(tasks, "all")[0], images[:m], labels, 128)
        r[f"stitch_overhead_{tasks}"] = 1 - stitch / none
    for batch in ((64, 256) if not quick else ()):
        r[f"csnet_batch_{batch}"] = _time_tensor_batches(_net(2, "all")[0], images, two, batch)
    return r


def epoch_overhead(train_size: int = 6000) -> dict:
    """A real `csnet train` epoch in a child process: its peak resident memory, and its whole epoch
    (training, evaluation of 15,000 images, metrics, checkpoints) against the training steps alone."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "csnet", "train", "--train-size", str(train_size), "--epochs", "1", "--quiet",
               "--device", "cpu", "--out", f"{tmp}/run"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"epoch_run": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        m = pd.read_csv(f"{tmp}/run/metrics.csv").set_index("metric")
        steps, epoch = float(m.loc["seconds", "value"]), float(m.loc["epoch_seconds", "value"])
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "train_steps_s": steps, "epoch_s": epoch, "epoch_over_steps": epoch / steps}


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)

