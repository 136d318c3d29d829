"""The whole pipeline through the CLI on small IDX files the tests write, and its one-line errors."""

import json
import re
import shutil

import pandas as pd
import pytest
import torch

from conftest import make_dataset

SMALL = ["--val-size", "100", "--train-size", "400", "--batch-size", "64", "--quiet"]


def _ok(result):
    code, out, err = result
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def shared_data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared_data_root):
    """pretrain fine + coarse -> stitch (identity) -> train --from; plus a baseline from scratch.

    Built once per module (it is the slow part); tests that write into a run use ``copy_run``.
    """
    from csnet.cli import main

    def cli(*args):
        return main([str(a) for a in args]), "", ""

    runs = tmp_path_factory.mktemp("runs")
    data_root = shared_data_root
    common = ["--data-root", data_root, *SMALL]
    _ok(cli("pretrain", "--task", "fine", *common, "--epochs", "2", "--out", runs / "pre-fine"))
    _ok(cli("pretrain", "--task", "coarse", *common, "--seed", "1", "--out", runs / "pre-coarse"))
    _ok(cli("stitch", runs / "pre-fine", runs / "pre-coarse", "--alpha", "1", "--beta", "0",
            "--out", runs / "stitched"))
    _ok(cli("train", "--from", runs / "stitched", "--data-root", data_root, *SMALL, "--epochs", "2",
            "--stitch-lr-mult", "10", "--out", runs / "cs"))
    _ok(cli("train", "--stitch", "none", *common, "--out", runs / "base"))
    return runs


def test_run_folders_hold_config_metrics_checkpoints_and_plots(pipeline):
    run = pipeline / "cs"
    config = json.loads((run / "config.json").read_text())
    assert config["command"] == "train" and config["source"] == str(pipeline / "stitched")
    assert config["model"]["tasks"] == ["fine", "coarse"] and config["model"]["stitch"] == "all"
    assert config["train"]["epochs"] == 2 and config["train"]["stitch_lr_mult"] == 10
    assert config["data"]["train_size"] == 400 and config["environment"]["torch"] == torch.__version__
    m = pd.read_csv(run / "metrics.csv")
    assert list(m.columns) == ["epoch", "split", "task", "metric", "value"]
    assert sorted(m.epoch.unique()) == [1, 2]
    acc = m[m.metric.isin(["accuracy", "macro_f1", "score"])]
    assert set(acc.split) == {"train", "val", "test"} and set(acc.task) == {"fine", "coarse", "mean"}
    assert set(m[(m.task == "fine") & (m.split == "val")].metric) == {"loss", "accuracy", "macro_f1"}
    assert set(m[(m.task == "fine") & (m.split == "train")].metric) == {"loss", "accuracy", "macro_f1", "loss_weight"}
    assert set(m[m.task == "mean"].metric) == {"loss", "score"}
    assert acc.value.between(0, 1).all()
    # the score is the mean of the tasks' primary metrics, here their accuracies
    per_epoch = m[(m.split == "val") & (m.metric.isin(["accuracy", "score"]))].pivot(index="epoch", columns="task",
                                                                                       values="value")
    assert (per_epoch["mean"] - (per_epoch.fine + per_epoch.coarse) / 2).abs().max() < 1e-5
    # the synthetic classes are easy: two epochs must learn them (a broken pipeline stays near chance)
    assert acc[(acc.split == "test") & (acc.epoch == 2) & (acc.task == "fine") & (acc.metric == "accuracy")].value.item() > 0.5
    assert (m[(m.metric == "examples_per_s")].value > 0).all()
    assert not (run / "last.pt").exists()  # removed when a run ends normally (kept with --keep-last)
    for name in ("model.pt", "plots/test_metrics.png", "plots/train_loss.png"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "model.pt", weights_only=True, map_location="cpu")
    assert list(ckpt["model_config"]["tasks"]) == ["fine", "coarse"]
    assert config["tasks"]["fine"] == {"kind": "classification", "primary": "accuracy", "delta": ["accuracy"],
                                       "metrics": {"accuracy": "higher", "macro_f1": "higher"},
                                       "units": {"accuracy": "%", "macro_f1": "%"}}
    assert config["argv"][:2] == ["csnet", "train"] and "--stitch-lr-mult" in config["argv"]


