"""Group norm kernels (instance norm is num_groups == C): statistics per (sample, group).

x is (N, C, *spatial) C-contiguous with C % num_groups == 0; gamma, beta (C,) per channel;
statistics float64 (N, num_groups)::

    y, mean, var = group.forward(x, gamma, beta, num_groups, 1e-5)
    dx, dgamma, dbeta = group.backward(dy, x, gamma, num_groups, mean, var, 1e-5)

Functions returning y or dx take ``out=``: a C-contiguous array of x's shape and dtype to write
it into (not checked).
"""
from __future__ import annotations

from . import _core
from ._jit import jit


@jit()
def _view(x, num_groups):
    """(N, C, *S) -> (N, G, C/G, L)."""
    N, C = x.shape[0], x.shape[1]
    return x.reshape((N, num_groups, C // num_groups, x.size // (N * C)))


@jit()
def forward(x, gamma, beta, num_groups, eps, out=None):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta, stats per (n, group): (y, mean, var)."""
    G = num_groups
    Cg = x.shape[1] // G
    y = _core.output_like(x, out)
    _, mean, var = _core.forward_train(_view(x, G), 1, gamma.reshape((G, Cg)),
                                       beta.reshape((G, Cg)), eps, True, _view(y, G))
    return y, mean, var


@jit()
def backward(dy, x, gamma, num_groups, mean, var, eps, out=None):
    """Gradient of :func:`forward`: (dx, dgamma, dbeta), dgamma/dbeta float64 (C,).

    dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), means per (n, group).
    """
    G = num_groups
    Cg = x.shape[1] // G
    dx = _core.output_like(x, out)
    _, dgamma2, dbeta2 = _core.backward(_view(dy, G), _view(x, G), 1, gamma.reshape((G, Cg)),
                                        mean, var, eps, True, _view(dx, G))
    return dx, dgamma2.reshape(gamma.shape), dbeta2.reshape(gamma.shape)
