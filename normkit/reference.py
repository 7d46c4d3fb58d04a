"""Plain-NumPy normalization: the oracle the kernels are tested against, and the NumPy baseline.

Written for clarity, not speed. Every norm here is the same computation over different axes:

    xhat = (x - mean) / sqrt(var + eps)        mean, var over the norm's axes (var biased)
    y    = gamma * xhat + beta                 gamma, beta broadcast over the other axes

so one private :func:`_normalize` / :func:`_normalize_backward` pair does the work and each public
function only names its axes (reshaping first where a norm groups axes: group norm splits C into
(groups, C/groups), ghost batch norm splits N into (virtual batches, virtual batch size)).

Conventions shared by every function:

- Internally everything is float64 and the variance is computed in two passes
  (``mean((x - mean)**2)``, never ``E[x**2] - E[x]**2``).
- Outputs ``y`` and ``dx`` have the dtype of ``x``; ``dgamma``/``dbeta`` the dtype of ``gamma``.
  Statistics (means, variances, mean squares, renorm's ``r``/``d``) are returned in float64.
- ``gamma``/``beta`` may be ``None`` (no affine: gamma = 1, beta = 0); a backward with
  ``gamma=None`` returns ``None`` for ``dgamma`` and ``dbeta``.
- Nothing passed in is mutated; running statistics come back as new arrays.
- ``momentum`` is the weight of the NEW batch (PyTorch's meaning; Keras' 0.99 is PyTorch's 0.01).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "batch_forward_train",
    "batch_forward_eval",
    "batch_backward",
    "batch_backward_eval",
    "running_update",
    "ghost_forward_train",
    "ghost_backward",
    "ghost_batch_stats",
    "renorm_forward_train",
    "renorm_backward",
    "layer_forward",
    "layer_backward",
    "group_forward",
    "group_backward",
    "rms_forward",
    "rms_backward",
    "frn_forward",
    "evonorm_s0_forward",
    "evonorm_b0_forward",
    "switchable_forward",
    "dyt_forward",
    "weight_standardize",
]


# ----------------------------------------------------------------------------------------------
# Argument checks (the reference refuses bad input like the kernels do, before computing)
# ----------------------------------------------------------------------------------------------

def _float_array(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


def _param(name: str, p, shape: tuple[int, ...]) -> np.ndarray | None:
    if p is None:
        return None
    p = _float_array(name, p)
    if p.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {p.shape}")
    return p


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


def _check_channels_first(x: np.ndarray) -> None:
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C) or (N, C, *spatial), got ndim {x.ndim}")


def _check_normalized_ndim(x: np.ndarray, normalized_ndim: int) -> None:
    if not 1 <= normalized_ndim <= x.ndim:
        raise ValueError(f"normalized_ndim must be in [1, x.ndim={x.ndim}], got {normalized_ndim}")


def _check_same_shape(name: str, a: np.ndarray, x: np.ndarray) -> None:
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {x.shape}, got {a.shape}")


def _check_training_count(count: int, where: str) -> None:
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training ({where} has {count})")


# ----------------------------------------------------------------------------------------------
# The shared computation
# ----------------------------------------------------------------------------------------------

def _normalize(x: np.ndarray, axes: tuple[int, ...], eps: float, center: bool = True):
    """xhat = (x - mean) * inv_std over ``axes``, in float64; all returns keep dims.

    With ``center=False`` (RMS norm) mean is 0 and ``var`` is the mean of squares.
    Returns ``(xhat, mean, var, inv_std)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if center:
        mean = x.mean(axis=axes, keepdims=True)
    else:
        mean = np.zeros(tuple(1 if i in axes else size for i, size in enumerate(x.shape)))
    centered = x - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)  # second pass: no cancellation
    inv_std = 1.0 / np.sqrt(var + eps)
    return centered * inv_std, mean, var, inv_std


