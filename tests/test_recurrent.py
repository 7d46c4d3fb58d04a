"""Recurrent batch norm: per-step statistics, masks, evaluation beyond max_steps, bad input.

The oracle is PyTorch's own ``F.batch_norm`` applied to each step's valid rows (or to all valid
rows of all steps for ``per_step=False``), with its running buffers updated by PyTorch; gradients
by autograd, and by finite differences with ``normkit.testing``.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import normkit
from normkit.kernels import _engine, batch
from normkit.recurrent import mask_from_lengths
from normkit.testing import check_norm, check_vjp

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float64: dict(rtol=1e-10, atol=1e-11), np.float32: dict(rtol=2e-5, atol=2e-5)}
EPS = 1e-5


def _make(F_, max_steps, dtype=np.float64, seed=0, **kwargs):
    norm = normkit.make("recurrent_batch", num_features=F_, max_steps=max_steps, dtype=dtype,
                        **kwargs)
    rng = np.random.default_rng(seed)
    norm.params["gamma"][...] = rng.uniform(0.5, 1.5, F_) * rng.choice([-1, 1], F_)
    if "beta" in norm.params:
        norm.params["beta"][...] = rng.standard_normal(F_)
    return norm


def _sequence(T, N, F_, dtype=np.float64, seed=1):
    """Inputs whose mean and spread change with t, so a per-step mistake shows."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None, None]
    return (rng.standard_normal((T, N, F_)) * (1 + 0.3 * t) + 0.5 * t - 1).astype(dtype)


def _snapshot(norm):
    return copy.deepcopy((norm.params, norm.grads, norm.state))


def _assert_same(a, b):
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)


class TorchRecurrentBN:
    """The oracle: F.batch_norm per step on the valid rows, PyTorch's running buffers."""

    def __init__(self, norm):
        S = norm.state["running_mean"].shape[0]
        self.norm = norm
        self.running_mean = [torch.tensor(norm.state["running_mean"][s], dtype=torch.float64)
                             for s in range(S)]
        self.running_var = [torch.tensor(norm.state["running_var"][s], dtype=torch.float64)
                            for s in range(S)]

    def forward(self, x, mask, training, gamma, beta):
        """x (T, N, F) tensor; returns y with 0 on padded positions."""
        T, N, F_ = x.shape
        mask = torch.ones(T, N, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        y = torch.zeros_like(x)
        norm = self.norm
        if training and not norm.per_step:
            valid = x[mask]                                    # (count, F)
            if valid.shape[0] > 0:
                y = y.index_put((mask,), F.batch_norm(valid, self.running_mean[0],
                                                      self.running_var[0], gamma, beta, True,
                                                      norm.momentum, norm.eps))
            return y
        S = len(self.running_mean)
        for t in range(T):
            rows = mask[t]
            if rows.sum() == 0:
                continue
            s = min(t, S - 1)
            y_t = F.batch_norm(x[t][rows], self.running_mean[s], self.running_var[s], gamma, beta,
                               training, norm.momentum, norm.eps)
            y = y.index_put((torch.full((int(rows.sum()),), t), rows.nonzero()[:, 0]), y_t)
        return y


def _torch_params(norm):
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in norm.params.items()}
    return p, p.get("gamma"), p.get("beta")


MASKS = {
    "none": lambda T, N: None,
    "lengths": lambda T, N: mask_from_lengths(np.linspace(T, 1, N).round().astype(int), T),
    "scattered": lambda T, N: np.random.default_rng(7).random((T, N)) < 0.7,
}


