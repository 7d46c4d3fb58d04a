"""normkit from PyTorch: every normkit norm as a ``torch.nn.Module`` (needs the ``torch`` extra).

    import normkit.torch as nkt
    bn = nkt.BatchNorm2d(64)                       # torch's signature, torch's state_dict keys
    masked = nkt.make("batch", 64)                 # any name in normkit.available(), its options
    y = masked(x, mask=valid)                      # x (N, C, L), valid (N, L) bool
    lstm = nkt.LSTM(8, 32, norm="recurrent_batch", max_steps=50)

Forward and backward run normkit's Numba kernels through a ``torch.autograd.Function``: the
forward calls ``Norm.forward_saved`` and hands everything the backward needs to
``ctx.save_for_backward`` (tensors sharing memory with the arrays, no copy); the backward calls
``Norm.backward_saved`` with them. Nothing of a call is kept in the module, so a module used
several times in one step, or inside ``torch.utils.checkpoint``, gets the gradients of each use.
Double backward is not supported (the backward is ``once_differentiable``).

- ``module.train()`` / ``module.eval()`` select the mode. Parameters are ``weight``/``bias``
  (normkit's gamma/beta, other keys by their normkit names), buffers are normkit's ``state`` keys
  (``running_mean``, ``running_var``, ``num_batches_tracked``): ``load_state_dict`` works both
  ways with ``torch.nn.BatchNorm2d``/``LayerNorm``/``GroupNorm``. The kernels read and write the
  module's tensors in place (NumPy views of them): ``module.double()``, ``load_state_dict`` and
  an optimizer's in-place step are seen by the next call.
- Tensors: CPU, ``torch.float32`` or ``torch.float64``, any strides. A tensor becomes an array
  with ``tensor.detach().numpy()`` and a result a tensor with ``torch.from_numpy`` (no copy);
  a channels_last tensor (``torch.channels_last``, or any (N, *spatial, C)-contiguous layout)
  goes to batch, ghost, renorm, group and instance norm as it lies in memory (their ``axis=-1``
  kernels) and comes back channels_last, as torch's; another non-contiguous input is copied
  once to C order by the norm's input check. Other devices and dtypes are refused with a
  ``TypeError`` naming what is supported.
- Threads: torch (its OpenMP pool), Numba (its own OpenMP pool) and, for the LSTM, NumPy's and
  SciPy's OpenBLAS (two more pools) run in one process. Each bridge call sets the Numba threads
  (``numba.set_num_threads``) and restores the previous count afterwards:

  - a norm's call runs with ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)`` threads (its
    kernels do one large parallel pass over channels per call);
  - an LSTM call runs with 1 Numba thread and 1 BLAS thread (``threadpoolctl``, installed with
    the ``torch`` extra; without it the BLAS pools keep their size — set
    ``OPENBLAS_NUM_THREADS``): the fused kernels open a small parallel region at every time
    step, and each one waited for cores that torch's OpenMP workers, spinning after torch's own
    ops, were holding. Measured on 2 cores (``benchmarks/torch_bridge.py``): a BN-LSTM
    classifier step took 140 ms with 2 Numba/BLAS threads and 19 ms with 1 (torch's own
    BN-LSTM: 87 ms).

  :func:`set_num_threads` fixes one number for both kinds of call (None: back to this policy).
"""
from __future__ import annotations

import numbers
import operator

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import norms as _norms
from . import recurrent as _recurrent  # noqa: F401  (registers "recurrent_batch")
from .nn.lstm import LSTM as _NormkitLSTM

__all__ = [
    "make", "NormModule", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
    "InstanceNorm1d", "InstanceNorm2d", "RMSNorm", "LSTM", "get_num_threads", "set_num_threads",
]

SUPPORTED = "CPU tensors of dtype torch.float32 or torch.float64"
_NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
#: normkit parameter names -> torch's (others keep their normkit names).
_TORCH_NAMES = {"gamma": "weight", "beta": "bias"}

# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------

