"""The fused LSTM kernels (plain, BN-LSTM, LN-LSTM) and the per-step norms inside them.

Sequences are time-major and C-contiguous: x (T, N, F). A ``mask`` (T, N) bool marks the
positions that hold data; padded positions (False) enter no statistics, get output 0 and
gradient 0, whatever values they hold. The recurrent batch norm layer itself
(``normkit.make("recurrent_batch", ...)``) runs on the statistics engine; what is here is the
LSTM's own time loop, which the next step of the kernel core moves onto the engine too.

The fused LSTM (:func:`lstm_forward`, :func:`lstm_backward`) is documented further down.
"""
from __future__ import annotations

import numpy as np

from ._jit import jit

#: Normalization of the recurrent term and of the cell in the fused LSTM kernels.
NORM_NONE, NORM_BATCH, NORM_LAYER = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Masked batch norm over a block of steps x3 (K, N, F), mask2 (K, N): the pieces every masked
# step of the fused LSTM's non-fused path uses. Rows are read in memory order; per-feature sums are vectors.
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _masked_moments(x3, mask2, mean, var):
    """Per-feature mean and biased variance over the valid rows, written into mean, var (F,)
    float64 (both 0 if no row is valid). Returns the number of valid rows.

    One pass of shifted sums (K = the first valid row, d = x - K; float64)::

        mean = K + sum(d) / count        var = sum(d^2) / count - (sum(d) / count)^2

    The cancellation in var is of the size of (mean - K)^2 / var with K a value of the data, and
    equal rows give var = 0 exactly."""
    K, N, F = x3.shape
    count = 0
    sum_d = np.zeros(F)                        # (F,) float64; mean holds the shift meanwhile
    for k in range(K):
        for n in range(N):
            if not mask2[k, n]:
                continue
            row = x3[k, n]                     # (F,)
            if count == 0:
                for f in range(F):
                    mean[f] = row[f]
                    var[f] = 0.0
            count += 1
            for f in range(F):
                d = np.float64(row[f]) - mean[f]
                sum_d[f] += d
                var[f] += d * d
    if count == 0:
        for f in range(F):
            mean[f] = 0.0
            var[f] = 0.0
        return 0
    for f in range(F):
        m = sum_d[f] / count
        mean[f] += m
        var[f] = max(var[f] / count - m * m, 0.0)
    return count


@jit()
def _masked_apply(x3, mask2, mean, inv_std, gamma, beta, y3):
    """y3 = (x3 - mean) * inv_std * gamma + beta on valid rows, 0 on padded rows."""
    K, N, F = x3.shape
    scale = np.empty(F)                        # (F,) float64
    for f in range(F):
        scale[f] = inv_std[f] * gamma[f]
    for k in range(K):
        for n in range(N):
            yrow = y3[k, n]                    # (F,)
            if mask2[k, n]:
                row = x3[k, n]
                for f in range(F):
                    yrow[f] = (row[f] - mean[f]) * scale[f] + beta[f]
            else:
                yrow[:] = 0


@jit(reduction=True)
def _masked_backward_block(dy3, x3, mask2, mean, inv_std, gamma, batch_stats, dx3, sum_dy,
                           sum_dy_xhat):
    """dx3 on valid rows (0 on padded rows); writes the block's dbeta = sum(dy) and
    dgamma = sum(dy * xhat) into sum_dy, sum_dy_xhat (F,) float64. ``batch_stats``: the
    statistics came from this block (training) rather than being constants."""
    K, N, F = x3.shape
    count = 0
    for f in range(F):
        sum_dy[f] = 0.0
        sum_dy_xhat[f] = 0.0
    for k in range(K):
        for n in range(N):
            if mask2[k, n]:
                count += 1
                row = x3[k, n]
                drow = dy3[k, n]
                for f in range(F):
                    sum_dy[f] += drow[f]
                    sum_dy_xhat[f] += drow[f] * (row[f] - mean[f])
    scale = np.empty(F)                        # (F,) gamma * inv_std
    mean_dy = np.zeros(F)                      # (F,) sum(dy) / count, if batch statistics
    mean_dy_xhat = np.zeros(F)                 # (F,) sum(dy * xhat) / count, same
    for f in range(F):
        sum_dy_xhat[f] *= inv_std[f]
        scale[f] = gamma[f] * inv_std[f]
        if batch_stats and count > 0:
            mean_dy[f] = sum_dy[f] / count
            mean_dy_xhat[f] = sum_dy_xhat[f] / count
    for k in range(K):
        for n in range(N):
            dxrow = dx3[k, n]
            if mask2[k, n]:
                row = x3[k, n]
                drow = dy3[k, n]
                for f in range(F):
                    xhat = (row[f] - mean[f]) * inv_std[f]
                    dxrow[f] = scale[f] * (drow[f] - mean_dy[f] - xhat * mean_dy_xhat[f])
            else:
                dxrow[:] = 0