def copy_run(run, dest):
    """A private copy of a run (without last.pt, the largest file) for a test that writes into it."""
    shutil.copytree(run, dest / run.name, ignore=shutil.ignore_patterns("last.pt"))
    return dest / run.name


def test_identity_stitched_run_evaluates_like_its_pretrained_columns(pipeline, shared_data_root, cli, tmp_path):
    runs = {name: copy_run(pipeline / name, tmp_path) for name in ("pre-fine", "pre-coarse", "stitched")}
    for run in runs.values():
        _ok(cli("eval", run, "--data-root", shared_data_root))
    stitched = pd.read_csv(runs["stitched"] / "eval.csv").set_index(["task", "metric"]).value
    for task in ("fine", "coarse"):
        alone = pd.read_csv(runs[f"pre-{task}"] / "eval.csv").set_index(["task", "metric"]).value
        assert stitched[(task, "accuracy")] == alone[(task, "accuracy")]
        assert stitched[(task, "loss")] == alone[(task, "loss")]


def test_eval_prints_a_table_and_keeps_other_splits(pipeline, shared_data_root, cli, tmp_path):
    run = copy_run(pipeline / "cs", tmp_path)
    out = _ok(cli("eval", run, "--data-root", shared_data_root))
    assert "fine" in out and "coarse" in out and "mean" in out
    _ok(cli("eval", run, "--split", "val", "--data-root", shared_data_root))
    e = pd.read_csv(run / "eval.csv")
    assert set(e.split) == {"test", "val"}
    m = pd.read_csv(pipeline / "cs" / "metrics.csv")
    best = torch.load(pipeline / "cs" / "model.pt", weights_only=True, map_location="cpu")["epoch"]
    want = m[(m.epoch == best) & (m.split == "test") & (m.task == "mean") & (m.metric == "score")].value.item()
    got = e[(e.split == "test") & (e.task == "mean") & (e.metric == "score")].value.item()
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("n_runs", [2, 3])
def test_compare_table_and_plots(pipeline, cli, tmp_path, n_runs):
    runs = [pipeline / "base", pipeline / "cs", pipeline / "pre-fine"][:n_runs]
    out = _ok(cli("compare", *runs, "--out", tmp_path / "cmp"))
    assert "base" in out and "cs" in out
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert list(table.run) == [r.name for r in runs]
    m = pd.read_csv(pipeline / "cs" / "metrics.csv")
    val = m[(m.split == "val") & (m.task == "mean") & (m.metric == "score")].set_index("epoch").value
    best = int(val.idxmax())
    row = table.set_index("run").loc["cs"]
    assert row.best_epoch == best

    def at_best(run, task, metric):
        m = pd.read_csv(pipeline / run / "metrics.csv")
        epoch = m[(m.split == "val") & (m.task == "mean") & (m.metric == "score")].set_index("epoch").value.idxmax()
        return m[(m.split == "test") & (m.task == task) & (m.metric == metric) & (m.epoch == epoch)].value.item()

    assert row["fine:accuracy [%]"] == pytest.approx(100 * at_best("cs", "fine", "accuracy"))  # percent
    assert row["fine:macro_f1 [%]"] == pytest.approx(100 * at_best("cs", "fine", "macro_f1"))
    if n_runs == 2:  # the same tasks: the score is each run's own, the difference in points
        assert row["score [%]"] == pytest.approx(100 * at_best("cs", "mean", "score"))
        assert row["score diff [points]"] == pytest.approx(100 * (at_best("cs", "mean", "score")
                                                                  - at_best("base", "mean", "score")))
        assert table["score diff [points]"].iloc[0] == 0
    else:  # a single-task run: coarse is shown where it exists, but the score is fine's alone, as are differences
        pre = table.set_index("run").loc["pre-fine"]
        assert pd.isna(pre["coarse:accuracy [%]"]) and not pd.isna(row["coarse:accuracy [%]"])
        assert row["score [%]"] == pytest.approx(100 * at_best("cs", "fine", "accuracy"))
        assert "coarse:accuracy diff [points]" not in table and "fine:accuracy diff [points]" in table
        assert "left out of the score" in (tmp_path / "cmp" / "REPORT.md").read_text()
    for figure in ("test_metrics", "train_loss"):
        assert (tmp_path / "cmp" / f"{figure}.png").stat().st_size > 1000
        assert (tmp_path / "cmp" / f"{figure}.pdf").read_bytes().startswith(b"%PDF")
    report = (tmp_path / "cmp" / "REPORT.md").read_text()
    assert report.index("## Runs") < report.index("## Results")
    assert f"**cs** (1 seed): `csnet train --from {pipeline / 'stitched'}" in report
    assert "| model.stitch | none | all |" in report  # base vs cs: the settings in which they differ


