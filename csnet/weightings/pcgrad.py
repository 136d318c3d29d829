"""PCGrad (Yu et al., NeurIPS 2020): where two tasks' gradients conflict (negative inner product), each
is projected onto the normal plane of the other's, in a random task order, before they are summed.

Projection applies to the parameters at least two tasks' losses reach (in a cross-stitch network,
every column's stages up to the last unit; in hard sharing, the trunk); a task's own parameters
(its head, its column's stages after the last unit) keep its plain gradient. The order is drawn
from a generator seeded by the run's seed, and its state is saved with the training state, so a
resumed run draws the same orders.
"""

from __future__ import annotations

import torch

from csnet.settings import MAX_SEED
from csnet.weightings.base import Weighting, needs_tasks


class PCGrad(Weighting):
    name = "pcgrad"
    per_task_gradients = True

    def __init__(self, tasks, option=None, seed=0):
        super().__init__(tasks, option, seed)
        needs_tasks(self.name, tasks)
        # its own stream, apart from the batch order's generator that the run's seed also starts
        self.generator = torch.Generator().manual_seed((seed * 7919 + 104_729) % MAX_SEED)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])

    def backward(self, losses, net, present=None):
        params = [p for p in net.parameters() if p.requires_grad]
        grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses.values()]
        reached = [sum(g[k] is not None for g in grads) for k in range(len(params))]
        shared = [k for k, n in enumerate(reached) if n >= 2]
        flat = torch.stack([torch.cat([g[k].reshape(-1) if g[k] is not None else params[k].new_zeros(params[k].numel())
                                       for k in shared]) for g in grads]) if shared else None
        if flat is not None:
            flat = project(flat, self.generator)
        sizes = [params[k].numel() for k in shared]
        pieces = dict(zip(shared, flat.sum(0).split(sizes))) if flat is not None else {}
        for k, p in enumerate(params):
            own = [g[k] for g in grads if g[k] is not None]
            value = pieces[k].view(p.shape) if k in pieces else (own[0] if own else None)
            # laid out like the parameter (a channels_last conv weight): fused optimizers read both as flat memory
            p.grad = None if value is None else torch.empty_like(p).copy_(value)


def project(g: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rows of ``g`` (one per task), each projected away from the others it conflicts with, in a random
    order per task (Yu et al., Algorithm 1: against the original gradients g_j)."""
    out = g.clone()
    n = g.shape[0]
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            dot = out[i] @ g[j]
            if dot < 0:
                out[i] -= dot / (g[j] @ g[j]).clamp_min(1e-30) * g[j]
    return out
