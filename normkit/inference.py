"""Batch norm at inference: fold it into a linear layer, or recompute its population statistics.

    from normkit.inference import fold, precise_statistics
    precise_statistics(model, x_train, batch_size=32)   # running stats from one pass over data
    fast = fold(model)                                   # a new model without batch norm layers
    np.allclose(fast.forward(x, training=False), model.forward(x, training=False))

Both work on a :class:`normkit.nn.Sequential` and on every normalizer that is a
:class:`normkit.BatchNorm` (plain, ghost and renorm: all three evaluate with the running
statistics in the same way).

- :func:`fold` — in evaluation mode batch norm is a per-channel affine map
  ``y = s (z - mu) + beta`` with ``s = gamma / sqrt(running_var + eps)``, so it merges into the
  Dense/Conv layer before it (or the Dense layer after it) exactly, up to rounding.
- :func:`precise_statistics` — replaces the running (exponential-average) statistics by the
  equal-weight average of the statistics of the batches of one pass over the training data
  ("precise BN", as fvcore's ``update_bn_stats``; Algorithm 2 of Ioffe & Szegedy, 2015).
"""
from __future__ import annotations

import copy
from numbers import Integral

import numpy as np

from .nn import Conv1d, Conv2d, Dense, Sequential
from .norms import BatchNorm, BatchRenorm

__all__ = ["fold", "precise_statistics", "batch_norms"]

def batch_norms(model) -> list[BatchNorm]:
    """Every :class:`normkit.BatchNorm` (plain, ghost, renorm) in ``model``, nested Sequentials
    included, in forward order."""
    found = []
    for layer in _layers_of(model):
        if isinstance(layer, Sequential):
            found += batch_norms(layer)
        elif isinstance(layer, BatchNorm):
            found.append(layer)
    return found


def _layers_of(model) -> list:
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be a normkit.nn.Sequential, got {type(model).__name__}")
    return list(model.layers)


# ---------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------

def fold(model: Sequential) -> Sequential:
    """A new model, for evaluation only, with every batch norm merged into a linear layer.

    With ``s = gamma / sqrt(running_var + eps)`` and ``t = beta - s * running_mean`` (per
    channel; gamma = 1, beta = 0 without ``affine``), batch norm in evaluation mode is
    ``y = s z + t``. It folds

    - into the Dense/Conv1d/Conv2d right before it (z = W x + b):
      ``W' = s[c] * W[c, ...]`` per output channel c, ``b' = s b + t``;
    - otherwise into the Dense right after it (input (N, C)): ``W' = W diag(s)``,
      ``b' = b + W t``.

    Every other placement (after a ReLU and before a padded convolution, last in the model, a
    batch norm with ``track_running_stats=False``) cannot be folded exactly: ValueError naming the
    layer's position. Nested Sequentials are folded within themselves. The folded weights are
    computed in float64 and stored in the layer's dtype, so ``fold(model).forward(x, False)``
    equals ``model.forward(x, False)`` to rounding. ``model`` is not changed: the result holds
    copies of its layers (every linear layer gets a bias, zero if it had none). Use the result for
    evaluation only (``training=False``): training it would no longer train batch norm.
    """
    return _fold(_layers_of(model), "model")


def _fold(layers: list, where: str) -> Sequential:
    layers = [_clone(layer) for layer in layers]
    folded: list = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, Sequential):
            folded.append(_fold(list(layer.layers), f"{where}[{i}]"))
        elif isinstance(layer, BatchNorm):
            scale, shift = _affine_of(layer, f"{where}[{i}]")
            before = folded[-1] if folded else None
            after = layers[i + 1] if i + 1 < len(layers) else None
            if _folds_after(before, scale):
                folded[-1] = _fold_into_previous(before, scale, shift)
            elif isinstance(after, Dense) and after.in_features == len(scale):
                layers[i + 1] = _fold_into_next(after, scale, shift)
            else:
                raise ValueError(
                    f"{where}[{i}] ({type(layer).__name__}) cannot be folded: it must directly "
                    f"follow a Dense/Conv1d/Conv2d layer or directly precede a Dense layer, "
                    f"got {type(before).__name__} before it and {type(after).__name__} after it")
        else:
            folded.append(layer)
        i += 1
    return Sequential(folded)


def _clone(layer):
    """A copy sharing nothing with ``layer``. Linear layers are rebuilt through their
    constructor (a deep copy of a convolution would hold a copy of its weight matrix view that
    no longer follows ``params["weight"]``) with a learnable bias, ready to take folded weights."""
    if not isinstance(layer, (Dense, Conv1d, Conv2d)):
        return copy.deepcopy(layer)
    common = dict(rng=0, bias=True, dtype=layer.dtype)
    if isinstance(layer, Dense):
        clone = Dense(layer.in_features, layer.out_features, **common)
    else:
        kernel, stride, padding = layer._kernel, layer._stride, layer._padding   # (h, w) pairs
        if isinstance(layer, Conv1d):
            clone = Conv1d(layer.in_channels, layer.out_channels, kernel[1], stride=stride[1],
                           padding=padding[1], **common)
        else:
            clone = Conv2d(layer.in_channels, layer.out_channels, kernel, stride=stride,
                           padding=padding, **common)
    clone.params["weight"][...] = layer.effective_weight()     # standardized, if the layer is
    clone.params["bias"][...] = layer.params["bias"] if layer.has_bias else 0
    return clone


def _folds_after(before, scale: np.ndarray) -> bool:
    """Whether batch norm with ``len(scale)`` channels folds into the linear layer ``before``."""
    if isinstance(before, Dense):
        return before.out_features == len(scale)
    if isinstance(before, (Conv1d, Conv2d)):
        return before.out_channels == len(scale)
    return False


