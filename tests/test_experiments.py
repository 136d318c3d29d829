"""Experiments that settle questions: statistics, Δm, seeds, masks, starving, α logging, configs,
two-domain and tabular data, the hard-sharing baseline."""

import json
import math

import pandas as pd
import pytest
import torch

from conftest import make_dataset
from csnet import ModelConfig, build_network
from csnet.compare import delta_m, interval, paired
from csnet.data import MISSING_LABEL, DataConfig, load
from csnet.models.network import count_macs
from csnet.tasks import Classification

QUICK = ["--val-size", "100", "--train-size", "300", "--test-size", "100", "--batch-size", "64", "--quiet"]

# ---------------------------------------------------------------- statistics against hand-computed values


def test_interval_matches_the_t_distribution_by_hand():
    # three seeds, mean 0.82, std 0.02; t(0.975, 2 df) solves t = 0.95 * sqrt(2 + t^2): t^2 = 1.805 / 0.0975
    t = math.sqrt(1.805 / 0.0975)
    mean, std, low, high = interval(pd.Series([0.80, 0.82, 0.84]))
    assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)
    assert low == pytest.approx(0.82 - t * 0.02 / math.sqrt(3)) and high == pytest.approx(0.82 + t * 0.02 / math.sqrt(3))
    assert math.isnan(interval(pd.Series([0.5]))[1])


def test_paired_difference_and_p_value_by_hand():
    a = pd.Series([0.80, 0.82, 0.84], index=[0, 1, 2])
    b = pd.Series([0.79, 0.80, 0.80, 0.70], index=[0, 1, 2, 3])  # seed 3 has no partner: left out
    diff, p, n = paired(a, b)
    d = [0.01, 0.02, 0.04]
    mean_d = sum(d) / 3
    sd = math.sqrt(sum((x - mean_d) ** 2 for x in d) / 2)
    t = mean_d / (sd / math.sqrt(3))
    # Student's t with 2 degrees of freedom: P(T > t) = 1/2 - t / (2 sqrt(2 + t^2))
    assert n == 3 and diff == pytest.approx(mean_d)
    assert p == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))))


ACC = {"kind": "classification", "primary": "accuracy", "metrics": {"accuracy": "higher"}, "delta": ["accuracy"]}


def test_delta_m_sign_and_scale():
    refs = {("fine", "accuracy"): 0.8, ("coarse", "accuracy"): 0.5}
    tasks = {"fine": ACC, "coarse": ACC}
    acc = lambda **v: {(t, "accuracy"): x for t, x in v.items()}  # noqa: E731
    assert delta_m(acc(fine=0.9, coarse=0.5), refs, tasks) == pytest.approx(6.25)      # (+12.5% + 0%) / 2
    assert delta_m(acc(fine=0.72, coarse=0.45), refs, tasks) == pytest.approx(-10.0)   # (-10% - 10%) / 2
    assert delta_m(acc(fine=0.8, coarse=0.5), refs, tasks) == 0
    assert delta_m(acc(fine=0.9, body=0.3), refs, {"fine": ACC, "body": ACC}) == pytest.approx(12.5)  # only with a ref


def test_delta_m_flips_the_sign_of_lower_is_better_metrics():
    depth = {"kind": "depth", "primary": "delta1", "delta": ["abs_err", "abs_rel"],
             "metrics": {"abs_err": "lower", "rmse": "lower", "abs_rel": "lower", "delta1": "higher"}}
    seg = {"kind": "segmentation", "primary": "miou", "delta": ["miou"], "metrics": {"miou": "higher"}}
    refs = {("depth", "abs_err"): 0.50, ("depth", "abs_rel"): 0.20, ("depth", "rmse"): 9.0, ("seg", "miou"): 0.40}
    # depth: abs_err 0.40 is 20% better, abs_rel 0.22 is 10% worse -> (+20 - 10) / 2 = +5;
    # seg: mIoU 0.30 is 25% worse -> -25; Δm = (5 - 25) / 2 = -10 (rmse is not a Δm metric here)
    got = delta_m({("depth", "abs_err"): 0.40, ("depth", "abs_rel"): 0.22, ("depth", "rmse"): 1.0,
                   ("seg", "miou"): 0.30}, refs, {"depth": depth, "seg": seg})
    assert got == pytest.approx(-10.0)
    # a lower error alone must raise Δm: the sign flip, not the raw relative change
    assert delta_m({("depth", "abs_err"): 0.25, ("depth", "abs_rel"): 0.10}, refs, {"depth": depth}) == \
        pytest.approx(50.0)


# ---------------------------------------------------------------- missing labels


