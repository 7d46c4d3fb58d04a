"""Every normalizer against the NumPy oracle, PyTorch, and finite differences."""
from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit.testing import check_norm

from cases import CASES, TOL

DTYPES = [np.float32, np.float64]
STEPS = 3          # training steps before the evaluation-mode comparison


def _assert_close(actual, expected, dtype, what):
    np.testing.assert_allclose(actual, expected, **TOL[dtype], err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype):
    """Forward (train, then eval after several steps), backward and running stats vs reference."""
    norm = case.make(dtype)
    rng = np.random.default_rng(2)
    for step in range(STEPS):
        x = case.input(dtype, seed=10 + step)
        dy = rng.standard_normal(x.shape).astype(dtype)
        y_ref, mean_ref, var_ref = case.reference_forward(norm, x, training=True)
        grads_ref = case.reference_backward(norm, x, dy, training=True)
        y = norm.forward(x, training=True)
        dx = norm.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype
        _assert_close(y, y_ref, dtype, f"forward, step {step}")
        _assert_close(dx, grads_ref["x"], dtype, f"dx, step {step}")
        for key in norm.params:
            assert norm.grads[key].dtype == dtype
            _assert_close(norm.grads[key], grads_ref[key], dtype, f"grads[{key}], step {step}")
        if case.has_running_stats:
            _assert_close(norm.state["running_mean"], mean_ref, dtype, "running_mean")
            _assert_close(norm.state["running_var"], var_ref, dtype, "running_var")
            assert int(norm.state["num_batches_tracked"]) == step + 1
    x = case.input(dtype, seed=99)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y_ref, _, _ = case.reference_forward(norm, x, training=False)
    grads_ref = case.reference_backward(norm, x, dy, training=False)
    _assert_close(norm.forward(x, training=False), y_ref, dtype, "eval forward")
    _assert_close(norm.backward(dy), grads_ref["x"], dtype, "eval dx")
    for key in norm.params:
        _assert_close(norm.grads[key], grads_ref[key], dtype, f"eval grads[{key}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch(case, dtype):
    """Forward, backward and running statistics against PyTorch over several steps and eval."""
    torch = pytest.importorskip("torch")
    norm = case.make(dtype)
    params_t = {k: torch.tensor(v, requires_grad=True) for k, v in norm.params.items()}
    state_t = {k: torch.tensor(v) for k, v in norm.state.items()}
    rng = np.random.default_rng(3)
    for step in range(STEPS + 1):
        training = step < STEPS
        x = case.input(dtype, seed=20 + step)
        dy = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.tensor(x, requires_grad=True)
        for p in params_t.values():
            p.grad = None
        yt = case.torch_forward(torch, norm, xt, training, params_t, state_t)
        yt.backward(torch.tensor(dy))
        y = norm.forward(x, training=training)
        dx = norm.backward(dy)
        what = f"step {step} ({'train' if training else 'eval'})"
        _assert_close(y, yt.detach().numpy(), dtype, f"forward, {what}")
        _assert_close(dx, xt.grad.numpy(), dtype, f"dx, {what}")
        for key, p in params_t.items():
            _assert_close(norm.grads[key], p.grad.numpy(), dtype, f"grads[{key}], {what}")
        for key in ("running_mean", "running_var"):
            if key in norm.state:
                _assert_close(norm.state[key], state_t[key].numpy(), dtype, f"{key}, {what}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backward_finite_differences(case):
    norm = case.make(np.float64)
    x = case.input(np.float64)
    if case.name == "renorm":
        # r and d are stop-gradient, so the finite difference sees them move unless they are
        # clipped: push the running statistics far from the batch's so both clip.
        norm.state["running_mean"][...] = 100.0
        norm.state["running_var"][...] = 100.0
    check_norm(norm, x, training=True)
    if case.has_running_stats:
        norm.forward(x, training=True)         # non-trivial running statistics
        check_norm(norm, x, training=False)


def test_renorm_finite_differences_without_clipping_is_batch_norm():
    """r_max=1, d_max=0: r = 1, d = 0 are constants, so the full gradient is the stop-grad one."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    check_norm(normkit.make("renorm", 3, r_max=1.0, d_max=0.0, dtype=np.float64), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_non_contiguous_input(case, dtype):
    norm, twin = case.make(dtype), case.make(dtype)
    x = np.asfortranarray(case.input(dtype))
    dy = np.asfortranarray(np.random.default_rng(0).standard_normal(x.shape).astype(dtype))
    assert not x.flags.c_contiguous or x.ndim == 1
    np.testing.assert_array_equal(norm.forward(x, training=True),
                                  twin.forward(np.ascontiguousarray(x), training=True))
    np.testing.assert_array_equal(norm.backward(dy), twin.backward(np.ascontiguousarray(dy)))