def _fix_mask(mask):
    """No step with exactly one valid row (refused in training): give it a second one."""
    if mask is None:
        return None
    mask = mask.copy()
    for t in np.flatnonzero(mask.sum(axis=1) == 1):
        mask[t, np.flatnonzero(~mask[t])[0]] = True
    return mask


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("per_step", [True, False], ids=["per_step", "shared"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("T", [1, 5, 30])
def test_matches_torch(T, mask_kind, per_step, dtype):
    """Three training steps (forward, all gradients, running stats), then evaluation."""
    N, F_ = 6, 3
    norm = _make(F_, max_steps=T, dtype=dtype, per_step=per_step, bias=True)
    oracle = TorchRecurrentBN(norm)
    rng = np.random.default_rng(3)
    for step in range(3):
        x = _sequence(T, N, F_, dtype, seed=10 + step)
        mask = _fix_mask(MASKS[mask_kind](T, N))
        dy = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        p, gamma, beta = _torch_params(norm)
        yt = oracle.forward(xt, mask, True, gamma, beta)
        (yt * torch.tensor(dy, dtype=torch.float64)).sum().backward()

        y = norm.forward(x, training=True, mask=mask)
        dx = norm.backward(dy)
        assert y.dtype == dtype and dx.dtype == dtype
        np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[dtype], err_msg=f"y, step {step}")
        np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL[dtype], err_msg=f"dx, step {step}")
        for key in norm.params:
            np.testing.assert_allclose(norm.grads[key], p[key].grad.numpy(), **TOL[dtype],
                                       err_msg=f"grads[{key}], step {step}")
        np.testing.assert_allclose(norm.state["running_mean"],
                                   torch.stack(oracle.running_mean).numpy(), **TOL[dtype])
        np.testing.assert_allclose(norm.state["running_var"],
                                   torch.stack(oracle.running_var).numpy(), **TOL[dtype])
    # evaluation, twice as long as training: steps >= T use step T-1's statistics
    x = _sequence(2 * T, N, F_, dtype, seed=99)
    mask = MASKS[mask_kind](2 * T, N)
    before = _snapshot(norm)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    p, gamma, beta = _torch_params(norm)
    yt = oracle.forward(xt, mask, False, gamma, beta)
    dy = rng.standard_normal(x.shape).astype(dtype)
    (yt * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    y = norm.forward(x, training=False, mask=mask)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[dtype], err_msg="eval y")
    _assert_same(before[2:], (norm.state,))                 # evaluation changes no state
    np.testing.assert_allclose(norm.backward(dy), xt.grad.numpy(), **TOL[dtype], err_msg="eval dx")
    for key in norm.params:
        np.testing.assert_allclose(norm.grads[key], p[key].grad.numpy(), **TOL[dtype])


