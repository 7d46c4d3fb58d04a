"""The LSTM layer (plain, BN-LSTM, LN-LSTM) against a PyTorch autograd loop and finite differences.

The oracle is written here with torch ops: an ``LSTMCell``-style loop over time steps with
``F.batch_norm`` on each step's valid rows (PyTorch updating the running buffers) or
``F.layer_norm``, carrying the state of padded rows — independent of normkit's kernels.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import normkit
from normkit.nn import LSTM, clip_grad_norm
from normkit.recurrent import mask_from_lengths
from normkit.testing import GradientMismatch, check_vjp

torch = pytest.importorskip("torch")
F = torch.nn.functional

NORMS = ["none", "recurrent_batch", "layer"]
TOL64 = dict(rtol=1e-9, atol=1e-11)


def _lstm(norm, D=3, H=4, T=5, dtype=np.float64, seed=0, **kwargs):
    """An LSTM with random, non-trivial parameters (not its structured initialization)."""
    lstm = LSTM(D, H, norm=norm, max_steps=T, dtype=dtype, seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 100)
    for key, value in lstm.params.items():
        if key.startswith("gamma"):
            value[...] = rng.uniform(0.1, 0.6, value.shape)
        else:
            value[...] = rng.standard_normal(value.shape) * (0.5 if key.startswith("W") else 0.3)
    return lstm


def _inputs(T, N, D=3, H=4, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None, None]
    x = (rng.standard_normal((T, N, D)) * (1 + 0.05 * t) + 0.1 * t).astype(dtype)
    h0 = (rng.standard_normal((N, H)) * 0.5).astype(dtype)
    c0 = (rng.standard_normal((N, H)) * 0.5).astype(dtype)
    return x, h0, c0


def _mask(T, N):
    """Variable lengths, two of them full-length so that every step has 2+ valid rows."""
    lengths = np.linspace(T, 1, N).round().astype(int)
    lengths[:2] = T
    return mask_from_lengths(lengths, T)


# -- the oracle -------------------------------------------------------------------------------

class TorchLSTM:
    def __init__(self, lstm):
        self.lstm = lstm
        self.running = {}                          # site -> ([mean per slot], [var per slot])
        for site, norm in lstm.norms.items():
            if "running_mean" in norm.state:
                S = norm.state["running_mean"].shape[0]
                self.running[site] = (
                    [torch.tensor(norm.state["running_mean"][s]) for s in range(S)],
                    [torch.tensor(norm.state["running_var"][s]) for s in range(S)])

    def _batch_norm_step(self, site, t, v, rows, gamma, beta, training):
        """F.batch_norm over the valid rows of v (N, F) at step t; zeros on the others."""
        norm = self.lstm.norms[site]
        out = torch.zeros_like(v)
        if rows.sum() == 0:
            return out
        means, variances = self.running[site]
        s = min(t, len(means) - 1)
        if training and not norm.per_step:           # per-step statistics, pooled update later
            y = F.batch_norm(v[rows], None, None, gamma, beta, True, 0.0, norm.eps)
        else:
            y = F.batch_norm(v[rows], means[s], variances[s], gamma, beta, training, norm.momentum,
                             norm.eps)
        return out.index_put((rows.nonzero()[:, 0],), y)

    def _pooled_update(self, site, values):
        """per_step=False: one running slot updated with the statistics of all steps' values."""
        norm = self.lstm.norms[site]
        allv = torch.cat(values).detach()
        means, variances = self.running[site]
        m = norm.momentum
        means[0] = (1 - m) * means[0] + m * allv.mean(0)
        variances[0] = (1 - m) * variances[0] + m * allv.var(0, unbiased=True)

    def forward(self, x, mask, h0, c0, p, training):
        lstm = self.lstm
        T, N, D = x.shape
        H = lstm.hidden_size
        kind = lstm.norm
        mask = torch.ones(T, N, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        x = torch.where(mask[:, :, None], x, torch.zeros_like(x))
        xw = x @ p["W_x"]                               # (T, N, 4H)
        if "x" not in lstm.norms:                       # "none", or input_norm=False
            xn = xw
        elif kind == "recurrent_batch" and not (training and not lstm.norms["x"].per_step):
            xn = torch.stack([self._batch_norm_step("x", t, xw[t], mask[t], p["gamma_x"], None,
                                                    training) for t in range(T)])
        elif kind == "recurrent_batch":                 # pooled over all steps in training
            norm = lstm.norms["x"]
            means, variances = self.running["x"]
            y = F.batch_norm(xw[mask], means[0], variances[0], p["gamma_x"], None, True,
                             norm.momentum, norm.eps)
            xn = torch.zeros_like(xw).index_put((mask,), y)
        elif kind == "layer":
            xn = F.layer_norm(xw, (4 * H,), p["gamma_x"], p["beta_x"], lstm.eps)
        else:
            xn = xw
        h, c, outputs = h0, c0, []
        seen = {"h": [], "c": []}
        for t in range(T):
            rows = mask[t]
            r = h @ p["W_h"]
            if kind == "recurrent_batch":
                rn = self._batch_norm_step("h", t, r, rows, p["gamma_h"], None, training)
            elif kind == "layer":
                rn = F.layer_norm(r, (4 * H,), p["gamma_h"], p["beta_h"], lstm.eps)
            else:
                rn = r
            a = rn + xn[t] + p["b"]
            f, i, o, g = a.split(H, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if kind == "recurrent_batch":
                cn = self._batch_norm_step("c", t, c_new, rows, p["gamma_c"], p["beta_c"], training)
            elif kind == "layer":
                cn = F.layer_norm(c_new, (H,), p["gamma_c"], p["beta_c"], lstm.eps)
            else:
                cn = c_new
            h_new = torch.sigmoid(o) * torch.tanh(cn)
            seen["h"].append(r[rows])
            seen["c"].append(c_new[rows])
            keep = rows[:, None]
            h = torch.where(keep, h_new, h)
            c = torch.where(keep, c_new, c)
            outputs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        if training and kind == "recurrent_batch" and not lstm.norms["h"].per_step:
            for site in ("h", "c"):
                self._pooled_update(site, seen[site])
        return torch.stack(outputs), h

    def running_state(self):
        return {f"{key}_{site}": torch.stack(values).numpy()
                for site, (means, variances) in self.running.items()
                for key, values in (("running_mean", means), ("running_var", variances))}


def _torch(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def _run_both(lstm, oracle, x, mask, h0, c0, training, rng):
    """One forward + backward in normkit and in the oracle; returns both sets of results."""
    p = {k: _torch(v, True) for k, v in lstm.params.items()}
    xt, h0t, c0t = _torch(x, True), _torch(h0, True), _torch(c0, True)
    seq_t, last_t = oracle.forward(xt, mask, h0t, c0t, p, training)
    out_t = seq_t if lstm.return_sequences else last_t
    d_out = rng.standard_normal(out_t.shape)
    (out_t * _torch(d_out)).sum().backward()
    out = lstm.forward(x, training, mask=mask, h0=h0, c0=c0)
    dx = lstm.backward(d_out.astype(lstm.dtype))
    expected = {"out": out_t.detach().numpy(), "x": xt.grad.numpy(), "h0": h0t.grad.numpy(),
                "c0": c0t.grad.numpy(), **{k: v.grad.numpy() for k, v in p.items()}}
    actual = {"out": out, "x": dx, "h0": lstm.dh0, "c0": lstm.dc0, **lstm.grads}
    return actual, expected


@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("T", [1, 5, 30])
@pytest.mark.parametrize("norm", NORMS)
def test_matches_torch(norm, T, masked):
    """Forward, all gradients (x, weights, gammas, betas, h0, c0) and running statistics, for two
    training steps; then evaluation with the running statistics on a longer sequence."""
    N = 5 if masked else (4 if norm == "recurrent_batch" else 1)
    lstm = _lstm(norm, T=T)
    oracle = TorchLSTM(lstm)
    rng = np.random.default_rng(2)
    for step in range(2):
        x, h0, c0 = _inputs(T, N, seed=10 + step)
        mask = _mask(T, N) if masked else None
        actual, expected = _run_both(lstm, oracle, x, mask, h0, c0, True, rng)
        for key in expected:
            np.testing.assert_allclose(actual[key], expected[key], **TOL64,
                                       err_msg=f"{norm}: {key}, step {step}")
        for key, value in oracle.running_state().items():
            np.testing.assert_allclose(lstm.state[key], value, **TOL64, err_msg=key)
    assert set(actual) - {"out", "x", "h0", "c0"} == set(lstm.params)
    # evaluation, longer than training: steps >= T use the statistics of step T - 1
    x, h0, c0 = _inputs(T + 3, N, seed=50)
    mask = _mask(T + 3, N) if masked else None
    state = copy.deepcopy(lstm.state)
    actual, expected = _run_both(lstm, oracle, x, mask, h0, c0, False, rng)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], **TOL64, err_msg=f"eval {key}")
    for key, value in state.items():
        np.testing.assert_array_equal(lstm.state[key], value)     # evaluation changes nothing


@pytest.mark.parametrize("norm", ["recurrent_batch"])
def test_shared_statistics_match_torch(norm):
    """per_step=False: pooled statistics for the input term, one running slot for all three."""
    T, N = 6, 5
    lstm = _lstm(norm, T=T, per_step=False)
    assert all(v.shape[0] == 1 for k, v in lstm.state.items())
    oracle = TorchLSTM(lstm)
    rng = np.random.default_rng(3)
    for step in range(2):
        x, h0, c0 = _inputs(T, N, seed=20 + step)
        actual, expected = _run_both(lstm, oracle, x, _mask(T, N), h0, c0, True, rng)
        for key in expected:
            np.testing.assert_allclose(actual[key], expected[key], **TOL64, err_msg=key)
        for key, value in oracle.running_state().items():
            np.testing.assert_allclose(lstm.state[key], value, **TOL64, err_msg=key)
    x, h0, c0 = _inputs(T + 4, N, seed=30)
    actual, expected = _run_both(lstm, oracle, x, None, h0, c0, False, rng)
    np.testing.assert_allclose(actual["out"], expected["out"], **TOL64)


@pytest.mark.parametrize("norm", NORMS)
def test_last_state_output_matches_torch(norm):
    T, N = 7, 5
    lstm = _lstm(norm, T=T, return_sequences=False)
    x, h0, c0 = _inputs(T, N)
    actual, expected = _run_both(lstm, TorchLSTM(lstm), x, _mask(T, N), h0, c0, True,
                                 np.random.default_rng(0))
    assert actual["out"].shape == (N, 4)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], **TOL64, err_msg=key)


