"""csnet.accel: the C kernels against the plain PyTorch layers they replace (float64 references,
every gradient, batch-norm bookkeeping), the custom ops checked by torch.library.opcheck, where
each kernel applies and where it must not, and the same numbers with or without the kernels."""

import copy
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import synthetic_images
from csnet import accel
from csnet.accel import build, fused, kernels
from csnet.models import columns
from csnet.models.network import ModelConfig, build_network, count_macs
from csnet.models.unit import CrossStitchUnit, _Mix

BUILT = build.lib() is not None
needs_kernels = pytest.mark.skipif(not BUILT, reason=build.status())
CL = torch.channels_last


@pytest.mark.skipif(not sys.platform.startswith("linux") or not build.shutil.which("cc"),
                    reason="the kernels are built with cc on Linux")
def test_the_kernels_are_built_here():
    # A compile error would otherwise pass unnoticed: every layer falls back to PyTorch.
    assert BUILT and build.status().startswith("native"), build.status()


def test_models_are_plain_pytorch():
    """What ``accelerate`` swaps in is a subclass overriding forward only: same keys, same parameters."""
    torch.manual_seed(0)
    net = build_network(ModelConfig(tasks=("fine", "coarse"), num_classes=(10, 3)))
    kinds = {type(m) for m in net.modules()}
    assert nn.Sequential in kinds and nn.Linear in kinds and not any(k.__module__.startswith("csnet.accel")
                                                                     for k in kinds)
    keys, params = list(net.state_dict()), [id(p) for p in net.parameters()]
    report = accel.accelerate(net)
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    if BUILT:
        want = {"unit": 3, "conv-block": 4, "first-block": 2, "onednn-linear": 2}
        if fused.ONEDNN_LINEAR is None:  # a torch without the op: the others still apply
            del want["onednn-linear"]
        assert report["kernels"] == want
        assert isinstance(net.columns["fine"].stages["pool1"], fused.FusedConvBlock)
    else:
        assert report["kernels"] == {} and "*" in report["not applied"]


# ---------------------------------------------------------------- the unit (mix.c)

LAYOUTS = {  # shape, memory format: (N, C, K) views the kernel walks, with channel counts and runs
    "channels_last": ((6, 32, 5, 7), CL),  # off the 16-wide vectors: K = 1, 2 full vectors
    "channels_last_odd": ((3, 17, 4, 4), CL),  # a 1-channel tail after a vector
    "nchw": ((4, 6, 5, 7), torch.contiguous_format),  # runs of 35: 2 vectors and a 3-value tail
    "nchw_flat": ((9, 1030, 1), torch.contiguous_format),  # one value per channel: several channel blocks
}


def _run_unit(w, xs, grads, fast: bool):
    unit = CrossStitchUnit(len(xs), w.shape[2] if w.dim() == 3 else None, "channel" if w.dim() == 3 else "layer")
    unit.weight = nn.Parameter(w.detach().clone())
    if fast:
        accel.accelerate(unit)
    xs = [x.detach().clone().requires_grad_() for x in xs]
    outs = unit(xs)
    torch.autograd.backward(outs, grads)
    return outs, unit.weight.grad, [x.grad for x in xs]


