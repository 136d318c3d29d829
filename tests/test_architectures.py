"""Architectures by name: cross-stitch, NDDR, sluice, independent, shared. Identity where the method
has one, every architecture through the CLI on the Fashion pair and the scenes, exact resume, bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from csnet.errors import UsageError
from csnet.models.network import ModelConfig, build_network, count_macs, stitch
from csnet.models.nddr import NDDRLayer
from csnet.models.sluice import SluiceUnit

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _net(arch, **kw):
    torch.manual_seed(0)
    return build_network(ModelConfig(tasks=("fine", "coarse"), num_classes=(10, 3), arch=arch,
                                     stitch="none" if arch == "independent" else "all", **kw)).eval()


def test_identity_sluice_equals_its_columns_bit_for_bit():
    net = _net("sluice", unit_init="identity")
    with torch.no_grad():
        out = net(X)
        for task in ("fine", "coarse"):
            assert torch.equal(out[task], net.columns[task](X))


def test_nddr_has_no_exact_identity_but_starts_at_its_columns_up_to_batch_norm():
    """Its batch norm (running statistics 0 and 1 at the start) divides by sqrt(1 + eps) in evaluation."""
    net = _net("nddr", unit_init="identity")
    with torch.no_grad():
        out = net(X)
        for task in ("fine", "coarse"):
            assert torch.allclose(out[task], net.columns[task](X), rtol=1e-3, atol=1e-3)


def test_nddr_layer_is_a_1x1_convolution_over_the_concatenated_columns():
    layer = NDDRLayer(2, 3, 0.9, 0.1).eval()
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        layer.weight.normal_()
    out = layer([a, b])
    cat = torch.cat([a, b], 1)
    for i in range(2):
        conv = torch.einsum("oc,nchw->nohw", layer.weight[i], cat)
        want = torch.relu(layer.norms[i](conv))
        assert torch.allclose(out[i], want, atol=1e-6)
    w = NDDRLayer(2, 3, 0.9, 0.1).mixing_weights()  # the paper's diagonal initialisation
    assert w.shape == (2, 2, 3) and torch.all(w[0, 0] == 0.9) and torch.all(w[0, 1] == 0.1)


def test_sluice_unit_mixes_subspaces_of_every_task():
    unit = SluiceUnit(2, 4, 2, 1.0, 0.0)
    with torch.no_grad():
        unit.alpha.copy_(torch.arange(16.0).view(4, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    out = unit([a, b])
    parts = [a[:, :2], a[:, 2:], b[:, :2], b[:, 2:]]  # subspaces (task, k) in order
    for i in range(4):
        want = sum(unit.alpha[i, j] * parts[j] for j in range(4))
        got = out[i // 2][:, (i % 2) * 2:(i % 2) * 2 + 2]
        assert torch.allclose(got, want, atol=1e-5)


def test_architectures_report_their_size():
    sizes = {arch: sum(p.numel() for p in _net(arch).parameters()) for arch in ("independent", "cross-stitch",
                                                                              "nddr", "sluice")}
    assert sizes["independent"] < sizes["sluice"] < sizes["cross-stitch"] < sizes["nddr"]
    macs = {arch: count_macs(_net(arch), X) for arch in ("independent", "cross-stitch", "nddr", "sluice")}
    assert macs["independent"] < macs["sluice"] and macs["cross-stitch"] < macs["nddr"]


@pytest.mark.parametrize("kw,message", [
    (dict(arch="mtan"), "unknown --arch 'mtan'; valid: cross-stitch, nddr, sluice, independent, shared"),
    (dict(arch="sluice", subspaces=3), "--subspaces 3 does not divide the 32 channels of stitch point pool1"),
    (dict(arch="nddr", unit_mode="layer"), "--unit-mode applies to --arch cross-stitch; nddr mixes per channel"),
])
def test_bad_architectures_are_one_line(kw, message):
    with pytest.raises(UsageError) as e:
        _net(**kw)
    assert message in str(e.value)


def test_nddr_needs_equal_widths():
    from torch import nn
    cols = {"a": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "b": nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))}
    with pytest.raises(UsageError, match=r"columns differ at stitch point 0: .* \(nddr needs the same width"):
        stitch(cols, mixer="nddr")


# ---------------------------------------------------------------- through the CLI

SMALL = ["--val-size", "100", "--train-size", "256", "--test-size", "100", "--batch-size", "64", "--quiet",
         "--device", "cpu"]
SCENES = ["--dataset", "fashion-scenes", "--tasks", "segment,depth", "--train-size", "64", "--val-size", "32",
          "--test-size", "32", "--batch-size", "32", "--quiet", "--device", "cpu"]
ARCHS = [["--arch", "independent"], ["--arch", "shared", "--share-until", "pool2"], ["--arch", "cross-stitch"],
         ["--arch", "nddr"], ["--arch", "sluice"]]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a[1])
def test_every_architecture_trains_the_fashion_pair_and_the_scenes(cli, data_root, tmp_path, arch):
    code, _, err = cli("train", "--data-root", data_root, *SMALL, *arch, "--out", tmp_path / "f")
    assert code == 0, err
    scene_arch = ["--arch", "shared", "--share-until", "pool3"] if arch[1] == "shared" else arch
    code, _, err = cli("train", "--data-root", data_root, *SCENES, *scene_arch, "--out", tmp_path / "s")
    assert code == 0, err
    if arch[1] in ("cross-stitch", "nddr", "sluice"):  # mixing weights, as alpha.csv and the α plots show them
        alpha = pd.read_csv(tmp_path / "f" / "alpha.csv")
        assert set(alpha.point) == {"pool1", "pool2", "fc"} and set(alpha.epoch) == {0, 1}
        assert (tmp_path / "f" / "plots" / "alpha_heatmap.png").is_file()


def test_pretrained_columns_stitch_with_nddr_and_sluice(cli, data_root, tmp_path):
    for task in ("fine", "coarse"):
        assert cli("pretrain", "--task", task, "--data-root", data_root, *SMALL, "--out", tmp_path / task)[0] == 0
    for arch in ("nddr", "sluice"):
        code, _, err = cli("stitch", tmp_path / "fine", tmp_path / "coarse", "--arch", arch, "--out",
                           tmp_path / f"st-{arch}")
        assert code == 0, err
        code, _, err = cli("train", "--from", tmp_path / f"st-{arch}", "--data-root", data_root, *SMALL,
                           "--out", tmp_path / f"tr-{arch}")
        assert code == 0, err
    code, _, err = cli("stitch", tmp_path / "fine", tmp_path / "coarse", "--arch", "sluice", "--subspaces", "5",
                       "--out", tmp_path / "bad")
    assert code == 2 and "--subspaces 5 does not divide the 32 channels of stitch point pool1" in err
    assert not (tmp_path / "bad").exists()


def test_an_architecture_without_units_refuses_stitch_points(cli, data_root, tmp_path):
    code, _, err = cli("train", "--data-root", data_root, *SMALL, "--arch", "independent", "--stitch", "all",
                       "--out", tmp_path / "r")
    assert code == 2 and "--arch independent has no units; leave --stitch out" in err


# Every weighting with cross-stitch units and every architecture with the plain sum: stopped mid-epoch by
# SIGINT and resumed, each ends with the metrics of the run that was never stopped.
METHODS = [["--weighting", w] for w in ("equal", "fixed:0=0.5", "uncertainty", "dwa", "gradnorm", "pcgrad")] + \
    [["--arch", "independent"], ["--arch", "shared", "--share-until", "SHARED"], ["--arch", "nddr"],
     ["--arch", "sluice"]]


@pytest.mark.parametrize("data", ["fashion", pytest.param("scenes", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[1].split(":")[0])
def test_every_method_resumes_exactly(cli, data_root, tmp_path, monkeypatch, method, data):
    from test_resume import resumes_exactly

    first = "fine" if data == "fashion" else "segment"
    method = [a.replace("SHARED", "pool2" if data == "fashion" else "pool3").replace("0=", f"{first}=")
              for a in method]
    if data == "fashion":  # 4 steps an epoch: stopped in epoch 3, after DWA has two epochs of history
        args, step = ["train", "--data-root", data_root, *SMALL, "--epochs", "3", *method], 10
    else:  # 2 steps an epoch: stopped in epoch 2
        args, step = ["train", "--data-root", data_root, *SCENES, "--epochs", "2", *method], 3
    resumes_exactly(cli, args, tmp_path, monkeypatch, step)
