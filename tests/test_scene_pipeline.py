"""The dense benchmark end to end: fashion-scenes (segment, depth, presence, count) through pretrain,
stitch, train --from, eval, compare, resume and torchrun, on small real IDX files."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import make_dataset, synthetic_images, write_idx
from csnet import data as data_lib
from test_resume import resumes_exactly

SCENES = ["--dataset", "fashion-scenes", "--train-size", "96", "--val-size", "32", "--test-size", "48",
          "--batch-size", "32", "--quiet", "--device", "cpu"]
METRICS = {"segment": {"loss", "miou", "pixel_accuracy"}, "depth": {"loss", "abs_err", "rmse", "abs_rel", "delta1"},
           "presence": {"loss", "accuracy", "mean_ap"}, "count": {"loss", "mae", "rmse", "r2"},
           "mean": {"loss", "score"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from csnet.cli import main

    root = make_dataset(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("scenes")
    common = ["--data-root", str(root), *SCENES]
    for task in ("segment", "depth"):
        assert main(["pretrain", "--task", task, *common, "--epochs", "2", "--out", str(out / task)]) == 0
    assert main(["stitch", str(out / "segment"), str(out / "depth"), "--unit-init", "identity",
                 "--out", str(out / "stitched")]) == 0
    assert main(["train", "--from", str(out / "stitched"), *common, "--out", str(out / "from")]) == 0
    assert main(["train", *common, "--epochs", "2", "--out", str(out / "all")]) == 0
    return root, out


def test_every_task_writes_its_own_metrics(runs):
    _, out = runs
    m = pd.read_csv(out / "all" / "metrics.csv")
    for split in ("train", "val", "test"):
        rows = m[(m.split == split) & ~m.task.isin(["all", "total"]) & (m.metric != "loss_weight")]
        got = {t: set(g.metric) for t, g in rows.groupby("task")}
        assert got == METRICS, split
    v = m.set_index(["epoch", "split", "task", "metric"]).value
    for metric in ("miou", "pixel_accuracy"):
        assert 0 <= v[(2, "test", "segment", metric)] <= 1
    assert v[(2, "test", "depth", "abs_err")] > 0 and 0 <= v[(2, "test", "depth", "delta1")] <= 1
    assert v[(2, "train", "mean", "loss")] < v[(1, "train", "mean", "loss")]
    config = json.loads((out / "all" / "config.json").read_text())
    assert config["model"]["kinds"] == ["segmentation", "depth", "multilabel", "regression"]
    assert config["model"]["backbone"] == "fcn" and config["tasks"]["depth"]["primary"] == "delta1"
    assert config["tasks"]["depth"]["metrics"]["abs_err"] == "lower"


def test_eval_of_an_identity_stitch_equals_its_dense_columns(runs, cli):
    root, out = runs
    for run in ("segment", "depth", "stitched"):
        code, _, err = cli("eval", out / run, "--data-root", root)
        assert code == 0, err
    stitched = pd.read_csv(out / "stitched" / "eval.csv").set_index(["task", "metric"]).value
    for task in ("segment", "depth"):
        alone = pd.read_csv(out / task / "eval.csv").set_index(["task", "metric"]).value
        for metric in METRICS[task]:
            assert stitched[(task, metric)] == alone[(task, metric)], (task, metric)


def test_eval_reproduces_the_best_epoch(runs, cli):
    root, out = runs
    code, stdout, err = cli("eval", out / "all", "--data-root", root)
    assert code == 0, err
    assert "miou" in stdout and "abs_rel" in stdout
    m = pd.read_csv(out / "all" / "metrics.csv")
    best = torch.load(out / "all" / "model.pt", weights_only=True)["epoch"]
    want = m[(m.epoch == best) & (m.split == "test")].set_index(["task", "metric"]).value
    got = pd.read_csv(out / "all" / "eval.csv").set_index(["task", "metric"]).value
    for key in [("segment", "miou"), ("depth", "abs_err"), ("count", "mae"), ("mean", "score")]:
        assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_compare_uses_the_primary_metrics_and_delta_m_against_the_references(runs, cli, tmp_path):
    _, out = runs
    code, stdout, err = cli("compare", out / "all", out / "from", "--reference", out / "segment",
                            "--reference", out / "depth", "--out", tmp_path / "cmp")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv").set_index("run")
    assert "segment miou" in stdout and "depth delta1" in stdout
    refs = {t: pd.read_csv(out / t / "metrics.csv") for t in ("segment", "depth")}

    def at_best(m, task, metric):
        val = m[(m.split == "val") & (m.task == "mean") & (m.metric == "score")].set_index("epoch").value
        return m[(m.epoch == val.idxmax()) & (m.split == "test") & (m.task == task) & (m.metric == metric)].value.item()

    m = pd.read_csv(out / "from" / "metrics.csv")
    seg = (at_best(m, "segment", "miou") / at_best(refs["segment"], "segment", "miou") - 1
           + at_best(m, "segment", "pixel_accuracy") / at_best(refs["segment"], "segment", "pixel_accuracy") - 1) / 2
    depth = -(at_best(m, "depth", "abs_err") / at_best(refs["depth"], "depth", "abs_err") - 1
              + at_best(m, "depth", "abs_rel") / at_best(refs["depth"], "depth", "abs_rel") - 1) / 2
    assert table.loc["from", "delta_m [%]"] == pytest.approx(100 * (seg + depth) / 2, rel=1e-4)
    assert table.loc["from", "depth:abs_err [depth units]"] == pytest.approx(at_best(m, "depth", "abs_err"), rel=1e-5)
    assert table.loc["from", "segment:miou [%]"] == pytest.approx(100 * at_best(m, "segment", "miou"), rel=1e-5)
    assert table.loc["from", "depth:abs_rel"] == pytest.approx(at_best(m, "depth", "abs_rel"), rel=1e-5)  # a ratio


def test_a_dense_run_resumes_exactly(runs, cli, tmp_path, monkeypatch):
    root, _ = runs
    args = ["train", "--data-root", root, *SCENES, "--tasks", "segment,count", "--epochs", "2"]
    resumes_exactly(cli, args, tmp_path, monkeypatch, 4)  # epoch 2, step 1 of 3


def test_torchrun_trains_a_dense_run(runs, tmp_path):
    root, _ = runs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "csnet",
           "train", "--data-root", str(root), *SCENES, "--tasks", "segment,depth", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = pd.read_csv(tmp_path / "ddp" / "metrics.csv").set_index(["split", "task", "metric"]).value
    assert 0 <= m[("test", "segment", "miou")] <= 1 and m[("test", "depth", "abs_err")] > 0


@pytest.mark.parametrize("args,message", [
    (["--tasks", "segment:regression"], "task segment of fashion-scenes is a segmentation task; it cannot be "
                                        "trained as regression"),
    (["--backbone", "mlp"], "task segment is per-pixel (segmentation), and --backbone mlp has no spatial stages"),
    (["--backbone", "convnet"], "use --backbone fcn"),
    (["--tasks", "segment,colour"], "unknown task 'colour' for fashion-scenes; valid: segment, depth, presence, count"),
    (["--select", "depth:miou"], "--select depth:miou: a depth task has the metrics abs_err, rmse, abs_rel, delta1"),
])
def test_bad_dense_settings_are_one_line_and_write_nothing(runs, cli, tmp_path, args, message):
    root, _ = runs
    code, _, err = cli("train", "--data-root", root, *SCENES, *args, "--out", tmp_path / "r")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "r").exists()


def test_scenes_come_from_their_own_split_of_images(tmp_path):
    """Training images hold classes 0-4 only, test images 5-9 only: each split's scenes show only its classes."""
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for part, classes in (("train", range(0, 5)), ("t10k", range(5, 10))):
        labels = torch.tensor([c for c in classes for _ in range(40)], dtype=torch.uint8)
        write_idx(d / f"{part}-images-idx3-ubyte", synthetic_images(labels, 0))
        write_idx(d / f"{part}-labels-idx1-ubyte", labels)
    cfg = data_lib.DataConfig(dataset="fashion-scenes", data_root=str(tmp_path), train_size=200, val_size=50,
                              test_size=200)
    loaded = data_lib.load(cfg, ["segment", "presence"])
    for split, allowed in (("train", range(0, 5)), ("val", range(0, 5)), ("test", range(5, 10))):
        present = loaded.split(split).labels["presence"].sum(0)
        assert set(present.nonzero().flatten().tolist()) <= set(allowed), split
        classes = set(loaded.split(split).labels["segment"].unique().tolist()) - {0}
        assert classes <= {c + 1 for c in allowed}, split
    again = data_lib.load(cfg, ["segment", "presence"])
    assert torch.equal(again.train.images, loaded.train.images)  # seeded: the same scenes every time