_fixed_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Numba (and, for the LSTM, BLAS) threads of every bridge call: an int in
    [1, NUMBA_NUM_THREADS], or None for the default policy (the module docstring)."""
    global _fixed_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) \
                or not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"n must be None or an integer in [1, NUMBA_NUM_THREADS = "
                             f"{numba.config.NUMBA_NUM_THREADS}], got {n!r}")
        n = int(n)
    _fixed_threads = n


def get_num_threads(kind: str = "norm") -> int:
    """The threads the next bridge call of ``kind`` ("norm" or "lstm") runs its kernels with."""
    if _fixed_threads is not None:
        return _fixed_threads
    if kind == "lstm":
        return 1
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _run_with_threads(n: int, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``n`` Numba threads, the previous count restored after."""
    previous = numba.get_num_threads()
    if n == previous:
        return fn(*args, **kwargs)
    numba.set_num_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        numba.set_num_threads(previous)


_blas = []                                 # [ThreadpoolController or None], made on first use


def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries (NumPy's, and SciPy's that Numba's
    np.dot calls), or None without threadpoolctl."""
    if not _blas:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba calls first)
            import threadpoolctl
            _blas.append(threadpoolctl.ThreadpoolController())
        except ImportError:
            _blas.append(None)
    return _blas[0]


def _run_lstm(fn, *args, **kwargs):
    """An LSTM call: Numba and the BLAS pools at ``get_num_threads("lstm")`` threads."""
    n = get_num_threads("lstm")
    controller = _blas_controller()
    if controller is None:
        return _run_with_threads(n, fn, *args, **kwargs)
    with controller.limit(limits=n, user_api="blas"):
        return _run_with_threads(n, fn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Tensors <-> arrays
# ---------------------------------------------------------------------------------------------

def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({SUPPORTED}), got {type(t).__name__}")
    if t.device.type != "cpu":
        raise TypeError(f"{name} is on device {t.device}: normkit.torch runs Numba CPU kernels and "
                        f"supports {SUPPORTED}; move it with {name}.cpu()")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}: normkit.torch supports dense {SUPPORTED}")
    if t.dtype not in _NUMPY_DTYPE:
        raise TypeError(f"{name} has dtype {t.dtype}: normkit.torch supports {SUPPORTED}; convert "
                        f"it with {name}.float() or {name}.double()")


def _array(name: str, t) -> np.ndarray:
    """The NumPy view of a checked float tensor (no copy, any strides)."""
    _check_tensor(name, t)
    return t.detach().numpy()


def _mask_array(mask) -> np.ndarray:
    if not isinstance(mask, torch.Tensor) or mask.device.type != "cpu" or mask.dtype != torch.bool:
        got = (f"{mask.dtype} on {mask.device}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise TypeError(f"mask must be a CPU torch.bool tensor (True where a position holds data), "
                        f"got {got}")
    return mask.detach().numpy()


def _pack(saved: tuple):
    """Split a norm's ``saved`` tuple into tensors for ``ctx.save_for_backward`` (every writeable
    array, as a tensor sharing its memory) and the layout to rebuild it: per item, ("t", i) or
    ("v", value) for scalars and read-only constants."""
    tensors, layout = [], []
    for item in saved:
        if type(item) is np.ndarray and item.flags.writeable:
            try:                               # not: negative strides, object dtype
                tensors.append(torch.from_numpy(item))
                layout.append(("t", len(tensors) - 1))
                continue
            except (TypeError, ValueError):
                pass
        layout.append(("v", item))
    return tensors, tuple(layout)


def _unpack(tensors, layout) -> tuple:
    return tuple(tensors[v].numpy() if kind == "t" else v for kind, v in layout)


# ---------------------------------------------------------------------------------------------
# The autograd function on Norm.forward_saved / Norm.backward_saved
# ---------------------------------------------------------------------------------------------

class _NormFunction(torch.autograd.Function):
    """y = norm(x) with the module's parameters as inputs (for their gradients)."""

    @staticmethod
    def forward(ctx, norm, param_keys, training, mask, x, *params):
        x_array = _array("x", x)
        mask_array = None if mask is None else _mask_array(mask)
        y, saved = _run_with_threads(get_num_threads(), norm.forward_saved, x_array, training,
                                     mask=mask_array)
        tensors, ctx.layout = _pack(saved)
        # x and the parameters too: torch then refuses a backward after they were changed in place
        ctx.save_for_backward(x, *params, *tensors)
        ctx.norm, ctx.param_keys = norm, param_keys
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved_tensors = ctx.saved_tensors
        params = saved_tensors[1:1 + len(ctx.param_keys)]
        saved = _unpack(saved_tensors[1 + len(ctx.param_keys):], ctx.layout)
        dx, grads = _run_with_threads(get_num_threads(), ctx.norm.backward_saved,
                                      _array("dy", dy), saved)
        param_grads = [torch.from_numpy(np.asarray(grads[key], _NUMPY_DTYPE[p.dtype]))
                       if key in grads else None for key, p in zip(ctx.param_keys, params)]
        return (None, None, None, None, torch.from_numpy(dx), *param_grads)