@jit()
def _inv_std(var, eps):
    """1 / sqrt(var + eps), float64, same shape as var (1-D)."""
    out = np.empty(var.size)
    for f in range(var.size):
        out[f] = 1.0 / np.sqrt(np.float64(var[f]) + eps)
    return out


# ---------------------------------------------------------------------------------------------
# Fused LSTM
#
# Gate order (f, i, o, g); W_h (H, 4H). The input term xn_t = Norm_x(x_t W_x) (T, N, 4H) comes
# in precomputed for all steps: it does not depend on the recurrence, so one GEMM and one call of
# the registry's norm do it for the whole sequence. Per step::
#
#     r_t = h_{t-1} W_h                                    (N, 4H)   BLAS
#     a_t = Norm_h(r_t; gamma_h, beta_h) + xn_t + b        (N, 4H)
#     f, i, o = sigmoid(a_f, a_i, a_o)    g = tanh(a_g)
#     c_t = f * c_{t-1} + i * g                            (N, H)
#     h_t = o * tanh(Norm_c(c_t; gamma_c, beta_c))
#
# Padded rows (mask[t, n] False) carry their state: h_t = h_{t-1}, c_t = c_{t-1}.
# Norm kinds: NORM_NONE (identity), NORM_BATCH (masked batch norm per step: batch statistics in
# training, running-statistics slot min(t, S - 1) otherwise), NORM_LAYER (per row, over the
# features: _core's layer norm).
#
# Backpropagation through time, dh and dc being dL/dh_t and dL/dc_t from later steps:
#
#     dh  += d_out_t                           (valid rows; padded rows pass dh, dc unchanged)
#     do   = dh * tanh(cn)    dcn = dh * o * (1 - tanh(cn)^2)
#     dc  += Norm_c'(dcn)
#     da_f = dc * c_{t-1} * f (1 - f)   da_i = dc * g * i (1 - i)
#     da_g = dc * i * (1 - g^2)         da_o = do * o (1 - o)
#     dxn_t = da_t    db += sum_n da_t    dr_t = Norm_h'(da_t)
#     dh = dr_t W_h^T    dc = dc * f
#
# and after the loop dW_h = sum_t h_{t-1}^T dr_t as ONE GEMM over (T*N) rows, dh0 = dh, dc0 = dc.
# ---------------------------------------------------------------------------------------------

# Activations. float64 takes libm's exp and tanh (exact to the last ulp or so, as the tests
# against PyTorch in float64 need). float32 takes a rational approximation of tanh (Eigen's
# ``generic_fast_tanh_float``, 13/6 degrees on [-7.9, 7.9], within 6 float32 ulps) and
# sigmoid(a) = 0.5 + 0.5 tanh(a / 2): plain arithmetic, so LLVM vectorizes the gate loops, where a
# call to libm's expf/tanhf per element costs 5-25x more (numba has no vector math library here).

@jit(inline=True)
def _tanh_rational(x):
    """tanh(x) for float32 x: max error 3.5e-7 (<= 6 ulp)."""
    clip = np.float32(7.90531110763549805)
    x = min(max(x, -clip), clip)
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return p * x / q


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


@jit(reduction=True)
def _layer_rows_forward(v, gamma, beta, eps, mean, var, out):
    """Layer norm of each row of v (N, F) into out; mean, var (N,) float64."""
    N, F = v.shape
    for n in range(N):
        row = v[n]
        total = 0.0
        for f in range(F):
            total += row[f]
        m = total / F
        squares = 0.0
        for f in range(F):
            dev = row[f] - m
            squares += dev * dev
        mean[n] = m
        var[n] = squares / F
        inv_std = 1.0 / np.sqrt(var[n] + eps)
        out_row = out[n]
        for f in range(F):
            out_row[f] = (row[f] - m) * (inv_std * gamma[f]) + beta[f]


@jit(reduction=True)
def _layer_rows_backward(dy, v, gamma, mean, var, eps, dx, dgamma, dbeta):
    """Gradient of :func:`_layer_rows_forward`: dx (N, F); adds into dgamma, dbeta (F,)."""
    N, F = v.shape
    for n in range(N):
        row = v[n]
        drow = dy[n]
        inv_std = 1.0 / np.sqrt(var[n] + eps)
        mean_dxhat = 0.0
        mean_dxhat_xhat = 0.0
        for f in range(F):
            xhat = (row[f] - mean[n]) * inv_std
            dxhat = drow[f] * gamma[f]
            mean_dxhat += dxhat
            mean_dxhat_xhat += dxhat * xhat
            dgamma[f] += drow[f] * xhat
            dbeta[f] += drow[f]
        mean_dxhat /= F
        mean_dxhat_xhat /= F
        dx_row = dx[n]
        for f in range(F):
            xhat = (row[f] - mean[n]) * inv_std
            dx_row[f] = inv_std * (drow[f] * gamma[f] - mean_dxhat - xhat * mean_dxhat_xhat)


