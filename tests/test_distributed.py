"""torchrun with 2 CPU processes (gloo): training, one writer, a stop on one rank, resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_dataset

TESTS = Path(__file__).parent
SMALL = ["--val-size", "100", "--train-size", "400", "--batch-size", "64", "--device", "cpu"]  # 4 steps a rank
TIMINGS = ("examples_per_s", "seconds", "epoch_seconds")


def torchrun(*args, script=("-m", "csnet")):
    """``torchrun --standalone --nproc-per-node 2`` (a free port each time), as the README shows it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script,
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def values(run: Path) -> pd.DataFrame:
    m = pd.read_csv(run / "metrics.csv")
    return m[~m.metric.isin(TIMINGS)].reset_index(drop=True)


def errors(stderr: str) -> list[str]:
    """csnet's own error lines (torchrun adds its log lines and a report of the failed ranks)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """An uninterrupted 2-epoch run on 2 processes."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun("train", "--data-root", root, *SMALL, "--epochs", "2", "--keep-last", "--out", out)
    assert done.returncode == 0, done.stderr
    return out, done


def test_two_processes_train_with_one_writer_and_sane_metrics(reference):
    run, done = reference
    assert done.stdout.count("best epoch") == 1  # rank 0 alone prints
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    m = pd.read_csv(run / "metrics.csv").set_index(["epoch", "split", "task", "metric"]).value
    assert m[(2, "test", "fine", "accuracy")] > 0.5  # ten classes: chance is 0.1
    assert m[(2, "train", "mean", "loss")] < m[(1, "train", "mean", "loss")]
    assert m[(1, "train", "all", "examples_per_s")] > 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["position"] == {"epoch": 3, "step": 0, "world_size": 2} and len(ckpt["rng_by_rank"]) == 2


def test_a_stop_on_one_rank_stops_both_and_resume_matches_the_uninterrupted_run(root, reference, tmp_path):
    ref, _ = reference
    run = tmp_path / "run"
    # rank 1 alone gets SIGINT after step 2 of 4 (mid epoch 1)
    stopped = torchrun("1", "2", "train", "--data-root", root, *SMALL, "--epochs", "2", "--out", run,
                       script=(TESTS / "ddp_stop.py",))
    assert stopped.returncode != 0
    assert errors(stopped.stderr) == [
        f"interrupted: by a signal to another rank at epoch 1, step 2; checkpoint saved in {run / 'last.pt'}; "
        f"resume with: torchrun --nproc-per-node 2 (and the same node options) -m csnet train --resume {run}"]
    assert torch.load(run / "last.pt", weights_only=True)["position"] == {"epoch": 1, "step": 2, "world_size": 2}

    # one process cannot continue a 2-process epoch: its shards would differ
    single = subprocess.run([sys.executable, "-m", "csnet", "train", "--resume", str(run)], capture_output=True,
                            text=True)
    assert single.returncode == 2 and single.stderr.strip().splitlines() == [
        f"error: {run} stopped mid-epoch with 2 process(es), and an epoch's shards depend on their number; "
        f"resume it with torchrun --nproc-per-node 2 -m csnet train --resume {run}"]

    resumed = torchrun("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(values(run), values(ref))
    got = torch.load(run / "model.pt", weights_only=True)["model"]
    want = torch.load(ref / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bad_input_under_torchrun_is_one_line_and_keeps_the_run(root, reference):
    run, _ = reference
    before = (run / "model.pt").read_bytes()
    done = torchrun("train", "--data-root", run.parent, *SMALL, "--out", run)
    assert done.returncode != 0
    assert errors(done.stderr) == [f"error: --out {run} already holds a run; choose a new folder, pass --force to "
                                   f"replace it, or continue it with: csnet train --resume {run}"]
    assert (run / "model.pt").read_bytes() == before
    done = torchrun("train", "--data-root", root, *SMALL, "--stitch", "none", "--freeze-columns",
                    "--out", run.parent / "frozen")
    assert errors(done.stderr) == ["error: nothing to train: --freeze-columns on a network without units "
                                   "(add --train-heads?)"]
    done = torchrun("eval", run)
    assert errors(done.stderr) == ["error: csnet eval runs in one process; start it without torchrun "
                                   "(only train and pretrain run under torchrun)"]


@pytest.mark.filterwarnings("ignore:.*image decoding and encoding capabilities of TorchVision")
def test_a_folder_of_images_trains_under_torchrun_streamed_or_in_memory(tmp_path):
    from test_folder import make_folder

    folder = make_folder(tmp_path / "data", n=80)
    args = ["train", "--dataset", f"folder:{folder}", "--tasks", "colour,brightness,item", "--image-size", "16",
            "--batch-size", "16", "--device", "cpu", "--epochs", "2", "--quiet"]
    memory = torchrun(*args, "--no-stream", "--out", tmp_path / "memory")
    assert memory.returncode == 0, memory.stderr
    streamed = torchrun(*args, "--stream", "--workers", "1", "--out", tmp_path / "streamed")
    assert streamed.returncode == 0, streamed.stderr
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["processes"] == 2
    pd.testing.assert_frame_equal(values(tmp_path / "streamed"), values(tmp_path / "memory"))