def _numpy_dtype(dtype) -> np.dtype:
    if dtype is None:
        dtype = torch.get_default_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype not in _NUMPY_DTYPE:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return _NUMPY_DTYPE[dtype]
    return _norms._check_dtype(dtype)


class NormModule(torch.nn.Module):
    """``normkit.make(name, *args, **options)`` as a torch module: ``forward(x, mask=None)``.

    ``dtype`` (torch or NumPy float32/float64; default torch's default dtype) is that of the
    parameters and buffers; ``module.double()``/``.float()`` switch it (a norm of that dtype is
    built on first use). ``mask`` is for the batch-statistics norms (batch, ghost, renorm,
    recurrent_batch): a bool tensor of x's shape without the channel axis ((T, N) for
    recurrent_batch). ``module.norm`` is the normkit ``Norm`` running the current dtype (e.g.
    ``module.norm.r_max = 1.0`` for a renorm schedule).
    """

    #: Number of input dimensions accepted (None: any); torch-named subclasses set it.
    _input_ndims: tuple | None = None

    def __init__(self, name: str, *args, dtype=None, device=None, **options):
        super().__init__()
        if device is not None and torch.device(device).type != "cpu":
            raise TypeError(f"device must be the CPU: normkit.torch runs Numba CPU kernels and "
                            f"supports {SUPPORTED}, got device={device}")
        self.norm_name = name
        self._args, self._options = args, options
        np_dtype = _numpy_dtype(dtype)
        norm = self._build(np_dtype)
        self._norms = {(np_dtype, False): norm}       # (dtype, channels_last) -> its Norm
        self._bound = {}                       # same keys -> the tensors its norm's arrays view
        # a channel norm at axis 1 also runs channels-last tensors in place, with axis=-1
        self._runs_channels_last = getattr(norm, "axis", None) == 1 and "axis" not in options
        self._param_keys = tuple(norm.params)
        for key, value in norm.params.items():
            self.register_parameter(_TORCH_NAMES.get(key, key),
                                    torch.nn.Parameter(torch.from_numpy(value.copy())))
        for key, value in norm.state.items():
            self.register_buffer(key, torch.from_numpy(value.copy()))

    # -- the normkit norm behind the module --------------------------------------------------
    def _options_for(self, np_dtype) -> dict:
        return self._options

    def _build(self, np_dtype, channels_last=False) -> _norms.Norm:
        options = self._options_for(np_dtype)
        if channels_last:
            options = {**options, "axis": -1}
        return _norms.make(self.norm_name, *self._args, dtype=np_dtype, **options)

    @staticmethod
    def _copy_settings(source: _norms.Norm, norm: _norms.Norm) -> None:
        """Scalar settings changed on ``module.norm`` (``r_max``, ``momentum``...) reach the
        module's other norms (channels-last; another dtype, except ``eps``, which may depend
        on the dtype)."""
        skip = ("axis",) if source.dtype == norm.dtype else ("axis", "eps")
        for k, v in vars(source).items():
            if k not in skip and isinstance(v, (bool, int, float, str)):
                setattr(norm, k, v)

    def _tensors(self):
        """(params, state): the module's tensors in the norm's key order."""
        parameters, buffers = self._parameters, self._buffers
        return ([parameters[_TORCH_NAMES.get(k, k)] for k in self._param_keys],
                [buffers[k] for k in self._state_keys()])

    def _state_keys(self):
        return tuple(self._norms[next(iter(self._norms))].state)

    def _dtype(self, x, params, state) -> np.dtype:
        floats = [t for t in (*params, *state) if t.is_floating_point()]
        if not floats:
            return _NUMPY_DTYPE[x.dtype]
        if floats[0].dtype not in _NUMPY_DTYPE:
            raise TypeError(f"this module's parameters and buffers are {floats[0].dtype}: "
                            f"normkit.torch supports {SUPPORTED}; convert the module with "
                            f".float() or .double()")
        if x.dtype != floats[0].dtype:
            raise TypeError(f"x has dtype {x.dtype} but this module's parameters and buffers are "
                            f"{floats[0].dtype}; convert x, or the module with .float() / "
                            f".double()")
        return _NUMPY_DTYPE[floats[0].dtype]

    def _norm_for(self, np_dtype, channels_last=False, tensors=None) -> _norms.Norm:
        """The norm of ``np_dtype`` (and layout), its params/state arrays viewing the module's
        tensors (``tensors``: ``_tensors()`` if the caller has them)."""
        key = (np_dtype, channels_last)
        norm = self._norms.get(key)
        if norm is None:
            norm = self._norms[key] = self._build(np_dtype, channels_last)
            self._copy_settings(next(iter(self._norms.values())), norm)
        elif channels_last and (np_dtype, False) in self._norms:
            self._copy_settings(self._norms[(np_dtype, False)], norm)
        params, state = self._tensors() if tensors is None else tensors
        pointers = tuple((t.data_ptr(), t.shape) for t in (*params, *state))
        bound = self._bound.get(key)
        if bound is None or bound[0] != pointers:
            for t in (*params, *state):
                if t.is_floating_point() or t.device.type != "cpu":
                    _check_tensor("each parameter and buffer of the module", t)
            for k, t in zip(self._param_keys, params):
                norm.params[k] = t.detach().numpy()
            for k, t in zip(self._state_keys(), state):
                norm.state[k] = t.detach().numpy()
            self._bound[key] = (pointers, tuple(norm.state.values()))
        return norm

    @property
    def norm(self) -> _norms.Norm:
        """The normkit Norm that runs this module's current dtype (channels-first layout; its
        scalar settings are copied to the channels-last one)."""
        params, state = self._tensors()
        floats = [t for t in (*params, *state) if t.is_floating_point()]
        return self._norm_for(_NUMPY_DTYPE[floats[0].dtype] if floats
                              else next(iter(self._norms))[0])

    def _sync_state(self, norm, key) -> None:
        """A norm that replaced a state array (recurrent_batch with grow=True): adopt it."""
        arrays = self._bound[key][1]
        if all(map(operator.is_, norm.state.values(), arrays)):
            return
        for k, array in norm.state.items():
            setattr(self, k, torch.from_numpy(array))
        self._bound.pop(key)

    # -- torch --------------------------------------------------------------------------------
    def forward(self, x, mask=None):
        _check_tensor("x", x)
        if self._input_ndims is not None and x.dim() not in self._input_ndims:
            raise ValueError(f"{type(self).__name__} expects {' or '.join(map(str, self._input_ndims))}"
                             f"-D input, got {x.dim()}-D input of shape {tuple(x.shape)}")
        tensors = self._tensors()
        params = tensors[0]
        dtype = self._dtype(x, *tensors)
        d = x.dim()
        if self._runs_channels_last and d >= 3 and not x.is_contiguous():
            last = x.permute(0, *range(2, d), 1)             # (N, *spatial, C)
            if last.is_contiguous():                         # channels_last: no copy
                norm = self._norm_for(dtype, True, tensors)
                y = _NormFunction.apply(norm, self._param_keys, self.training, mask, last, *params)
                self._sync_state(norm, (dtype, True))
                return y.permute(0, d - 1, *range(1, d - 1))
        norm = self._norm_for(dtype, False, tensors)
        y = _NormFunction.apply(norm, self._param_keys, self.training, mask, x, *params)
        self._sync_state(norm, (dtype, False))
        return y

    def extra_repr(self) -> str:
        return repr(next(iter(self._norms.values())))

    def _apply(self, fn, *args, **kwargs):
        """Module conversions (``.double()``, ``.to()``): checked on the next call."""
        result = super()._apply(fn, *args, **kwargs)
        self._bound.clear()
        return result