# Backward of xhat = (x - m) * s over a group of n values, m = mean(x), v = mean((x-m)^2),
# s = (v + eps)^(-1/2). With g = dL/dxhat:
#   dxhat_i/dx_j = s * (delta_ij - 1/n) + (x_i - m) * ds/dx_j,
#   ds/dx_j = -1/2 s^3 dv/dx_j = -s^3 (x_j - m)/n          (sum_i (x_i - m) = 0 kills the m-term)
#   dx_j = sum_i g_i dxhat_i/dx_j = s * (g_j - mean(g) - xhat_j * mean(g * xhat)).
# Uncentered (RMS): m = 0 and no -1/n term, so dx_j = s * (g_j - xhat_j * mean(g * xhat)).
def _normalize_backward(dxhat, xhat, inv_std, axes: tuple[int, ...], center: bool = True):
    """dL/dx from dL/dxhat for :func:`_normalize` (float64, same shapes)."""
    projected = dxhat - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
    if center:
        projected = projected - dxhat.mean(axis=axes, keepdims=True)
    return inv_std * projected


def _broadcast_param(p: np.ndarray | None, param_shape: tuple[int, ...]):
    return None if p is None else np.asarray(p, dtype=np.float64).reshape(param_shape)


def _affine(xhat, gamma, beta, param_shape: tuple[int, ...]):
    """y = gamma * xhat + beta with gamma, beta reshaped to ``param_shape`` (None: skipped)."""
    y = xhat
    if gamma is not None:
        y = y * _broadcast_param(gamma, param_shape)
    if beta is not None:
        y = y + _broadcast_param(beta, param_shape)
    return y


# y = gamma * xhat + beta: dxhat = dy * gamma; dgamma = sum(dy * xhat), dbeta = sum(dy) over every
# axis gamma is broadcast along (the axes where param_shape is 1; reducing a length-1 axis of x
# that gamma also has is a no-op, so this rule is safe for any shape).
def _affine_backward(dy, xhat, gamma, param_shape: tuple[int, ...]):
    """Returns ``(dxhat, dgamma, dbeta)``; dgamma/dbeta have gamma's shape (None without gamma)."""
    dy = np.asarray(dy, dtype=np.float64)
    if gamma is None:
        return dy, None, None
    reduce_axes = tuple(i for i, size in enumerate(param_shape) if size == 1)
    dgamma = (dy * xhat).sum(axis=reduce_axes).reshape(gamma.shape)
    dbeta = dy.sum(axis=reduce_axes).reshape(gamma.shape)
    return dy * _broadcast_param(gamma, param_shape), dgamma, dbeta


def _forward(x_view, gamma, beta, axes, param_shape, eps, center=True):
    """Normalize ``x_view`` over ``axes`` and apply the affine; returns float64 (y, mean, var)."""
    xhat, mean, var, _ = _normalize(x_view, axes, eps, center)
    return _affine(xhat, gamma, beta, param_shape), mean, var


def _backward(dy_view, x_view, gamma, axes, param_shape, eps, center=True):
    """Gradients of :func:`_forward`; returns float64 dx and gamma-shaped dgamma, dbeta."""
    xhat, _, _, inv_std = _normalize(x_view, axes, eps, center)
    dxhat, dgamma, dbeta = _affine_backward(dy_view, xhat, gamma, param_shape)
    return _normalize_backward(dxhat, xhat, inv_std, axes, center), dgamma, dbeta


def _cast(a, dtype):
    return None if a is None else np.asarray(a).astype(dtype, copy=False)


def _grads_out(dx, dgamma, dbeta, x, gamma):
    """Cast gradients back: dx to x's dtype, dgamma/dbeta to gamma's."""
    param_dtype = None if gamma is None else gamma.dtype
    return dx.astype(x.dtype, copy=False), _cast(dgamma, param_dtype), _cast(dbeta, param_dtype)


# ----------------------------------------------------------------------------------------------
# Batch norm: x (N, C, *spatial), statistics per channel over N and the spatial axes
# ----------------------------------------------------------------------------------------------

def _batch_layout(x: np.ndarray):
    """(axes reduced, param_shape) for channel-second layout: axes (0, 2, 3, ...), gamma (1, C, 1, ...)."""
    axes = (0,) + tuple(range(2, x.ndim))
    param_shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    return axes, param_shape


def _values_per_channel(x: np.ndarray) -> int:
    return x.size // x.shape[1]


