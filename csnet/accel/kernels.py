"""The C kernels as torch custom ops (``torch.ops.csnet.*``), each with a fake (meta) implementation
and, where training runs through it, its autograd formula (``torch.library.custom_op``,
``register_fake``, ``register_autograd``; checked with ``torch.library.opcheck`` in the tests).

As custom ops they are opaque nodes to ``torch.compile``: the compiler traces the network
around them instead of stopping at a ctypes call. Each op takes CPU float32 tensors in the
layouts its ``*_usable`` check accepts; ``fused.py`` calls an op only after that check.

- ``mix`` (mix.c): the cross-stitch unit, ``out_i = sum_j w[i, j] * x_j`` per channel or per
  layer, reading each input once (tensor ops read every source once per target: T^2 passes).
- ``bn_pool_relu`` (bnpool.c): batch norm -> 2x2 max-pool -> ReLU after a conv, channels-last.
- ``conv_bn_pool_relu`` (bnpool.c): the same with the 3x3 conv before it, for a block whose input
  needs no gradient (a column's first block, fed the images): the conv output is never stored.
"""

from __future__ import annotations

import ctypes
import math

import torch

from csnet.accel.build import MAX_TASKS, lib

_P = ctypes.c_void_p
LANES = 16  # floats per vector in bnpool.c (V): its scratch rows are whole vectors
MAX_IN_CHANNELS = 3  # the first-block kernels keep four (9 x in-channels)-tap patches on the stack
MAX_WIDTH = 1024  # the first block's backward keeps a pooled row's patches on a thread's stack (220 KB at 1024)
CL = torch.channels_last


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _ptrs(ts) -> ctypes.Array:
    return (_P * len(ts))(*[t.data_ptr() for t in ts])


def _floats(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector as the contiguous float32 array the kernels read."""
    return t.detach().to(torch.float32).contiguous()


def _threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------- the cross-stitch unit (mix.c)

def layout(x: torch.Tensor) -> tuple[torch.memory_format, tuple[int, int, int]] | None:
    """(memory format, (N, C, K)) when x is a dense array mix.c can walk, else None."""
    if x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous():
        b, c, h, w = x.shape
        return CL, (b * h * w, c, 1)
    if x.dim() >= 2 and x.is_contiguous():
        return torch.contiguous_format, (x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    return None


def mix_usable(w: torch.Tensor, xs) -> bool:
    x0 = xs[0]
    return (len(xs) <= MAX_TASKS and layout(x0) is not None and w.dim() in (2, 3)
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (w, *xs))
            and all(x.shape == x0.shape and layout(x) == layout(x0) for x in xs))


def _weights(w: torch.Tensor, channels: int) -> torch.Tensor:
    """(T, T, C) contiguous weights: a per-layer (T, T) matrix repeated over the channels."""
    return (w.unsqueeze(-1).expand(*w.shape, channels) if w.dim() == 2 else w).contiguous()


@torch.library.custom_op("csnet::mix", mutates_args=())
def mix(w: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    fmt, (n, c, k) = layout(xs[0])
    outs = [torch.empty_like(xs[0], memory_format=fmt) for _ in xs]
    w3 = _weights(w.detach(), c)  # named, as every buffer whose address a kernel reads
    lib().csnet_mix_forward(len(xs), _ptrs(xs), _ptrs(outs), w3.data_ptr(), n, c, k, _threads())
    return outs


@mix.register_fake
def _(w, xs):
    return [torch.empty_like(xs[0]) for _ in xs]


@torch.library.custom_op("csnet::mix_backward", mutates_args=())
def mix_backward(w: torch.Tensor, xs: list[torch.Tensor], grads: list[torch.Tensor], need_w: bool,
                 need_x: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(grad of w, grads of xs); an empty tensor where a gradient is not needed."""
    fmt, (n, c, k) = layout(xs[0])
    grads = [g.contiguous(memory_format=fmt) for g in grads]
    grad_xs = [torch.empty_like(xs[0], memory_format=fmt) for _ in xs] if need_x else None
    grad_w = torch.empty(len(xs), len(xs), c, dtype=torch.float64) if need_w else None
    wt = _weights(w.detach(), c).transpose(0, 1).contiguous()
    threads = _threads()
    # the threads' own weight-gradient sums (double, and float for the row blocks of K = 1)
    scratch = threads * len(xs) ** 2 * c if need_w else 0
    tots, parts = torch.zeros(scratch, dtype=torch.float64), torch.zeros(scratch if k == 1 else 0, dtype=torch.float32)
    lib().csnet_mix_backward(len(xs), _ptrs(grads), _ptrs(xs), _ptrs(grad_xs) if need_x else None, _ptr(grad_w),
                             wt.data_ptr(), n, c, k, tots.data_ptr(), parts.data_ptr(), threads)
    grad_w = (grad_w.sum(-1) if w.dim() == 2 else grad_w).to(w.dtype) if need_w else w.new_empty(0)
    return grad_w, grad_xs if need_x else [x.new_empty(0) for x in xs]


@mix_backward.register_fake
def _(w, xs, grads, need_w, need_x):
    return (torch.empty_like(w) if need_w else w.new_empty(0),
            [torch.empty_like(x) if need_x else x.new_empty(0) for x in xs])


def _mix_context(ctx, inputs, output):
    w, xs = inputs
    ctx.save_for_backward(w, *xs)


def _mix_grad(ctx, grads):
    w, *xs = ctx.saved_tensors
    need_w, need_xs = ctx.needs_input_grad  # a bool for w, a list of bools for xs
    need_x = any(need_xs) if isinstance(need_xs, (list, tuple)) else bool(need_xs)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, xs)]
    grad_w, grad_xs = torch.ops.csnet.mix_backward(w, xs, grads, need_w, need_x)
    return grad_w if need_w else None, [g if need_x else None for g in grad_xs]


