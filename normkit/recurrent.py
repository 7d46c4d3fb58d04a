"""Recurrent batch norm (Cooijmans et al., 2017): batch norm for sequences with statistics per step.

    norm = normkit.make("recurrent_batch", num_features=64, max_steps=100)
    y = norm.forward(x, training=True, mask=mask)       # x (T, N, 64) time-major, mask (T, N)
    dx = norm.backward(dy)

Statistics and running statistics are kept separately for every time step t < max_steps; gamma
and beta are shared over time. Evaluation at steps t >= max_steps uses the statistics of step
max_steps - 1. ``per_step=False`` keeps one set of statistics for all steps instead (training
normalizes with the statistics of all steps of the batch together) — the variant Cooijmans et al.
found to degrade performance, kept for comparing it.

Masks: ``mask[t, n]`` False marks a padded position. Padded positions enter no statistics, get
output 0 and gradient 0 whatever they hold. Rules for a training batch, per slot of statistics
(a step, or all steps if ``per_step=False``): no valid value at all — the slot is skipped (its
running statistics and ``num_batches_tracked`` stay as they were); exactly one valid value —
refused with a ValueError, as batch norm refuses a batch of one.
"""
from __future__ import annotations

import numpy as np

from .kernels import _engine
from .norms import (_EngineNorm, _check_bool, _check_eps, _check_momentum, _check_positive_int,
                    register)

__all__ = ["RecurrentBatchNorm", "check_mask", "mask_from_lengths"]


def check_mask(mask, T: int, N: int) -> np.ndarray | None:
    """``mask`` as a C-contiguous bool (T, N) array (None stays None), or a clear error."""
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy bool array of shape (T, N), got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array (True where a position holds data), got dtype "
                        f"{mask.dtype}")
    if mask.shape != (T, N):
        raise ValueError(f"mask must have shape (T, N) = {(T, N)} to match x, got {mask.shape}")
    return np.ascontiguousarray(mask)