def _check_batch(x, gamma, beta, eps, training: bool):
    x = _float_array("x", x)
    _check_channels_first(x)
    _check_eps(eps)
    channels = (x.shape[1],)
    if training:
        _check_training_count(_values_per_channel(x), "x")
    return x, _param("gamma", gamma, channels), _param("beta", beta, channels)


def batch_forward_train(x, gamma, beta, eps):
    """Training-mode batch norm.

    x: (N, C) or (N, C, *spatial); gamma, beta: (C,) or None.
    Returns ``(y, mean, var)``: y like x; mean, var (C,) float64, var biased (the one normalized by).
    """
    x, gamma, beta = _check_batch(x, gamma, beta, eps, training=True)
    axes, param_shape = _batch_layout(x)
    y, mean, var = _forward(x, gamma, beta, axes, param_shape, eps)
    return y.astype(x.dtype), mean.reshape(-1), var.reshape(-1)


def batch_backward(dy, x, gamma, eps):
    """Gradients of :func:`batch_forward_train` (batch statistics depend on x).

    dy, x: (N, C, *spatial). Returns ``(dx, dgamma, dbeta)``; dgamma, dbeta (C,) or None.
    """
    x, gamma, _ = _check_batch(x, gamma, None, eps, training=True)
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    axes, param_shape = _batch_layout(x)
    return _grads_out(*_backward(dy, x, gamma, axes, param_shape, eps), x, gamma)


def _frozen_xhat(x, running_mean, running_var, eps, param_shape):
    """xhat = (x - running_mean) * inv_std with inv_std = 1/sqrt(running_var + eps), float64."""
    mean = _broadcast_param(running_mean, param_shape)
    inv_std = 1.0 / np.sqrt(_broadcast_param(running_var, param_shape) + eps)
    return (np.asarray(x, dtype=np.float64) - mean) * inv_std, inv_std


def _check_running(running_mean, running_var, channels: int):
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required (arrays of shape (C,))")
    return (_param("running_mean", running_mean, (channels,)),
            _param("running_var", running_var, (channels,)))


def batch_forward_eval(x, gamma, beta, running_mean, running_var, eps):
    """Evaluation-mode batch norm: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

    x: (N, C, *spatial); gamma, beta: (C,) or None; running_mean, running_var: (C,). Returns y like x.
    """
    x, gamma, beta = _check_batch(x, gamma, beta, eps, training=False)
    running_mean, running_var = _check_running(running_mean, running_var, x.shape[1])
    _, param_shape = _batch_layout(x)
    xhat, _ = _frozen_xhat(x, running_mean, running_var, eps, param_shape)
    return _affine(xhat, gamma, beta, param_shape).astype(x.dtype)


# With frozen statistics xhat = (x - running_mean) * inv_std is affine in x:
#   dx = dy * gamma * inv_std;  dgamma = sum(dy * xhat), dbeta = sum(dy) over (N, *spatial).
def batch_backward_eval(dy, x, gamma, running_mean, running_var, eps):
    """Gradients of :func:`batch_forward_eval` (statistics are constants).

    Returns ``(dx, dgamma, dbeta)``; dgamma, dbeta (C,) or None.
    """
    x, gamma, _ = _check_batch(x, gamma, None, eps, training=False)
    running_mean, running_var = _check_running(running_mean, running_var, x.shape[1])
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    _, param_shape = _batch_layout(x)
    xhat, inv_std = _frozen_xhat(x, running_mean, running_var, eps, param_shape)
    dxhat, dgamma, dbeta = _affine_backward(dy, xhat, gamma, param_shape)
    return _grads_out(dxhat * inv_std, dgamma, dbeta, x, gamma)