def test_compare_refuses_runs_tested_on_other_data_unless_allowed(pipeline, shared_data_root, cli, tmp_path):
    _ok(cli("train", "--stitch", "none", "--data-root", shared_data_root, *SMALL, "--test-size", "150",
            "--out", tmp_path / "small-test"))
    code, _, err = cli("compare", pipeline / "base", tmp_path / "small-test", "--out", tmp_path / "cmp")
    assert code == 2 and err.count("\n") == 1
    assert "base and small-test differ in test examples (200 vs 150)" in err and "--allow-mismatch" in err
    assert not (tmp_path / "cmp").exists()
    _ok(cli("compare", pipeline / "base", tmp_path / "small-test", "--allow-mismatch", "--out", tmp_path / "cmp"))
    report = (tmp_path / "cmp" / "REPORT.md").read_text()
    assert "differ in test examples (200 vs 150); compared anyway (--allow-mismatch)" in report
    assert "| data.test_size | – | 150 |" in report


def test_compare_imports_no_torch(pipeline, tmp_path):
    import subprocess
    import sys

    probe = ("import sys; from csnet.cli import main; assert main(sys.argv[1:]) == 0; "
             "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, "compare", str(pipeline / "base"), str(pipeline / "cs"),
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_figures_score_only_the_shared_tasks_as_the_table_does():
    from csnet.compare import _rescored

    rows = [(e, sp, t, m, v) for e in (1, 2) for sp in ("val", "test")
            for t, m, v in (("fine", "accuracy", 0.5 + e / 10), ("coarse", "accuracy", 0.9), ("mean", "score", 0.0))]
    df = pd.DataFrame(rows, columns=["epoch", "split", "task", "metric", "value"])
    got = _rescored(df, ["fine"], {"fine": "accuracy", "coarse": "accuracy"})
    score = got[(got.task == "mean") & (got.metric == "score") & (got.split == "test")].set_index("epoch").value
    assert score.to_dict() == pytest.approx({1: 0.6, 2: 0.7})  # fine's alone, not the run's own score
    assert _rescored(df, ["fine", "coarse"], {}) is df  # the run's own tasks: its own score
    assert "score" not in set(_rescored(df, [], {}).metric)


def test_a_run_keeps_its_colour_in_every_panel_and_the_legend(tmp_path):
    """Read back from the figure's artists: one colour per run across panels (a run may lack a task), the
    legend's colour the same, percent on the axes, and the band only where there are seeds."""
    import matplotlib.colors as mcolors

    from csnet import plots
    from csnet.compare import curve_series

    def seeds(tasks, n):
        return {s: pd.DataFrame([(e, "test", t, m, 0.5 + 0.01 * s + 0.1 * e) for e in (1, 2) for t, m in tasks],
                                columns=["epoch", "split", "task", "metric", "value"]) for s in range(n)}

    both = [("fine", "accuracy"), ("coarse", "accuracy"), ("mean", "score")]
    series = {"a": curve_series(seeds(both, 3)), "b": curve_series(seeds([("coarse", "accuracy")], 1)),
              "c": curve_series(seeds(both, 2))}
    panels = [("fine", "accuracy", "%"), ("coarse", "accuracy", "%"), ("mean", "score", "%")]
    fig = plots.test_metrics_figure(series, panels)
    seen = {}
    for ax in fig.axes:
        assert ax.get_ylabel().endswith("[%]") and ax.get_ylim()[1] <= 100.5
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(mcolors.to_hex(line.get_color()))
        assert max(max(line.get_ydata()) for line in ax.get_lines()) > 60  # drawn in percent, not fractions
    assert {k: len(v) for k, v in seen.items()} == {"a": 1, "b": 1, "c": 1}
    assert len({next(iter(v)) for v in seen.values()}) == 3
    bands = [c for c in fig.axes[0].collections]
    assert len(bands) == 2  # a and c have seeds; b has one run and is not in this panel
    plots._save(fig, tmp_path / "t.png", order=list(series))
    assert (tmp_path / "t.pdf").read_bytes().startswith(b"%PDF")
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b", "c"]
    for text, handle in zip(legend.get_texts(), legend.legend_handles):
        assert mcolors.to_hex(handle.get_color()) in seen[text.get_text()]


def test_curve_bands_are_the_tables_interval():
    from csnet.compare import curve_series, interval

    seeds = {s: pd.DataFrame({"epoch": [1, 2], "split": "test", "task": "mean", "metric": "score",
                              "value": [0.5 + 0.01 * s, 0.6 + 0.02 * s]}) for s in range(3)}
    series = curve_series(seeds).set_index("epoch")
    mean, _, low, high = interval(pd.Series([0.6, 0.62, 0.64]))
    assert series.loc[2, "mean"] == pytest.approx(mean) and (series.loc[2, "low"], series.loc[2, "high"]) == \
        pytest.approx((low, high))
    one = curve_series({0: seeds[0]})
    assert one["low"].isna().all()  # one seed: a line, no band


def _help(*command) -> str:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "csnet", *command, "--help"], capture_output=True, text=True,
                            env={**__import__("os").environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # the panels wrap: compare as one line of words


def test_train_help_shows_every_choice_and_default():
    from csnet.config import BACKBONES, DATASETS
    from csnet.data import DATASETS as BUILT_IN, EXTRA
    from csnet.models.network import ModelConfig

    assert set(DATASETS) == {*BUILT_IN, *EXTRA}  # the help's names are the registries'
    text = _help("train")
    for option in ("--epochs", "--stitch-lr-mult", "--from", "--device", "--alpha", "--train-size"):
        assert option in text
    for name in (*DATASETS, *BACKBONES, "after-pool", "after-fc", "none", "csv:PATH", "folder:PATH"):
        assert name in text, name
    assert "(nn.Module, [stitch point names])" in text  # bracketed text is not taken for markup
    defaults = ModelConfig(tasks=("a", "b"), num_classes=(2, 2))
    for option, value in (("alpha", defaults.alpha), ("stitch", defaults.stitch), ("dropout", defaults.dropout)):
        row = re.search(rf"--{option} (FLOAT|TEXT) (.*?) │ --", text).group(2)  # the option's own row
        assert f"[default: ({value})]" in row, (option, row)
    assert "<bool>" not in text and "<str>" not in text and "[default: 5000 images" not in text
    usage = _help("compare")
    assert "csnet compare [OPTIONS] RUN..." in usage and "{" not in usage


def test_help_and_argument_errors_import_no_torch(tmp_path):
    """``csnet --help`` answers before torch, torchvision, pandas or matplotlib would load (seconds here)."""
    import subprocess
    import sys

    probe = ("import sys; from csnet.cli import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('torch', 'torchvision', 'pandas', 'matplotlib') if m in sys.modules))")
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["train", "--epochs", "x"],
                 ["pretrain", "--no-such-option"]):
        result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert result.stdout.strip().splitlines()[-1] == "[]", (argv, result.stdout, result.stderr)


