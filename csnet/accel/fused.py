"""The faster modules ``accelerate`` swaps in. Each is a subclass of the PyTorch layer it replaces
that overrides ``forward`` only (the same parameters, buffers, state-dict keys and hooks, as
``torch.nn.utils.parametrize`` does with its modules), and falls back to that layer's own forward
wherever its kernel does not apply: CUDA, bfloat16 autocast, other layouts, a forward hook that
must see the layers run one by one, or ``off()``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules import module as _module  # the global forward-hook registries

from csnet.accel import kernels

_off: list[frozenset] = []  # inside ``off()``: the names of the kernels switched off


@contextlib.contextmanager
def off(*names: str):
    """Run the PyTorch layers instead of the named kernels (all of them without names) inside this
    block: the benchmark measures each kernel's share in one process this way."""
    _off.append(frozenset(names) if names else frozenset({"*"}))
    try:
        yield
    finally:
        _off.pop()


def _on(name: str) -> bool:
    return not any(name in s or "*" in s for s in _off)


def _autocast_on() -> bool:
    """CPU autocast would run the layers in bfloat16, which the kernels do not."""
    return torch.is_autocast_enabled("cpu")


def _hooked(modules) -> bool:
    """Whether a forward hook would see these modules run (a user reading activations): then they
    must run one by one, since a fused kernel never calls them."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules)


# ---------------------------------------------------------------- the unit (mix.c)

def unit_kernel(weight: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """CrossStitchUnit's hook: mix.c for feature maps, else None (the unit's own tensor ops). Not for
    (B, C) rows: there the tensor ops were faster (fc unit at batch 128: 0.24 against 0.29 ms a
    step with 2 tasks, 3.0 against 4.5 with 8); on maps the kernel was 1.2x (2 tasks) to 1.9x
    (8 tasks) faster."""
    if not _on("unit") or xs[0].dim() < 3 or not kernels.mix_usable(weight, xs):
        return None
    return torch.ops.csnet.mix(weight, xs)


# ---------------------------------------------------------------- conv -> batch norm -> 2x2 max-pool -> ReLU (bnpool.c)

def conv_block_pattern(block: nn.Module) -> bool:
    """An ``nn.Sequential`` of exactly Conv2d, BatchNorm2d (affine, tracking statistics), a 2x2
    stride-2 MaxPool2d and a ReLU, in that order: the Fashion column's blocks."""
    if type(block) is not nn.Sequential or len(block) != 4:
        return False
    conv, bn, pool, relu = block
    return (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
            and type(pool) is nn.MaxPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
            and not pool.return_indices and type(relu) is nn.ReLU)


def _statistics(bn: nn.BatchNorm2d, total: torch.Tensor, squares: torch.Tensor, count: int):
    """(mean, invstd) in float32 from a batch's double channel sums, and BatchNorm2d's running-statistics
    update: unbiased variance, ``momentum`` or the cumulative average when it is None."""
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        f = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
        bn.running_var.mul_(1 - f).add_((var * count / (count - 1)).to(bn.running_var.dtype), alpha=f)
    return mean.float(), torch.rsqrt(var.float() + bn.eps)


def _folded(bn: nn.BatchNorm2d, mean: torch.Tensor, invstd: torch.Tensor):
    """Batch norm as one per-channel scale and shift: y * scale + shift."""
    scale = bn.weight.detach() * invstd
    return scale, bn.bias.detach() - mean * scale


def _running(bn: nn.BatchNorm2d):
    """(mean, invstd) of the running statistics: evaluation, or a frozen norm."""
    return bn.running_mean.float(), torch.rsqrt(bn.running_var.float() + bn.eps)