@pytest.mark.parametrize("T", [1, 5, 30])
@pytest.mark.parametrize("norm", NORMS)
def test_finite_differences_all_parameters_at_once(norm, T):
    N = 5
    lstm = _lstm(norm, T=T)
    x, h0, c0 = _inputs(T, N)
    mask = _mask(T, N)
    lstm.forward(x, True, mask=mask, h0=h0, c0=c0)          # non-trivial running statistics
    for training in (True, False):
        dy = np.random.default_rng(4).standard_normal((T, N, 4))
        state = copy.deepcopy(lstm.state)
        params = {k: v.copy() for k, v in lstm.params.items()}
        lstm.forward(x, training, mask=mask, h0=h0, c0=c0)
        dx = lstm.backward(dy)
        grads = {"x": dx, "h0": lstm.dh0, "c0": lstm.dc0,
                 **{f"param:{k}": v.copy() for k, v in lstm.grads.items()}}

        def fun(x, h0, c0, **moved):
            for k, v in moved.items():
                lstm.params[k[len("param:"):]][...] = v
            for k, v in state.items():
                lstm.state[k][...] = v
            return lstm.forward(x, training, mask=mask, h0=h0, c0=c0)

        inputs = {"x": x, "h0": h0, "c0": c0, **{f"param:{k}": v for k, v in params.items()}}
        # Batch norm over the 2 valid rows of the last steps is strongly curved: at the default
        # step 1e-6 the central difference's truncation error (~h^2 * third derivative) still
        # shows at T = 30; it shrinks 100x per 10x smaller step, converging on the analytic value.
        check_vjp(fun, inputs, grads, dy, step=1e-7, rtol=1e-6, atol=1e-8)
        for k, v in params.items():
            lstm.params[k][...] = v
        assert np.all(dx[~mask] == 0)


