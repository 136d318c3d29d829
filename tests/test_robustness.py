"""Run folders as an adversary sees them: code they name, runs stopped at any moment, storage that
fails, and numbers or files that are not what they claim. Each case printed a traceback, ran code,
or lost work before the change that this file tests."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import make_dataset, write_idx
from test_resume import SMALL, signal_at, values

PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")  # what an attacker's module would do at import

from torch import nn

def column(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, num_classes)), ["2"]
"""


def one_line(result, code=None, contains=""):
    exit_code, _, err = result
    assert exit_code != 0 and (code is None or exit_code == code), (exit_code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def isolated_imports(monkeypatch):
    """custom_column puts the current folder on sys.path and imports: undo both after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


# ------------------------------------------------------------------ 1. a run folder never runs code


@pytest.fixture
def booby_trapped_run(tmp_path, root, cli, monkeypatch, isolated_imports):
    """A trained run R whose backbone is payload:column, with payload.py (which writes a marker file
    when imported) inside R, as in a downloaded run folder; the current folder is R."""
    marker = tmp_path / "MARKER"
    maker = tmp_path / "maker"
    maker.mkdir()
    (maker / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.chdir(maker)
    run = tmp_path / "R"
    args = ["--data-root", root, *SMALL, "--backbone", "payload:column"]
    assert cli("pretrain", "--task", "fine", *args, "--out", run)[0] == 0
    assert cli("train", *args, "--stitch", "none", "--keep-last", "--out", tmp_path / "T")[0] == 0
    shutil.copy(maker / "payload.py", run / "payload.py")
    shutil.rmtree(maker)
    del sys.modules["payload"]
    marker.unlink()
    monkeypatch.chdir(run)
    return run, marker


@pytest.mark.parametrize("command", [
    ["eval", "."],
    ["train", "--from", ".", "--data-root", "{root}", *SMALL],
    ["stitch", ".", ".", "--tasks", "a,b", "--out", "../S"],
    ["train", "--resume", "../T", "--epochs", "2"],
])
def test_a_run_folder_never_imports_the_code_it_names(booby_trapped_run, cli, root, command):
    run, marker = booby_trapped_run
    line = one_line(cli(*[str(a).format(root=root) for a in command]), 2, "--backbone payload:column")
    assert "never imports code" in line
    assert not marker.exists()
    assert not (run.parent / "S").exists()


def test_csnet_eval_dot_in_a_downloaded_run_as_a_process(booby_trapped_run):
    """``cd R && python -m csnet eval .``: R is then on sys.path, the way an attacker would want it."""
    run, marker = booby_trapped_run
    done = subprocess.run([sys.executable, "-m", "csnet", "eval", "."], cwd=run, capture_output=True, text=True)
    assert done.returncode == 2 and "never imports code" in done.stderr and not marker.exists(), done.stderr


def test_naming_the_backbone_again_trusts_it(booby_trapped_run, cli, root):
    run, marker = booby_trapped_run
    assert cli("eval", ".", "--backbone", "payload:column")[0] == 0
    assert marker.exists()  # the control: the same folder does run its code once the user names it
    one_line(cli("eval", ".", "--backbone", "other:column"), 2, "does not match")
    one_line(cli("eval", ".", "--backbone", "resnet18"), 2, "cannot be used with eval")


@pytest.mark.parametrize("body,spec,message", [
    ("VALUE = 3", "VALUE", "VALUE is a int, not a function"),
    ("def f(num_classes):\n    raise ValueError('bad width')", "f", "raised ValueError: bad width"),
    ("def f(num_classes):\n    return 5", "f", "must return (nn.Module, [stitch point names]), it returned int"),
    ("from torch import nn\ndef f(num_classes):\n    return nn.Linear(2, 2), 7", "f", "must return (nn.Module"),
    ("raise RuntimeError('boom at import')", "f", "importing bad_mod failed (RuntimeError: boom at import)"),
    ("def f(:", "f", "importing bad_mod failed (SyntaxError"),
])
def test_a_bad_module_function_is_one_line(cli, tmp_path, monkeypatch, isolated_imports, body, spec, message):
    (tmp_path / "bad_mod.py").write_text(body + "\n")
    monkeypatch.chdir(tmp_path)
    one_line(cli("train", "--backbone", f"bad_mod:{spec}", "--out", tmp_path / "x"), 2, message)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ 2. every interrupted run can be finished


def test_an_interrupted_seeds_run_resumes_every_seed(cli, root, tmp_path, monkeypatch):
    args = ["train", "--data-root", root, *SMALL, "--epochs", "2", "--seeds", "0,1"]
    assert cli(*args, "--out", tmp_path / "ref")[0] == 0
    signal_at(monkeypatch, 10)  # seed 0, epoch 2, step 3 of 7: seed 1 never starts
    code, _, err = cli(*args, "--out", tmp_path / "g")
    assert code == 130 and f"csnet train --resume {tmp_path / 'g'}" in err
    monkeypatch.undo()
    assert not (tmp_path / "g" / "seed-1").exists()

    code, _, err = cli("compare", tmp_path / "ref", tmp_path / "g", "--out", tmp_path / "cmp")
    assert code == 0, err
    assert "g: 1 of 2 seeds trained (seed 1 missing)" in err and "stopped after epoch 1 of 2" in err
    assert "1 of 2 seeds trained" in (tmp_path / "cmp" / "REPORT.md").read_text()
    one_line(cli(*args, "--out", tmp_path / "g"), 2, f"csnet train --resume {tmp_path / 'g'}")

    code, out, err = cli("train", "--resume", tmp_path / "g")
    assert code == 0, err
    for seed in (0, 1):
        pd.testing.assert_frame_equal(values(tmp_path / "g" / f"seed-{seed}"), values(tmp_path / "ref" / f"seed-{seed}"))
    assert (tmp_path / "g" / "summary.csv").read_text() == (tmp_path / "ref" / "summary.csv").read_text()
    code, out, err = cli("train", "--resume", tmp_path / "g")  # nothing left to do: says so, keeps the files
    assert code == 0 and "finished" in out


def test_a_run_stopped_before_its_first_checkpoint_starts_again(cli, root, tmp_path):
    run = tmp_path / "r"
    assert cli("train", "--data-root", root, *SMALL, "--out", tmp_path / "ref")[0] == 0
    assert cli("train", "--data-root", root, *SMALL, "--out", run)[0] == 0
    for name in ("last.pt", "model.pt", "metrics.csv"):  # as a kill during epoch 1 leaves it
        (run / name).unlink(missing_ok=True)
    (run / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    code, out, err = cli("train", "--resume", run)
    assert code == 0, err
    assert "starting it again" in out and not (run / ".last.pt.abc123.tmp").exists()
    pd.testing.assert_frame_equal(values(run), values(tmp_path / "ref"))


def test_a_folder_left_before_config_json_is_recognised(cli, root, tmp_path):
    run = tmp_path / "r"
    (run / "plots").mkdir(parents=True)
    (run / ".model.pt.x1y2.tmp").write_bytes(b"\0" * 10)
    one_line(cli("train", "--data-root", root, *SMALL, "--out", run), 2, "stopped before it started")
    one_line(cli("train", "--resume", run), 2, "with --force")
    assert cli("train", "--data-root", root, *SMALL, "--out", run, "--force")[0] == 0
    assert not list(run.glob(".*.tmp")) and (run / "model.pt").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line(cli("train", "--out", tmp_path / "mine", "--force"), 2, "already holds files")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_run_stopped_after_its_last_epoch_gets_its_closing_files(cli, root, tmp_path):
    run = tmp_path / "r"
    assert cli("train", "--data-root", root, *SMALL, "--keep-last", "--out", run)[0] == 0
    want = (run / "alpha_final.csv").read_text()
    shutil.rmtree(run / "plots")  # as a kill after the last checkpoint leaves it
    (run / "alpha_final.csv").unlink()
    code, out, err = cli("train", "--resume", run)
    assert code == 0 and "closing files" in out, err
    assert (run / "alpha_final.csv").read_text() == want and (run / "plots" / "test_metrics.png").is_file()
    one_line(cli("train", "--resume", run), 2, "has finished its 1 epochs")


def test_resume_never_throws_away_results_it_cannot_continue(cli, root, tmp_path):
    run = tmp_path / "r"
    assert cli("train", "--data-root", root, *SMALL, "--keep-last", "--out", run)[0] == 0
    assert cli("eval", run)[0] == 0
    (run / "last.pt").unlink()  # deleted to save space
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    one_line(cli("train", "--resume", run, "--epochs", "2"), 2, "has results but no last.pt")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept


def test_force_only_restarts_what_csnet_left_half_made(cli, root, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("summary.csv", "metrics.csv", "model.pt"):  # csnet's names, but no run of csnet's
        (folder / name).write_text("my results")
    one_line(cli("train", "--data-root", root, *SMALL, "--out", folder, "--force"), 2, "already holds files")
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.csv", "model.pt", "summary.csv"]


def test_a_seeds_plan_naming_code_is_not_imported(cli, root, tmp_path, isolated_imports, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data-root", root, *SMALL, "--stitch", "none", "--seeds", "0,1", "--out", tmp_path / "g"]
    signal_at(monkeypatch, 3)
    assert cli(*args)[0] == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    group = json.loads((tmp_path / "g" / "seeds.json").read_text())
    group["plan"]["model"]["backbone"] = "payload:column"  # a hand-edited plan for the seeds not begun
    (tmp_path / "g" / "seeds.json").write_text(json.dumps(group))
    shutil.rmtree(tmp_path / "g" / "seed-0")
    one_line(cli("train", "--resume", tmp_path / "g"), 2, "never imports code")
    assert not marker.exists()


def test_a_killed_stitch_is_replaced_by_force(cli, root, tmp_path):
    common = ["--data-root", root, *SMALL, "--backbone", "mlp"]
    for task in ("fine", "coarse"):
        assert cli("pretrain", "--task", task, *common, "--out", tmp_path / task)[0] == 0
    assert cli("stitch", tmp_path / "fine", tmp_path / "coarse", "--out", tmp_path / "st")[0] == 0
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "st" / "model.pt").unlink()  # killed between config.json and model.pt
    one_line(cli("eval", tmp_path / "st"), 1, "model.pt: checkpoint not found")
    one_line(cli("train", "--from", tmp_path / "st"), 1, "model.pt: checkpoint not found")
    assert cli("stitch", tmp_path / "fine", tmp_path / "coarse", "--out", tmp_path / "st", "--force")[0] == 0
    assert json.loads((tmp_path / "st" / "config.json").read_text())["model"] == config["model"]


def test_sigkill_at_any_moment_leaves_a_folder_force_or_resume_handles(root, tmp_path):
    """A real process killed while it creates its run folder, at a few different moments."""
    cmd = [sys.executable, "-m", "csnet", "train", "--data-root", str(root), *SMALL]
    for delay in (0.0, 0.4):  # while the folder is made; during the first epoch
        run = tmp_path / f"r{delay}"
        proc = subprocess.Popen([*cmd, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not run.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        resumed = subprocess.run([*cmd[:3], "train", "--resume", str(run)], capture_output=True, text=True)
        # finished before the kill, resumed, or (stopped before config.json) a hint to use --force
        assert resumed.returncode == 0 or "has finished" in resumed.stderr or "with --force" in resumed.stderr, \
            resumed.stderr
        assert "Traceback" not in resumed.stderr
        if "with --force" in resumed.stderr:
            forced = subprocess.run([*cmd, "--out", str(run), "--force"], capture_output=True, text=True)
            assert forced.returncode == 0, forced.stderr
        assert (run / "model.pt").is_file() and not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------ 3. storage faults are one line


def _limited(limit_bytes: int):
    """A child whose files cannot grow past ``limit_bytes``: writes fail as on a full disk (EFBIG)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(cli, root, tmp_path):
    run = tmp_path / "r"
    assert cli("train", "--data-root", root, *SMALL, "--keep-last", "--out", run)[0] == 0
    before = (run / "last.pt").read_bytes()
    done = subprocess.run([sys.executable, "-m", "csnet", "train", "--resume", str(run), "--epochs", "2"],
                          capture_output=True, text=True, preexec_fn=_limited(1 << 20))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "Traceback" not in done.stderr
    assert "intact" in lines[0]
    assert (run / "last.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
    assert cli("train", "--resume", run, "--epochs", "2")[0] == 0  # with room again, it finishes


def test_eval_prints_its_metrics_when_eval_csv_cannot_be_written(cli, root, tmp_path):
    run = tmp_path / "r"
    assert cli("train", "--data-root", root, *SMALL, "--out", run)[0] == 0
    done = subprocess.run([sys.executable, "-m", "csnet", "eval", str(run)], capture_output=True, text=True,
                          preexec_fn=_limited(100))  # room for Python's 4-byte temp-dir probe, not eval.csv
    assert done.returncode == 1 and "fine" in done.stdout and "coarse" in done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "the metrics above were not saved" in lines[0] and "eval.csv" in lines[0]
    (run / "eval.csv").mkdir()  # something that is not a file where eval.csv goes
    one_line(cli("eval", run), 1, "the metrics above were not saved")


# ------------------------------------------------------------------ 4. numbers and files that lie


def test_non_finite_csv_features_name_the_row_and_column(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    df = pd.DataFrame(torch.randn(60, 3, generator=g).double().numpy(), columns=["a", "b", "c"])
    df["y"] = [0, 1] * 30
    for bad, shown in ((float("inf"), "inf"), (1e39, "1e+39")):
        df.loc[17, "b"] = bad
        df.to_csv(tmp_path / "t.csv", index=False)
        one_line(cli("train", "--dataset", f"csv:{tmp_path / 't.csv'}", "--tasks", "y", "--stitch", "none",
                     "--out", tmp_path / "x"), 1, f"row 18 (line 19), column b: {shown}")


def test_the_mean_is_never_taken_over_values_it_dropped():
    from csnet.tasks import Classification
    from csnet.train import _Tally

    tasks = {t: Classification(t, 2) for t in "abc"}
    tally = _Tally(tasks, torch.device("cpu"))
    # a: loss 2 over 4 samples, 3 right (class 0: 3 of 3 predicted right, class 1: none of 1)
    tally.add("a", torch.tensor(2.0), torch.tensor(4), torch.tensor([3.0, 3, 0, 3, 0, 3, 1], dtype=torch.float64))
    tally.add("b", torch.tensor(float("nan")), torch.tensor(2), torch.tensor([1.0, 1, 0, 1, 1, 1, 1],
                                                                             dtype=torch.float64))
    result = tally.result()  # c has no labels: no values and no part in the mean
    assert result["a"]["loss"] == 0.5 and result["a"]["accuracy"] == 0.75
    assert torch.isnan(torch.tensor(result["c"]["loss"])) and torch.isnan(torch.tensor(result["mean"]["loss"]))
    assert result["mean"]["score"] == pytest.approx((0.75 + 0.5) / 2)
    tally.sums["b"][0] = 1.0
    assert tally.result()["mean"]["loss"] == pytest.approx((0.5 + 0.5) / 2) and tally.total_loss() == 1.0


@pytest.mark.parametrize("args,message", [
    (["--alpha", "1e308"], "--alpha and --beta must be finite numbers within float32's range"),
    (["--seed", str(2 ** 70)], "--seed must be a whole number from 0 to"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to"),
    (["--split-seed", str(2 ** 64)], "--split-seed must be a whole number from 0 to"),
    (["--seeds", f"0,{2 ** 64}"], "--seed must be a whole number from 0 to"),
    (["--backbone", "mlp", "--hidden", "99999999999999999999"], "layer sizes must be whole numbers from 1 to"),
    (["--backbone", "mlp", "--hidden", "2000000000,2000000000"], "cannot build the network (mlp)"),
    (["--batch-size", str(10 ** 12)], "--batch-size must be from 1 to"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["--momentum", "nan"], "--momentum"),
    (["--lr", "1e400"], "--lr must be a positive number"),
    (["--stitch-lr-mult", "inf"], "--stitch-lr-mult must be a positive number"),
    (["--tasks", ""], "--tasks is empty"),
    (["--stitch", ""], "--stitch is empty"),
    (["--stitch="], "--stitch is empty"),
    (["--backbone", " "], "--backbone is empty"),
    (["--hidden", ""], "--hidden is empty"),
])
def test_values_that_overflow_or_are_empty_are_one_line(cli, root, tmp_path, args, message):
    one_line(cli("train", "--data-root", root, *SMALL, *args, "--out", tmp_path / "x"), None, message)
    assert not (tmp_path / "x").exists()


def test_a_config_file_that_is_not_utf8_or_empty_values(cli, tmp_path):
    (tmp_path / "c.toml").write_bytes(b"tasks = \"fine\"\n# caf\xe9\n")
    one_line(cli("train", "--config", tmp_path / "c.toml"), 2, "not UTF-8 text")
    (tmp_path / "c.toml").write_text("tasks = []\n")
    one_line(cli("train", "--config", tmp_path / "c.toml"), 2, "tasks is empty")


def test_an_idx_header_with_an_empty_dimension(cli, tmp_path):
    root = make_dataset(tmp_path / "data")
    write_idx(root / "fashion-mnist" / "train-images-idx3-ubyte", torch.zeros(700, 0, 28), gz=True)
    one_line(cli("train", "--data-root", root, "--out", tmp_path / "x"), 1, "700x0x28: a data set with an empty")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, root):
    """A trained two-task run to damage, copied per test."""
    from csnet.cli import main

    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data-root", str(root), *SMALL, "--keep-last", "--out", str(run)]) == 0
    return run


@pytest.fixture
def damaged(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def _edit_checkpoint(path, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    if "position" in ckpt:
        ckpt["position"]["epoch"] = 1  # as if stopped after its first epoch: resumable
    torch.save(ckpt, path)


def _edit_config(run, edit):
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage,command,message", [
    (lambda r: (r / "config.json").write_text("[1, 2]"), "eval", "config.json: not a JSON object (found list)"),
    (lambda r: (r / "config.json").write_bytes(b"\xff\xfe{}"), "eval", "config.json: not valid JSON"),
    (lambda r: _edit_config(r, lambda c: c.pop("data")), "eval", "section 'data' is missing"),
    (lambda r: _edit_config(r, lambda c: c.update(data=5)), "eval", "section 'data' is not an object"),
    (lambda r: _edit_config(r, lambda c: c["data"].update(val_size="many")), "eval",
     "data setting 'val_size' should be int | None, found 'many'"),
    (lambda r: _edit_config(r, lambda c: c["train"].update(epochs="two")), "resume",
     "training setting 'epochs' should be int, found 'two'"),
    (lambda r: _edit_config(r, lambda c: c.pop("train")), "resume", "section 'train' is missing"),
    (lambda r: _edit_config(r, lambda c: c["train"].update(seed=2 ** 70)), "resume", "--seed must be a whole number"),
    (lambda r: shutil.copy(r / "model.pt", r / "last.pt"), "resume", "not a training checkpoint"),
    (lambda r: (r / "metrics.csv").write_text((r / "metrics.csv").read_text().replace("val,fine,accuracy,",
                                                                                      "val,fine,accuracy,x", 1)),
     "compare", "metrics.csv, line"),
    (lambda r: (r / "metrics.csv").write_text("epoch,split,task,metric,value\none,val,mean,accuracy,0.5\n"),
     "compare", "epoch 'one' is not a whole epoch number"),
    (lambda r: (r / "metrics.csv").write_text("epoch,split,task,metric,value\ninf,val,mean,accuracy,0.5\n"),
     "compare", "epoch 'inf' is not a whole epoch number"),
    (lambda r: _edit_checkpoint(r / "last.pt", lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(5))),
     "resume", "its optimizer, schedule or RNG state does not fit this run"),
    (lambda r: _edit_checkpoint(r / "last.pt", lambda c: c.update(tally={"fine": torch.zeros(3, dtype=torch.long),
                                                                         "coarse": torch.zeros(3)})),
     "resume", "does not fit this run"),
    (lambda r: _edit_checkpoint(r / "model.pt", lambda c: c.update(norm={"mean": torch.zeros(5), "std": 1.0})),
     "eval", "'norm' should hold a finite mean and a positive std"),
])
def test_a_damaged_run_folder_names_the_file_and_field(cli, damaged, tmp_path, damage, command, message):
    damage(damaged)
    args = {"eval": ["eval", damaged], "resume": ["train", "--resume", damaged, "--epochs", "2"],
            "compare": ["compare", damaged, damaged, "--out", tmp_path / "cmp"]}[command]
    one_line(cli(*args), None, message)


def test_a_model_pt_whose_config_does_not_fit_its_weights(cli, damaged):
    ckpt = torch.load(damaged / "model.pt", weights_only=True)
    ckpt["model_config"]["num_classes"] = [7, 3]
    torch.save(ckpt, damaged / "model.pt")
    one_line(cli("eval", damaged), 1, "model.pt: its weights do not fit its model config")
    ckpt["model_config"] = {"tasks": ["fine"]}
    torch.save(ckpt, damaged / "model.pt")
    one_line(cli("eval", damaged), 1, "model.pt: model setting 'num_classes' is missing")
    ckpt["model_config"], ckpt["model"] = {"tasks": ["fine"], "num_classes": [10], "stitch": "none"}, [1, 2]
    torch.save(ckpt, damaged / "model.pt")
    one_line(cli("eval", damaged), 1, "'model' is not a set of named tensors")


def test_a_damaged_seeds_json(cli, damaged, tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "seeds.json").write_text('{"seeds": ["zero"]}')
    one_line(cli("compare", tmp_path / "g", damaged, "--out", tmp_path / "c"), 1, "'seeds' should be a list")
    one_line(cli("train", "--resume", tmp_path / "g"), 1, "'seeds' should be a list")


def test_run_files_are_readable_as_the_umask_says(cli, root, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("train", "--data-root", root, *SMALL, "--out", tmp_path / "r")[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_pretrain_needs_no_task_where_the_data_set_has_one(cli, tmp_path):
    root = make_dataset(tmp_path / "data", "mnist")
    assert cli("pretrain", "--dataset", "mnist", "--data-root", root, *SMALL, "--out", tmp_path / "m")[0] == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["tasks"] == ["mnist"]
    one_line(cli("pretrain", "--data-root", root, "--out", tmp_path / "f"), 2, "--task is needed: fashion has the tasks")
