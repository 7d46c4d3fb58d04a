"""Numba kernels of the training engine: pure functions on arrays, written into ``out`` buffers.

The layers in :mod:`normkit.nn.layers` validate their arguments and call these; nothing here
checks shapes or raises friendly errors. Elementwise kernels take 1-D contiguous views so one
compiled variant per dtype serves every layer shape.
"""
from __future__ import annotations

import ctypes
import math

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..kernels._jit import jit
from ..kernels.pointwise import sigmoid

# ---------------------------------------------------------------------------------------------
# Dense, small batches (the BLAS call overhead dominates below ~64k multiply-adds)
# ---------------------------------------------------------------------------------------------

# y[i, o] = b[o] + sum_k x[i, k] W[o, k]
@jit(reduction=True)
def dense_forward(x, weight, bias, y):          # x (N, F_in), weight (F_out, F_in), y (N, F_out)
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    for i in range(n_rows):
        for o in range(n_out):
            acc = bias[o]
            for k in range(n_in):
                acc += x[i, k] * weight[o, k]
            y[i, o] = acc


# dW[o, k] = sum_i dy[i, o] x[i, k];  db[o] = sum_i dy[i, o];  dx[i, k] = sum_o dy[i, o] W[o, k]
# One pass over W and dW: for each output unit o, every row i adds its outer-product share.
@jit(reduction=True)
def dense_backward(x, weight, dy, dweight, dbias, dx):
    n_rows, n_in = x.shape
    n_out = weight.shape[0]
    dx[...] = 0
    for o in range(n_out):
        acc = 0.0
        for i in range(n_rows):
            acc += dy[i, o]
        dbias[o] = acc
        g = dy[0, o]
        for k in range(n_in):
            dweight[o, k] = g * x[0, k]
            dx[0, k] += g * weight[o, k]
        for i in range(1, n_rows):
            g = dy[i, o]
            for k in range(n_in):
                dweight[o, k] += g * x[i, k]
                dx[i, k] += g * weight[o, k]


# ---------------------------------------------------------------------------------------------
# Convolution by im2col: cols[(c, kh, kw), (n, i, j)] = x[n, c, i*sh + kh - ph, j*sw + kw - pw]
# (zero outside x), so y = W (O, C*KH*KW) @ cols, and the backward pass is two matmuls and the
# scatter-add col2im. Conv1d is this with H = KH = 1.
# ---------------------------------------------------------------------------------------------

