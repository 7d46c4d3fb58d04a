"""Measurements of the claims study on a normkit.nn.Sequential: gradient norms per layer,
internal covariate shift (Santurkar et al., 2018), the loss landscape along the gradient,
saturated units and the error of running statistics.

Every function leaves the model as it found it: parameters and state (running statistics) are
restored, so a measurement in the middle of training changes nothing but the layers' buffers.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np

from normkit.inference import batch_norms
from normkit.nn import Conv1d, Conv2d, Dense, Sigmoid, Tanh

#: A unit counts as saturated where the activation's derivative is below this.
SATURATION_DERIVATIVE = 0.05
#: |z| beyond which the derivative is below SATURATION_DERIVATIVE: sigmoid' = s (1 - s) at
#: s = (1 + sqrt(1 - 4 d)) / 2; tanh' = 1 - tanh^2 at tanh = sqrt(1 - d).
SATURATION_Z = {
    "sigmoid": math.log((1 + math.sqrt(1 - 4 * SATURATION_DERIVATIVE))
                        / (1 - math.sqrt(1 - 4 * SATURATION_DERIVATIVE))),
    "tanh": math.atanh(math.sqrt(1 - SATURATION_DERIVATIVE)),
}


def weight_layers(model) -> list[int]:
    """Positions of the layers with a weight matrix (Dense, Conv1d, Conv2d) in ``model``."""
    return [i for i, layer in enumerate(model) if isinstance(layer, (Dense, Conv1d, Conv2d))]


@contextlib.contextmanager
def preserved(model) -> Iterator[None]:
    """Restore the model's parameters and state when the block ends."""
    params = {key: value.copy() for key, value in model.params.items()}
    state = {key: value.copy() for key, value in model.state.items()}
    try:
        yield
    finally:
        for key, value in params.items():
            model.params[key][...] = value
        for key, value in state.items():
            model.state[key][...] = value


def loss_and_gradients(model, criterion, x, y) -> tuple[float, dict[str, np.ndarray]]:
    """Training-mode loss on (x, y) and a copy of every parameter's gradient (float64)."""
    loss = criterion.forward(model.forward(x, training=True), y)
    model.backward(criterion.backward())
    return loss, {key: g.astype(np.float64) for key, g in model.grads.items()}


def _weight_key(position: int) -> str:
    return f"{position}.weight"


def gradient_norms(model, criterion, x, y) -> tuple[np.ndarray, np.ndarray]:
    """(||dL/dW_i||, ||dL/dW_i|| / ||W_i||) for each weight layer i, training mode on (x, y)."""
    with preserved(model):
        _, grads = loss_and_gradients(model, criterion, x, y)
    keys = [_weight_key(i) for i in weight_layers(model)]
    norms = np.array([np.linalg.norm(grads[k]) for k in keys])                 # (L,)
    weights = np.array([np.linalg.norm(model.params[k].astype(np.float64)) for k in keys])
    return norms, norms / weights


def internal_covariate_shift(model, criterion, x, y, lr: float) -> dict[str, np.ndarray]:
    """Santurkar et al. (2018), Sec. 2.2: for each weight layer i, G = dL/dW_i and G' the same
    gradient after every layer before i took its SGD step ``p -= lr * dL/dp`` (all of their
    parameters: weights, biases, normalizer gains), on the same batch (x, y).

    Returns per weight layer (L,) arrays: ``l2`` = ||G - G'||, ``relative`` = ||G - G'|| / ||G||,
    ``cosine`` = <G, G'> / (||G|| ||G'||) (1 where both are zero). Layer 0 has nothing before
    it, so its shift is 0 and its cosine 1.
    """
    positions = weight_layers(model)
    with preserved(model):
        _, grads = loss_and_gradients(model, criterion, x, y)
        before = {key: value.copy() for key, value in model.params.items()}
        l2, relative, cosine = [], [], []
        for position in positions:
            for key, value in model.params.items():      # layers < position step, the rest stay
                layer = int(key.split(".", 1)[0])
                value[...] = before[key] - lr * grads[key] if layer < position else before[key]
            _, shifted = loss_and_gradients(model, criterion, x, y)
            g, g_shifted = grads[_weight_key(position)], shifted[_weight_key(position)]
            distance = float(np.linalg.norm(g - g_shifted))
            norm, norm_shifted = float(np.linalg.norm(g)), float(np.linalg.norm(g_shifted))
            l2.append(distance)
            relative.append(distance / norm if norm > 0 else 0.0)
            cosine.append(float(np.vdot(g, g_shifted)) / (norm * norm_shifted)
                          if norm > 0 and norm_shifted > 0 else 1.0)
    return {"l2": np.array(l2), "relative": np.array(relative), "cosine": np.array(cosine)}


