"""Layers with the normalizers' interface: ``forward(x, training)``, ``backward(dy)``, ``params``,
``grads``, ``state``.

Conventions (PyTorch's layouts, so results can be checked against it):

- ``Dense``: x (N, F_in) -> y (N, F_out); ``weight`` (F_out, F_in), ``bias`` (F_out,).
- ``Conv1d``: x (N, C_in, L) -> (N, C_out, L_out); ``weight`` (C_out, C_in, K).
- ``Conv2d``: x (N, C_in, H, W) -> (N, C_out, H_out, W_out); ``weight`` (C_out, C_in, KH, KW).
  L_out = (L + 2 * padding - K) // stride + 1, the same per spatial axis in 2-D.
- ``weight_standardization=True`` (Dense, Conv1d, Conv2d; Qiao et al., 2019): the layer computes
  with each output unit's weights standardized over its fan-in, W_hat = (W - mean) /
  sqrt(var + ws_eps) (biased variance, eps inside the root as the paper's equation; timm's
  StdConv2d takes eps 1e-6, the authors' code adds 1e-5 to the unbiased std); ``params["weight"]``
  stays the raw W and its gradient flows through the standardization. ``effective_weight()``
  is the weight the layer computes with. Paired with group norm it is "gn+ws".
- Activations, ``Dropout``, ``Flatten`` and ``GlobalAvgPool`` have no parameters and take
  float32 or float64; layers with parameters take only their own ``dtype`` (float32 default).

Memory contract (what makes a small-batch training step cheap):

- ``params``/``grads`` arrays are allocated once and never replaced: an optimizer may hold them.
  ``backward`` *overwrites* ``grads`` (no accumulation, so there is no zero_grad).
- Outputs and input gradients are written into buffers the layer keeps per input shape: the
  array ``forward``/``backward`` returns is reused by the next call with the same shape. Copy
  it to keep it.
- ``forward`` keeps a reference to ``x``; ``backward`` differentiates the most recent
  ``forward``, so do not modify ``x`` in place in between.
"""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np

from ..norms import LayerNorm as _LayerNorm
from . import _kernels as K
from . import init as _init

__all__ = ["Layer", "Dense", "Conv1d", "Conv2d", "ReLU", "Tanh", "Sigmoid", "Dropout",
           "Flatten", "GlobalAvgPool"]

#: Up to this many multiply-adds (N * F_in * F_out) a Dense layer uses its Numba kernels; above,
#: BLAS matmul. Measured forward + backward on the 2-core reference machine (float32, one BLAS
#: thread): 128->128 at N=2 Numba 38 us vs BLAS 88 us; at N=8 107 vs 122; at N=16 247 vs 214.
#: BLAS's cost is ~20-40 us for the five calls however small the product (and erratic with
#: several BLAS threads on a busy machine).
SMALL_DENSE_MACS = 1 << 17

# Buffers per layer; beyond this many (input shapes that change every call), start over.
_MAX_BUFFERS = 32


def _check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, Integral) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, Integral) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _as_rng(rng, name: str = "rng") -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"{name} must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


