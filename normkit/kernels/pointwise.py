"""The parts of the batch-independent competitors that are not a plain normalize: the TLU of
filter response normalization, the EvoNorm numerators and denominators, switchable norm's
pooled statistics and gradient correction, and Dynamic Tanh.

The statistics themselves (FRN's mean square, EvoNorm's group/instance/batch variances, the
instance statistics switchable norm mixes) come from the statistics engine
(:mod:`normkit.kernels._engine`); these kernels only read them. Layout::

    x3: (N, C, L)   C-contiguous: N rows (samples, or everything before the channel axis),
                    C channels, L values per (row, channel) (the spatial axes, 1 for (N, C))
    per-channel parameters (C,) in x's dtype; statistics float64

Every value is computed in float64 and rounded once when stored, except Dynamic Tanh's
elementwise terms, which float32 input computes in float32 with :func:`tanh_float32` (so the
loops vectorize; its sums stay float64). Gradients of per-channel parameters are float64 (C,). Shapes are checked (ValueError naming the argument); values are not.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._engine import by_size
from ._engine import _cast_like as _like
from ._jit import jit, serial_and_parallel


@jit()
def _check_channels(name_index, a, C):
    """a must hold one value per channel; name_index picks the argument's name for the message."""
    if a.size != C:
        if name_index == 0:
            raise ValueError("gamma must have one value per channel (C,)")
        if name_index == 1:
            raise ValueError("beta must have one value per channel (C,)")
        if name_index == 2:
            raise ValueError("tau must have one value per channel (C,)")
        raise ValueError("v must have one value per channel (C,)")


@jit()
def _check_like(name_index, a, x3):
    if a.shape != x3.shape:
        if name_index == 0:
            raise ValueError("dy must have the shape of x")
        raise ValueError("out must have the shape of x")


@jit(inline=True)
def tanh_float32(x):
    """tanh(x) for float32 x: max error 3.5e-7 (<= 6 ulp). Eigen's
    ``generic_fast_tanh_float``: a 13/6-degree rational function on [-7.9, 7.9]. Plain
    arithmetic, so loops over it vectorize (a libm tanhf call per value costs 5-25x more)."""
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


# ---------------------------------------------------------------------------------------------
# Dynamic Tanh (Zhu et al., 2025): y = gamma * tanh(alpha * x) + beta, alpha a scalar.
# ---------------------------------------------------------------------------------------------

@jit()
def dyt_forward(x3, alpha, gamma, beta, y3):
    """y3 = gamma[c] * tanh(alpha * x3) + beta[c]; x3, y3 (N, C, L). float64 in float64;
    float32 in float32 with :func:`tanh_float32` (vectorized)."""
    N, C, L = x3.shape
    _check_channels(0, gamma, C)
    _check_channels(1, beta, C)
    _check_like(1, y3, x3)
    a = _like(x3, alpha)
    for n in range(N):
        for c in range(C):
            g, b = _like(x3, gamma[c]), _like(x3, beta[c])
            xr = x3[n, c]                      # (L,)
            yr = y3[n, c]
            for l in range(L):
                yr[l] = g * _tanh(x3, a * xr[l]) + b


# t = tanh(alpha x), dt/dx = alpha (1 - t^2), dt/dalpha = x (1 - t^2):
#   dbeta[c] = sum dy      dgamma[c] = sum dy t
#   dx = dy gamma alpha (1 - t^2)      dalpha = sum dy gamma x (1 - t^2)
@jit(reduction=True)
def dyt_backward(dy3, x3, alpha, gamma, dx3, dgamma, dbeta):
    """Gradient of :func:`dyt_forward`: dx into dx3, dgamma/dbeta (C,) float64 overwritten;
    returns dalpha. Elementwise terms in x's dtype (as the forward), sums in float64."""
    N, C, L = x3.shape
    _check_channels(0, gamma, C)
    _check_like(0, dy3, x3)
    _check_like(1, dx3, x3)
    if dgamma.size != C or dbeta.size != C:
        raise ValueError("dgamma and dbeta must have one value per channel (C,)")
    a = _like(x3, alpha)
    one = _like(x3, 1.0)
    dalpha = 0.0
    dgamma[:] = 0.0
    dbeta[:] = 0.0
    for n in range(N):
        for c in range(C):
            g = _like(x3, gamma[c])
            ga = g * a
            xr, dr, dxr = x3[n, c], dy3[n, c], dx3[n, c]       # (L,)
            s_dy, s_dy_t, s_dalpha = 0.0, 0.0, 0.0
            for l in range(L):
                xv = xr[l]
                d = dr[l]
                t = _tanh(x3, a * xv)
                slope = one - t * t
                s_dy += d
                s_dy_t += d * t
                s_dalpha += d * xv * slope
                dxr[l] = d * ga * slope
            dbeta[c] += s_dy
            dgamma[c] += s_dy_t
            dalpha += np.float64(g) * s_dalpha
    return dalpha


