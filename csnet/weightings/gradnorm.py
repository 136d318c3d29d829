"""GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018): learned task weights w_i (starting
at 1) trained so that the norms G_i = ||∇_W w_i L_i|| at a shared layer W move towards the mean norm
times (r_i)^α, r_i the task's loss ratio L_i(t)/L_i(0) relative to the mean ratio; after each step the
weights are renormalised to sum to T. ``gradnorm`` uses α = 1.5 (the paper's NYU-v2 setting),
``gradnorm:A`` another.

W is the network's ``shared_parameters()``: in a cross-stitch network the stage before the last unit,
in every column (the last mixed layer: every task's loss reaches all of it); in hard sharing the
last shared stage. A network without one (independent columns) cannot use GradNorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from csnet.errors import UsageError
from csnet.weightings.base import Weighting, needs_tasks, number_option


class GradNorm(Weighting):
    name = "gradnorm"
    per_task_gradients = True
    takes_option = True

    def __init__(self, tasks, option=None, seed=0):
        super().__init__(tasks, option, seed)
        needs_tasks(self.name, tasks)
        self.alpha = number_option(self.name, option, 1.5, "α", positive=False)
        self.task_weight = nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial", torch.full((len(tasks),), math.nan))  # L_i(0): the first step's losses

    def check(self, net):
        if not net.shared_parameters():
            raise UsageError("--weighting gradnorm needs a layer every task reaches: units (--stitch) or "
                             "--arch shared; independent columns share none")

    def weights(self):
        return dict(zip(self.task_names, self.task_weight.detach().tolist()))

    def backward(self, losses, net, present=None):
        shared = net.shared_parameters()
        loss = torch.stack([losses[t] for t in self.task_names])
        has = torch.stack([present[t] for t in self.task_names]) if present is not None else torch.ones_like(loss)
        if bool(torch.isnan(self.initial).any()):
            self._first_losses(loss.detach(), has)
        # tasks without labels in this batch, or still without a first loss, sit this update out
        use = (has > 0) & ~torch.isnan(self.initial)
        norms = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            loss[i], shared, retain_graph=True, allow_unused=True) if g is not None]).norm()
            if bool(use[i]) else loss.new_zeros(()) for i in range(len(loss))]).detach()
        grad = torch.zeros_like(self.task_weight)
        if int(use.sum()) >= 2:
            idx = use.nonzero().squeeze(1)
            grad[idx] = gradnorm_grad(self.task_weight[idx], norms[idx], loss.detach()[idx] / self.initial[idx],
                                      self.alpha)
        self.task_weight.grad = grad
        (self.task_weight.detach() * loss).sum().backward()

    def _first_losses(self, loss: torch.Tensor, has: torch.Tensor) -> None:
        """L_i(0): each task's loss in its first batch with labels, averaged over the processes that had
        labels there (under torchrun every rank ends with the same values)."""
        from csnet import distributed

        total = torch.stack([loss * has, has])
        distributed.sum_(total)
        fresh = torch.isnan(self.initial) & (total[1] > 0)
        self.initial[fresh] = (total[0] / total[1].clamp_min(1))[fresh].to(self.initial.dtype)

    def after_step(self):
        with torch.no_grad():
            w = self.task_weight.clamp_(min=1e-6)
            w.mul_(len(w) / w.sum())


def gradnorm_grad(w: torch.Tensor, norms: torch.Tensor, ratios: torch.Tensor, alpha: float) -> torch.Tensor:
    """∂/∂w of Σ_i |w_i n_i − mean_j(w_j n_j) r_i^α| with the target held constant (Chen et al., eq. 2),
    ``norms`` n_i = ||∇_W L_i||, ``ratios`` L_i(t)/L_i(0), r_i the ratios over their mean."""
    w = w.detach().requires_grad_(True)
    g = w * norms
    target = (g.mean() * (ratios / ratios.mean()) ** alpha).detach()
    return torch.autograd.grad((g - target).abs().sum(), w)[0]
