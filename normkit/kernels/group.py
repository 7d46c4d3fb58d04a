"""Group norm kernels (instance norm is num_groups == C): statistics per (sample, group).

x is (N, C, *spatial) C-contiguous with C % num_groups == 0; gamma, beta (C,) per channel;
statistics float64 (N, num_groups)::

    y, mean, var = group.forward(x, gamma, beta, num_groups, 1e-5)
    dx, dgamma, dbeta = group.backward(dy, x, gamma, num_groups, mean, var, 1e-5)

Functions returning y or dx take ``out=``: a C-contiguous array of x's shape and dtype to write
it into. Thin wrappers naming the view (N, G, C/G, L) of the statistics engine.
"""
from __future__ import annotations

import numpy as np

from . import _engine
from ._jit import jit
from .batch import _output


@jit()
def _view(x, num_groups):
    """(N, C, *S) -> (N, G, C/G, L)."""
    N, C = x.shape[0], x.shape[1]
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError("num_groups must be >= 1 and divide the channels C")
    return x.reshape((N, num_groups, C // num_groups, x.size // (N * C)))


@jit()
def _affine(a, num_groups, C):
    if a.size != C:
        raise ValueError("gamma and beta must have one value per channel (C,)")
    return a.reshape((num_groups, C // num_groups))


@jit()
def forward(x, gamma, beta, num_groups, eps, out=None):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta, stats per (n, group): (y, mean, var)."""
    x4 = _view(x, num_groups)
    N, C = x.shape[0], x.shape[1]
    y = _output(x, out)
    mean, var = np.empty((N, num_groups)), np.empty((N, num_groups))
    _engine.forward(x4, 1, _affine(gamma, num_groups, C), _affine(beta, num_groups, C), eps, True,
                    _engine.NO_MASK, False, _view(y, num_groups), mean, var, np.empty(N),
                    _engine.STATS_AND_APPLY)
    return y, mean, var


@jit()
def backward(dy, x, gamma, num_groups, mean, var, eps, out=None):
    """Gradient of :func:`forward`: (dx, dgamma, dbeta), dgamma/dbeta float64 (C,).

    dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means per (n, group).
    """
    x4 = _view(x, num_groups)
    N, C = x.shape[0], x.shape[1]
    dx = _output(x, out)
    G, Cg = num_groups, C // num_groups
    dgamma, dbeta = np.empty((G, Cg)), np.empty((G, Cg))
    _engine.backward(_view(dy, num_groups), x4, 1, _affine(gamma, num_groups, C), mean, var,
                     np.full(N, np.float64(x.size // (N * G))), eps, True, False, _engine.NO_MASK,
                     False, _view(dx, num_groups), dgamma, dbeta)
    return dx, dgamma.reshape(gamma.shape), dbeta.reshape(gamma.shape)