class Layer:
    """Base class: parameter dicts, per-shape output buffers and the input checks.

    ``dtype=None`` means the layer has no parameters and takes float32 or float64.
    """

    def __init__(self, dtype=None):
        self.dtype = None if dtype is None else _check_dtype(dtype)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.state: dict[str, np.ndarray] = {}
        self._buffers: dict[tuple, np.ndarray] = {}
        self._saved = None                          # what backward needs, from the last forward

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """The layer's output for ``x`` (a buffer reused by the next call of the same shape)."""
        raise NotImplementedError

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dx of the last forward, given dL/dy; overwrites ``grads``."""
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------
    def _add_param(self, name: str, value: np.ndarray) -> None:
        self.params[name] = np.ascontiguousarray(value, dtype=self.dtype)
        self.grads[name] = np.zeros_like(self.params[name])

    def _buffer(self, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
        key = (name, shape, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) >= _MAX_BUFFERS:
                self._buffers.clear()
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf

    def _check_array(self, name: str, a) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if self.dtype is None:
            if a.dtype != np.float32 and a.dtype != np.float64:
                raise TypeError(f"{name} must be a float32 or float64 array, got dtype {a.dtype}")
        elif a.dtype != self.dtype:
            raise TypeError(
                f"{name} has dtype {a.dtype} but this {type(self).__name__} holds {self.dtype} "
                f"parameters; build it with dtype=np.{a.dtype} or cast {name}")
        return a if a.flags.c_contiguous else np.ascontiguousarray(a)

    def _check_dy(self, dy, shape: tuple, dtype: np.dtype) -> np.ndarray:
        dy = self._check_array("dy", dy)
        if dy.shape != shape or dy.dtype != dtype:
            raise ValueError(
                f"dy must have the shape and dtype of the last forward's output {shape} {dtype}, "
                f"got {dy.shape} {dy.dtype}")
        return dy

    def _last_forward(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        return self._saved

    def __repr__(self) -> str:
        dtype = "" if self.dtype is None else f"dtype={self.dtype.name}"
        return f"{type(self).__name__}({', '.join(s for s in (self._describe(), dtype) if s)})"

    def _describe(self) -> str:
        return ""


class _Standardized:
    """Weight standardization for a layer with ``params["weight"]`` of shape (out, *fan_in): the
    statistics engine's layer norm (no affine) over each output unit's fan-in, through the
    normalizers' interface."""

    def _init_standardization(self, weight_standardization, ws_eps) -> None:
        self.weight_standardization = _check_bool("weight_standardization", weight_standardization)
        if isinstance(ws_eps, bool) or not isinstance(ws_eps, Real) or not 0 < ws_eps < np.inf:
            raise ValueError(f"ws_eps must be a finite number > 0, got {ws_eps!r}")
        self._standardizer = None
        if self.weight_standardization:
            fan_in = self.params["weight"].size // self.params["weight"].shape[0]
            self._standardizer = _LayerNorm(fan_in, eps=ws_eps, affine=False, dtype=self.dtype)

    def _weight_rows(self) -> np.ndarray:
        weight = self.params["weight"]
        return weight.reshape(weight.shape[0], -1)        # (out, fan_in)

    def _standardize(self) -> np.ndarray:
        """The (out, fan_in) weight to compute with; backward then needs :meth:`_unstandardize`."""
        if self._standardizer is None:
            return self._weight_rows()
        return self._standardizer.forward(self._weight_rows(), training=True)

    def _unstandardize(self, dweight_rows: np.ndarray) -> None:
        """dL/dW_hat in ``dweight_rows`` (out, fan_in) becomes dL/dW, in place."""
        if self._standardizer is not None:
            dweight_rows[...] = self._standardizer.backward(dweight_rows)

    def effective_weight(self) -> np.ndarray:
        """The weight the layer computes with (standardized or not), a new array of the weight's
        shape."""
        if self._standardizer is None:
            return self.params["weight"].copy()
        return self._standardizer.forward(self._weight_rows(), training=False).reshape(
            self.params["weight"].shape)

    def _ws_describe(self) -> str:
        if not self.weight_standardization:
            return ""
        return f", weight_standardization=True, ws_eps={self._standardizer.eps}"


def _init_weight(shape: tuple, rng, init, init_scale) -> np.ndarray:
    if isinstance(init_scale, bool) or not isinstance(init_scale, Real):
        raise ValueError(f"init_scale must be a number, got {init_scale!r}")
    weight = np.asarray(_init.get(init)(shape, _as_rng(rng), init_scale))
    if weight.shape != shape:
        raise ValueError(f"init returned shape {weight.shape}, expected {shape}")
    return weight


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------