def running_update(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """PyTorch's running-statistics rule; returns ``(new_mean, new_var)``, mutates nothing.

    new_mean = (1 - momentum) * running_mean + momentum * batch_mean
    new_var  = (1 - momentum) * running_var  + momentum * batch_var * count / (count - 1)

    ``batch_var`` is the BIASED batch variance (what training normalizes with); the running
    variance stores the unbiased one. ``count`` is the number of values per channel
    (N * prod(spatial)). ``momentum`` is the weight of the new batch; PyTorch's cumulative
    average (``momentum=None``) is ``momentum = 1 / num_batches_tracked`` (counted after this batch).
    All arrays (C,); outputs have the dtypes of ``running_mean`` / ``running_var``.
    """
    running_mean = _float_array("running_mean", running_mean)
    running_var = _float_array("running_var", running_var)
    channels = running_mean.shape
    if running_mean.ndim != 1:
        raise ValueError(f"running_mean must have shape (C,), got {running_mean.shape}")
    running_var = _param("running_var", running_var, channels)
    batch_mean = _param("batch_mean", batch_mean, channels)
    batch_var = _param("batch_var", batch_var, channels)
    if int(count) != count:
        raise ValueError(f"count must be an integer (values per channel), got {count!r}")
    _check_training_count(int(count), "count")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (weight of the new batch), got {momentum!r}")
    unbiased_var = np.asarray(batch_var, dtype=np.float64) * (count / (count - 1))
    new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * np.asarray(batch_mean, np.float64)
    new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased_var
    return new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype)


# ----------------------------------------------------------------------------------------------
# Ghost batch norm: batch norm on each disjoint virtual batch x[v*vbs:(v+1)*vbs]
# ----------------------------------------------------------------------------------------------

