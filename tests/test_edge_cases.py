"""Edge cases found in review: each failed (traceback or wrong result) before its fix."""

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from csnet import stitch
from csnet.compare import paired

QUICK = ["--val-size", "100", "--train-size", "300", "--test-size", "100", "--batch-size", "64", "--quiet"]


def test_sequential_default_points_skip_stages_without_a_width():
    cols = {t: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 10 * 10, 2)) for t in "ab"}
    net = stitch(cols)
    assert list(net.units) == ["0"]  # not the Flatten, whose output is not 4 channels wide
    assert net(torch.randn(2, 1, 10, 10))["a"].shape == (2, 2)


def test_an_in_place_relu_after_a_unit():
    cols = {t: nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)) for t in "ab"}
    out = stitch(cols)(torch.randn(3, 4))
    sum(o.sum() for o in out.values()).backward()


def test_csv_label_columns_are_never_features(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    df = pd.DataFrame(x.numpy(), columns=["f0", "f1", "f2"])
    df["is_young"] = (x[:, 0] > 0).long().tolist()
    df["gender"] = (x[:, 1] > 0).long().tolist()
    df.to_csv(tmp_path / "t.csv", index=False)
    data = f"csv:{tmp_path / 't.csv'}"
    code, _, err = cli("pretrain", "--dataset", data, "--task", "is_young", "--label-columns", "is_young,gender",
                       "--test-size", "20", "--quiet", "--out", tmp_path / "p")
    assert code == 0, err
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model"]["in_features"] == 3 and config["data_stats"]["test"] == 20
    code, _, err = cli("train", "--dataset", data, "--tasks", "is_young,gender", "--test-size", "20", "--quiet",
                       "--out", tmp_path / "t")
    assert code == 0, err
    code, out, err = cli("compare", tmp_path / "t", tmp_path / "p", "--out", tmp_path / "cmp")
    assert code == 0, err
    assert "is_young" in out and "gender" in out  # task names with '_' reach the console table


def test_stitch_refuses_a_hard_sharing_run(cli, data_root, tmp_path):
    assert cli("train", "--arch", "shared", "--share-until", "pool2", "--data-root", data_root, *QUICK,
               "--out", tmp_path / "s")[0] == 0
    code, _, err = cli("stitch", tmp_path / "s", tmp_path / "s", "--out", tmp_path / "x")
    assert code == 2 and "stitch takes single-task pretrain runs" in err


def test_config_equals_form_is_read(cli, tmp_path):
    (tmp_path / "c.toml").write_text("bogus_key = 1\n")
    code, _, err = cli("train", f"--config={tmp_path / 'c.toml'}")
    assert code == 2 and "unknown key 'bogus_key'" in err


@pytest.mark.parametrize("args,message", [
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--backbone", "mlp", "--hidden", "0,-3"], "--hidden sizes must be positive"),
    (["--alpha", "nan"], "--alpha and --beta must be finite"),
])
def test_bad_model_values_are_one_line_errors(cli, args, message):
    code, _, err = cli("train", *args)
    assert code == 2 and err.strip().startswith(f"error: {message}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_force_replaces_a_seeds_folder(cli, data_root, tmp_path):
    args = ["train", "--data-root", data_root, *QUICK, "--seeds", "0", "--out", tmp_path / "g"]
    assert cli(*args)[0] == 0
    code, _, err = cli(*args, "--force")
    assert code == 0, err


def test_eval_a_stitch_of_columns_from_different_data_sets(cli, tmp_path):
    from conftest import make_dataset
    root = make_dataset(make_dataset(tmp_path / "data", "fashion-mnist", seed=0), "mnist", seed=7)
    common = ["--data-root", root, "--backbone", "mlp", "--val-size", "100", "--quiet"]
    assert cli("pretrain", "--dataset", "mnist", "--task", "mnist", *common, "--out", tmp_path / "m")[0] == 0
    assert cli("pretrain", "--dataset", "fashion", "--task", "fine", *common, "--out", tmp_path / "f")[0] == 0
    assert cli("stitch", tmp_path / "m", tmp_path / "f", "--tasks", "mnist,fashion", "--out", tmp_path / "st")[0] == 0
    code, _, err = cli("eval", tmp_path / "st", "--data-root", root)
    assert code == 2 and "pass --dataset" in err
    code, _, err = cli("eval", tmp_path / "st", "--dataset", "mnist+fashion", "--data-root", root)
    assert code == 0, err


def test_constant_paired_differences_have_no_p_value():
    diff, p, n = paired(pd.Series([0.81, 0.82, 0.83]), pd.Series([0.80, 0.81, 0.82]))
    assert diff == pytest.approx(0.01) and math.isnan(p) and n == 3
