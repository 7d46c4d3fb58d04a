"""The LSTM's time loop (plain, BN-LSTM, LN-LSTM): gates and BPTT here, every norm on the engine.

Sequences are time-major and C-contiguous: x (T, N, F). ``mask`` (T, N) bool marks the
positions that hold data; padded positions (False) enter no statistics, carry the state
(h_t = h_{t-1}, c_t = c_{t-1}) and get gradient 0, whatever values they hold.

Gate order (f, i, o, g); W_h (H, 4H). The input term xn_t = Norm_x(x_t W_x) (T, N, 4H) comes in
precomputed for all steps (it does not depend on the recurrence: one GEMM and one call of the
registry's norm do it for the whole sequence, in :mod:`normkit.nn.lstm`). Per step::

    r_t = h_{t-1} W_h                                    (N, 4H)   BLAS
    a_t = Norm_h(r_t; gamma_h, beta_h) + xn_t + b        (N, 4H)
    f, i, o = sigmoid(a_f, a_i, a_o)    g = tanh(a_g)
    c_t = f * c_{t-1} + i * g                            (N, H)
    h_t = o * tanh(Norm_c(c_t; gamma_c, beta_c))

Norm_h and Norm_c are one call each of the statistics engine (``normkit.kernels._engine``) on a
view of the step's block, with the step's mask row:

    NORM_BATCH  v (N, F) -> (N, F, 1, 1), B = N   statistics (1, F) per step: batch statistics in
                training, running-statistics slot min(t, S - 1) otherwise (``frozen``)
    NORM_LAYER  v (N, F) -> (N, 1, F, 1), B = 1   statistics (N, 1) per step: each row's own
    NORM_NONE   the identity (no engine call)

Backpropagation through time, dh and dc being dL/dh_t and dL/dc_t from later steps::

    dh  += d_out_t                           (valid rows; padded rows pass dh, dc unchanged)
    do   = dh * tanh(cn)    dcn = dh * o * (1 - tanh(cn)^2)
    dc  += Norm_c'(dcn)                      (the engine's backward)
    da_f = dc * c_{t-1} * f (1 - f)   da_i = dc * g * i (1 - i)
    da_g = dc * i * (1 - g^2)         da_o = do * o (1 - o)
    dxn_t = da_t    db += sum_n da_t    dr_t = Norm_h'(da_t)
    dh = dr_t W_h^T    dc = dc * f

and after the loop dW_h = sum_t h_{t-1}^T dr_t as ONE GEMM over (T*N) rows, dh0 = dh, dc0 = dc.

Activations: float64 takes libm's exp and tanh (exact to the last ulp or so, as the tests
against PyTorch in float64 need). float32 takes a rational approximation of tanh
(``normkit.kernels.pointwise.tanh_float32``, within 6 float32 ulps) and
sigmoid(a) = 0.5 + 0.5 tanh(a / 2): plain arithmetic, so LLVM vectorizes the gate loops, where a
call to libm's expf/tanhf per element costs 5-25x more (numba has no vector math library here).
"""
from __future__ import annotations

import numpy as np

from ..kernels import _engine
from ..kernels._jit import jit
from ..kernels.pointwise import tanh_float32 as _tanh_rational

#: Normalization of the recurrent term and of the cell.
NORM_NONE, NORM_BATCH, NORM_LAYER = 0, 1, 2


@jit(inline=True)
def _tanh(a, fast):
    if fast:
        return _tanh_rational(a)
    return np.tanh(a)


@jit(inline=True)
def _sigmoid(a, fast):
    if fast:
        half = np.float32(0.5)
        return half + half * _tanh_rational(half * a)
    return 1.0 / (1.0 + np.exp(-a))


# ---------------------------------------------------------------------------------------------
# A norm of one step on the engine
# ---------------------------------------------------------------------------------------------

@jit()
def statistics_shape(kind, N, F):
    """(V, G) of one step's statistics: (1, F) batch norm, (N, 1) layer norm, (0, 0) none."""
    if kind == NORM_BATCH:
        return (1, F)
    if kind == NORM_LAYER:
        return (N, 1)
    return (0, 0)


