"""What every data source returns: train / validation / test splits and the training statistics.

A split is held in one of two ways, behind the same few methods the training loop uses
(``len``, ``batches``, ``shard``, ``subset``, ``targets``, ``example``):

- ``Split``: the whole split in memory as tensors (uint8 images, or float features), cut into
  batches by indexing, without per-sample Python work: the fast path, for data that fits.
- ``Stream``: items read one by one from a ``torch.utils.data.Dataset`` by a ``DataLoader``
  (``--workers`` processes), for data that does not. It draws the same order from the same
  generator and skips the same samples on resume, so a run gives the same batches either way.

Sources (``csnet.idx``, ``csnet.tabular``, ``csnet.folder``, ``csnet.scenes``,
``csnet.pydata``) import this module and nothing of each other.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from csnet.errors import CsnetError, UsageError
from csnet.tasks import Task, TaskSpec

# Above this many bytes (uint8 images plus per-pixel targets), a source that can stream does.
DEFAULT_MEMORY_SHARE = 4  # a quarter of the machine's memory


def memory_limit() -> int:
    """Bytes a data set may take in memory before it streams: a quarter of the machine's memory, or of the
    container's limit where that is smaller (``CSNET_MEMORY_LIMIT`` overrides)."""
    if os.environ.get("CSNET_MEMORY_LIMIT"):
        try:
            return int(float(os.environ["CSNET_MEMORY_LIMIT"]))
        except ValueError:
            raise UsageError(f"CSNET_MEMORY_LIMIT={os.environ['CSNET_MEMORY_LIMIT']!r}: give a number of bytes") from None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): 4 GiB
        return 4 << 30
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # a container's
        try:
            total = min(total, int(Path(limit).read_text().strip()))
        except (OSError, ValueError):  # no such file, or "max"
            pass
    return total // DEFAULT_MEMORY_SHARE


def streams(stream: bool | None, size: int) -> bool:
    """Whether data of ``size`` bytes is read item by item: ``--stream`` / ``--no-stream``, else by size."""
    return stream if stream is not None else size > memory_limit()


def stream_workers(given: int | None) -> int:
    """``--workers``, or up to 4 processes reading ahead of training."""
    return given if given is not None else min(4, os.cpu_count() or 1)


