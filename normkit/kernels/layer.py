"""Layer norm and RMS norm kernels: statistics per row over the trailing normalized axes.

x is (*rows, *normalized) C-contiguous; gamma (and beta) have the normalized shape, so the
normalized size is ``gamma.size`` and the statistics come back flat, float64, shape (R,) with
R = x.size // gamma.size. Same computation in training and evaluation::

    y, mean, var = layer.forward(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = layer.backward(dy, x, gamma, mean, var, 1e-5)

Functions returning y or dx take ``out=``: a C-contiguous array of x's shape and dtype to write
it into. Thin wrappers naming the view (R, 1, D, 1) of the statistics engine.
"""
from __future__ import annotations

import numpy as np

from . import _engine
from ._jit import jit
from .batch import _output


@jit()
def _view(x, D):
    """(*R, *D) -> (R, 1, D, 1): each row is one group; gamma is per normalized element."""
    if D == 0 or x.size % D != 0:
        raise ValueError("x's trailing axes must hold gamma.size values per row")
    return x.reshape((x.size // D, 1, D, 1))


@jit()
def _row_stats(a, R):
    if a.size != R:
        raise ValueError("mean and var must have one value per row (R,)")
    return a.reshape((R, 1))


@jit()
def forward(x, gamma, beta, eps, out=None):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per row: returns (y, mean, var), (R,)."""
    D = gamma.size
    x4 = _view(x, D)
    R = x4.shape[0]
    y = _output(x, out)
    mean, var = np.empty((R, 1)), np.empty((R, 1))
    _engine.forward(x4, 1, gamma.reshape((1, D)), beta.reshape((1, beta.size)), eps, True,
                    _engine.NO_MASK, False, _view(y, D), mean, var, np.empty(R),
                    _engine.STATS_AND_APPLY)
    return y, mean[:, 0].copy(), var[:, 0].copy()


@jit()
def backward(dy, x, gamma, mean, var, eps, out=None):
    """Gradient of :func:`forward`: (dx, dgamma, dbeta), dgamma/dbeta float64 of gamma's shape.

    dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) per row, dxhat = dy * gamma.
    """
    D = gamma.size
    x4 = _view(x, D)
    R = x4.shape[0]
    dx = _output(x, out)
    dgamma, dbeta = np.empty((1, D)), np.empty((1, D))
    _engine.backward(_view(dy, D), x4, 1, gamma.reshape((1, D)), _row_stats(mean, R),
                     _row_stats(var, R), np.full(R, np.float64(D)), eps, True, False,
                     _engine.NO_MASK, False, _view(dx, D), dgamma, dbeta)
    return dx, dgamma.reshape(gamma.shape), dbeta.reshape(gamma.shape)


@jit()
def rms_forward(x, gamma, eps, out=None):
    """y = x / sqrt(mean(x^2) + eps) * gamma per row: returns (y, mean_square), (R,)."""
    D = gamma.size
    x4 = _view(x, D)
    R = x4.shape[0]
    y = _output(x, out)
    mean, mean_square = np.empty((R, 1)), np.empty((R, 1))
    _engine.forward(x4, 1, gamma.reshape((1, D)), np.zeros((1, D), gamma.dtype), eps, False,
                    _engine.NO_MASK, False, _view(y, D), mean, mean_square, np.empty(R),
                    _engine.STATS_AND_APPLY)
    return y, mean_square[:, 0].copy()


@jit()
def rms_backward(dy, x, gamma, mean_square, eps, out=None):
    """Gradient of :func:`rms_forward`: (dx, dgamma).

    With xhat = x * inv_rms: dx = inv_rms * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dy * gamma.
    """
    D = gamma.size
    x4 = _view(x, D)
    R = x4.shape[0]
    dx = _output(x, out)
    dgamma, dbeta = np.empty((1, D)), np.empty((1, D))
    _engine.backward(_view(dy, D), x4, 1, gamma.reshape((1, D)), np.zeros((R, 1)),
                     _row_stats(mean_square, R), np.full(R, np.float64(D)), eps, False, False,
                     _engine.NO_MASK, False, _view(dx, D), dgamma, dbeta)
    return dx, dgamma.reshape(gamma.shape)