def test_a_task_without_labels_in_a_batch_adds_zero_loss_and_no_nan():
    task = Classification("t", 3)
    logits = torch.randn(4, 3, requires_grad=True)
    loss_sum, n, stats = task.terms(logits, torch.full((4,), MISSING_LABEL))
    assert loss_sum.item() == 0 and n.item() == 0 and stats.sum().item() == 0
    loss = loss_sum / n.clamp_min(1)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(logits.grad == 0)
    some = torch.tensor([2, MISSING_LABEL, 0, MISSING_LABEL])
    loss_sum, n, _ = task.terms(logits.detach(), some)
    want = torch.nn.functional.cross_entropy(logits.detach()[[0, 2]], some[[0, 2]], reduction="sum")
    assert n.item() == 2 and loss_sum.item() == pytest.approx(want.item())


def test_starve_keeps_exactly_n_labels(data_root):
    full = load(DataConfig(data_root=str(data_root), val_size=100), ["fine", "coarse"])
    starved = load(DataConfig(data_root=str(data_root), val_size=100, starve={"coarse": 37}), ["fine", "coarse"])
    kept = starved.train.labels["coarse"] != MISSING_LABEL
    assert int(kept.sum()) == 37
    assert torch.equal(starved.train.labels["coarse"][kept], full.train.labels["coarse"][kept])
    assert torch.equal(starved.train.labels["fine"], full.train.labels["fine"])  # other tasks untouched
    assert torch.equal(starved.val.labels["coarse"], full.val.labels["coarse"])  # only training labels go


def test_training_with_a_fully_starved_task(cli, data_root, tmp_path):
    code, _, err = cli("train", "--data-root", data_root, *QUICK, "--starve", "fine=0", "--out", tmp_path / "r")
    assert code == 0, err
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert m[(m.split == "train") & (m.task == "coarse")].value.notna().all()
    assert m[(m.split == "val") & (m.metric == "accuracy")].value.notna().all()
    code, _, err = cli("train", "--data-root", data_root, *QUICK, "--starve", "fine=100000")
    assert code == 2 and "--starve fine=100000: the training set has 300 fine labels" in err
    code, _, err = cli("train", "--data-root", data_root, *QUICK, "--starve", "fine")
    assert code == 2 and "--starve takes TASK=N" in err


# ---------------------------------------------------------------- what the units learned


def test_alpha_csv_holds_the_numbers_the_model_had(cli, data_root, tmp_path):
    run = tmp_path / "r"
    code, _, err = cli("train", "--data-root", data_root, *QUICK, "--epochs", "2", "--stitch-lr-mult", "100",
                       "--keep-last", "--out", run)
    assert code == 0, err
    state = torch.load(run / "last.pt", weights_only=True, map_location="cpu")["model"]
    alpha = pd.read_csv(run / "alpha.csv")
    assert sorted(alpha.epoch.unique()) == [0, 1, 2]
    assert (alpha[alpha.epoch == 0].set_index(["point", "target", "source"])["mean"]
            .xs("fine", level="target").xs("fine", level="source") == 0.9).all()
    final = pd.read_csv(run / "alpha_final.csv")
    tasks = ["fine", "coarse"]
    for point in ("pool1", "pool2", "fc"):
        w = state[f"units.{point}.weight"]
        for i, target in enumerate(tasks):
            for j, source in enumerate(tasks):
                row = alpha[(alpha.epoch == 2) & (alpha.point == point) & (alpha.target == target) & (alpha.source == source)]
                assert row["mean"].item() == pytest.approx(w[i, j].mean().item(), rel=1e-5)
                assert row["std"].item() == pytest.approx(w[i, j].std(unbiased=False).item(), rel=1e-4, abs=1e-7)
                values = final[(final.point == point) & (final.target == target) & (final.source == source)]
                torch.testing.assert_close(torch.tensor(values.value.to_numpy(), dtype=torch.float32), w[i, j],
                                           rtol=1e-5, atol=1e-6)
    assert alpha[alpha.epoch == 2]["mean"].ne(alpha[alpha.epoch == 0]["mean"].to_numpy()).any()  # they learned
    for png in ("alpha_heatmap.png", "alpha_hist.png", "alpha_trajectory.png"):
        assert (run / "plots" / png).stat().st_size > 1000


# ---------------------------------------------------------------- seeds, compare, REPORT.md