def streamed_note(what: str, workers: int, forced: bool) -> str:
    """What a run prints about data it streams: ``what`` (how many, how big, read from where) and why."""
    return (f"{what} as they are needed, by {workers} worker process(es)"
            + ("" if forced else f": more than the {memory_limit() / 1e9:.1f} GB kept in memory (--no-stream holds "
                                 "them anyway)"))


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: its sources, tasks (name -> kind and size), input shape, and how it loads:
    ``loader(cfg, spec, tasks) -> Data`` (None: the IDX sources)."""

    name: str
    sources: tuple = ()
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    default_tasks: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = (1, 28, 28)
    loader: object = None
    backbone: str = "convnet"  # the default column for this data's inputs


@dataclass
class Split:
    """Images kept as uint8 (N, C, H, W) (or float features (N, F)) and one target tensor per task,
    indexed by sample on its first dimension, in the encoding its kind reads (``csnet.tasks``)."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), {t: y.to(device) for t, y in self.labels.items()})

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], {t: y[idx] for t, y in self.labels.items()})

    def shard(self, rank: int, size: int) -> "Split":
        return Split(self.images[rank::size], {t: y[rank::size] for t, y in self.labels.items()})

    def targets(self, task: str) -> torch.Tensor:
        return self.labels[task]

    def with_targets(self, task: str, y: torch.Tensor) -> "Split":
        return Split(self.images, {**self.labels, task: y})

    def example(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The first sample as a batch of one."""
        return self.images[:1], {t: y[:1] for t, y in self.labels.items()}

    def _batches(self, order, first_positions, seed: int = 0):
        for first, positions in first_positions:
            if order is None:
                sl = slice(first, first + positions)
                yield self.images[sl], {t: y[sl] for t, y in self.labels.items()}
            else:
                idx = order[first:first + positions]
                yield self.images[idx], {t: y[idx] for t, y in self.labels.items()}


@dataclass
class Stream:
    """A split read item by item: ``items[index[i]]`` is sample i, ``(image, {task: target})`` with the
    targets in their kinds' encodings. ``dropped`` holds, per task, the samples whose label
    ``--starve`` removed (applied to each batch); ``workers`` processes decode ahead of training."""

    items: torch.utils.data.Dataset
    index: torch.Tensor
    tasks: dict[str, Task]
    workers: int = 0
    device: torch.device = torch.device("cpu")
    dropped: dict[str, torch.Tensor] = field(default_factory=dict)
    # one read of every item: the per-sample targets and the pixel sums (see ``seen``); kept with the split
    _seen: dict | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device: torch.device) -> "Stream":
        return replace(self, device=torch.device(device))

    def subset(self, idx: torch.Tensor) -> "Stream":
        return replace(self, index=self.index[idx], dropped={t: d[idx] for t, d in self.dropped.items()}, _seen=None)

    def shard(self, rank: int, size: int) -> "Stream":
        return self.subset(torch.arange(rank, len(self), size))

    def seen(self) -> dict:
        """One pass over the items, made once: every per-sample (not per-pixel) target as read, and float64
        sums of the images' values and squares per channel with the number of values per channel."""
        if self._seen is None:
            targets = {t: [] for t, task in self.tasks.items() if not task.dense}
            total = squares = 0
            values = 0
            for x, labels in self._load(list(self._chunks(256)), raw=True):
                for t in targets:
                    targets[t].append(labels[t].cpu())
                x = x.cpu()
                t_sum, s_sum = pixel_sums(x)
                total, squares, values = total + t_sum, squares + s_sum, values + x.numel() // x.shape[1]
            self._seen = {"targets": {t: torch.cat(ys) for t, ys in targets.items()},
                          "sums": (total, squares), "values": values}
        return self._seen

    def targets(self, task: str) -> torch.Tensor:
        """Every target of one task, in sample order: from the items' own ``targets(task, index)`` where they
        have one (image folders read their tables), else from ``seen``; per-pixel ones by a pass of their
        own, held as a whole (for statistics and label counts, once per run)."""
        items = getattr(self.items, "targets", None)
        if items is not None:
            y = items(task, self.index)
        elif not self.tasks[task].dense:
            y = self.seen()["targets"][task]
        else:
            y = torch.cat([labels[task].cpu() for _, labels in self._load(list(self._chunks(256)), raw=True)])
        if task in self.dropped:
            y = self.tasks[task].unlabel(y, self.dropped[task].nonzero().squeeze(1))
        return y

    def with_targets(self, task: str, y: torch.Tensor) -> "Stream":
        """Only what ``starve`` does: the samples whose label is now missing are dropped at batch time."""
        gone = ~self.tasks[task].labelled(y) & self.tasks[task].labelled(self.targets(task))
        return replace(self, dropped={**self.dropped,
                                   task: gone | self.dropped.get(task, torch.zeros(len(self), dtype=torch.bool))})

    def example(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return next(self._load([torch.tensor([0])], workers=0))

    def _chunks(self, size: int):
        return torch.arange(len(self)).split(size)

    def _load(self, position_batches: list[torch.Tensor], workers: int | None = None, raw: bool = False,
              seed: int = 0):
        """(images, {task: targets}) for each batch of positions, in order, read by ``workers`` processes;
        ``raw``: the targets as read, without ``--starve``'s removals."""
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            self.items, batch_sampler=[self.index[p].tolist() for p in position_batches],
            num_workers=self.workers if workers is None else workers, pin_memory=cuda,
            # its own generator: the loader draws its workers' seeds from it, never from the global one
            # that dropout draws from, so reading in workers leaves the run's random numbers alone
            generator=torch.Generator().manual_seed(seed))
        batches = iter(loader)
        for positions in position_batches:
            try:
                images, labels = next(batches)
            except CsnetError as e:  # from a worker, the message carries the worker's traceback: keep its last line
                raise CsnetError(_last_line(e).removeprefix("csnet.errors.CsnetError: ")) from None
            except RuntimeError as e:
                where = getattr(self.items, "where", "the data")
                line = _last_line(e).removeprefix("RuntimeError: ")[:200]
                # the default collate: in the process, or in a worker that stacks into shared memory
                if any(m in str(e) for m in ("stack expects each tensor", "storage that is not resizable")):
                    raise CsnetError(f"{where}: items {self.index[positions[0]]}..{self.index[positions[-1]]} do not "
                                     f"stack into a batch ({line}); every image and every target of a task must "
                                     "have one shape") from None
                raise CsnetError(f"{where}: reading the items failed ({line})") from None
            if not raw:
                for t, gone in self.dropped.items():
                    hit = gone[positions].nonzero().squeeze(1)
                    if len(hit):
                        labels[t] = self.tasks[t].unlabel(labels[t], hit)
            yield (images.to(self.device, non_blocking=cuda),
                   {t: labels[t].to(self.device, non_blocking=cuda) for t in self.tasks})

    def _batches(self, order, first_positions, seed: int = 0):
        if order is None:
            batches = [torch.arange(first, min(first + n, len(self))) for first, n in first_positions]
        else:
            batches = [order[first:first + n].cpu() for first, n in first_positions]
        yield from self._load(batches, seed=seed)


def _last_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


@dataclass
class Data:
    """Train / validation / test splits plus the training-set statistics the network z-scores its inputs with
    (``InputNorm``, set from ``mean`` and ``std`` when a run starts)."""

    train: Split | Stream
    val: Split | Stream
    test: Split | Stream
    mean: float | torch.Tensor  # a tensor of per-feature statistics for tables, per channel for colour
    std: float | torch.Tensor
    files: dict[str, Path]
    note: str | None = None  # how the data is held, when the source had a choice (printed by the run)

    def split(self, name: str) -> Split | Stream:
        if name not in ("train", "val", "test"):
            raise UsageError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)

    def to(self, device: torch.device) -> "Data":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731 (per-feature stats)
        return Data(self.train.to(device), self.val.to(device), self.test.to(device),
                    move(self.mean), move(self.std), self.files, self.note)

    def target_stats(self, tasks: dict[str, Task]) -> dict[str, tuple]:
        """(mean, std) of each standardized task's training targets: what its head learns around."""
        return {name: task.statistics(self.train.targets(name)) for name, task in tasks.items() if task.standardized}