@jit()
def _norm_forward_step(kind, batch_stats, v, mask, t, gamma, beta, frozen_mean, frozen_var, eps,
                       mean, var, out):
    """Normalize v (N, F) of step t into out (N, F); mean, var (T, F) [batch] or (T, N) [layer]
    receive the step's statistics."""
    N, F = v.shape
    if kind == NORM_BATCH:
        v3 = v.reshape((1, N, F))
        if batch_stats:
            _masked_moments(v3, mask[t:t + 1], mean[t], var[t])
        else:
            s = min(t, frozen_mean.shape[0] - 1)
            for f in range(F):
                mean[t, f] = frozen_mean[s, f]
                var[t, f] = frozen_var[s, f]
        _masked_apply(v3, mask[t:t + 1], mean[t], _inv_std(var[t], eps), gamma, beta,
                      out.reshape((1, N, F)))
    elif kind == NORM_LAYER:
        _layer_rows_forward(v, gamma, beta, eps, mean[t], var[t], out)
    else:
        out[...] = v


@jit()
def _norm_backward_step(kind, batch_stats, dy, v, mask, t, gamma, mean, var, eps, dx, dgamma,
                        dbeta):
    """Gradient of :func:`_norm_forward_step` for step t: dx (N, F); adds into dgamma, dbeta."""
    N, F = v.shape
    if kind == NORM_BATCH:
        sum_dy = np.empty(F)
        sum_dy_xhat = np.empty(F)
        _masked_backward_block(dy.reshape((1, N, F)), v.reshape((1, N, F)), mask[t:t + 1], mean[t],
                               _inv_std(var[t], eps), gamma, batch_stats, dx.reshape((1, N, F)),
                               sum_dy, sum_dy_xhat)
        for f in range(F):
            dgamma[f] += sum_dy_xhat[f]
            dbeta[f] += sum_dy[f]
    elif kind == NORM_LAYER:
        _layer_rows_backward(dy, v, gamma, mean[t], var[t], eps, dx, dgamma, dbeta)
    else:
        dx[...] = dy


@jit()
def _stats_shape(kind, T, N, F):
    if kind == NORM_BATCH:
        return (T, F)
    if kind == NORM_LAYER:
        return (T, N)
    return (0, 0)


@jit(literals=True)
def _gates_step(t, rn, xn, b, mask, c, gates, fast):
    """a = rn + xn_t + b; gates[t] = (f, i, o, g); c[t+1] = f * c[t] + i * g (padded: c[t]).
    (Loops with one output stream each, so that LLVM vectorizes them.)"""
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
        for j in range(H):
            th = _tanh(cn[n, j], fast)
            tanh_cn[t, n, j] = th
            h[t + 1, n, j] = o_row[j] * th


# ---------------------------------------------------------------------------------------------
# The fused step (NORM_NONE and NORM_BATCH; NORM_LAYER keeps the per-norm steps above)
#
# Per step, three passes over the (N, 4H) and (N, H) blocks forward and three backward, each row
# read in memory order with its per-feature sums as vectors, and no temporaries:
#
#   forward   A  moments of r_t over the valid rows                      (batch statistics only)
#             B  a = (r_t - mean_h) * scale_h + xn_t + b; the gates; c_t; the moments of c_t
#             C  h_t = o * tanh((c_t - mean_c) * scale_c + beta_c)
#   backward  1  dh += d_out_t; da_o; dcn; the sums of dcn and dcn * chat
#             2  dc_local, da_f, da_i, da_g, dc = dc_total * f; the sums of da and da * rhat
#             3  dr_t = scale_h * (da - m1_h - rhat * m2_h)                (batch norm only)
#
# scale = gamma / sqrt(var + eps); xhat = (v - mean) * inv_std; with batch statistics
# Norm'(dy) = scale * (dy - m1 - xhat * m2), m1 = sum(dy) / n, m2 = sum(dy * xhat) / n (frozen
# statistics: m1 = m2 = 0). Forward, the per-feature constants are computed once per step in
# float64 and cast to the data's dtype, so passes B and C (the activations) run in float32
# arithmetic on float32 data; backward, the norms' arithmetic stays in float64 (Norm' cancels
# down to far below its terms when a step has few valid rows), the gates' in the data's dtype.
# All sums accumulate in float64. NORM_NONE runs the same passes with mean 0, scale 1, beta 0.
#
# Moments in one pass of shifted sums: with K the first valid row and d = v - K,
#     mean = K + sum(d) / n        var = sum(d^2) / n - (sum(d) / n)^2
# (float64; the cancellation is of the size of (mean - K)^2 / var, K being a row of the data, and
# equal rows give var = 0 exactly).
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _moments_begin(row, shift, sum_d, sum_d2):
    """Start shifted sums at the first valid row (F,): shift = row, sums 0."""
    for f in range(row.size):
        shift[f] = row[f]
        sum_d[f] = 0.0
        sum_d2[f] = 0.0


@jit(reduction=True)
def _moments_add(row, shift, sum_d, sum_d2):
    for f in range(row.size):
        d = np.float64(row[f]) - shift[f]
        sum_d[f] += d
        sum_d2[f] += d * d