def test_finite_differences_catch_a_wrong_gradient():
    """The check above can fail: a gradient off by a little in one entry is caught."""
    T, N = 5, 5
    lstm = _lstm("recurrent_batch", T=T)
    x, h0, c0 = _inputs(T, N)
    dy = np.random.default_rng(4).standard_normal((T, N, 4))
    lstm.forward(x, True, h0=h0, c0=c0)
    lstm.backward(dy)
    wrong = lstm.grads["gamma_h"].copy()
    wrong[3] *= 1.01

    def fun(gamma_h):
        lstm.params["gamma_h"][...] = gamma_h
        return lstm.forward(x, True, h0=h0, c0=c0)

    with pytest.raises(GradientMismatch):
        check_vjp(fun, {"gamma_h": lstm.params["gamma_h"].copy()}, {"gamma_h": wrong}, dy, rtol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_float32_agrees_with_float64(norm):
    T, N = 30, 5
    l64, l32 = _lstm(norm, T=T), _lstm(norm, T=T, dtype=np.float32)
    for key in l64.params:
        l32.params[key][...] = l64.params[key]
    x, h0, c0 = _inputs(T, N)
    mask = _mask(T, N)
    dy = np.random.default_rng(0).standard_normal((T, N, 4))
    y64 = l64.forward(x, True, mask=mask, h0=h0, c0=c0)
    y32 = l32.forward(x.astype(np.float32), True, mask=mask, h0=h0.astype(np.float32),
                      c0=c0.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-5)
    dx64, dx32 = l64.backward(dy), l32.backward(dy.astype(np.float32))
    assert dx32.dtype == np.float32 and all(g.dtype == np.float32 for g in l32.grads.values())
    np.testing.assert_allclose(dx32, dx64, rtol=1e-3, atol=1e-4)
    for key in l64.grads:
        scale = np.abs(l64.grads[key]).max()
        np.testing.assert_allclose(l32.grads[key], l64.grads[key], rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=key)


# -- masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
def test_padding_a_batch_changes_nothing(norm):
    """Extra padded steps and sequences, holding NaN, leave outputs, gradients and state as they
    were: the padded positions enter no statistics and get zero gradient."""
    T, N, H = 6, 4, 4
    lengths = np.array([6, 6, 4, 2])
    x, h0, c0 = _inputs(T, N)
    dy = np.random.default_rng(1).standard_normal((T, N, H))
    plain = _lstm(norm, T=T + 2)
    out = plain.forward(x, True, lengths=lengths, h0=h0, c0=c0)
    dx = plain.backward(dy)

    px = np.full((T + 2, N + 2, 3), np.nan)
    px[:T, :N] = x
    ph0 = np.vstack([h0, np.ones((2, H))])
    pc0 = np.vstack([c0, np.ones((2, H))])
    pdy = np.full((T + 2, N + 2, H), np.nan)
    pdy[:T, :N] = dy
    padded = _lstm(norm, T=T + 2)
    pout = padded.forward(px, True, lengths=np.concatenate([lengths, [0, 0]]), h0=ph0, c0=pc0)
    pdx = padded.backward(pdy)
    np.testing.assert_allclose(pout[:T, :N], out, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pdx[:T, :N], dx, rtol=1e-13, atol=1e-15)
    assert np.all(pdx[T:] == 0) and np.all(pdx[:, N:] == 0) and np.all(pout[:, N:] == 0)
    np.testing.assert_allclose(padded.dh0[:N], plain.dh0, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(padded.dh0[N:], 0)
    for key in plain.grads:
        np.testing.assert_allclose(padded.grads[key], plain.grads[key], rtol=1e-12, atol=1e-14,
                                   err_msg=key)
    for key in plain.state:
        np.testing.assert_allclose(padded.state[key], plain.state[key], rtol=1e-13, err_msg=key)


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_without_batch_statistics_each_sequence_is_independent(norm):
    """Plain and LN-LSTM: a padded batch computes what each sequence alone computes (N = 1)."""
    T, N = 6, 3
    lengths = np.array([6, 3, 1])
    x, h0, c0 = _inputs(T, N)
    lstm = _lstm(norm, T=T, return_sequences=False)
    last = lstm.forward(x, True, lengths=lengths, h0=h0, c0=c0)
    for n in range(N):
        alone = lstm.forward(x[:lengths[n], n:n + 1], True, h0=h0[n:n + 1], c0=c0[n:n + 1])
        np.testing.assert_allclose(last[n:n + 1], alone, rtol=1e-12, atol=1e-14)


def test_last_output_is_the_state_after_each_sequences_last_step():
    T, N = 6, 4
    lengths = np.array([6, 6, 3, 2])
    x, h0, c0 = _inputs(T, N)
    seq = _lstm("recurrent_batch", T=T)
    last = _lstm("recurrent_batch", T=T, return_sequences=False)
    out = seq.forward(x, True, lengths=lengths, h0=h0, c0=c0)
    final = last.forward(x, True, lengths=lengths, h0=h0, c0=c0)
    np.testing.assert_array_equal(final, out[lengths - 1, np.arange(N)])
    assert np.all(out[3:, 2] == 0) and np.all(out[2:, 3] == 0)


# -- options ------------------------------------------------------------------------------------

def test_paper_initialization():
    D, H = 3, 5
    bn = LSTM(D, H, norm="recurrent_batch", max_steps=4, forget_bias=1.0)
    for key in ("gamma_x", "gamma_h", "gamma_c"):
        np.testing.assert_array_equal(bn.params[key], np.float32(0.1))
    np.testing.assert_array_equal(bn.params["beta_c"], 0)
    assert "beta_x" not in bn.params and "beta_h" not in bn.params      # no shift: b is the shift
    np.testing.assert_array_equal(bn.params["W_h"], np.tile(np.eye(H), (1, 4)))
    for k in range(4):
        block = bn.params["W_x"][:, k * H:(k + 1) * H]
        np.testing.assert_allclose(block @ block.T, np.eye(D), atol=1e-6)     # orthogonal rows
    np.testing.assert_array_equal(bn.params["b"], np.r_[np.ones(H), np.zeros(3 * H)])
    assert LSTM(D, H, norm="recurrent_batch", max_steps=4, gamma_init=0.3).params["gamma_c"][0] \
        == np.float32(0.3)
    ln = LSTM(D, H, norm="layer", recurrent_init="orthogonal")
    np.testing.assert_array_equal(ln.params["gamma_h"], 1)
    block = ln.params["W_h"][:, :H]
    np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-6)
    assert ln.state == {} and LSTM(D, H).state == {}


def test_h0_noise_in_training_only():
    T, N = 4, 3
    x, _, _ = _inputs(T, N, dtype=np.float32)
    lstm = LSTM(3, 4, norm="recurrent_batch", max_steps=T, h0_noise_std=0.1, seed=1)
    a, b = lstm.forward(x, True), lstm.forward(x, True)
    assert not np.allclose(a, b)                              # fresh noise each call
    assert np.array_equal(lstm.forward(x, False), lstm.forward(x, False))
    quiet = LSTM(3, 4, norm="recurrent_batch", max_steps=T, seed=1)
    assert np.array_equal(quiet.forward(x, True), quiet.forward(x, True))


def test_state_per_step_and_evaluation_beyond_max_steps():
    T, N = 4, 6
    lstm = _lstm("recurrent_batch", T=T)
    assert lstm.state["running_mean_h"].shape == (T, 16) and lstm.state["running_mean_c"].shape == (T, 4)
    lstm.forward(_inputs(T, N)[0], True)
    assert np.all(lstm.state["num_batches_tracked_c"] == 1)
    assert not np.allclose(lstm.state["running_mean_h"][0], lstm.state["running_mean_h"][-1])
    x = _inputs(2 * T, N)[0]
    before = copy.deepcopy(lstm.state)
    out = lstm.forward(x, False)
    assert out.shape == (2 * T, N, 4) and np.isfinite(out).all()
    for key in before:
        np.testing.assert_array_equal(lstm.state[key], before[key])


def test_grow_extends_every_site():
    lstm = _lstm("recurrent_batch", T=3, grow=True)
    lstm.forward(_inputs(5, 4)[0], True)
    assert {v.shape[0] for v in lstm.state.values()} == {5}


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5).astype(np.float64)}
    tensors = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g.copy())
    expected = torch.nn.utils.clip_grad_norm_(tensors, 1.5).item()
    total = clip_grad_norm(grads, 1.5)
    assert total == pytest.approx(expected, rel=1e-12)
    for t, g in zip(tensors, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)
    small = {"a": np.full(4, 0.1, np.float32)}
    clip_grad_norm(small, 10.0)
    np.testing.assert_array_equal(small["a"], np.float32(0.1))          # under the limit: kept
    strided = {"a": np.ones((4, 4))[:, ::2]}                             # clipped in place too
    clip_grad_norm(strided, 1.0)
    np.testing.assert_allclose(np.linalg.norm(strided["a"]), 1.0, rtol=1e-5)


