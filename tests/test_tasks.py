"""Task kinds: each metric against a naive formula, sums that add over batches, the score, and
tasks of every kind through the CLI (a CSV regression target that must be learnt)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from csnet import tasks as tasks_lib
from csnet.errors import UsageError
from csnet.models.network import ModelConfig, build_network, stitch
from csnet.train import _Tally


def result(task, out, y, chunks=1):
    """The task's metrics on (out, y), summed over ``chunks`` batches as the loop sums them."""
    tally = _Tally({"t": task}, torch.device("cpu"))
    for o, t in zip(out.chunk(chunks), y.chunk(chunks)):
        tally.add("t", *task.terms(o, t))
    return tally.result()["t"]


def test_classification_accuracy_and_macro_f1_against_a_naive_count():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(300, 4, generator=g), torch.randint(0, 4, (300,), generator=g)
    y[::10] = -1
    r = result(tasks_lib.make("t", "classification", 4), out, y, chunks=7)
    keep = y != -1
    pred, truth = out.argmax(1)[keep].numpy(), y[keep].numpy()
    f1 = []
    for c in range(4):
        tp, fp, fn = ((pred == c) & (truth == c)).sum(), ((pred == c) & (truth != c)).sum(), \
            ((pred != c) & (truth == c)).sum()
        f1.append(2 * tp / (2 * tp + fp + fn))
    assert r["accuracy"] == pytest.approx((pred == truth).mean())
    assert r["macro_f1"] == pytest.approx(np.mean(f1))
    want = torch.nn.functional.cross_entropy(out[keep], y[keep])
    assert r["loss"] == pytest.approx(want.item(), rel=1e-5)