@jit(reduction=True)
def _moments_end(count, shift, sum_d, sum_d2, mean, var):
    """mean, var (F,) float64 from the shifted sums of ``count`` rows (0 and 0 if none)."""
    for f in range(shift.size):
        if count == 0:
            mean[f] = 0.0
            var[f] = 0.0
        else:
            m = sum_d[f] / count
            mean[f] = shift[f] + m
            var[f] = max(sum_d2[f] / count - m * m, 0.0)


@jit(reduction=True)
def _column_moments(v, mask_t, shift, sum_d, sum_d2, mean, var):
    """Pass A: mean, var (F,) float64 of the valid rows of v (N, F). Returns their count."""
    N, F = v.shape
    count = 0
    for n in range(N):
        if mask_t[n]:
            if count == 0:
                _moments_begin(v[n], shift, sum_d, sum_d2)
            count += 1
            _moments_add(v[n], shift, sum_d, sum_d2)
    _moments_end(count, shift, sum_d, sum_d2, mean, var)
    return count


@jit()
def _step_constants(kind, mean_t, var_t, gamma, beta, eps, center, scale, shift):
    """Norm(v) = (v - center) * scale + shift, constants (F,) in the data's dtype for the step
    whose statistics are mean_t, var_t (F,) float64: center = mean rounded to the dtype, scale =
    gamma / sqrt(var + eps), shift = beta - (mean - center) * scale (the rounding of the mean,
    corrected in float64: v - center is exact for v near the mean, so the result is as accurate
    as the float64 formula rounded to the dtype). NORM_NONE: 0, 1, 0."""
    for f in range(center.size):
        if kind == NORM_NONE:
            center[f] = 0
            scale[f] = 1
            shift[f] = 0
        else:
            s = gamma[f] / np.sqrt(np.float64(var_t[f]) + eps)
            center[f] = mean_t[f]
            scale[f] = s
            shift[f] = beta[f] - (mean_t[f] - np.float64(center[f])) * s


@jit()
def _frozen_statistics(t, frozen_mean, frozen_var, mean, var):
    """Copy running-statistics slot min(t, S - 1) into mean[t], var[t]."""
    s = min(t, frozen_mean.shape[0] - 1)
    for f in range(mean.shape[1]):
        mean[t, f] = frozen_mean[s, f]
        var[t, f] = frozen_var[s, f]


@jit(reduction=True, literals=True)
def _fused_gates_step(t, r_t, xn_t, mask, center_h, scale_h, shift_h, c, gates, moments_c, shift,
                      sum_d, sum_d2, fast):
    """Pass B: a = (r_t - center_h) * scale_h + shift_h + xn_t (shift_h holding the bias b too);
    gates[t] (N, 4H), c[t+1] (N, H) (padded rows: gates 0, c carried); with ``moments_c`` also
    the shifted sums of c[t+1]'s valid rows. Returns their count."""
    N, G = r_t.shape
    H = G // 4
    count = 0
    for n in range(N):
        c_new = c[t + 1, n]                    # (H,)
        g_row = gates[t, n]                    # (4H,)
        if not mask[t, n]:
            c_new[:] = c[t, n]
            g_row[:] = 0
            continue
        r_row = r_t[n]
        x_row = xn_t[n]
        for k in range(3 * H):                 # f, i, o
            g_row[k] = _sigmoid((r_row[k] - center_h[k]) * scale_h[k] + shift_h[k] + x_row[k],
                                fast)
        for k in range(3 * H, G):              # g
            g_row[k] = _tanh((r_row[k] - center_h[k]) * scale_h[k] + shift_h[k] + x_row[k], fast)
        c_prev = c[t, n]
        for j in range(H):
            c_new[j] = g_row[j] * c_prev[j] + g_row[H + j] * g_row[3 * H + j]
        if moments_c:
            if count == 0:
                _moments_begin(c_new, shift, sum_d, sum_d2)
            _moments_add(c_new, shift, sum_d, sum_d2)
        count += 1
    return count


@jit(literals=True)
def _fused_output_step(t, c, mask, center_c, scale_c, shift_c, gates, h, tanh_cn, fast):
    """Pass C: h[t+1] = o * tanh(cn) and tanh_cn[t] on valid rows; padded rows carry h."""
    N, H = c.shape[1], c.shape[2]
    for n in range(N):
        if not mask[t, n]:
            h[t + 1, n] = h[t, n]
            tanh_cn[t, n] = 0
            continue
        c_row = c[t + 1, n]
        o_row = gates[t, n, 2 * H:3 * H]
        th_row = tanh_cn[t, n]
        h_row = h[t + 1, n]
        for j in range(H):
            th = _tanh((c_row[j] - center_c[j]) * scale_c[j] + shift_c[j], fast)
            th_row[j] = th
            h_row[j] = o_row[j] * th