def test_seeds_compare_with_intervals_p_values_and_delta_m(cli, data_root, tmp_path):
    common = ["--data-root", data_root, *QUICK, "--seeds", "0,1,2"]
    for name, args in (("base", ["--stitch", "none"]), ("cs", ["--stitch", "all", "--stitch-lr-mult", "10"])):
        code, out, err = cli("train", *common, *args, "--out", tmp_path / name)
        assert code == 0, err
        assert "over 3 seeds" in out
    assert cli("pretrain", "--task", "fine", *common, "--out", tmp_path / "pre-fine")[0] == 0
    group = tmp_path / "cs"
    assert json.loads((group / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    assert all((group / f"seed-{s}" / "metrics.csv").is_file() for s in (0, 1, 2))
    summary = pd.read_csv(group / "summary.csv").set_index("task")
    assert summary.loc["mean", "seeds"] == 3 and summary.loc["mean", "ci_low"] <= summary.loc["mean", "mean"]
    # the seeds differ: a seed that did not reach training would make the three runs equal
    per_seed = [pd.read_csv(group / f"seed-{s}" / "metrics.csv").value.sum() for s in (0, 1, 2)]
    assert len(set(per_seed)) == 3

    code, out, err = cli("compare", tmp_path / "base", group, "--reference", tmp_path / "pre-fine",
                         "--out", tmp_path / "cmp")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv").set_index("run")
    cs, base = table.loc["cs"], table.loc["base"]
    score = "score [%]"
    assert cs.seeds == 3 and cs[f"{score} std"] > 0 and cs[f"{score} ci_low"] < cs[score] < cs[f"{score} ci_high"]
    assert 0 <= cs["score p"] <= 1 and cs["score paired seeds"] == 3
    assert cs.parameters == base.parameters + 4480 and cs.macs > base.macs
    ref_fine = pd.read_csv(tmp_path / "pre-fine" / "summary.csv").set_index("task").loc["fine", "mean"]
    assert summary.loc["mean", "unit"] == "%" and 50 < summary.loc["mean", "mean"] <= 100  # percent
    # coarse has no reference; the summary's percent and the table's percent give the same ratio
    assert cs["delta_m [%]"] == pytest.approx(100 * (cs["fine:accuracy [%]"] - ref_fine) / ref_fine, rel=1e-4)
    report = (tmp_path / "cmp" / "REPORT.md").read_text()
    assert "| run | seeds | params |" in report and "![test_metrics](test_metrics.png)" in report
    assert "![alpha](alpha.png)" in report and (tmp_path / "cmp" / "alpha.png").is_file()


# ---------------------------------------------------------------- config files


def test_config_file_round_trip_and_unknown_keys(cli, data_root, tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f'data-root = "{data_root}"\nval_size = 100\ntrain-size = 300\ntest-size = 100\n'
                   'tasks = ["fine", "coarse", "body"]\nstitch = "after-fc"\nlr = 0.002\nquiet = true\n')
    code, _, err = cli("train", "--config", cfg, "--lr", "0.003", "--out", tmp_path / "r")
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"]["train_size"] == 300 and config["model"]["tasks"] == ["fine", "coarse", "body"]
    assert config["model"]["stitch"] == "after-fc" and config["train"]["lr"] == 0.003  # the command line wins
    cfg.write_text("learning-rate = 1\n")
    code, _, err = cli("train", "--config", cfg)
    assert code == 2 and "unknown key 'learning-rate' for csnet train; valid: alpha," in err


# ---------------------------------------------------------------- two domains, tables, hard sharing


@pytest.fixture
def two_domain_root(tmp_path):
    root = make_dataset(tmp_path / "data", "fashion-mnist", seed=0)
    return make_dataset(root, "mnist", seed=7)


def test_two_domain_path_end_to_end(cli, two_domain_root, tmp_path):
    common = ["--data-root", two_domain_root, "--backbone", "mlp", "--val-size", "200", "--test-size", "200",
              "--batch-size", "64", "--quiet"]
    for task in ("mnist", "fashion"):
        code, _, err = cli("pretrain", "--dataset", "mnist+fashion", "--task", task, *common, "--epochs", "2",
                           "--out", tmp_path / task)
        assert code == 0, err
    assert cli("stitch", tmp_path / "mnist", tmp_path / "fashion", "--out", tmp_path / "st")[0] == 0
    code, _, err = cli("train", "--from", tmp_path / "st", "--freeze-columns", "--train-size", "200",
                       "--data-root", two_domain_root, "--val-size", "200", "--test-size", "200", "--quiet",
                       "--out", tmp_path / "cs")
    assert code == 0, err
    config = json.loads((tmp_path / "cs" / "config.json").read_text())
    assert config["data"]["dataset"] == "mnist+fashion" and config["train"]["freeze_columns"]
    code, _, err = cli("compare", tmp_path / "mnist", tmp_path / "fashion", tmp_path / "cs",
                       "--reference", tmp_path / "mnist", "--reference", tmp_path / "fashion", "--out", tmp_path / "cmp")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv").set_index("run")
    assert table.loc["cs", ["mnist:accuracy [%]", "fashion:accuracy [%]"]].notna().all()
    assert not math.isnan(table.loc["cs", "delta_m [%]"])  # no task in every run: Δm over each run's own tasks


def test_each_two_domain_image_is_labelled_for_its_own_domain_only(two_domain_root):
    d = load(DataConfig(dataset="mnist+fashion", data_root=str(two_domain_root), val_size=100), ["mnist", "fashion"])
    has_mnist = d.train.labels["mnist"] != MISSING_LABEL
    has_fashion = d.train.labels["fashion"] != MISSING_LABEL
    assert torch.all(has_mnist ^ has_fashion)  # exactly one label per image
    assert len(d.train) + len(d.val) == 1400 and len(d.test) == 400
    assert 0 < int(has_mnist.sum()) < len(d.train)  # shuffled union


def test_mnist_columns_stitched_with_fashion_columns_by_name(cli, two_domain_root, tmp_path):
    common = ["--data-root", two_domain_root, "--backbone", "mlp", "--val-size", "100", "--quiet"]
    assert cli("pretrain", "--dataset", "mnist", "--task", "mnist", *common, "--out", tmp_path / "m")[0] == 0
    assert cli("pretrain", "--dataset", "fashion", "--task", "fine", *common, "--out", tmp_path / "f")[0] == 0
    assert cli("stitch", tmp_path / "m", tmp_path / "f", "--tasks", "mnist,fashion", "--out", tmp_path / "st")[0] == 0
    code, _, err = cli("train", "--from", tmp_path / "st", "--dataset", "fashion", "--data-root", two_domain_root)
    assert code == 2 and "has no task mnist, fashion" in err
    code, _, err = cli("train", "--from", tmp_path / "st", "--dataset", "mnist+fashion", "--data-root",
                       two_domain_root, *QUICK[:2], "--quiet", "--out", tmp_path / "cs")
    assert code == 0, err


def test_missing_mnist_says_how_to_get_it(cli, data_root):
    code, _, err = cli("pretrain", "--dataset", "mnist", "--task", "mnist", "--data-root", data_root)
    assert code == 1 and "mnist data not found" in err and "torchvision.datasets.MNIST(ROOT, download=True)" in err


def test_csv_tables_with_several_labels(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    rows = pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(6)])
    rows["gender"] = ["m" if v > 0 else "f" for v in x[:, 0]]
    rows["young"] = (x[:, 1] > 0).long().tolist()
    rows.loc[::7, "young"] = None  # unlabelled rows
    rows.to_csv(tmp_path / "faces.csv", index=False)
    code, _, err = cli("train", "--dataset", f"csv:{tmp_path / 'faces.csv'}", "--tasks", "gender,young",
                       "--hidden", "32,32,32", "--epochs", "5", "--batch-size", "32", "--lr", "0.01", "--quiet",
                       "--out", tmp_path / "r")
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model"]["backbone"] == "mlp" and config["model"]["in_features"] == 6
    assert config["data_stats"]["test"] == 80 and config["data_stats"]["val"] == 32
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    acc = m[(m.split == "test") & (m.task == "gender") & (m.metric == "accuracy")].value
    assert acc.max() > 0.8  # gender is the sign of f0: an easy signal
    code, _, err = cli("train", "--dataset", f"csv:{tmp_path / 'faces.csv'}")
    assert code == 2 and "name the label columns with --tasks" in err


def test_hard_sharing_baseline(cli, data_root, tmp_path):
    net = build_network(ModelConfig(tasks=("fine", "coarse"), num_classes=(10, 3), arch="shared",
                                    share_until="pool2", stitch="none"))
    out = net(torch.randn(2, 1, 28, 28))
    out["coarse"].sum().backward()
    assert net.trunk["pool1"][0].weight.grad is not None  # the trunk serves both tasks
    assert net.branches["fine"]["fc"][1].weight.grad is None
    code, _, err = cli("train", "--arch", "shared", "--share-until", "pool2", "--data-root", data_root, *QUICK,
                       "--out", tmp_path / "shared")
    assert code == 0, err
    assert cli("eval", tmp_path / "shared", "--data-root", data_root)[0] == 0
    code, _, err = cli("train", "--arch", "shared", "--share-until", "pool9", "--data-root", data_root)
    assert code == 2 and "unknown --share-until 'pool9'; valid: pool1, pool2, fc" in err


def test_macs_of_the_fashion_column_by_hand():
    net = build_network(ModelConfig(tasks=("fine",), num_classes=(10,), stitch="none"))
    conv1 = 28 * 28 * 32 * 9
    conv2 = 14 * 14 * 64 * 32 * 9
    fc = 1024 * 64 * 7 * 7
    assert count_macs(net, torch.zeros(1, 1, 28, 28)) == conv1 + conv2 + fc + 10 * 1024
