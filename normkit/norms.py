"""The common interface: every normalizer is built by name and used the same way.

    norm = normkit.make("batch", 64)                  # dtype=np.float32 by default
    y = norm.forward(x, training=True)               # keeps what backward needs
    dx = norm.backward(dy)                           # fills norm.grads, returns dL/dx
    norm.params, norm.grads, norm.state              # dicts of arrays owned by the norm

``training`` is required: the mode is always explicit. ``training=False`` uses only ``state`` and
never changes it (layer/group/instance/RMS norm compute the same in both modes). Every call is
checked before any kernel runs; a refused call raises ``ValueError``/``TypeError`` naming the
argument and changes nothing (running statistics, ``num_batches_tracked``, the saved input).
Arrays in ``params``/``grads``/``state`` are never replaced, only written into, so an optimizer
may hold them and update ``params`` in place. ``forward`` keeps a reference to ``x`` for
``backward``: do not modify ``x`` in place between the two.

Outputs and allocation: a fresh output array per call costs page faults for outputs of 32 MiB
and more (glibc's mmap threshold), more than the kernel. So each norm keeps the output arrays of
its last ``forward`` and ``backward``. By default (``reuse_buffers=False``) a kept array is
written again only when nothing outside the norm references it any more (its reference count:
a view, a memoryview or a caller's variable all hold one), so an array a caller still holds is
never overwritten; otherwise the call allocates a fresh one and keeps that. With
``reuse_buffers=True`` the kept arrays are always reused: use y before the next forward and dx
before the next backward (copy them to keep them). Either way, a call whose input lives in the
buffer it would write (the caller passed back an earlier output) gets a fresh array.

Batch norm in training mode runs a fast path: the checks depend only on the input's shape,
strides, dtype and the mode, so after one fully checked call a call with the same signature
skips them and runs one fused kernel (statistics, output, running-statistics update, parameter
finiteness check); backward likewise. Anything else goes through the checked path.
"""
from __future__ import annotations

import math
import sys
from numbers import Integral, Real

import numpy as np

from .kernels import _core
from .kernels import batch as _batch
from .kernels import group as _group
from .kernels import layer as _layer
from .kernels import renorm as _renorm

__all__ = [
    "Norm", "BatchNorm", "GhostBatchNorm", "BatchRenorm", "LayerNorm", "GroupNorm",
    "InstanceNorm", "RMSNorm", "Identity", "make", "available", "register",
]

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a Norm subclass available to :func:`make` under ``name``."""
    def add(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return add


def available() -> list[str]:
    """Names accepted by :func:`make`."""
    return sorted(_REGISTRY)


def make(name: str, *args, **kwargs) -> "Norm":
    """Build the normalizer registered as ``name``: ``make("group", 64, num_groups=8)``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; expected one of {available()}")
    return _REGISTRY[name](*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by every class; each names the argument and what was expected)
# ---------------------------------------------------------------------------------------------

def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def _check_momentum(momentum) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, Real) or not 0 <= momentum <= 1:
        raise ValueError(
            f"momentum must be a number in [0, 1] (the weight of the new batch, as in PyTorch), "
            f"got {momentum!r}")
    return float(momentum)


def _check_shape(name: str, value) -> tuple[int, ...]:
    shape = (value,) if isinstance(value, Integral) else tuple(value)
    if not shape or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in shape):
        raise ValueError(f"{name} must be a positive int or a tuple of them, got {value!r}")
    return tuple(int(s) for s in shape)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