@jit()
def _step_view(kind, v, gamma, beta):
    """The engine's view of one step's block v (N, F): (x4, B, gamma2, beta2)."""
    N, F = v.shape
    if kind == NORM_BATCH:
        return v.reshape((N, F, 1, 1)), N, gamma.reshape((F, 1)), beta.reshape((F, 1))
    return v.reshape((N, 1, F, 1)), 1, gamma.reshape((1, F)), beta.reshape((1, F))


@jit()
def _norm_step(kind, batch_stats, v, mask, t, valid, gamma, beta, frozen_mean, frozen_var, eps,
               mean, var, count, out):
    """out (N, F) = Norm(v) of step t (padded rows 0); mean, var (T, V, G), count (T, V) get
    the step's statistics (batch norm without ``batch_stats``: the running slot min(t, S - 1))."""
    N = v.shape[0]
    x4, B, gamma2, beta2 = _step_view(kind, v, gamma, beta)
    mode = _engine.STATS_AND_APPLY
    if kind == NORM_BATCH and not batch_stats:
        s = min(t, frozen_mean.shape[0] - 1)
        for f in range(v.shape[1]):
            mean[t, 0, f] = frozen_mean[s, f]
            var[t, 0, f] = frozen_var[s, f]
        mode = _engine.APPLY_ONLY
    _engine.forward_serial(x4, B, gamma2, beta2, eps, True, mask[t].reshape((N, 1)),
                           valid < N, out.reshape(x4.shape), mean[t], var[t], count[t], mode)


@jit()
def _norm_backward_step(kind, batch_stats, dy, v, mask, t, valid, gamma, eps, mean, var, count,
                        dx, dgamma, dbeta):
    """dx (N, F) = Norm'(dy) of step t; adds the step's dgamma, dbeta into dgamma, dbeta (F,)."""
    N, F = v.shape
    x4, B, gamma2, _ = _step_view(kind, v, gamma, gamma)
    dgamma2 = np.empty(gamma2.shape)          # (G, K) float64, overwritten by the engine
    dbeta2 = np.empty(gamma2.shape)
    frozen = kind == NORM_BATCH and not batch_stats
    _engine.backward_serial(dy.reshape(x4.shape), x4, B, gamma2, mean[t], var[t], count[t], eps,
                            True, frozen, mask[t].reshape((N, 1)), valid < N,
                            dx.reshape(x4.shape), dgamma2, dbeta2)
    dgamma1 = dgamma2.reshape(F)
    dbeta1 = dbeta2.reshape(F)
    for f in range(F):
        dgamma[f] += dgamma1[f]
        dbeta[f] += dbeta1[f]


# ---------------------------------------------------------------------------------------------
# The gates of one step, forward and backward (loops with one output stream each, so that LLVM
# vectorizes them)
# ---------------------------------------------------------------------------------------------

@jit(literals=True)
def _gates_step(t, rn, xn, b, mask, c, gates, fast):
    """a = rn + xn_t + b; gates[t] = (f, i, o, g); c[t+1] = f * c[t] + i * g (padded: c[t])."""
    N, H = c.shape[1], c.shape[2]
    for n in range(N):
        if not mask[t, n]:
            c[t + 1, n] = c[t, n]
            gates[t, n] = 0
            continue
        r_row = rn[n]                          # (4H,)
        x_row = xn[t, n]
        g_row = gates[t, n]
        for k in range(3 * H):                 # f, i, o
            g_row[k] = _sigmoid(r_row[k] + x_row[k] + b[k], fast)
        for k in range(3 * H, 4 * H):          # g
            g_row[k] = _tanh(r_row[k] + x_row[k] + b[k], fast)
        c_prev = c[t, n]                       # (H,)
        c_new = c[t + 1, n]
        for j in range(H):
            c_new[j] = g_row[j] * c_prev[j] + g_row[H + j] * g_row[3 * H + j]