def make(name: str, num_features=None, /, *args, **options) -> NormModule:
    """The torch module of ``normkit.make(name, num_features, **options)`` for every name in
    ``normkit.available()``; ``dtype`` may be a torch dtype."""
    if name not in _norms.available():
        raise ValueError(f"unknown normalizer {name!r}; expected one of {_norms.available()}")
    return NormModule(name, num_features, *args, **options)


# ---------------------------------------------------------------------------------------------
# torch's names and signatures
# ---------------------------------------------------------------------------------------------

class _BatchNorm(NormModule):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        options = dict(eps=eps, affine=affine, track_running_stats=track_running_stats)
        if momentum is None:                   # torch: a cumulative average
            options["running_average"] = "cumulative"
        else:
            options["momentum"] = momentum
        super().__init__("batch", num_features, device=device, dtype=dtype, **options)


class BatchNorm1d(_BatchNorm):
    """``torch.nn.BatchNorm1d`` on normkit's kernels: (N, C) or (N, C, L); ``forward(x, mask=)``."""
    _input_ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """``torch.nn.BatchNorm2d`` on normkit's kernels: (N, C, H, W); ``forward(x, mask=)``."""
    _input_ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """``torch.nn.BatchNorm3d`` on normkit's kernels: (N, C, D, H, W); ``forward(x, mask=)``."""
    _input_ndims = (5,)