class Norm:
    """Base class: ``forward(x, training)``, ``backward(dy)``, ``params``, ``grads``, ``state``.

    Subclasses implement ``_check(x, training)`` (raise on bad input), ``_canonical(x)`` (the
    view the kernels take), ``_forward(x, training)`` returning ``(y, saved, new_state)`` and
    ``_backward(dy, x, training, saved)`` returning ``(dx, grads)``, all on canonical views.
    ``new_state`` (a dict of arrays, may be empty) is written into ``state`` only after the
    kernel succeeded, so a refused or failed call leaves the state as it was.
    """

    name = "norm"

    def __init__(self, dtype=np.float32, reuse_buffers=False):
        self.dtype = _check_dtype(dtype)
        self.reuse_buffers = _check_bool("reuse_buffers", reuse_buffers)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        self._saved = None                     # what backward needs, from the last forward
        self._buffers: dict[str, np.ndarray] = {}   # the last outputs, reused when free
        self._free_refcount = 0                # sys.getrefcount of a kept array nobody else holds

    def _add_param(self, key: str, value: np.ndarray) -> None:
        self.params[key] = np.array(value, dtype=self.dtype)
        self.grads[key] = np.zeros_like(self.params[key])

    # -- public ------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Normalize ``x``; in training mode update ``state``. Returns an array of x's dtype."""
        if training is not True and training is not False:
            training = _check_bool("training", training)
        x = self._check_array("x", x)
        self._check(x, training)
        if not self._kernel_checks_params(training):
            self._check_params()
        canonical = self._canonical(x)
        y, saved, new_state = self._forward(canonical, training)
        if new_state:
            state = self.state
            for key, value in new_state.items():
                state[key][...] = value
        self._saved = (canonical, x.shape, training, saved)
        return y.reshape(x.shape)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient of the last forward: fills ``grads`` and returns dL/dx."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        x, shape, training, saved = self._saved
        dy = self._check_array("dy", dy)
        if dy.shape != shape:
            raise ValueError(f"dy must have the shape of the last forward's x {shape}, got {dy.shape}")
        dx, grads = self._backward(dy.reshape(x.shape), x, training, saved)
        for key, value in grads.items():
            self.grads[key][...] = value.reshape(self.grads[key].shape)
        return dx.reshape(shape)

    def _buffer(self, key: str, like: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
        """The array to write output ``key`` (shaped like ``like``) into: the kept one when it
        may be overwritten (see the module docstring), else a fresh one, kept from now on.
        ``inputs`` are the call's arrays, which an output must never overwrite."""
        buffer = self._buffers.get(key)
        if buffer is not None and buffer.shape == like.shape:
            if self.reuse_buffers:
                if not any(np.may_share_memory(buffer, a) for a in inputs):
                    return buffer
                return np.empty(like.shape, self.dtype)
            # Referenced by self._buffers, this local and getrefcount's argument only: the
            # caller dropped it and every view of it (an input that is such a view counts too).
            if sys.getrefcount(buffer) <= self._free_refcount:
                return buffer
        buffer = self._buffers[key] = np.empty(like.shape, self.dtype)
        self._free_refcount = sys.getrefcount(buffer)     # the same three references
        return buffer

    # -- checks ------------------------------------------------------------------------------
    def _check_array(self, name: str, a) -> np.ndarray:
        if type(a) is not np.ndarray and not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.dtype != self.dtype:
            if a.dtype.kind != "f":
                raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
            raise TypeError(
                f"{name} has dtype {a.dtype} but this {type(self).__name__} holds {self.dtype} "
                f"parameters; build it with dtype=np.{a.dtype} or cast {name}")
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)

    def _check_params(self) -> None:
        for key, value in self.params.items():
            if not _core.all_finite(value.reshape(-1)):
                raise ValueError(f"params[{key!r}] contains NaN or inf; refusing to normalize with it")

    def _kernel_checks_params(self, training: bool) -> bool:
        """Whether this call's kernel refuses non-finite params itself (before writing)."""
        return False

    def _check(self, x: np.ndarray, training: bool) -> None:
        pass

    def _canonical(self, x: np.ndarray) -> np.ndarray:
        """The view the kernels see (one layout per norm keeps the compiled variants few)."""
        return x

    def _forward(self, x, training):
        raise NotImplementedError

    def _backward(self, dy, x, training, saved):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, dtype={self.dtype.name})"

    def _describe(self) -> str:
        return ""


