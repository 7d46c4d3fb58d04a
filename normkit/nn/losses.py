"""Losses from logits, numerically stable, averaged over the batch.

Same style as the layers: ``loss = criterion.forward(logits, targets)`` returns a float and keeps
the gradient, ``dlogits = criterion.backward()`` returns dLoss/dlogits (in a buffer the criterion
reuses for the next call of the same shape).
"""
from __future__ import annotations

import numpy as np

from . import _kernels as K

__all__ = ["SoftmaxCrossEntropy", "BinaryCrossEntropy"]


def _check_logits(logits) -> np.ndarray:
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"logits must be a numpy array, got {type(logits).__name__}")
    if logits.dtype != np.float32 and logits.dtype != np.float64:
        raise TypeError(f"logits must be float32 or float64, got dtype {logits.dtype}")
    return np.ascontiguousarray(logits)


class _Criterion:
    def __init__(self):
        self._buffers: dict[tuple, np.ndarray] = {}
        self._dlogits = None

    def _buffer(self, shape, dtype) -> np.ndarray:
        key = (shape, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) >= 32:
                self._buffers.clear()
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf

    def backward(self) -> np.ndarray:
        """dLoss/dlogits of the last forward (already divided by the batch size)."""
        if self._dlogits is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        return self._dlogits


class SoftmaxCrossEntropy(_Criterion):
    """mean_i [logsumexp(z_i) - z_i[t_i]] for logits z (N, K) and integer targets t (N,) in [0, K),
    as ``torch.nn.CrossEntropyLoss()``. The gradient is (softmax(z) - onehot(t)) / N."""

    def forward(self, logits, targets) -> float:
        logits = _check_logits(logits)
        if logits.ndim != 2 or logits.shape[0] == 0:
            raise ValueError(f"logits must be (N, K) with N >= 1, got shape {logits.shape}")
        targets = np.asarray(targets)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"targets must be ({logits.shape[0]},) to match logits {logits.shape}, "
                             f"got shape {targets.shape}")
        dlogits = self._buffer(logits.shape, logits.dtype)
        loss = K.softmax_cross_entropy(logits, targets.astype(np.int64, copy=False), dlogits)
        if loss < 0:
            row = int(-1 - loss)                 # the kernel checked before writing anything
            raise ValueError(f"targets[{row}] = {targets[row]} is not a class index in "
                             f"[0, {logits.shape[1]})")
        self._dlogits = dlogits
        return float(loss)


class BinaryCrossEntropy(_Criterion):
    """mean [max(z, 0) - z t + log(1 + exp(-|z|))] for logits z and targets t in [0, 1] of the same
    shape, as ``torch.nn.BCEWithLogitsLoss()``. The gradient is (sigmoid(z) - t) / z.size."""

    def forward(self, logits, targets) -> float:
        logits = _check_logits(logits)
        if logits.size == 0:
            raise ValueError("logits is empty")
        targets = np.asarray(targets)
        if targets.shape != logits.shape:
            raise ValueError(f"targets must have the shape of logits {logits.shape}, got {targets.shape}")
        if targets.dtype.kind not in "iufb":
            raise TypeError(f"targets must be numbers in [0, 1], got dtype {targets.dtype}")
        targets = np.ascontiguousarray(targets, dtype=logits.dtype)
        if not ((targets >= 0) & (targets <= 1)).all():
            raise ValueError("targets must lie in [0, 1]")
        dlogits = self._buffer(logits.shape, logits.dtype)
        loss = K.binary_cross_entropy(logits.reshape(-1), targets.reshape(-1), dlogits.reshape(-1))
        self._dlogits = dlogits
        return float(loss)