@jit(literals=True)
def _output_step(t, cn, mask, gates, h, tanh_cn, fast):
    """h[t+1] = o * tanh(cn) on valid rows (tanh_cn[t] kept for BPTT), h[t] on padded rows."""
    N, H = cn.shape
    for n in range(N):
        if not mask[t, n]:
            h[t + 1, n] = h[t, n]
            tanh_cn[t, n] = 0
            continue
        o_row = gates[t, n, 2 * H:3 * H]
        th_row = tanh_cn[t, n]
        h_row = h[t + 1, n]
        cn_row = cn[n]
        for j in range(H):
            th = _tanh(cn_row[j], fast)
            th_row[j] = th
            h_row[j] = o_row[j] * th


@jit()
def _output_backward_step(t, d_seq, mask, gates, tanh_cn, dh, da, dcn):
    """dh += d_seq[t]; da_o and dcn (N, H) from dh, on valid rows (dcn = 0 on padded rows)."""
    N, H = dh.shape
    one = np.ones(1, dh.dtype)[0]
    for n in range(N):
        dcn_row = dcn[n]
        if not mask[t, n]:
            dcn_row[:] = 0
            continue
        dh_row = dh[n]
        if d_seq.shape[0] > 0:
            d_row = d_seq[t, n]
            for j in range(H):
                dh_row[j] += d_row[j]
        o_row = gates[t, n, 2 * H:3 * H]
        th_row = tanh_cn[t, n]
        da_o = da[n, 2 * H:3 * H]
        for j in range(H):
            o = o_row[j]
            th = th_row[j]
            da_o[j] = dh_row[j] * th * o * (one - o)
            dcn_row[j] = dh_row[j] * o * (one - th * th)


@jit(reduction=True)
def _gates_backward_step(t, mask, gates, c, dc_local, dc, da, db):
    """dc += dc_local; da_f, da_i, da_g from dc; dc = dc * f; db (4H,) float64 += the sum of
    da over the valid rows. Padded rows: da = 0, dc kept."""
    N, H = dc.shape
    one = np.ones(1, dc.dtype)[0]
    for n in range(N):
        da_row = da[n]                         # (4H,)
        if not mask[t, n]:
            da_row[:] = 0
            continue
        g_row = gates[t, n]
        c_prev = c[t, n]
        dc_row = dc[n]
        local = dc_local[n]
        for j in range(H):
            f = g_row[j]
            i = g_row[H + j]
            g = g_row[3 * H + j]
            dc_total = dc_row[j] + local[j]
            da_row[j] = dc_total * c_prev[j] * f * (one - f)
            da_row[H + j] = dc_total * g * i * (one - i)
            da_row[3 * H + j] = dc_total * i * (one - g * g)
            dc_row[j] = dc_total * f
        for k in range(4 * H):
            db[k] += da_row[k]


# ---------------------------------------------------------------------------------------------
# The sequence
# ---------------------------------------------------------------------------------------------

@jit()
def _check_saved(W_h, mask, kind, gamma_h, gamma_c, h, c, r, gates, tanh_cn, stats_h, stats_c):
    """Shape checks of the arrays forward writes and backward reads (r (T, N, 4H) gives the
    shapes): raises ValueError naming them."""
    T, N, G = r.shape
    H = G // 4
    if G != 4 * H or W_h.shape[0] != H or W_h.shape[1] != G:
        raise ValueError("xn and r must be (T, N, 4H) and W_h (H, 4H)")
    if mask.shape[0] != T or mask.shape[1] != N:
        raise ValueError("mask must have shape (T, N)")
    if kind != NORM_NONE and (gamma_h.shape[0] != G or gamma_c.shape[0] != H):
        raise ValueError("gamma_h must have shape (4H,) and gamma_c (H,)")
    for a in (h, c):
        if a.shape[0] != T + 1 or a.shape[1] != N or a.shape[2] != H:
            raise ValueError("h and c must have shape (T + 1, N, H)")
    if gates.shape != r.shape:
        raise ValueError("r and gates must have the shape of xn")
    if tanh_cn.shape[0] != T or tanh_cn.shape[1] != N or tanh_cn.shape[2] != H:
        raise ValueError("tanh_cn must have shape (T, N, H)")
    for stats, F in ((stats_h, G), (stats_c, H)):
        V, S = statistics_shape(kind, N, F)
        for a in stats[:2]:
            if a.shape[0] != T or a.shape[1] != V or a.shape[2] != S:
                raise ValueError("statistics must have shape (T, V, G) of the norm's view")
        if stats[2].shape[0] != T or stats[2].shape[1] != V:
            raise ValueError("statistics counts must have shape (T, V)")