@needs_kernels
@pytest.mark.parametrize("n_tasks", [2, 3, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_unit_kernel_matches_float64_sums(n_tasks, layout, mode, monkeypatch):
    """Outputs, weight gradients and input gradients of the float32 kernel against the same unit in
    float64 (tensor ops), with incoming gradients in the other memory format."""
    calls = []
    original = kernels.lib
    monkeypatch.setattr(kernels, "lib", lambda: calls.append(1) or original())
    shape, fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    w = torch.randn((n_tasks, n_tasks, shape[1]) if mode == "channel" else (n_tasks, n_tasks))
    xs = [torch.randn(shape).contiguous(memory_format=fmt) for _ in range(n_tasks)]
    grads = [torch.randn(shape) for _ in range(n_tasks)]
    outs, gw, gxs = _run_unit(w, xs, grads, fast=True)
    assert len(calls) == 2  # forward and backward ran in C
    outs64, gw64, gxs64 = _run_unit(w.double(), [x.double() for x in xs], [g.double() for g in grads], fast=False)
    for got, want in zip([*outs, gw, *gxs], [*outs64, gw64, *gxs64]):
        assert got.dtype == torch.float32
        # relative to the tensor's largest value: weight gradients sum thousands of products
        assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert all(g.is_contiguous(memory_format=fmt) for g in [*outs, *gxs])


@needs_kernels
def test_unit_kernel_with_a_frozen_weight_and_stride_0_gradients(monkeypatch):
    calls = []
    original = kernels.lib
    monkeypatch.setattr(kernels, "lib", lambda: calls.append(1) or original())
    torch.manual_seed(0)
    unit = CrossStitchUnit(2, 4)
    accel.accelerate(unit)
    unit.weight.requires_grad_(False)
    frozen, trained = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2, requires_grad=True)
    grads = [torch.randn(3, 4, 2, 2), torch.ones(1, 1, 1, 1).expand(3, 4, 2, 2)]  # stride 0, as o.sum() gives
    torch.autograd.backward(unit([frozen, trained]), grads)
    w = unit.weight
    assert len(calls) == 2  # the forward and the backward kernel ran
    torch.testing.assert_close(trained.grad, w[0, 1].view(1, 4, 1, 1) * grads[0] + w[1, 1].view(1, 4, 1, 1) * grads[1])
    grad_w, _ = torch.ops.csnet.mix_backward(w, [frozen, trained], [g.contiguous() for g in grads], False, True)
    assert grad_w.numel() == 0  # a weight gradient nobody needs is not computed


def _opcheck(op, args):
    # test_aot_dispatch_dynamic compiles graphs; the other checks (schema, autograd registration,
    # fake tensors) are what lets torch.compile trace through the op
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernels
def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    xs = [torch.randn(4, 16, 6, 6).contiguous(memory_format=CL).requires_grad_() for _ in range(3)]
    w = torch.randn(3, 3, 16, requires_grad=True)
    _opcheck(torch.ops.csnet.mix.default, (w, xs))
    _opcheck(torch.ops.csnet.mix_backward.default, (w.detach(), [x.detach() for x in xs],
                                                      [torch.randn(4, 16, 6, 6) for _ in xs], True, True))
    y = torch.randn(4, 16, 6, 6).contiguous(memory_format=CL).requires_grad_()
    gamma, beta = torch.rand(16, requires_grad=True), torch.randn(16, requires_grad=True)
    mean, invstd = torch.randn(16), torch.rand(16) + 0.5
    _opcheck(torch.ops.csnet.channel_sums.default, (y.detach(),))
    _opcheck(torch.ops.csnet.bn_pool_relu.default, (y, gamma, beta, mean, invstd, True))
    _opcheck(torch.ops.csnet.bn_pool_relu_eval.default, (y.detach(), gamma.detach(), beta.detach()))
    x = torch.randn(4, 2, 6, 6).contiguous(memory_format=CL)
    weight = torch.randn(16, 2, 3, 3, requires_grad=True)
    S, G = torch.ops.csnet.patch_moments(x)
    _opcheck(torch.ops.csnet.patch_moments.default, (x,))
    _opcheck(torch.ops.csnet.conv_bn_pool_relu.default, (x, weight, gamma, beta, mean, invstd, S, G))
    _opcheck(torch.ops.csnet.conv_bn_pool_relu.default, (x, weight, gamma, beta, mean, invstd, None, None))
    out, winner, picked = torch.ops.csnet.bn_pool_relu(y.detach(), gamma.detach(), beta.detach(), mean, invstd, True)
    grad = torch.randn_like(out)
    _opcheck(torch.ops.csnet.bn_pool_relu_backward.default,
             (grad, winner, picked, y.detach(), mean, invstd, gamma.detach(), True))
    out, winner = torch.ops.csnet.conv_bn_pool_relu(x, weight.detach(), gamma.detach(), beta.detach(), mean, invstd,
                                                    S, G)
    _opcheck(torch.ops.csnet.conv_bn_pool_relu_sums.default, (x, torch.randn_like(out), winner))
    _opcheck(torch.ops.csnet.conv_bn_pool_relu_eval.default, (x, kernels.conv_taps(weight), gamma.detach(),
                                                               beta.detach()))


# ---------------------------------------------------------------- conv blocks: batch norm -> pool -> ReLU fused


def _block(c_in, c_out, momentum=0.1, fast=True):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, momentum=momentum),
                          nn.MaxPool2d(2), nn.ReLU(inplace=True))
    with torch.no_grad():  # away from the defaults, so a swapped scale and shift would show
        block[1].weight.normal_(), block[1].bias.normal_()
        block[1].running_mean.normal_(), block[1].running_var.uniform_(0.5, 2.0)
    reference = copy.deepcopy(block).double()
    if fast:
        accel.accelerate(block)
    return block, reference