@jit()
def _lstm_forward_fused(xn, W_h, b, mask, kind, batch_stats, gamma_h, gamma_c, beta_c, frozen_h,
                        frozen_c, eps, h, c, r, gates, tanh_cn, mean_h, var_h, mean_c, var_c):
    """The time loop of :func:`lstm_forward` for NORM_NONE and NORM_BATCH (passes A, B, C)."""
    T, N, G = xn.shape
    H = G // 4
    dtype = xn.dtype
    fast = xn.itemsize == 4
    batch = kind == NORM_BATCH
    center_h = np.empty(G, dtype)              # (4H,) per-step constants in the data's dtype
    scale_h = np.empty(G, dtype)
    shift_h = np.empty(G, dtype)
    center_c = np.empty(H, dtype)              # (H,)
    scale_c = np.empty(H, dtype)
    shift_c = np.empty(H, dtype)
    beta_h = np.zeros(G)                       # (the recurrent term has no shift: b is it)
    no_stats = np.zeros(G)
    shift = np.empty(G)                        # (4H,) float64 shifted sums, shared by r and c
    sum_d = np.empty(G)
    sum_d2 = np.empty(G)
    for t in range(T):
        np.dot(h[t], W_h, r[t])
        if batch:
            if batch_stats:
                _column_moments(r[t], mask[t], shift, sum_d, sum_d2, mean_h[t], var_h[t])
            else:
                _frozen_statistics(t, frozen_h[0], frozen_h[1], mean_h, var_h)
            _step_constants(kind, mean_h[t], var_h[t], gamma_h, beta_h, eps, center_h, scale_h,
                            shift_h)
        else:
            _step_constants(kind, no_stats, no_stats, gamma_h, beta_h, eps, center_h, scale_h,
                            shift_h)
        for k in range(G):
            shift_h[k] += b[k]                 # a = (r - center) * scale + (shift + b) + xn
        # (``fast`` as a literal: each pass is compiled without the other branch of the
        # activations, which LLVM otherwise keeps in the loop, unvectorized: 2x slower)
        if fast:
            count = _fused_gates_step(t, r[t], xn[t], mask, center_h, scale_h, shift_h, c,
                                      gates, batch and batch_stats, shift[:H], sum_d[:H],
                                      sum_d2[:H], True)
        else:
            count = _fused_gates_step(t, r[t], xn[t], mask, center_h, scale_h, shift_h, c,
                                      gates, batch and batch_stats, shift[:H], sum_d[:H],
                                      sum_d2[:H], False)
        if batch:
            if batch_stats:
                _moments_end(count, shift[:H], sum_d[:H], sum_d2[:H], mean_c[t], var_c[t])
            else:
                _frozen_statistics(t, frozen_c[0], frozen_c[1], mean_c, var_c)
            _step_constants(kind, mean_c[t], var_c[t], gamma_c, beta_c, eps, center_c, scale_c,
                            shift_c)
        else:
            _step_constants(kind, no_stats, no_stats, gamma_c, beta_h, eps, center_c, scale_c,
                            shift_c)
        if fast:
            _fused_output_step(t, c, mask, center_c, scale_c, shift_c, gates, h, tanh_cn, True)
        else:
            _fused_output_step(t, c, mask, center_c, scale_c, shift_c, gates, h, tanh_cn, False)


@jit()
def _backward_step_constants(mean_t, var_t, gamma, eps, inv_std, scale):
    """inv_std = 1 / sqrt(var + eps), scale = gamma * inv_std (F,) float64 (the backward keeps
    the norms' arithmetic in float64, as the per-norm steps do: dx = scale * (dy - m1 - xhat * m2)
    cancels, with few valid rows, down to far below its terms)."""
    for f in range(inv_std.size):
        inv_std[f] = 1.0 / np.sqrt(np.float64(var_t[f]) + eps)
        scale[f] = gamma[f] * inv_std[f]


@jit(reduction=True)
def _fused_output_backward_step(t, d_seq, mask, gates, tanh_cn, c, mean_c, inv_std_c, dh, da,
                                dcn, sums_c, sum_dy, sum_dy_xhat):
    """Pass 1: dh += d_seq[t]; da_o and dcn (N, H) on valid rows (dcn = 0 on padded rows); with
    ``sums_c`` the sums of dcn and dcn * chat over the valid rows into sum_dy, sum_dy_xhat (H,)
    float64."""
    N, H = dh.shape
    one = np.ones(1, dh.dtype)[0]
    if sums_c:
        sum_dy[:] = 0.0
        sum_dy_xhat[:] = 0.0
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
        if sums_c:
            c_row = c[t + 1, n]
            for j in range(H):
                chat = (np.float64(c_row[j]) - mean_c[j]) * inv_std_c[j]
                sum_dy[j] += dcn_row[j]
                sum_dy_xhat[j] += dcn_row[j] * chat