@jit(inline=True)
def _valid_range(kernel_offset, stride, pad, size, n_out):
    # the outputs j whose input position j * stride + kernel_offset - pad lies in [0, size)
    low = -((kernel_offset - pad) // stride)                    # ceil((pad - offset) / stride)
    high = -((kernel_offset - pad - size) // stride)            # ceil((size + pad - offset) / stride)
    return max(0, low), min(n_out, high)


@jit()
def im2col(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, cols):
    n_batch, n_chan, height, width = x.shape      # x (N, C, H, W)
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    for c in range(n_chan):
        for kh in range(kernel_h):
            i_low, i_high = _valid_range(kh, stride_h, pad_h, height, out_h)
            for kw in range(kernel_w):
                j_low, j_high = _valid_range(kw, stride_w, pad_w, width, out_w)
                row = (c * kernel_h + kh) * kernel_w + kw
                for n in range(n_batch):
                    for i in range(out_h):
                        base = (n * out_h + i) * out_w
                        if i < i_low or i >= i_high:
                            cols[row, base:base + out_w] = 0
                            continue
                        h = i * stride_h + kh - pad_h
                        cols[row, base:base + j_low] = 0
                        cols[row, base + j_high:base + out_w] = 0
                        shift = kw - pad_w
                        if stride_w == 1:                   # contiguous: vectorizes
                            for j in range(j_low, j_high):
                                cols[row, base + j] = x[n, c, h, j + shift]
                        else:
                            for j in range(j_low, j_high):
                                cols[row, base + j] = x[n, c, h, j * stride_w + shift]


@jit()
def col2im(dcols, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dx):
    n_batch, n_chan, height, width = dx.shape     # dx (N, C, H, W), the adjoint of im2col
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    dx[...] = 0
    for c in range(n_chan):
        for kh in range(kernel_h):
            i_low, i_high = _valid_range(kh, stride_h, pad_h, height, out_h)
            for kw in range(kernel_w):
                j_low, j_high = _valid_range(kw, stride_w, pad_w, width, out_w)
                row = (c * kernel_h + kh) * kernel_w + kw
                shift = kw - pad_w
                for n in range(n_batch):
                    for i in range(i_low, i_high):
                        h = i * stride_h + kh - pad_h
                        base = (n * out_h + i) * out_w
                        if stride_w == 1:
                            for j in range(j_low, j_high):
                                dx[n, c, h, j + shift] += dcols[row, base + j]
                        else:
                            for j in range(j_low, j_high):
                                dx[n, c, h, j * stride_w + shift] += dcols[row, base + j]


@jit()
def columns_to_output(y_cols, bias, y):
    n_batch, n_out, n_pos = y.shape               # y_cols (O, N*P) -> y (N, O, P), plus bias
    for n in range(n_batch):
        for o in range(n_out):
            b = bias[o]
            for p in range(n_pos):
                y[n, o, p] = y_cols[o, n * n_pos + p] + b


@jit(reduction=True)
def output_to_columns(dy, dy_cols, dbias):
    n_batch, n_out, n_pos = dy.shape              # dy (N, O, P) -> dy_cols (O, N*P); db = sum
    for o in range(n_out):
        acc = 0.0
        for n in range(n_batch):
            for p in range(n_pos):
                value = dy[n, o, p]
                dy_cols[o, n * n_pos + p] = value
                acc += value
        dbias[o] = acc


# ---------------------------------------------------------------------------------------------
# Elementwise activations (1-D contiguous views)
# ---------------------------------------------------------------------------------------------

@jit()
def relu_backward(x, dy, dx):                     # dx = dy where x > 0, else 0
    for i in range(x.size):
        dx[i] = dy[i] if x[i] > 0 else 0


@jit()
def tanh_forward(x, y):
    for i in range(x.size):
        y[i] = math.tanh(x[i])


@jit()
def tanh_backward(y, dy, dx):                     # d tanh = 1 - tanh^2
    for i in range(y.size):
        dx[i] = dy[i] * (1 - y[i] * y[i])


_sigmoid = sigmoid                                  # one definition, shared with the norms


@jit()
def sigmoid_forward(x, y):
    for i in range(x.size):
        y[i] = _sigmoid(x[i])


@jit()
def sigmoid_backward(y, dy, dx):                  # d sigmoid = s (1 - s)
    for i in range(y.size):
        dx[i] = dy[i] * y[i] * (1 - y[i])


# Inverted dropout: keep where u >= p and scale by 1 / (1 - p); the same mask scales dy.
@jit()
def dropout_forward(x, uniform, p, y):
    scale = 1 / (1 - p)
    for i in range(x.size):
        y[i] = x[i] * scale if uniform[i] >= p else 0


@jit()
def dropout_backward(uniform, p, dy, dx):
    scale = 1 / (1 - p)
    for i in range(dy.size):
        dx[i] = dy[i] * scale if uniform[i] >= p else 0


# ---------------------------------------------------------------------------------------------
# Global average pooling over the trailing positions: rows are (n, c), columns positions
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def mean_rows(x, y):                              # x (R, P) -> y (R,)
    n_rows, n_pos = x.shape
    for r in range(n_rows):
        acc = 0.0
        for p in range(n_pos):
            acc += x[r, p]
        y[r] = acc / n_pos


@jit()
def spread_rows(dy, dx):                          # dy (R,) -> dx (R, P) = dy / P
    n_rows, n_pos = dx.shape
    for r in range(n_rows):
        value = dy[r] / n_pos
        for p in range(n_pos):
            dx[r, p] = value


# ---------------------------------------------------------------------------------------------
# Losses (mean over the batch), forward and gradient fused
# ---------------------------------------------------------------------------------------------

# loss_i = logsumexp(z_i) - z_i[t_i];  dL/dz_i = (softmax(z_i) - onehot(t_i)) / N
# Returns the mean loss, or -1 - i for the first row i whose target is out of range.
@jit(reduction=True)
def softmax_cross_entropy(logits, targets, dlogits):
    n_rows, n_classes = logits.shape
    for i in range(n_rows):
        if targets[i] < 0 or targets[i] >= n_classes:
            return -1.0 - i
    total = 0.0
    for i in range(n_rows):
        peak = logits[i, 0]
        for k in range(1, n_classes):
            peak = max(peak, logits[i, k])
        denom = 0.0
        for k in range(n_classes):
            e = math.exp(logits[i, k] - peak)
            dlogits[i, k] = e
            denom += e
        total += peak + math.log(denom) - logits[i, targets[i]]
        for k in range(n_classes):
            dlogits[i, k] = dlogits[i, k] / denom / n_rows
        dlogits[i, targets[i]] -= 1.0 / n_rows
    return total / n_rows


# loss = max(z, 0) - z t + log(1 + exp(-|z|));  dL/dz = (sigmoid(z) - t) / n
@jit(reduction=True)
def binary_cross_entropy(logits, targets, dlogits):
    n = logits.size
    total = 0.0
    for i in range(n):
        z = logits[i]
        total += max(z, 0.0) - z * targets[i] + math.log1p(math.exp(-abs(z)))
        dlogits[i] = (_sigmoid(z) - targets[i]) / n
    return total / n


# ---------------------------------------------------------------------------------------------
# Optimizers: one call updates every parameter (clipping: typed lists of 1-D views)
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def global_norm(grads):                           # sqrt(sum of squares of every entry)
    acc = 0.0
    for g in grads:
        for i in range(g.size):
            acc += g[i] * g[i]
    return math.sqrt(acc)


@jit()
def scale_all(grads, factor):                     # factor: a 1-element array of the grads' dtype
    for g in grads:
        for i in range(g.size):
            g[i] *= factor[0]


# The optimizers address their arrays through a table of raw addresses, one row per parameter:
#     table[j] = [size, param, grad, buffer_a, buffer_b]       (int64; unused buffers 0)
# One small int64 array crosses into Numba per step instead of typed lists of views, whose
# unboxing costs about a microsecond per array. The Optimizer holds every array it lists, so the
# addresses stay valid while the table exists.
TABLE_SIZE, TABLE_PARAM, TABLE_GRAD, TABLE_BUFFER_A, TABLE_BUFFER_B = range(5)


def _array_at(address, size, like):
    """The (size,) array of ``like``'s dtype stored at ``address`` (a view, not a copy)."""
    buffer = (ctypes.c_char * (int(size) * like.itemsize)).from_address(int(address))
    return np.frombuffer(buffer, like.dtype)


@intrinsic
def _voidptr(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@overload(_array_at)
def _array_at_jit(address, size, like):
    dtype = like.dtype
    return lambda address, size, like: numba.carray(_voidptr(address), size, dtype)


# Hyperparameters come in a small array of the parameters' dtype (a NumPy scalar argument costs
# Numba's dispatcher several microseconds to type; an array costs nothing), so float32 models
# update in float32 arithmetic as torch does. Branches sit outside the loops so they vectorize.

# PyTorch's SGD: d = g + wd p;  buf = mu buf + d;  d = d + mu buf (Nesterov) or buf;  p -= lr d.
# hyper = [lr, mu, wd]. With mu = 0 the buffer is not used.
@jit()
def sgd_step(table, hyper, nesterov):
    """One SGD step over a parameter table (see above); buffer_a is the momentum buffer."""
    lr, momentum, weight_decay = hyper[0], hyper[1], hyper[2]
    for j in range(table.shape[0]):
        size = table[j, TABLE_SIZE]
        p = _array_at(table[j, TABLE_PARAM], size, hyper)
        g = _array_at(table[j, TABLE_GRAD], size, hyper)
        buf = _array_at(table[j, TABLE_BUFFER_A], size, hyper)
        if momentum == 0:
            for i in range(size):
                p[i] -= lr * (g[i] + weight_decay * p[i])
        elif nesterov:
            for i in range(size):
                d = g[i] + weight_decay * p[i]
                buf[i] = momentum * buf[i] + d
                p[i] -= lr * (d + momentum * buf[i])
        else:
            for i in range(size):
                buf[i] = momentum * buf[i] + (g[i] + weight_decay * p[i])
                p[i] -= lr * buf[i]


# PyTorch's Adam, step t >= 1:  (coupled) g += wd p  or  (decoupled) p *= 1 - lr wd
#   m += (1 - b1)(g - m);  v = b2 v + (1 - b2) g^2
#   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
# hyper = [lr / (1 - b1^t), sqrt(1 - b2^t), 1 - b1, b2, 1 - b2, eps, coupled wd,
#          decoupled factor 1 - lr wd], computed by the caller in float64 as torch does with its
# Python floats (1 - b2 in float32 arithmetic would be off by 1e-5 relative for b2 = 0.999).
@jit()
def adam_step(table, hyper):                      # buffer_a: exp_avg, buffer_b: exp_avg_sq
    step_size, bias_correction2_sqrt = hyper[0], hyper[1]
    one_minus_beta1, beta2, one_minus_beta2, eps = hyper[2], hyper[3], hyper[4], hyper[5]
    coupled_decay, decoupled_factor = hyper[6], hyper[7]
    for j in range(table.shape[0]):
        size = table[j, TABLE_SIZE]
        p = _array_at(table[j, TABLE_PARAM], size, hyper)
        g = _array_at(table[j, TABLE_GRAD], size, hyper)
        m = _array_at(table[j, TABLE_BUFFER_A], size, hyper)
        v = _array_at(table[j, TABLE_BUFFER_B], size, hyper)
        for i in range(size):
            p[i] *= decoupled_factor
            d = g[i] + coupled_decay * p[i]
            m[i] += one_minus_beta1 * (d - m[i])
            v[i] = beta2 * v[i] + one_minus_beta2 * d * d
            p[i] -= step_size * m[i] / (np.sqrt(v[i]) / bias_correction2_sqrt + eps)


# PyTorch's RMSprop (eps outside the square root):
#   g += wd p;  s = alpha s + (1 - alpha) g^2;  a = sqrt(s) + eps
#   buf = mu buf + g / a;  p -= lr buf      (mu = 0: p -= lr g / a)
# hyper = [lr, alpha, 1 - alpha, eps, wd, mu]
@jit()
def rmsprop_step(table, hyper):                   # buffer_a: square_avg, buffer_b: momentum
    lr, alpha, one_minus_alpha, eps = hyper[0], hyper[1], hyper[2], hyper[3]
    weight_decay, momentum = hyper[4], hyper[5]
    for j in range(table.shape[0]):
        size = table[j, TABLE_SIZE]
        p = _array_at(table[j, TABLE_PARAM], size, hyper)
        g = _array_at(table[j, TABLE_GRAD], size, hyper)
        s = _array_at(table[j, TABLE_BUFFER_A], size, hyper)
        buf = _array_at(table[j, TABLE_BUFFER_B], size, hyper)
        if momentum == 0:
            for i in range(size):
                d = g[i] + weight_decay * p[i]
                s[i] = alpha * s[i] + one_minus_alpha * d * d
                p[i] -= lr * (d / (np.sqrt(s[i]) + eps))
        else:
            for i in range(size):
                d = g[i] + weight_decay * p[i]
                s[i] = alpha * s[i] + one_minus_alpha * d * d
                buf[i] = momentum * buf[i] + d / (np.sqrt(s[i]) + eps)
                p[i] -= lr * buf[i]
