"""Weight initialization: ``init(shape, rng, scale=1.0, dtype=np.float64) -> array``.

Shapes follow the layers: a dense weight is ``(F_out, F_in)``, a convolution kernel
``(C_out, C_in, *kernel)``. ``fan_in = C_in * prod(kernel)``, ``fan_out = C_out * prod(kernel)``
(PyTorch's convention). ``scale`` multiplies the result (the "gain").

- ``he_uniform``:     U(-b, b), b = scale * sqrt(6 / fan_in)   (PyTorch ``kaiming_uniform_``, ReLU gain)
- ``glorot_uniform``: U(-b, b), b = scale * sqrt(6 / (fan_in + fan_out))   (``xavier_uniform_``)
- ``orthogonal``:     scale * Q from the QR of a standard normal (rows, cols) matrix, signs fixed
  by diag(R) (``orthogonal_``); rows = shape[0], cols = the product of the rest
- ``identity``:       scale * I for 2-D shapes (``eye_``), the Dirac delta for kernels (``dirac_``)
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Callable

import numpy as np

__all__ = ["he_uniform", "glorot_uniform", "orthogonal", "identity", "get", "names"]


def _check(shape, rng, scale, dtype) -> tuple[tuple[int, ...], np.dtype]:
    shape = tuple(shape)
    if len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in shape):
        raise ValueError(f"shape must be a weight shape of >= 2 positive ints, got {shape!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not np.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return tuple(int(s) for s in shape), dtype


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    receptive = int(np.prod(shape[2:], dtype=np.int64))
    return shape[1] * receptive, shape[0] * receptive


def he_uniform(shape, rng, scale=1.0, dtype=np.float64) -> np.ndarray:
    shape, dtype = _check(shape, rng, scale, dtype)
    fan_in, _ = _fans(shape)
    bound = scale * np.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def glorot_uniform(shape, rng, scale=1.0, dtype=np.float64) -> np.ndarray:
    shape, dtype = _check(shape, rng, scale, dtype)
    fan_in, fan_out = _fans(shape)
    bound = scale * np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def orthogonal(shape, rng, scale=1.0, dtype=np.float64) -> np.ndarray:
    shape, dtype = _check(shape, rng, scale, dtype)
    rows = shape[0]
    cols = int(np.prod(shape[1:], dtype=np.int64))
    flat = rng.standard_normal((rows, cols))
    if rows < cols:
        flat = flat.T                                   # QR of the tall orientation
    q, r = np.linalg.qr(flat)
    q = q * np.sign(np.diag(r))                          # unique Q: diag(R) > 0
    if rows < cols:
        q = q.T
    return (scale * q).reshape(shape).astype(dtype)


def identity(shape, rng, scale=1.0, dtype=np.float64) -> np.ndarray:
    """``rng`` is accepted for the common signature and not used."""
    shape, dtype = _check(shape, rng, scale, dtype)
    weight = np.zeros(shape, dtype)
    center = tuple(k // 2 for k in shape[2:])
    for i in range(min(shape[0], shape[1])):
        weight[(i, i) + center] = scale
    return weight


_BY_NAME: dict[str, Callable] = {
    "he_uniform": he_uniform,
    "glorot_uniform": glorot_uniform,
    "orthogonal": orthogonal,
    "identity": identity,
}


def names() -> list[str]:
    """The names :func:`get` accepts."""
    return sorted(_BY_NAME)


def get(init) -> Callable:
    """The init function for a name, or ``init`` itself if it is callable."""
    if callable(init):
        return init
    if init not in _BY_NAME:
        raise ValueError(f"init must be one of {names()} or a callable, got {init!r}")
    return _BY_NAME[init]
