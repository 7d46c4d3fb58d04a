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

from . import _engine
from ._jit import jit
from .batch import _output, _per_channel, _view


@jit()
def correction(batch_mean, batch_var, running_mean, running_var, eps, r_max, d_max):
    """The renorm correction (r, d), float64 (C,)."""
    C = batch_mean.size
    if batch_var.size != C or running_mean.size != C or running_var.size != C:
        raise ValueError("batch_mean, batch_var, running_mean and running_var must all be (C,)")
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

    ``out``: a C-contiguous array of x's shape and dtype to write y into."""
    C = x.shape[1]
    x4 = _view(x)
    mean, var, count = np.empty((1, C)), np.empty((1, C)), np.empty(1)
    gamma2, beta2 = _per_channel(True, gamma, C), _per_channel(False, beta, C)
    y = _output(x, out)
    y4 = _view(y)
    _engine.forward(x4, x.shape[0], gamma2, beta2, eps, True, _engine.NO_MASK, False, y4, mean,
                    var, count, _engine.STATS_ONLY)
    r, d = correction(mean[0], var[0], running_mean, running_var, eps, r_max, d_max)
    gamma_r = np.empty((C, 1), gamma.dtype)
    beta_d = np.empty((C, 1), beta.dtype)
    for c in range(C):
        gamma_r[c, 0] = gamma[c] * r[c]
        beta_d[c, 0] = beta[c] + gamma[c] * d[c]
    _engine.forward(x4, x.shape[0], gamma_r, beta_d, eps, True, _engine.NO_MASK, False, y4, mean,
                    var, count, _engine.APPLY_ONLY)
    return y, mean[0], var[0], r, d


@jit()
def backward(dy, x, gamma, batch_mean, batch_var, r, d, eps, out=None):
    """Gradient of :func:`forward_train` with r, d held constant: (dx, dgamma, dbeta)."""
    C = x.shape[1]
    if r.size != C or d.size != C:
        raise ValueError("r and d must have one value per channel (C,)")
    gamma_r = np.empty((C, 1), gamma.dtype)
    for c in range(C):
        gamma_r[c, 0] = _per_channel(True, gamma, C)[c, 0] * r[c]
    dx = _output(x, out)
    dgamma2, dbeta2 = np.empty((C, 1)), np.empty((C, 1))
    _engine.backward(_view(dy), _view(x), x.shape[0], gamma_r,
                     _per_channel(False, batch_mean, C).reshape((1, C)),
                     _per_channel(False, batch_var, C).reshape((1, C)),
                     np.full(1, x.size / C), eps, True, False, _engine.NO_MASK, False, _view(dx),
                     dgamma2, dbeta2)
    dbeta = dbeta2[:, 0].copy()
    dgamma = r * dgamma2[:, 0] + d * dbeta
    return dx, dgamma, dbeta
