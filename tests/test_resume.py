"""Runs that survive: exact resume, signals, atomic checkpoints, --force/--name, determinism, provenance."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from csnet import runio
from csnet.errors import CsnetError
from csnet.progress import RichReporter

SMALL = ["--val-size", "100", "--train-size", "400", "--batch-size", "64", "--quiet", "--device", "cpu"]  # 7 steps an epoch; exactness is a CPU promise
TIMINGS = ("examples_per_s", "seconds", "epoch_seconds")


def values(run):
    """metrics.csv without the timing rows, which legitimately differ between runs."""
    m = pd.read_csv(run / "metrics.csv")
    return m[~m.metric.isin(TIMINGS)].reset_index(drop=True)


def train(cli, data_root, out, *extra):
    return cli("train", "--data-root", data_root, *SMALL, "--out", out, *extra)


def signal_at(monkeypatch, global_step, signals=(signal.SIGINT,), on_send=None):
    """Deliver real signals to this process right after training step ``global_step``."""
    count = {"n": 0}
    original = RichReporter.step

    def step(self):
        original(self)
        count["n"] += 1
        if count["n"] == global_step:
            if on_send:
                on_send()
            for sig in signals:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(RichReporter, "step", step)


def resumes_exactly(cli, args, tmp_path, monkeypatch, step):
    """Run ``args`` to the end, then again stopped by SIGINT after ``step`` steps and resumed: the two
    metrics.csv files must agree (timings aside)."""
    code, _, err = cli(*args, "--out", tmp_path / "ref")
    assert code == 0, err
    signal_at(monkeypatch, step)
    code, _, err = cli(*args, "--out", tmp_path / "run")
    assert code == 130, err
    monkeypatch.undo()
    code, _, err = cli("train", "--resume", tmp_path / "run")
    assert code == 0, err
    pd.testing.assert_frame_equal(values(tmp_path / "run"), values(tmp_path / "ref"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run that keeps its last.pt (to be extended and compared with)."""
    from conftest import make_dataset
    from csnet.cli import main

    root = make_dataset(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--data-root", str(root), *SMALL, "--epochs", "2", "--keep-last", "--out", str(out)]) == 0
    return root, out


@pytest.mark.parametrize("step", [3, 7, 10])  # mid epoch 1, the last batch of epoch 1, mid epoch 2
def test_sigint_then_resume_matches_the_uninterrupted_run(cli, reference, tmp_path, monkeypatch, step):
    root, ref = reference
    signal_at(monkeypatch, step)
    code, _, err = train(cli, root, tmp_path / "run", "--epochs", "2", "--keep-last")
    assert code == 130
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: by SIGINT at epoch ") and f"csnet train --resume {tmp_path / 'run'}" in line
    monkeypatch.undo()
    code, _, err = cli("train", "--resume", tmp_path / "run")
    assert code == 0, err
    pd.testing.assert_frame_equal(values(tmp_path / "run"), values(ref))
    for name in ("model.pt", "last.pt"):
        got = torch.load(tmp_path / "run" / name, weights_only=True, map_location="cpu")["model"]
        want = torch.load(ref / name, weights_only=True, map_location="cpu")["model"]
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_resume_with_more_epochs_matches_a_longer_run(cli, reference, tmp_path):
    root, ref = reference
    assert train(cli, root, tmp_path / "long", "--epochs", "3")[0] == 0
    (tmp_path / "short").mkdir()
    import shutil
    shutil.copytree(ref, tmp_path / "short" / "run")
    code, _, err = cli("train", "--resume", tmp_path / "short" / "run", "--epochs", "3")
    assert code == 0, err
    pd.testing.assert_frame_equal(values(tmp_path / "short" / "run"), values(tmp_path / "long"))
    assert json.loads((tmp_path / "short" / "run" / "config.json").read_text())["train"]["epochs"] == 3


def test_second_sigint_stops_at_once_and_keeps_the_last_good_checkpoint(cli, reference, tmp_path, monkeypatch):
    root, _ = reference
    run = tmp_path / "run"
    saved = {}
    signal_at(monkeypatch, 10, signals=(signal.SIGINT, signal.SIGINT),
              on_send=lambda: saved.update(last=(run / "last.pt").read_bytes()))
    code, _, err = train(cli, root, run, "--epochs", "2")
    assert code == 130
    assert "again: stopping at once" in err and "is untouched" in err
    assert (run / "last.pt").read_bytes() == saved["last"]  # epoch 1's checkpoint, byte for byte
    assert torch.load(run / "last.pt", weights_only=True, map_location="cpu")["position"] == {"epoch": 2, "step": 0, "world_size": 1}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_sigterm_to_a_real_process_checkpoints_and_exits_130(tmp_path, reference):
    root, _ = reference
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "csnet", "train", "--data-root", str(root), *SMALL,
                             "--epochs", "200", "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: by SIGTERM" in err and "Traceback" not in err
    position = torch.load(run / "last.pt", weights_only=True, map_location="cpu")["position"]
    assert 1 < position["epoch"] < 200


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runio.save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)  # runio imports torch where it saves
    with pytest.raises(CsnetError, match="cannot write .*last.pt: No space left on device; the previous one is intact"):
        runio.save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_refused(cli, reference, tmp_path):
    import shutil
    _, ref = reference
    shutil.copytree(ref, tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, _, err = cli("train", "--resume", tmp_path / "run")
    assert code == 1 and err.strip() == f"error: {last}: not a readable checkpoint (truncated or foreign file)"


def test_a_finished_run_drops_last_pt_unless_kept(cli, reference, tmp_path):
    root, ref = reference
    assert train(cli, root, tmp_path / "run", "--epochs", "1")[0] == 0
    assert not (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "model.pt").is_file()
    assert (ref / "last.pt").is_file()  # --keep-last
    code, _, err = cli("train", "--resume", tmp_path / "run", "--epochs", "2")
    assert code == 2 and "has finished its 1 epoch(s) and, as every run that ends normally, removed its last.pt" in err
    assert "--keep-last" in err and len(err.strip().splitlines()) == 1


def test_a_seeds_folder_that_cannot_go_on_stops_before_any_seed_trains(cli, reference, tmp_path):
    root, _ = reference
    group = tmp_path / "g"
    assert cli("train", "--data-root", root, *SMALL, "--epochs", "1", "--seeds", "0,1", "--out", group)[0] == 0
    before = {p: p.read_bytes() for p in group.rglob("*") if p.is_file()}
    code, _, err = cli("train", "--resume", group, "--epochs", "2")
    assert code == 2 and "removed its last.pt" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in group.rglob("*") if p.is_file()} == before


