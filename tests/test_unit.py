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


# ---------------------------------------------------------------- the compiled CPU kernel (native.py)

from csnet.models import native  # noqa: E402
from csnet.models.unit import _Mix  # noqa: E402

LAYOUTS = {  # shape, memory format: (N, C, K) views the kernel walks, with channel counts and runs
    "channels_last": ((6, 32, 5, 7), torch.channels_last),  # off the 16-wide vectors: K = 1, 2 full vectors
    "channels_last_odd": ((3, 17, 4, 4), torch.channels_last),  # a 1-channel tail after a vector
    "nchw": ((4, 6, 5, 7), torch.contiguous_format),  # runs of 35: 2 vectors and a 3-value tail
    "rows": ((9, 1030), torch.contiguous_format),  # the fc unit: several channel blocks
}


def _run_mix(w, xs, grads):
    w = w.detach().clone().requires_grad_()
    xs = [x.detach().clone().requires_grad_() for x in xs]
    outs = _Mix.apply(w, *xs)
    torch.autograd.backward(outs, grads)
    return outs, w.grad, [x.grad for x in xs]


@pytest.mark.skipif(not native.sys.platform.startswith("linux") or not native.shutil.which("cc"),
                    reason="the kernel is built with cc on Linux")
def test_native_kernel_is_built_and_used_here():
    # A compile error would otherwise pass unnoticed: the unit falls back to tensor ops.
    x = torch.randn(2, 3)
    assert native.usable(torch.ones(2, 2, 3), [x, x]), native.status()
    assert native.status().startswith("native")


@pytest.mark.parametrize("n_tasks", [2, 3, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_native_kernel_matches_float64_sums(n_tasks, layout, mode):
    """Outputs, weight gradients and input gradients of the float32 kernel against the same unit in
    float64 (which takes the tensor-op path), with incoming gradients in the other memory format."""
    shape, fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    w = torch.randn((n_tasks, n_tasks, shape[1]) if mode == "channel" else (n_tasks, n_tasks))
    xs = [torch.randn(shape).contiguous(memory_format=fmt) for _ in range(n_tasks)]
    grads = [torch.randn(shape) for _ in range(n_tasks)]  # contiguous: converted by the kernel's caller
    if not native.usable(w, xs):
        pytest.skip(native.status())
    outs, gw, gxs = _run_mix(w, xs, grads)
    outs64, gw64, gxs64 = _run_mix(w.double(), [x.double() for x in xs], [g.double() for g in grads])
    for got, want in zip([*outs, gw, *gxs], [*outs64, gw64, *gxs64]):
        assert got.dtype == torch.float32
        # relative to the tensor's largest value: weight gradients sum thousands of products
        assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert all(g.is_contiguous(memory_format=fmt) for g in [*outs, *gxs])


def test_native_kernel_leaves_out_gradients_nobody_needs(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(2, 2, 4)
    frozen, trained = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2, requires_grad=True)
    grads = [torch.randn(3, 4, 2, 2), torch.ones(1, 1, 1, 1).expand(3, 4, 2, 2)]  # dense, and stride 0 as o.sum() gives
    calls = []
    original = native.mix_backward
    monkeypatch.setattr(native, "mix_backward", lambda *a: calls.append(a[3:]) or original(*a))
    torch.autograd.backward(_Mix.apply(w, frozen, trained), grads)  # w needs no gradient either
    assert frozen.grad is None and w.grad is None
    torch.testing.assert_close(trained.grad, (w[0, 1].view(1, 4, 1, 1) * grads[0] + w[1, 1].view(1, 4, 1, 1) * grads[1]))
    assert calls == ([(False, True)] if native.usable(w, [frozen]) else [])


@pytest.mark.parametrize("env,expect", [({"CSNET_NATIVE": "0"}, "turned off"),
                                        ({"CC": "false"}, "false failed")])
def test_without_the_kernel_the_unit_falls_back_to_tensor_ops(monkeypatch, tmp_path, env, expect):
    monkeypatch.setenv("CSNET_CACHE", str(tmp_path))  # nothing cached: a broken compiler must be tried
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    native._load.cache_clear()
    try:
        assert native.status().startswith("PyTorch ops") and expect in native.status()
        unit = CrossStitchUnit(2, 3, alpha=0.9, beta=0.1)
        out_a, out_b = unit([torch.ones(2, 3), torch.zeros(2, 3)])
        torch.testing.assert_close(out_b, torch.full((2, 3), 0.1))
    finally:
        native._load.cache_clear()


def test_kernels_switched_off_inside_off():
    # csnet bench measures both paths in one process with this switch.
    x = torch.randn(2, 3)
    with native.off():
        assert not native.usable(torch.ones(2, 2, 3), [x, x])
        assert not native.pooled_maps_usable(torch.randn(1, 2, 4, 4).contiguous(memory_format=torch.channels_last))
    assert native.usable(torch.ones(2, 2, 3), [x, x]) == native.status().startswith("native")
