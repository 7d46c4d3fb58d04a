"""The functional kernels on their own: callable from a user's @njit code, and pure."""
from __future__ import annotations

import numba
import numpy as np

import normkit
from normkit.kernels import batch, group, layer, renorm


@numba.njit
def _user_model(x, gamma, beta, dy):
    # someone's own jitted model: BN -> LN over the channels, then the backward of BN
    y, mean, var = batch.forward_train(x, gamma, beta, 1e-5)
    z, _, _ = layer.forward(y, gamma, beta, 1e-5)
    w, _, _ = group.forward(x, gamma, beta, 2, 1e-5)
    dx, dgamma, dbeta = batch.backward(dy, x, gamma, mean, var, 1e-5)
    ye = batch.forward_eval(x, gamma, beta, mean, var, 1e-5)
    return y, z, w, dx, dgamma, dbeta, ye


def test_kernels_callable_from_user_njit_code():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal((5, 4))
    y, z, w, dx, dgamma, dbeta, ye = _user_model(x, gamma, beta, dy)
    bn = normkit.make("batch", 4, dtype=np.float64)
    bn.params["gamma"][...], bn.params["beta"][...] = gamma, beta
    np.testing.assert_array_equal(y, bn.forward(x, training=True))
    # Compiled into the user's function, the kernels' sums (vectorized with reassociation) may
    # be ordered differently than in normkit's own call: the same to a few ulps, not bit for bit.
    np.testing.assert_allclose(dx, bn.backward(dy), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dgamma, bn.grads["gamma"], rtol=1e-13, atol=1e-15)
    ln = normkit.make("layer", 4, dtype=np.float64)
    ln.params["gamma"][...], ln.params["beta"][...] = gamma, beta
    np.testing.assert_array_equal(z, ln.forward(y, training=True))
    gn = normkit.make("group", 4, num_groups=2, dtype=np.float64)
    gn.params["gamma"][...], gn.params["beta"][...] = gamma, beta
    np.testing.assert_array_equal(w, gn.forward(x, training=True))
    # evaluation with the batch's own (biased) statistics reproduces the training output
    np.testing.assert_allclose(ye, y, rtol=1e-12, atol=1e-12)


def test_kernels_do_not_mutate_their_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    copies = [a.copy() for a in (x, gamma, beta, rm, rv)]
    y, mean, var = batch.forward_train(x, gamma, beta, 1e-5)
    new_mean, new_var = batch.running_update(rm, rv, mean, var, 24, 0.1)
    renorm.forward_train(x, gamma, beta, rm, rv, 1e-5, 3.0, 5.0)
    for a, b in zip((x, gamma, beta, rm, rv), copies):
        np.testing.assert_array_equal(a, b)
    assert new_mean.dtype == np.float32 and not np.shares_memory(new_mean, rm)


def test_running_update_is_pytorch_rule():
    rm, rv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    mean, var = np.array([5.0, 6.0]), np.array([0.5, 1.0])
    new_mean, new_var = batch.running_update(rm, rv, mean, var, 5, 0.25)
    np.testing.assert_allclose(new_mean, 0.75 * rm + 0.25 * mean)
    np.testing.assert_allclose(new_var, 0.75 * rv + 0.25 * var * 5 / 4)