@pytest.fixture
def fused_calls(monkeypatch):
    """How often a fused kernel ran: [after the conv] and [whole block] (the tests below must
    exercise the kernels, not the fallback)."""
    calls = {"after-conv": 0, "whole": 0}
    for name, key in (("_bn_pool_relu", "after-conv"), ("_conv_bn_pool_relu", "whole")):
        original = getattr(kernels, name)

        def counted(*a, _f=original, _k=key, **k):
            calls[_k] += 1
            return _f(*a, **k)
        monkeypatch.setattr(kernels, name, counted)
    return calls


@needs_kernels
@pytest.mark.parametrize("mode", ["train", "frozen-norm", "momentum-none"])
@pytest.mark.parametrize("size", [(12, 12), (13, 11)])  # odd sizes: the last row / column is pooled away
def test_fused_conv_block_matches_its_layers_in_float64(mode, size, fused_calls):
    """Output, every gradient (input, conv, batch-norm scale and shift) and the running statistics
    of the fused float32 block against the same layers run one by one in float64."""
    block, reference = _block(3, 17, momentum=None if mode == "momentum-none" else 0.1)
    block.train(mode != "frozen-norm"), reference.train(mode != "frozen-norm")
    x = torch.randn(6, 3, *size).contiguous(memory_format=CL)
    x64 = x.double().requires_grad_()
    x.requires_grad_()
    for _ in range(2):  # twice: the running statistics' update compounds
        out, want = block(x), reference(x64)
        grad = torch.randn_like(want)
        out.backward(grad.float()), want.backward(grad)
    assert fused_calls == {"after-conv": 2, "whole": 0} and out.is_contiguous(memory_format=CL)
    # Errors relative to each tensor's largest value: float32 sums over a batch (torch's own conv
    # backward among them) drift by a few 1e-5 on single large elements, and as far on the plain layers.
    for got, ref in [(out, want), (x.grad, x64.grad), *[(p.grad, q.grad) for p, q in
                                                       zip(block.parameters(), reference.parameters())]]:
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block[1], name).double(), getattr(reference[1], name).double())