mix.register_autograd(_mix_grad, setup_context=_mix_context)


# ---------------------------------------------------------------- batch norm -> 2x2 max-pool -> ReLU (bnpool.c)

def pooled_maps_usable(y: torch.Tensor) -> bool:
    """CPU float32 conv output (B, C, H, W) stored channels last."""
    return (y.device.type == "cpu" and y.dtype == torch.float32 and y.dim() == 4 and min(y.shape[2:]) >= 2
            and y.is_contiguous(memory_format=CL))


def _pooled(y: torch.Tensor) -> tuple[int, ...]:
    b, c, h, w = y.shape
    return b, c, h // 2, w // 2


@torch.library.custom_op("csnet::channel_sums", mutates_args=())
def channel_sums(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares (double) of a channels-last map."""
    c, threads = y.shape[1], _threads()
    s, sq = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    parts = torch.zeros(threads * 2 * c, dtype=torch.float64)
    lib().csnet_bn_stats(y.data_ptr(), y.numel() // c, c, s.data_ptr(), sq.data_ptr(), parts.data_ptr(), threads)
    return s, sq


@channel_sums.register_fake
def _(y):
    return y.new_empty(y.shape[1], dtype=torch.float64), y.new_empty(y.shape[1], dtype=torch.float64)


def _bn_pool_relu(y, scale, shift, keep: bool):
    out = torch.empty(_pooled(y), dtype=torch.float32, memory_format=CL)
    winner = torch.empty(out.shape, dtype=torch.uint8, memory_format=CL) if keep else None
    picked = torch.empty_like(out) if keep else None
    scale, shift = _floats(scale), _floats(shift)  # named: no address the kernel reads is freed before the call
    lib().csnet_bn_pool_relu_forward(y.data_ptr(), _ptr(out), _ptr(winner), _ptr(picked), scale.data_ptr(),
                                     shift.data_ptr(), y.shape[0], y.shape[2], y.shape[3], y.shape[1], _threads())
    return out, winner, picked


@torch.library.custom_op("csnet::bn_pool_relu_eval", mutates_args=())
def bn_pool_relu_eval(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """ReLU(2x2 max-pool(y * scale + shift)) per channel, keeping nothing for a backward pass."""
    return _bn_pool_relu(y, scale, shift, keep=False)[0]


@bn_pool_relu_eval.register_fake
def _(y, scale, shift):
    return torch.empty(_pooled(y), dtype=y.dtype, device=y.device, memory_format=CL)


@torch.library.custom_op("csnet::bn_pool_relu", mutates_args=())
def bn_pool_relu(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                 invstd: torch.Tensor, batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, winner, picked): the output, each output's winning input (0..3, or 4 where the ReLU
    zeroed it) and its raw value, given batch norm's statistics (``batch_stats``: from this batch,
    so the backward pass includes their dependence on y)."""
    scale = gamma.detach() * invstd
    return _bn_pool_relu(y, scale, beta.detach() - mean * scale, keep=True)


@bn_pool_relu.register_fake
def _(y, gamma, beta, mean, invstd, batch_stats):
    shape = _pooled(y)
    return (torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=CL),
            torch.empty(shape, dtype=torch.uint8, device=y.device, memory_format=CL),
            torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=CL))


