"""Layer norm and RMS norm kernels: statistics per row over the trailing normalized axes.

x is (*rows, *normalized) C-contiguous; gamma (and beta) have the normalized shape, so the
normalized size is ``gamma.size`` and the statistics come back flat, float64, shape (R,) with
R = x.size // gamma.size. Same computation in training and evaluation::

    y, mean, var = layer.forward(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = layer.backward(dy, x, gamma, mean, var, 1e-5)

Functions returning y or dx take ``out=``: a C-contiguous array of x's shape and dtype to write
it into (not checked).
"""
from __future__ import annotations

from . import _core
from ._jit import jit


@jit()
def _view(x, D):
    """(*R, *D) -> (R, 1, D, 1): each row is one group; gamma is per normalized element."""
    return x.reshape((x.size // D, 1, D, 1))


@jit()
def forward(x, gamma, beta, eps, out=None):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta per row: returns (y, mean, var), (R,)."""
    D = gamma.size
    y = _core.output_like(x, out)
    _, mean, var = _core.forward_train(_view(x, D), 1, gamma.reshape((1, D)), beta.reshape((1, D)),
                                       eps, True, _view(y, D))
    return y, mean[:, 0].copy(), var[:, 0].copy()


@jit()
def backward(dy, x, gamma, mean, var, eps, out=None):
    """Gradient of :func:`forward`: (dx, dgamma, dbeta), dgamma/dbeta float64 of gamma's shape.

    dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) per row, dxhat = dy * gamma.
    """
    D = gamma.size
    R = x.size // D
    dx = _core.output_like(x, out)
    _, dgamma2, dbeta2 = _core.backward(_view(dy, D), _view(x, D), 1, gamma.reshape((1, D)),
                                        mean.reshape((R, 1)), var.reshape((R, 1)), eps, True,
                                        _view(dx, D))
    return dx, dgamma2.reshape(gamma.shape), dbeta2.reshape(gamma.shape)


@jit()
def rms_forward(x, gamma, eps, out=None):
    """y = x / sqrt(mean(x^2) + eps) * gamma per row: returns (y, mean_square), (R,)."""
    D = gamma.size
    zero_beta = gamma.reshape((1, D)) * 0
    y = _core.output_like(x, out)
    _, _, mean_square = _core.forward_train(_view(x, D), 1, gamma.reshape((1, D)), zero_beta, eps,
                                            False, _view(y, D))
    return y, mean_square[:, 0].copy()


@jit()
def rms_backward(dy, x, gamma, mean_square, eps, out=None):
    """Gradient of :func:`rms_forward`: (dx, dgamma).

    With xhat = x * inv_rms: dx = inv_rms * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dy * gamma.
    """
    D = gamma.size
    R = x.size // D
    zero_mean = mean_square.reshape((R, 1)) * 0.0
    dx = _core.output_like(x, out)
    _, dgamma2, _ = _core.backward(_view(dy, D), _view(x, D), 1, gamma.reshape((1, D)), zero_mean,
                                   mean_square.reshape((R, 1)), eps, False, _view(dx, D))
    return dx, dgamma2.reshape(gamma.shape)