class _ChannelNorm(Norm):
    """Shared by the norms that take (N, C, *spatial) with per-channel gamma/beta."""

    def __init__(self, num_features, *, eps=1e-5, affine=True, dtype=np.float32,
                 reuse_buffers=False):
        super().__init__(dtype, reuse_buffers)
        self.num_features = _check_positive_int("num_features", num_features)
        self.eps = _check_eps(eps)
        self.affine = _check_bool("affine", affine)
        C = self.num_features
        if self.affine:
            self._add_param("gamma", np.ones(C))
            self._add_param("beta", np.zeros(C))
        else:                                  # fixed gamma = 1, beta = 0, not learnable
            self._fixed = {"gamma": np.ones(C, self.dtype), "beta": np.zeros(C, self.dtype)}

    @property
    def _gamma(self):
        return self.params["gamma"] if self.affine else self._fixed["gamma"]

    @property
    def _beta(self):
        return self.params["beta"] if self.affine else self._fixed["beta"]

    def _affine_grads(self, dgamma, dbeta) -> dict:
        return {"gamma": dgamma, "beta": dbeta} if self.affine else {}

    def _check(self, x, training):
        if x.ndim < 2:
            raise ValueError(f"x must be (N, C) or (N, C, *spatial), got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x has {x.shape[1]} channels (axis 1) but this {type(self).__name__} was built "
                f"with num_features={self.num_features}; x.shape = {x.shape}")
        if x.size == 0:
            raise ValueError(f"x is empty: shape {x.shape}")

    def _canonical(self, x):
        return x.reshape(x.shape[0], x.shape[1], -1)       # (N, C, L)

    def _describe(self):
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


