"""Columns and the stitched network: shapes, stitch points, and identity == the columns, bit for bit."""

import pytest
import torch

from csnet import CrossStitchNet, ModelConfig, build_network
from csnet.errors import UsageError
from csnet.models import columns
from csnet.models.network import count_macs


def _config(**kw):
    return ModelConfig(**{"tasks": ("fine", "coarse"), "num_classes": (10, 3), **kw})


@pytest.mark.parametrize("backbone", ["convnet", "mlp"])
def test_identity_stitched_network_equals_its_columns_exactly(backbone):
    torch.manual_seed(0)
    make = columns.convnet if backbone == "convnet" else columns.mlp
    cols = {"fine": make(10), "coarse": make(3)}  # different random weights per column
    for c in cols.values():
        c.eval()
    points = ["pool1", "pool2", "fc"] if backbone == "convnet" else ["hidden1", "hidden2"]
    net = CrossStitchNet({t: c for t, c in cols.items()}, points, alpha=1.0, beta=0.0).eval()
    x = torch.randn(8, 1, 28, 28)
    out = net(x)
    for task, column in cols.items():
        assert torch.equal(out[task], column(x)), task


def test_default_init_mixes_the_columns():
    torch.manual_seed(0)
    net = build_network(_config(stitch="all")).eval()
    x = torch.randn(4, 1, 28, 28)
    alone = net.columns["fine"](x)
    assert not torch.allclose(net(x)["fine"], alone)


@pytest.mark.parametrize("stitch,points", [("none", []), ("after-pool", ["pool1", "pool2"]),
                                           ("after-fc", ["fc"]), ("all", ["pool1", "pool2", "fc"])])
def test_convnet_stitch_points(stitch, points):
    net = build_network(_config(stitch=stitch))
    assert list(net.units) == points
    channels = {"pool1": 32, "pool2": 64, "fc": 1024}
    for p, unit in net.units.items():
        assert unit.weight.shape == (2, 2, channels[p])


def test_mlp_units_after_every_hidden_layer():
    net = build_network(_config(backbone="mlp", stitch="all", hidden=(30, 20, 10)))
    assert list(net.units) == ["hidden1", "hidden2", "hidden3"]
    out = net(torch.randn(5, 1, 28, 28))
    assert out["fine"].shape == (5, 10) and out["coarse"].shape == (5, 3)


def test_three_tasks():
    net = build_network(ModelConfig(tasks=("a", "b", "c"), num_classes=(10, 3, 2), stitch="all"))
    out = net(torch.randn(2, 1, 28, 28))
    assert {t: o.shape[1] for t, o in out.items()} == {"a": 10, "b": 3, "c": 2}
    assert net.units["pool1"].weight.shape == (3, 3, 32)


def test_gradients_reach_every_unit_weight_through_the_network():
    torch.manual_seed(0)
    net = build_network(_config(stitch="all"))
    out = net(torch.randn(4, 1, 28, 28))
    (out["fine"].logsumexp(1).sum() + out["coarse"].logsumexp(1).sum()).backward()
    for name, unit in net.units.items():
        g = unit.weight.grad
        assert g is not None and torch.count_nonzero(g[0, 1]) > 0 and torch.count_nonzero(g[1, 0]) > 0, name


@pytest.mark.parametrize("kw,message", [
    ({"backbone": "resnet9"}, "unknown backbone 'resnet9'; valid: convnet, mlp, resnet18, resnet34, resnet50, vgg11"),
    ({"stitch": "middle"}, "unknown stitch point(s) middle for convnet; valid: none, all, after-pool, after-fc, "
                           "or stage names pool1, pool2, fc"),
    ({"backbone": "mlp", "stitch": "after-pool"}, "valid: none, after-fc, all"),
    ({"unit_mode": "diagonal"}, "unknown --unit-mode 'diagonal'; valid: channel, layer, dense"),
])
def test_bad_model_settings_name_the_valid_ones(kw, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_network(_config(**kw))


def test_units_need_two_tasks():
    with pytest.raises(UsageError, match="at least two tasks"):
        ModelConfig(tasks=("fine",), num_classes=(10,), stitch="all")


def test_config_round_trip_and_unknown_keys():
    cfg = _config(stitch="after-fc", alpha=0.8, beta=0.2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsageError, match="unknown model setting"):
        ModelConfig.from_dict({**cfg.to_dict(), "width": 3})


# ---------------------------------------------------------------- conv blocks: batch norm -> pool -> ReLU fused

from torch import nn  # noqa: E402

from csnet.models import native  # noqa: E402


def _block(c_in, c_out, momentum=0.1):
    torch.manual_seed(0)
    block = columns.ConvBlock(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, momentum=momentum),
                              nn.MaxPool2d(2), nn.ReLU(inplace=True))
    with torch.no_grad():  # away from the defaults, so a swapped scale and shift would show
        block[1].weight.normal_(), block[1].bias.normal_()
        block[1].running_mean.normal_(), block[1].running_var.uniform_(0.5, 2.0)
    return block


