"""The benchmark compares like with like: its straightforward network computes what csnet's does."""

import tempfile

import pandas as pd
import pytest
import torch

from csnet.bench import _StraightforwardNet, _net, matmul_peak


def test_straightforward_reference_computes_the_same_function():
    net, _ = _net(2, "all")
    reference = _StraightforwardNet(dict(net.columns), ["pool1", "pool2", "fc"])  # same column modules
    net.eval(), reference.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        got, want = net(x), reference(x)
    for task in ("fine", "coarse"):
        torch.testing.assert_close(got[task], want[task], rtol=1e-5, atol=1e-5)


def test_bench_command_writes_its_table(cli, tmp_path, monkeypatch):
    import csnet.bench as bench

    monkeypatch.setattr(bench, "matmul_peak", lambda seconds=2.0: matmul_peak(0.05))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, out, err = cli("bench", "--quick", "--examples", "256", "--out", tmp_path / "b")
    assert code == 0, err
    assert list(scratch.iterdir()) == []  # the DataLoader's copy of the IDX files is gone
    table = pd.read_csv(tmp_path / "b" / "bench.csv").set_index("measure")
    rows = table.value.to_dict()
    from csnet.accel.build import lib

    shares = ("share_unit", "share_unit_4_tasks", "share_conv-block") if lib() is not None else ()
    for key in ("matmul_gflops", "unstitched", "csnet", "straightforward", "csnet_vs_straightforward",
                "fraction_of_flop_limit", "products_alone_fraction", "stitch_overhead_2", "stitch_overhead_4",
                *shares):
        assert float(rows[key]) == float(rows[key]), key  # a number, not NaN
    if not shares:  # no kernels (CSNET_NATIVE=0, no compiler): no shares to judge
        assert not any(key.startswith("share_") for key in rows)
    # two columns (2 x 7,059,968 MACs) + units (4 x (6,272 + 3,136 + 1,024)); training = 3 forward passes
    assert float(rows["train_mflop_per_example"]) == pytest.approx(3 * 2 * 14_161_664 / 1e6, rel=1e-5)
    ratio = float(rows["csnet_vs_straightforward"])
    assert table.target["csnet_vs_straightforward"] == f"≥ 1.25: {'met' if ratio >= 1.25 else 'NOT met'}"


def test_verdicts_read_each_target_the_right_way_round():
    from csnet.bench import verdict

    assert verdict("stitch_overhead_8", 0.149) == "≤ 0.15: met"
    assert verdict("stitch_overhead_8", 0.151) == "≤ 0.15: NOT met"
    assert verdict("fraction_of_flop_limit", 0.8) == "≥ 0.75: met"
    assert verdict("fraction_of_flop_limit", 0.5) == "≥ 0.75: NOT met"
    assert verdict("csnet", 1000.0) == ""
    assert verdict("share_conv-block", 0.029) == "≥ 0.03: NOT met"
    assert verdict("share_unit_8_tasks", 0.12) == "≥ 0.03: met"
    assert verdict("share_unit", 0.01) == ""  # judged with more tasks, where stitching costs most


def test_the_products_ceiling_runs_every_product_of_a_step_as_training_does():
    from torch import nn

    from csnet.bench import product_calls

    net, _ = _net(2, "all")
    calls = product_calls(net, torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8))
    columns = [net.columns[t] for t in ("fine", "coarse")]
    layers = [m for c in columns for m in c.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(map(id, (c[0] for c in calls))) == sorted(map(id, layers))  # each one once
    seen = {id(c[0]): c[1:] for c in calls}  # input shape, needs a gradient, memory format
    for column in columns:
        # the images need no gradient; every later input does (the step computes its gradient too)
        assert not seen[id(column.stages["pool1"][0])][1]
        assert seen[id(column.stages["pool2"][0])] == ((8, 32, 14, 14), True, torch.channels_last)
    assert all(c[2] for c in calls if isinstance(c[0], nn.Linear))


def test_freed_activations_stay_with_the_process():
    """``keep_freed_memory`` (which the CLI calls) stops malloc handing freed blocks back to the
    kernel, from which they come back as fresh pages to fault in and zero (about 4,000 page faults
    per training step of the Fashion pair by default). A "step" allocates five 3 MiB activations
    and frees them: by default the first step's memory leaves the process (each block is its own
    mmap), and later steps' may or may not (glibc trims its heap by heuristics); kept, none ever
    does. Child processes, since the setting is process-wide."""
    import subprocess
    import sys

    script = """
import os, sys, torch
from csnet.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for _ in range(3):
    activations = [torch.ones(3 << 18) for _ in range(5)]
    held = rss()
    del activations
    print((held - rss()) >> 20)  # MiB handed back
"""
    handed_back = {mode: [int(v) for v in subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                                                         text=True, check=True).stdout.split()]
                   for mode in ("default", "keep")}
    assert handed_back["default"][0] >= 10
    assert max(handed_back["keep"]) <= 0  # nothing handed back (the RSS may grow by a page or so meanwhile)


def test_epoch_overhead_reads_each_epoch_of_a_real_run(data_root, monkeypatch):
    from csnet.bench import epoch_overhead

    monkeypatch.setenv("CSNET_DATA_ROOT", str(data_root))
    r = epoch_overhead(("--train-size", "256", "--val-size", "128", "--test-size", "128"), epochs=2)
    assert "epoch_run" not in r, r
    ratios = [float(v) for v in r["epoch_over_steps_all"].split(" / ")]
    assert len(ratios) == 2 and all(v > 1 for v in ratios)  # an epoch is more than its training steps
    assert r["epoch_over_steps"] == pytest.approx(min(ratios), abs=1e-3)
    assert r["epoch_s"] > r["train_steps_s"] > 0 and r["peak_rss_mib"] > 100
