"""Batch renormalization kernels (Ioffe, 2017).

With sigma = sqrt(running_var + eps), mu = running_mean (the statistics before this batch's
update) and the batch's mu_B, sigma_B = sqrt(var_B + eps)::

    r = clip(sigma_B / sigma, 1/r_max, r_max)        d = clip((mu_B - mu) / sigma, -d_max, d_max)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

r and d are constants for the gradient, so this is batch norm with gamma' = gamma * r and
beta' = beta + gamma * d; backward is batch norm's with gamma', and
dgamma = r * sum(dy * xhat_B) + d * sum(dy). With r_max = 1 and d_max = 0 it is batch norm, bit
for bit. Evaluation and the running-statistics update are batch norm's
(``batch.forward_eval``, ``batch.running_update``).
"""
from __future__ import annotations

import numpy as np

from . import _core
from .batch import _view
from ._jit import jit


@jit()
def correction(batch_mean, batch_var, running_mean, running_var, eps, r_max, d_max):
    """The renorm correction (r, d), float64 (C,)."""
    C = batch_mean.size
    r = np.empty(C)
    d = np.empty(C)
    for c in range(C):
        sigma = np.sqrt(np.float64(running_var[c]) + eps)
        sigma_batch = np.sqrt(batch_var[c] + eps)
        r[c] = min(max(sigma_batch / sigma, 1.0 / r_max), r_max)
        d[c] = min(max((batch_mean[c] - running_mean[c]) / sigma, -d_max), d_max)
    return r, d


@jit()
def forward_train(x, gamma, beta, running_mean, running_var, eps, r_max, d_max, out=None):
    """Returns (y, batch_mean, batch_var, r, d); statistics and r, d float64 (C,).

    ``out``: a C-contiguous array of x's shape and dtype to write y into (not checked)."""
    C = x.shape[1]
    x4 = _view(x)
    mean, var = _core.moments(x4, x.shape[0], True)
    r, d = correction(mean[0], var[0], running_mean, running_var, eps, r_max, d_max)
    gamma_r = (gamma * r).astype(gamma.dtype)
    beta_d = (beta + gamma * d).astype(beta.dtype)
    y = _core.output_like(x, out)
    _core.apply(x4, x.shape[0], mean, var, eps, gamma_r.reshape((C, 1)), beta_d.reshape((C, 1)),
                _view(y))
    return y, mean[0], var[0], r, d


@jit()
def backward(dy, x, gamma, batch_mean, batch_var, r, d, eps, out=None):
    """Gradient of :func:`forward_train` with r, d held constant: (dx, dgamma, dbeta)."""
    C = x.shape[1]
    gamma_r = (gamma * r).astype(gamma.dtype)
    dx = _core.output_like(x, out)
    _, dgamma2, dbeta2 = _core.backward(_view(dy), _view(x), x.shape[0], gamma_r.reshape((C, 1)),
                                        batch_mean.reshape((1, C)), batch_var.reshape((1, C)),
                                        eps, True, _view(dx))
    dbeta = dbeta2[:, 0].copy()
    dgamma = r * dgamma2[:, 0] + d * dbeta
    return dx, dgamma, dbeta
