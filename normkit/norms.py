"""The common interface: every normalizer is built by name and used the same way.

    norm = normkit.make("batch", 64)                  # dtype=np.float32 by default
    y = norm.forward(x, training=True)               # keeps what backward needs
    dx = norm.backward(dy)                           # fills norm.grads, returns dL/dx
    norm.params, norm.grads, norm.state              # dicts of arrays owned by the norm

``training`` is required: the mode is always explicit. ``training=False`` uses only ``state`` and
never changes it (layer/group/instance/RMS norm compute the same in both modes). Every call is
checked before any kernel runs; a refused call raises ``ValueError``/``TypeError`` naming the
argument and changes nothing (running statistics, ``num_batches_tracked``, the saved input).
Arrays in ``params``/``grads``/``state`` are written into, never replaced by the norm, so an
optimizer may hold them; an array replaced from outside must keep its shape and dtype (checked
before every call). ``forward`` keeps a reference to ``x`` for ``backward``: do not modify ``x``
in place between the two.

Memory contract: ``forward`` and ``backward`` return fresh arrays, unless the caller passes
``out=``: a C-contiguous array of the result's shape and dtype that overlaps no input, written
into and returned. A norm built with ``workspace=True`` (``make(name, ..., workspace=True)``, or
``norm.workspace = True``) owns two output arrays instead, one for ``forward`` and one for
``backward``: each call returns its array, overwritten by the next call of the same method (a
new shape, or an input that is the array itself, gets a new one). It saves the allocation and
the page faults of a large fresh output (tens of MiB). ``forward_saved``/``backward_saved``
always return fresh arrays.

Options of the batch-statistics norms (batch, ghost, renorm; recurrent_batch has its own layout):

- ``mask=``: a bool array of x's shape without the channel axis (for (N, C, L): (N, L)); False
  marks a padded position, which enters no statistic and gets output 0 and gradient 0. Only
  bool is accepted (a 0/1 float mask is refused with a message, not guessed at).
- ``axis=``: the channel axis, 1 by default (PyTorch); ``axis=-1`` is channels-last (Keras). The
  statistics are computed on the array as it lies in memory, without transposing it. Group and
  instance norm take ``axis`` too.

Every norm computes on a view of its input through one statistics engine
(:mod:`normkit.kernels._engine`); a norm names the view.
"""
from __future__ import annotations

import math
import operator
from numbers import Integral, Real

import numpy as np

from .kernels import _engine
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


def make(name: str, *args, workspace: bool = False, **kwargs) -> "Norm":
    """Build the normalizer registered as ``name``: ``make("group", 64, num_groups=8)``.
    ``workspace=True``: outputs in arrays the norm owns (see the module docstring)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; expected one of {available()}")
    workspace = _check_bool("workspace", workspace)
    norm = _REGISTRY[name](*args, **kwargs)
    norm.workspace = workspace
    return norm


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


def _check_axis(axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, Integral) or axis == 0:
        raise ValueError(f"axis (the channel axis) must be a nonzero integer such as 1 or -1, "
                         f"got {axis!r}")
    return int(axis)


def check_mask(mask, shape: tuple, what: str) -> np.ndarray:
    """``mask`` as a C-contiguous bool array of ``shape`` (x's shape without the channel axis),
    or a clear error; ``what`` names that shape for the message."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy bool array of shape {what} = {shape}, got "
                        f"{type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array (True where a position holds data), got dtype "
                        f"{mask.dtype}; convert a 0/1 mask with mask.astype(bool)")
    if mask.shape != shape:
        raise ValueError(f"mask must have shape {what} = {shape} to match x, got {mask.shape}")
    return np.ascontiguousarray(mask)


def check_out(out, shape: tuple, dtype: np.dtype, *inputs: np.ndarray) -> np.ndarray:
    """``out`` if it can take a result of ``shape`` and ``dtype``, else a clear error; None: a
    fresh array."""
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape {shape}, "
                         f"got {out.dtype} {out.shape} (C-contiguous: {out.flags.c_contiguous}, "
                         f"writeable: {out.flags.writeable})")
    if any(np.may_share_memory(out, a) for a in inputs):
        raise ValueError("out must not overlap an input of the call")
    return out