@register("batch")
class BatchNorm(_ChannelNorm):
    """Batch norm (Ioffe & Szegedy, 2015), PyTorch semantics, on (N, C) or (N, C, *spatial).

    Training normalizes with the biased batch variance; ``running_var`` stores the unbiased one.
    ``momentum`` is the weight of the new batch (PyTorch's 0.1 is Keras' 0.9);
    ``running_average="cumulative"`` averages all batches equally (PyTorch's momentum=None).
    With ``track_running_stats=False`` both modes use the batch statistics and ``state`` is empty.
    Backward after ``forward(x, training=False)`` treats the running statistics as constants
    (fine-tuning with frozen statistics).
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, running_average="exponential",
                 affine=True, track_running_stats=True, dtype=np.float32, reuse_buffers=False):
        super().__init__(num_features, eps=eps, affine=affine, dtype=dtype,
                         reuse_buffers=reuse_buffers)
        self.momentum = _check_momentum(momentum)
        if running_average not in ("exponential", "cumulative"):
            raise ValueError(
                f"running_average must be 'exponential' or 'cumulative', got {running_average!r}")
        self.running_average = running_average
        self.track_running_stats = _check_bool("track_running_stats", track_running_stats)
        C = self.num_features
        if self.track_running_stats:
            self.state["running_mean"] = np.zeros(C, self.dtype)
            self.state["running_var"] = np.ones(C, self.dtype)
            self.state["num_batches_tracked"] = np.zeros((), np.int64)
        # The fused training kernels (see _train_forward): their scalars, the batch statistics
        # they keep for backward, and stand-ins for what a norm without them lacks.
        self._hyper = np.zeros(4, np.float64)      # _batch.HYPER_* layout
        self._stats = np.zeros((2, C))             # (2, C) batch mean, biased variance
        self._no_state = (np.zeros(C, self.dtype), np.ones(C, self.dtype), np.zeros((), np.int64))
        self._no_grads = (np.zeros(C, self.dtype), np.zeros(C, self.dtype))
        # The fast path: shape and strides of the last input that passed every check in
        # training mode (None: none yet), for this class only (subclasses have their own kernels).
        self._fast_signature = None
        self._fast_view = None                     # (N, C, L) of that shape
        self._fast = type(self) is BatchNorm

    def _uses_batch_stats(self, training: bool) -> bool:
        return training or not self.track_running_stats

    def _kernel_checks_params(self, training):
        return self._fast and self._uses_batch_stats(training)      # the fused kernel

    def _values_per_channel(self, x, virtual_batch=None) -> int:
        return (virtual_batch or x.shape[0]) * (x.size // (x.shape[0] * x.shape[1]))

    def _check(self, x, training):
        super()._check(x, training)
        if self._uses_batch_stats(training) and self._values_per_channel(x) < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}")

    def _update_momentum(self) -> float:
        if self.running_average == "cumulative":
            return 1.0 / (int(self.state["num_batches_tracked"]) + 1)
        return self.momentum

    def _running_update(self, batch_mean, batch_var, count) -> dict:
        if not self.track_running_stats:
            return {}
        mean, var = _batch.running_update(self.state["running_mean"], self.state["running_var"],
                                          batch_mean, batch_var, count, self._update_momentum())
        return {"running_mean": mean, "running_var": var,
                "num_batches_tracked": self.state["num_batches_tracked"] + 1}

    # -- the fast path (see the module docstring) ------------------------------------------
    def forward(self, x, training):
        if (training is True and x.__class__ is np.ndarray and x.dtype is self.dtype
                and (x.shape, x.strides) == self._fast_signature):
            canonical = x.reshape(self._fast_view)                       # (N, C, L)
            y = self._train_forward(canonical, True)
            self._saved = (canonical, x.shape, True, self._stats)
            return y.reshape(x.shape)
        y = super().forward(x, training)
        if self._fast and training is True and x.flags.c_contiguous:   # x reached the kernel
            self._fast_signature = (x.shape, x.strides)
            self._fast_view = self._saved[0].shape
        return y

    def backward(self, dy):
        saved = self._saved
        if (saved is not None and saved[3] is self._stats and dy.__class__ is np.ndarray
                and dy.dtype is self.dtype and (dy.shape, dy.strides) == self._fast_signature
                and dy.shape == saved[1]):
            x = saved[0]                                                 # (N, C, L)
            dx = self._train_backward(dy.reshape(x.shape), x)
            return dx.reshape(dy.shape)
        return super().backward(dy)

    def _train_forward(self, x, training):
        """The fused kernel: y, the batch statistics into self._stats and (training with
        tracking) the running statistics, in one call; x (N, C, L) checked."""
        y = self._buffer("y", x, x)
        hyper = self._hyper
        hyper[_batch.HYPER_EPS] = self.eps
        hyper[_batch.HYPER_MOMENTUM] = self.momentum
        hyper[_batch.HYPER_CUMULATIVE] = self.running_average == "cumulative"
        hyper[_batch.HYPER_TRACK] = tracked = training and self.track_running_stats
        if tracked:
            state = self.state
            running = state["running_mean"], state["running_var"], state["num_batches_tracked"]
        else:
            running = self._no_state
        params = self.params if self.affine else self._fixed
        status = _batch.train_forward_into(x, params["gamma"], params["beta"], y, self._stats,
                                           *running, hyper)
        if status != _batch.OK:                # checked before anything was written
            key = "gamma" if status == _batch.GAMMA_NOT_FINITE else "beta"
            raise ValueError(f"params[{key!r}] contains NaN or inf; refusing to normalize with it")
        return y

    def _train_backward(self, dy, x):
        """dx of the last training forward; writes grads (gamma and beta) directly."""
        dx = self._buffer("dx", x, dy, x)
        grads = (self.grads["gamma"], self.grads["beta"]) if self.affine else self._no_grads
        _batch.backward_into(dy, x, self._gamma, self._stats, self.eps, dx, *grads)
        return dx

    def _forward(self, x, training):
        if self._uses_batch_stats(training):
            return self._train_forward(x, training), self._stats, {}
        y = _batch.forward_eval(x, self._gamma, self._beta, self.state["running_mean"],
                                self.state["running_var"], self.eps, self._buffer("y", x, x))
        return y, None, {}

    def _backward(self, dy, x, training, saved):
        if saved is self._stats:               # batch statistics (training forward)
            return self._train_backward(dy, x), {}
        out = self._buffer("dx", x, dy, x)
        dx, dgamma, dbeta = _batch.backward_eval(dy, x, self._gamma, self.state["running_mean"],
                                                 self.state["running_var"], self.eps, out)
        return dx, self._affine_grads(dgamma, dbeta)

    def _describe(self):
        return (f"{super()._describe()}, momentum={self.momentum}, "
                f"running_average={self.running_average!r}, "
                f"track_running_stats={self.track_running_stats}")


@register("ghost")
class GhostBatchNorm(BatchNorm):
    """Ghost batch norm (Hoffer et al., 2017): batch norm on disjoint virtual batches of
    ``virtual_batch_size`` rows (it must divide N), parameters and running statistics shared.

    The running statistics are updated once per call with the mean over virtual batches of
    their means and of their unbiased variances; evaluation uses them as batch norm does.
    """

    def __init__(self, num_features, virtual_batch_size, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = _check_positive_int("virtual_batch_size", virtual_batch_size)

    def _check(self, x, training):
        _ChannelNorm._check(self, x, training)
        if not self._uses_batch_stats(training):
            return
        if x.shape[0] % self.virtual_batch_size:
            raise ValueError(
                f"virtual_batch_size={self.virtual_batch_size} must divide the batch size, "
                f"got a batch of {x.shape[0]} (x.shape = {x.shape})")
        if self._values_per_channel(x, self.virtual_batch_size) < 2:
            raise ValueError(
                f"Expected more than 1 value per channel in each virtual batch when training, "
                f"got input size {x.shape} with virtual_batch_size={self.virtual_batch_size}")

    def _forward(self, x, training):
        if not self._uses_batch_stats(training):
            return super()._forward(x, training)
        B = self.virtual_batch_size
        y, means, variances = _batch.ghost_forward_train(x, self._gamma, self._beta, self.eps, B,
                                                         self._buffer("y", x, x))
        new_state = {}
        if training:
            new_state = self._running_update(means.mean(axis=0), variances.mean(axis=0),
                                             self._values_per_channel(x, B))
        return y, (means, variances), new_state

    def _backward(self, dy, x, training, saved):
        if saved is None:
            return super()._backward(dy, x, training, saved)
        dx, dgamma, dbeta = _batch.ghost_backward(dy, x, self._gamma, *saved, self.eps,
                                                  self.virtual_batch_size,
                                                  self._buffer("dx", x, dy, x))
        return dx, self._affine_grads(dgamma, dbeta)

    def _describe(self):
        return f"{super()._describe()}, virtual_batch_size={self.virtual_batch_size}"


@register("renorm")
class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with sigma = sqrt(running_var + eps); r and d carry no gradient. ``r_max``/``d_max`` may be
    changed between steps (the paper starts at 1 and 0 — plain batch norm, bit for bit — and
    relaxes them to 3 and 5, the defaults here); the schedule belongs to the training loop.
    Running statistics and evaluation are batch norm's. The last step's r and d are kept in
    ``last_r`` and ``last_d``.
    """

    def __init__(self, num_features, *, r_max=3.0, d_max=5.0, **kwargs):
        if kwargs.get("track_running_stats") is False:
            raise ValueError("track_running_stats must be True for batch renormalization: "
                             "r and d are computed from the running statistics")
        super().__init__(num_features, **kwargs)
        self.r_max = r_max
        self.d_max = d_max
        self.last_r = self.last_d = None

    @property
    def r_max(self) -> float:
        return self._r_max

    @r_max.setter
    def r_max(self, value):
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 1:
            raise ValueError(f"r_max must be a number >= 1, got {value!r}")
        self._r_max = float(value)

    @property
    def d_max(self) -> float:
        return self._d_max

    @d_max.setter
    def d_max(self, value):
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
            raise ValueError(f"d_max must be a number >= 0, got {value!r}")
        self._d_max = float(value)

    def _forward(self, x, training):
        if not training:
            return super()._forward(x, training)
        y, mean, var, r, d = _renorm.forward_train(x, self._gamma, self._beta,
                                                   self.state["running_mean"],
                                                   self.state["running_var"], self.eps,
                                                   self.r_max, self.d_max, self._buffer("y", x, x))
        self.last_r, self.last_d = r, d
        return y, (mean, var, r, d), self._running_update(mean, var, self._values_per_channel(x))

    def _backward(self, dy, x, training, saved):
        if saved is None:
            return super()._backward(dy, x, training, saved)
        dx, dgamma, dbeta = _renorm.backward(dy, x, self._gamma, *saved, self.eps,
                                             self._buffer("dx", x, dy, x))
        return dx, self._affine_grads(dgamma, dbeta)

    def _describe(self):
        return f"{super()._describe()}, r_max={self.r_max}, d_max={self.d_max}"