class Dense(_Standardized, Layer):
    """y = x W^T + b: x (N, F_in) -> y (N, F_out), ``weight`` (F_out, F_in) as ``torch.nn.Linear``.

    ``init`` names a :mod:`normkit.nn.init` scheme (or is a callable with its signature) and
    ``init_scale`` its gain; the bias starts at zero. ``rng`` is a Generator or an int seed.
    ``weight_standardization``/``ws_eps``: see the module docstring.
    """

    def __init__(self, in_features, out_features, *, rng, bias=True, init="he_uniform",
                 init_scale=1.0, weight_standardization=False, ws_eps=1e-5, dtype=np.float32):
        super().__init__(dtype)
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
        self.has_bias = _check_bool("bias", bias)
        self._add_param("weight", _init_weight((self.out_features, self.in_features), rng, init, init_scale))
        if self.has_bias:
            self._add_param("bias", np.zeros(self.out_features))
            self._bias, self._dbias = self.params["bias"], self.grads["bias"]
        else:                                       # a fixed zero bias keeps one kernel
            self._bias = np.zeros(self.out_features, self.dtype)
            self._dbias = np.zeros(self.out_features, self.dtype)
        self._init_standardization(weight_standardization, ws_eps)

    def forward(self, x, training):
        _check_bool("training", training)
        x = self._check_array("x", x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must be (N, {self.in_features}) for this Dense, got shape {x.shape}")
        weight = self._weight = self._standardize()                     # (F_out, F_in)
        y = self._buffer("y", (x.shape[0], self.out_features), x.dtype)  # (N, F_out)
        if x is y or x.base is y:                   # our own last output fed back in
            x = x.copy()
        if x.shape[0] * self.in_features * self.out_features <= SMALL_DENSE_MACS:
            K.dense_forward(x, weight, self._bias, y)
        else:
            np.matmul(x, weight.T, out=y)
            y += self._bias
        self._saved = x
        return y

    def backward(self, dy):
        x = self._last_forward()                                        # (N, F_in)
        dy = self._check_dy(dy, (x.shape[0], self.out_features), x.dtype)
        weight, dweight = self._weight, self.grads["weight"]
        dx = self._buffer("dx", x.shape, x.dtype)
        if x.shape[0] * self.in_features * self.out_features <= SMALL_DENSE_MACS:
            K.dense_backward(x, weight, dy, dweight, self._dbias, dx)
        else:
            np.matmul(dy.T, x, out=dweight)
            np.sum(dy, axis=0, out=self._dbias)
            np.matmul(dy, weight, out=dx)
        self._unstandardize(dweight)
        return dx

    def _describe(self):
        return f"{self.in_features}, {self.out_features}, bias={self.has_bias}{self._ws_describe()}"


# ---------------------------------------------------------------------------------------------
# Convolution (im2col + BLAS; see _kernels.im2col). Conv1d runs the 2-D code with H = KH = 1.
# ---------------------------------------------------------------------------------------------

class _Conv(_Standardized, Layer):
    def __init__(self, in_channels, out_channels, kernel, stride, padding, *, rng, bias, init,
                 init_scale, weight_standardization, ws_eps, dtype):
        super().__init__(dtype)
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.has_bias = _check_bool("bias", bias)
        self._kernel, self._stride, self._padding = kernel, stride, padding    # (h, w) pairs
        shape = (self.out_channels, self.in_channels) + self._weight_kernel_shape()
        self._add_param("weight", _init_weight(shape, rng, init, init_scale))
        if self.has_bias:
            self._add_param("bias", np.zeros(self.out_channels))
            self._bias, self._dbias = self.params["bias"], self.grads["bias"]
        else:
            self._bias = np.zeros(self.out_channels, self.dtype)
            self._dbias = np.zeros(self.out_channels, self.dtype)
        self._make_column_views()
        self._init_standardization(weight_standardization, ws_eps)

    def _make_column_views(self) -> None:
        # (C_out, C_in * KH * KW) views of the weight and its gradient, for the matmuls
        self._weight_cols = self.params["weight"].reshape(self.out_channels, -1)
        self._dweight_cols = self.grads["weight"].reshape(self.out_channels, -1)

    # copy.deepcopy and pickle copy a view as an array of its own, cut off from the weight it
    # viewed: drop the views and make them again from the copied weight.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_weight_cols"], state["_dweight_cols"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_column_views()

    def _weight_kernel_shape(self) -> tuple:
        raise NotImplementedError

    def _as_4d(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _output_shape(self, n, out_h, out_w) -> tuple:
        raise NotImplementedError

    def forward(self, x, training):
        _check_bool("training", training)
        x = self._check_array("x", x)
        x4 = self._as_4d(x)                                             # (N, C, H, W)
        n_batch, _, height, width = x4.shape
        (kh, kw), (sh, sw), (ph, pw) = self._kernel, self._stride, self._padding
        out_h = (height + 2 * ph - kh) // sh + 1
        out_w = (width + 2 * pw - kw) // sw + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(f"x of shape {x.shape} is smaller than the kernel after padding: {self}")
        n_pos = out_h * out_w
        cols = self._buffer("cols", (self._weight_cols.shape[1], n_batch * n_pos), x.dtype)
        K.im2col(x4, kh, kw, sh, sw, ph, pw, cols)                      # (C*KH*KW, N*P)
        y_cols = self._buffer("y_cols", (self.out_channels, n_batch * n_pos), x.dtype)
        weight_cols = self._standardize()                               # (C_out, C*KH*KW)
        np.matmul(weight_cols, cols, out=y_cols)                        # (C_out, N*P)
        y = self._buffer("y", self._output_shape(n_batch, out_h, out_w), x.dtype)
        K.columns_to_output(y_cols, self._bias, y.reshape(n_batch, self.out_channels, n_pos))
        self._saved = (x, cols, y.shape, weight_cols)
        return y

    def backward(self, dy):
        x, cols, out_shape, weight_cols = self._last_forward()
        n_batch = x.shape[0]
        n_pos = cols.shape[1] // n_batch
        dy = self._check_dy(dy, out_shape, x.dtype)
        dy_cols = self._buffer("dy_cols", (self.out_channels, n_batch * n_pos), x.dtype)
        K.output_to_columns(dy.reshape(n_batch, self.out_channels, n_pos), dy_cols, self._dbias)
        np.matmul(dy_cols, cols.T, out=self._dweight_cols)              # (C_out, C*KH*KW)
        self._unstandardize(self._dweight_cols)
        dcols = self._buffer("dcols", cols.shape, x.dtype)
        np.matmul(weight_cols.T, dy_cols, out=dcols)                    # (C*KH*KW, N*P)
        dx = self._buffer("dx", x.shape, x.dtype)
        (kh, kw), (sh, sw), (ph, pw) = self._kernel, self._stride, self._padding
        K.col2im(dcols, kh, kw, sh, sw, ph, pw, self._as_4d(dx))
        return dx


def _check_padding(padding, kernel: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    if padding == "same":
        if stride != (1, 1) or any(k % 2 == 0 for k in kernel):
            raise ValueError(f"padding='same' needs stride 1 and an odd kernel, got kernel "
                             f"{kernel} stride {stride}")
        return kernel[0] // 2, kernel[1] // 2
    return _check_pair("padding", padding, 0)


class Conv1d(_Conv):
    """1-D convolution (cross-correlation, as ``torch.nn.Conv1d``): x (N, C_in, L) ->
    (N, C_out, L_out), ``weight`` (C_out, C_in, kernel_size). ``padding`` is an int (zeros on
    both ends) or "same" (stride 1, odd kernel)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, rng,
                 bias=True, init="he_uniform", init_scale=1.0, weight_standardization=False,
                 ws_eps=1e-5, dtype=np.float32):
        k = _check_positive_int("kernel_size", kernel_size)
        s = _check_positive_int("stride", stride)
        if padding == "same":
            p = _check_padding(padding, (1, k), (1, s))[1]
        elif isinstance(padding, bool) or not isinstance(padding, Integral) or padding < 0:
            raise ValueError(f"padding must be an int >= 0 or 'same', got {padding!r}")
        else:
            p = int(padding)
        super().__init__(in_channels, out_channels, (1, k), (1, s), (0, p), rng=rng, bias=bias,
                         init=init, init_scale=init_scale,
                         weight_standardization=weight_standardization, ws_eps=ws_eps, dtype=dtype)

    def _weight_kernel_shape(self):
        return (self._kernel[1],)

    def _as_4d(self, x):
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, L) for this Conv1d, got shape {x.shape}")
        return x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])

    def _output_shape(self, n, out_h, out_w):
        return (n, self.out_channels, out_w)

    def _describe(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self._kernel[1]}, "
                f"stride={self._stride[1]}, padding={self._padding[1]}, bias={self.has_bias}"
                f"{self._ws_describe()}")


class Conv2d(_Conv):
    """2-D convolution (cross-correlation, as ``torch.nn.Conv2d``): x (N, C_in, H, W) ->
    (N, C_out, H_out, W_out), ``weight`` (C_out, C_in, KH, KW). ``kernel_size``, ``stride`` and
    ``padding`` are ints or (h, w) pairs; ``padding="same"`` needs stride 1 and odd kernels."""

    def __init__(self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, rng,
                 bias=True, init="he_uniform", init_scale=1.0, weight_standardization=False,
                 ws_eps=1e-5, dtype=np.float32):
        kernel = _check_pair("kernel_size", kernel_size, 1)
        stride = _check_pair("stride", stride, 1)
        padding = _check_padding(padding, kernel, stride)
        super().__init__(in_channels, out_channels, kernel, stride, padding, rng=rng, bias=bias,
                         init=init, init_scale=init_scale,
                         weight_standardization=weight_standardization, ws_eps=ws_eps, dtype=dtype)

    def _weight_kernel_shape(self):
        return self._kernel

    def _as_4d(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) for this Conv2d, got shape {x.shape}")
        return x

    def _output_shape(self, n, out_h, out_w):
        return (n, self.out_channels, out_h, out_w)

    def _describe(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self._kernel}, "
                f"stride={self._stride}, padding={self._padding}, bias={self.has_bias}"
                f"{self._ws_describe()}")


# ---------------------------------------------------------------------------------------------
# Parameter-free layers (float32 or float64, any shape)
# ---------------------------------------------------------------------------------------------

class ReLU(Layer):
    """y = max(x, 0), elementwise; the gradient at 0 is 0 (as PyTorch)."""

    def forward(self, x, training):
        _check_bool("training", training)
        x = self._check_array("x", x)
        y = self._buffer("y", x.shape, x.dtype)
        np.maximum(x, 0, out=y)
        self._saved = x
        return y

    def backward(self, dy):
        x = self._last_forward()
        dy = self._check_dy(dy, x.shape, x.dtype)
        dx = self._buffer("dx", x.shape, x.dtype)
        K.relu_backward(x.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx


class _Elementwise(Layer):
    """An activation whose derivative is a function of its output y."""

    _forward_kernel = None
    _backward_kernel = None

    def forward(self, x, training):
        _check_bool("training", training)
        x = self._check_array("x", x)
        y = self._buffer("y", x.shape, x.dtype)
        type(self)._forward_kernel(x.reshape(-1), y.reshape(-1))
        self._saved = y
        return y

    def backward(self, dy):
        y = self._last_forward()
        dy = self._check_dy(dy, y.shape, y.dtype)
        dx = self._buffer("dx", y.shape, y.dtype)
        type(self)._backward_kernel(y.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx


class Tanh(_Elementwise):
    """y = tanh(x); dx = dy (1 - y^2)."""

    _forward_kernel = K.tanh_forward
    _backward_kernel = K.tanh_backward


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)), computed without overflow; dx = dy y (1 - y)."""

    _forward_kernel = K.sigmoid_forward
    _backward_kernel = K.sigmoid_backward


class Dropout(Layer):
    """Inverted dropout: in training, zero each entry with probability ``p`` and scale the rest
    by 1 / (1 - p); in evaluation (or with p = 0) return x itself.

    The mask is drawn from ``rng`` (a Generator or an int seed, kept as ``self.rng``), so a run
    is deterministic given the seed.
    """

    def __init__(self, p, *, rng):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, Real) or not 0 <= p < 1:
            raise ValueError(f"p must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = _as_rng(rng)

    def forward(self, x, training):
        training = _check_bool("training", training)
        x = self._check_array("x", x)
        if not training or self.p == 0:
            self._saved = (x, None)
            return x
        uniform = self._buffer("uniform", x.shape, x.dtype)
        self.rng.random(dtype=x.dtype.type, out=uniform)
        y = self._buffer("y", x.shape, x.dtype)
        K.dropout_forward(x.reshape(-1), uniform.reshape(-1), self.p, y.reshape(-1))
        self._saved = (x, uniform)
        return y

    def backward(self, dy):
        x, uniform = self._last_forward()
        dy = self._check_dy(dy, x.shape, x.dtype)
        if uniform is None:
            return dy
        dx = self._buffer("dx", x.shape, x.dtype)
        K.dropout_backward(uniform.reshape(-1), self.p, dy.reshape(-1), dx.reshape(-1))
        return dx

    def _describe(self):
        return f"p={self.p}"


class Flatten(Layer):
    """(N, *rest) -> (N, prod(rest)), a view of x (no copy)."""

    def forward(self, x, training):
        _check_bool("training", training)
        x = self._check_array("x", x)
        if x.ndim < 2:
            raise ValueError(f"x must be (N, ...) with ndim >= 2, got shape {x.shape}")
        self._saved = (x.shape, x.dtype)
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape, dtype = self._last_forward()
        dy = self._check_dy(dy, (shape[0], int(np.prod(shape[1:], dtype=np.int64))), dtype)
        return dy.reshape(shape)


class GlobalAvgPool(Layer):
    """Mean over the spatial axes: (N, C, *spatial) -> (N, C)."""

    def forward(self, x, training):
        _check_bool("training", training)
        x = self._check_array("x", x)
        if x.ndim < 3 or x.size == 0:
            raise ValueError(f"x must be a non-empty (N, C, *spatial) array, got shape {x.shape}")
        n_batch, n_chan = x.shape[:2]
        y = self._buffer("y", (n_batch, n_chan), x.dtype)
        K.mean_rows(x.reshape(n_batch * n_chan, -1), y.reshape(-1))
        self._saved = (x.shape, x.dtype)
        return y

    def backward(self, dy):
        shape, dtype = self._last_forward()
        dy = self._check_dy(dy, shape[:2], dtype)
        dx = self._buffer("dx", shape, dtype)
        K.spread_rows(dy.reshape(-1), dx.reshape(shape[0] * shape[1], -1))
        return dx