# -- bad input ----------------------------------------------------------------------------------

def _trained():
    lstm = _lstm("recurrent_batch", T=4, dtype=np.float32)
    lstm.forward(_inputs(4, 3, dtype=np.float32)[0], True)
    return lstm


X = _inputs(4, 3, dtype=np.float32)[0]
BAD_CALLS = [
    ("2-D x", lambda m: m.forward(X[0], True), ValueError, "time-major (T, N, input_size)"),
    ("batch-major x", lambda m: m.forward(np.ones((3, 4, 5), np.float32), True), ValueError,
     "input_size=3"),
    ("mask and lengths", lambda m: m.forward(X, True, mask=np.ones((4, 3), bool), lengths=[4, 4, 4]),
     ValueError, "either mask or lengths"),
    ("mask shape", lambda m: m.forward(X, True, mask=np.ones((3, 4), bool)), ValueError,
     "mask must have shape (T, N) = (4, 3)"),
    ("lengths too long", lambda m: m.forward(X, True, lengths=[5, 4, 4]), ValueError, "[0, 4]"),
    ("lengths count", lambda m: m.forward(X, True, lengths=[4, 4]), ValueError, "one entry per sequence"),
    ("h0 shape", lambda m: m.forward(X, True, h0=np.zeros((3, 5), np.float32)), ValueError,
     "h0 must have shape (3, 4)"),
    ("dtype", lambda m: m.forward(X.astype(np.float64), True), TypeError, "dtype=np.float64"),
    ("integer x", lambda m: m.forward(X.astype(np.int32), True), TypeError,
     "x must be a float32 or float64 array"),
    ("longer than max_steps", lambda m: m.forward(np.ones((5, 3, 3), np.float32), True), ValueError,
     "max_steps=4"),
    ("one sequence", lambda m: m.forward(X[:, :1], True), ValueError, "more than 1 value"),
    ("one valid row at a step", lambda m: m.forward(X, True, lengths=[4, 2, 2]), ValueError,
     "1 valid value at step 2"),
    ("training not bool", lambda m: m.forward(X, 1), TypeError, "training"),
    ("d_out shape", lambda m: m.backward(np.ones((4, 3, 5), np.float32)), ValueError,
     "d_out must have shape (4, 3, 4)"),
]


