"""The cross-stitch unit against the paper's formula, computed by a naive loop."""

import pytest
import torch

from csnet import CrossStitchUnit


def naive(weight: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """out_i[:, c] = sum_j w[i, j, c] * x_j[:, c], one channel and one pair of tasks at a time."""
    T, _, C = weight.shape
    outs = []
    for i in range(T):
        out = torch.zeros_like(xs[0])
        for j in range(T):
            for c in range(C):
                out[:, c] += weight[i, j, c] * xs[j][:, c]
        outs.append(out)
    return outs


@pytest.mark.parametrize("n_tasks", [2, 3, 5])
@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (4, 6)])
def test_unit_matches_formula_with_random_weights(n_tasks, shape):
    torch.manual_seed(0)
    unit = CrossStitchUnit(n_tasks, shape[1])
    with torch.no_grad():
        unit.weight.copy_(torch.randn_like(unit.weight))  # every (i, j, c) different
    xs = [torch.randn(shape, dtype=torch.float64).float() for _ in range(n_tasks)]
    for got, want in zip(unit(xs), naive(unit.weight.detach(), xs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_each_task_gets_its_own_mix():
    # A known defect of public implementations feeds the same mix to every task.
    unit = CrossStitchUnit(2, 3, alpha=0.9, beta=0.1)
    a, b = torch.ones(1, 3), torch.zeros(1, 3)
    out_a, out_b = unit([a, b])
    torch.testing.assert_close(out_a, torch.full((1, 3), 0.9))
    torch.testing.assert_close(out_b, torch.full((1, 3), 0.1))


def test_init_puts_alpha_on_diagonal_and_beta_off_it():
    w = CrossStitchUnit(3, 4, alpha=0.7, beta=0.15).weight.detach()
    assert w.shape == (3, 3, 4)
    for i in range(3):
        for j in range(3):
            assert torch.all(w[i, j] == (0.7 if i == j else 0.15))


def test_identity_returns_inputs_exactly():
    unit = CrossStitchUnit(3, 8, alpha=1.0, beta=0.0)
    xs = [torch.randn(2, 8, 3, 3) for _ in range(3)]
    for got, x in zip(unit(xs), xs):
        assert torch.equal(got, x)


def test_gradients_reach_off_diagonal_weights():
    unit = CrossStitchUnit(2, 4)
    xs = [torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)]
    out = unit(xs)
    (out[0].sum() + 2 * out[1].sum()).backward()
    g = unit.weight.grad
    # d out_0 / d w[0, 1, c] = x_1[:, c]
    torch.testing.assert_close(g[0, 1], xs[1].sum(dim=(0, 2, 3)))
    torch.testing.assert_close(g[1, 0], 2 * xs[0].sum(dim=(0, 2, 3)))
    assert torch.all(g[0, 1] != 0) and torch.all(g[1, 0] != 0)


def test_dict_in_dict_out():
    unit = CrossStitchUnit(2, 2)
    out = unit({"a": torch.ones(1, 2), "b": torch.zeros(1, 2)})
    assert list(out) == ["a", "b"]
    torch.testing.assert_close(out["b"], torch.full((1, 2), 0.1))


def test_wrong_number_of_inputs_is_refused():
    with pytest.raises(ValueError, match="2 tasks got 3"):
        CrossStitchUnit(2, 2)([torch.ones(1, 2)] * 3)


@pytest.mark.parametrize("mode", ["channel", "layer"])
@pytest.mark.parametrize("shape,layout", [((3, 4, 5, 5), "mixed"), ((3, 4, 5, 5), "channels_last"), ((3, 4), "rows")])
def test_unit_gradients_match_finite_differences(mode, shape, layout):
    """The unit's hand-written backward (weights and every input) against torch.autograd.gradcheck, on
    (B, C, H, W) inputs in either memory format or a mix of them, and on (B, C) rows."""
    torch.manual_seed(0)
    unit = CrossStitchUnit(3, shape[1], mode=mode).double()
    with torch.no_grad():
        unit.weight.copy_(torch.randn_like(unit.weight))
    xs = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    if layout != "rows":
        xs = [x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" or k == 0 else x
              for k, x in enumerate(xs)]
    xs = [x.requires_grad_() for x in xs]

    def f(w, *inputs):
        return tuple(torch.func.functional_call(unit, {"weight": w}, (list(inputs),)))

    w = unit.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (w, *xs))


def test_unit_backward_skips_inputs_that_need_no_gradient():
    unit = CrossStitchUnit(2, 3)
    frozen, trained = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, requires_grad=True)
    sum(o.sum() for o in unit([frozen, trained])).backward()
    assert frozen.grad is None and trained.grad is not None and unit.weight.grad is not None