class LayerNorm(NormModule):
    """``torch.nn.LayerNorm`` on normkit's kernels (``bias=False`` is not supported)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        if not bias and elementwise_affine:
            raise NotImplementedError("normkit.torch.LayerNorm has no bias=False: normkit's layer "
                                      "norm has gamma and beta together (affine)")
        super().__init__("layer", normalized_shape, eps=eps, affine=elementwise_affine,
                         device=device, dtype=dtype)


class GroupNorm(NormModule):
    """``torch.nn.GroupNorm`` on normkit's kernels: (N, C, *)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__("group", num_channels, num_groups=num_groups, eps=eps, affine=affine,
                         device=device, dtype=dtype)


class _InstanceNorm(NormModule):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, device=None, dtype=None):
        if track_running_stats:
            raise NotImplementedError("normkit's instance norm keeps no running statistics: "
                                      "track_running_stats=True is not supported")
        super().__init__("instance", num_features, eps=eps, affine=affine, device=device,
                         dtype=dtype)


class InstanceNorm1d(_InstanceNorm):
    """``torch.nn.InstanceNorm1d`` on normkit's kernels: (N, C, L) (batched input only)."""
    _input_ndims = (3,)


class InstanceNorm2d(_InstanceNorm):
    """``torch.nn.InstanceNorm2d`` on normkit's kernels: (N, C, H, W) (batched input only)."""
    _input_ndims = (4,)