@pytest.mark.parametrize("call,exc,fragment", [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_clearly_and_mutates_nothing(call, exc, fragment):
    lstm = _trained()
    before = copy.deepcopy((lstm.params, lstm.grads, lstm.state))
    with pytest.raises(exc) as info:
        call(lstm)
    assert fragment in str(info.value)
    for a, b in zip(before, (lstm.params, lstm.grads, lstm.state)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("call,fragment", [
    (lambda: LSTM(3, 4, norm="batch"), "norm must be one of"),
    (lambda: LSTM(3, 4, norm="recurrent_batch"), "max_steps must be given"),
    (lambda: LSTM(0, 4), "input_size"),
    (lambda: LSTM(3, 4, recurrent_init="eye"), "recurrent_init"),
    (lambda: LSTM(3, 4, h0_noise_std=-1), "h0_noise_std"),
])
def test_bad_construction(call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        LSTM(3, 4).backward(np.ones((2, 3, 4), np.float32))


def test_normalization_names_come_from_the_registry():
    assert {"recurrent_batch", "layer", "none"} <= set(normkit.available())
    lstm = LSTM(3, 4, norm="recurrent_batch", max_steps=2)
    assert all(isinstance(n, normkit.RecurrentBatchNorm) for n in lstm.norms.values())
    assert lstm.params["gamma_x"] is lstm.norms["x"].params["gamma"]


# -- odd masks: steps without valid rows, rows that stop and stay padded ----------------------

def _odd_mask(T, N):
    """Steps of N, 2 and 0 valid rows, and one row valid at t = 0 only (it carries its state
    through every later step)."""
    lengths = np.array([T, T, 5, 3, 1, 0])[:N]
    mask = np.arange(T)[:, None] < lengths[None, :]
    mask[:, 3] = False
    mask[0, 3] = True
    mask[T - 1] = False                        # a step without any valid row
    return mask


@pytest.mark.parametrize("last_only", [False, True], ids=["sequence", "last"])
@pytest.mark.parametrize("norm, training", [("none", True), ("layer", True),
                                            ("recurrent_batch", False)])
def test_odd_masks_match_torch(norm, training, last_only):
    """Masks the layer's training checks would refuse for batch norm (a step with no valid row,
    one with two) run through the kernels in evaluation mode, and through "none" and "layer" in
    training: outputs and every gradient equal the torch oracle's. (BN in training on such
    steps is refused before the kernels run: test_bad_input_raises_clearly_and_mutates_nothing.)"""
    T, N = 7, 6
    lstm = _lstm(norm, T=3, return_sequences=not last_only)
    if norm == "recurrent_batch":              # non-trivial running statistics, 3 slots
        rng = np.random.default_rng(5)
        for key, value in lstm.state.items():
            if key.startswith("running_mean"):
                value[...] = rng.standard_normal(value.shape)
            elif key.startswith("running_var"):
                value[...] = rng.uniform(0.5, 2, value.shape)
    oracle = TorchLSTM(lstm)
    x, h0, c0 = _inputs(T, N)
    mask = _odd_mask(T, N)
    actual, expected = _run_both(lstm, oracle, x, mask, h0, c0, training,
                                 np.random.default_rng(2))
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, **TOL64, err_msg=key)
    assert np.abs(expected["W_h"]).max() > 0


@pytest.mark.parametrize("norm", NORMS)
def test_results_do_not_share_the_kept_kernel_arrays(norm):
    """The layer keeps the kernels' arrays from call to call: what it returns must be copies."""
    T, N = 5, 4
    lstm = _lstm(norm, T=T)
    x1, h0, c0 = _inputs(T, N, seed=1)
    x2 = _inputs(T, N, seed=2)[0]
    dy = np.random.default_rng(0).standard_normal((T, N, 4))
    out1 = lstm.forward(x1, True, h0=h0, c0=c0)
    dx1 = lstm.backward(dy)
    grads1 = copy.deepcopy(lstm.grads)
    returned = (out1, dx1, lstm.dh0, lstm.dc0)
    kept = [a.copy() for a in returned]
    lstm.forward(x2, True, h0=h0, c0=c0)
    lstm.backward(2 * dy)
    for before, now in zip(kept, returned):
        np.testing.assert_array_equal(now, before)
    assert not np.array_equal(lstm.grads["W_h"], grads1["W_h"])     # the second call did work
    # the same input again (training: batch statistics; parameters unchanged): the same output
    np.testing.assert_array_equal(lstm.forward(x1, True, h0=h0, c0=c0), out1)


def test_kernel_checks_the_shapes_it_indexes():
    """The LSTM kernels are importable on their own: mismatched arrays raise ValueError naming
    what is wrong instead of reading or writing out of bounds."""
    from normkit.nn import _lstm_kernels as kernels
    lstm = _lstm("recurrent_batch", T=3)
    T, N, H = 3, 2, 4
    xn = np.zeros((T, N, 4 * H))
    arrays = lstm._forward_arrays(T, N)
    args = dict(xn=xn, W_h=lstm.params["W_h"], b=lstm.params["b"], h0=np.zeros((N, H)),
                c0=np.zeros((N, H)), mask=np.ones((T, N), bool), kind=kernels.NORM_BATCH,
                batch_stats=True, gamma_h=lstm.params["gamma_h"], beta_h=np.zeros(4 * H),
                gamma_c=lstm.params["gamma_c"], beta_c=lstm.params["beta_c"],
                frozen_h=lstm._frozen("h"), frozen_c=lstm._frozen("c"), eps=1e-5)
    kernels.lstm_forward(*args.values(), *arrays)          # the right shapes run
    for key, bad, words in [("b", np.zeros(3), "b must"), ("gamma_h", np.ones(5), "gamma_h"),
                            ("beta_c", np.ones(H + 1), "beta_c"), ("mask", np.ones((T, 1), bool),
                                                                   "mask"),
                            ("h0", np.zeros((N + 1, H)), "h0")]:
        with pytest.raises(ValueError, match=words):
            kernels.lstm_forward(*{**args, key: bad}.values(), *arrays)
    with pytest.raises(ValueError, match="statistics"):
        kernels.lstm_forward(*args.values(), *arrays[:5],
                             *lstm._forward_arrays(T + 1, N)[5:])
    saved = lstm._forward_arrays(T, N)
    kernels.lstm_forward(*args.values(), *saved)
    d_last, dxn = np.zeros((N, H)), np.zeros((T, N, 4 * H))
    backward = (np.zeros((0, N, H)), d_last, args["W_h"], args["mask"], kernels.NORM_BATCH, True,
                args["gamma_h"], args["gamma_c"], 1e-5)
    kernels.lstm_backward(*backward, *saved, dxn, dxn.copy())
    with pytest.raises(ValueError, match="h and c"):
        kernels.lstm_backward(*backward, saved[0][:T], *saved[1:], dxn, dxn.copy())
    with pytest.raises(ValueError, match="dxn"):
        kernels.lstm_backward(*backward, *saved, dxn[:1], dxn.copy())


@pytest.mark.parametrize("norm", ["recurrent_batch", "layer"])
def test_without_input_norm_matches_torch(norm):
    """input_norm=False: Norm_x is the identity (no gamma_x, beta_x), the rest unchanged."""
    T, N = 6, 5
    lstm = _lstm(norm, T=T, input_norm=False)
    assert not any(key.endswith("_x") and key != "W_x" for key in lstm.params)
    assert "x" not in lstm.norms and "input_norm=False" in repr(lstm)
    oracle = TorchLSTM(lstm)
    x, h0, c0 = _inputs(T, N)
    for training in (True, False):
        actual, expected = _run_both(lstm, oracle, x, _mask(T, N), h0, c0, training,
                                     np.random.default_rng(3))
        for key, value in expected.items():
            np.testing.assert_allclose(actual[key], value, **TOL64, err_msg=key)
    with_norm = _lstm(norm, T=T)                # the same parameters, plus Norm_x
    for key, value in lstm.params.items():
        with_norm.params[key][...] = value
    assert not np.allclose(with_norm.forward(x, False, h0=h0, c0=c0),
                           lstm.forward(x, False, h0=h0, c0=c0))