@needs_kernels
@pytest.mark.parametrize("mode", ["train", "frozen-norm", "momentum-none"])
@pytest.mark.parametrize("c_in, c_out, size", [(1, 32, (12, 12)), (3, 17, (13, 11)), (2, 40, (7, 9))])
def test_whole_first_block_matches_its_layers_in_float64(mode, c_in, c_out, size, fused_calls):
    """The first block fed images (no input gradient): conv included in the kernel, batch-norm
    statistics from patch moments, the conv's weight gradient in closed form. Channel counts with and
    without a partial vector of 16, odd sizes, 1 to 3 input channels."""
    block, reference = _block(c_in, c_out, momentum=None if mode == "momentum-none" else 0.1)
    block.train(mode != "frozen-norm"), reference.train(mode != "frozen-norm")
    x = torch.randn(6, c_in, *size).contiguous(memory_format=CL) * 2 + 0.5
    for _ in range(2):
        out, want = block(x), reference(x.double())
        grad = torch.randn_like(want)
        out.backward(grad.float()), want.backward(grad)
    assert fused_calls["whole"] == 2 and out.is_contiguous(memory_format=CL)
    for got, ref in [(out, want), *[(p.grad, q.grad) for p, q in zip(block.parameters(), reference.parameters())]]:
        assert got.shape == ref.shape and (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block[1], name).double(), getattr(reference[1], name).double())
    block.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), reference(x.double()), rtol=1e-5, atol=1e-5)
    assert fused_calls["whole"] == 3


class _ScaledConv(nn.Conv2d):  # a subclass that changes what the conv computes
    def forward(self, x):
        return super().forward(x) * 2


@needs_kernels
@pytest.mark.parametrize("change", ["none", "input-grad", "bias", "no-padding", "stride-2", "4-channels", "nchw",
                                    "subclass", "autocast", "off"])
def test_whole_first_block_only_where_it_applies(change, fused_calls):
    """Anything the closed-form kernel does not cover runs the conv, then the fused layers or plain
    ones, and still computes what the layers do."""
    c_in = 4 if change == "4-channels" else 2
    make = _ScaledConv if change == "subclass" else nn.Conv2d
    conv = make(c_in, 16, 3, padding=0 if change == "no-padding" else 1, bias=change == "bias",
                stride=2 if change == "stride-2" else 1)
    block = nn.Sequential(conv, nn.BatchNorm2d(16), nn.MaxPool2d(2), nn.ReLU())
    reference = copy.deepcopy(block).double()
    accel.accelerate(block)
    x = torch.randn(2, c_in, 8, 8)
    if change != "nchw":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_(change == "input-grad")
    with torch.autocast("cpu", enabled=change == "autocast"), accel.off("first-block") if change == "off" else \
            torch.autograd.set_grad_enabled(True):
        out = block(x)
    assert fused_calls["whole"] == (change == "none")
    if change != "autocast":  # bfloat16 convs are compared elsewhere, by torch
        torch.testing.assert_close(out.double(), reference(x.double()), rtol=1e-5, atol=1e-5)


def test_a_forward_hook_on_the_conv_still_sees_it_run(fused_calls):
    # count_macs, the benchmark's FLOP count, hooks the conv: skipping it would undercount the FLOPs.
    block, _ = _block(1, 16)
    seen = []
    block[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=CL)
    block(x).sum().backward()
    assert seen == [torch.Size([2, 16, 8, 8])] and block[0].weight.grad is not None
    net = columns.convnet(10)
    accel.accelerate(net)
    assert count_macs(net, torch.zeros(1, 1, 28, 28)) == \
        28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 64 * 7 * 7 * 1024 + 1024 * 10


@needs_kernels
def test_patch_moments_are_those_of_the_unfolded_patches():
    x = torch.randn(3, 2, 9, 6).contiguous(memory_format=CL)
    S, G = torch.ops.csnet.patch_moments(x)
    # unfold's rows are (in-channel, dh, dw); the kernel's taps are (dh, dw, in-channel)
    p = nn.functional.unfold(x.double(), 3, padding=1).view(3, 2, 3, 3, -1).permute(0, 4, 2, 3, 1).reshape(-1, 18)
    torch.testing.assert_close((S, G), (p.sum(0), p.T @ p), rtol=1e-5, atol=1e-4)  # float sums within an image


