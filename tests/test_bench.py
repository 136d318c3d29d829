"""The benchmark compares like with like: its straightforward network computes what csnet's does."""

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
    code, out, err = cli("bench", "--quick", "--examples", "256", "--out", tmp_path / "b")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "b" / "bench.csv").set_index("measure")
    rows = table.value.to_dict()
    for key in ("matmul_gflops", "unstitched", "csnet", "straightforward", "csnet_vs_straightforward",
                "fraction_of_flop_limit", "stitch_overhead_2", "stitch_overhead_4"):
        assert float(rows[key]) == float(rows[key]), key  # a number, not NaN
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