@register("group")
class GroupNorm(_ChannelNorm):
    """Group norm (Wu & He, 2018): statistics per (sample, group of C / num_groups channels),
    per-channel gamma/beta; x is (N, C, *spatial). Same computation in training and evaluation.
    ``GroupNorm(C, num_groups=1)`` is layer norm over (C, *spatial); ``num_groups=C`` is
    instance norm."""

    def __init__(self, num_features, num_groups, *, eps=1e-5, affine=True, dtype=np.float32,
                 reuse_buffers=False):
        num_groups = _check_positive_int("num_groups", num_groups)
        super().__init__(num_features, eps=eps, affine=affine, dtype=dtype,
                         reuse_buffers=reuse_buffers)
        if self.num_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_features={self.num_features}")
        self.num_groups = num_groups

    def _forward(self, x, training):
        y, mean, var = _group.forward(x, self._gamma, self._beta, self.num_groups, self.eps,
                                      self._buffer("y", x, x))
        return y, (mean, var), {}

    def _backward(self, dy, x, training, saved):
        dx, dgamma, dbeta = _group.backward(dy, x, self._gamma, self.num_groups, *saved, self.eps,
                                            self._buffer("dx", x, dy, x))
        return dx, self._affine_grads(dgamma, dbeta)

    def _describe(self):
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"