def _ghost_layout(x: np.ndarray, virtual_batch_size: int):
    """View x (N, C, *S) as (V, vbs, C, *S); normalize over axes (1, 3, 4, ...), gamma (1, 1, C, 1, ...)."""
    n = x.shape[0]
    if not (int(virtual_batch_size) == virtual_batch_size and 1 <= virtual_batch_size <= n
            and n % virtual_batch_size == 0):
        raise ValueError(f"virtual_batch_size must be a positive divisor of the batch size {n}, "
                         f"got {virtual_batch_size!r}")
    vbs = int(virtual_batch_size)
    grouped = x.reshape((n // vbs, vbs) + x.shape[1:])  # (V, vbs, C, *S)
    axes = (1,) + tuple(range(3, grouped.ndim))
    param_shape = (1, 1, x.shape[1]) + (1,) * (x.ndim - 2)
    return grouped, axes, param_shape


def _check_ghost(x, gamma, beta, eps, virtual_batch_size):
    x, gamma, beta = _check_batch(x, gamma, beta, eps, training=False)
    grouped, axes, param_shape = _ghost_layout(x, virtual_batch_size)
    _check_training_count(_values_per_channel(x) * int(virtual_batch_size) // x.shape[0], "a virtual batch")
    return x, gamma, beta, grouped, axes, param_shape


def ghost_forward_train(x, gamma, beta, eps, virtual_batch_size):
    """Ghost batch norm in training: batch norm on each virtual batch of ``virtual_batch_size`` rows.

    x: (N, C, *spatial) with N % virtual_batch_size == 0; gamma, beta (C,) shared by every virtual batch.
    Returns ``(y, means, vars)``: y like x; means, vars (V, C) float64, vars biased, V = N / vbs.
    """
    x, gamma, beta, grouped, axes, param_shape = _check_ghost(x, gamma, beta, eps, virtual_batch_size)
    y, mean, var = _forward(grouped, gamma, beta, axes, param_shape, eps)
    v, c = grouped.shape[0], x.shape[1]
    return y.reshape(x.shape).astype(x.dtype), mean.reshape(v, c), var.reshape(v, c)


def ghost_backward(dy, x, gamma, eps, virtual_batch_size):
    """Gradients of :func:`ghost_forward_train`: batch-norm backward per virtual batch; dgamma, dbeta summed."""
    x, gamma, _, grouped, axes, param_shape = _check_ghost(x, gamma, None, eps, virtual_batch_size)
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    dx, dgamma, dbeta = _backward(dy.reshape(grouped.shape), grouped, gamma, axes, param_shape, eps)
    return _grads_out(dx.reshape(x.shape), dgamma, dbeta, x, gamma)


def ghost_batch_stats(means, vars, count_per_ghost):
    """Batch statistics for the running-stat update from per-ghost-batch statistics.

    means, vars: (V, C), vars biased; ``count_per_ghost`` values per channel in one virtual batch.
    Returns ``(batch_mean, batch_var_unbiased)``, (C,) float64: the mean over ghost batches of the
    means and of the UNBIASED variances ``vars * count / (count - 1)``. With V = 1 this is plain
    batch norm's (mean, unbiased var). The variance is already unbiased: the running update is
    ``(1 - momentum) * running_var + momentum * batch_var_unbiased`` (no second correction).
    """
    means = _float_array("means", means)
    vars = _float_array("vars", vars)
    if means.ndim != 2:
        raise ValueError(f"means must have shape (V, C), got {means.shape}")
    _check_same_shape("vars", vars, means)
    _check_training_count(int(count_per_ghost), "count_per_ghost")
    count = int(count_per_ghost)
    unbiased = vars.astype(np.float64) * (count / (count - 1))
    return means.astype(np.float64).mean(axis=0), unbiased.mean(axis=0)


# ----------------------------------------------------------------------------------------------
# Batch renormalization (Ioffe 2017)
# ----------------------------------------------------------------------------------------------

def _check_renorm(x, gamma, beta, running_mean, running_var, eps, r_max, d_max):
    x, gamma, beta = _check_batch(x, gamma, beta, eps, training=True)
    running_mean, running_var = _check_running(running_mean, running_var, x.shape[1])
    if not r_max >= 1.0:
        raise ValueError(f"r_max must be >= 1, got {r_max!r}")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0, got {d_max!r}")
    return x, gamma, beta, running_mean, running_var


def _renorm_correction(mean, var, running_mean, running_var, eps, r_max, d_max):
    """r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max).

    mean, var: the batch's (biased) statistics; sigma = sqrt(running_var + eps), mu = running_mean.
    Shapes follow the arguments (all broadcast together); float64.
    """
    sigma = np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    sigma_batch = np.sqrt(var + eps)
    r = np.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
    d = np.clip((mean - np.asarray(running_mean, dtype=np.float64)) / sigma, -d_max, d_max)
    return r, d


def renorm_forward_train(x, gamma, beta, running_mean, running_var, eps, r_max, d_max):
    """Batch renormalization in training: xhat = (x - mu_B) / sigma_B * r + d, y = gamma * xhat + beta.

    x: (N, C, *spatial); gamma, beta (C,) or None; running_mean, running_var (C,): the statistics
    BEFORE this batch's update. Returns ``(y, mean, var, r, d)``: y like x; the batch mean and
    biased var, r and d, each (C,) float64. Evaluation is :func:`batch_forward_eval`; the running
    statistics update with :func:`running_update`. r_max=1, d_max=0 is batch norm.
    """
    x, gamma, beta, running_mean, running_var = _check_renorm(
        x, gamma, beta, running_mean, running_var, eps, r_max, d_max)
    axes, param_shape = _batch_layout(x)
    xhat_batch, mean, var, _ = _normalize(x, axes, eps)
    mean, var = mean.reshape(-1), var.reshape(-1)
    r, d = _renorm_correction(mean, var, running_mean, running_var, eps, r_max, d_max)
    xhat = xhat_batch * r.reshape(param_shape) + d.reshape(param_shape)
    return _affine(xhat, gamma, beta, param_shape).astype(x.dtype), mean, var, r, d


# r and d are stop_grad constants, so y = gamma * (r * xhat_B + d) + beta with xhat_B the plain
# batch-norm normalization: dxhat_B = dy * gamma * r, dx = batch-norm backward of dxhat_B;
# dgamma = sum(dy * xhat) with the renormalized xhat, dbeta = sum(dy).
def renorm_backward(dy, x, gamma, running_mean, running_var, eps, r_max, d_max):
    """Gradients of :func:`renorm_forward_train` with r, d held constant. Returns ``(dx, dgamma, dbeta)``."""
    x, gamma, _, running_mean, running_var = _check_renorm(
        x, gamma, None, running_mean, running_var, eps, r_max, d_max)
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    axes, param_shape = _batch_layout(x)
    xhat_batch, mean, var, inv_std = _normalize(x, axes, eps)
    r, d = _renorm_correction(mean, var, _broadcast_param(running_mean, param_shape),
                              _broadcast_param(running_var, param_shape), eps, r_max, d_max)
    dxhat, dgamma, dbeta = _affine_backward(dy, xhat_batch * r + d, gamma, param_shape)
    dx = _normalize_backward(dxhat * r, xhat_batch, inv_std, axes)
    return _grads_out(dx, dgamma, dbeta, x, gamma)


# ----------------------------------------------------------------------------------------------
# Layer norm and RMS norm: over the trailing `normalized_ndim` axes, per-element gamma/beta
# ----------------------------------------------------------------------------------------------

def _trailing_layout(x: np.ndarray, normalized_ndim: int):
    """Axes (-k..-1) and gamma shape (1, ..., 1, *x.shape[-k:]) for the trailing k axes."""
    _check_normalized_ndim(x, normalized_ndim)
    axes = tuple(range(x.ndim - normalized_ndim, x.ndim))
    param_shape = (1,) * (x.ndim - normalized_ndim) + x.shape[x.ndim - normalized_ndim:]
    return axes, param_shape


def _check_trailing(x, gamma, beta, normalized_ndim, eps):
    x = _float_array("x", x)
    _check_eps(eps)
    axes, param_shape = _trailing_layout(x, normalized_ndim)
    normalized_shape = param_shape[x.ndim - normalized_ndim:]
    return (x, _param("gamma", gamma, normalized_shape), _param("beta", beta, normalized_shape),
            axes, param_shape)


def layer_forward(x, gamma, beta, normalized_ndim, eps):
    """Layer norm over the trailing ``normalized_ndim`` axes (same in training and evaluation).

    gamma, beta: x.shape[-normalized_ndim:] or None. Returns ``(y, mean, var)``: y like x;
    mean, var of shape x.shape[:-normalized_ndim], float64, var biased.
    """
    x, gamma, beta, axes, param_shape = _check_trailing(x, gamma, beta, normalized_ndim, eps)
    y, mean, var = _forward(x, gamma, beta, axes, param_shape, eps)
    batch_shape = x.shape[:x.ndim - normalized_ndim]
    return y.astype(x.dtype), mean.reshape(batch_shape), var.reshape(batch_shape)


def layer_backward(dy, x, gamma, normalized_ndim, eps):
    """Gradients of :func:`layer_forward`. Returns ``(dx, dgamma, dbeta)``; dgamma, dbeta like gamma or None."""
    x, gamma, _, axes, param_shape = _check_trailing(x, gamma, None, normalized_ndim, eps)
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    return _grads_out(*_backward(dy, x, gamma, axes, param_shape, eps), x, gamma)


def rms_forward(x, gamma, normalized_ndim, eps):
    """RMS norm over the trailing axes: y = x / sqrt(mean(x**2) + eps) * gamma (no centering, no beta).

    gamma: x.shape[-normalized_ndim:] or None. Returns ``(y, ms)``: y like x; ms = mean of squares,
    shape x.shape[:-normalized_ndim], float64.
    """
    x, gamma, _, axes, param_shape = _check_trailing(x, gamma, None, normalized_ndim, eps)
    y, _, mean_square = _forward(x, gamma, None, axes, param_shape, eps, center=False)
    return y.astype(x.dtype), mean_square.reshape(x.shape[:x.ndim - normalized_ndim])


# With g = dy * gamma and xhat = x * inv_rms, inv_rms = (ms + eps)^(-1/2), d inv_rms/dx_j = -inv_rms^3 x_j / n:
#   dx = inv_rms * (g - xhat * mean(g * xhat));  dgamma = sum(dy * xhat) over the leading axes.
def rms_backward(dy, x, gamma, normalized_ndim, eps):
    """Gradients of :func:`rms_forward`. Returns ``(dx, dgamma)``; dgamma like gamma or None."""
    x, gamma, _, axes, param_shape = _check_trailing(x, gamma, None, normalized_ndim, eps)
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    dx, dgamma, _ = _grads_out(*_backward(dy, x, gamma, axes, param_shape, eps, center=False), x, gamma)
    return dx, dgamma


# ----------------------------------------------------------------------------------------------
# Group norm (instance norm is num_groups = C): statistics per (sample, group), per-channel affine
# ----------------------------------------------------------------------------------------------

def _group_layout(x: np.ndarray, num_groups: int):
    """View x (N, C, *S) as (N, G, C/G, *S); normalize over axes (2, 3, ...), gamma (1, G, C/G, 1, ...)."""
    n, channels = x.shape[:2]
    if not (int(num_groups) == num_groups and num_groups >= 1 and channels % num_groups == 0):
        raise ValueError(f"num_groups must be a positive divisor of the channel count {channels}, "
                         f"got {num_groups!r}")
    groups = int(num_groups)
    grouped = x.reshape((n, groups, channels // groups) + x.shape[2:])  # (N, G, C/G, *S)
    axes = tuple(range(2, grouped.ndim))
    param_shape = (1, groups, channels // groups) + (1,) * (x.ndim - 2)
    return grouped, axes, param_shape


def _check_group(x, gamma, beta, num_groups, eps):
    x, gamma, beta = _check_batch(x, gamma, beta, eps, training=False)
    return (x, gamma, beta) + _group_layout(x, num_groups)


def group_forward(x, gamma, beta, num_groups, eps):
    """Group norm: x (N, C, *spatial), C % num_groups == 0; gamma, beta (C,) or None.

    Returns ``(y, mean, var)``: y like x; mean, var (N, num_groups) float64, var biased.
    ``num_groups = C`` is instance norm; ``num_groups = 1`` is layer norm over (C, *spatial).
    """
    x, gamma, beta, grouped, axes, param_shape = _check_group(x, gamma, beta, num_groups, eps)
    y, mean, var = _forward(grouped, gamma, beta, axes, param_shape, eps)
    stats_shape = grouped.shape[:2]
    return y.reshape(x.shape).astype(x.dtype), mean.reshape(stats_shape), var.reshape(stats_shape)


def group_backward(dy, x, gamma, num_groups, eps):
    """Gradients of :func:`group_forward`. Returns ``(dx, dgamma, dbeta)``; dgamma, dbeta (C,) or None."""
    x, gamma, _, grouped, axes, param_shape = _check_group(x, gamma, None, num_groups, eps)
    dy = _float_array("dy", dy)
    _check_same_shape("dy", dy, x)
    dx, dgamma, dbeta = _backward(dy.reshape(grouped.shape), grouped, gamma, axes, param_shape, eps)
    return _grads_out(dx.reshape(x.shape), dgamma, dbeta, x, gamma)


# ----------------------------------------------------------------------------------------------
# The batch-independent competitors (forward only: their gradients are checked against PyTorch's
# autograd and finite differences). x is (N, C, *spatial); per-channel parameters (C,).
# ----------------------------------------------------------------------------------------------

def _channel(p, x):
    """A per-channel parameter broadcast against x (N, C, *S), float64."""
    return np.asarray(p, dtype=np.float64).reshape((1, -1) + (1,) * (x.ndim - 2))


def _spatial_axes(x):
    return tuple(range(2, x.ndim))


def frn_forward(x, gamma, beta, tau, eps):
    """Filter response normalization + TLU: max(gamma x / sqrt(mean(x^2 over spatial) + eps)
    + beta, tau). ``eps`` is the total (eps + |eps_l| with a learned eps)."""
    x64 = _float_array("x", x).astype(np.float64)
    _check_eps(eps)
    axes = _spatial_axes(x64)
    nu2 = np.mean(x64 ** 2, axis=axes, keepdims=True) if axes else x64 ** 2
    y = _channel(gamma, x64) * x64 / np.sqrt(nu2 + eps) + _channel(beta, x64)
    return np.maximum(y, _channel(tau, x64)).astype(x.dtype)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def evonorm_s0_forward(x, v, gamma, beta, num_groups, eps):
    """EvoNorm-S0: x sigmoid(v x) / sqrt(group_var(x) + eps) gamma + beta, the biased variance
    per sample over each group of C / num_groups channels and the spatial axes."""
    x64 = _float_array("x", x).astype(np.float64)
    _check_eps(eps)
    grouped, axes, _ = _group_layout(x64, num_groups)
    std = np.sqrt(np.var(grouped, axis=axes, keepdims=True) + eps)
    std = np.broadcast_to(std, grouped.shape).reshape(x64.shape)
    y = x64 * _sigmoid(_channel(v, x64) * x64) / std
    return (y * _channel(gamma, x64) + _channel(beta, x64)).astype(x.dtype)


def evonorm_b0_forward(x, v, gamma, beta, eps, batch_var=None):
    """EvoNorm-B0: x / max(sqrt(batch_var + eps), v x + sqrt(instance_var + eps)) gamma + beta.
    ``batch_var`` (C,): None computes the batch's own (biased, over N and the spatial axes), as
    in training; evaluation passes the running variance."""
    x64 = _float_array("x", x).astype(np.float64)
    _check_eps(eps)
    axes = _spatial_axes(x64)
    if batch_var is None:
        batch_var = np.var(x64, axis=(0,) + axes)
    left = np.sqrt(_channel(batch_var, x64) + eps)
    right = _channel(v, x64) * x64 + np.sqrt(np.var(x64, axis=axes, keepdims=True) + eps)
    y = x64 / np.maximum(left, right)
    return (y * _channel(gamma, x64) + _channel(beta, x64)).astype(x.dtype)


def switchable_forward(x, gamma, beta, mean_weight, var_weight, eps, running=None):
    """Switchable norm: (x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) gamma + beta over
    k = instance, layer, batch; w = softmax(mean_weight), w' = softmax(var_weight); biased
    variances. ``running`` = (running_mean, running_var) replaces the batch statistics
    (evaluation). Returns ``(y, batch_mean, batch_var)`` (the batch's, float64)."""
    x64 = _float_array("x", x).astype(np.float64)
    _check_eps(eps)
    spatial = _spatial_axes(x64)
    layer_axes = tuple(range(1, x64.ndim))
    batch_axes = (0,) + spatial
    batch_mean, batch_var = np.mean(x64, axis=batch_axes), np.var(x64, axis=batch_axes)
    used_mean, used_var = (batch_mean, batch_var) if running is None else running
    means = (np.mean(x64, axis=spatial, keepdims=True), np.mean(x64, axis=layer_axes, keepdims=True),
             _channel(used_mean, x64))
    variances = (np.var(x64, axis=spatial, keepdims=True), np.var(x64, axis=layer_axes, keepdims=True),
                 _channel(used_var, x64))

    def softmax(a):
        e = np.exp(np.asarray(a, dtype=np.float64))
        return e / e.sum()

    mean = sum(w * m for w, m in zip(softmax(mean_weight), means))
    var = sum(w * s for w, s in zip(softmax(var_weight), variances))
    y = (x64 - mean) / np.sqrt(var + eps) * _channel(gamma, x64) + _channel(beta, x64)
    return y.astype(x.dtype), batch_mean, batch_var


def dyt_forward(x, alpha, gamma, beta, axis=1):
    """Dynamic Tanh: gamma tanh(alpha x) + beta, gamma and beta per channel at ``axis``."""
    x64 = _float_array("x", x).astype(np.float64)
    shape = [1] * x64.ndim
    shape[axis] = -1
    g = np.asarray(gamma, dtype=np.float64).reshape(shape)
    b = np.asarray(beta, dtype=np.float64).reshape(shape)
    return (g * np.tanh(float(alpha) * x64) + b).astype(x.dtype)


def weight_standardize(weight, eps):
    """Weight standardization: each output unit's weights (axis 0) minus their mean over the
    fan-in, divided by sqrt(their biased variance + eps)."""
    w = _float_array("weight", weight).astype(np.float64)
    _check_eps(eps)
    rows = w.reshape(w.shape[0], -1)
    centered = rows - rows.mean(axis=1, keepdims=True)
    out = centered / np.sqrt(np.mean(centered ** 2, axis=1, keepdims=True) + eps)
    return out.reshape(w.shape).astype(weight.dtype)