@torch.library.custom_op("csnet::bn_pool_relu_backward", mutates_args=())
def bn_pool_relu_backward(grad_out: torch.Tensor, winner: torch.Tensor, picked: torch.Tensor, y: torch.Tensor,
                          mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor,
                          batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of y, grad of gamma, grad of beta)."""
    b, c, h, w = y.shape
    grad_out = grad_out.contiguous(memory_format=CL)
    dy = torch.empty_like(y, memory_format=CL)
    dbeta, dgamma = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    mean, invstd, gamma = _floats(mean), _floats(invstd), _floats(gamma)
    threads = _threads()
    parts, coef = torch.zeros(threads * 2 * c, dtype=torch.float64), torch.empty(3 * c, dtype=torch.float32)
    lib().csnet_bn_pool_relu_backward(
        grad_out.data_ptr(), winner.data_ptr(), picked.data_ptr(), y.data_ptr(), dy.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), gamma.data_ptr(), int(batch_stats), b, h, w, c, dbeta.data_ptr(), dgamma.data_ptr(),
        parts.data_ptr(), coef.data_ptr(), threads)
    return dy, dgamma.float(), dbeta.float()


@bn_pool_relu_backward.register_fake
def _(grad_out, winner, picked, y, mean, invstd, gamma, batch_stats):
    c = y.shape[1]
    return torch.empty_like(y, memory_format=CL), y.new_empty(c), y.new_empty(c)


def _bn_context(ctx, inputs, output):
    y, gamma, beta, mean, invstd, batch_stats = inputs
    _, winner, picked = output
    ctx.save_for_backward(y, winner, picked, mean, invstd, gamma)
    ctx.batch_stats = batch_stats
    ctx.mark_non_differentiable(winner, picked)


def _bn_grad(ctx, grad_out, _winner, _picked):
    y, winner, picked, mean, invstd, gamma = ctx.saved_tensors
    dy, dgamma, dbeta = torch.ops.csnet.bn_pool_relu_backward(grad_out, winner, picked, y, mean, invstd, gamma,
                                                              ctx.batch_stats)
    return dy, dgamma, dbeta, None, None, None


bn_pool_relu.register_autograd(_bn_grad, setup_context=_bn_context)


# ---------------------------------------------------------------- the first conv block whole (bnpool.c)

def conv_fits(conv: torch.nn.Conv2d) -> bool:
    """The conv the first-block kernel computes: 3x3, stride 1, zero padding 1, no bias, at most
    ``MAX_IN_CHANNELS`` input channels."""
    return (type(conv) is torch.nn.Conv2d  # a subclass may change what its forward computes
            and conv.bias is None and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and 1 <= conv.in_channels <= MAX_IN_CHANNELS)


def conv_block_usable(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """``conv_fits``, on a CPU float32 channels-last input that needs no gradient (a column's first
    block, fed the images)."""
    w = conv.weight
    return (conv_fits(conv) and not x.requires_grad and x.device.type == w.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32 and x.dim() == 4 and x.shape[1] == conv.in_channels
            and 2 <= min(x.shape[2:]) and x.shape[3] <= MAX_WIDTH and x.shape[0] * x.shape[2] * x.shape[3] >= 2
            and x.is_contiguous(memory_format=CL))


def _pads(x: torch.Tensor, threads: int) -> torch.Tensor:
    """Each thread's zero-padded copy of one image (bnpool.c's pad_image)."""
    b, cin, h, w = x.shape
    return torch.empty(threads * cin * (h + 2) * (-(-w // LANES) * LANES + 2), dtype=torch.float32)


@torch.library.custom_op("csnet::patch_moments", mutates_args=())
def patch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, G), double: the sum over all positions of the input's 3x3 patches (zero padded, taps in
    (dh, dw, in-channel) order) and of their outer products. A conv's output y = w.P has channel
    sums w.S and sums of squares w'Gw: batch-norm statistics without the output map."""
    b, cin, h, w = x.shape
    taps, threads = 9 * cin, _threads()
    n = taps * taps + taps
    S, G = torch.empty(taps, dtype=torch.float64), torch.empty(taps, taps, dtype=torch.float64)
    pads, rows = _pads(x, threads), torch.empty(threads * n * LANES, dtype=torch.float32)
    parts = torch.zeros(threads * n, dtype=torch.float64)
    lib().csnet_patch_moments(x.data_ptr(), b, h, w, cin, S.data_ptr(), G.data_ptr(), pads.data_ptr(),
                              rows.data_ptr(), parts.data_ptr(), threads)
    return S, G