@jit(inline=True)
def _tanh(x, v):
    """tanh(v) for values of x's dtype: :func:`tanh_float32` for float32, libm's for float64."""
    if x.itemsize == 4:
        return tanh_float32(v)
    return np.tanh(v)


# ---------------------------------------------------------------------------------------------
# Filter response normalization's TLU (Singh & Krishnan, 2020): z = max(y, tau), y the engine's
# output gamma * x * inv_rms + beta.
# ---------------------------------------------------------------------------------------------

@jit()
def tlu_forward(y3, tau):
    """y3 = max(y3, tau[c]) in place; y3 (N, C, L)."""
    N, C, L = y3.shape
    _check_channels(2, tau, C)
    for n in range(N):
        for c in range(C):
            t = tau[c]
            for l in range(L):
                if y3[n, c, l] < t:
                    y3[n, c, l] = t


# z = max(y, tau) passes dy to y where y > tau and to tau elsewhere; y = x * scale + beta with
# scale = gamma * inv_rms[n, c] (the engine's value, recomputed in x's dtype):
#   dy_pre = dy * [y > tau]          dtau[c] = sum dy * [y <= tau]
@jit()
def tlu_backward(dy3, x3, scale, beta, tau, dy_pre3, dtau):
    """dy_pre3 = the gradient at FRN's output before the TLU; dtau (C,) float64 overwritten.
    scale (N, C) = gamma[c] * inv_rms[n, c] in x's dtype."""
    N, C, L = x3.shape
    _check_channels(1, beta, C)
    _check_channels(2, tau, C)
    _check_like(0, dy3, x3)
    _check_like(1, dy_pre3, x3)
    if scale.shape[0] != N or scale.shape[1] != C:
        raise ValueError("scale must have shape (N, C)")
    if dtau.size != C:
        raise ValueError("dtau must have one value per channel (C,)")
    dtau[:] = 0.0
    for n in range(N):
        for c in range(C):
            s, b, t = scale[n, c], beta[c], tau[c]
            to_tau = 0.0
            for l in range(L):
                d = dy3[n, c, l]
                if x3[n, c, l] * s + b > t:
                    dy_pre3[n, c, l] = d
                else:
                    dy_pre3[n, c, l] = 0.0
                    to_tau += np.float64(d)
            dtau[c] += to_tau


# ---------------------------------------------------------------------------------------------
# EvoNorm-S0 (Liu et al., 2020): y = x * sigmoid(v x) * inv_g + beta... with the group's
# inv_g = 1 / sqrt(var_g + eps) from the engine (groups of C / G channels per sample).
# ---------------------------------------------------------------------------------------------

@jit(inline=True)
def sigmoid(z):
    """1 / (1 + exp(-z)), exp of a non-positive number only: no overflow for either sign."""
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


@jit()
def _check_groups(x3, mean, var):
    N, C = x3.shape[0], x3.shape[1]
    G = mean.shape[1]
    if mean.shape[0] != N or var.shape[0] != N or var.shape[1] != G or G < 1 or C % G != 0:
        raise ValueError("mean and var must have shape (N, G) with G dividing C")
    return C // G


@jit()
def _check_s0(x3, v, gamma, var, out3):
    """Shapes of EvoNorm-S0's arrays; returns C / G (channels per group)."""
    Cg = _check_groups(x3, var, var)
    C = x3.shape[1]
    _check_channels(3, v, C)
    _check_channels(0, gamma, C)
    _check_like(1, out3, x3)
    return Cg