@pytest.mark.parametrize("per_step", [True, False], ids=["per_step", "shared"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_finite_differences(mask_kind, per_step):
    T, N, F_ = 5, 4, 3
    norm = _make(F_, max_steps=T, per_step=per_step)
    x = _sequence(T, N, F_)
    mask = _fix_mask(MASKS[mask_kind](T, N))
    if mask is None:
        check_norm(norm, x, training=True)
        norm.forward(x, training=True)
        check_norm(norm, x, training=False)
        return
    for training in (True, False):
        dy = np.random.default_rng(4).standard_normal(x.shape)
        norm.forward(x, training=training, mask=mask)
        grads = {"x": norm.backward(dy), **{k: v.copy() for k, v in norm.grads.items()}}
        state = copy.deepcopy(norm.state)

        def fun(x, gamma, beta):
            norm.params["gamma"][...] = gamma
            norm.params["beta"][...] = beta
            for k, v in state.items():
                norm.state[k][...] = v
            return norm.forward(x, training=training, mask=mask)

        params = {k: v.copy() for k, v in norm.params.items()}
        check_vjp(fun, {"x": x, **params}, grads, dy)
        for k, v in params.items():
            norm.params[k][...] = v
    assert np.all(grads["x"][~mask] == 0)                 # padded positions: zero gradient


def test_mask_of_all_true_is_the_unmasked_computation():
    """The engine's unmasked path and its masked (float64) path agree."""
    x = _sequence(7, 5, 4)
    dy = np.random.default_rng(2).standard_normal(x.shape)
    for per_step in (True, False):
        a, b = _make(4, 7, per_step=per_step), _make(4, 7, per_step=per_step)
        ya, yb = a.forward(x, True), b.forward(x, True, mask=np.ones((7, 5), bool))
        np.testing.assert_allclose(ya, yb, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(a.backward(dy), b.backward(dy), rtol=1e-11, atol=1e-12)
        for k in a.grads:
            np.testing.assert_allclose(a.grads[k], b.grads[k], rtol=1e-11)
        for k in a.state:
            np.testing.assert_allclose(a.state[k], b.state[k], rtol=1e-12)


def test_padding_a_batch_changes_nothing():
    """Extra padded sequences and steps holding garbage (even NaN) leave every result as it was."""
    T, N, F_ = 6, 5, 3
    x = _sequence(T, N, F_)
    mask = mask_from_lengths([6, 6, 4, 3, 2], T)
    dy = np.random.default_rng(5).standard_normal(x.shape)
    plain = _make(F_, max_steps=T + 3)
    y = plain.forward(x, True, mask=mask)
    dx = plain.backward(dy)

    padded_x = np.full((T + 3, N + 2, F_), np.nan)
    padded_x[:T, :N] = x
    padded_x[:T, :N][~mask] = 1e30                         # garbage at padded positions
    padded_mask = np.zeros((T + 3, N + 2), bool)
    padded_mask[:T, :N] = mask
    padded_dy = np.random.default_rng(6).standard_normal(padded_x.shape)
    padded_dy[:T, :N] = dy
    padded = _make(F_, max_steps=T + 3)
    py = padded.forward(padded_x, True, mask=padded_mask)
    pdx = padded.backward(padded_dy)

    np.testing.assert_array_equal(py[:T, :N], y)
    assert np.all(py[~padded_mask] == 0) and np.all(pdx[~padded_mask] == 0)
    np.testing.assert_array_equal(pdx[:T, :N], dx)
    for k in plain.grads:
        np.testing.assert_array_equal(padded.grads[k], plain.grads[k])
    for k in plain.state:
        np.testing.assert_array_equal(padded.state[k], plain.state[k])
    # and masking is batch norm over the valid rows only: the last step is that of 2 sequences
    only = _make(F_, max_steps=1)
    np.testing.assert_allclose(only.forward(x[T - 1:, :2], True), y[T - 1:, :2], rtol=1e-12)


def test_per_step_running_statistics_follow_the_scale_of_each_step():
    T, N, F_ = 8, 64, 2
    norm = normkit.make("recurrent_batch", F_, max_steps=T, momentum=0.2, dtype=np.float64)
    shared = normkit.make("recurrent_batch", F_, per_step=False, momentum=0.2, dtype=np.float64)
    rng = np.random.default_rng(0)
    scale = 1.0 + np.arange(T)                              # step t: mean 3 t, std 1 + t
    for _ in range(60):
        x = rng.standard_normal((T, N, F_)) * scale[:, None, None] + 3.0 * np.arange(T)[:, None, None]
        norm.forward(x, True)
        shared.forward(x, True)
    mean_error = np.abs(norm.state["running_mean"] - 3.0 * np.arange(T)[:, None])
    assert np.all(mean_error < 0.25 * scale[:, None]), mean_error
    np.testing.assert_allclose(np.sqrt(norm.state["running_var"]), np.repeat(scale[:, None], F_, 1),
                               rtol=0.15)
    assert np.all(np.diff(norm.state["running_var"], axis=0) > 0)
    np.testing.assert_array_equal(norm.state["num_batches_tracked"], np.full(T, 60))
    # one set of statistics: the pooled mean and variance of all steps
    assert shared.state["running_mean"].shape == (1, F_)
    pooled_var = np.mean(scale ** 2) + np.var(3.0 * np.arange(T))
    np.testing.assert_allclose(shared.state["running_mean"], 3.0 * np.mean(np.arange(T)), atol=0.5)
    np.testing.assert_allclose(shared.state["running_var"], pooled_var, rtol=0.1)


def test_momentum_one_copies_each_steps_batch_statistics():
    x = _sequence(4, 10, 3)
    norm = normkit.make("recurrent_batch", 3, max_steps=6, momentum=1.0, dtype=np.float64)
    norm.forward(x, True)
    np.testing.assert_allclose(norm.state["running_mean"][:4], x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(norm.state["running_var"][:4], x.var(axis=1, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(norm.state["running_mean"][4:], 0)     # steps not seen
    np.testing.assert_array_equal(norm.state["num_batches_tracked"], [1, 1, 1, 1, 0, 0])


def test_evaluation_beyond_max_steps_uses_the_last_steps_statistics():
    norm = _make(3, max_steps=3)
    norm.forward(_sequence(3, 8, 3), True)
    before = _snapshot(norm)
    x = _sequence(7, 4, 3, seed=9)
    y = norm.forward(x, False)
    mean, var = norm.state["running_mean"], norm.state["running_var"]
    gamma, beta = norm.params["gamma"], norm.params["beta"]
    for t in range(7):
        s = min(t, 2)
        expected = (x[t] - mean[s]) / np.sqrt(var[s] + norm.eps) * gamma + beta
        np.testing.assert_allclose(y[t], expected, rtol=1e-12, atol=1e-12)
    _assert_same(before[::2], (norm.params, norm.state))
    np.testing.assert_array_equal(norm.forward(x, False), y)


def test_a_step_without_valid_rows_is_skipped():
    """Documented rule: a fully masked step is skipped — output 0, running stats unchanged."""
    norm = normkit.make("recurrent_batch", 3, max_steps=4, dtype=np.float64)
    x = _sequence(4, 5, 3)
    mask = np.ones((4, 5), bool)
    mask[2] = False
    y = norm.forward(x, True, mask=mask)
    assert np.all(y[2] == 0)
    np.testing.assert_array_equal(norm.state["running_mean"][2], 0)
    np.testing.assert_array_equal(norm.state["running_var"][2], 1)
    np.testing.assert_array_equal(norm.state["num_batches_tracked"], [1, 1, 0, 1])
    assert np.all(norm.backward(np.ones_like(x))[2] == 0)


def test_grow_extends_the_statistics():
    norm = normkit.make("recurrent_batch", 2, max_steps=2, grow=True, momentum=1.0, dtype=np.float64)
    norm.forward(_sequence(2, 6, 2), True)
    last = norm.state["running_mean"][1].copy()
    x = _sequence(5, 6, 2, seed=3)
    norm.forward(x[:, :, :], True)
    assert norm.max_steps == 5 and norm.state["running_mean"].shape == (5, 2)
    np.testing.assert_allclose(norm.state["running_mean"], x.mean(axis=1), rtol=1e-12)
    assert not np.allclose(last, norm.state["running_mean"][1])
    np.testing.assert_array_equal(norm.state["num_batches_tracked"], [2, 2, 1, 1, 1])


def test_kernels_callable_directly():
    """Per-step batch norm as functional kernels: ghost batch norm on the (T*N, F) view with
    virtual batches of N rows (per-step statistics (T, F)); masked, the engine itself."""
    T, N, F = 4, 6, 3
    x = _sequence(T, N, F)
    gamma, beta = np.full(F, 2.0), np.full(F, 0.5)
    y, mean, var = batch.ghost_forward_train(x.reshape(T * N, F), gamma, beta, EPS, N)
    assert mean.shape == var.shape == (T, F)
    np.testing.assert_allclose(mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(y.reshape(x.shape), (x - x.mean(1, keepdims=True))
                               / np.sqrt(x.var(1, keepdims=True) + EPS) * 2.0 + 0.5, rtol=1e-10)
    dx, dgamma, dbeta = batch.ghost_backward(np.ones((T * N, F)), x.reshape(T * N, F), gamma, mean,
                                             var, EPS, N)
    np.testing.assert_allclose(dx, 0, atol=1e-9)             # sum(y) is constant in x
    np.testing.assert_allclose(dbeta, 24.0)
    mask = np.ones((T, N), bool)
    mask[:, 0] = False
    mean_m, var_m, count = np.empty((T, F)), np.empty((T, F)), np.empty(T)
    _engine.forward(x.reshape(T * N, F, 1, 1), N, gamma.reshape(F, 1), beta.reshape(F, 1), EPS,
                    True, mask.reshape(T * N, 1), True, np.empty((T * N, F, 1, 1)), mean_m, var_m,
                    count, _engine.STATS_AND_APPLY)
    np.testing.assert_array_equal(count, [5, 5, 5, 5])
    np.testing.assert_allclose(mean_m, x[:, 1:].mean(axis=1), rtol=1e-12)


# -- bad input --------------------------------------------------------------------------------

def _trained(**kwargs):
    norm = normkit.make("recurrent_batch", 3, **{"max_steps": 4, **kwargs})
    norm.forward(_sequence(4, 5, 3, np.float32), True)
    return norm


F32 = np.float32
BAD_CALLS = [
    ("2-D input", lambda n: n.forward(np.ones((5, 3), F32), True), ValueError, "time-major (T, N, num_features)"),
    ("batch-major channels", lambda n: n.forward(np.ones((4, 3, 5), F32), True), ValueError,
     "num_features=3"),
    ("mask shape", lambda n: n.forward(np.ones((4, 5, 3), F32), True, mask=np.ones((5, 4), bool)),
     ValueError, "mask must have shape (T, N) = (4, 5)"),
    ("mask dtype", lambda n: n.forward(np.ones((4, 5, 3), F32), True, mask=np.ones((4, 5))),
     TypeError, "bool"),
    ("one valid row in a step", lambda n: n.forward(
        np.ones((4, 5, 3), F32), True, mask=np.eye(4, 5, dtype=bool) | (np.arange(4) != 2)[:, None]),
     ValueError, "1 valid value at step 2"),
    ("batch of one", lambda n: n.forward(np.ones((4, 1, 3), F32), True), ValueError,
     "more than 1 value per feature"),
    ("longer than max_steps", lambda n: n.forward(np.ones((5, 5, 3), F32), True), ValueError,
     "max_steps=4"),
    ("dtype", lambda n: n.forward(np.ones((4, 5, 3)), True), TypeError, "dtype=np.float64"),
    ("dy shape", lambda n: n.backward(np.ones((4, 5, 2), F32)), ValueError, "dy must have the shape"),
]


@pytest.mark.parametrize("call,exc,fragment", [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_clearly_and_mutates_nothing(call, exc, fragment):
    norm = _trained()
    before = _snapshot(norm)
    saved = norm._saved
    with pytest.raises(exc) as info:
        call(norm)
    assert fragment in str(info.value)
    _assert_same(before, _snapshot(norm))
    assert norm._saved is saved


def test_one_valid_row_is_fine_in_evaluation_and_longer_sequences_too():
    norm = _trained()
    y = norm.forward(np.ones((9, 1, 3), F32), False)
    assert y.shape == (9, 1, 3) and np.isfinite(y).all()


@pytest.mark.parametrize("call,exc,fragment", [
    (lambda: normkit.make("recurrent_batch", 4), ValueError, "max_steps must be given"),
    (lambda: normkit.make("recurrent_batch", 4, max_steps=0), ValueError, "max_steps"),
    (lambda: normkit.make("recurrent_batch", 4, max_steps=3, per_step="no"), TypeError, "per_step"),
    (lambda: normkit.make("recurrent_batch", 4, max_steps=3, momentum=2), ValueError, "momentum"),
    (lambda: normkit.make("recurrent_batch", 4, max_steps=3, eps=0), ValueError, "eps"),
])
def test_bad_construction(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


def test_registry_and_options():
    assert "recurrent_batch" in normkit.available()
    assert isinstance(normkit.make("recurrent_batch", 4, max_steps=2), normkit.RecurrentBatchNorm)
    no_shift = normkit.make("recurrent_batch", 4, max_steps=2, bias=False)
    assert set(no_shift.params) == {"gamma"} == set(no_shift.grads)
    assert normkit.make("recurrent_batch", 4, max_steps=2, affine=False).params == {}
    assert normkit.make("recurrent_batch", 4, per_step=False).state["running_mean"].shape == (1, 4)