def _check_saved(x, x4, B, gamma2, mean, var, count, mask2, masked, dtype) -> None:
    """The arrays of a ``saved`` that backward_saved got from its caller (not the norm's last
    forward): the engine's backward indexes with them unchecked (``_engine.run_backward``), so
    they must agree with one another and with x; a saved of another norm is refused."""
    try:
        N, G, K, L = x4.shape
        V = N // B
        agree = (x4.dtype == dtype and x4.flags.c_contiguous and x4.size == x.size
                 and N % B == 0 and gamma2.shape == (G, K) and mean.shape == (V, G)
                 and var.shape == (V, G) and count.shape == (V,)
                 and (not masked or mask2.shape == (N, L)))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        agree = False
    if not agree:
        raise ValueError(_FOREIGN_SAVED)


_FOREIGN_SAVED = ("saved does not belong to this norm: pass backward_saved what this norm's "
                  "forward_saved returned")


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------

#: ``Norm._known`` before the first check (or after a setting changed): matches no arrays.
_UNCHECKED = (None,)


class _Arrays(dict):
    """A norm's ``params``, ``grads`` or ``state``: a dict that notes in ``changed`` when an
    entry is set or removed, so the norm checks its arrays again only then."""

    __slots__ = ("changed",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.changed = True

    def __setitem__(self, key, value):
        self.changed = True
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.changed = True
        super().__delitem__(key)

    def __reduce__(self):                      # a copy starts changed: its norm checks it
        return type(self), (dict(self),)

    def __ior__(self, other):
        self.changed = True
        return super().__ior__(other)

    def _changing(name):
        def method(self, *args, **kwargs):
            self.changed = True
            return getattr(dict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    pop, popitem, clear, update, setdefault = map(
        _changing, ("pop", "popitem", "clear", "update", "setdefault"))
    del _changing


class Norm:
    """Base class: ``forward(x, training)``, ``backward(dy)``, ``params``, ``grads``, ``state``.

    Subclasses implement ``_check(x, training)`` (raise on bad input), ``_forward(x, training,
    mask, out)`` returning ``(y, saved, commit)`` and ``_backward(dy, saved, out)`` returning
    ``(dx, grads)``. ``commit`` (a callable or None) writes the new state; it runs only after
    the kernel succeeded, so a refused or failed call leaves the state as it was. A subclass
    with checks of its own overrides ``forward_saved`` (ending in ``return self._run(...)``),
    not ``forward``: ``forward`` keeps what ``forward_saved`` returns.

    ``_check`` may depend only on x's shape, ``training`` and the norm's settings: it runs once
    per input signature (x.shape, training), whose ``_plan`` (what the forward derives from the
    shape) ``_plans`` keeps; setting a public attribute other than a per-call setting forgets
    them. Views of the params/state arrays (``_refresh_views``) are made when ``_check_owned``
    accepts new arrays. The per-call checks (x's type and dtype, mask, out, owned arrays, finite
    params) run on every call.
    """

    name = "norm"
    #: Whether ``forward`` takes ``mask=`` (the batch-statistics norms).
    takes_mask = False
    #: Settings read afresh by every call; setting any other public attribute (``axis``,
    #: ``virtual_batch_size``, ``num_groups``...) forgets the checked signatures and views.
    _per_call_settings = frozenset({"eps", "momentum", "running_average", "r_max", "d_max",
                                    "last_r", "last_d", "workspace"})
    #: Whether forward/backward write into arrays the norm owns (see the module docstring).
    workspace = False

    def __init__(self, dtype=np.float32):
        self.dtype = _check_dtype(dtype)
        self.params: dict[str, np.ndarray] = _Arrays()
        self.grads: dict[str, np.ndarray] = _Arrays()
        self.state: dict[str, np.ndarray] = _Arrays()
        self._saved = None                     # what backward needs, from the last forward
        self._known: tuple = _UNCHECKED        # the params/grads/state arrays last checked
        self._plans: dict = {}                 # (x.shape, training) checked -> self._plan(x)
        self._buffers: dict = {}               # "y", "dx": the workspace's output arrays

    def __setattr__(self, name, value):
        if name[0] != "_" and name not in self._per_call_settings:
            self.__dict__["_plans"] = {}       # check every signature again with the new setting
            self.__dict__["_known"] = _UNCHECKED   # and rebuild the views of params and state
            if name in ("params", "grads", "state") and not isinstance(value, _Arrays):
                value = _Arrays(value)         # a dict assigned whole: watched as the norm's own
        object.__setattr__(self, name, value)

    # copy.deepcopy and pickle copy a view as an array of its own, cut off from the array it
    # viewed: a copy checks its arrays again, which makes its own views (_refresh_views).
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_known": _UNCHECKED, "_buffers": {}}

    def _add_param(self, key: str, value: np.ndarray) -> None:
        self.params[key] = np.array(value, dtype=self.dtype)
        self.grads[key] = np.zeros_like(self.params[key])

    # -- public ------------------------------------------------------------------------------
    def forward(self, x: np.ndarray, training: bool, *, mask=None, out=None) -> np.ndarray:
        """Normalize ``x``; in training mode update ``state``. Returns an array of x's dtype
        (``out`` if given). ``mask``: see the module docstring."""
        buffer = self._buffer("y", x, x) if out is None and self.workspace else None
        y, self._saved = self.forward_saved(x, training, mask=mask,
                                            out=out if buffer is None else buffer)
        if buffer is not None:
            self.__dict__.setdefault("_buffers", {})["y"] = buffer
        return y

    def forward_saved(self, x: np.ndarray, training: bool, *, mask=None, out=None):
        """``forward`` that keeps nothing in the norm: returns ``(y, saved)``, ``saved`` being
        what :meth:`backward_saved` needs (a tuple of arrays and scalars; arrays may be views
        of ``x``). ``state`` is updated as by ``forward``. For callers that keep several
        forwards in flight, such as the PyTorch bridge (``normkit.torch``)."""
        if training is not True and training is not False:
            training = _check_bool("training", training)
        x = self._check_array("x", x)
        if (x.shape, training) not in self._plans:
            self._check_signature(x, training)
        if mask is not None and not self.takes_mask:
            raise TypeError(f"{type(self).__name__} takes no mask: masks are for the "
                            f"batch-statistics norms (batch, ghost, renorm, recurrent_batch)")
        self._check_owned()
        self._check_params()
        return self._run(x, training, mask, out)

    def _run(self, x, training, mask, out):
        """The checked call: compute, then commit the new state; returns ``(y, saved)``."""
        y, saved, commit = self._forward(x, training, mask, out)
        if commit is not None:
            commit()
        return y, saved

    def backward(self, dy: np.ndarray, *, out=None) -> np.ndarray:
        """Gradient of the last forward: fills ``grads`` and returns dL/dx (``out`` if given)."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        x = self._saved[0]
        buffer = self._buffer("dx", x, x, dy) if out is None and self.workspace else None
        dx, grads = self.backward_saved(dy, self._saved, out=out if buffer is None else buffer)
        for key, value in grads.items():
            self.grads[key][...] = value
        if buffer is not None:
            self.__dict__.setdefault("_buffers", {})["dx"] = buffer
        return dx

    def _buffer(self, key: str, like, *inputs):
        """The workspace's output array ``key`` for a result shaped as ``like``: the one kept if
        it has that shape and overlaps none of ``inputs``, else a new one (kept by the caller
        once the call succeeded). None for a non-array (the call's checks then refuse it)."""
        if not all(isinstance(a, np.ndarray) for a in (like, *inputs)):
            return None
        buffer = self.__dict__.get("_buffers", {}).get(key)
        if buffer is None or buffer.shape != like.shape \
                or any(np.may_share_memory(buffer, a) for a in inputs):
            buffer = np.empty(like.shape, self.dtype)
        return buffer

    def backward_saved(self, dy: np.ndarray, saved, *, out=None):
        """Gradients of the forward that returned ``saved`` (:meth:`forward_saved`):
        ``(dL/dx, {key: dL/dparams[key]})``, the parameter gradients shaped as ``params`` (dtype
        float64 or the norm's). Writes nothing into the norm (``grads`` stays as it was)."""
        shape = saved[0].shape
        dy = self._check_array("dy", dy)
        if dy.shape != shape:
            raise ValueError(f"dy must have the shape of the last forward's x {shape}, got {dy.shape}")
        self._check_owned()
        if saved is self._saved:
            dx, grads = self._backward(dy, saved, out)
        else:                                  # the caller's: it may not be this norm's at all
            try:
                dx, grads = self._backward(dy, saved, out)
            except (IndexError, TypeError, AttributeError) as error:
                raise ValueError(_FOREIGN_SAVED) from error
        return dx, {key: value.reshape(self.params[key].shape) for key, value in grads.items()}

    # -- checks ------------------------------------------------------------------------------
    def _check_signature(self, x: np.ndarray, training: bool) -> None:
        """Run ``_check`` on a new (x.shape, training) and keep what ``_plan`` derives from it
        (a training loop sees a few signatures)."""
        self._check(x, training)
        if len(self._plans) > 16:
            self._plans.clear()
        self._plans[x.shape, training] = self._plan(x, training)

    def _plan(self, x: np.ndarray, training: bool):
        """What the forward of this (x.shape, training) needs from the shape (None: nothing)."""
        return None

    def _check_array(self, name: str, a) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.dtype != self.dtype:
            if a.dtype.kind != "f":
                raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
            raise TypeError(
                f"{name} has dtype {a.dtype} but this {type(self).__name__} holds {self.dtype} "
                f"parameters; build it with dtype=np.{a.dtype} or cast {name}")
        if a.flags.c_contiguous and a.flags.writeable:
            return a
        return np.array(a, order="C")          # Fortran order, negative strides, read-only

    def _check_owned(self) -> None:
        """Every params/grads/state array still has the shape and dtype the kernels index with
        (an array replaced from outside is checked once, then trusted while it stays)."""
        params, grads, state = self.params, self.grads, self.state
        if not (params.changed or grads.changed or state.changed) \
                and self._known is not _UNCHECKED:
            return                             # no entry set since the last check
        current = (*params.values(), *grads.values(), *state.values())
        known = self._known                    # the arrays themselves: an id could be reused
        if len(current) == len(known) and all(map(operator.is_, current, known)):
            params.changed = grads.changed = state.changed = False
            return
        if not hasattr(self, "_spec"):
            self._spec = {("params", k): (v.shape, v.dtype) for k, v in self.params.items()}
            self._spec.update({("grads", k): (v.shape, v.dtype) for k, v in self.grads.items()})
            self._spec.update({("state", k): (v.shape, v.dtype) for k, v in self.state.items()})
        for (where, key), (shape, dtype) in self._spec.items():
            value = getattr(self, where).get(key)
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype \
                    or not value.flags.c_contiguous or not value.flags.writeable:
                got = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                       else type(value).__name__)
                raise ValueError(
                    f"{where}[{key!r}] must be a writeable C-contiguous {dtype} array of shape "
                    f"{shape}, got {got}; write into the array (a[...] = value) instead of "
                    f"replacing it")
        self._refresh_views()
        self._known = current
        params.changed = grads.changed = state.changed = False

    def _refresh_views(self) -> None:
        """Views of the params/state arrays for the kernels, made when ``_check_owned`` accepts
        a new set of arrays (valid while the same arrays stay)."""
        self._flat_params = tuple((key, value.reshape(-1)) for key, value in self.params.items())

    def _reshape_state(self) -> None:
        """Forget the checked shapes (a norm that changes its own arrays, e.g. grows)."""
        self.__dict__.pop("_spec", None)
        self._known = _UNCHECKED

    def _check_params(self) -> None:
        for key, flat in self._flat_params:    # views of params, made by _check_owned
            if not _engine.all_finite(flat):
                raise ValueError(f"params[{key!r}] contains NaN or inf; refusing to normalize with it")

    def _check(self, x: np.ndarray, training: bool) -> None:
        pass

    def _forward(self, x, training, mask, out):
        raise NotImplementedError

    def _backward(self, dy, saved, out):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()}, dtype={self.dtype.name})"

    def _describe(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------------
# Norms on the engine: a view (x4, B), per-channel gamma2/beta2 (G, K), and the engine calls
# ---------------------------------------------------------------------------------------------

class _EngineNorm(Norm):
    """A norm computed by the statistics engine. Subclasses give the view of x per input
    signature (``_plan``) and ``_affine_views()`` -> (gamma2, beta2), kept in ``_affine2``
    while the params arrays stay; ``centered`` (False: RMS)."""

    centered = True

    def _refresh_views(self):
        super()._refresh_views()
        self._affine2 = self._affine_views()

    def _affine_views(self):
        raise NotImplementedError

    def _statistics(self, x4, B):
        V, G = x4.shape[0] // B, x4.shape[1]
        return np.empty((V, G)), np.empty((V, G)), np.empty(V)

    def _mask2(self, mask, x4, mask_shape):
        if mask is None:
            return _engine.NO_MASK, False
        return check_mask(mask, mask_shape, "x.shape without the channel axis").reshape(
            x4.shape[0], x4.shape[3]), True

    def _run_forward(self, x, x4, B, mask2, masked, out, mean, var, count, mode, gamma2, beta2):
        y = check_out(out, x.shape, self.dtype, x)
        _engine.run_forward(x4, B, gamma2, beta2, self.eps, self.centered, mask2, masked,
                        y.reshape(x4.shape), mean, var, count, mode)
        return y

    def _run_backward(self, dy, saved, out, gamma2, frozen):
        x, x4, B, mean, var, count, mask2, masked = saved[:8]
        if saved is not self._saved:           # a caller's saved (backward_saved): checked
            _check_saved(x, x4, B, gamma2, mean, var, count, mask2, masked, self.dtype)
        dx = check_out(out, x.shape, self.dtype, x, dy)
        G, K = x4.shape[1], x4.shape[2]
        dgamma, dbeta = np.empty((G, K)), np.empty((G, K))
        _engine.run_backward(dy.reshape(x4.shape), x4, B, gamma2, mean, var, count, self.eps,
                         self.centered, frozen, mask2, masked, dx.reshape(x4.shape), dgamma, dbeta)
        return dx, dgamma, dbeta


class _ChannelNorm(_EngineNorm):
    """Shared by the norms that take (N, C, *spatial) (or the channel at ``axis``) with
    per-channel gamma/beta."""

    def __init__(self, num_features, *, eps=1e-5, affine=True, axis=1, dtype=np.float32):
        super().__init__(dtype)
        self.num_features = _check_positive_int("num_features", num_features)
        self.eps = _check_eps(eps)
        self.affine = _check_bool("affine", affine)
        self.axis = _check_axis(axis)
        self._splits: dict = {}
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

    def _affine_views(self):
        """gamma, beta as (C, 1): one statistics group per channel."""
        C = self.num_features
        return self._gamma.reshape(C, 1), self._beta.reshape(C, 1)

    def _channel_axis(self, x) -> int:
        return self.axis % x.ndim

    def _check(self, x, training):
        if x.ndim < 2:
            raise ValueError(f"x must be (N, C) or (N, C, *spatial) (channels at axis={self.axis}), "
                             f"got shape {x.shape}")
        if not -x.ndim <= self.axis < x.ndim or self.axis % x.ndim == 0:
            raise ValueError(f"axis={self.axis} must name a channel axis of x other than the "
                             f"batch axis 0; x.shape = {x.shape}")
        axis = self._channel_axis(x)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"x has {x.shape[axis]} channels (axis {self.axis}) but this {type(self).__name__} "
                f"was built with num_features={self.num_features}; x.shape = {x.shape}")
        if x.size == 0:
            raise ValueError(f"x is empty: shape {x.shape}")

    def _split(self, x):
        """(pre, C, post): the sizes before, at and after the channel axis, and the mask shape
        (kept per input shape: a training loop sees a few)."""
        split = self._splits.get(x.shape)
        if split is None:
            if len(self._splits) > 16:
                self._splits.clear()
            axis = self._channel_axis(x)
            pre = math.prod(x.shape[:axis])
            post = math.prod(x.shape[axis + 1:])
            split = self._splits[x.shape] = (pre, x.shape[axis], post,
                                             x.shape[:axis] + x.shape[axis + 1:])
        return split

    def _describe(self):
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}{axis}"