def naive_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP = Σ (R_n − R_{n−1}) P_n over distinct thresholds, highest first (ties: one threshold)."""
    ap, tp_before, positives = 0.0, 0, labels.sum()
    for threshold in sorted(set(scores), reverse=True):
        chosen = scores >= threshold
        tp = labels[chosen].sum()
        ap += (tp - tp_before) / positives * (tp / chosen.sum())
        tp_before = tp
    return ap


def test_multilabel_mean_ap_and_accuracy_against_a_naive_ranking():
    g = torch.Generator().manual_seed(1)
    # logits on the 1/64 grid the histograms use, so their AP is exact; ties included
    out = torch.randint(-200, 200, (400, 3), generator=g).float() / 64
    y = (torch.rand(400, 3, generator=g) < torch.sigmoid(out * 2)).float()
    y[5, 1] = y[17, 0] = float("nan")  # missing labels
    r = result(tasks_lib.make("t", "multilabel", 3), out, y, chunks=3)
    aps, accs = [], []
    for k in range(3):
        keep = ~torch.isnan(y[:, k])
        aps.append(naive_ap(out[keep, k].double().numpy(), y[keep, k].double().numpy()))
        accs.append(((out[keep, k] > 0).float() == y[keep, k]).float().mean().item())
    assert r["mean_ap"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert r["accuracy"] == pytest.approx(np.mean(accs))
    keep = ~torch.isnan(y)
    want = torch.nn.functional.binary_cross_entropy_with_logits(out[keep], y[keep])
    assert r["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_regression_reports_original_units_and_learns_on_standardized_targets():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(200, 1, generator=g) * 15 + 40  # ages, say
    out = y + torch.randn(200, 1, generator=g) * 3
    y[3] = float("nan")
    task = tasks_lib.make("age", "regression", 1, stats=([40.0], [15.0]))
    r = result(task, out, y, chunks=4)
    keep = ~torch.isnan(y[:, 0])
    e = (out - y)[keep].numpy()
    truth = y[keep].numpy()
    assert r["mae"] == pytest.approx(np.abs(e).mean(), rel=1e-6)
    assert r["rmse"] == pytest.approx(np.sqrt((e ** 2).mean()), rel=1e-6)
    assert r["r2"] == pytest.approx(1 - (e ** 2).sum() / ((truth - truth.mean()) ** 2).sum(), rel=1e-6)
    assert r["loss"] == pytest.approx(((e / 15) ** 2).mean(), rel=1e-5)  # MSE in standardized units
    l1 = result(tasks_lib.make("age", "regression:l1", 1, stats=([40.0], [15.0])), out, y)
    assert l1["loss"] == pytest.approx(np.abs(e / 15).mean(), rel=1e-5)


def test_segmentation_miou_ignores_unlabelled_pixels():
    g = torch.Generator().manual_seed(3)
    out = torch.randn(6, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (6, 8, 8), generator=g).to(torch.uint8)
    y[:, :2] = 255  # unlabelled rows of pixels
    r = result(tasks_lib.make("s", "segmentation", 3), out, y, chunks=2)
    keep = y != 255
    pred, truth = out.argmax(1)[keep], y.long()[keep]
    ious = [((pred == c) & (truth == c)).sum().item() / ((pred == c) | (truth == c)).sum().item() for c in range(3)]
    assert r["miou"] == pytest.approx(np.mean(ious))
    assert r["pixel_accuracy"] == pytest.approx((pred == truth).float().mean().item())
    # what the prediction says about unlabelled pixels changes nothing
    out2 = out.clone()
    out2[:, :, :2] = torch.randn(6, 3, 2, 8)
    assert result(tasks_lib.make("s", "segmentation", 3), out2, y) == pytest.approx(r)


def test_depth_metrics_on_valid_pixels_only():
    g = torch.Generator().manual_seed(4)
    y = torch.rand(4, 8, 8, generator=g) * 6 + 2
    y[:, 0] = float("nan")
    out = (y.nan_to_num(5.0) * (1 + 0.3 * torch.randn(4, 8, 8, generator=g))).unsqueeze(1)
    out[0, 0, 3, 3] = -1.0  # a negative prediction: never within 1.25
    r = result(tasks_lib.make("d", "depth", 1, stats=([5.0], [2.0])), out, y, chunks=2)
    keep = torch.isfinite(y)
    p, t = out[:, 0][keep].double(), y[keep].double()
    assert r["abs_err"] == pytest.approx((p - t).abs().mean().item())
    assert r["rmse"] == pytest.approx((p - t).pow(2).mean().sqrt().item())
    assert r["abs_rel"] == pytest.approx(((p - t).abs() / t).mean().item())
    ratio = torch.maximum(p / t, t / p)
    assert r["delta1"] == pytest.approx(((ratio < 1.25) & (p > 0)).double().mean().item())
    assert r["loss"] == pytest.approx(((p - t).abs() / 2).mean().item(), rel=1e-5)  # L1, standardized


def test_the_score_is_the_mean_of_the_primary_metrics():
    tasks = {"c": tasks_lib.make("c", "classification", 2), "r": tasks_lib.make("r", "regression", 1, ([0.0], [1.0]))}
    tally = _Tally(tasks, torch.device("cpu"))
    tally.add("c", *tasks["c"].terms(torch.tensor([[2.0, 0], [0, 2], [2, 0], [2, 0]]), torch.tensor([0, 1, 1, 0])))
    tally.add("r", *tasks["r"].terms(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [2.0], [4.0]])))
    out = tally.result()
    assert out["c"]["accuracy"] == 0.75
    assert out["r"]["r2"] == pytest.approx(1 - 1 / (14 / 3 * 2 - 0) * 0 - 1 / ((1 + 4 + 16) - 49 / 3))
    assert out["mean"]["score"] == pytest.approx((0.75 + out["r"]["r2"]) / 2)


def test_unknown_kinds_and_losses_are_one_line():
    with pytest.raises(UsageError, match="unknown task kind 'ranking'; valid: classification, binary"):
        tasks_lib.make("t", "ranking", 3)
    with pytest.raises(UsageError, match="regression takes the loss mse or l1, not 'huber'"):
        tasks_lib.make("t", "regression:huber", 1)


# ---------------------------------------------------------------- dense columns


def test_identity_stitched_dense_columns_equal_their_columns_bit_for_bit():
    torch.manual_seed(0)
    cfg = dict(backbone="fcn", image_size=32, stitch="none")
    seg = build_network(ModelConfig(tasks=("seg",), num_classes=(5,), kinds=("segmentation",), **cfg)).eval()
    depth = build_network(ModelConfig(tasks=("depth",), num_classes=(1,), kinds=("depth",),
                                      target_stats=(((4.0,), (1.5,)),), **cfg)).eval()
    net = stitch({"seg": seg.columns["seg"], "depth": depth.columns["depth"]}, init="identity").eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = net(x)
        assert out["seg"].shape == (3, 5, 32, 32) and out["depth"].shape == (3, 1, 32, 32)
        assert torch.equal(out["seg"], seg(x)["seg"]) and torch.equal(out["depth"], depth(x)["depth"])


def test_dense_tasks_need_spatial_stages():
    with pytest.raises(UsageError, match="task seg is per-pixel .* use --backbone fcn"):
        ModelConfig(tasks=("seg",), num_classes=(3,), kinds=("segmentation",), backbone="mlp", stitch="none")


# ---------------------------------------------------------------- tables through the CLI


def test_a_csv_regression_target_is_learnt(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 5, generator=g)
    rows = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(5)])
    rows["brightness"] = (50 + 20 * x[:, 0] - 10 * x[:, 1] * x[:, 2] + 0.5 * torch.randn(1200, generator=g)).numpy()
    rows["label"] = (x[:, 3] > 0).long().numpy()
    rows.loc[::9, "brightness"] = None  # missing targets
    rows.to_csv(tmp_path / "t.csv", index=False)
    code, out, err = cli("train", "--dataset", f"csv:{tmp_path / 't.csv'}", "--tasks", "brightness,label",
                         "--stitch", "none", "--hidden", "64,64", "--epochs", "30", "--lr", "0.003",
                         "--batch-size", "64", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    assert "train: brightness (regression), label (binary) on csv:" in out  # the kinds it inferred
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    final = m[(m.split == "test") & (m.epoch == 30)].set_index(["task", "metric"]).value
    assert final[("brightness", "r2")] > 0.9, final
    assert final[("brightness", "mae")] < 5  # original units: the target spans about 50 ± 22
    assert final[("label", "mean_ap")] > 0.9
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    mean, std = config["model"]["target_stats"][0]
    assert mean[0] == pytest.approx(50, abs=2) and std[0] == pytest.approx(22, rel=0.15)
    code, out, err = cli("eval", tmp_path / "r")  # the statistics come from the run alone
    assert code == 0, err
    e = pd.read_csv(tmp_path / "r" / "eval.csv").set_index(["split", "task", "metric"]).value
    best = torch.load(tmp_path / "r" / "model.pt", weights_only=True)["epoch"]
    assert e[("test", "brightness", "r2")] == pytest.approx(
        m[(m.epoch == best) & (m.split == "test") & (m.task == "brightness") & (m.metric == "r2")].value.item(),
        abs=1e-5)


@pytest.mark.parametrize("cells,tasks,message", [
    (["nan", 1.0], "y", "column y: 'nan' is not a finite number; leave the cell empty where a row has no y target"),
    (list(range(150)), "y", "task y has 150 distinct values; as classes that is more than 100. Say what it is: "
                            "--tasks y:regression"),
    ([0, 1], "y:segmentation", "task y: a table cell holds one value, so segmentation does not apply"),
    ([0, 1], "y:ranking", "task y: unknown task kind 'ranking'"),
    (["a", "b"], "y:binary", "'a' is not 0, 1, true or false (a binary task)"),
    (["a", "b"], "y:regression", "'a' is not a finite number"),
])
def test_bad_task_columns_are_one_line_and_write_nothing(cli, tmp_path, cells, tasks, message):
    n = 300
    df = pd.DataFrame({"f": np.arange(n, dtype=float), "y": [cells[i % len(cells)] for i in range(n)]})
    df.to_csv(tmp_path / "t.csv", index=False)
    code, _, err = cli("train", "--dataset", f"csv:{tmp_path / 't.csv'}", "--tasks", tasks, "--stitch", "none",
                       "--out", tmp_path / "r")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "r").exists()


def test_many_classes_train_when_the_kind_is_given(cli, tmp_path):
    df = pd.DataFrame({"f": np.arange(300, dtype=float), "y": np.arange(300) % 150})
    df.to_csv(tmp_path / "t.csv", index=False)
    code, out, err = cli("train", "--dataset", f"csv:{tmp_path / 't.csv'}", "--tasks", "y:classification",
                         "--stitch", "none", "--quiet", "--out", tmp_path / "r")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["num_classes"] == [150]
    assert not math.isnan(pd.read_csv(tmp_path / "r" / "metrics.csv").value.iloc[0])


def test_r2_leaves_out_an_output_whose_targets_do_not_vary():
    task = tasks_lib.make("v", "regression", 2, stats=([0.0, 0.0], [1.0, 1.0]))
    y = torch.stack([torch.arange(6.0), torch.full((6,), 3.0)], 1)  # the second output is constant
    out = y + 0.5
    r = result(task, out, y)
    assert r["r2"] == pytest.approx(1 - 6 * 0.25 / 17.5)  # the first output's R² alone, not NaN


def test_torchvision_segmentation_models_stitch_as_dense_columns():
    import torchvision

    torch.manual_seed(0)
    models = [torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=c).eval()
              for c in (3, 5)]
    net = stitch({"a": models[0], "b": models[1]}, init="identity").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out["a"], models[0](x)["out"]) and torch.equal(out["b"], models[1](x)["out"])
    assert out["b"].shape == (2, 5, 32, 32) and list(net.units) == ["layer1", "layer2", "layer3", "layer4"]