def test_tensorboard_scalars_are_the_metrics(cli, shared_data_root, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    _ok(cli("train", "--data-root", shared_data_root, *SMALL, "--epochs", "2", "--tensorboard", "--out", run))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})  # 0: keep every event
    events.Reload()
    m = pd.read_csv(run / "metrics.csv")
    assert len(events.Tags()["scalars"]) == len(m.groupby(["split", "task", "metric"]))
    for _, r in m[m.metric.isin(["accuracy", "score", "loss"])].iterrows():
        got = {e.step: e.value for e in events.Scalars(f"{r.task}/{r.metric}/{r.split}")}
        assert got[r.epoch] == pytest.approx(r.value, rel=1e-5)
    steps = EventAccumulator(str(run / "tensorboard" / "steps"))
    steps.Reload()
    losses = steps.Scalars("train/loss")  # every step of both epochs: 400 examples, batch 64
    assert [e.step for e in losses] == list(range(1, 15)) and all(0 < e.value < 20 for e in losses)
    histograms = events.Tags()["histograms"]
    assert "alpha/pool1/fine->coarse" in histograms and len(events.Histograms("alpha/fc/coarse->coarse")) == 2
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as without the package
    code, _, err = cli("train", "--tensorboard", "--out", tmp_path / "no")
    assert code == 2 and "pip install 'csnet[tensorboard]'" in err and not (tmp_path / "no").exists()