@jit()
def _check_inputs(xn, r, b, h0, c0, kind, beta_h, beta_c, frozen_h, frozen_c):
    """Shape checks of what only :func:`lstm_forward` takes."""
    N, G = xn.shape[1], xn.shape[2]
    H = G // 4
    if r.shape != xn.shape:
        raise ValueError("r must have the shape of xn")
    if b.shape[0] != G:
        raise ValueError("b must have shape (4H,)")
    if h0.shape[0] != N or h0.shape[1] != H or c0.shape[0] != N or c0.shape[1] != H:
        raise ValueError("h0 and c0 must have shape (N, H)")
    if kind != NORM_NONE and (beta_h.shape[0] != G or beta_c.shape[0] != H):
        raise ValueError("beta_h must have shape (4H,) and beta_c (H,)")
    if kind == NORM_BATCH:
        if (frozen_h[0].shape[1] != G or frozen_h[1].shape != frozen_h[0].shape
                or frozen_h[0].shape[0] < 1):
            raise ValueError("frozen_h must be two arrays (S, 4H), S >= 1")
        if (frozen_c[0].shape[1] != H or frozen_c[1].shape != frozen_c[0].shape
                or frozen_c[0].shape[0] < 1):
            raise ValueError("frozen_c must be two arrays (S, H), S >= 1")


@jit()
def lstm_forward(xn, W_h, b, h0, c0, mask, kind, batch_stats, gamma_h, beta_h, gamma_c, beta_c,
                 frozen_h, frozen_c, eps, h, c, r, gates, tanh_cn, stats_h, stats_c):
    """All T steps of the LSTM in one call (math in the module docstring).

    xn (T, N, 4H) the normalized input term; W_h (H, 4H); b (4H,); h0, c0 (N, H); mask (T, N)
    bool; kind NORM_NONE / NORM_BATCH / NORM_LAYER for the recurrent term and the cell;
    batch_stats: batch norm with batch statistics (training) rather than ``frozen_h``,
    ``frozen_c`` = (running_mean, running_var) of shapes (S, 4H), (S, H). Gammas and betas (4H,)
    and (H,) (unused for NORM_NONE).

    Writes what :func:`lstm_backward` needs into the caller's arrays: h, c (T+1, N, H) (h[0] = h0,
    h[t+1] the output of step t), r (T, N, 4H) = h_{t-1} W_h, gates (T, N, 4H) = (f, i, o, g)
    after their nonlinearity, tanh_cn (T, N, H), and the statistics of each step,
    stats_h = (mean (T, V, G), var (T, V, G), count (T, V)) float64 of the recurrent term's view
    (:func:`statistics_shape`), stats_c the same for the cell.
    """
    _check_inputs(xn, r, b, h0, c0, kind, beta_h, beta_c, frozen_h, frozen_c)
    _check_saved(W_h, mask, kind, gamma_h, gamma_c, h, c, r, gates, tanh_cn, stats_h, stats_c)
    T, N, G = xn.shape
    H = G // 4
    fast = xn.itemsize == 4                    # float32: vectorizable activations
    rn = np.empty((N, G), xn.dtype)            # normalized recurrent term of the current step
    cn = np.empty((N, H), xn.dtype)            # normalized cell of the current step
    h[0] = h0
    c[0] = c0
    for t in range(T):
        valid = 0
        for n in range(N):
            valid += mask[t, n]
        np.dot(h[t], W_h, r[t])
        r_t = r[t]                             # Norm_h(r_t), or r_t itself for NORM_NONE
        if kind != NORM_NONE:
            _norm_step(kind, batch_stats, r[t], mask, t, valid, gamma_h, beta_h, frozen_h[0],
                       frozen_h[1], eps, stats_h[0], stats_h[1], stats_h[2], rn)
            r_t = rn
        if fast:
            _gates_step(t, r_t, xn, b, mask, c, gates, True)
        else:
            _gates_step(t, r_t, xn, b, mask, c, gates, False)
        c_t = c[t + 1]                         # Norm_c(c_t), or c_t itself
        if kind != NORM_NONE:
            _norm_step(kind, batch_stats, c[t + 1], mask, t, valid, gamma_c, beta_c, frozen_c[0],
                       frozen_c[1], eps, stats_c[0], stats_c[1], stats_c[2], cn)
            c_t = cn
        if fast:
            _output_step(t, c_t, mask, gates, h, tanh_cn, True)
        else:
            _output_step(t, c_t, mask, gates, h, tanh_cn, False)