@jit()
def _backward_constants(count, batch_stats, sum_dy, sum_dy_xhat, m1, m2, dgamma, dbeta):
    """m1 = sum(dy) / n, m2 = sum(dy * xhat) / n (0 without batch statistics), float64; adds the
    sums into dgamma, dbeta."""
    for f in range(m1.size):
        dgamma[f] += sum_dy_xhat[f]
        dbeta[f] += sum_dy[f]
        if batch_stats and count > 0:
            m1[f] = sum_dy[f] / count
            m2[f] = sum_dy_xhat[f] / count
        else:
            m1[f] = 0.0
            m2[f] = 0.0


@jit(reduction=True)
def _fused_gates_backward_step(t, mask, gates, c, dcn, mean_c, inv_std_c, scale_c, m1_c, m2_c,
                               norm_c, r_t, mean_h, inv_std_h, sums_h, dc, da, sum_da,
                               sum_da_rhat):
    """Pass 2: dc_total = dc + Norm_c'(dcn); da_f, da_i, da_g; dc = dc_total * f (padded rows:
    da = 0, dc kept); sum_da (4H,) = sum of da, and with ``sums_h`` sum_da_rhat = sum of da * rhat,
    over the valid rows (float64)."""
    N, H = dc.shape
    G = 4 * H
    one = np.ones(1, dc.dtype)[0]
    sum_da[:] = 0.0
    sum_da_rhat[:] = 0.0
    for n in range(N):
        da_row = da[n]                         # (4H,)
        if not mask[t, n]:
            da_row[:] = 0
            continue
        g_row = gates[t, n]
        c_prev = c[t, n]
        dc_row = dc[n]
        dcn_row = dcn[n]
        if norm_c:
            c_row = c[t + 1, n]
            for j in range(H):
                chat = (np.float64(c_row[j]) - mean_c[j]) * inv_std_c[j]
                dc_row[j] += scale_c[j] * (dcn_row[j] - m1_c[j] - chat * m2_c[j])
        else:
            for j in range(H):
                dc_row[j] += dcn_row[j]
        for j in range(H):
            f = g_row[j]
            i = g_row[H + j]
            g = g_row[3 * H + j]
            dc_total = dc_row[j]
            da_row[j] = dc_total * c_prev[j] * f * (one - f)
            da_row[H + j] = dc_total * g * i * (one - i)
            da_row[3 * H + j] = dc_total * i * (one - g * g)
            dc_row[j] = dc_total * f
        for k in range(G):
            sum_da[k] += da_row[k]
        if sums_h:
            r_row = r_t[n]
            for k in range(G):
                rhat = (np.float64(r_row[k]) - mean_h[k]) * inv_std_h[k]
                sum_da_rhat[k] += da_row[k] * rhat


@jit()
def _fused_norm_backward_step(t, mask, da, r_t, mean_h, inv_std_h, scale_h, m1_h, m2_h, dr):
    """Pass 3: dr (N, 4H) = scale_h * (da - m1_h - rhat * m2_h) on valid rows, 0 on padded rows."""
    N, G = da.shape
    for n in range(N):
        dr_row = dr[n]
        if not mask[t, n]:
            dr_row[:] = 0
            continue
        da_row = da[n]
        r_row = r_t[n]
        for k in range(G):
            rhat = (np.float64(r_row[k]) - mean_h[k]) * inv_std_h[k]
            dr_row[k] = scale_h[k] * (da_row[k] - m1_h[k] - rhat * m2_h[k])


@jit()
def _lstm_backward_fused(d_seq, W_hT, mask, kind, batch_stats, gamma_h, gamma_c, eps, c, r,
                         gates, tanh_cn, stats, dxn, dr, db, dgamma_h, dbeta_h, dgamma_c,
                         dbeta_c, dh, dc):
    """The time loop of :func:`lstm_backward` for NORM_NONE and NORM_BATCH (passes 1, 2, 3)."""
    mean_h, var_h, mean_c, var_c = stats
    T, N, G = r.shape
    H = G // 4
    dtype = r.dtype
    batch = kind == NORM_BATCH
    inv_std_h = np.zeros(G)                    # (4H,) per-step constants, float64
    scale_h = np.zeros(G)
    m1_h = np.zeros(G)
    m2_h = np.zeros(G)
    inv_std_c = np.zeros(H)                    # (H,)
    scale_c = np.zeros(H)
    m1_c = np.zeros(H)
    m2_c = np.zeros(H)
    no_stats = np.zeros(G)
    sum_dy = np.zeros(G)                       # (4H,) float64 sums of a step
    sum_dy_xhat = np.zeros(G)
    dcn = np.empty((N, H), dtype)
    dh_prev = np.empty((N, H), dtype)
    counts = np.zeros(T, np.int64)
    for t in range(T):
        for n in range(N):
            counts[t] += mask[t, n]
    for t in range(T - 1, -1, -1):
        da = dxn[t]
        mean_c_t = mean_c[t] if batch else no_stats[:H]
        mean_h_t = mean_h[t] if batch else no_stats
        if batch:
            _backward_step_constants(mean_c_t, var_c[t], gamma_c, eps, inv_std_c, scale_c)
            _backward_step_constants(mean_h_t, var_h[t], gamma_h, eps, inv_std_h, scale_h)
        _fused_output_backward_step(t, d_seq, mask, gates, tanh_cn, c, mean_c_t, inv_std_c, dh,
                                    da, dcn, batch, sum_dy[:H], sum_dy_xhat[:H])
        if batch:
            _backward_constants(counts[t], batch_stats, sum_dy[:H], sum_dy_xhat[:H], m1_c, m2_c,
                                dgamma_c, dbeta_c)
        _fused_gates_backward_step(t, mask, gates, c, dcn, mean_c_t, inv_std_c, scale_c, m1_c,
                                   m2_c, batch, r[t], mean_h_t, inv_std_h, batch, dc, da, sum_dy,
                                   sum_dy_xhat)
        for k in range(G):
            db[k] += sum_dy[k]
        if batch:
            _backward_constants(counts[t], batch_stats, sum_dy, sum_dy_xhat, m1_h, m2_h,
                                dgamma_h, dbeta_h)
            _fused_norm_backward_step(t, mask, da, r[t], mean_h_t, inv_std_h, scale_h, m1_h, m2_h,
                                      dr[t])
        if counts[t] == N:
            np.dot(dr[t], W_hT, dh)
        else:
            np.dot(dr[t], W_hT, dh_prev)
            for n in range(N):
                if mask[t, n]:
                    dh[n] = dh_prev[n]