def test_resume_refuses_changed_settings_and_finished_runs(cli, reference):
    _, ref = reference
    code, _, err = cli("train", "--resume", ref, "--lr", "0.1")
    assert code == 2 and "--lr cannot be used with --resume" in err
    code, _, err = cli("train", "--resume", ref)
    assert code == 2 and "has finished its 2 epochs; pass --epochs N (more than 2)" in err


def test_force_replaces_a_run_and_nothing_else(cli, reference, tmp_path):
    root, _ = reference
    run = tmp_path / "run"
    assert train(cli, root, run, "--seed", "1")[0] == 0
    code, _, err = train(cli, root, run)
    assert code == 2 and "already holds a run" in err and "--force" in err
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1
    assert train(cli, root, run, "--force")[0] == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    code, _, err = train(cli, root, other, "--force")
    assert code == 2 and "already holds files" in err
    assert (other / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_run_names_cannot_leave_the_runs_folder(cli, reference, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "--name", name)
    assert code == 2 and ("is not a run name" in err if name else "--name is empty" in err)
    assert not (tmp_path / "escape").exists()


def test_name_puts_the_run_under_runs(cli, reference, tmp_path, monkeypatch):
    root, _ = reference
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--data-root", root, *SMALL, "--name", "cs-1")[0] == 0
    assert (tmp_path / "runs" / "cs-1" / "config.json").is_file()
    code, _, err = cli("train", "--name", "x", "--out", tmp_path / "y")
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("flag", [[], ["--deterministic"]])
def test_same_seed_same_metrics(cli, reference, tmp_path, flag):
    root, _ = reference
    for name in ("a", "b"):
        assert train(cli, root, tmp_path / name, "--epochs", "2", *flag)[0] == 0
    pd.testing.assert_frame_equal(values(tmp_path / "a"), values(tmp_path / "b"))
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["deterministic"] == bool(flag)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_different_seeds_differ(cli, reference, tmp_path):
    root, _ = reference
    assert train(cli, root, tmp_path / "a")[0] == 0
    assert train(cli, root, tmp_path / "b", "--seed", "1")[0] == 0
    assert not values(tmp_path / "a").equals(values(tmp_path / "b"))


def test_config_records_code_versions_device_and_data_checksums(reference):
    root, ref = reference
    config = json.loads((ref / "config.json").read_text())
    env = config["environment"]
    assert env["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert env["torchvision"] and env["device"] == "cpu" and env["device_name"]
    checkout = subprocess.run(["git", "-C", os.path.dirname(runio.__file__), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
    if checkout.returncode == 0:
        assert env["git_commit"] == checkout.stdout.strip()
    for key, entry in config["data_stats"]["files"].items():
        with open(entry["path"], "rb") as f:
            assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest(), key


def test_a_loss_that_becomes_nan_stops_with_the_epoch_and_step(cli, reference, tmp_path):
    root, _ = reference
    code, _, err = train(cli, root, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e30")
    assert code == 1
    line = err.strip()
    assert line.startswith("error: training loss became") and "at epoch 1, step " in line
    assert "try a lower --lr (now 1e+30)" in line and "\n" not in line