def _evonorm_s0_forward_loop(x3, v, gamma, beta, var, eps, y3):
    """y3 = x * sigmoid(v x) / sqrt(var[n, g] + eps) * gamma + beta, samples in parallel."""
    N, C, L = x3.shape
    Cg = C // var.shape[1]
    for n in prange(N):
        for c in range(C):
            inv = 1.0 / np.sqrt(var[n, c // Cg] + eps)
            vc, g, b = np.float64(v[c]), np.float64(gamma[c]), np.float64(beta[c])
            for l in range(L):
                xv = np.float64(x3[n, c, l])
                y3[n, c, l] = xv * sigmoid(vc * xv) * inv * g + b


_s0_forward_serial, _s0_forward_parallel = serial_and_parallel(_evonorm_s0_forward_loop)


@jit()
def _check_s0_forward(x3, v, gamma, beta, var, y3):
    _check_s0(x3, v, gamma, var, y3)
    _check_channels(1, beta, x3.shape[1])


@jit()
def evonorm_s0_forward(x3, v, gamma, beta, var, eps, y3):
    """y3 = x * sigmoid(v x) / sqrt(var[n, g] + eps) * gamma + beta; var (N, G) the engine's
    group variance (channel c in group c // (C / G)). On the calling thread; from Python,
    :func:`run_evonorm_s0_forward` takes the samples in parallel for large inputs."""
    _check_s0_forward(x3, v, gamma, beta, var, y3)
    _s0_forward_serial(x3, v, gamma, beta, var, eps, y3)


def run_evonorm_s0_forward(x3, v, gamma, beta, var, eps, y3):
    """:func:`evonorm_s0_forward` from Python: the same arithmetic, the samples on threads
    when x3 has PARALLEL_MIN_SIZE values or more (only the twin used is compiled)."""
    _check_s0_forward(x3, v, gamma, beta, var, y3)
    by_size(x3, _s0_forward_serial, _s0_forward_parallel)(x3, v, gamma, beta, var, eps, y3)


# s = sigmoid(v x), h = x s, inv = (var + eps)^(-1/2), y = gamma h inv + beta; per group (n, g)
# of M = (C/G) L values:
#   dbeta = sum dy     dgamma = sum dy h inv     dh = dy gamma inv
#   dv[c] = sum dh x^2 s (1 - s)                 dh/dx = s + v x s (1 - s)
#   dvar[n, g] = -1/2 inv^3 sum_group dy gamma h
#   dx = dh (s + v x s (1 - s)) + dvar * 2 (x - mean[n, g]) / M
# Per-(n, c) partial sums of dgamma, dbeta, dv go to part (3, N, C); the caller adds over n.
def _evonorm_s0_backward_loop(dy3, x3, v, gamma, mean, var, eps, dx3, part):
    """Gradient of the forward, samples in parallel (each (n, g) summed in order)."""
    N, C, L = x3.shape
    G = var.shape[1]
    Cg = C // G
    M = Cg * L
    for n in prange(N):
        for g in range(G):
            inv = 1.0 / np.sqrt(var[n, g] + eps)
            s_dy_gh = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                vc, gc = np.float64(v[c]), np.float64(gamma[c])
                s_dy, s_dy_h, s_dv = 0.0, 0.0, 0.0
                for l in range(L):
                    xv = np.float64(x3[n, c, l])
                    d = np.float64(dy3[n, c, l])
                    s = sigmoid(vc * xv)
                    h = xv * s
                    s_dy += d
                    s_dy_h += d * h
                    s_dv += d * xv * xv * s * (1.0 - s)
                part[0, n, c] = s_dy_h * inv
                part[1, n, c] = s_dy
                part[2, n, c] = s_dv * gc * inv
                s_dy_gh += gc * s_dy_h
            dvar_2_m = -inv * inv * inv * s_dy_gh / M        # 2 * dvar / M
            mu = mean[n, g]
            for c in range(g * Cg, (g + 1) * Cg):
                vc, gc = np.float64(v[c]), np.float64(gamma[c])
                for l in range(L):
                    xv = np.float64(x3[n, c, l])
                    s = sigmoid(vc * xv)
                    dh = np.float64(dy3[n, c, l]) * gc * inv
                    dx3[n, c, l] = dh * (s + vc * xv * s * (1.0 - s)) + dvar_2_m * (xv - mu)


_s0_backward_serial, _s0_backward_parallel = serial_and_parallel(_evonorm_s0_backward_loop)


@jit()
def _check_s0_backward(dy3, x3, v, gamma, mean, var, dx3, part):
    _check_s0(x3, v, gamma, var, dx3)
    _check_groups(x3, mean, var)
    _check_like(0, dy3, x3)
    if part.shape[0] != 3 or part.shape[1] != x3.shape[0] or part.shape[2] != x3.shape[1]:
        raise ValueError("part must have shape (3, N, C)")


@jit()
def evonorm_s0_backward(dy3, x3, v, gamma, mean, var, eps, dx3, part):
    """Gradient of :func:`evonorm_s0_forward`: dx into dx3; part (3, N, C) float64 gets the
    per-sample sums of (dgamma, dbeta, dv). On the calling thread; from Python,
    :func:`run_evonorm_s0_backward` takes the samples in parallel for large inputs."""
    _check_s0_backward(dy3, x3, v, gamma, mean, var, dx3, part)
    _s0_backward_serial(dy3, x3, v, gamma, mean, var, eps, dx3, part)


def run_evonorm_s0_backward(dy3, x3, v, gamma, mean, var, eps, dx3, part):
    """:func:`evonorm_s0_backward` from Python, the samples on threads for large inputs."""
    _check_s0_backward(dy3, x3, v, gamma, mean, var, dx3, part)
    by_size(x3, _s0_backward_serial, _s0_backward_parallel)(dy3, x3, v, gamma, mean, var, eps,
                                                            dx3, part)


# ---------------------------------------------------------------------------------------------
# EvoNorm-B0: y = x / max(sqrt(var_b[c] + eps), v x + sqrt(var_i[n, c] + eps)) * gamma + beta
# ---------------------------------------------------------------------------------------------

@jit()
def _check_b0(x3, v, gamma, batch_var, inst_mean, inst_var):
    N, C = x3.shape[0], x3.shape[1]
    _check_channels(3, v, C)
    _check_channels(0, gamma, C)
    if batch_var.size != C:
        raise ValueError("batch_var must have one value per channel (C,)")
    if (inst_mean.shape[0] != N or inst_mean.shape[1] != C or inst_var.shape[0] != N
            or inst_var.shape[1] != C):
        raise ValueError("instance mean and var must have shape (N, C)")


@jit()
def evonorm_b0_forward(x3, v, gamma, beta, batch_var, inst_var, eps, y3):
    """y3 = x / max(sqrt(batch_var[c] + eps), v x + sqrt(inst_var[n, c] + eps)) * gamma + beta;
    batch_var (C,) (the batch's, or the running variance in evaluation), inst_var (N, C)."""
    N, C, L = x3.shape
    _check_b0(x3, v, gamma, batch_var, inst_var, inst_var)
    _check_channels(1, beta, C)
    _check_like(1, y3, x3)
    for n in range(N):
        for c in range(C):
            left = np.sqrt(np.float64(batch_var[c]) + eps)
            inst_std = np.sqrt(inst_var[n, c] + eps)
            vc, g, b = np.float64(v[c]), np.float64(gamma[c]), np.float64(beta[c])
            for l in range(L):
                xv = np.float64(x3[n, c, l])
                y3[n, c, l] = xv / max(left, vc * xv + inst_std) * g + b


# u = x / den, den = max(left, right), left = sqrt(var_b + eps), right = v x + sigma_i,
# sigma_i = sqrt(var_i + eps); y = gamma u + beta. With du = dy gamma and dden = -du x / den^2:
#   dbeta = sum dy    dgamma = sum dy u
#   where right wins: dv += dden x, dx += dden v, dsigma_i[n, c] += dden
#   where left wins:  dleft[c] += dden (training only: in evaluation left is a constant)
#   dx = du / den + [right] dden v + dsigma_i / sigma_i (x - mean_i) / L
#        + dleft[c] / left (x - mean_b[c]) / (N L)
# (dvar = dsigma / (2 sigma) and dvar/dx = 2 (x - mean) / count.) Two passes: the sums per
# (n, c), then dx once every dleft[c] is complete.
@jit()
def evonorm_b0_backward(dy3, x3, v, gamma, batch_mean, batch_var, inst_mean, inst_var, eps,
                        training, dx3, part):
    """Gradient of :func:`evonorm_b0_forward` (``training``: batch_var is the batch's own and
    carries gradient; else a constant): dx into dx3; part (3, N, C) float64 gets the
    per-sample sums of (dgamma, dbeta, dv)."""
    N, C, L = x3.shape
    _check_b0(x3, v, gamma, batch_var, inst_mean, inst_var)
    _check_like(0, dy3, x3)
    _check_like(1, dx3, x3)
    if batch_mean.size != C:
        raise ValueError("batch_mean must have one value per channel (C,)")
    if part.shape[0] != 3 or part.shape[1] != N or part.shape[2] != C:
        raise ValueError("part must have shape (3, N, C)")
    dsigma = np.empty((N, C))
    dleft_part = np.empty((N, C))
    for n in range(N):
        for c in range(C):
            left = np.sqrt(np.float64(batch_var[c]) + eps)
            inst_std = np.sqrt(inst_var[n, c] + eps)
            vc, g = np.float64(v[c]), np.float64(gamma[c])
            s_dy, s_dy_u, s_dv, s_ds, s_dl = 0.0, 0.0, 0.0, 0.0, 0.0
            for l in range(L):
                xv = np.float64(x3[n, c, l])
                d = np.float64(dy3[n, c, l])
                right = vc * xv + inst_std
                den = max(left, right)
                s_dy += d
                s_dy_u += d * xv / den
                dden = -d * g * xv / (den * den)
                if right > left:
                    s_dv += dden * xv
                    s_ds += dden
                else:
                    s_dl += dden
            part[0, n, c] = s_dy_u
            part[1, n, c] = s_dy
            part[2, n, c] = s_dv
            dsigma[n, c] = s_ds
            dleft_part[n, c] = s_dl
    for n in range(N):
        for c in range(C):
            left = np.sqrt(np.float64(batch_var[c]) + eps)
            inst_std = np.sqrt(inst_var[n, c] + eps)
            vc, g = np.float64(v[c]), np.float64(gamma[c])
            coef_i = dsigma[n, c] / inst_std / L
            coef_b = 0.0
            if training:
                dleft = 0.0
                for m in range(N):
                    dleft += dleft_part[m, c]
                coef_b = dleft / left / (N * L)
            mu_i, mu_b = inst_mean[n, c], np.float64(batch_mean[c])
            for l in range(L):
                xv = np.float64(x3[n, c, l])
                du = np.float64(dy3[n, c, l]) * g
                right = vc * xv + inst_std
                den = max(left, right)
                dx = du / den + coef_i * (xv - mu_i) + coef_b * (xv - mu_b)
                if right > left:
                    dx += -du * xv / (den * den) * vc
                dx3[n, c, l] = dx


# ---------------------------------------------------------------------------------------------
# Switchable norm (Luo et al., 2019): layer and batch statistics pooled from instance ones.
# ---------------------------------------------------------------------------------------------

# Pooling groups of equal size: mean = mean of the means, var = mean of (var + (mean_k - mean)^2)
# (Chan et al.'s combination, no E[x^2] - E[x]^2 cancellation).
@jit()
def _pool(inst_mean, inst_var, i, over_channels):
    """(mean, var) of row i (over_channels: sample i, pooled over the channels) or of column i
    (channel i, pooled over the samples) of the instance statistics (N, C)."""
    count = inst_mean.shape[1] if over_channels else inst_mean.shape[0]
    m = 0.0
    for k in range(count):
        m += inst_mean[i, k] if over_channels else inst_mean[k, i]
    m /= count
    s = 0.0
    for k in range(count):
        if over_channels:
            s += inst_var[i, k] + (inst_mean[i, k] - m) ** 2
        else:
            s += inst_var[k, i] + (inst_mean[k, i] - m) ** 2
    return m, s / count


@jit()
def pool_statistics(inst_mean, inst_var, layer_mean, layer_var, batch_mean, batch_var):
    """From instance statistics (N, C): layer statistics per sample (N,) (over channels) and
    batch statistics per channel (C,) (over samples), float64, written into the outputs."""
    N, C = inst_mean.shape
    if inst_var.shape[0] != N or inst_var.shape[1] != C:
        raise ValueError("inst_var must have the shape of inst_mean (N, C)")
    if layer_mean.size != N or layer_var.size != N:
        raise ValueError("layer_mean and layer_var must have one value per sample (N,)")
    if batch_mean.size != C or batch_var.size != C:
        raise ValueError("batch_mean and batch_var must have one value per channel (C,)")
    for n in range(N):
        layer_mean[n], layer_var[n] = _pool(inst_mean, inst_var, n, True)
    for c in range(C):
        batch_mean[c], batch_var[c] = _pool(inst_mean, inst_var, c, False)


@jit()
def add_centered(dx3, x3, const, coef, center):
    """dx3[n, c, l] += const[n, c] + coef[n, c] * (x3[n, c, l] - center[n, c]); the (N, C)
    arrays float64 (a gradient term of statistics computed per (n, c) or pooled from them)."""
    N, C, L = x3.shape
    _check_like(1, dx3, x3)
    if (const.shape[0] != N or const.shape[1] != C or coef.shape[0] != N or coef.shape[1] != C
            or center.shape[0] != N or center.shape[1] != C):
        raise ValueError("const, coef and center must have shape (N, C)")
    for n in range(N):
        for c in range(C):
            a, b, mu = const[n, c], coef[n, c], center[n, c]
            for l in range(L):
                dx3[n, c, l] = np.float64(dx3[n, c, l]) + a + b * (np.float64(x3[n, c, l]) - mu)