@patch_moments.register_fake
def _(x):
    taps = 9 * x.shape[1]
    return x.new_empty(taps, dtype=torch.float64), x.new_empty(taps, taps, dtype=torch.float64)


def conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, Cin, 3, 3) conv weights as the (taps, C) float32 array the kernels read."""
    return weight.detach().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).float().contiguous()


def _conv_bn_pool_relu(x, taps, scale, shift, keep: bool):
    b, cin, h, w = x.shape
    c, threads = taps.shape[1], _threads()
    out = torch.empty(b, c, h // 2, w // 2, dtype=torch.float32, memory_format=CL)
    winner = torch.empty(out.shape, dtype=torch.uint8, memory_format=CL) if keep else None
    scale, shift, pads = _floats(scale), _floats(shift), _pads(x, threads)
    lib().csnet_conv_bn_pool_relu_forward(x.data_ptr(), taps.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                                          out.data_ptr(), _ptr(winner), b, h, w, cin, c, pads.data_ptr(), threads)
    return out, winner


def _conv_pooled(x, taps):
    return x.shape[0], taps.shape[1], x.shape[2] // 2, x.shape[3] // 2


@torch.library.custom_op("csnet::conv_bn_pool_relu_eval", mutates_args=())
def conv_bn_pool_relu_eval(x: torch.Tensor, taps: torch.Tensor, scale: torch.Tensor,
                           shift: torch.Tensor) -> torch.Tensor:
    """ReLU(2x2 max-pool(conv(x) * scale + shift)); ``taps`` from ``conv_taps``."""
    return _conv_bn_pool_relu(x, taps, scale, shift, keep=False)[0]


@conv_bn_pool_relu_eval.register_fake
def _(x, taps, scale, shift):
    return torch.empty(_conv_pooled(x, taps), dtype=x.dtype, device=x.device, memory_format=CL)


@torch.library.custom_op("csnet::conv_bn_pool_relu", mutates_args=())
def conv_bn_pool_relu(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                      mean: torch.Tensor, invstd: torch.Tensor, S: torch.Tensor | None,
                      G: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, winner) of ReLU(max-pool 2x2(batch norm(conv(x)))) for an x that needs no gradient.
    S, G: the patch moments when the statistics come from this batch, None for running ones."""
    scale = gamma.detach() * invstd
    return _conv_bn_pool_relu(x, conv_taps(weight), scale, beta.detach() - mean * scale, keep=True)