@needs_kernels
def test_patch_moments_of_wide_images_keep_float32_precision():
    # 224 x 224 and far from zero mean: E[y^2] - mean^2 needs the sums' precision. Summed in float
    # over a whole image the error was 2.5e-7; flushed to double every 64 vectors, 7e-9.
    x = (torch.rand(2, 1, 224, 224) + 10).contiguous(memory_format=CL)
    S, G = torch.ops.csnet.patch_moments(x)
    p = nn.functional.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 9)
    torch.testing.assert_close((S, G), (p.sum(0), p.T @ p), rtol=5e-8, atol=0)


@needs_kernels
def test_fused_conv_block_in_evaluation_and_on_nchw_maps(fused_calls):
    block, _ = _block(2, 16)
    block.eval()
    reference = nn.Sequential(*list(block))  # the same modules, run one by one
    x = torch.randn(4, 2, 8, 8)
    x_cl = x.contiguous(memory_format=CL)
    with torch.inference_mode():
        whole = block(x_cl)  # conv included
        plain = block(x)  # NCHW: the layers in turn, not the kernel
        want = reference(x)
    with torch.no_grad():  # an input that needs a gradient: the conv, then the fused layers
        after_conv = block(x_cl.clone().requires_grad_())
    assert fused_calls == {"after-conv": 1, "whole": 1}
    for got in (whole, after_conv):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, want)
    with torch.inference_mode():  # a block left in training mode, under inference mode
        torch.testing.assert_close(block.train()(x_cl), reference.train()(x), rtol=1e-5, atol=1e-5)


def test_fused_conv_block_lets_nan_through():
    # A diverging run must still show NaN (csnet stops on it), not a ReLU's zero.
    block, _ = _block(1, 16)
    block.eval()
    x = torch.randn(2, 1, 4, 4).contiguous(memory_format=CL)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(block(x)[0]).any()


def test_a_forward_hook_on_a_fused_layer_still_sees_it_run(fused_calls):
    # Reading activations with hooks is common in analysis code; the kernel would skip them silently.
    block, _ = _block(2, 16)
    block.eval()
    seen = []
    block[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 2, 8, 8).contiguous(memory_format=CL)
    with torch.no_grad():
        out = block(x)
    assert seen == [torch.Size([2, 16, 8, 8])] and fused_calls == {"after-conv": 0, "whole": 0}
    assert out.shape == (2, 16, 4, 4)


def test_only_the_pattern_is_swapped():
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(3), nn.ReLU()),  # 3x3 pool
              nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.MaxPool2d(2), nn.ReLU()),
              nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4))]
    for block in blocks:
        accel.accelerate(block)
        assert type(block) is nn.Sequential