def test_shell_completion_completes_commands_and_options():
    import os
    import subprocess
    import sys

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_CSNET_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        done = subprocess.run([sys.executable, "-m", "csnet"], env=env, capture_output=True, text=True)
        return done.stdout.split()

    assert complete("csnet tr") == ["train"]
    assert "--keep-last" in complete("csnet train --kee")


def test_a_runs_config_json_repeats_it(cli, pipeline, tmp_path):
    """--config RUN/config.json: the same data, network (or --from source) and training, so the same numbers."""
    def values(run):
        m = pd.read_csv(run / "metrics.csv")
        return m[~m.metric.isin(["examples_per_s", "seconds", "epoch_seconds"])].reset_index(drop=True)

    for command, run in (("train", "base"), ("pretrain", "pre-coarse"), ("train", "cs")):
        _ok(cli(command, "--config", pipeline / run / "config.json", "--out", tmp_path / run))
        pd.testing.assert_frame_equal(values(tmp_path / run), values(pipeline / run))
        again, before = (json.loads((d / run / "config.json").read_text()) for d in (tmp_path, pipeline))
        for section in ("data", "model", "train"):
            assert again[section] == before[section], section
    code, _, err = cli("eval", "--config", pipeline / "base" / "config.json", pipeline / "base")
    assert code == 2 and "configures train or pretrain, not eval" in err
    code, _, err = cli("pretrain", "--config", pipeline / "base" / "config.json")
    assert code == 2 and "a run of 2 tasks is repeated by csnet train, not pretrain" in err


def test_which_runs_compare(tmp_path):
    """The test-set check holds every pair, ignores what a run did not record, and counts the split seed only
    where it picks test examples."""
    from csnet.compare import mismatches, task_info, test_set

    def config(test=None, seed=0, test_size=None, dataset="fashion", files="a"):
        c = {"data": {"dataset": dataset, "split_seed": seed, "test_size": test_size}}
        if test is not None:
            c["data_stats"] = {"test": test, "files": {"test_images": {"sha256": files}}}
        return c

    assert mismatches({"old": config(), "a": config(200), "b": config(300)}) == \
        ["a and b differ in test examples (200 vs 300)"]
    assert mismatches({"a": config(200, seed=0), "b": config(200, seed=1)}) == []  # the whole fixed test set
    assert mismatches({"a": config(200, 0, 200), "b": config(200, 1, 200)}) == \
        ["a and b differ in split seed (0 vs 1)"]  # a seeded --test-size subset
    assert test_set(config(500, 3, dataset="fashion-scenes"))["split seed"] == 3  # the seed makes the scenes
    assert mismatches({"a": config(200), "b": config(200, files="b")}) == \
        ["a and b differ in data files (SHA-256) (other files)"]
    (tmp_path / "config.json").write_text(json.dumps({"command": "stitch"}))  # a stitch run records no tasks
    assert task_info(tmp_path, ["fine"])["fine"]["units"]["macro_f1"] == "%"


# ---------------------------------------------------------------- bad input


def _one_line_error(result, code=None, contains=""):
    exit_code, _, err = result
    assert exit_code != 0 and (code is None or exit_code == code), (exit_code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], lines[0]
    return lines[0]


def test_missing_data_folder(cli, tmp_path):
    _one_line_error(cli("pretrain", "--task", "fine", "--data-root", tmp_path / "nowhere"), 1,
                    f"searched {tmp_path / 'nowhere' / 'fashion-mnist'}")


