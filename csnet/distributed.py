"""Training on several processes with DistributedDataParallel, started by torchrun.

``torchrun --nproc-per-node N -m csnet train ...`` starts N copies of csnet; torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) tells each one its place.
Every process holds the whole in-memory data set and trains on its own shard of each
epoch's shuffled order; gradients are averaged by DDP. Only rank 0 writes the run
folder and prints, and every decision that ends a run (a bad option, a stop signal, a
NaN loss) is taken by all ranks together, so no process is left waiting in a
collective for one that has already gone.

Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from csnet.errors import CsnetError, UsageError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions, after their one-process early returns: the CLI imports this
# module to ask launched() before it knows whether the command needs torch at all (csnet --help does not).


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> World:
    """Join the process group torchrun prepared: nccl when training on CUDA, gloo on the CPU.

    On CUDA each process takes the GPU of its LOCAL_RANK, so ``--nproc-per-node`` should be
    at most the number of GPUs on a node.
    """
    global _world
    if not launched() or _world.active:
        return _world
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        # checked against the node's process count, so every process (rank 0 too) refuses alike
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if per_node > torch.cuda.device_count():
            raise UsageError(f"--nproc-per-node {per_node} wants one GPU per process, but this node has "
                             f"{torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    _world = World(rank, size, local_rank)
    return _world


def teardown() -> None:
    global _world
    if _world.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _world = World()


class Elsewhere(CsnetError):
    """Another rank failed first; rank 0 reports its message, the other ranks exit quietly."""


def together(fn, *, main_only: bool = False):
    """Run ``fn`` on every rank (or rank 0 alone with ``main_only``) and make its failure everyone's.

    A usage or data error on one rank becomes the same exit on all: the lowest failing
    rank re-raises its error (printed once, by one process), the others raise ``Elsewhere``.
    Without this a rank that failed alone would leave the others waiting in DDP's first
    collective until its timeout.
    """
    w = _world
    result, failure = None, None
    if not main_only or w.is_main:
        try:
            result = fn()
        except CsnetError as e:
            failure = e
    if not w.active:
        if failure is not None:
            raise failure
        return result
    states = gather(None if failure is None else (str(failure), failure.exit_code))
    failed = [r for r, s in enumerate(states) if s is not None]
    if failed:
        if failure is not None and w.rank == failed[0]:
            raise failure
        message, code = states[failed[0]]
        error = Elsewhere(f"rank {failed[0]}: {message}")
        error.exit_code = code
        raise error
    return result


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (a no-op on one process)."""
    if _world.active:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: a stop request must stop all ranks at the same step."""
    if not _world.active:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not _world.active:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * _world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics): after the last step each
    rank has updated them with its own batch, and evaluation should use the statistics model.pt keeps."""
    if _world.active:
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b, 0)


def average_gradients(params) -> None:
    """Average the gradients of ``params`` over ranks: for weightings that compute per-task gradients
    themselves, outside DDP's hooks (a no-op on one process). Every rank must pass the same parameters;
    one without a gradient takes part as zeros, so the collectives stay in step, and stays without one
    where no rank had one (the optimizer then leaves it alone, as on one process)."""
    if not _world.active:
        return
    params = list(params)
    if not params:
        return
    import torch
    import torch.distributed as dist

    had = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(had, op=dist.ReduceOp.SUM)
    for p, n in zip(params, had.tolist()):
        if not n:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= _world.size