@register("batch")
class BatchNorm(_ChannelNorm):
    """Batch norm (Ioffe & Szegedy, 2015), PyTorch semantics, on (N, C) or (N, C, *spatial)
    (or channels at ``axis``, e.g. ``axis=-1`` for (N, *spatial, C)).

    Training normalizes with the biased batch variance; ``running_var`` stores the unbiased one.
    ``momentum`` is the weight of the new batch (PyTorch's 0.1 is Keras' 0.9);
    ``running_average="cumulative"`` averages all batches equally (PyTorch's momentum=None).
    With ``track_running_stats=False`` both modes use the batch statistics and ``state`` is empty.
    Backward after ``forward(x, training=False)`` treats the running statistics as constants
    (fine-tuning with frozen statistics). ``forward(x, training, mask=m)`` leaves out the
    positions where ``m`` is False (see the module docstring).
    """

    takes_mask = True

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, running_average="exponential",
                 affine=True, track_running_stats=True, axis=1, dtype=np.float32):
        super().__init__(num_features, eps=eps, affine=affine, axis=axis, dtype=dtype)
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

    def _uses_batch_stats(self, training: bool) -> bool:
        return training or not self.track_running_stats

    def _rows_per_statistic(self, x, pre) -> int:
        """B: rows of the (pre, C, 1, post) view per statistics group (all of them)."""
        return pre

    def _check(self, x, training):
        super()._check(x, training)
        if self._uses_batch_stats(training):
            pre, C, post, _ = self._split(x)
            B = self._rows_per_statistic(x, pre)
            if B * post < 2:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size "
                    f"{x.shape}")

    def _plan(self, x, training):
        """The (pre, C, 1, post) view's shape, B and the mask shape; whether the call takes
        batch statistics."""
        pre, C, post, mask_shape = self._split(x)
        return ((pre, C, 1, post), self._rows_per_statistic(x, pre), mask_shape,
                self._uses_batch_stats(training))

    def _refresh_views(self):
        super()._refresh_views()
        state = self.state
        self._running2 = ((state["running_mean"].reshape(1, -1),      # (1, C) as the engine's
                           state["running_var"].reshape(1, -1),       # (S, G), S = 1 slot
                           state["num_batches_tracked"].reshape(1))
                          if self.track_running_stats else None)

    def _check_counts(self, count, masked):
        if masked and np.any(count == 1):
            raise ValueError("Expected more than 1 valid value per channel when training, got 1 "
                             "unmasked position (a batch with no valid position is skipped)")

    def _forward(self, x, training, mask, out):
        view, B, mask_shape, batch_stats = self._plans[x.shape, training]
        x4 = x.reshape(view)
        mask2, masked = self._mask2(mask, x4, mask_shape)
        gamma2, beta2 = self._affine2
        if not batch_stats:
            running_mean, running_var, _ = self._running2
            mean = running_mean.astype(np.float64)
            var = running_var.astype(np.float64)
            count = np.zeros(1)
            y = self._run_forward(x, x4, x4.shape[0], mask2, masked, out, mean, var, count,
                                  _engine.APPLY_ONLY, gamma2, beta2)
            return y, (x, x4, x4.shape[0], mean, var, count, mask2, masked, True), None
        mean, var, count = self._statistics(x4, B)
        if masked:                             # refuse before anything is written
            _engine.count_valid(mask2, True, B, 1, x4.shape[3], count)
            self._check_counts(count, masked)
        y, commit, extra = self._train_forward(x, x4, B, mask2, masked, out, mean, var, count,
                                               training, gamma2, beta2)
        return y, (x, x4, B, mean, var, count, mask2, masked, False, *extra), commit

    def _train_forward(self, x, x4, B, mask2, masked, out, mean, var, count, training, gamma2,
                       beta2):
        """y with the batch statistics, the state commit, and what backward needs beyond them."""
        y = self._run_forward(x, x4, B, mask2, masked, out, mean, var, count,
                              _engine.STATS_AND_APPLY, gamma2, beta2)
        return y, self._commit(mean, var, count, training), ()

    #: Ghost batch norm: the running statistics take the mean over the virtual batches.
    _pooled = False

    def _commit(self, mean, var, count, training):
        if not (training and self.track_running_stats):
            return None

        def commit():                          # a group with no valid value updates nothing
            running_mean, running_var, tracked = self._running2
            _engine.running_update(running_mean, running_var, tracked, mean, var, count,
                                   self.momentum, self.running_average == "cumulative",
                                   self._pooled)
        return commit

    def _backward(self, dy, saved, out):
        dx, dgamma, dbeta = self._run_backward(dy, saved, out, self._affine2[0],
                                               frozen=saved[8])
        return dx, self._affine_grads(dgamma, dbeta)

    def _describe(self):
        return (f"{super()._describe()}, momentum={self.momentum}, "
                f"running_average={self.running_average!r}, "
                f"track_running_stats={self.track_running_stats}")