# ---------------------------------------------------------------- the fc layer's products on oneDNN


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    original = fused.ONEDNN_LINEAR
    if original is None:
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(fused, "ONEDNN_LINEAR", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_nn_linear_in_float64(bias, onednn_calls):
    torch.manual_seed(0)
    layer = nn.Linear(50, 30, bias=bias)
    reference = copy.deepcopy(layer).double()
    layer.__class__ = fused.OneDNNLinear  # what accelerate does to layers of 2^20 weights or more
    x = torch.randn(7, 50, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, want = layer(x), reference(x64)
    grad = torch.randn_like(want)
    out.backward(grad.float()), want.backward(grad)
    assert len(onednn_calls) == 3  # forward, input gradient, weight gradient
    for got, ref in [(out, want), (x.grad, x64.grad), *[(p.grad, q.grad) for p, q in
                                                       zip(layer.parameters(), reference.parameters())]]:
        assert got.shape == ref.shape and (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_onednn_linear_only_where_it_pays(onednn_calls, monkeypatch):
    small, big = nn.Linear(50, 30), nn.Linear(3136, 1024)
    accel.accelerate(small), accel.accelerate(big)
    assert type(small) is nn.Linear  # under 2^20 weights oneDNN's set-up costs more than it saves
    assert type(big) is fused.OneDNNLinear or not BUILT
    layer = nn.Linear(50, 30)
    layer.__class__ = fused.OneDNNLinear
    x = torch.randn(4, 50)
    layer(x)
    assert len(onednn_calls) == 1
    with monkeypatch.context() as m:  # the user turned oneDNN off
        m.setattr(torch.backends.mkldnn, "enabled", False)
        layer(x)
    with accel.off("onednn-linear"):
        layer(x)
    layer.double()(x.double())  # float64: nn.Linear
    assert len(onednn_calls) == 1


# ---------------------------------------------------------------- dropout: one mask on every path


def _splitmix_keep(seed: int, i: int, p: float) -> bool:
    """The mask's definition in Python integers: SplitMix64's output function on
    seed + (i + 1) * 2^64 / golden ratio, top 24 bits against p * 2^24."""
    m = 2 ** 64 - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) >> 40 >= round(p * 2 ** 24)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_the_dropout_mask_is_splitmix64_of_the_index(p):
    # torch's int64 products wrap and its >> copies the sign bit: the tensor ops must still give
    # the unsigned 64-bit hash, for seeds of either sign and at both ends of the range
    shape = (7, 13)
    for seed in (0, -1, 2 ** 63 - 1, -(2 ** 63), 123456789):
        keep = columns.hashed_keep(shape, p, seed).flatten().tolist()
        assert keep == [_splitmix_keep(seed, i, p) for i in range(len(keep))]


def test_the_mask_op_passes_opcheck():
    _opcheck(torch.ops.csnet.hashed_keep.default, (torch.randn(8, 40), 0.3, torch.tensor(-12345)))
    _opcheck(torch.ops.csnet.hashed_keep.default,
             (torch.randn(5, 8).t(), 0.5, torch.tensor(7)))  # a row-major mask of any input


def test_dropout_keeps_one_minus_p_scales_and_masks_the_gradient_alike():
    drop = columns.Dropout(0.2).train()
    x = torch.randn(128, 1024, requires_grad=True)
    out = drop(x)
    kept = out != 0
    n = x.numel()  # the kept count is binomial(n, 0.8): 5 standard deviations either side
    assert abs(kept.sum().item() - 0.8 * n) < 5 * (n * 0.2 * 0.8) ** 0.5
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad != 0, kept)  # the backward pass uses the same mask
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))


def test_dropout_masks_follow_torch_seed_not_the_thread_count():
    drop, x = columns.Dropout(0.5).train(), torch.randn(64, 300)
    torch.manual_seed(3)
    first, second = drop(x), drop(x)
    assert not torch.equal(first, second)  # a new mask every call
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        assert torch.equal(drop(x), first)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(drop.eval()(x), x) and torch.equal(columns.Dropout(0.0).train()(x), x)
    x[0] = float("nan")  # nn.Dropout multiplies by its mask, so NaN survives a dropped place too
    assert torch.isnan(drop.train()(x)[0]).all()


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")),
                    reason="torch.compile on the CPU (inductor) needs $CXX or g++ (clang++ on macOS)")
def test_compiled_dropout_draws_the_eager_masks(monkeypatch):
    """Under torch.compile (inductor) the seed still comes from torch's generator and the mask is still
    the hash of it: compiled and eager passes drop the same elements. Without the opaque mask op,
    inductor computed other masks for most seeds and failed to compile for some (seed -5e18)."""
    def same(got, want):
        assert torch.equal(got == 0, want == 0)  # the masks, exactly
        torch.testing.assert_close(got, want)

    torch._dynamo.reset()
    # a linear layer's outputs are never exactly 0, so each zero after dropout is the mask's
    net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), columns.Dropout(0.3)).train()
    compiled, x = torch.compile(net), torch.randn(5, 8)
    for seed in range(4):  # the seed is new data each step, not a new constant: one recompile at most
        torch.manual_seed(seed)
        got = compiled(x)
        torch.manual_seed(seed)
        same(got, net(x))
    seed = torch.tensor(-5 * 10 ** 18)
    monkeypatch.setattr(columns, "dropout_seed", torch.compiler.disable(lambda: seed))
    torch._dynamo.reset()
    same(torch.compile(net)(x), net(x))
    torch._dynamo.reset()