def test_incomplete_data_folder(cli, data_root):
    (data_root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    _one_line_error(cli("train", "--data-root", data_root), 1, "fashion-mnist data not found")


def test_truncated_idx_file(cli, data_root):
    path = data_root / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    _one_line_error(cli("train", "--data-root", data_root, *SMALL), 1, "train-images-idx3-ubyte.gz")


@pytest.mark.parametrize("args,code,contains", [
    (["train", "--dataset", "cifar"], 2, "unknown dataset 'cifar'; valid: fashion"),
    (["train", "--tasks", "fine,color"], 2, "unknown task 'color' for fashion; valid: fine, coarse"),
    (["pretrain", "--task", "color"], 2, "unknown task 'color'"),
    (["train", "--backbone", "resnet9"], 2, "unknown backbone 'resnet9'; valid: convnet, fcn, mlp, resnet18"),
    (["train", "--stitch", "middle"], 2, "valid: none, all, after-pool, after-fc, or stage names pool1, pool2, fc"),
    (["train", "--epochs", "0"], 2, "--epochs"),
    (["train", "--batch-size", "0"], 2, "--batch-size"),
    (["train", "--lr", "-1"], 2, "--lr must be a positive number"),
    (["train", "--lr", "nan"], 2, "--lr must be a positive number"),
    (["train", "--train-size", "0"], 2, "--train-size"),
    (["train", "--optimizer", "rmsprop"], 2, "unknown optimizer 'rmsprop'; valid: adam, sgd"),
    (["train", "--epochs", "many"], 2, "Invalid value for '--epochs'"),
    (["train", "--no-such-option"], 2, "--no-such-option"),
])
def test_bad_options(cli, args, code, contains):
    _one_line_error(cli(*args), code, contains)


def test_train_size_larger_than_the_data(cli, data_root):
    _one_line_error(cli("train", "--data-root", data_root, "--val-size", "100", "--train-size", "5000"), 2,
                    "--train-size must be between 1 and 600")


def test_device_cuda_without_cuda(cli, data_root):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line_error(cli("train", "--data-root", data_root, "--device", "cuda"), 2, "no CUDA device")


def test_folders_that_are_not_runs(cli, tmp_path, data_root):
    (tmp_path / "empty").mkdir()
    _one_line_error(cli("train", "--from", tmp_path / "empty", "--data-root", data_root), 2, "not a csnet run folder")
    _one_line_error(cli("eval", tmp_path / "empty"), 2, "not a csnet run folder")
    _one_line_error(cli("compare", tmp_path / "empty", tmp_path / "empty"), 2, "not a csnet run folder")


def test_foreign_checkpoint_is_refused(cli, pipeline, shared_data_root, tmp_path):
    run = copy_run(pipeline / "stitched", tmp_path)
    (run / "model.pt").write_bytes(b"this is not a checkpoint")
    _one_line_error(cli("eval", run, "--data-root", shared_data_root), 1, "not a readable checkpoint")


class _Payload:
    def __reduce__(self):
        return (print, ("payload executed",))


def test_checkpoint_carrying_a_pickled_object_is_refused_and_never_run(cli, pipeline, shared_data_root, tmp_path):
    run = copy_run(pipeline / "stitched", tmp_path)
    torch.save({"format": "csnet-checkpoint-v1", "model_config": _Payload()}, run / "model.pt")
    result = cli("eval", run, "--data-root", shared_data_root)
    _one_line_error(result, 1, "refused: it holds pickled Python objects")
    assert "payload executed" not in result[1] + result[2]


def test_model_options_conflict_with_from(cli, pipeline):
    _one_line_error(cli("train", "--from", pipeline / "stitched", "--stitch", "after-fc"), 2,
                    "--stitch cannot be used with --from")


def test_compare_an_untrained_stitch_run(cli, pipeline):
    _one_line_error(cli("compare", pipeline / "base", pipeline / "stitched"), 2, "has no metrics.csv")


def test_existing_output_is_never_overwritten(cli, pipeline, shared_data_root):
    data_root = shared_data_root
    before = (pipeline / "base" / "metrics.csv").read_bytes()
    model = (pipeline / "base" / "model.pt").read_bytes()
    _one_line_error(cli("train", "--data-root", data_root, *SMALL, "--out", pipeline / "base"), 2,
                    "already holds a run")
    _one_line_error(cli("stitch", pipeline / "pre-fine", pipeline / "pre-coarse", "--out", pipeline / "base"), 2,
                    "already holds a run")
    assert (pipeline / "base" / "metrics.csv").read_bytes() == before
    assert (pipeline / "base" / "model.pt").read_bytes() == model


def test_stitching_different_architectures_says_what_differs(cli, pipeline, shared_data_root, tmp_path):
    data_root = shared_data_root
    _ok(cli("pretrain", "--task", "coarse", "--backbone", "mlp", "--data-root", data_root, *SMALL,
            "--out", tmp_path / "mlp"))
    line = _one_line_error(cli("stitch", pipeline / "pre-fine", tmp_path / "mlp", "--out", tmp_path / "x"), 2,
                           "columns differ")
    assert "backbone convnet vs mlp" in line
    assert not (tmp_path / "x").exists()


def test_stitching_two_columns_of_one_task_asks_for_names(cli, pipeline, tmp_path):
    _one_line_error(cli("stitch", pipeline / "pre-fine", pipeline / "pre-fine", "--out", tmp_path / "x"), 2,
                    "name them with --tasks")


def test_debug_shows_the_traceback(cli, tmp_path):
    with pytest.raises(Exception, match="not a csnet run folder"):
        cli("--debug", "eval", tmp_path)


def test_mlp_backbone_end_to_end(cli, data_root, tmp_path):
    _ok(cli("train", "--backbone", "mlp", "--hidden", "32,16", "--stitch", "all", "--data-root", data_root, *SMALL,
            "--out", tmp_path / "mlp"))
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert config["model"]["hidden"] == [32, 16]


def test_default_out_is_a_new_folder_under_runs(cli, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _ok(cli("train", "--data-root", data_root, *SMALL))
    _ok(cli("train", "--data-root", data_root, *SMALL))
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 2 and all(name.startswith("train-") for name in made)


def test_make_dataset_is_reusable(tmp_path):
    # the fixture's files are real IDX files the reader accepts, gzip or not
    make_dataset(tmp_path, gz=False)
    assert (tmp_path / "fashion-mnist" / "train-images-idx3-ubyte").stat().st_size == 16 + 700 * 784


def test_amp_and_channels_last_train_and_evaluate(cli, data_root, tmp_path):
    code, _, err = cli("train", "--amp", "--channels-last", "--data-root", data_root, *SMALL, "--out", tmp_path / "r")
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["train"]["amp"] and config["train"]["channels_last"]
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert m[m.metric == "accuracy"].value.between(0, 1).all() and m[m.metric == "loss"].value.notna().all()
    assert cli("eval", tmp_path / "r", "--data-root", data_root)[0] == 0


def test_a_run_that_kept_its_input_statistics_beside_the_weights_evaluates_alike(cli, data_root, tmp_path):
    """Runs written before the statistics moved into the network (InputNorm) kept them as model.pt's 'norm'."""
    run = tmp_path / "r"
    code, _, err = cli("train", "--data-root", data_root, *SMALL, "--out", run)
    assert code == 0, err
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["model"]["input_norm.mean"].shape == () and "norm" not in state  # gray: one value
    assert cli("eval", run, "--data-root", data_root)[0] == 0
    now = pd.read_csv(run / "eval.csv")
    mean, std = state["model"].pop("input_norm.mean"), state["model"].pop("input_norm.std")
    state["norm"] = {"mean": float(mean), "std": float(std)}
    torch.save(state, run / "model.pt")
    assert cli("eval", run, "--data-root", data_root)[0] == 0
    pd.testing.assert_frame_equal(pd.read_csv(run / "eval.csv"), now)
    state["norm"]["std"] = -1.0
    torch.save(state, run / "model.pt")
    code, _, err = cli("eval", run, "--data-root", data_root)
    assert code == 1 and "'norm' should hold a finite mean and a positive std" in err