@jit()
def lstm_backward(d_seq, d_last, W_h, mask, kind, batch_stats, gamma_h, gamma_c, eps, h, c, r,
                  gates, tanh_cn, stats_h, stats_c, dxn, dr):
    """Backpropagation through time over all T steps in one call (math in the module docstring).

    d_seq (T, N, H) = dL/d(output of each step), or an empty (0, N, H) array if only the last
    state is used; d_last (N, H) = dL/dh_T. The rest as :func:`lstm_forward` took and wrote;
    dxn, dr (T, N, 4H) the caller's arrays for dL/d(normalized input term) and dL/dr (dr may
    be dxn itself for NORM_NONE).

    Returns (dW_h, db, dgamma_h, dbeta_h, dgamma_c, dbeta_c, dh0, dc0): float64 for b and the
    norm parameters, the input's dtype for dW_h, dh0, dc0.
    """
    _check_saved(W_h, mask, kind, gamma_h, gamma_c, h, c, r, gates, tanh_cn, stats_h, stats_c)
    T, N, G = r.shape
    H = G // 4
    if d_seq.shape[0] not in (0, T) or d_seq.shape[1] != N or d_seq.shape[2] != H:
        raise ValueError("d_seq must have shape (T, N, H) or (0, N, H)")
    if d_last.shape[0] != N or d_last.shape[1] != H:
        raise ValueError("d_last must have shape (N, H)")
    if dxn.shape != r.shape or dr.shape != r.shape:
        raise ValueError("dxn and dr must have shape (T, N, 4H)")
    dtype = r.dtype
    db = np.zeros(G)
    dgamma_h = np.zeros(G)
    dbeta_h = np.zeros(G)
    dgamma_c = np.zeros(H)
    dbeta_c = np.zeros(H)
    dh = d_last.copy()                         # (N, H) dL/dh_t
    dc = np.zeros((N, H), dtype)               # (N, H) dL/dc_t
    dcn = np.empty((N, H), dtype)
    dc_local = np.empty((N, H), dtype)
    dh_prev = np.empty((N, H), dtype)
    W_hT = np.ascontiguousarray(W_h.T)         # (4H, H)
    for t in range(T - 1, -1, -1):
        valid = 0
        for n in range(N):
            valid += mask[t, n]
        da = dxn[t]
        _output_backward_step(t, d_seq, mask, gates, tanh_cn, dh, da, dcn)
        local = dcn                            # dL/dc_t through Norm_c, or dcn for NORM_NONE
        if kind != NORM_NONE:
            _norm_backward_step(kind, batch_stats, dcn, c[t + 1], mask, t, valid, gamma_c, eps,
                                stats_c[0], stats_c[1], stats_c[2], dc_local, dgamma_c, dbeta_c)
            local = dc_local
        _gates_backward_step(t, mask, gates, c, local, dc, da, db)
        if kind != NORM_NONE:
            _norm_backward_step(kind, batch_stats, da, r[t], mask, t, valid, gamma_h, eps,
                                stats_h[0], stats_h[1], stats_h[2], dr[t], dgamma_h, dbeta_h)
        if valid == N:
            np.dot(dr[t], W_hT, dh)
        else:
            np.dot(dr[t], W_hT, dh_prev)
            for n in range(N):
                if mask[t, n]:
                    dh[n] = dh_prev[n]
    h_prev = h.reshape(((T + 1) * N, H))[:T * N]   # (T*N, H) rows h_{t-1}
    dW_h = np.dot(h_prev.T, dr.reshape((T * N, G)))
    return dW_h, db, dgamma_h, dbeta_h, dgamma_c, dbeta_c, dh, dc