@register("ghost")
class GhostBatchNorm(BatchNorm):
    """Ghost batch norm (Hoffer et al., 2017): batch norm on disjoint virtual batches of
    ``virtual_batch_size`` samples along axis 0 (it must divide N), parameters and running
    statistics shared.

    The running statistics are updated once per call with the mean over virtual batches of
    their means and of their unbiased variances; evaluation uses them as batch norm does.
    """

    def __init__(self, num_features, virtual_batch_size, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = _check_positive_int("virtual_batch_size", virtual_batch_size)

    _pooled = True

    def _rows_per_statistic(self, x, pre):
        return self.virtual_batch_size * (pre // x.shape[0])

    def _check(self, x, training):
        _ChannelNorm._check(self, x, training)
        if not self._uses_batch_stats(training):
            return
        if x.shape[0] % self.virtual_batch_size:
            raise ValueError(
                f"virtual_batch_size={self.virtual_batch_size} must divide the batch size, "
                f"got a batch of {x.shape[0]} (x.shape = {x.shape})")
        pre, C, post, _ = self._split(x)
        if self._rows_per_statistic(x, pre) * post < 2:
            raise ValueError(
                f"Expected more than 1 value per channel in each virtual batch when training, "
                f"got input size {x.shape} with virtual_batch_size={self.virtual_batch_size}")

    def _check_counts(self, count, masked):
        if masked and np.any(count < 2):
            raise ValueError("Expected more than 1 valid value per channel in every virtual batch "
                             "when training")

    def _describe(self):
        return f"{super()._describe()}, virtual_batch_size={self.virtual_batch_size}"


@register("renorm")
class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with sigma = sqrt(running_var + eps); r and d carry no gradient. ``r_max``/``d_max`` may be
    changed between steps (the paper starts at 1 and 0 — plain batch norm — and relaxes them to
    3 and 5, the defaults here); the schedule belongs to the training loop. Running statistics
    and evaluation are batch norm's. The last step's r and d are kept in ``last_r``/``last_d``.
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

    def _train_forward(self, x, x4, B, mask2, masked, out, mean, var, count, training, gamma2,
                       beta2):
        _engine.run_forward(x4, B, gamma2, beta2, self.eps, True, mask2, masked, x4, mean, var,
                            count, _engine.STATS_ONLY)
        r, d = _renorm.correction(mean[0], var[0], self.state["running_mean"],
                                  self.state["running_var"], self.eps, self.r_max, self.d_max)
        gamma_r = (gamma2[:, 0] * r).astype(self.dtype).reshape(-1, 1)
        beta_d = (beta2[:, 0] + gamma2[:, 0] * d).astype(self.dtype).reshape(-1, 1)
        y = self._run_forward(x, x4, B, mask2, masked, out, mean, var, count, _engine.APPLY_ONLY,
                              gamma_r, beta_d)
        update = self._commit(mean, var, count, training)

        def commit():
            self.last_r, self.last_d = r, d
            update()
        return y, commit, (r, d, gamma_r)

    def _backward(self, dy, saved, out):
        if saved[8]:                           # evaluation: batch norm's
            return super()._backward(dy, saved, out)
        r, d, gamma_r = saved[9:]
        dx, dgamma_b, dbeta = self._run_backward(dy, saved, out, gamma_r, frozen=False)
        dgamma = r * dgamma_b[:, 0] + d * dbeta[:, 0]       # r, d constants; beta' = beta + gamma d
        return dx, self._affine_grads(dgamma, dbeta[:, 0])

    def _describe(self):
        return f"{super()._describe()}, r_max={self.r_max}, d_max={self.d_max}"


@register("group")
class GroupNorm(_ChannelNorm):
    """Group norm (Wu & He, 2018): statistics per (sample, group of C / num_groups channels),
    per-channel gamma/beta; x is (N, C, *spatial) (or channels at ``axis``). Same computation in
    training and evaluation. ``GroupNorm(C, num_groups=1)`` is layer norm over (C, *spatial);
    ``num_groups=C`` is instance norm."""

    def __init__(self, num_features, num_groups, *, eps=1e-5, affine=True, axis=1,
                 dtype=np.float32):
        num_groups = _check_positive_int("num_groups", num_groups)
        super().__init__(num_features, eps=eps, affine=affine, axis=axis, dtype=dtype)
        if self.num_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_features={self.num_features}")
        self.num_groups = num_groups

    def _affine_views(self):
        """gamma, beta as (G, C/G): one statistics group per group of channels."""
        G = self.num_groups
        return (self._gamma.reshape(G, self.num_features // G),
                self._beta.reshape(G, self.num_features // G))

    def _plan(self, x, training):
        """The (N * S_before, G, C/G, S_after) view's shape and B."""
        pre, C, post, _ = self._split(x)
        G = self.num_groups
        return (pre, G, C // G, post), pre // x.shape[0]

    def _forward(self, x, training, mask, out):
        view, B = self._plans[x.shape, training]
        x4 = x.reshape(view)
        mean, var, count = self._statistics(x4, B)
        gamma2, beta2 = self._affine2
        y = self._run_forward(x, x4, B, _engine.NO_MASK, False, out, mean, var, count,
                              _engine.STATS_AND_APPLY, gamma2, beta2)
        return y, (x, x4, B, mean, var, count, _engine.NO_MASK, False, gamma2), None

    def _backward(self, dy, saved, out):
        dx, dgamma, dbeta = self._run_backward(dy, saved, out, saved[8], frozen=False)
        return dx, self._affine_grads(dgamma, dbeta)

    def _describe(self):
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return (f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
                f"affine={self.affine}{axis}")


@register("instance")
class InstanceNorm(GroupNorm):
    """Instance norm: group norm with one channel per group (statistics per sample and channel
    over the spatial axes), per-channel gamma/beta (``affine=True`` by default, unlike PyTorch's
    InstanceNorm). Needs more than one spatial element, as in PyTorch."""

    def __init__(self, num_features, *, eps=1e-5, affine=True, axis=1, dtype=np.float32):
        super().__init__(num_features, num_features, eps=eps, affine=affine, axis=axis,
                         dtype=dtype)

    def _check(self, x, training):
        super()._check(x, training)
        if x.size // (x.shape[0] * self.num_features) < 2:
            raise ValueError(f"Expected more than 1 spatial element for instance norm, got input "
                             f"size {x.shape}")

    def _describe(self):
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}{axis}"


class _TrailingNorm(_EngineNorm):
    """Shared by layer and RMS norm: statistics per row over the trailing ``num_features`` axes
    (an int or a tuple, PyTorch's ``normalized_shape``)."""

    def __init__(self, num_features, *, eps=1e-5, dtype=np.float32):
        super().__init__(dtype)
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

    def _gamma_beta(self):
        raise NotImplementedError

    def _affine_views(self):
        """gamma, beta as (1, D): one group of D features."""
        gamma, beta = self._gamma_beta()
        D = math.prod(self.normalized_shape)
        return gamma.reshape(1, D), beta.reshape(1, D)

    def _plan(self, x, training):
        """The (R, 1, D, 1) view's shape."""
        D = math.prod(self.normalized_shape)
        return x.size // D, 1, D, 1

    def _forward(self, x, training, mask, out):
        x4 = x.reshape(self._plans[x.shape, training])   # (R, 1, D, 1)
        mean, var, count = self._statistics(x4, 1)
        gamma2, beta2 = self._affine2
        y = self._run_forward(x, x4, 1, _engine.NO_MASK, False, out, mean, var, count,
                              _engine.STATS_AND_APPLY, gamma2, beta2)
        return y, (x, x4, 1, mean, var, count, _engine.NO_MASK, False), None

    def _backward(self, dy, saved, out):
        dx, dgamma, dbeta = self._run_backward(dy, saved, out, self._affine2[0], frozen=False)
        return dx, self._grads(dgamma.reshape(self.normalized_shape),
                               dbeta.reshape(self.normalized_shape))


@register("layer")
class LayerNorm(_TrailingNorm):
    """Layer norm (Ba et al., 2016) over the trailing ``num_features`` axes, per-element
    gamma/beta of that shape; same computation in training and evaluation."""

    def __init__(self, num_features=None, *, normalized_shape=None, eps=1e-5, affine=True,
                 dtype=np.float32):
        if (num_features is None) == (normalized_shape is None):
            raise ValueError("give the normalized shape once: as num_features or as normalized_shape")
        super().__init__(normalized_shape if num_features is None else num_features, eps=eps,
                         dtype=dtype)
        self.affine = _check_bool("affine", affine)
        if self.affine:
            self._add_param("gamma", np.ones(self.normalized_shape))
            self._add_param("beta", np.zeros(self.normalized_shape))
        else:
            D = math.prod(self.normalized_shape)
            self._fixed = (np.ones(D, self.dtype), np.zeros(D, self.dtype))

    def _gamma_beta(self):
        return (self.params["gamma"], self.params["beta"]) if self.affine else self._fixed

    def _grads(self, dgamma, dbeta):
        return {"gamma": dgamma, "beta": dbeta} if self.affine else {}

    def _describe(self):
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.affine}"


@register("rms")
class RMSNorm(_TrailingNorm):
    """RMS norm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * gamma over the
    trailing ``num_features`` axes; a gain, no centering and no bias."""

    centered = False

    def __init__(self, num_features=None, *, normalized_shape=None, eps=1e-5, dtype=np.float32):
        if (num_features is None) == (normalized_shape is None):
            raise ValueError("give the normalized shape once: as num_features or as normalized_shape")
        super().__init__(normalized_shape if num_features is None else num_features, eps=eps,
                         dtype=dtype)
        self._add_param("gamma", np.ones(self.normalized_shape))
        self._zero_beta = np.zeros(math.prod(self.normalized_shape), self.dtype)

    def _gamma_beta(self):
        return self.params["gamma"], self._zero_beta

    def _grads(self, dgamma, dbeta):
        return {"gamma": dgamma}

    def _describe(self):
        return f"{self.normalized_shape}, eps={self.eps}"


@register("none")
class Identity(Norm):
    """No normalization, so a study can include it by name: y = x, dx = dy (copies)."""

    def __init__(self, num_features=None, *, dtype=np.float32):
        super().__init__(dtype)
        self.num_features = num_features

    def _forward(self, x, training, mask, out):
        y = check_out(out, x.shape, self.dtype, x)
        y[...] = x
        return y, (x,), None

    def _backward(self, dy, saved, out):
        dx = check_out(out, dy.shape, self.dtype, dy)
        dx[...] = dy
        return dx, {}

    def _describe(self):
        return f"{self.num_features}"
