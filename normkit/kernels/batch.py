"""Batch norm and ghost batch norm kernels: statistics per channel over the batch and spatial axes.

Layout as PyTorch: x is (N, C) or (N, C, *spatial), C-contiguous. Every function is a Numba
``@njit`` function on plain arrays, callable from Python or from your own jitted code::

    y, batch_mean, batch_var = batch.forward_train(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = batch.backward(dy, x, gamma, batch_mean, batch_var, 1e-5)

Statistics (mean, biased var) are float64 arrays of shape (C,); gamma and beta have the input's
dtype and shape (C,); outputs have the input's dtype; dgamma/dbeta are float64. Nothing is
validated here (the classes in ``normkit.norms`` do that) and nothing is mutated but an ``out=``
array: the functions returning y or dx take ``out``, a C-contiguous array of x's shape and dtype
to write it into (reusing one saves the page faults of a fresh large array); running
statistics come back as new arrays from :func:`running_update`.
"""
from __future__ import annotations

import numpy as np

from . import _core
from ._jit import jit


@jit()
def _view(x):
    """(N, C, *S) -> (N, C, 1, L): channels are the groups of the shared computation."""
    N, C = x.shape[0], x.shape[1]
    return x.reshape((N, C, 1, x.size // (N * C)))


@jit()
def forward_train(x, gamma, beta, eps, out=None):
    """Normalize with the batch statistics: returns (y, batch_mean, batch_var), stats (C,).

    y = (x - mean) / sqrt(var + eps) * gamma + beta, var biased, per channel over (N, *S).
    """
    C = x.shape[1]
    y = _core.output_like(x, out)
    _, mean, var = _core.forward_train(_view(x), x.shape[0], gamma.reshape((C, 1)),
                                       beta.reshape((C, 1)), eps, True, _view(y))
    return y, mean[0], var[0]


@jit()
def backward(dy, x, gamma, batch_mean, batch_var, eps, out=None):
    """Gradient of :func:`forward_train`: returns (dx, dgamma, dbeta).

    dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * gamma,
    means per channel over (N, *S); dgamma = sum(dy * xhat); dbeta = sum(dy).
    """
    C = x.shape[1]
    dx = _core.output_like(x, out)
    _, dgamma2, dbeta2 = _core.backward(_view(dy), _view(x), x.shape[0], gamma.reshape((C, 1)),
                                        batch_mean.reshape((1, C)), batch_var.reshape((1, C)),
                                        eps, True, _view(dx))
    return dx, dgamma2[:, 0].copy(), dbeta2[:, 0].copy()


@jit()
def _stats64(running_stat):
    """(C,) running statistic -> (1, C) float64, the shape of batch statistics."""
    return running_stat.astype(np.float64).reshape((1, running_stat.size))


@jit()
def forward_eval(x, gamma, beta, running_mean, running_var, eps, out=None):
    """Normalize with given (running) statistics: y = (x - mean) / sqrt(var + eps) * gamma + beta."""
    C = x.shape[1]
    y = _core.output_like(x, out)
    _core.apply(_view(x), x.shape[0], _stats64(running_mean), _stats64(running_var), eps,
                gamma.reshape((C, 1)), beta.reshape((C, 1)), _view(y))
    return y


@jit()
def backward_eval(dy, x, gamma, running_mean, running_var, eps, out=None):
    """Gradient of :func:`forward_eval` (statistics held constant): returns (dx, dgamma, dbeta).

    dx = dy * gamma / sqrt(var + eps); dgamma = sum(dy * xhat); dbeta = sum(dy).
    """
    C = x.shape[1]
    dx = _core.output_like(x, out)
    _, dgamma2, dbeta2 = _core.backward_frozen(_view(dy), _view(x), gamma.reshape((C, 1)),
                                               _stats64(running_mean), _stats64(running_var), eps,
                                               _view(dx))
    return dx, dgamma2[:, 0].copy(), dbeta2[:, 0].copy()


@jit()
def running_update(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """New running statistics (PyTorch's rule): returns (new_mean, new_var), running dtype.

    new = (1 - momentum) * old + momentum * batch, where running_var receives the UNBIASED batch
    variance batch_var * count / (count - 1) (count = values per channel). ``momentum`` is the
    weight of the new batch (PyTorch's convention; Keras' 0.99 is PyTorch's 0.01); a cumulative
    average is momentum = 1 / num_batches_tracked.
    """
    new_mean = np.empty_like(running_mean)
    new_var = np.empty_like(running_var)
    correction = count / (count - 1.0)
    for c in range(running_mean.size):
        new_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * batch_mean[c]
        new_var[c] = (1.0 - momentum) * running_var[c] + momentum * batch_var[c] * correction
    return new_mean, new_var


@jit()
def ghost_forward_train(x, gamma, beta, eps, virtual_batch_size, out=None):
    """Batch norm on each virtual batch x[v*B:(v+1)*B] (B = virtual_batch_size divides N).

    Returns (y, means, vars) with per-virtual-batch statistics (N // B, C), vars biased.
    """
    C = x.shape[1]
    y = _core.output_like(x, out)
    _, means, variances = _core.forward_train(_view(x), virtual_batch_size, gamma.reshape((C, 1)),
                                              beta.reshape((C, 1)), eps, True, _view(y))
    return y, means, variances


@jit()
def ghost_backward(dy, x, gamma, means, variances, eps, virtual_batch_size, out=None):
    """Gradient of :func:`ghost_forward_train`: batch norm's backward per virtual batch;
    dgamma and dbeta are summed over the virtual batches."""
    C = x.shape[1]
    dx = _core.output_like(x, out)
    _, dgamma2, dbeta2 = _core.backward(_view(dy), _view(x), virtual_batch_size,
                                        gamma.reshape((C, 1)), means, variances, eps, True,
                                        _view(dx))
    return dx, dgamma2[:, 0].copy(), dbeta2[:, 0].copy()


# ---------------------------------------------------------------------------------------------
# Fused training step of the BatchNorm class: one call per direction, nothing returned but a
# status code (every array returned to Python costs about a microsecond to box), outputs written
# into arrays the caller owns.
# ---------------------------------------------------------------------------------------------

#: Status codes of :func:`train_forward_into`.
OK, GAMMA_NOT_FINITE, BETA_NOT_FINITE = 0, 1, 2

# Layout of the ``hyper`` array of :func:`train_forward_into` (float64).
HYPER_EPS, HYPER_MOMENTUM, HYPER_CUMULATIVE, HYPER_TRACK = 0, 1, 2, 3


@jit()
def train_forward_into(x, gamma, beta, y, stats, running_mean, running_var, num_batches_tracked,
                       hyper):
    """Training forward with the running-statistics update fused in; returns a status code.

    x, y (N, C, *S) C-contiguous, same dtype; gamma, beta (C,); stats (2, C) float64 receives
    the batch mean and biased variance (what :func:`backward_into` needs); running_mean,
    running_var (C,) and num_batches_tracked (0-d int64) are updated in place when
    hyper[HYPER_TRACK] != 0, with momentum hyper[HYPER_MOMENTUM], or 1 / (tracked + 1) when
    hyper[HYPER_CUMULATIVE] != 0 (the rule of :func:`running_update`); eps = hyper[HYPER_EPS].
    Returns OK, or GAMMA_NOT_FINITE / BETA_NOT_FINITE before writing anything.
    """
    if not _core.all_finite(gamma):
        return GAMMA_NOT_FINITE
    if not _core.all_finite(beta):
        return BETA_NOT_FINITE
    C = x.shape[1]
    mean = stats[0]                            # (C,) views of the caller's array
    var = stats[1]
    _core._forward(_view(x), x.shape[0], gamma.reshape((C, 1)), beta.reshape((C, 1)),
                   hyper[HYPER_EPS], True, _view(y), mean.reshape((1, C)), var.reshape((1, C)),
                   _core.STATS_AND_APPLY)
    if hyper[HYPER_TRACK] != 0:
        momentum = hyper[HYPER_MOMENTUM]
        if hyper[HYPER_CUMULATIVE] != 0:
            momentum = 1.0 / (num_batches_tracked[()] + 1)
        correction = (x.size // C) / ((x.size // C) - 1.0)
        for c in range(C):
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var[c] * correction
        num_batches_tracked[()] += 1
    return OK


@jit()
def backward_into(dy, x, gamma, stats, eps, dx, dgamma, dbeta):
    """Gradient of :func:`train_forward_into`: dx into ``dx`` (x's shape), dgamma and dbeta
    (C,) into ``dgamma``/``dbeta`` (rounded to their dtype); stats (2, C) as the forward wrote it."""
    C = x.shape[1]
    _, dgamma2, dbeta2 = _core._backward(_view(dy), _view(x), x.shape[0], gamma.reshape((C, 1)),
                                         stats[0].reshape((1, C)), stats[1].reshape((1, C)), eps,
                                         True, False, _view(dx))
    for c in range(C):
        dgamma[c] = dgamma2[c, 0]
        dbeta[c] = dbeta2[c, 0]
