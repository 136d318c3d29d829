"""The cross-stitch unit of Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for
Multi-task Learning", CVPR 2016 (arXiv 1604.03539), section 3.2.

For target task i, source task j and channel c the paper's unit computes
``out_i[:, c] = sum_j w[i, j, c] * x_j[:, c]``: every task gets its own row of
mixing weights (a unit that feeds the same mix to every task, or one that only
reads the diagonal, is a known defect of public implementations).

Variants found in public implementations:
- ``channel``: the paper's, one T x T matrix per channel, weights (T, T, C);
- ``layer``: one T x T matrix for the whole layer, weights (T, T);
- ``dense``: the Keras layer, one full (T*D, T*D) matrix over the concatenated
  flattened features (D = C*H*W per task). Huge: after pool1 of the Fashion
  convnet, D = 32*14*14 = 6,272 and two tasks need 157,351,936 weights.
"""

from __future__ import annotations

import math
import warnings

from typing import Callable

import torch
from torch import nn

MODES = ("channel", "layer", "dense")
INITS = ("alpha-beta", "identity", "convex", "ones")
DENSE_WARN_WEIGHTS = 10_000_000  # above this a dense unit gets a warning: ~40 MB of weights, 160 MB with Adam


def init_values(n_tasks: int, init: str, alpha: float, beta: float) -> tuple[float, float]:
    """(same-task, different-task) starting weights of an init scheme.

    ``alpha-beta``: alpha / beta as given (the paper's 0.9 / 0.1 by default);
    ``identity``: 1 / 0, every column starts alone (a TensorFlow reproduction, the Keras layer);
    ``convex``: alpha / (1 - alpha) / (T - 1), each row sums to 1 (a small PyTorch package);
    ``ones``: 1 / 1, every input becomes the SUM of all columns (two libraries), so
    activations grow with the number of tasks.
    """
    if init not in INITS:
        raise ValueError(f"unknown unit init {init!r}; valid: {', '.join(INITS)}")
    if init == "identity":
        return 1.0, 0.0
    if init == "convex":
        return alpha, (1.0 - alpha) / (n_tasks - 1)
    if init == "ones":
        warnings.warn(f"'ones' init: every unit input becomes the sum of all {n_tasks} columns, "
                      "so activations grow with the number of tasks", stacklevel=3)
        return 1.0, 1.0
    return alpha, beta