def landscape(model, criterion, x, y, steps: Sequence[float]) -> dict[str, float]:
    """The loss and gradient along the gradient direction (Santurkar et al., 2018, Sec. 3.1).

    With g the gradient of every parameter on (x, y) and w' = w - eta g for each eta in
    ``steps``: ``loss_range`` = max - min of L(w') over the steps (w itself included),
    ``gradient_change`` = max ||g(w') - g|| / ||g|| and ``beta`` (the "effective
    beta-smoothness") = max ||g(w') - g|| / ||eta g||. Training mode, same batch throughout.
    """
    with preserved(model):
        loss, grads = loss_and_gradients(model, criterion, x, y)
        before = {key: value.copy() for key, value in model.params.items()}
        flat = np.concatenate([g.ravel() for g in grads.values()])
        grad_norm = float(np.linalg.norm(flat))
        losses, changes, betas = [loss], [], []
        for eta in steps:
            for key, value in model.params.items():
                value[...] = before[key] - eta * grads[key]
            shifted_loss, shifted = loss_and_gradients(model, criterion, x, y)
            change = float(np.linalg.norm(
                np.concatenate([shifted[k].ravel() for k in grads]) - flat))
            losses.append(shifted_loss)
            changes.append(change / grad_norm if grad_norm > 0 else 0.0)
            betas.append(change / (eta * grad_norm) if grad_norm > 0 else 0.0)
    return {"loss_range": float(np.max(losses) - np.min(losses)),
            "gradient_change": float(np.max(changes)), "beta": float(np.max(betas))}


def saturated_fraction(pre_activation: np.ndarray, activation: str) -> float:
    """The fraction of entries where ``activation``'s derivative is below
    :data:`SATURATION_DERIVATIVE`: sigmoid' = s (1 - s) < 0.05 (|z| > 2.887), tanh' = 1 -
    tanh^2 < 0.05 (|z| > 2.178)."""
    z = pre_activation.astype(np.float64)
    if activation == "sigmoid":
        s = 0.5 * (1.0 + np.tanh(0.5 * z))                       # sigmoid without overflow
        derivative = s * (1.0 - s)
    elif activation == "tanh":
        derivative = 1.0 - np.tanh(z) ** 2
    else:
        raise ValueError(f"activation must be 'sigmoid' or 'tanh', got {activation!r}")
    return float(np.mean(derivative < SATURATION_DERIVATIVE))


def saturation(model, x: np.ndarray, training: bool = True) -> np.ndarray:
    """Per Sigmoid/Tanh layer of ``model`` (in order), the saturated fraction of its inputs over
    the batch ``x`` (all examples and units). ``training`` picks the forward mode (training:
    batch statistics, as the gradients see them); the state is restored."""
    fractions = []
    with preserved(model):
        h = x
        for layer in model:
            if isinstance(layer, (Sigmoid, Tanh)):
                kind = "sigmoid" if isinstance(layer, Sigmoid) else "tanh"
                fractions.append(saturated_fraction(h, kind))
            h = layer.forward(h, training)
    return np.array(fractions)


def stat_errors(model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """For each batch norm of a flat ``model``, the error of its running statistics against the
    population statistics of its input over ``x`` (that input computed in evaluation mode), as
    :func:`normkit.train.stat_error` defines it for the first normalizer: RMS over channels of
    (rm - m) / sqrt(v + eps) plus that of (rv + eps) / (v + eps) - 1."""
    norms = {id(n) for n in batch_norms(model)}
    inputs: dict[int, list] = {}
    for start in range(0, len(x), batch_size):
        h = x[start:start + batch_size]
        for position, layer in enumerate(model):
            if id(layer) in norms:
                inputs.setdefault(position, []).append(h.astype(np.float64))   # copies
            h = layer.forward(h, training=False)
    errors = []
    for position in sorted(inputs):
        norm, values = model[position], np.concatenate(inputs[position])   # (N, C, *spatial)
        axes = (0,) + tuple(range(2, values.ndim))
        mean, var = values.mean(axis=axes), values.var(axis=axes, ddof=1)
        running_mean = norm.state["running_mean"].astype(np.float64)
        running_var = norm.state["running_var"].astype(np.float64)
        mean_error = np.sqrt(np.mean((running_mean - mean) ** 2 / (var + norm.eps)))
        var_error = np.sqrt(np.mean(((running_var + norm.eps) / (var + norm.eps) - 1.0) ** 2))
        errors.append(mean_error + var_error)
    return np.array(errors)
