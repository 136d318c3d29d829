"""Any backbone, any number of tasks, every unit variant, checked against independent computations."""

import json
import textwrap
import warnings

import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from csnet import CrossStitchUnit, as_column, stitch
from csnet.errors import CsnetError, UsageError
from csnet.models.backbones import load_weights

# ---------------------------------------------------------------- the unit, all modes


def naive_layer(w, xs):
    T = w.shape[0]
    return [sum(w[i, j] * xs[j] for j in range(T)) for i in range(T)]


def naive_dense(W, xs):
    """out_i[k] = sum_j sum_l W[i*D + k, j*D + l] * x_j[l], one feature at a time."""
    B, D, T = xs[0].shape[0], xs[0][0].numel(), len(xs)
    flat = [x.reshape(B, D) for x in xs]
    outs = []
    for i in range(T):
        out = torch.zeros(B, D, dtype=torch.float64)
        for k in range(D):
            for j in range(T):
                for l in range(D):
                    out[:, k] += W[i * D + k, j * D + l].double() * flat[j][:, l].double()
        outs.append(out.float().reshape(xs[0].shape))
    return outs


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_layer_mode_matches_the_formula(n_tasks):
    torch.manual_seed(0)
    unit = CrossStitchUnit(n_tasks, 5, mode="layer")
    assert unit.weight.shape == (n_tasks, n_tasks)
    with torch.no_grad():
        unit.weight.copy_(torch.randn_like(unit.weight))
    xs = [torch.randn(3, 5, 2, 2) for _ in range(n_tasks)]
    for got, want in zip(unit(xs), naive_layer(unit.weight.detach(), xs)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_dense_mode_matches_the_formula(n_tasks):
    torch.manual_seed(0)
    unit = CrossStitchUnit(n_tasks, mode="dense")
    xs = [torch.randn(2, 3, 2, 2) for _ in range(n_tasks)]
    unit(xs)  # sizes the matrix: D = 12
    assert unit.weight.shape == (n_tasks * 12, n_tasks * 12)
    with torch.no_grad():
        unit.weight.copy_(torch.randn_like(unit.weight))
    for got, want in zip(unit(xs), naive_dense(unit.weight.detach(), xs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["channel", "layer", "dense"])
def test_every_mode_starts_as_the_same_mix(mode):
    # alpha/beta mean the same thing in every mode: out_i = alpha * x_i + beta * x_j at init
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = CrossStitchUnit(2, None if mode == "dense" else 4, mode=mode, alpha=0.8, beta=0.3)([a, b])
    torch.testing.assert_close(out[0], 0.8 * a + 0.3 * b)
    torch.testing.assert_close(out[1], 0.3 * a + 0.8 * b)


def test_init_schemes():
    w = CrossStitchUnit(3, 2, init="convex", alpha=0.7).weight.detach()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, 2))
    assert w[0, 0, 0] == pytest.approx(0.7) and w[0, 1, 0] == pytest.approx(0.15)
    assert torch.equal(CrossStitchUnit(3, 2, init="identity").weight.detach(),
                       torch.eye(3).unsqueeze(-1).expand(3, 3, 2))
    with pytest.warns(UserWarning, match="sum of all 4 columns"):
        ones = CrossStitchUnit(4, 2, init="ones")
    assert torch.all(ones.weight == 1)


def test_a_large_dense_unit_warns_with_its_size():
    with pytest.warns(UserWarning, match=r"157,351,936 weights"):
        CrossStitchUnit(2, 32 * 14 * 14, mode="dense")  # after pool1 of the Fashion convnet (CONTEXT.md)


# ---------------------------------------------------------------- ResNet against a hand-written walk


def resnet_walk(models, units, x):
    """stem -> layer1..4, a unit after each stage written out by hand -> each column's own head."""
    hs = [m.maxpool(m.relu(m.bn1(m.conv1(x)))) for m in models]
    for k in range(1, 5):
        hs = [getattr(m, f"layer{k}")(h) for m, h in zip(models, hs)]
        W = units[f"layer{k}"]
        hs = [sum(W[i, j][None, :, None, None] * hs[j] for j in range(len(hs))) for i in range(len(hs))]
    return [m.fc(torch.flatten(m.avgpool(h), 1)) for m, h in zip(models, hs)]


def _resnets(n, num_classes=(10, 3, 5)):
    torch.manual_seed(0)
    return [torchvision.models.resnet18(num_classes=c).eval() for c in num_classes[:n]]


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_stitched_resnet18_matches_a_hand_written_walk(n_tasks):
    models = _resnets(n_tasks)
    assert not torch.equal(models[0].conv1.weight, models[1].conv1.weight)
    net = stitch({f"t{i}": m for i, m in enumerate(models)}).eval()
    assert list(net.units) == ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        for unit in net.units.values():
            unit.weight.copy_(torch.rand_like(unit.weight))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = net(x)
        want = resnet_walk(models, {p: u.weight for p, u in net.units.items()}, x)
    for i, w in enumerate(want):
        torch.testing.assert_close(got[f"t{i}"], w, rtol=1e-4, atol=1e-5)
    assert [o.shape[1] for o in got.values()] == [10, 3, 5][:n_tasks]