def subset(split: Split | Stream, idx: torch.Tensor | None) -> Split | Stream:
    return split if idx is None else split.subset(idx)


def starve(split: Split | Stream, counts: dict[str, int], seed: int, tasks: dict[str, Task]) -> Split | Stream:
    """Keep only ``counts[task]`` labelled samples of each named task (seeded choice among the labelled
    ones); the rest become unlabelled for that task: the paper's data-starved setting."""
    for name, n in counts.items():
        if name not in tasks:
            raise UsageError(f"--starve {name}={n}: no task {name} in this run (tasks: {', '.join(tasks)})")
        y = split.targets(name)
        labelled = tasks[name].labelled(y).nonzero().squeeze(1)
        if not 0 <= n <= len(labelled):
            raise UsageError(f"--starve {name}={n}: the training set has {len(labelled)} {name} labels")
        order = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(seed))
        split = split.with_targets(name, tasks[name].unlabel(y, labelled[order[n:]]))
    return split


def holdout(n: int, cfg, default_val: int, what: str = "images"):
    """Seeded indices: validation hold-out, then the training subset of the rest."""
    val_size = default_val if cfg.val_size is None else cfg.val_size
    if not 0 < val_size < n:
        raise UsageError(f"--val-size must be between 1 and {n - 1} (the training set has {n} {what})")
    if cfg.train_size is not None and not 0 < cfg.train_size <= n - val_size:
        raise UsageError(f"--train-size must be between 1 and {n - val_size} "
                         f"({n} training {what} minus {val_size} held out for validation)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, rest = order[:val_size], order[val_size:]
    return val_idx, rest[:cfg.train_size] if cfg.train_size is not None else rest


def train_subset(n: int, cfg, what: str = "") -> torch.Tensor | None:
    """Seeded ``--train-size`` indices among ``n`` training samples, or None for all of them."""
    if cfg.train_size is None:
        return None
    if not 0 < cfg.train_size <= n:
        raise UsageError(f"--train-size must be between 1 and {n}{what}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.train_size]


def test_subset(n: int, cfg) -> torch.Tensor | None:
    if cfg.test_size is None:
        return None
    if not 0 < cfg.test_size <= n:
        raise UsageError(f"--test-size must be between 1 and {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.test_size]


def channel_stats(sums: torch.Tensor, squares: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (sample) std from float64 sums of values and of squares over ``n`` values each,
    shaped (C, 1, 1) to broadcast over (N, C, H, W) batches."""
    mean = sums / n
    var = (squares / n - mean.square()) * n / max(n - 1, 1)
    return mean.float().view(-1, 1, 1), var.clamp_min(0).sqrt().float().clamp_min(1e-6).view(-1, 1, 1)


def pixel_sums(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 sums of the values and their squares of (N, C, H, W) images; exact for uint8,
    whatever the order of the sum, so every way of reading the same images gives the same statistics."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for chunk in images.split(256):  # a float copy of 256 images at a time, not of the whole set
        c = chunk.double()
        total += c.sum((0, 2, 3))
        squares += c.square().sum((0, 2, 3))
    return total, squares


def batches(split: Split | Stream, batch_size: int, *, generator: torch.Generator | None = None,
            start: int = 0, shard: tuple[int, int] = (0, 1)):
    """Yield (float images, {task: labels}) batches; shuffled when a generator is given. The network
    z-scores its inputs itself (``InputNorm``).

    ``start`` skips that many samples of the (shuffled) order, after drawing the whole
    order, so a resumed epoch sees exactly the batches the interrupted one had left.

    ``shard=(rank, size)``: this process's share when ``size`` processes train together.
    Every rank draws the same order (same generator state) and takes every ``size``-th
    sample of it; the order is first cut to a multiple of ``size``, so all ranks take the
    same number of steps (DDP's collectives need every rank at every step).

    Images stay uint8 in memory and are converted one batch at a time, which keeps
    the resident set four times smaller than a float copy of the data set.
    """
    n = len(split)
    device = split.device
    # a streamed split's workers are seeded by the state the order is drawn from (the run's seed and the
    # epoch): a Dataset's own random transforms differ between epochs and repeat when an epoch is replayed
    seed = zlib.crc32(generator.get_state().numpy().tobytes()) if generator is not None else 0
    order = torch.randperm(n, generator=generator).to(device) if generator is not None else None
    rank, size = shard
    if size > 1:
        order = (order if order is not None else torch.arange(n, device=device))[:n // size * size][rank::size]
    count = n if order is None else len(order)
    plan = [(first, min(batch_size, count - first)) for first in range(start, count, batch_size)]
    for images, labels in split._batches(order, plan, seed):
        yield images.float(), labels


def shard_size(n: int, size: int) -> int:
    """Samples each of ``size`` ranks takes from ``n`` (see ``batches``)."""
    return n if size == 1 else n // size