@pytest.fixture
def fused_calls(monkeypatch):
    """How often the fused kernel ran (the tests below must exercise it, not the fallback)."""
    calls = []
    for name in ("bn_pool_relu", "conv_bn_pool_relu"):  # the block after its conv, or the whole block
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("mode", ["train", "frozen-norm", "momentum-none"])
@pytest.mark.parametrize("size", [(12, 12), (13, 11)])  # odd sizes: the last row / column is pooled away
def test_fused_conv_block_matches_its_layers_in_float64(mode, size, fused_calls):
    """Output, every gradient (input, conv, batch-norm scale and shift) and the running statistics
    of the fused float32 block against the same layers run one by one in float64."""
    block = _block(3, 17, momentum=None if mode == "momentum-none" else 0.1)
    reference = nn.Sequential(*[m for m in __import__("copy").deepcopy(block)]).double()
    block.train(mode != "frozen-norm"), reference.train(mode != "frozen-norm")
    x = torch.randn(6, 3, *size).contiguous(memory_format=torch.channels_last)
    x64 = x.double().requires_grad_()
    x.requires_grad_()
    for _ in range(2):  # twice: the running statistics' update compounds
        out, want = block(x), reference(x64)
        grad = torch.randn_like(want)
        out.backward(grad.float()), want.backward(grad)
    if not native.pooled_maps_usable(torch.empty(1, 1, 2, 2).contiguous(memory_format=torch.channels_last)):
        pytest.skip(native.status())
    assert len(fused_calls) == 2
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Errors relative to each tensor's largest value: float32 sums over a batch (torch's own conv
    # backward among them) drift by a few 1e-5 on single large elements, and as far on the plain layers.
    for got, ref in [(out, want), (x.grad, x64.grad), *[(p.grad, q.grad) for p, q in
                                                       zip(block.parameters(), reference.parameters())]]:
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block[1], name).double(), getattr(reference[1], name).double())


@pytest.mark.parametrize("mode", ["train", "frozen-norm", "momentum-none"])
@pytest.mark.parametrize("c_in, c_out, size", [(1, 32, (12, 12)), (3, 17, (13, 11)), (2, 40, (7, 9))])
def test_whole_first_block_matches_its_layers_in_float64(mode, c_in, c_out, size, monkeypatch):
    """The first block fed images (no input gradient): conv included in the kernel, batch-norm
    statistics from patch moments, the conv's weight gradient in closed form. Channel counts with and
    without a partial vector of 16, odd sizes, 1 to 3 input channels."""
    calls = []
    original = native.conv_bn_pool_relu
    monkeypatch.setattr(native, "conv_bn_pool_relu", lambda *a, **k: calls.append(1) or original(*a, **k))
    block = _block(c_in, c_out, momentum=None if mode == "momentum-none" else 0.1)
    reference = nn.Sequential(*[m for m in __import__("copy").deepcopy(block)]).double()
    block.train(mode != "frozen-norm"), reference.train(mode != "frozen-norm")
    x = torch.randn(6, c_in, *size).contiguous(memory_format=torch.channels_last) * 2 + 0.5
    for _ in range(2):
        out, want = block(x), reference(x.double())
        grad = torch.randn_like(want)
        out.backward(grad.float()), want.backward(grad)
    if not native.pooled_maps_usable(torch.empty(1, 1, 2, 2).contiguous(memory_format=torch.channels_last)):
        pytest.skip(native.status())
    assert len(calls) == 2 and out.is_contiguous(memory_format=torch.channels_last)
    for got, ref in [(out, want), *[(p.grad, q.grad) for p, q in zip(block.parameters(), reference.parameters())]]:
        assert got.shape == ref.shape and (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(block[1], name).double(), getattr(reference[1], name).double())
    block.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), reference(x.double()), rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


class _ScaledConv(nn.Conv2d):  # a subclass that changes what the conv computes
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("change", ["none", "input-grad", "bias", "no-padding", "stride-2", "4-channels", "nchw",
                                    "subclass", "autocast"])
