"""Optimizers that update parameters in place, each with PyTorch's update rule, and clipping.

``opt = SGD(model, lr=0.1, momentum=0.9)`` takes anything with ``params`` and ``grads`` dicts (a
``Sequential``, a layer, a normalizer) or a ``(params, grads)`` pair of dicts with the same keys.
``opt.step()`` updates every parameter in one Numba call. The arrays are held, not copied: they
must stay the same objects (layers and normalizers never replace them), be C-contiguous and all
have one dtype.

Weight decay is an L2 term added to the gradient (``g + wd * p``, as ``torch.optim``) in every
optimizer; Adam also has ``decoupled_weight_decay=True`` (AdamW: ``p *= 1 - lr * wd``). It
applies to every parameter, biases and normalizer gains included.

``max_grad_norm`` clips the gradients by their global norm before the update (in place, like
:func:`clip_grad_norm`), and ``step()`` then returns the norm before clipping.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import numpy as np
from numba import types
from numba.typed import List

from . import _kernels as K

__all__ = ["Optimizer", "SGD", "Adam", "RMSProp", "clip_grad_norm"]


def _check_number(name: str, value, low: float, high: float = math.inf, *, open_low=False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def _params_and_grads(target) -> tuple[dict, dict]:
    if isinstance(target, tuple) and len(target) == 2:
        params, grads = target
    elif hasattr(target, "params") and hasattr(target, "grads"):
        params, grads = target.params, target.grads
    else:
        raise TypeError("expected an object with params and grads (a Sequential, a layer, a "
                        f"normalizer) or a (params, grads) pair of dicts, got {type(target).__name__}")
    if not isinstance(params, Mapping) or not isinstance(grads, Mapping):
        raise TypeError("params and grads must be dicts of arrays")
    if set(params) != set(grads):
        raise ValueError(f"params and grads must have the same keys: {sorted(params)} vs {sorted(grads)}")
    return dict(params), {key: grads[key] for key in params}


def _flat_views(named: Mapping[str, np.ndarray], dtype, what: str) -> List:
    """A typed list of 1-D views (sharing memory) of the arrays, for the Numba kernels."""
    views = List.empty_list(types.Array(types.float32 if dtype == np.float32 else types.float64, 1, "C"))
    for key, array in named.items():
        if not isinstance(array, np.ndarray) or array.dtype != dtype:
            raise TypeError(f"{what}[{key!r}] must be a {dtype} array (one dtype for all), "
                            f"got {getattr(array, 'dtype', type(array).__name__)}")
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError(f"{what}[{key!r}] must be a writeable C-contiguous array")
        views.append(array.reshape(-1))
    return views


class Optimizer:
    """Base class: holds the parameter/gradient views and the per-parameter buffers."""

    def __init__(self, target, lr, weight_decay, max_grad_norm):
        self.params, self.grads = _params_and_grads(target)
        dtypes = {a.dtype for a in self.params.values() if isinstance(a, np.ndarray)}
        if len(dtypes) > 1:
            raise TypeError(f"all parameters must have one dtype, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"parameters must be float32 or float64, got {self.dtype}")
        for key, p in self.params.items():
            if np.shape(self.grads[key]) != np.shape(p):
                raise ValueError(f"grads[{key!r}] has shape {np.shape(self.grads[key])}, "
                                 f"expected the shape of params[{key!r}] {np.shape(p)}")
        self._param_views = _flat_views(self.params, self.dtype, "params")
        self._grad_views = _flat_views(self.grads, self.dtype, "grads")
        self.lr = _check_number("lr", lr, 0.0)
        self.weight_decay = _check_number("weight_decay", weight_decay, 0.0)
        self.max_grad_norm = (None if max_grad_norm is None
                              else _check_number("max_grad_norm", max_grad_norm, 0.0, open_low=True))
        self.step_count = 0
        self._hyper = np.zeros(9, self.dtype)      # hyperparameters for the kernel; [-1]: clip factor
        #: optimizer buffers per parameter name, e.g. {"0.weight": {"momentum": ...}}
        self.state: dict[str, dict[str, np.ndarray]] = {key: {} for key in self.params}
        # (P, 5) int64 addresses for the update kernels (see _kernels.TABLE_*); filled by
        # _add_buffers. self.params, self.grads and self.state hold every array it points to.
        self._table = np.zeros((len(self.params), 5), np.int64)
        for j, key in enumerate(self.params):
            self._table[j, K.TABLE_SIZE] = self.params[key].size
            self._table[j, K.TABLE_PARAM] = self.params[key].ctypes.data
            self._table[j, K.TABLE_GRAD] = self.grads[key].ctypes.data

    def _add_buffers(self, *names: str) -> None:
        """Zero buffers shaped like each parameter, in ``state``, listed in the table as
        buffer_a, buffer_b in the order named."""
        for column, name in zip((K.TABLE_BUFFER_A, K.TABLE_BUFFER_B), names):
            for j, (key, p) in enumerate(self.params.items()):
                buffer = self.state[key][name] = np.zeros_like(p)
                self._table[j, column] = buffer.ctypes.data

    def step(self):
        """Update every parameter in place from its gradient. Returns the gradients' global norm
        before clipping if ``max_grad_norm`` is set, else None."""
        norm = None
        if self.max_grad_norm is not None:
            norm = K.global_norm(self._grad_views)
            self._hyper[-1] = min(self.max_grad_norm / (norm + 1e-6), 1.0)
            K.scale_all(self._grad_views, self._hyper[-1:])
        self.step_count += 1
        self._update()
        return norm

    def _update(self) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """``torch.optim.SGD`` (dampening 0): d = g + wd p; buf = momentum buf + d;
    d = d + momentum buf (Nesterov) or buf; p -= lr d."""

    def __init__(self, target, lr, *, momentum=0.0, weight_decay=0.0, nesterov=False,
                 max_grad_norm=None):
        super().__init__(target, lr, weight_decay, max_grad_norm)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        self._add_buffers("momentum")

    def _update(self):
        hyper = self._hyper
        hyper[0], hyper[1], hyper[2] = self.lr, self.momentum, self.weight_decay
        K.sgd_step(self._table, hyper, self.nesterov)


class Adam(Optimizer):
    """``torch.optim.Adam``: m, v moving averages with bias correction;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). Weight decay is coupled (L2 in
    the gradient) unless ``decoupled_weight_decay=True`` (AdamW)."""

    def __init__(self, target, lr=1e-3, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, max_grad_norm=None):
        super().__init__(target, lr, weight_decay, max_grad_norm)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_number("betas[0]", betas[0], 0.0, 1.0),
                      _check_number("betas[1]", betas[1], 0.0, 1.0))
        if max(self.betas) >= 1:
            raise ValueError(f"betas must be < 1, got {betas!r}")
        self.eps = _check_number("eps", eps, 0.0)
        if not isinstance(decoupled_weight_decay, bool):
            raise TypeError(f"decoupled_weight_decay must be True or False, got {decoupled_weight_decay!r}")
        self.decoupled_weight_decay = decoupled_weight_decay
        self._add_buffers("exp_avg", "exp_avg_sq")

    def _update(self):
        (beta1, beta2), t, decay, hyper = self.betas, self.step_count, self.weight_decay, self._hyper
        hyper[0] = self.lr / (1 - beta1 ** t)
        hyper[1] = math.sqrt(1 - beta2 ** t)
        hyper[2], hyper[3], hyper[4], hyper[5] = 1 - beta1, beta2, 1 - beta2, self.eps
        if self.decoupled_weight_decay:
            hyper[6], hyper[7] = 0.0, 1 - self.lr * decay
        else:
            hyper[6], hyper[7] = decay, 1.0
        K.adam_step(self._table, hyper)


class RMSProp(Optimizer):
    """``torch.optim.RMSprop`` (not centered): s = alpha s + (1 - alpha) g^2; a = sqrt(s) + eps
    (eps *outside* the root, unlike TensorFlow/Keras); p -= lr g / a, or through a momentum
    buffer buf = momentum buf + g / a; p -= lr buf."""

    def __init__(self, target, lr=1e-2, *, alpha=0.99, eps=1e-8, momentum=0.0, weight_decay=0.0,
                 max_grad_norm=None):
        super().__init__(target, lr, weight_decay, max_grad_norm)
        self.alpha = _check_number("alpha", alpha, 0.0, 1.0)
        self.eps = _check_number("eps", eps, 0.0)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        self._add_buffers("square_avg", "momentum")

    def _update(self):
        hyper = self._hyper
        hyper[0], hyper[1], hyper[2] = self.lr, self.alpha, 1 - self.alpha
        hyper[3], hyper[4], hyper[5] = self.eps, self.weight_decay, self.momentum
        K.rmsprop_step(self._table, hyper)


def clip_grad_norm(grads, max_norm) -> float:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; return the norm
    before clipping. ``grads`` is a dict or sequence of arrays, or an object with ``grads``.

    As ``torch.nn.utils.clip_grad_norm_``: every gradient is multiplied by
    min(max_norm / (norm + 1e-6), 1).
    """
    max_norm = _check_number("max_norm", max_norm, 0.0, open_low=True)
    if hasattr(grads, "grads") and not isinstance(grads, Mapping):
        grads = grads.grads
    arrays = list(grads.values()) if isinstance(grads, Mapping) else list(grads)
    for i, g in enumerate(arrays):
        if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
            raise TypeError(f"grads[{i}] must be a floating-point array, got {type(g).__name__}")
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in arrays))
    factor = min(max_norm / (total + 1e-6), 1.0)
    for g in arrays:
        g *= factor
    return total
