"""Gradient checking by finite differences along random directions (float64).

The idea of HIPS autograd's ``check_vjp``: for a function ``y = f(a, b, ...)`` and a cotangent
``dy``, the scalar ``L = sum(dy * f(...))`` has directional derivative
``sum_k <dL/dk, v_k>`` along a random direction ``v``; the central difference
``(L(+h v) - L(-h v)) / 2h`` must agree with it. Checking a few random directions tests every
gradient entry at once without the O(size) cost of entry-by-entry differences.

Use it on your own variant::

    from normkit.testing import check_vjp, check_norm
    check_norm(normkit.make("batch", 7, dtype=np.float64), x)          # any Norm
    check_vjp(lambda x, g: my_forward(x, g), {"x": x, "g": g}, my_grads, dy)
"""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import types
from typing import Callable, Mapping

import numpy as np

__all__ = ["check_vjp", "check_norm", "GradientMismatch", "timm_layers"]


class GradientMismatch(AssertionError):
    """Raised when analytic and finite-difference directional derivatives disagree."""


def _require_float64(name: str, a: np.ndarray) -> None:
    if a.dtype != np.float64:
        raise TypeError(f"{name} must be float64 for a finite-difference check, got {a.dtype}")


def check_vjp(
    fun: Callable[..., np.ndarray],
    inputs: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    dy: np.ndarray,
    *,
    n_directions: int = 4,
    step: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    seed: int = 0,
) -> list[tuple[float, float]]:
    """Check ``grads`` (dL/d input for L = sum(dy * fun(**inputs))) by central differences.

    ``inputs`` are the float64 arrays to perturb (``fun`` is called with them as keywords);
    ``grads`` holds the analytic gradient for every key of ``inputs``. Returns the pairs
    ``(analytic, numeric)`` of directional derivatives; raises :class:`GradientMismatch` when
    ``|analytic - numeric| > atol + rtol * scale`` for any direction, where ``scale`` is the
    size of the terms summed (so cancellation does not make the test vacuous).
    """
    if set(grads) != set(inputs):
        raise ValueError(f"grads has keys {sorted(grads)}, expected the keys of inputs {sorted(inputs)}")
    for name, a in inputs.items():
        _require_float64(f"inputs[{name!r}]", np.asarray(a))
        if np.shape(grads[name]) != np.shape(a):
            raise ValueError(f"grads[{name!r}] has shape {np.shape(grads[name])}, expected {np.shape(a)}")
    dy = np.asarray(dy, dtype=np.float64)
    rng = np.random.default_rng(seed)
    base = {k: np.array(v, dtype=np.float64, copy=True) for k, v in inputs.items()}

    def loss(shift: float, direction: Mapping[str, np.ndarray]) -> float:
        moved = {k: base[k] + shift * direction[k] for k in base}
        return float(np.sum(dy * fun(**moved)))

    results = []
    for i in range(n_directions):
        direction = {k: rng.standard_normal(np.shape(v)) for k, v in base.items()}
        analytic = float(sum(np.sum(grads[k] * direction[k]) for k in base))
        numeric = (loss(step, direction) - loss(-step, direction)) / (2 * step)
        scale = float(sum(np.sum(np.abs(grads[k] * direction[k])) for k in base))
        if not abs(analytic - numeric) <= atol + rtol * max(scale, abs(numeric)):
            raise GradientMismatch(
                f"direction {i}: analytic directional derivative {analytic!r} but finite "
                f"difference {numeric!r} (|diff| {abs(analytic - numeric):.3g}, scale {scale:.3g})"
            )
        results.append((analytic, numeric))
    return results


def check_norm(norm, x: np.ndarray, *, training: bool = True, seed: int = 0, **kwargs) -> None:
    """Check a normalizer's ``backward`` (dx and every entry of ``grads``) in float64.

    ``norm`` is any object with the normkit interface (``forward``, ``backward``, ``params``,
    ``grads``, ``state``) holding float64 parameters. Its ``state`` is restored afterwards, so
    running statistics are as they were before the check.
    """
    _require_float64("x", np.asarray(x))
    saved_state = {k: np.array(v, copy=True) for k, v in norm.state.items()}
    saved_params = {k: np.array(v, copy=True) for k, v in norm.params.items()}
    rng = np.random.default_rng(seed)
    try:
        y = norm.forward(x, training=training)
        dy = rng.standard_normal(y.shape)
        dx = norm.backward(dy)
        grads = {"x": dx, **{f"param:{k}": np.array(v, copy=True) for k, v in norm.grads.items()}}

        def fun(x, **params):
            for k, v in params.items():
                norm.params[k][...] = v
            for k, v in saved_state.items():
                norm.state[k][...] = v
            return norm.forward(x, training=training)

        inputs = {"x": np.array(x, copy=True), **{f"param:{k}": np.array(v, copy=True) for k, v in saved_params.items()}}
        wrapped = lambda **kw: fun(kw.pop("x"), **{k[len("param:"):]: v for k, v in kw.items()})  # noqa: E731
        check_vjp(wrapped, inputs, grads, dy, seed=seed, **kwargs)
    finally:
        for k, v in saved_params.items():
            norm.params[k][...] = v
        for k, v in saved_state.items():
            norm.state[k][...] = v


_TIMM_LAYERS = "_normkit_timm_layers"


def timm_layers(module: str):
    """timm's ``timm/layers/<module>.py`` (e.g. "evo_norm", "filter_response_norm", "std_conv"),
    imported without ``import timm``: the package root pulls in torchvision, which is not
    installed beside the CPU torch. The layer files need torch alone. Raises ImportError where
    torch or timm is missing."""
    importlib.import_module("torch")
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed (make install adds it with --no-deps)")
    if _TIMM_LAYERS not in sys.modules:        # a package holding timm/layers/ as its path
        shell = types.ModuleType(_TIMM_LAYERS)
        shell.__path__ = [str(pathlib.Path(list(spec.submodule_search_locations)[0]) / "layers")]
        sys.modules[_TIMM_LAYERS] = shell
    return importlib.import_module(f"{_TIMM_LAYERS}.{module}")