def test_whole_first_block_only_where_it_applies(change, monkeypatch):
    """Anything the closed-form kernel does not cover runs the conv, then the fused layers or plain
    ones, and still computes what the layers do."""
    if native._load()[0] is None:
        pytest.skip(native.status())
    calls = []
    original = native.conv_bn_pool_relu
    monkeypatch.setattr(native, "conv_bn_pool_relu", lambda *a, **k: calls.append(1) or original(*a, **k))
    c_in = 4 if change == "4-channels" else 2
    make = _ScaledConv if change == "subclass" else nn.Conv2d
    conv = make(c_in, 16, 3, padding=0 if change == "no-padding" else 1, bias=change == "bias",
                stride=2 if change == "stride-2" else 1)
    block = columns.ConvBlock(conv, nn.BatchNorm2d(16), nn.MaxPool2d(2), nn.ReLU())
    reference = __import__("copy").deepcopy(nn.Sequential(*block)).double()
    x = torch.randn(2, c_in, 8, 8)
    if change != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(change == "input-grad")
    with torch.autocast("cpu", enabled=change == "autocast"):
        out = block(x)
    assert len(calls) == (change == "none")
    if change != "autocast":  # bfloat16 convs are compared elsewhere, by torch
        torch.testing.assert_close(out.double(), reference(x.double()), rtol=1e-5, atol=1e-5)