def test_every_step_of_a_run_computes_the_same_loss_and_gradients_with_the_kernels():
    """20 training steps of the stitched Fashion pair (Adam, the defaults); at each step the network
    with the kernels, given the same weights, batch-norm statistics, batch and dropout seed, gives
    the same loss to 1e-5 (measured: at most 3e-6) and the same gradients to 1e-2 in norm (measured:
    at most 2.8e-3, the first conv of a column).

    Gradients in norm, not element by element: where two values of a max-pool window are equal to
    float32 rounding, either path may pick the other one, which moves that element's gradient
    (against float64, PyTorch's own layers were off by 1.3e-2 of the largest element at one step,
    the kernels by 4e-4 at another). Step by step, not two runs side by side: float32 sums in
    another order differ by about 1e-7 and this network's early steps amplify any such difference;
    PyTorch's own path at 1 thread against 2 threads drifted apart by 8e-3 in loss within 20 steps
    (the kernels against PyTorch, by 3e-3)."""
    from csnet.train import TrainConfig, make_forward, make_optimizer

    torch.manual_seed(0)
    plain = build_network(ModelConfig(tasks=("fine", "coarse"), num_classes=(10, 3)))
    fast = copy.deepcopy(plain)
    report = accel.accelerate(fast)
    cfg = TrainConfig(device="cpu")
    run_plain, run_fast = make_forward(plain, cfg, torch.device("cpu")), make_forward(fast, cfg, torch.device("cpu"))
    opt = make_optimizer(plain, cfg)
    fine = torch.randint(0, 10, (20 * 64,), generator=torch.Generator().manual_seed(1))
    pixels = synthetic_images(fine, seed=1).float()  # a learnable Fashion-sized set (conftest)
    images = ((pixels - pixels.mean()) / pixels.std()).view(20, 64, 1, 28, 28)
    plain.train(), fast.train()
    worst = 0.0
    for x, y in zip(images, fine.view(20, 64)):
        fast.load_state_dict(plain.state_dict())
        seed = torch.get_rng_state()
        losses = []
        for net, forward in ((fast, run_fast), (plain, run_plain)):
            torch.set_rng_state(seed)  # the same dropout seed for both
            out = forward(x)
            loss = nn.functional.cross_entropy(out["fine"], y) + nn.functional.cross_entropy(out["coarse"], y % 3)
            net.zero_grad()
            loss.backward()
            losses.append(loss.item())
        worst = max(worst, abs(losses[0] - losses[1]) / losses[1])
        for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
            assert (p.grad - q.grad).norm() <= 1e-2 * p.grad.norm() + 1e-12, name
        opt.step()
    assert worst <= 1e-5 and (report["kernels"] or not BUILT)


