"""Single-task columns cut into named stages, so cross-stitch units can go between them.

``convnet`` is the Fashion-MNIST column of the TensorFlow reproduction in CONTEXT.md
(conv3x3 32 -> pool -> conv3x3 64 -> pool -> fc 1024 -> output, batch norm, dropout
with keep probability 0.8, He init). ``mlp`` is the column of the two-domain
notebook ([60, 20] hidden units, then the output layer).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module  # the global forward-hook registries

from csnet.models import native


class Column(nn.Module):
    """A network for one task: ``stages`` run in order, then ``head`` maps the last one to logits.

    ``channels[name]`` is the number of channels (conv) or features (fc) a stage
    outputs: what a cross-stitch unit placed after it has to mix.
    """

    def __init__(self, stages: dict[str, nn.Module], head: nn.Module, channels: dict[str, int]):
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.head = head
        self.channels = dict(channels)

    def forward(self, x):
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


class _BNPoolReLU(torch.autograd.Function):
    """ReLU(max-pool 2x2(batch norm(y))) given the statistics, in bnpool.c's single passes."""

    @staticmethod
    def forward(ctx, y, gamma, beta, mean, invstd, batch_stats: bool):
        scale = gamma * invstd
        out, winner, picked = native.bn_pool_relu(y, scale, beta - mean * scale, keep=True)
        ctx.save_for_backward(y, winner, picked, mean, invstd, gamma)
        ctx.batch_stats = batch_stats
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, winner, picked, mean, invstd, gamma = ctx.saved_tensors
        dy, dgamma, dbeta = native.bn_pool_relu_backward(grad_out, winner, picked, y, mean, invstd, gamma,
                                                         ctx.batch_stats)
        return dy, dgamma, dbeta, None, None, None