def test_a_forward_hook_on_the_conv_still_sees_it_run(fused_calls):
    # count_macs, the benchmark's FLOP count, hooks the conv: skipping it would undercount the FLOPs.
    block = _block(1, 16)
    seen = []
    block[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    block(x).sum().backward()
    assert seen == [torch.Size([2, 16, 8, 8])] and block[0].weight.grad is not None
    assert count_macs(columns.convnet(10), torch.zeros(1, 1, 28, 28)) == \
        28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 64 * 7 * 7 * 1024 + 1024 * 10


def test_patch_moments_are_those_of_the_unfolded_patches_and_follow_the_input():
    if native._load()[0] is None:
        pytest.skip(native.status())
    x = torch.randn(3, 2, 9, 6).contiguous(memory_format=torch.channels_last)
    S, G = native.patch_moments(x)

    def want(x):  # unfold's rows are (in-channel, dh, dw); the kernel's taps are (dh, dw, in-channel)
        p = nn.functional.unfold(x.double(), 3, padding=1).view(3, 2, 3, 3, -1).permute(0, 4, 2, 3, 1).reshape(-1, 18)
        return p.sum(0), p.T @ p

    torch.testing.assert_close((S, G), want(x), rtol=1e-5, atol=1e-4)  # float sums within an image
    assert native.patch_moments(x)[0] is not S  # outside a network's forward: nothing is kept
    with native.shared_moments():  # inside: the second column's call reuses the first's
        S, G = native.patch_moments(x)
        assert native.patch_moments(x)[0] is S
        assert native.patch_moments(x.clone())[0] is not S
    x.data.add_(1.0)  # a refill the version counter does not see: the next forward must not reuse
    with native.shared_moments():
        torch.testing.assert_close(native.patch_moments(x), want(x), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(native._load()[0] is None, reason=native.status())
def test_patch_moments_of_wide_images_keep_float32_precision():
    # 224 x 224 and far from zero mean: E[y^2] - mean^2 needs the sums' precision. Summed in float
    # over a whole image the error was 2.5e-7; flushed to double every 64 vectors, 7e-9.
    x = (torch.rand(2, 1, 224, 224) + 10).contiguous(memory_format=torch.channels_last)
    S, G = native.patch_moments(x)
    p = nn.functional.unfold(x.double(), 3, padding=1).transpose(1, 2).reshape(-1, 9)
    torch.testing.assert_close((S, G), (p.sum(0), p.T @ p), rtol=5e-8, atol=0)


def test_fused_conv_block_in_evaluation_and_on_nchw_maps(fused_calls):
    block = _block(2, 16).eval()
    reference = nn.Sequential(*list(block))  # the same modules, run one by one
    x = torch.randn(4, 2, 8, 8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        whole = block(x_cl)  # conv included
        plain = block(x)  # NCHW: the layers in turn, not the kernel
        want = reference(x)
    with torch.no_grad():  # an input that needs a gradient: the conv, then the fused layers
        after_conv = block(x_cl.clone().requires_grad_())
    assert len(fused_calls) == (2 if native.pooled_maps_usable(whole.new_empty(1, 1, 2, 2).contiguous(
        memory_format=torch.channels_last)) else 0)
    for got in (whole, after_conv):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, want)
    with torch.inference_mode():  # a block left in training mode, under inference mode
        torch.testing.assert_close(block.train()(x_cl), reference.train()(x), rtol=1e-5, atol=1e-5)


def test_fused_conv_block_lets_nan_through():
    # A diverging run must still show NaN (csnet stops on it), not a ReLU's zero.
    block = _block(1, 16).eval()
    x = torch.randn(2, 1, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(block(x)[0]).any()


def test_convnet_state_dict_keys_are_those_of_plain_layers():
    # Checkpoints written before the conv blocks were fused load unchanged.
    keys = set(columns.convnet(10).state_dict())
    assert {"stages.pool1.0.weight", "stages.pool1.1.running_var", "stages.pool2.1.num_batches_tracked"} <= keys


def test_a_forward_hook_on_a_fused_layer_still_sees_it_run(fused_calls):
    # Reading activations with hooks is common in analysis code; the kernel would skip them silently.
    block = _block(2, 16).eval()
    seen = []
    block[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 2, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
    assert seen == [torch.Size([2, 16, 8, 8])] and fused_calls == []
    assert out.shape == (2, 16, 4, 4)


# ---------------------------------------------------------------- the fc layer's products on oneDNN


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    original = columns._ONEDNN_LINEAR
    if original is None:
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(columns, "_ONEDNN_LINEAR", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(columns.Linear, "ONEDNN_MIN_WEIGHTS", 1)
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_nn_linear_in_float64(bias, onednn_calls):
    torch.manual_seed(0)
    layer = columns.Linear(50, 30, bias=bias)
    reference = nn.Linear(50, 30, bias=bias).double()
    reference.load_state_dict(layer.state_dict())  # same keys: checkpoints load either way
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
    layer = columns.Linear(50, 30)
    x = torch.randn(4, 50)
    layer(x.double().float())
    assert len(onednn_calls) == 1
    with monkeypatch.context() as m:  # the user turned oneDNN off
        m.setattr(torch.backends.mkldnn, "enabled", False)
        assert not torch.backends.mkldnn.enabled
        layer(x)
    assert torch.backends.mkldnn.enabled
    layer.double()(x.double())  # float64: nn.Linear
    monkeypatch.setattr(columns.Linear, "ONEDNN_MIN_WEIGHTS", 1 << 20)
    columns.Linear(50, 30)(x)  # small layer: nn.Linear
    assert len(onednn_calls) == 1
    fc = columns.convnet(10).stages["fc"][1]
    assert isinstance(fc, columns.Linear) and fc.weight.numel() >= columns.Linear.ONEDNN_MIN_WEIGHTS
    monkeypatch.setattr(columns, "_ONEDNN_LINEAR", None)  # a torch without the op (or where its probe failed)
    torch.testing.assert_close(fc(torch.ones(2, 3136)), nn.functional.linear(torch.ones(2, 3136), fc.weight, fc.bias))


# ---------------------------------------------------------------- dropout (dropout.c)


@pytest.mark.skipif(native._load()[0] is None, reason=native.status())
def test_dropout_keeps_one_minus_p_scales_and_masks_the_gradient_alike():
    drop = columns.Dropout(0.2).train()
    x = torch.randn(128, 1024, requires_grad=True)
    out = drop(x)
    kept = out != 0
    n = x.numel()  # the kept count is binomial(n, 0.8): 5 standard deviations either side
    assert abs(kept.sum().item() - 0.8 * n) < 5 * (n * 0.2 * 0.8) ** 0.5
    torch.testing.assert_close(out[kept], x[kept] / 0.8)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad != 0, kept)  # the backward pass recomputes the same mask
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))


@pytest.mark.skipif(native._load()[0] is None, reason=native.status())
def test_dropout_masks_follow_torch_seed_not_the_thread_count(monkeypatch):
    drop, x = columns.Dropout(0.5).train(), torch.randn(64, 300)
    torch.manual_seed(3)
    first, second = drop(x), drop(x)
    assert not torch.equal(first, second)  # a new mask every call
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    torch.manual_seed(3)
    assert torch.equal(drop(x), first)
    x[0] = float("nan")  # nn.Dropout multiplies by its mask, so NaN survives a dropped place too
    assert torch.isnan(drop(x)[0]).all()


def test_dropout_is_nn_dropout_elsewhere():
    x = torch.randn(32, 40)
    drop = columns.Dropout(0.3)
    assert torch.equal(drop.eval()(x), x) and torch.equal(columns.Dropout(0.0).train()(x), x)
    drop.train()
    with native.off():  # the PyTorch path draws nn.Dropout's masks
        torch.manual_seed(1)
        got = drop(x)
    torch.manual_seed(1)
    assert torch.equal(got, nn.Dropout(0.3).train()(x))
    assert isinstance(columns.convnet(10).head[0], columns.Dropout)