def test_the_same_run_with_csnet_native_0(tmp_path):
    """A short epoch through the CLI in two processes, one with the kernels turned off."""
    from conftest import make_dataset

    root = make_dataset(tmp_path / "data")
    results = {}
    for native in ("1", "0"):
        out = tmp_path / f"native-{native}"
        done = subprocess.run([sys.executable, "-m", "csnet", "train", "--data-root", str(root), "--val-size", "100",
                               "--train-size", "400", "--batch-size", "64", "--quiet", "--out", str(out)],
                              env={**os.environ, "CSNET_NATIVE": native}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        m = pd.read_csv(out / "metrics.csv")
        results[native] = m[m.metric.isin(["accuracy", "loss"])].reset_index(drop=True)
    a, b = results["1"], results["0"]
    accuracy = a.metric == "accuracy"
    assert a[accuracy].value.tolist() == b[accuracy].value.tolist()
    assert ((a.value - b.value).abs() <= 1e-5 * b.value.abs()).all()


# ---------------------------------------------------------------- how the kernels are found


@pytest.mark.parametrize("env,expect", [({"CSNET_NATIVE": "0"}, "turned off"),
                                        ({"CC": "false"}, "false failed")])
def test_without_the_kernels_every_layer_runs_pytorch(monkeypatch, tmp_path, env, expect):
    monkeypatch.setenv("CSNET_CACHE", str(tmp_path))  # nothing cached: a broken compiler must be tried
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    build._load.cache_clear()
    try:
        assert build.status().startswith("PyTorch ops") and expect in build.status()
        unit = CrossStitchUnit(2, 3, alpha=0.9, beta=0.1)
        report = accel.accelerate(unit)
        assert report["kernels"] == {} and expect in report["not applied"]["*"] and unit.kernel is None
        out_a, out_b = unit([torch.ones(2, 3), torch.zeros(2, 3)])
        torch.testing.assert_close(out_b, torch.full((2, 3), 0.1))
    finally:
        build._load.cache_clear()


@needs_kernels
def test_the_unit_kernel_leaves_rows_to_tensor_ops(monkeypatch):
    calls = []
    original = kernels.lib
    monkeypatch.setattr(kernels, "lib", lambda: calls.append(1) or original())
    unit = CrossStitchUnit(2, 1024)
    accel.accelerate(unit)
    unit([torch.randn(128, 1024), torch.randn(128, 1024)])  # the fc unit: tensor ops were faster there
    assert calls == []


def test_kernels_switched_off_inside_off():
    # csnet bench measures each kernel's share in one process with this switch.
    unit = CrossStitchUnit(2, 3)
    accel.accelerate(unit)
    x = torch.randn(2, 3, 4, 4)
    with accel.off():
        assert fused.unit_kernel(unit.weight, [x, x]) is None
    with accel.off("conv-block"):
        assert (fused.unit_kernel(unit.weight, [x, x]) is not None) == BUILT
    torch.testing.assert_close(unit([x, x])[0], _Mix.apply(unit.weight, x, x)[0])


@needs_kernels
def test_torch_compile_traces_the_kernels_into_its_graphs():
    """--compile keeps the kernels: dynamo traces through the custom ops instead of stopping at them.
    Dropout's seed is drawn outside the graphs, so that compiled and eager runs draw it from the same
    generator."""
    torch.manual_seed(0)
    net = build_network(ModelConfig(tasks=("fine", "coarse"), num_classes=(10, 3)))
    accel.accelerate(net)
    net.to(memory_format=CL)
    explained = torch._dynamo.explain(net)(torch.randn(8, 1, 28, 28).contiguous(memory_format=CL))
    traced = {str(n.target).removesuffix(".default") for g in explained.graphs for n in g.graph.nodes
              if "csnet" in str(n.target)}
    assert {"csnet.mix", "csnet.bn_pool_relu", "csnet.conv_bn_pool_relu", "csnet.patch_moments",
            "csnet.channel_sums", "csnet.hashed_keep"} <= traced, traced
    drawn = {str(n.target) for g in explained.graphs for n in g.graph.nodes if "rand" in str(n.target)}
    assert not drawn, drawn  # dropout's seeds come from torch's generator, outside the graphs


@needs_kernels
def test_the_kernels_do_not_depend_on_the_default_dtype():
    # their scratch and outputs are float32 whatever torch.set_default_dtype says
    y = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    want = torch.ops.csnet.bn_pool_relu_eval(y, scale, shift)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = torch.ops.csnet.bn_pool_relu_eval(y, scale, shift)
    finally:
        torch.set_default_dtype(before)
    assert got.dtype == torch.float32 and torch.equal(got, want)
