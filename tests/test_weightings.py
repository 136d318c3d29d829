"""Loss weightings: hand-computed values of each method, then every weighting through the CLI,
exact resume, and uncertainty weighting under torchrun."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch import nn

from csnet import tasks as tasks_lib
from csnet import weightings
from csnet.errors import UsageError
from csnet.weightings.gradnorm import gradnorm_grad
from csnet.weightings.pcgrad import project

TWO = {"a": tasks_lib.make("a", "classification", 3), "b": tasks_lib.make("b", "regression", 1, ([0.0], [1.0]))}


def test_uncertainty_loss_for_given_log_variances():
    u = weightings.make("uncertainty", TWO)
    with torch.no_grad():
        u.log_var.copy_(torch.tensor([0.5, -1.0]))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}
    # a (classification form): exp(-0.5) * 2 + 0.5; b (regression form): 0.5 * (exp(1) * 3 - 1)
    want = math.exp(-0.5) * 2 + 0.5 + 0.5 * (math.e * 3 - 1)
    assert u.combine(losses).item() == pytest.approx(want, rel=1e-6)
    assert u.weights() == pytest.approx({"a": math.exp(-0.5), "b": 0.5 * math.e})
    # its gradient: d/ds_a = -exp(-s_a) L_a + 1
    u.combine(losses).backward()
    assert u.log_var.grad[0].item() == pytest.approx(-math.exp(-0.5) * 2 + 1, rel=1e-6)


def test_dwa_weights_from_given_loss_histories():
    d = weightings.make("dwa", TWO)
    assert d.weights() == {"a": 1.0, "b": 1.0}  # the first two epochs
    d.epoch_end({"a": 1.0, "b": 2.0})
    assert d.weights() == {"a": 1.0, "b": 1.0}
    d.epoch_end({"a": 0.5, "b": 1.8})  # ratios 0.5 and 0.9; T = 2 tasks, temperature 2
    ea, eb = math.exp(0.5 / 2), math.exp(0.9 / 2)
    assert d.weights() == pytest.approx({"a": 2 * ea / (ea + eb), "b": 2 * eb / (ea + eb)})
    d.epoch_end({"a": 0.4, "b": 1.8})  # now 0.4/0.5 and 1.8/1.8
    e1, e2 = math.exp(0.8 / 2), math.exp(1.0 / 2)
    assert d.weights() == pytest.approx({"a": 2 * e1 / (e1 + e2), "b": 2 * e2 / (e1 + e2)})
    assert weightings.make("dwa:1", TWO).temperature == 1.0


def test_pcgrad_projects_two_conflicting_gradients():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # inner product -1: they conflict
    out = project(g, torch.Generator().manual_seed(0))
    # g1 - (g1.g2)/|g2|^2 g2 = (1, 0) + 1/2 (-1, 1) = (0.5, 0.5); g2 - (g2.g1)/|g1|^2 g1 = (-1, 1) + (1, 0) = (0, 1)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert out[0] @ g[1] == pytest.approx(0) and out[1] @ g[0] == pytest.approx(0)
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(project(agree, torch.Generator().manual_seed(0)), agree)  # no conflict: unchanged


def test_pcgrad_sets_the_projected_sum_on_shared_weights_only():
    shared = nn.Linear(2, 2, bias=False)
    heads = nn.ModuleDict({"a": nn.Linear(2, 1, bias=False), "b": nn.Linear(2, 1, bias=False)})
    with torch.no_grad():
        shared.weight.copy_(torch.eye(2))
        heads["a"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        heads["b"].weight.copy_(torch.tensor([[-1.0, 1.0]]))
    net = nn.ModuleDict({"shared": shared, "heads": heads})
    x = torch.tensor([[1.0, 1.0]])
    h = shared(x)
    losses = {"a": heads["a"](h).sum(), "b": heads["b"](h).sum()}
    weightings.make("pcgrad", TWO).backward(losses, net)
    # shared grads: a -> [[1,1],[0,0]], b -> [[-1,-1],[1,1]]; dot = -2, |b|^2 = 4, |a|^2 = 2
    ga, gb = torch.tensor([1.0, 1, 0, 0]), torch.tensor([-1.0, -1, 1, 1])
    want = (ga + 0.5 * gb) + (gb + 1.0 * ga)
    assert torch.allclose(shared.weight.grad.reshape(-1), want)
    assert torch.allclose(heads["a"].weight.grad, h.detach())  # a head: its own gradient, untouched


def test_gradnorm_update_on_a_two_task_toy_problem():
    w = torch.tensor([1.0, 1.0])
    norms = torch.tensor([2.0, 1.0])  # ||∇_W L_i||
    ratios = torch.tensor([0.5, 1.0])  # task b has trained less: it should gain weight
    grad = gradnorm_grad(w, norms, ratios, alpha=1.0)
    # G = (2, 1), mean 1.5; r = ratios / 0.75 = (2/3, 4/3); targets (1, 2); G - target = (1, -1)
    # d/dw_i |w_i n_i - target_i| = sign(.) n_i = (+2, -1)
    assert torch.allclose(grad, torch.tensor([2.0, -1.0]))
    g = weightings.make("gradnorm", TWO)
    with torch.no_grad():
        g.task_weight.copy_(torch.tensor([1.5, 0.1]))
    g.after_step()  # renormalised to sum to T
    w = g.task_weight.detach()
    assert w.sum().item() == pytest.approx(2.0) and (w[0] / w[1]).item() == pytest.approx(15)


@pytest.mark.parametrize("spec,message", [
    ("softmax", "unknown --weighting 'softmax'; valid: equal, fixed, uncertainty, dwa, gradnorm, pcgrad"),
    ("fixed:c=1", "--weighting fixed: no task 'c' in this run (tasks: a, b)"),
    ("fixed:a=-1", "the weight of a must be a finite number, 0 or more"),
    ("fixed:a=nan", "the weight of a must be a finite number, 0 or more"),
    ("fixed", "--weighting fixed needs its weights"),
    ("dwa:0", "the temperature must be a positive number"),
    ("uncertainty:2", "--weighting uncertainty takes no option"),
])
def test_bad_weightings_name_what_is_wrong(spec, message):
    with pytest.raises(UsageError) as e:
        weightings.make(spec, TWO)
    assert message in str(e.value)


def test_one_task_cannot_be_balanced():
    for name in ("gradnorm", "pcgrad", "dwa"):
        with pytest.raises(UsageError, match=f"--weighting {name} balances several tasks; this run has 1"):
            weightings.make(name, {"a": TWO["a"]})


# ---------------------------------------------------------------- through the CLI

SMALL = ["--val-size", "100", "--train-size", "256", "--test-size", "100", "--batch-size", "64", "--quiet",
         "--device", "cpu"]
SCENES = ["--dataset", "fashion-scenes", "--tasks", "segment,count", "--train-size", "64", "--val-size", "32",
          "--test-size", "32", "--batch-size", "32", "--quiet", "--device", "cpu"]
ALL = ["equal", "fixed:fine=1,coarse=0.5", "uncertainty", "dwa", "gradnorm", "pcgrad"]


@pytest.mark.parametrize("weighting", ALL)
def test_every_weighting_trains_the_fashion_pair_and_logs_its_weights(cli, data_root, tmp_path, weighting):
    code, _, err = cli("train", "--data-root", data_root, *SMALL, "--epochs", "3", "--weighting", weighting,
                       "--out", tmp_path / "r")
    assert code == 0, err
    m = pd.read_csv(tmp_path / "r" / "metrics.csv")
    w = m[m.metric == "loss_weight"].pivot(index="epoch", columns="task", values="value")
    assert list(w.columns) == ["coarse", "fine"] and len(w) == 3 and (w > 0).all().all()
    if weighting == "fixed:fine=1,coarse=0.5":
        assert (w.coarse == 0.5).all() and (w.fine == 1).all()
    if weighting in ("uncertainty", "gradnorm"):
        assert w.iloc[-1].tolist() != [1.0, 1.0]  # learned
    if weighting == "gradnorm":
        assert w.sum(1).tolist() == pytest.approx([2.0, 2.0, 2.0], abs=1e-4)
    # drawn where the weights moved; the plain sum and PCGrad (which projects gradients instead) keep 1
    assert (tmp_path / "r" / "plots" / "loss_weights.png").is_file() == (weighting not in ("equal", "pcgrad"))


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_every_weighting_trains_the_scene_benchmark(cli, data_root, tmp_path, weighting):
    code, _, err = cli("train", "--data-root", data_root, *SCENES, "--weighting", weighting, "--out", tmp_path / "r")
    assert code == 0, err


def test_gradnorm_needs_a_shared_layer_and_says_so_before_writing(cli, data_root, tmp_path):
    code, _, err = cli("train", "--data-root", data_root, *SMALL, "--stitch", "none", "--weighting", "gradnorm",
                       "--out", tmp_path / "r")
    assert code == 2 and "--weighting gradnorm needs a layer every task reaches" in err
    assert not (tmp_path / "r").exists()


def test_uncertainty_under_torchrun_keeps_one_log_variance_per_task_on_every_rank(data_root, tmp_path):
    script = tmp_path / "ranks.py"
    # after training, each rank saves its own weighting state, to compare the two processes' copies
    script.write_text(
        "import sys, torch, csnet.train as t\n"
        "original = t.fit\n"
        "def fit(*a, **k):\n"
        "    import csnet.weightings as W\n"
        "    made = []\n"
        "    make = W.make\n"
        "    W.make = lambda *x, **y: made.append(make(*x, **y)) or made[-1]\n"
        "    try:\n"
        "        return original(*a, **k)\n"
        "    finally:\n"
        "        import torch.distributed as d\n"
        "        torch.save(made[-1].state_dict(), sys.argv[1] + f'/rank{d.get_rank()}.pt')\n"
        "t.fit = fit\n"
        "import csnet.stages\n"
        "csnet.stages.fit = fit\n"
        "from csnet.cli import main\n"
        "sys.exit(main(sys.argv[2:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path), "train", "--data-root", str(data_root), *SMALL, "--weighting", "uncertainty",
           "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["log_var"] for r in (0, 1))
    assert torch.equal(r0, r1) and not torch.equal(r0, torch.zeros(2))


# ---------------------------------------------------------------- what a review found


def test_pcgrad_gradients_are_laid_out_like_channels_last_weights():
    """Fused Adam reads a weight and its gradient as flat memory: they must share a layout."""
    net = nn.ModuleDict({"conv": nn.Conv2d(2, 4, 3), "a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    net.to(memory_format=torch.channels_last)
    h = net["conv"](torch.randn(2, 2, 5, 5).contiguous(memory_format=torch.channels_last)).mean((2, 3))
    weightings.make("pcgrad", TWO).backward({"a": net["a"](h).sum(), "b": net["b"](h).sum()}, net)
    w = net["conv"].weight
    assert w.grad.stride() == w.stride()
    before = w.detach().clone()
    opt = torch.optim.Adam([w], lr=0.1, fused=True)
    opt.step()
    plain = before - 0.1 * torch.sign(w.grad)  # Adam's first step moves each weight by lr against its gradient
    assert torch.allclose(w.detach(), plain, atol=1e-4)


def test_dwa_keeps_its_history_on_the_weighting_device():
    d = weightings.make("dwa", TWO).to("meta")
    d.epoch_end({"a": 1.0, "b": 2.0})
    assert d.history.device.type == "meta"


def test_uncertainty_adds_no_regulariser_for_a_task_without_labels_in_the_batch():
    u = weightings.make("uncertainty", TWO)
    with torch.no_grad():
        u.log_var.copy_(torch.tensor([0.3, 0.0]))
    zero = torch.tensor(0.0)
    got = u.combine({"a": zero, "b": torch.tensor(1.0)}, {"a": zero, "b": torch.tensor(1.0)})
    assert got.item() == pytest.approx(0.5 * 1.0)  # a contributes nothing: no labels, no s_a term


def test_gradnorm_takes_each_tasks_first_loss_from_a_batch_with_labels():
    g = weightings.make("gradnorm", TWO)
    shared = nn.Linear(2, 2)
    heads = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)})

    class Net(nn.Module):
        def shared_parameters(self):
            return list(shared.parameters())

    x = torch.randn(3, 2)
    h = shared(x)
    losses = {"a": heads["a"](h).pow(2).mean(), "b": heads["b"](h).pow(2).mean() * 0}
    g.backward(losses, Net(), {"a": torch.tensor(1.0), "b": torch.tensor(0.0)})
    assert not torch.isnan(g.initial[0]) and torch.isnan(g.initial[1])  # b had no labels: no L_b(0) yet
    assert torch.equal(g.task_weight.grad, torch.zeros(2))  # one task alone: nothing to balance


def test_gradnorm_refuses_frozen_columns(cli, data_root, tmp_path):
    code, _, err = cli("train", "--data-root", data_root, *SMALL, "--freeze-columns", "--weighting", "gradnorm",
                       "--out", tmp_path / "r")
    assert code == 2 and "gradnorm measures gradients in the columns, which --freeze-columns freezes" in err


def test_a_bad_weighting_with_seeds_writes_no_folder(cli, data_root, tmp_path):
    code, _, err = cli("train", "--data-root", data_root, *SMALL, "--seeds", "0,1", "--weighting", "fixed:body=1",
                       "--out", tmp_path / "r")
    assert code == 2 and "no task 'body' in this run" in err
    assert not (tmp_path / "r").exists()
