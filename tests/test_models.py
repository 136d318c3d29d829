"""Columns and the stitched network: shapes, stitch points, and identity == the columns, bit for bit."""

import pytest
import torch

from csnet import CrossStitchNet, ModelConfig, build_network
from csnet.errors import UsageError
from csnet.models import columns


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
    ({"backbone": "resnet9"}, "unknown backbone 'resnet9'; valid: convnet, fcn, mlp, resnet18, resnet34, resnet50, vgg11"),
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