def mask_from_lengths(lengths, T: int) -> np.ndarray:
    """The (T, N) mask of sequences of the given lengths: mask[t, n] = t < lengths[n]."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be a 1-D integer array (one length per sequence), got "
                        f"shape {lengths.shape} dtype {lengths.dtype}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > T):
        raise ValueError(f"lengths must be in [0, T] = [0, {T}], got min {lengths.min()} and "
                         f"max {lengths.max()}")
    return np.arange(T)[:, None] < lengths[None, :]


def pool_steps(mean, var, count):
    """Statistics of all steps together from per-step ones: (mean (1, F), var (1, F), count (1,)).

    With c_t valid rows at step t: mean = sum c_t mean_t / C, var = sum c_t (var_t +
    (mean_t - mean)^2) / C, C = sum c_t (biased variances, as batch norm over all steps).
    """
    count = np.asarray(count, np.float64)
    total = count.sum()
    if total == 0:
        return np.zeros((1, mean.shape[1])), np.zeros((1, mean.shape[1])), np.zeros(1)
    pooled_mean = (count[:, None] * mean).sum(axis=0, keepdims=True) / total
    pooled_var = (count[:, None] * (var + (mean - pooled_mean) ** 2)).sum(axis=0,
                                                                            keepdims=True) / total
    return pooled_mean, pooled_var, np.array([total])


@register("recurrent_batch")
class RecurrentBatchNorm(_EngineNorm):
    """Batch norm for time-major sequences x (T, N, num_features), statistics per time step.

    ``max_steps``: the number of steps with their own statistics (required if ``per_step``).
    Training on longer sequences is refused unless ``grow=True``, which extends the statistics
    (new steps start from the running statistics of the last one; ``state`` then holds new,
    larger arrays — the one case where they are replaced). ``momentum`` is the weight of the new
    batch (PyTorch's convention); ``running_var`` stores the unbiased variance, as batch norm.
    ``affine=False``: no gamma and beta; ``bias=False``: gamma only (the BN-LSTM's "no shift").

    ``state``: running_mean, running_var (S, F) and num_batches_tracked (S,), S = max_steps
    (per_step) or 1. ``forward(x, training, mask=None)`` takes an optional bool mask (T, N).
    """

    takes_mask = True

    def __init__(self, num_features, max_steps=None, *, per_step=True, grow=False, eps=1e-5,
                 momentum=0.1, affine=True, bias=True, dtype=np.float32):
        super().__init__(dtype)
        self.num_features = _check_positive_int("num_features", num_features)
        self.per_step = _check_bool("per_step", per_step)
        if max_steps is None and self.per_step:
            raise ValueError("max_steps must be given (a positive integer) when per_step=True: "
                             "statistics are kept for each of the first max_steps steps")
        self.max_steps = None if max_steps is None else _check_positive_int("max_steps", max_steps)
        self.grow = _check_bool("grow", grow)
        self.eps = _check_eps(eps)
        self.momentum = _check_momentum(momentum)
        self.affine = _check_bool("affine", affine)
        self.bias = _check_bool("bias", bias) and self.affine
        F = self.num_features
        self._fixed = {"gamma": np.ones(F, self.dtype), "beta": np.zeros(F, self.dtype)}
        if self.affine:
            self._add_param("gamma", np.ones(F))
        if self.bias:
            self._add_param("beta", np.zeros(F))
        slots = self.max_steps if self.per_step else 1
        self.state["running_mean"] = np.zeros((slots, F), self.dtype)
        self.state["running_var"] = np.ones((slots, F), self.dtype)
        self.state["num_batches_tracked"] = np.zeros(slots, np.int64)

    @property
    def gamma(self) -> np.ndarray:
        """gamma (F,) as the kernels use it (ones if not affine)."""
        return self.params["gamma"] if self.affine else self._fixed["gamma"]

    @property
    def beta(self) -> np.ndarray:
        """beta (F,) as the kernels use it (zeros without bias)."""
        return self.params["beta"] if self.bias else self._fixed["beta"]

    def _affine_views(self):
        """gamma, beta as (F, 1): one statistics group per feature."""
        F = self.num_features
        return self.gamma.reshape(F, 1), self.beta.reshape(F, 1)

    @property
    def num_slots(self) -> int:
        return self.state["running_mean"].shape[0]

    # -- checks, shared with the LSTM layer ---------------------------------------------------
    def _check(self, x, training):
        if x.ndim != 3 or x.shape[2] != self.num_features:
            raise ValueError(
                f"x must be time-major (T, N, num_features) with num_features={self.num_features}, "
                f"got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"x is empty: shape {x.shape}")

    def check_training(self, T: int, valid_per_step: np.ndarray, *, statistics_per_step=None) -> None:
        """Refuse a training batch of T steps with ``valid_per_step`` (T,) valid rows per step:
        T > max_steps without ``grow``, or a slot of statistics with exactly one valid value.
        ``statistics_per_step`` overrides ``per_step`` for the slot rule (the LSTM's recurrent
        terms always take batch statistics per step)."""
        per_step = self.per_step if statistics_per_step is None else statistics_per_step
        if self.per_step and T > self.num_slots and not self.grow:
            raise ValueError(
                f"x has {T} time steps but this {type(self).__name__} keeps statistics for "
                f"max_steps={self.num_slots}; build it with a larger max_steps or grow=True "
                f"(evaluation takes any length: steps >= max_steps use the last step's statistics)")
        if per_step:
            ones = np.flatnonzero(valid_per_step == 1)
            if ones.size:
                raise ValueError(
                    f"Expected more than 1 value per feature at every time step when training, "
                    f"got 1 valid value at step {ones[0]} (x.shape[1] = 1 or one unmasked row); "
                    f"steps with no valid value are skipped, one is not enough")
        elif int(valid_per_step.sum()) == 1:
            raise ValueError("Expected more than 1 value per feature when training, got 1 valid "
                             "value in the whole batch")

    def grow_to(self, T: int) -> None:
        """Extend per-step statistics to T steps (new steps copy the last step's statistics)."""
        S = self.num_slots
        if not self.per_step or T <= S:
            return
        for key in ("running_mean", "running_var"):
            old = self.state[key]
            self.state[key] = np.concatenate([old, np.repeat(old[-1:], T - S, axis=0)])
        self.state["num_batches_tracked"] = np.concatenate(
            [self.state["num_batches_tracked"], np.zeros(T - S, np.int64)])
        self.max_steps = T
        self._reshape_state()

    def running_update(self, batch_mean, batch_var, count) -> dict:
        """New state after a batch whose statistics are (K, F) with count (K,) valid rows per
        slot: per step (slots 0..K-1), or pooled into the one slot if ``per_step=False``."""
        if not self.per_step and batch_mean.shape[0] > 1:
            batch_mean, batch_var, count = pool_steps(batch_mean, batch_var, count)
        new = {key: value.copy() for key, value in self.state.items()}
        _engine.running_update(new["running_mean"], new["running_var"],
                               new["num_batches_tracked"], np.ascontiguousarray(batch_mean),
                               np.ascontiguousarray(batch_var),
                               np.asarray(count, np.float64), self.momentum, False, False)
        return new

    # -- the interface ------------------------------------------------------------------------
    def forward_saved(self, x: np.ndarray, training: bool, *, mask=None, out=None):
        """Normalize x (T, N, F); ``mask`` (T, N) bool marks the valid positions (None: all).
        In training, update the running statistics of the steps seen. Returns ``(y, saved)``
        (``forward``, inherited, returns y and keeps ``saved`` for ``backward``)."""
        training = _check_bool("training", training)
        x = self._check_array("x", x)
        self._check(x, training)
        T, N, _ = x.shape
        mask = check_mask(mask, T, N)
        if training:
            valid = np.full(T, N) if mask is None else mask.sum(axis=1)
            self.check_training(T, valid)
        self._check_owned()
        self._check_params()
        if training and self.per_step and T > self.num_slots:
            self.grow_to(T)
            self._reshape_state()
        return self._run(x, training, mask, out)

    def _forward(self, x, training, mask, out):
        T, N, F = x.shape
        x4 = x.reshape(T * N, F, 1, 1)         # (T*N, F, 1, 1): a step is a statistics group
        mask2, masked = (_engine.NO_MASK, False) if mask is None else (mask.reshape(T * N, 1), True)
        B = N if self.per_step else T * N
        gamma2, beta2 = self._affine2
        if not training:                       # step t >= max_steps: the last step's statistics
            steps = np.minimum(np.arange(T), self.num_slots - 1) if self.per_step else [0]
            mean = self.state["running_mean"][steps].astype(np.float64)
            var = self.state["running_var"][steps].astype(np.float64)
            count = np.zeros(mean.shape[0])
            y = self._run_forward(x, x4, B, mask2, masked, out, mean, var, count,
                                  _engine.APPLY_ONLY, gamma2, beta2)
            return y, (x, x4, B, mean, var, count, mask2, masked, True), None
        mean, var, count = self._statistics(x4, B)
        y = self._run_forward(x, x4, B, mask2, masked, out, mean, var, count,
                              _engine.STATS_AND_APPLY, gamma2, beta2)

        def commit():
            state = self.state
            _engine.running_update(state["running_mean"], state["running_var"],
                                   state["num_batches_tracked"], mean, var, count, self.momentum,
                                   False, False)
        return y, (x, x4, B, mean, var, count, mask2, masked, False), commit

    def _backward(self, dy, saved, out):
        dx, dgamma, dbeta = self._run_backward(dy, saved, out, self._affine2[0],
                                               frozen=saved[8])
        grads = {}
        if self.affine:
            grads["gamma"] = dgamma[:, 0]
        if self.bias:
            grads["beta"] = dbeta[:, 0]
        return dx, grads

    def _describe(self):
        return (f"{self.num_features}, max_steps={self.max_steps}, per_step={self.per_step}, "
                f"grow={self.grow}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias}")