class _Mix(torch.autograd.Function):
    """``out_i = sum_j w[i, j] * x_j`` with w of shape (T, T, C) (per channel) or (T, T) (per layer).

    Written out as an autograd function because the unit's cost is memory traffic: autograd's own
    graph for the same sum (a multiply, an add and a weight-slice backward per task pair) made a
    stitched 8-task network about 25% slower than its columns alone. Here every (i, j) pair is one
    fused multiply-add in the forward pass and one in the backward, outputs are never saved (a
    following in-place ReLU may modify them), and no (T, T, B, C, ...) product is ever materialised.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, *xs: torch.Tensor):
        ctx.save_for_backward(w, *xs)
        return tuple(_mix(w, xs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        w, *xs = ctx.saved_tensors
        needs_w, needs_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1:]
        grad_w = None
        if needs_w:
            # dL/dw[i, j, c] = sum over batch and positions of g_i * x_j
            dims = [d for d in range(xs[0].dim()) if w.dim() == 2 or d != 1]
            acc = torch.promote_types(xs[0].dtype, torch.float32)  # bfloat16 under autocast sums in float32
            grad_w = torch.stack([torch.stack([(g * x).sum(dims, dtype=acc) for x in xs])
                                  for g in grads]).to(w.dtype)
        # dL/dx_j = sum_i w[i, j] * g_i: the same mix with the matrix transposed
        grad_xs = _mix(w.transpose(0, 1), grads) if any(needs_x) else [None] * len(xs)
        grad_xs = [g.to(x.dtype) if g is not None and need else None
                   for g, x, need in zip(grad_xs, xs, needs_x)]
        return (grad_w, *grad_xs)


def _mix(w: torch.Tensor, xs) -> list[torch.Tensor]:
    """``[sum_j w[i, j] * xs[j] for each i]``, one new tensor per target (in xs' memory format)."""
    shape = (-1, *([1] * (xs[0].dim() - 2))) if w.dim() == 3 else ()
    outs = []
    for i in range(w.shape[0]):
        out = xs[0] * w[i, 0].view(shape)
        for j in range(1, w.shape[1]):
            out.addcmul_(xs[j], w[i, j].view(shape))
        outs.append(out)
    return outs


class CrossStitchUnit(nn.Module):
    """Mix T tasks' activations with learned weights, initialised to ``alpha`` on the diagonal
    (same-task, alpha_S in the paper) and ``beta`` off it (different-task, alpha_D).

    ``alpha=1, beta=0`` (or ``init="identity"``) is the identity: each task's output is its
    own input, unchanged. Training leaves the weights unconstrained.

    ``channels`` is C for ``channel`` mode, ignored for ``layer`` mode, and for ``dense``
    mode the flattened feature size D per task; ``None`` there sizes the matrix at the
    first forward pass (run one before building the optimizer).
    """

    # The one hook for faster implementations (csnet.accel sets it): ``kernel(weight, xs)`` returns the
    # mixed list, computed as ``_Mix`` computes it, or None where it does not apply (then ``_Mix`` runs).
    kernel: Callable | None = None

    def __init__(self, n_tasks: int, channels: int | None = None, mode: str = "channel", alpha: float = 0.9,
                 beta: float = 0.1, init: str = "alpha-beta"):
        super().__init__()
        if n_tasks < 2:
            raise ValueError(f"a cross-stitch unit mixes at least 2 tasks, got {n_tasks}")
        if mode not in MODES:
            raise ValueError(f"unknown unit mode {mode!r}; valid: {', '.join(MODES)}")
        if mode == "channel" and not channels:
            raise ValueError("a channel-mode unit needs the number of channels")
        self.n_tasks, self.channels, self.mode = n_tasks, channels, mode
        self.same, self.other = init_values(n_tasks, init, alpha, beta)
        if mode == "dense":
            self.weight = nn.UninitializedParameter() if channels is None else nn.Parameter(self._dense_init(channels))
        else:
            diagonal = torch.eye(n_tasks, dtype=torch.bool)
            if mode == "channel":
                diagonal = diagonal.unsqueeze(-1).expand(n_tasks, n_tasks, channels)
            self.weight = nn.Parameter(torch.where(diagonal, self.same, self.other).float())

    def _dense_init(self, features: int, device=None) -> torch.Tensor:
        n = self.n_tasks * features
        if n * n > DENSE_WARN_WEIGHTS:
            warnings.warn(f"dense cross-stitch unit over {self.n_tasks} x {features:,} features has {n * n:,} "
                          f"weights ({n * n * 4 / 2**20:,.0f} MiB in float32)", stacklevel=4)
        # Same pattern as channel mode, feature by feature: W[i*D + k, j*D + k] = same or other.
        block = torch.full((self.n_tasks, self.n_tasks), self.other)
        block.fill_diagonal_(self.same)
        return torch.kron(block, torch.eye(features)).to(device)

    def forward(self, xs: list[torch.Tensor] | dict[str, torch.Tensor]):
        """Take one (B, C, ...) tensor per task, as a list or a {task: tensor} dict; return the same kind."""
        if isinstance(xs, dict):
            return dict(zip(xs, self.forward(list(xs.values()))))
        if len(xs) != self.n_tasks:
            raise ValueError(f"unit built for {self.n_tasks} tasks got {len(xs)} inputs")
        if self.mode == "dense":
            return self._dense(xs)
        if self.mode == "channel" and xs[0].shape[1] != self.channels:
            raise ValueError(f"unit built for {self.channels} channels got inputs with {xs[0].shape[1]}")
        out = self.kernel(self.weight, xs) if self.kernel is not None else None
        return list(out) if out is not None else list(_Mix.apply(self.weight, *xs))

    def _dense(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        shape = xs[0].shape
        features = math.prod(shape[1:])
        if isinstance(self.weight, nn.UninitializedParameter):
            self.channels = features
            self.weight.materialize((self.n_tasks * features,) * 2, device=xs[0].device)
            with torch.no_grad():
                self.weight.copy_(self._dense_init(features, xs[0].device))
        flat = torch.cat([x.reshape(shape[0], -1) for x in xs], dim=1)  # (B, T*D)
        mixed = flat @ self.weight.t()
        return [part.reshape(shape) for part in mixed.split(features, dim=1)]

    def mixing_weights(self) -> torch.Tensor:
        """(T, T, K) weights: per channel (channel mode), one (layer mode), or per feature, the weight
        from feature k of source j to feature k of target i (dense mode: its blocks' diagonals)."""
        w = self.weight.detach()
        if self.mode == "channel":
            return w
        if self.mode == "layer":
            return w.unsqueeze(-1)
        d = self.channels
        return torch.stack([torch.stack([w[i * d:(i + 1) * d, j * d:(j + 1) * d].diagonal()
                                         for j in range(self.n_tasks)]) for i in range(self.n_tasks)])

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, channels={self.channels}, mode={self.mode}"