def _vggs():
    torch.manual_seed(0)
    return [torchvision.models.vgg11(num_classes=c).eval() for c in (10, 3)]


def _convnets():
    from csnet.models.columns import convnet
    torch.manual_seed(0)
    return [convnet(10).eval(), convnet(3).eval()]


def _mlps():
    from csnet.models.columns import mlp
    torch.manual_seed(0)
    return [mlp(10).eval(), mlp(3).eval()]


def _sequentials():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, c)).eval() for c in (10, 3)]


@pytest.mark.parametrize("make,shape", [(_resnets, (2, 3, 64, 64)), (_vggs, (2, 3, 32, 32)),
                                        (_convnets, (2, 1, 28, 28)), (_mlps, (2, 1, 28, 28)),
                                        (_sequentials, (2, 1, 28, 28))])
@pytest.mark.parametrize("how", [{"alpha": 1.0, "beta": 0.0}, {"init": "identity"}])
def test_identity_stitch_equals_each_column_bit_for_bit(make, shape, how):
    models = make(2) if make is _resnets else make()
    torch.manual_seed(1)
    x = torch.randn(shape)
    with torch.no_grad():
        alone = [m(x) for m in models]
        out = stitch({"a": models[0], "b": models[1]}, **how).eval()(x)
    assert torch.equal(out["a"], alone[0]) and torch.equal(out["b"], alone[1])


def test_vgg_is_cut_at_its_pools():
    col = as_column(torchvision.models.vgg11(num_classes=10))
    assert list(col.stages) == ["pool1", "pool2", "pool3", "pool4", "pool5"]
    assert [col.channels[p] for p in col.stages] == [64, 128, 256, 512, 512]
    assert all(isinstance(s[-1], nn.MaxPool2d) for s in col.stages.values())


def test_points_subset_and_features():
    net = stitch({"a": _resnets(2)[0], "b": _resnets(2)[1]}, points=["layer2", "layer4"]).eval()
    assert list(net.units) == ["layer2", "layer4"]
    feats = net.features(torch.randn(2, 3, 32, 32))
    assert feats["a"].shape == (2, 512, 1, 1)
    with pytest.raises(UsageError, match="unknown stitch point.*layer9; valid: stem, layer1"):
        stitch({"a": _resnets(2)[0], "b": _resnets(2)[1]}, points=["layer9"])


@pytest.mark.parametrize("mode", ["channel", "layer", "dense"])
def test_gradients_reach_every_unit_weight(mode):
    torch.manual_seed(0)
    # tanh, not ReLU: a dead ReLU would legitimately zero some weights' gradients
    cols = {t: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))
            for t in ("a", "b", "c")}
    net = stitch(cols, mode=mode, points=["0", "2"])
    x = torch.randn(2, 1, 8, 8)
    net.materialize(x)
    out = net(x)
    sum(o.pow(2).sum() for o in out.values()).backward()
    for name, unit in net.units.items():
        g = unit.weight.grad
        assert g is not None and torch.count_nonzero(g) == g.numel(), (name, mode)


def test_stitch_refuses_columns_that_disagree():
    with pytest.raises(UsageError, match="stages"):
        stitch({"a": _resnets(1)[0], "b": torchvision.models.vgg11()})
    wide = torchvision.models.resnet50(num_classes=3)
    with pytest.raises(UsageError, match="columns differ at stitch point layer1"):
        stitch({"a": _resnets(1)[0], "b": wide})