def _affine_of(norm: BatchNorm, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 with eval-mode batch norm y = s x + t per channel."""
    if not norm.track_running_stats:
        raise ValueError(f"{where} ({type(norm).__name__}) has track_running_stats=False: it "
                         "normalizes with batch statistics at evaluation, which no fixed weights "
                         "can reproduce")
    mean = norm.state["running_mean"].astype(np.float64)                  # (C,)
    var = norm.state["running_var"].astype(np.float64)                    # (C,)
    gamma = norm.params["gamma"].astype(np.float64) if norm.affine else np.ones_like(mean)
    beta = norm.params["beta"].astype(np.float64) if norm.affine else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + norm.eps)                               # (C,)
    return scale, beta - scale * mean


def _fold_into_previous(linear, scale: np.ndarray, shift: np.ndarray):
    """y = s (W x + b) + t  ->  W' = s W (per output channel), b' = s b + t."""
    weight = linear.params["weight"].astype(np.float64)                   # (C_out, ...)
    bias = linear.params["bias"].astype(np.float64)                       # (C_out,)
    linear.params["weight"][...] = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    linear.params["bias"][...] = scale * bias + shift
    return linear


def _fold_into_next(dense: Dense, scale: np.ndarray, shift: np.ndarray) -> Dense:
    """W (s x + t) + b  ->  W' = W diag(s), b' = W t + b."""
    weight = dense.params["weight"].astype(np.float64)                    # (F_out, C)
    bias = dense.params["bias"].astype(np.float64)                        # (F_out,)
    dense.params["weight"][...] = weight * scale
    dense.params["bias"][...] = weight @ shift + bias
    return dense


# ---------------------------------------------------------------------------------------------
# Precise statistics
# ---------------------------------------------------------------------------------------------

def precise_statistics(model: Sequential, x: np.ndarray, batch_size: int) -> int:
    """Recompute the running statistics of every batch norm in ``model`` from one pass over
    ``x``; return the number of batches used.

    ``x`` is cut into ``len(x) // batch_size`` consecutive batches (in the given order; shuffle
    it first if it is sorted); an incomplete last batch is left out, so every batch's statistics
    are those of a training batch. Each batch goes through the model with the batch norms in
    training mode (normalized by the batch's own statistics, as in training) and every other
    layer in evaluation mode (dropout off, as at inference). Each batch norm's running mean
    becomes the mean over the batches of the batch means, its running variance the mean of the
    *unbiased* batch variances: the equal-weight (cumulative) average, as PyTorch's
    ``momentum=None``, fvcore's ``update_bn_stats`` and Algorithm 2 of Ioffe & Szegedy (2015)
    (Var[x] = m / (m - 1) E_B[sigma_B^2]). Batch renormalization is run as plain batch norm
    (r_max = 1, d_max = 0) during the pass, so its output does not depend on the statistics
    being rebuilt; ghost batch norm averages over its virtual batches as it does in training.

    Only ``running_mean`` and ``running_var`` change: ``num_batches_tracked``, ``momentum``,
    ``running_average`` and renorm's limits are as before. A refused or failed call (batch_size
    not an int >= 1, x not a non-empty array with at least ``batch_size`` rows, a batch norm
    refusing a batch) leaves every state as it was. A model without batch norm is left alone
    (returns 0).
    """
    layers = _layers_of(model)
    if not isinstance(x, np.ndarray) or x.ndim < 1 or len(x) == 0:
        raise TypeError(f"x must be a non-empty numpy array of examples (N, ...), got "
                        f"{type(x).__name__}{getattr(x, 'shape', '')}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if len(x) < batch_size:
        raise ValueError(f"x has {len(x)} rows, fewer than one batch of batch_size={batch_size}")
    norms = batch_norms(model)
    if not norms:
        return 0
    saved = [_switch_to_cumulative(norm) for norm in norms]
    num_batches = len(x) // batch_size
    try:
        for start in range(0, num_batches * batch_size, batch_size):
            _forward_batch_norms_training(layers, x[start:start + batch_size])
    except BaseException:
        for norm, before in zip(norms, saved):
            _restore(norm, before, keep_statistics=False)
        raise
    for norm, before in zip(norms, saved):
        _restore(norm, before, keep_statistics=True)
    return num_batches


def _switch_to_cumulative(norm: BatchNorm) -> dict:
    """Save what the pass changes and set the norm to average every batch equally."""
    before = {"state": {key: value.copy() for key, value in norm.state.items()},
              "running_average": norm.running_average}
    if isinstance(norm, BatchRenorm):
        before["limits"] = (norm.r_max, norm.d_max)
        norm.r_max, norm.d_max = 1.0, 0.0
    norm.running_average = "cumulative"
    norm.state["num_batches_tracked"][...] = 0     # the first batch then gets weight 1
    return before


def _restore(norm: BatchNorm, before: dict, keep_statistics: bool) -> None:
    for key, value in before["state"].items():
        if not keep_statistics or key not in ("running_mean", "running_var"):
            norm.state[key][...] = value
    norm.running_average = before["running_average"]
    if "limits" in before:
        norm.r_max, norm.d_max = before["limits"]


def _forward_batch_norms_training(layers: list, h: np.ndarray) -> np.ndarray:
    for layer in layers:
        if isinstance(layer, Sequential):
            h = _forward_batch_norms_training(list(layer.layers), h)
        else:
            h = layer.forward(h, training=isinstance(layer, BatchNorm))
    return h