@jit()
def lstm_forward(xn, W_h, b, h0, c0, mask, kind, batch_stats, gamma_h, beta_h, gamma_c, beta_c,
                 frozen_h, frozen_c, eps, fused=True, work=None):
    """All T steps of the LSTM in one call (see the comment above for the math).

    xn (T, N, 4H) the normalized input term; W_h (H, 4H); b (4H,); h0, c0 (N, H); mask (T, N)
    bool; kind NORM_NONE / NORM_BATCH / NORM_LAYER for the recurrent term and the cell;
    batch_stats: batch norm with batch statistics (training) rather than ``frozen_h``,
    ``frozen_c`` = (running_mean, running_var) of shapes (S, 4H), (S, H). Gammas and betas (4H,)
    and (H,) (unused for NORM_NONE).

    Returns what :func:`lstm_backward` needs: (h, c, r, gates, tanh_cn, stats), with h, c
    (T+1, N, H) (h[0] = h0, h[t+1] the output of step t), r (T, N, 4H) = h_{t-1} W_h,
    gates (T, N, 4H) = (f, i, o, g) after their nonlinearity, tanh_cn (T, N, H) and
    stats = (mean_h, var_h, mean_c, var_c) float64: per step (T, F) for batch norm (the batch
    statistics in training: the running update uses them), per row (T, N) for layer norm.

    ``fused``: NORM_NONE and NORM_BATCH run the fused step (three passes per step); False runs
    the per-norm steps that NORM_LAYER uses (the reference the tests hold the fused step to).
    ``work``: None, or the arrays (h, c, r, gates, tanh_cn) of the shapes above to write into and
    return (a caller that keeps them saves allocating, and the kernel first-touching, ~1 GB of
    fresh memory per training step at T=784); their contents are overwritten.
    """
    T, N, G = xn.shape
    H = G // 4
    dtype = xn.dtype
    if work is None:
        h = np.empty((T + 1, N, H), dtype)
        c = np.empty((T + 1, N, H), dtype)
        r = np.empty((T, N, G), dtype)
        gates = np.empty((T, N, G), dtype)
        tanh_cn = np.empty((T, N, H), dtype)
    else:
        h, c, r, gates, tanh_cn = work
    h[0] = h0
    c[0] = c0
    mean_h = np.zeros(_stats_shape(kind, T, N, G))
    var_h = np.zeros(_stats_shape(kind, T, N, G))
    mean_c = np.zeros(_stats_shape(kind, T, N, H))
    var_c = np.zeros(_stats_shape(kind, T, N, H))
    if fused and kind != NORM_LAYER:
        _lstm_forward_fused(xn, W_h, b, mask, kind, batch_stats, gamma_h, gamma_c, beta_c,
                            frozen_h, frozen_c, eps, h, c, r, gates, tanh_cn, mean_h, var_h,
                            mean_c, var_c)
        return h, c, r, gates, tanh_cn, (mean_h, var_h, mean_c, var_c)
    fast = xn.itemsize == 4                    # float32: vectorizable activations
    rn = np.empty((N, G), dtype)               # normalized recurrent term of the current step
    cn = np.empty((N, H), dtype)               # normalized cell of the current step
    for t in range(T):
        np.dot(h[t], W_h, r[t])
        _norm_forward_step(kind, batch_stats, r[t], mask, t, gamma_h, beta_h, frozen_h[0],
                           frozen_h[1], eps, mean_h, var_h, rn)
        _gates_step(t, rn, xn, b, mask, c, gates, fast)
        _norm_forward_step(kind, batch_stats, c[t + 1], mask, t, gamma_c, beta_c, frozen_c[0],
                           frozen_c[1], eps, mean_c, var_c, cn)
        _output_step(t, cn, mask, gates, h, tanh_cn, fast)
    return h, c, r, gates, tanh_cn, (mean_h, var_h, mean_c, var_c)