def test_parameter_counts_of_a_two_task_resnet18():
    torch.manual_seed(0)
    counts = {}
    for mode in ("channel", "layer", "dense"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = stitch({"a": torchvision.models.resnet18(num_classes=10),
                          "b": torchvision.models.resnet18(num_classes=3)}, mode=mode)
            net.materialize(torch.zeros(1, 3, 28, 28))
        counts[mode] = sum(p.numel() for p in net.unit_parameters())
    assert counts["channel"] == 2 * 2 * (64 + 128 + 256 + 512)
    assert counts["layer"] == 4 * 4
    # at 28x28 input: layer1..4 give 64x7x7, 128x4x4, 256x2x2, 512x1x1 features per task
    assert counts["dense"] == sum((2 * d) ** 2 for d in (64 * 49, 128 * 16, 256 * 4, 512))


# ---------------------------------------------------------------- weights files


def test_load_weights_skips_the_mismatched_head_and_refuses_pickles(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pt")
    target = torchvision.models.resnet18(num_classes=10)
    skipped = load_weights(target, tmp_path / "imagenet.pt")
    assert skipped == ["fc.bias", "fc.weight"]
    assert torch.equal(target.layer3[0].conv1.weight, source.layer3[0].conv1.weight)

    class Payload:
        def __reduce__(self):
            return (print, ("payload executed",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CsnetError, match="refused or unreadable"):
        load_weights(target, tmp_path / "evil.pt")


# ---------------------------------------------------------------- through the CLI

QUICK = ["--val-size", "64", "--train-size", "64", "--test-size", "32", "--batch-size", "32", "--quiet"]


def _trained(cli, data_root, out, *args):
    code, _, err = cli("train", "--data-root", data_root, *QUICK, "--out", out, *args)
    assert code == 0, err
    m = pd.read_csv(out / "metrics.csv")
    assert m[m.metric == "accuracy"].value.between(0, 1).all()
    return m


@pytest.mark.parametrize("backbone", ["resnet18", "mlp"])
def test_backbones_train_one_short_epoch(cli, data_root, tmp_path, backbone):
    _trained(cli, data_root, tmp_path / backbone, "--backbone", backbone)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet34", "resnet50", "vgg11", "vgg16", "vgg16_bn"])
def test_large_backbones_train_one_short_epoch(cli, data_root, tmp_path, backbone):
    _trained(cli, data_root, tmp_path / backbone, "--backbone", backbone)


def test_three_tasks_end_to_end(cli, data_root, tmp_path):
    m = _trained(cli, data_root, tmp_path / "three", "--tasks", "fine,coarse,body", "--backbone", "mlp")
    assert set(m.task) >= {"fine", "coarse", "body", "mean"}
    unit = torch.load(tmp_path / "three" / "model.pt", weights_only=True, map_location="cpu")["model"]["units.hidden1.weight"]
    assert unit.shape == (3, 3, 60)


@pytest.mark.parametrize("mode", ["layer", "dense"])
def test_unit_modes_through_the_cli(cli, data_root, tmp_path, mode):
    _trained(cli, data_root, tmp_path / mode, "--backbone", "mlp", "--unit-mode", mode, "--stitch-lr-mult", "10")
    state = torch.load(tmp_path / mode / "model.pt", weights_only=True, map_location="cpu")["model"]
    assert state["units.hidden1.weight"].shape == ((2, 2) if mode == "layer" else (120, 120))
    assert cli("eval", tmp_path / mode, "--data-root", data_root)[0] == 0


def test_custom_column_from_module_function_end_to_end(cli, data_root, tmp_path, monkeypatch):
    (tmp_path / "my_columns.py").write_text(textwrap.dedent("""
        from collections import OrderedDict
        from torch import nn

        def tiny(num_classes, in_channels):
            net = nn.Sequential(OrderedDict(
                conv=nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
                hidden=nn.Sequential(nn.Flatten(), nn.Linear(8 * 14 * 14, 32), nn.ReLU()),
                head=nn.Linear(32, num_classes),
            ))
            return net, ["conv", "hidden"]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _trained(cli, data_root, tmp_path / "custom", "--backbone", "my_columns:tiny", "--alpha", "1", "--beta", "0")
    state = torch.load(tmp_path / "custom" / "model.pt", weights_only=True, map_location="cpu")["model"]
    assert state["units.conv.weight"].shape == (2, 2, 8) and state["units.hidden.weight"].shape == (2, 2, 32)
    code, _, err = cli("eval", tmp_path / "custom", "--data-root", data_root)
    assert code == 2 and "--backbone my_columns:tiny" in err  # a run folder never imports code by itself
    assert cli("eval", tmp_path / "custom", "--data-root", data_root, "--backbone", "my_columns:tiny")[0] == 0
    code, _, err = cli("train", "--data-root", data_root, "--backbone", "my_columns:nothing")
    assert code == 2 and "my_columns has no nothing" in err


def test_freeze_columns_trains_only_the_units(cli, data_root, tmp_path):
    _trained(cli, data_root, tmp_path / "base", "--backbone", "mlp", "--stitch", "none", "--tasks", "fine")
    _trained(cli, data_root, tmp_path / "base2", "--backbone", "mlp", "--stitch", "none", "--tasks", "coarse")
    assert cli("stitch", tmp_path / "base", tmp_path / "base2", "--out", tmp_path / "st")[0] == 0
    _trained(cli, data_root, tmp_path / "frozen", "--from", tmp_path / "st", "--freeze-columns",
                 "--stitch-lr-mult", "100", "--keep-last")  # last.pt: the final weights
    before = torch.load(tmp_path / "st" / "model.pt", weights_only=True, map_location="cpu")["model"]
    after = torch.load(tmp_path / "frozen" / "last.pt", weights_only=True, map_location="cpu")["model"]
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same == (not key.startswith("units.")), key


def test_weights_for_a_torchvision_backbone(cli, data_root, tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    _trained(cli, data_root, tmp_path / "r", "--backbone", "resnet18", "--weights", tmp_path / "r18.pt",
             "--freeze-columns", "--train-heads", "--batch-norm", "--keep-last")
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True, map_location="cpu")["model"]
    assert torch.equal(state["columns.fine.stages.layer2.0.conv1.weight"], source.layer2[0].conv1.weight)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["weights"]["path"] == str(tmp_path / "r18.pt") and len(config["weights"]["sha256"]) == 64
    assert cli("train", "--config", tmp_path / "r" / "config.json", "--epochs", "1", "--out", tmp_path / "again")[0] == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text())["weights"] == config["weights"]
    code, _, err = cli("train", "--data-root", data_root, "--weights", tmp_path / "r18.pt")
    assert code == 2 and "--weights applies to torchvision backbones" in err