def _hooked(modules) -> bool:
    """Whether a forward hook would see these modules run (a user reading activations): then they
    must run one by one, since a fused kernel never calls them."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules)


class ConvBlock(nn.Sequential):
    """Conv -> batch norm -> 2x2 max-pool -> ReLU (the Fashion column's conv blocks), an
    ``nn.Sequential`` whose last three layers run as one compiled kernel (bnpool.c) on
    channels-last float32 maps on the CPU: they were 17 of the 92 ms of a training step of the
    Fashion pair. A first block, fed images that need no gradient, runs whole, its conv included
    (``_whole``; not with a forward hook on the conv). Anywhere else (CUDA, NCHW, bfloat16, no C
    compiler, a forward hook on one of the three) it runs its layers in turn. Same modules and
    state-dict keys either way, and the same batch-norm bookkeeping (running statistics with
    ``momentum``, ``num_batches_tracked``, eval mode)."""

    def _fused(self) -> bool:
        if len(self) != 4 or _hooked(self[1:]):
            return False
        conv, bn, pool, relu = self
        return (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats
                and isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2))
                and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1))
                and not pool.ceil_mode and not pool.return_indices and isinstance(relu, nn.ReLU))

    def forward(self, x):
        if not self._fused():
            return super().forward(x)
        conv, bn = self[0], self[1]
        if native.conv_block_usable(x, conv) and x.shape[0] * x.shape[2] * x.shape[3] >= 2 and not _hooked([conv]):
            return self._whole(x)
        y = conv(x)
        batch_stats = bn.training
        count = y.numel() // y.shape[1] if y.dim() == 4 and y.shape[1] else 0
        if not native.pooled_maps_usable(y) or count < (2 if batch_stats else 1):
            return self[3](self[2](bn(y)))  # what nn.Sequential does, errors included
        mean, invstd = _statistics(bn, *native.channel_sums(y), count) if batch_stats else _running(bn)
        if not torch.is_grad_enabled():  # evaluation: nothing kept for a backward pass
            scale = bn.weight.detach() * invstd
            return native.bn_pool_relu(y, scale, bn.bias.detach() - mean * scale, keep=False)[0]
        return _BNPoolReLU.apply(y, bn.weight, bn.bias, mean, invstd, batch_stats)

    def _whole(self, x):
        """The block as one kernel, conv included (bnpool.c's first-block kernels): for an input that
        needs no gradient, the conv output is never stored."""
        conv, bn = self[0], self[1]
        taps = native.conv_taps(conv.weight)
        S, G = native.patch_moments(x) if bn.training else (None, None)
        if bn.training:  # sums of y = w.P and of its square, from the patch moments
            w = taps.double()
            mean, invstd = _statistics(bn, S @ w, ((G @ w) * w).sum(0), x.shape[0] * x.shape[2] * x.shape[3])
        else:
            mean, invstd = _running(bn)
        if not (torch.is_grad_enabled() and (conv.weight.requires_grad or bn.weight.requires_grad
                                             or bn.bias.requires_grad)):  # evaluation, or frozen columns
            scale = bn.weight.detach() * invstd
            return native.conv_bn_pool_relu(x, taps, scale, bn.bias.detach() - mean * scale, keep=False)[0]
        return _ConvBNPoolReLU.apply(x, conv.weight, bn.weight, bn.bias, taps, mean, invstd, S, G)


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


def _running(bn: nn.BatchNorm2d):
    """(mean, invstd) of the running statistics: evaluation, or a frozen norm."""
    return bn.running_mean.float(), torch.rsqrt(bn.running_var.float() + bn.eps)


class _ConvBNPoolReLU(torch.autograd.Function):
    """ReLU(max-pool 2x2(batch norm(conv(x)))) for an x that needs no gradient, with its backward pass
    in closed form from bnpool.c's sums. With dz the gradient at batch norm's output, zero but at the
    pooled winners, and M positions, batch norm's backward gives
    dy = gamma invstd (dz - sum(dz)/M - xhat sum(dz xhat)/M); the conv's weight gradient is
    sum(dy P) = gamma invstd (Q - S sum(dz)/M - invstd (G w - mean S) sum(dz xhat)/M), with
    Q = sum(dz P) over the winners, S and G the patch moments, and sum(dz xhat) =
    invstd (w.Q - mean sum(dz)). With running statistics (a frozen norm) only the first term stays."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, taps, mean, invstd, S, G):
        scale = gamma * invstd
        out, winner = native.conv_bn_pool_relu(x, taps, scale, beta - mean * scale, keep=True)
        ctx.save_for_backward(x, winner, taps, mean, invstd, gamma, S, G)
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, winner, taps, mean, invstd, gamma, S, G = ctx.saved_tensors
        Q, A = native.conv_bn_pool_relu_sums(x, grad_out, winner)
        w, mean, invstd = taps.double(), mean.double(), invstd.double()
        dgamma = invstd * ((w * Q).sum(0) - mean * A)  # sum(dz xhat)
        grad_w = Q
        if S is not None:  # batch statistics: their dependence on w
            count = x.shape[0] * x.shape[2] * x.shape[3]
            grad_w = Q - S[:, None] * (A / count) - invstd * (G @ w - S[:, None] * mean) * (dgamma / count)
        grad_w = (grad_w * (gamma.double() * invstd)).float()
        c_out, c_in = ctx.weight_shape[:2]
        grad_w = grad_w.view(3, 3, c_in, c_out).permute(3, 2, 0, 1)
        return None, grad_w, dgamma.float(), A.float(), None, None, None, None, None


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


_ONEDNN_LINEAR = _onednn_linear()


class _OneDNNLinear(torch.autograd.Function):
    """x @ w.T + b and its three gradients as oneDNN matrix products. For the Fashion column's fc
    layer (batch 128, 3136 -> 1024) they ran at 4.0-4.2 ms each against MKL's 4.6-5.2 (float32, both
    exact to float32 rounding): about 4 of the 78 ms of a training step of the pair."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        # grad @ w and grad.T @ x, each written as a product with a (transposed, not copied) weight
        grad_x = _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "") if need_x else None
        grad_w = _ONEDNN_LINEAR(grad.t(), x.t(), None, "none", [], "") if need_w else None
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose products run on oneDNN, not MKL,
    for CPU float32 batches of rows through a layer of at least ``ONEDNN_MIN_WEIGHTS`` weights;
    anywhere else (smaller layers, CUDA, autocast, torch.compile, a torch without oneDNN) it is
    ``nn.Linear``."""

    # oneDNN sets up each product anew (about 0.1 ms): a loss for the small layers measured
    # (784 -> 60: 0.40 against 0.35 ms a step, 20 -> 10: 0.20 against 0.08).
    ONEDNN_MIN_WEIGHTS = 1 << 20

    def forward(self, x):
        if (_ONEDNN_LINEAR is None or not torch.backends.mkldnn.enabled
                or self.weight.numel() < self.ONEDNN_MIN_WEIGHTS or x.device.type != "cpu" or x.dim() != 2
                or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or native._autocast_on() or native._compiling()):
            return super().forward(x)
        return _OneDNNLinear.apply(x.contiguous(), self.weight, self.bias)


class _Dropout(torch.autograd.Function):
    """x * mask / (1 - p) with dropout.c's mask for ``seed``; the gradient gets the same mask."""

    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return native.dropout(x, p, seed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return native.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU float32 training pass runs in dropout.c: the mask is hashed from a
    seed drawn from torch's generator, not drawn with ``bernoulli_`` (1.1 ms against about 0.05
    for the Fashion column's (128, 1024) activations). Each value is kept with probability 1 - p
    and scaled by 1 / (1 - p), as in ``nn.Dropout``; the same seed gives the same masks, not those
    ``nn.Dropout`` draws. Anywhere else (CUDA, evaluation, in-place, no compiler) it is ``nn.Dropout``."""

    def forward(self, x):
        if self.training and 0 < self.p < 1 and not self.inplace and native.dropout_usable(x):
            return _Dropout.apply(x, self.p, native.dropout_seed())
        return super().forward(x)


def _he_init(column: Column) -> None:
    """He init (fan-in, ReLU gain) for every layer that feeds a ReLU; Glorot for the output layer,
    which feeds a softmax: with He's gain there, first logits are large and early steps are wasted."""
    for m in column.stages.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in column.head.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def convnet(
    num_classes: int,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    batch_norm: bool = True,
    dropout: float = 0.2,
    widths: tuple[int, int] = (32, 64),
    fc_width: int = 1024,
) -> Column:
    """Stages ``pool1``, ``pool2`` and ``fc``: the three places the reproduction stitches."""

    def conv_block(c_in: int, c_out: int) -> ConvBlock:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        # Pool before ReLU: max-pooling commutes with the (monotone) ReLU, so the output is the same
        # and the ReLU touches a quarter of the values; on the CPU this was the stage's costliest part.
        layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
        return ConvBlock(*layers)

    side = image_size // 4
    column = Column(
        stages={
            "pool1": conv_block(in_channels, widths[0]),
            "pool2": conv_block(widths[0], widths[1]),
            "fc": nn.Sequential(nn.Flatten(), Linear(widths[1] * side * side, fc_width), nn.ReLU(inplace=True)),
        },
        head=nn.Sequential(Dropout(dropout), nn.Linear(fc_width, num_classes)),
        channels={"pool1": widths[0], "pool2": widths[1], "fc": fc_width},
    )
    _he_init(column)
    return column


def mlp(
    num_classes: int,
    *,
    in_features: int = 784,
    hidden: tuple[int, ...] = (60, 20),
    dropout: float = 0.0,
) -> Column:
    """Stages ``hidden1``, ``hidden2``, ...: one per hidden layer (Linear -> ReLU)."""
    stages, channels = {}, {}
    width = in_features
    for k, h in enumerate(hidden, start=1):
        layers = [nn.Flatten()] if k == 1 else []
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        stages[f"hidden{k}"] = nn.Sequential(*layers)
        channels[f"hidden{k}"] = h
        width = h
    column = Column(stages, nn.Sequential(Dropout(dropout), nn.Linear(width, num_classes)), channels)
    _he_init(column)
    return column