@register("instance")
class InstanceNorm(GroupNorm):
    """Instance norm: group norm with one channel per group (statistics per sample and channel
    over the spatial axes), per-channel gamma/beta (``affine=True`` by default, unlike PyTorch's
    InstanceNorm). Needs more than one spatial element, as in PyTorch."""

    def __init__(self, num_features, *, eps=1e-5, affine=True, dtype=np.float32,
                 reuse_buffers=False):
        super().__init__(num_features, num_features, eps=eps, affine=affine, dtype=dtype,
                         reuse_buffers=reuse_buffers)

    def _check(self, x, training):
        super()._check(x, training)
        if x.size // (x.shape[0] * x.shape[1]) < 2:
            raise ValueError(f"Expected more than 1 spatial element for instance norm, got input "
                             f"size {x.shape}")

    def _describe(self):
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class _TrailingNorm(Norm):
    """Shared by layer and RMS norm: statistics per row over the trailing ``num_features`` axes
    (an int or a tuple, PyTorch's ``normalized_shape``)."""

    def __init__(self, num_features, *, eps=1e-5, dtype=np.float32, reuse_buffers=False):
        super().__init__(dtype, reuse_buffers)
        self.normalized_shape = _check_shape("num_features", num_features)
        self.eps = _check_eps(eps)

    def _check(self, x, training):
        k = len(self.normalized_shape)
        if x.ndim < k or x.shape[x.ndim - k:] != self.normalized_shape:
            raise ValueError(
                f"x's trailing axes must be the normalized shape {self.normalized_shape}, "
                f"got x.shape = {x.shape}")
        if x.size == 0:
            raise ValueError(f"x is empty: shape {x.shape}")

    def _canonical(self, x):
        return x.reshape(-1, math.prod(self.normalized_shape))    # (R, D)

    def _flat(self, key):
        return self.params[key].reshape(-1)                        # (D,)


