"""Batch norm and ghost batch norm kernels: statistics per channel over the batch and spatial axes.

Layout as PyTorch: x is (N, C) or (N, C, *spatial), C-contiguous. Every function is a Numba
``@njit`` function on plain arrays, callable from Python or from your own jitted code::

    y, batch_mean, batch_var = batch.forward_train(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = batch.backward(dy, x, gamma, batch_mean, batch_var, 1e-5)

Statistics (mean, biased var) are float64 arrays of shape (C,); gamma and beta have the input's
dtype and shape (C,); outputs have the input's dtype; dgamma/dbeta are float64. Nothing is
mutated but an ``out=`` array (C-contiguous, x's shape and dtype) that the functions returning y
or dx write into; running statistics come back as new arrays from :func:`running_update`.
Shapes are checked (ValueError naming the argument); values are not. Each function is a thin
wrapper naming the view of the statistics engine (:mod:`normkit.kernels._engine`).
"""
from __future__ import annotations

import numpy as np

from . import _engine
from ._jit import jit


@jit()
def _view(x):
    """(N, C, *S) -> (N, C, 1, L): channels are the groups of the engine."""
    N, C = x.shape[0], x.shape[1]
    return x.reshape((N, C, 1, x.size // (N * C)))


@jit()
def _output(x, out):
    """``out`` (checked: x's shape) or a new array like x."""
    if out is None:
        return np.empty_like(x)
    if out.shape != x.shape:
        raise ValueError("out must have the shape of x")
    return out


@jit()
def _per_channel(name_is_gamma, a, C):
    if a.size != C:
        if name_is_gamma:
            raise ValueError("gamma must have one value per channel (C,)")
        raise ValueError("beta (or a statistic) must have one value per channel (C,)")
    return a.reshape((C, 1))


@jit()
def forward_train(x, gamma, beta, eps, out=None):
    """Normalize with the batch statistics: returns (y, batch_mean, batch_var), stats (C,).

    y = (x - mean) / sqrt(var + eps) * gamma + beta, var biased, per channel over (N, *S).
    """
    C = x.shape[1]
    y = _output(x, out)
    mean, var, count = np.empty((1, C)), np.empty((1, C)), np.empty(1)
    _engine.forward(_view(x), x.shape[0], _per_channel(True, gamma, C),
                    _per_channel(False, beta, C), eps, True, _engine.NO_MASK, False, _view(y),
                    mean, var, count, _engine.STATS_AND_APPLY)
    return y, mean[0], var[0]


@jit()
def backward(dy, x, gamma, batch_mean, batch_var, eps, out=None):
    """Gradient of :func:`forward_train`: returns (dx, dgamma, dbeta).

    dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * gamma,
    means per channel over (N, *S); dgamma = sum(dy * xhat); dbeta = sum(dy).
    """
    C = x.shape[1]
    dx = _output(x, out)
    dgamma, dbeta = np.empty((C, 1)), np.empty((C, 1))
    count = np.full(1, x.size / C)
    _engine.backward(_view(dy), _view(x), x.shape[0], _per_channel(True, gamma, C),
                     _per_channel(False, batch_mean, C).reshape((1, C)),
                     _per_channel(False, batch_var, C).reshape((1, C)), count, eps, True, False,
                     _engine.NO_MASK, False, _view(dx), dgamma, dbeta)
    return dx, dgamma[:, 0].copy(), dbeta[:, 0].copy()


@jit()
def forward_eval(x, gamma, beta, running_mean, running_var, eps, out=None):
    """Normalize with given (running) statistics: y = (x - mean) / sqrt(var + eps) * gamma + beta."""
    C = x.shape[1]
    y = _output(x, out)
    mean = _per_channel(False, running_mean, C).astype(np.float64).reshape((1, C))
    var = _per_channel(False, running_var, C).astype(np.float64).reshape((1, C))
    _engine.forward(_view(x), x.shape[0], _per_channel(True, gamma, C),
                    _per_channel(False, beta, C), eps, True, _engine.NO_MASK, False, _view(y),
                    mean, var, np.empty(1), _engine.APPLY_ONLY)
    return y


@jit()
def backward_eval(dy, x, gamma, running_mean, running_var, eps, out=None):
    """Gradient of :func:`forward_eval` (statistics held constant): returns (dx, dgamma, dbeta).

    dx = dy * gamma / sqrt(var + eps); dgamma = sum(dy * xhat); dbeta = sum(dy).
    """
    C = x.shape[1]
    dx = _output(x, out)
    dgamma, dbeta = np.empty((C, 1)), np.empty((C, 1))
    mean = _per_channel(False, running_mean, C).astype(np.float64).reshape((1, C))
    var = _per_channel(False, running_var, C).astype(np.float64).reshape((1, C))
    _engine.backward(_view(dy), _view(x), x.shape[0], _per_channel(True, gamma, C), mean, var,
                     np.full(1, x.size / C), eps, True, True, _engine.NO_MASK, False, _view(dx),
                     dgamma, dbeta)
    return dx, dgamma[:, 0].copy(), dbeta[:, 0].copy()


@jit()
def running_update(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """New running statistics (PyTorch's rule): returns (new_mean, new_var), running dtype.

    new = (1 - momentum) * old + momentum * batch, where running_var receives the UNBIASED batch
    variance batch_var * count / (count - 1) (count = values per channel). ``momentum`` is the
    weight of the new batch (PyTorch's convention; Keras' 0.99 is PyTorch's 0.01); a cumulative
    average is momentum = 1 / num_batches_tracked.
    """
    C = running_mean.size
    if running_var.size != C or batch_mean.size != C or batch_var.size != C:
        raise ValueError("running_mean, running_var, batch_mean and batch_var must all be (C,)")
    new_mean = running_mean.copy()
    new_var = running_var.copy()
    _engine.running_update(new_mean.reshape((1, C)), new_var.reshape((1, C)),
                           np.zeros(1, np.int64), batch_mean.astype(np.float64).reshape((1, C)),
                           batch_var.astype(np.float64).reshape((1, C)),
                           np.full(1, np.float64(count)), momentum, False, False)
    return new_mean, new_var


@jit()
def ghost_forward_train(x, gamma, beta, eps, virtual_batch_size, out=None):
    """Batch norm on each virtual batch x[v*B:(v+1)*B] (B = virtual_batch_size divides N).

    Returns (y, means, vars) with per-virtual-batch statistics (N // B, C), vars biased.
    """
    C = x.shape[1]
    y = _output(x, out)
    V = x.shape[0] // virtual_batch_size if virtual_batch_size > 0 else 0
    mean, var, count = np.empty((V, C)), np.empty((V, C)), np.empty(V)
    _engine.forward(_view(x), virtual_batch_size, _per_channel(True, gamma, C),
                    _per_channel(False, beta, C), eps, True, _engine.NO_MASK, False, _view(y),
                    mean, var, count, _engine.STATS_AND_APPLY)
    return y, mean, var


@jit()
def ghost_backward(dy, x, gamma, means, variances, eps, virtual_batch_size, out=None):
    """Gradient of :func:`ghost_forward_train`: batch norm's backward per virtual batch;
    dgamma and dbeta are summed over the virtual batches."""
    C = x.shape[1]
    dx = _output(x, out)
    dgamma, dbeta = np.empty((C, 1)), np.empty((C, 1))
    V = means.shape[0]
    _engine.backward(_view(dy), _view(x), virtual_batch_size, _per_channel(True, gamma, C), means,
                     variances, np.full(V, x.size / (C * max(V, 1))), eps, True, False,
                     _engine.NO_MASK, False, _view(dx), dgamma, dbeta)
    return dx, dgamma[:, 0].copy(), dbeta[:, 0].copy()