class FusedConvBlock(nn.Sequential):
    """Conv -> batch norm -> 2x2 max-pool -> ReLU with the last three layers as one bnpool.c kernel on
    channels-last float32 maps on the CPU (they read and wrote the conv output about nine times
    per step as separate ops, and kept int64 pool indices). A block fed images that need no
    gradient (a column's first) runs whole, its conv included (``first-block``): the conv output
    is never stored. Same batch-norm bookkeeping as BatchNorm2d: running statistics with
    ``momentum`` or the cumulative average, ``num_batches_tracked``, eval mode, frozen norms."""

    def forward(self, x):
        conv, bn, pool, relu = self
        if not _on("conv-block") or _autocast_on() or _hooked(self[1:]):
            return super().forward(x)
        if _on("first-block") and kernels.conv_block_usable(x, conv) and not _hooked([conv]):
            return self._whole(x)
        y = conv(x)
        batch_stats = bn.training
        count = y.numel() // y.shape[1] if y.dim() == 4 and y.shape[1] else 0
        if not kernels.pooled_maps_usable(y) or count < (2 if batch_stats else 1):
            return relu(pool(bn(y)))  # what nn.Sequential does, errors included
        if batch_stats:
            mean, invstd = _statistics(bn, *torch.ops.csnet.channel_sums(y.detach()), count)
        else:
            mean, invstd = _running(bn)
        if not torch.is_grad_enabled():  # evaluation: nothing kept for a backward pass
            return torch.ops.csnet.bn_pool_relu_eval(y, *_folded(bn, mean, invstd))
        return torch.ops.csnet.bn_pool_relu(y, bn.weight, bn.bias, mean, invstd, batch_stats)[0]

    def _whole(self, x):
        conv, bn = self[0], self[1]
        if bn.training:  # sums of y = w.P and of its square, from the patch moments
            S, G = torch.ops.csnet.patch_moments(x)
            w = kernels.conv_taps(conv.weight).double()
            mean, invstd = _statistics(bn, S @ w, ((G @ w) * w).sum(0), x.shape[0] * x.shape[2] * x.shape[3])
        else:
            S = G = None
            mean, invstd = _running(bn)
        if not (torch.is_grad_enabled() and (conv.weight.requires_grad or bn.weight.requires_grad
                                             or bn.bias.requires_grad)):  # evaluation, or frozen columns
            taps = kernels.conv_taps(conv.weight)
            return torch.ops.csnet.conv_bn_pool_relu_eval(x, taps, *_folded(bn, mean, invstd))
        return torch.ops.csnet.conv_bn_pool_relu(x, conv.weight, bn.weight, bn.bias, mean, invstd, S, G)[0]


# ---------------------------------------------------------------- fc products on oneDNN

def _onednn_linear():
    """torch's oneDNN linear op (``x @ w.T + b``, the one torch.compile uses on x86) where this torch
    has it and it takes transposed views as csnet passes them, else None. A private op: probed on
    a small product, so that a torch where it changed falls back to nn.Linear instead of failing."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a, c = torch.arange(6.0).view(2, 3), torch.arange(8.0).view(2, 4)  # a.T @ c, both as views
        ok = torch.backends.mkldnn.is_available() and torch.equal(op(a.t(), c.t(), None, "none", [], ""), a.t() @ c)
        return op if ok else None
    except (AttributeError, RuntimeError, TypeError):
        return None


ONEDNN_LINEAR = _onednn_linear()
# oneDNN sets up each product anew (about 0.1 ms): a loss for the small layers measured
# (784 -> 60: 0.40 against 0.35 ms a step, 20 -> 10: 0.20 against 0.08).
ONEDNN_MIN_WEIGHTS = 1 << 20


class _OneDNNLinear(torch.autograd.Function):
    """x @ w.T + b and its three gradients as oneDNN matrix products. For the Fashion column's fc
    layer (batch 128, 3136 -> 1024) they ran at 4.0-4.2 ms each against MKL's 4.6-5.2 (float32, both
    exact to float32 rounding)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        # grad @ w and grad.T @ x, each written as a product with a (transposed, not copied) weight
        grad_x = ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "") if need_x else None
        grad_w = ONEDNN_LINEAR(grad.t(), x.t(), None, "none", [], "") if need_w else None
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose products run on oneDNN rather than MKL for CPU float32 batches of rows."""

    def forward(self, x):
        if (not _on("onednn-linear") or not torch.backends.mkldnn.enabled or x.device.type != "cpu"
                or x.dim() != 2 or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or _autocast_on() or torch.compiler.is_compiling()):
            return super().forward(x)
        return _OneDNNLinear.apply(x.contiguous(), self.weight, self.bias)