@conv_bn_pool_relu.register_fake
def _(x, weight, gamma, beta, mean, invstd, S, G):
    shape = (x.shape[0], weight.shape[0], x.shape[2] // 2, x.shape[3] // 2)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=CL),
            torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=CL))


@torch.library.custom_op("csnet::conv_bn_pool_relu_sums", mutates_args=())
def conv_bn_pool_relu_sums(x: torch.Tensor, grad_out: torch.Tensor,
                           winner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, A), double: per tap and channel, the sum of dz times the winning position's patch, and per
    channel the sum of dz, where dz is the gradient at batch norm's output (grad_out where the ReLU
    let the winner through, zero elsewhere)."""
    b, cin, h, w = x.shape
    c, threads = grad_out.shape[1], _threads()
    taps = 9 * cin
    grad_out = grad_out.contiguous(memory_format=CL)
    Q, A = torch.empty(taps, c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    parts = torch.zeros(threads * (taps + 1) * c, dtype=torch.float64)
    pads = _pads(x, threads)  # named: a temporary's memory would be freed before the call reads it
    lib().csnet_conv_bn_pool_relu_backward(x.data_ptr(), grad_out.data_ptr(), winner.data_ptr(), b, h, w, cin, c,
                                           Q.data_ptr(), A.data_ptr(), parts.data_ptr(), pads.data_ptr(), threads)
    return Q, A


@conv_bn_pool_relu_sums.register_fake
def _(x, grad_out, winner):
    taps, c = 9 * x.shape[1], grad_out.shape[1]
    return x.new_empty(taps, c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)


def _conv_context(ctx, inputs, output):
    x, weight, gamma, beta, mean, invstd, S, G = inputs
    ctx.save_for_backward(x, output[1], weight, mean, invstd, gamma, S, G)
    ctx.mark_non_differentiable(output[1])


def _conv_grad(ctx, grad_out, _winner):
    """The backward pass in closed form from bnpool.c's sums. With dz the gradient at batch norm's
    output, zero but at the pooled winners, and M positions, batch norm's backward gives
    dy = gamma invstd (dz - sum(dz)/M - xhat sum(dz xhat)/M); the conv's weight gradient is
    sum(dy P) = gamma invstd (Q - S sum(dz)/M - invstd (G w - mean S) sum(dz xhat)/M), with
    Q = sum(dz P) over the winners, S and G the patch moments, and sum(dz xhat) =
    invstd (w.Q - mean sum(dz)). With running statistics (a frozen norm) only the first term stays."""
    x, winner, weight, mean, invstd, gamma, S, G = ctx.saved_tensors
    Q, A = torch.ops.csnet.conv_bn_pool_relu_sums(x, grad_out, winner)
    w, mean, invstd = conv_taps(weight).double(), mean.double(), invstd.double()
    dgamma = invstd * ((w * Q).sum(0) - mean * A)  # sum(dz xhat)
    grad_w = Q
    if S is not None:  # batch statistics: their dependence on w
        count = x.shape[0] * x.shape[2] * x.shape[3]
        grad_w = Q - S[:, None] * (A / count) - invstd * (G @ w - S[:, None] * mean) * (dgamma / count)
    grad_w = (grad_w * (gamma.double() * invstd)).float()
    c_out, c_in = weight.shape[:2]
    grad_w = grad_w.view(3, 3, c_in, c_out).permute(3, 2, 0, 1)
    return None, grad_w, dgamma.float(), A.float(), None, None, None, None


conv_bn_pool_relu.register_autograd(_conv_grad, setup_context=_conv_context)