class RMSNorm(NormModule):
    """``torch.nn.RMSNorm`` on normkit's kernels; ``eps=None`` is torch's default,
    ``torch.finfo(dtype).eps`` (``elementwise_affine=False`` is not supported)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None):
        if not elementwise_affine:
            raise NotImplementedError("normkit's RMS norm always has its gain: "
                                      "elementwise_affine=False is not supported")
        self._eps = eps
        super().__init__("rms", normalized_shape, device=device, dtype=dtype)

    def _options_for(self, np_dtype):
        eps = float(np.finfo(np_dtype).eps) if self._eps is None else self._eps
        return {**self._options, "eps": eps}


# ---------------------------------------------------------------------------------------------
# The LSTM: normkit.nn.LSTM (plain, BN-LSTM, LN-LSTM) through its public interface
# ---------------------------------------------------------------------------------------------

class _LSTMFunction(torch.autograd.Function):
    """The LSTM through normkit.nn.LSTM's public forward/backward. That layer keeps what backward
    needs for its last forward only: the backward of an earlier call first replays that call's
    forward (same inputs, parameters and, in evaluation, running statistics; the running
    statistics are put back afterwards), as ``torch.utils.checkpoint`` does."""

    @staticmethod
    def forward(ctx, module, training, mask, lengths, x, h0, c0, *params):
        lstm = module.lstm
        # evaluation reads the running statistics: keep them for a replay
        ctx.state = None if training else {k: v.copy() for k, v in lstm.state.items()}
        ctx.noise = training and h0 is None and lstm.h0_noise_std > 0
        out = _LSTMFunction._forward(lstm, training, mask, lengths, x, h0, c0)
        ctx.token = module._pending = object()
        ctx.module, ctx.training, ctx.mask, ctx.lengths = module, training, mask, lengths
        ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
        # torch refuses the backward if any of them was changed in place since
        ctx.save_for_backward(x, h0, c0, *params)
        return torch.from_numpy(out)

    @staticmethod
    def _forward(lstm, training, mask, lengths, x, h0, c0):
        return _run_lstm(lstm.forward, _array("x", x), training, mask=mask, lengths=lengths,
                         h0=None if h0 is None else _array("h0", h0),
                         c0=None if c0 is None else _array("c0", c0))

    @staticmethod
    def _replay(ctx, x, h0, c0):
        if ctx.noise:
            raise RuntimeError(
                "normkit.torch.LSTM: this backward belongs to an earlier call of the module, which "
                "drew a random h0 (h0_noise_std > 0) that cannot be replayed; pass h0 explicitly "
                "to call the module several times before backward (or under checkpointing)")
        lstm = ctx.module.lstm
        state = lstm.state
        current = {k: v.copy() for k, v in state.items()}
        if ctx.state is not None and any(state[k].shape != v.shape for k, v in ctx.state.items()):
            raise RuntimeError("normkit.torch.LSTM: the running statistics grew since this call; "
                               "run its backward before training on longer sequences")
        try:
            for k, v in (ctx.state or {}).items():
                state[k][...] = v
            _LSTMFunction._forward(lstm, ctx.training, ctx.mask, ctx.lengths, x, h0, c0)
        finally:
            for k, v in current.items():
                state[k][...] = v
        ctx.module._pending = ctx.token

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        module = ctx.module
        x, h0, c0, *_ = ctx.saved_tensors
        if module._pending is not ctx.token:   # the layer holds another call's saved values
            _LSTMFunction._replay(ctx, x, h0, c0)
        lstm = module.lstm
        dx = _run_lstm(lstm.backward, _array("d_out", d_out))
        grads = [torch.from_numpy(lstm.grads[key].copy()) for key in module._param_keys]
        dh0 = torch.from_numpy(lstm.dh0.copy()) if ctx.has_h0 else None
        dc0 = torch.from_numpy(lstm.dc0.copy()) if ctx.has_c0 else None
        return (None, None, None, None, torch.from_numpy(dx), dh0, dc0, *grads)


class LSTM(torch.nn.Module):
    """``normkit.nn.LSTM`` (``norm`` = "none", "recurrent_batch" for the BN-LSTM, "layer" for the
    LN-LSTM) as a torch module: ``forward(x, mask=None, lengths=None, h0=None, c0=None)``.

    x is (T, N, input_size), or (N, T, input_size) with ``batch_first``; returns all hidden
    states (T, N, H) (batch_first: (N, T, H)), or the last (N, H) with
    ``return_sequences=False``. ``mask`` (bool (T, N), or (N, T) with batch_first) or ``lengths``
    (N,) mark the valid positions. Other options are normkit.nn.LSTM's (``max_steps``,
    ``per_step``, ``momentum``, ``eps``, ``gamma_init``, ``forget_bias``, ``seed``, ``dtype``...).

    Parameters keep normkit's names and layout, which differ from ``torch.nn.LSTM``:
    ``W_x`` (input_size, 4H) and ``W_h`` (H, 4H) multiply row vectors (``x_t @ W_x``; torch's
    ``weight_ih_l0`` is (4H, input_size), ``x_t @ weight_ih.T``), one bias ``b`` (4H,) (torch has
    ``bias_ih`` + ``bias_hh``), and the gate blocks along 4H are ordered (f, i, o, g) (torch:
    (i, f, g, o)). So ``weight_ih_l0 = W_x.T`` with its row blocks reordered [i, f, g, o] =
    W_x.T[[H:2H, 0:H, 3H:4H, 2H:3H]]; :meth:`torch_lstm_state_dict` does it for norm="none".
    Norm parameters: ``gamma_x``, ``gamma_h``, ``gamma_c``, ``beta_c`` (+ ``beta_x``, ``beta_h``
    for "layer"); buffers: the running statistics (``running_mean_x``, ...) per step.

    The parameters and buffers are the normkit layer's arrays (shared memory): an optimizer's
    in-place step reaches the kernels directly. The dtype is fixed at construction (``dtype``).
    normkit.nn.LSTM keeps the saved values of its last forward only: the backward of an earlier
    call (the module used several times in a step, ``torch.utils.checkpoint``, ``gradcheck``)
    first replays that call's forward (its cost once more) and then puts the running statistics
    back as they were. A call that drew a random h0 (``h0_noise_std`` > 0 in training without
    ``h0``) cannot be replayed: its backward then raises a ``RuntimeError``, never a wrong
    gradient.
    """

    def __init__(self, input_size, hidden_size, norm="none", batch_first=False, *, dtype=None,
                 **options):
        super().__init__()
        self.batch_first = bool(batch_first)
        self.lstm = _NormkitLSTM(input_size, hidden_size, norm=norm, dtype=_numpy_dtype(dtype),
                                 **options)
        self._param_keys = tuple(self.lstm.params)
        self._pending = None
        for key, value in self.lstm.params.items():
            self.register_parameter(key, torch.nn.Parameter(torch.from_numpy(value)))
        self._state_arrays = dict(self.lstm.state)
        for key, value in self._state_arrays.items():
            self.register_buffer(key, torch.from_numpy(value))

    def _bind(self) -> None:
        """Make the layer's arrays and the module's tensors one memory again after a module
        conversion or ``param.data = ...`` (values are copied into the layer's arrays)."""
        for key in self._param_keys:
            array, t = self.lstm.params[key], getattr(self, key)
            if t.data_ptr() != array.ctypes.data:
                if t.dtype != torch.from_numpy(array).dtype or t.shape != array.shape:
                    raise TypeError(f"parameter {key} is {t.dtype} {tuple(t.shape)} but this LSTM "
                                    f"was built for {array.dtype} {array.shape}; build a new "
                                    f"normkit.torch.LSTM with dtype=... instead of converting it")
                array[...] = t.detach().numpy()
                t.data = torch.from_numpy(array)
        for key, array in self.lstm.state.items():
            t = getattr(self, key)
            if array is not self._state_arrays.get(key) or t.data_ptr() != array.ctypes.data:
                if t.shape == array.shape and array is self._state_arrays.get(key):
                    array[...] = t.detach().numpy()       # a load_state_dict into a new tensor
                setattr(self, key, torch.from_numpy(array))
                self._state_arrays[key] = array

    def forward(self, x, mask=None, lengths=None, h0=None, c0=None):
        _check_tensor("x", x)
        dtype = self.lstm.dtype
        if _NUMPY_DTYPE[x.dtype] != dtype:
            raise TypeError(f"x has dtype {x.dtype} but this LSTM holds {dtype} parameters")
        self._bind()
        if self.batch_first:
            x = x.transpose(0, 1)
            if mask is not None:
                mask = mask.transpose(0, 1)
        mask_array = None if mask is None else np.ascontiguousarray(_mask_array(mask))
        if lengths is not None:
            lengths = (lengths.detach().cpu().numpy() if isinstance(lengths, torch.Tensor)
                       else np.asarray(lengths))
        params = [getattr(self, k) for k in self._param_keys]
        out = _LSTMFunction.apply(self, self.training, mask_array, lengths, x, h0, c0, *params)
        self._bind()                           # grow=True may have replaced the statistics
        if self.batch_first and self.lstm.return_sequences:
            out = out.transpose(0, 1)
        return out

    def torch_lstm_state_dict(self) -> dict:
        """For norm="none": the state dict of an equivalent ``torch.nn.LSTM(input_size,
        hidden_size)`` (gates reordered, weights transposed, b as bias_ih, zero bias_hh)."""
        if self.lstm.norm != "none":
            raise ValueError("torch.nn.LSTM has no normalization: only norm='none' converts")
        H = self.lstm.hidden_size
        order = torch.cat([torch.arange(H, 2 * H), torch.arange(0, H),
                           torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        with torch.no_grad():
            return {"weight_ih_l0": self.W_x.T[order].clone(),
                    "weight_hh_l0": self.W_h.T[order].clone(),
                    "bias_ih_l0": self.b[order].clone(),
                    "bias_hh_l0": torch.zeros_like(self.b)}

    def extra_repr(self) -> str:
        return (f"{self.lstm.input_size}, {self.lstm.hidden_size}, norm={self.lstm.norm!r}, "
                f"batch_first={self.batch_first}, dtype={self.lstm.dtype.name}")
