"""The computation every normalizer shares: statistics over groups of a 4-D view, then affine.

Batch, ghost, layer, group, instance and RMS norm differ only in which axes they reduce. Each is
run on a C-contiguous 4-D view of its input and one integer, the *statistics batch* ``B``::

    x4: (N, G, Cg, L)    statistics per (v, g) over rows n in [v*B, (v+1)*B), cg and l
                         affine per channel (g, cg): y = gamma[g, cg] * xhat + beta[g, cg]

    batch      (N, C, *S) -> (N, C, 1, L)     B = N            stats (1, C)
    ghost      (N, C, *S) -> (N, C, 1, L)     B = virtual      stats (N/B, C)
    group      (N, C, *S) -> (N, G, C/G, L)   B = 1            stats (N, G)
    instance   (N, C, *S) -> (N, C, 1, L)     B = 1            stats (N, C)
    layer/rms  (*R, *D)   -> (R, 1, D, 1)     B = 1            stats (R, 1)

With ``V = N / B`` statistics groups along the rows, a *group* is (v, g) and holds
``M = B * Cg * L`` values. ``centered=False`` gives RMS norm (mean taken as 0).

Forward (two-pass statistics, accumulated in float64 whatever the input dtype)::

    mean = sum(x) / M                   var = sum((x - mean)^2) / M       (biased)
    inv_std = 1 / sqrt(var + eps)       y = (x - mean) * inv_std * gamma + beta

Backward, with xhat = (x - mean) * inv_std and dxhat = dy * gamma (per channel)::

    dbeta  = sum_{n, l} dy               dgamma = sum_{n, l} dy * xhat    (per channel)
    dx     = inv_std * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat))

where mean_group(dxhat) = sum_cg gamma * dbeta_group / M and
mean_group(dxhat * xhat) = sum_cg gamma * dgamma_group / M, the sums taken over the group only.
(RMS: no mean_group(dxhat) term, since the mean is not subtracted.)

Each group is handled by one thread from start to end (statistics, then output), so the group's
data is still in cache for the second and third pass, and results do not depend on the number of
threads. Every driver comes as a serial and a parallel twin over the same item function; the
public kernels pick the serial one for small inputs, where starting threads costs more than the
work.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from ._jit import jit, serial_and_parallel

#: Inputs with fewer elements than this run on the calling thread only.
PARALLEL_MIN_SIZE = 1 << 15

# Backward accumulates dgamma/dbeta of row-chunks into partial sums, then adds the chunks in a
# fixed order: a fixed chunk count keeps results independent of the thread count.
_MAX_CHUNKS = 64


# ---------------------------------------------------------------------------------------------
# Statistics of one group
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _group_moments(x3, n0, n1, g, centered):
    """Mean and biased variance (float64) of x3[n0:n1, g, :] — x3: (N, G, K)."""
    count = (n1 - n0) * x3.shape[2]
    mean = 0.0
    if centered:
        total = 0.0
        for n in range(n0, n1):
            xb = x3[n, g]                      # (K,)
            for k in range(xb.size):
                total += xb[k]
        mean = total / count
    squares = 0.0
    for n in range(n0, n1):
        xb = x3[n, g]
        for k in range(xb.size):
            dev = xb[k] - mean
            squares += dev * dev
    return mean, squares / count


@jit()
def _apply_group(x3, y3, n0, n1, g, L, mean, inv_std, gamma2, beta2):
    """y = (x - mean) * inv_std * gamma + beta on rows n0:n1 of group g — x3, y3: (N, G, K)."""
    gamma = gamma2[g]                          # (Cg,)
    beta = beta2[g]
    Cg = gamma.size
    for n in range(n0, n1):
        xb = x3[n, g]                          # (Cg * L,)
        yb = y3[n, g]
        if L == 1:
            for c in range(Cg):
                yb[c] = (xb[c] - mean) * (inv_std * gamma[c]) + beta[c]
        else:
            for c in range(Cg):
                scale = inv_std * gamma[c]
                shift = beta[c] - mean * scale
                xs = xb[c * L:(c + 1) * L]     # (L,)
                ys = yb[c * L:(c + 1) * L]
                for l in range(L):
                    ys[l] = xs[l] * scale + shift


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _forward_item(s, x3, y3, B, L, gamma2, beta2, eps, centered, mean_out, var_out):
    """Statistics and output of group s = v * G + g."""
    G = x3.shape[1]
    v, g = s // G, s % G
    mean, var = _group_moments(x3, v * B, (v + 1) * B, g, centered)
    _apply_group(x3, y3, v * B, (v + 1) * B, g, L, mean, 1.0 / np.sqrt(var + eps), gamma2, beta2)
    mean_out[v, g] = mean
    var_out[v, g] = var


def _forward_loop(x4, B, gamma2, beta2, eps, centered):
    N, G, Cg, L = x4.shape
    x3 = x4.reshape((N, G, Cg * L))
    y4 = np.empty_like(x4)
    y3 = y4.reshape((N, G, Cg * L))
    V = N // B
    mean = np.empty((V, G))
    var = np.empty((V, G))
    for s in prange(V * G):
        _forward_item(s, x3, y3, B, L, gamma2, beta2, eps, centered, mean, var)
    return y4, mean, var


_forward_serial, _forward_parallel = serial_and_parallel(_forward_loop)


@jit()
def forward_train(x4, B, gamma2, beta2, eps, centered):
    """Normalize with the statistics of each group: returns (y4, mean, var), stats (N // B, G).

    x4 (N, G, Cg, L) C-contiguous; gamma2, beta2 (G, Cg); var is the biased variance.
    """
    if x4.size < PARALLEL_MIN_SIZE:
        return _forward_serial(x4, B, gamma2, beta2, eps, centered)
    return _forward_parallel(x4, B, gamma2, beta2, eps, centered)


@jit(reduction=True)
def _moments_item(s, x3, B, centered, mean_out, var_out):
    G = x3.shape[1]
    v, g = s // G, s % G
    mean, var = _group_moments(x3, v * B, (v + 1) * B, g, centered)
    mean_out[v, g] = mean
    var_out[v, g] = var


def _moments_loop(x4, B, centered):
    N, G, Cg, L = x4.shape
    x3 = x4.reshape((N, G, Cg * L))
    V = N // B
    mean = np.empty((V, G))
    var = np.empty((V, G))
    for s in prange(V * G):
        _moments_item(s, x3, B, centered, mean, var)
    return mean, var


_moments_serial, _moments_parallel = serial_and_parallel(_moments_loop)


@jit()
def moments(x4, B, centered):
    """Mean and biased variance of each group, float64 (N // B, G); x4 (N, G, Cg, L)."""
    if x4.size < PARALLEL_MIN_SIZE:
        return _moments_serial(x4, B, centered)
    return _moments_parallel(x4, B, centered)


@jit()
def _apply_item(s, x3, y3, B, L, mean, inv_std, gamma2, beta2):
    G = x3.shape[1]
    v, g = s // G, s % G
    _apply_group(x3, y3, v * B, (v + 1) * B, g, L, mean[v, g], inv_std[v, g], gamma2, beta2)


def _apply_loop(x4, B, mean, inv_std, gamma2, beta2):
    N, G, Cg, L = x4.shape
    x3 = x4.reshape((N, G, Cg * L))
    y4 = np.empty_like(x4)
    y3 = y4.reshape((N, G, Cg * L))
    for s in prange(mean.size):
        _apply_item(s, x3, y3, B, L, mean, inv_std, gamma2, beta2)
    return y4


_apply_serial, _apply_parallel = serial_and_parallel(_apply_loop)


@jit()
def apply(x4, B, mean, inv_std, gamma2, beta2):
    """y = (x - mean) * inv_std * gamma + beta with given statistics (N // B, G) — no reduction."""
    if x4.size < PARALLEL_MIN_SIZE:
        return _apply_serial(x4, B, mean, inv_std, gamma2, beta2)
    return _apply_parallel(x4, B, mean, inv_std, gamma2, beta2)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _backward_group(dy3, x3, dx3, n0, n1, g, L, mean, inv_std, gamma, centered, sum_dy, sum_dy_xhat):
    """dx for rows n0:n1 of group g; adds the group's per-channel dbeta/dgamma into sum_dy,
    sum_dy_xhat (Cg,). dy3, x3, dx3: (N, G, Cg * L); gamma: (Cg,)."""
    Cg = gamma.size
    group_dy = np.zeros(Cg)                    # (Cg,) sum over the group of dy, per channel
    group_dy_dev = np.zeros(Cg)                # (Cg,) sum of dy * (x - mean), per channel
    for n in range(n0, n1):
        xb = x3[n, g]
        db = dy3[n, g]
        if L == 1:
            for c in range(Cg):
                group_dy[c] += db[c]
                group_dy_dev[c] += db[c] * (xb[c] - mean)
        else:
            for c in range(Cg):
                s_dy = 0.0
                s_dy_dev = 0.0
                xs = xb[c * L:(c + 1) * L]
                ds = db[c * L:(c + 1) * L]
                for l in range(L):
                    s_dy += ds[l]
                    s_dy_dev += ds[l] * (xs[l] - mean)
                group_dy[c] += s_dy
                group_dy_dev[c] += s_dy_dev
    count = (n1 - n0) * Cg * L
    mean_dxhat = 0.0                           # mean over the group of dxhat
    mean_dxhat_xhat = 0.0                      # mean over the group of dxhat * xhat
    for c in range(Cg):
        sum_dy[c] += group_dy[c]
        sum_dy_xhat[c] += group_dy_dev[c] * inv_std
        if centered:
            mean_dxhat += gamma[c] * group_dy[c]
        mean_dxhat_xhat += gamma[c] * group_dy_dev[c] * inv_std
    mean_dxhat /= count
    mean_dxhat_xhat /= count
    # dx = inv_std * (gamma * dy - mean_dxhat - (x - mean) * inv_std * mean_dxhat_xhat)
    x_coef = -inv_std * inv_std * mean_dxhat_xhat
    const = -inv_std * mean_dxhat - mean * x_coef
    for n in range(n0, n1):
        xb = x3[n, g]
        db = dy3[n, g]
        dxb = dx3[n, g]
        if L == 1:
            for c in range(Cg):
                dxb[c] = db[c] * (inv_std * gamma[c]) + xb[c] * x_coef + const
        else:
            for c in range(Cg):
                dy_coef = inv_std * gamma[c]
                xs = xb[c * L:(c + 1) * L]
                ds = db[c * L:(c + 1) * L]
                dxs = dxb[c * L:(c + 1) * L]
                for l in range(L):
                    dxs[l] = ds[l] * dy_coef + xs[l] * x_coef + const


@jit(reduction=True)
def _backward_item(item, dy3, x3, dx3, B, L, mean, var, eps, gamma2, centered, chunk_groups,
                   part_dy, part_dy_xhat):
    """Groups (v, g) for v in chunk j = item // G: dx, and the chunk's partial dbeta/dgamma."""
    G = x3.shape[1]
    j, g = item // G, item % G
    V = mean.shape[0]
    for v in range(j * chunk_groups, min((j + 1) * chunk_groups, V)):
        _backward_group(dy3, x3, dx3, v * B, (v + 1) * B, g, L, mean[v, g],
                        1.0 / np.sqrt(var[v, g] + eps), gamma2[g], centered,
                        part_dy[j, g], part_dy_xhat[j, g])


def _backward_loop(dy4, x4, B, gamma2, mean, var, eps, centered):
    N, G, Cg, L = x4.shape
    x3 = x4.reshape((N, G, Cg * L))
    dy3 = dy4.reshape((N, G, Cg * L))
    dx4 = np.empty_like(x4)
    dx3 = dx4.reshape((N, G, Cg * L))
    V = N // B
    chunks = min(V, _MAX_CHUNKS)
    chunk_groups = (V + chunks - 1) // chunks
    part_dy = np.zeros((chunks, G, Cg))        # (J, G, Cg) partial dbeta per row-chunk
    part_dy_xhat = np.zeros((chunks, G, Cg))   # (J, G, Cg) partial dgamma per row-chunk
    for item in prange(chunks * G):
        _backward_item(item, dy3, x3, dx3, B, L, mean, var, eps, gamma2, centered, chunk_groups,
                       part_dy, part_dy_xhat)
    return dx4, part_dy_xhat.sum(axis=0), part_dy.sum(axis=0)


_backward_serial, _backward_parallel = serial_and_parallel(_backward_loop)


@jit()
def backward(dy4, x4, B, gamma2, mean, var, eps, centered):
    """Gradient of forward_train: returns (dx4, dgamma2, dbeta2); dgamma2, dbeta2 float64 (G, Cg).

    dy4, x4 (N, G, Cg, L) C-contiguous; mean, var (N // B, G) as forward_train returned them.
    """
    if x4.size < PARALLEL_MIN_SIZE:
        return _backward_serial(dy4, x4, B, gamma2, mean, var, eps, centered)
    return _backward_parallel(dy4, x4, B, gamma2, mean, var, eps, centered)


# ---------------------------------------------------------------------------------------------
# Backward with frozen statistics (batch norm in evaluation mode, or with frozen running stats):
# y = (x - mean) * inv_std * gamma + beta with mean, inv_std constants, so
#     dx = dy * gamma * inv_std,   dgamma = sum dy * xhat,   dbeta = sum dy.
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _frozen_backward_item(g, dy3, x3, dx3, L, mean, inv_std, gamma2, dgamma2, dbeta2):
    gamma = gamma2[g]
    Cg = gamma.size
    for c in range(Cg):
        s_dy = 0.0
        s_dy_dev = 0.0
        dy_coef = inv_std[g] * gamma[c]
        for n in range(x3.shape[0]):
            xs = x3[n, g][c * L:(c + 1) * L]
            ds = dy3[n, g][c * L:(c + 1) * L]
            dxs = dx3[n, g][c * L:(c + 1) * L]
            for l in range(L):
                s_dy += ds[l]
                s_dy_dev += ds[l] * (xs[l] - mean[g])
                dxs[l] = ds[l] * dy_coef
        dbeta2[g, c] = s_dy
        dgamma2[g, c] = s_dy_dev * inv_std[g]


def _frozen_backward_loop(dy4, x4, gamma2, mean, inv_std):
    N, G, Cg, L = x4.shape
    x3 = x4.reshape((N, G, Cg * L))
    dy3 = dy4.reshape((N, G, Cg * L))
    dx4 = np.empty_like(x4)
    dx3 = dx4.reshape((N, G, Cg * L))
    dgamma2 = np.empty((G, Cg))
    dbeta2 = np.empty((G, Cg))
    for g in prange(G):
        _frozen_backward_item(g, dy3, x3, dx3, L, mean, inv_std, gamma2, dgamma2, dbeta2)
    return dx4, dgamma2, dbeta2


_frozen_backward_serial, _frozen_backward_parallel = serial_and_parallel(_frozen_backward_loop)


@jit()
def backward_frozen(dy4, x4, gamma2, mean, inv_std):
    """Gradient with statistics held constant: (dx4, dgamma2, dbeta2). mean, inv_std: (G,)."""
    if x4.size < PARALLEL_MIN_SIZE:
        return _frozen_backward_serial(dy4, x4, gamma2, mean, inv_std)
    return _frozen_backward_parallel(dy4, x4, gamma2, mean, inv_std)