@jit()
def _output_backward_step(t, d_seq, mask, gates, tanh_cn, dh, da, dcn):
    """dh += d_seq[t]; da_o and dcn (N, H) from dh, on valid rows (dcn = 0 on padded rows)."""
    N, H = dh.shape
    for n in range(N):
        if not mask[t, n]:
            dcn[n] = 0
            continue
        if d_seq.shape[0] > 0:
            for j in range(H):
                dh[n, j] += d_seq[t, n, j]
        o_row = gates[t, n, 2 * H:3 * H]
        th_row = tanh_cn[t, n]
        for j in range(H):
            o = o_row[j]
            th = th_row[j]
            da[n, 2 * H + j] = dh[n, j] * th * o * (1 - o)
            dcn[n, j] = dh[n, j] * o * (1 - th * th)


@jit()
def _gates_backward_step(t, mask, gates, c, dc_local, dc, da, db):
    """dc += dc_local; da_f, da_i, da_g from dc; dc = dc * f. Padded rows: da = 0, dc kept."""
    N, H = dc.shape
    for n in range(N):
        if not mask[t, n]:
            da[n] = 0
            continue
        g_row = gates[t, n]
        c_prev = c[t, n]
        for j in range(H):
            f = g_row[j]
            i = g_row[H + j]
            g = g_row[3 * H + j]
            dc_total = dc[n, j] + dc_local[n, j]
            da[n, j] = dc_total * c_prev[j] * f * (1 - f)
            da[n, H + j] = dc_total * g * i * (1 - i)
            da[n, 3 * H + j] = dc_total * i * (1 - g * g)
            dc[n, j] = dc_total * f
        for k in range(4 * H):
            db[k] += da[n, k]


@jit()
def lstm_backward(d_seq, d_last, W_h, mask, kind, batch_stats, gamma_h, gamma_c, eps, h, c, r,
                  gates, tanh_cn, stats, fused=True, work=None):
    """Backpropagation through time over all T steps in one call (math in the comment above).

    d_seq (T, N, H) = dL/d(output of each step), or an empty (0, N, H) array if only the last
    state is used; d_last (N, H) = dL/dh_T. The rest as :func:`lstm_forward` took and returned.

    Returns (dxn, dW_h, db, dgamma_h, dbeta_h, dgamma_c, dbeta_c, dh0, dc0): dxn (T, N, 4H) =
    dL/d(normalized input term), gradients of dtype float64 for b and the norm parameters,
    of the input's dtype for dxn, dW_h, dh0, dc0. ``fused`` as for :func:`lstm_forward`;
    ``work``: None, or the arrays (dxn, dr) (T, N, 4H) to write into (dr unused for NORM_NONE).
    """
    mean_h, var_h, mean_c, var_c = stats
    T, N, G = r.shape
    H = G // 4
    dtype = r.dtype
    if work is None:
        dxn = np.empty((T, N, G), dtype)       # = da of every step
        dr = np.empty((T, N, G), dtype) if kind != NORM_NONE else dxn
    else:
        dxn, dr = work
        if kind == NORM_NONE:
            dr = dxn
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
    if fused and kind != NORM_LAYER:
        _lstm_backward_fused(d_seq, W_hT, mask, kind, batch_stats, gamma_h, gamma_c, eps, c, r,
                             gates, tanh_cn, stats, dxn, dr, db, dgamma_h, dbeta_h, dgamma_c,
                             dbeta_c, dh, dc)
    else:
        for t in range(T - 1, -1, -1):
            da = dxn[t]
            _output_backward_step(t, d_seq, mask, gates, tanh_cn, dh, da, dcn)
            _norm_backward_step(kind, batch_stats, dcn, c[t + 1], mask, t, gamma_c, mean_c, var_c,
                                eps, dc_local, dgamma_c, dbeta_c)
            _gates_backward_step(t, mask, gates, c, dc_local, dc, da, db)
            if kind != NORM_NONE:
                _norm_backward_step(kind, batch_stats, da, r[t], mask, t, gamma_h, mean_h, var_h,
                                    eps, dr[t], dgamma_h, dbeta_h)
            np.dot(dr[t], W_hT, dh_prev)
            for n in range(N):
                if mask[t, n]:
                    dh[n] = dh_prev[n]
    h_prev = h.reshape(((T + 1) * N, H))[:T * N]   # (T*N, H) rows h_{t-1}
    dW_h = np.dot(h_prev.T, dr.reshape((T * N, G)))
    return dxn, dW_h, db, dgamma_h, dbeta_h, dgamma_c, dbeta_c, dh, dc