@register("layer")
class LayerNorm(_TrailingNorm):
    """Layer norm (Ba et al., 2016) over the trailing ``num_features`` axes, per-element
    gamma/beta of that shape; same computation in training and evaluation."""

    def __init__(self, num_features=None, *, normalized_shape=None, eps=1e-5, affine=True,
                 dtype=np.float32, reuse_buffers=False):
        if (num_features is None) == (normalized_shape is None):
            raise ValueError("give the normalized shape once: as num_features or as normalized_shape")
        super().__init__(normalized_shape if num_features is None else num_features, eps=eps,
                         dtype=dtype, reuse_buffers=reuse_buffers)
        self.affine = _check_bool("affine", affine)
        D = math.prod(self.normalized_shape)
        if self.affine:
            self._add_param("gamma", np.ones(self.normalized_shape))
            self._add_param("beta", np.zeros(self.normalized_shape))
        else:
            self._fixed = (np.ones(D, self.dtype), np.zeros(D, self.dtype))

    def _gamma_beta(self):
        return (self._flat("gamma"), self._flat("beta")) if self.affine else self._fixed

    def _forward(self, x, training):
        y, mean, var = _layer.forward(x, *self._gamma_beta(), self.eps, self._buffer("y", x, x))
        return y, (mean, var), {}

    def _backward(self, dy, x, training, saved):
        dx, dgamma, dbeta = _layer.backward(dy, x, self._gamma_beta()[0], *saved, self.eps,
                                            self._buffer("dx", x, dy, x))
        return dx, ({"gamma": dgamma, "beta": dbeta} if self.affine else {})

    def _describe(self):
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.affine}"


@register("rms")
class RMSNorm(_TrailingNorm):
    """RMS norm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * gamma over the
    trailing ``num_features`` axes; a gain, no centering and no bias."""

    def __init__(self, num_features=None, *, normalized_shape=None, eps=1e-5, dtype=np.float32,
                 reuse_buffers=False):
        if (num_features is None) == (normalized_shape is None):
            raise ValueError("give the normalized shape once: as num_features or as normalized_shape")
        super().__init__(normalized_shape if num_features is None else num_features, eps=eps,
                         dtype=dtype, reuse_buffers=reuse_buffers)
        self._add_param("gamma", np.ones(self.normalized_shape))

    def _forward(self, x, training):
        y, mean_square = _layer.rms_forward(x, self._flat("gamma"), self.eps,
                                            self._buffer("y", x, x))
        return y, mean_square, {}

    def _backward(self, dy, x, training, saved):
        dx, dgamma = _layer.rms_backward(dy, x, self._flat("gamma"), saved, self.eps,
                                         self._buffer("dx", x, dy, x))
        return dx, {"gamma": dgamma}

    def _describe(self):
        return f"{self.normalized_shape}, eps={self.eps}"


@register("none")
class Identity(Norm):
    """No normalization, so a study can include it by name: y = x, dx = dy (copies)."""

    def __init__(self, num_features=None, *, dtype=np.float32, reuse_buffers=False):
        super().__init__(dtype, reuse_buffers)
        self.num_features = num_features

    def _forward(self, x, training):
        return x.copy(), None, {}

    def _backward(self, dy, x, training, saved):
        return dy.copy(), {}

    def _describe(self):
        return f"{self.num_features}"
