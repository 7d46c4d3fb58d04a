"""The computation every normalizer shares: statistics over groups of a 4-D view, then affine.

Batch, ghost, layer, group, instance and RMS norm differ only in which axes they reduce. Each is
run on a C-contiguous 4-D view of its input and one integer, the *statistics batch* ``B``::

    x4: (N, G, Cg, L)    statistics per (v, g) over rows n in [v*B, (v+1)*B), cg and l
                         affine per channel (g, cg): y = gamma[g, cg] * xhat + beta[g, cg]

    batch      (N, C, *S) -> (N, C, 1, L)     B = N            stats (1, C)
    ghost      (N, C, *S) -> (N, C, 1, L)     B = virtual      stats (N/B, C)
    group      (N, C, *S) -> (N, G, C/G, L)   B = 1            stats (N, G)
    instance   (N, C, *S) -> (N, C, 1, L)     B = 1            stats (N, C)
    layer/rms  (*R, *D)   -> (R, 1, D, 1)     B = 1            stats (R, 1)

With ``V = N / B`` statistics groups along the rows, a *group* is (v, g) and holds
``M = B * Cg * L`` values. ``centered=False`` gives RMS norm (mean taken as 0).

Forward (two-pass statistics, accumulated in float64 whatever the input dtype)::

    mean = sum(x) / M                   var = sum((x - mean)^2) / M       (biased)
    inv_std = 1 / sqrt(var + eps)       y = (x - mean) * inv_std * gamma + beta

Backward, with xhat = (x - mean) * inv_std and dxhat = dy * gamma (per channel)::

    dbeta  = sum_{n, l} dy               dgamma = sum_{n, l} dy * xhat    (per channel)
    dx     = inv_std * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat))

where mean_group(dxhat) = sum_cg gamma * dbeta_group / M and
mean_group(dxhat * xhat) = sum_cg gamma * dgamma_group / M, the sums taken over the group only.
(RMS: no mean_group(dxhat) term, since the mean is not subtracted.) With the statistics held
constant (``frozen``: batch norm in evaluation mode) both means are 0: dx = dy * gamma * inv_std.

Element-wise passes run in the input's dtype, so float32 data moves through float32 SIMD lanes;
only the per-group coefficients are computed in float64 and rounded once::

    y  = (x - mean_hi) * scale + shift          scale = inv_std * gamma
                                                shift = beta - (mean - mean_hi) * scale
    dx = dy * dy_coef + (x - mean_hi) * x_coef + const

``mean_hi`` is the mean rounded to the input's dtype: for x near the mean, ``x - mean_hi`` is
exact (Sterbenz), and the rounding of the mean goes into ``shift`` in float64. Computing
``x * scale + (beta - mean * scale)`` instead would cancel catastrophically in float32 when the
mean is large against the spread.

Two drivers, one result per group whatever the number of threads (each group is reduced by one
thread in a fixed order, so serial and parallel twins agree bit for bit):

- *groups*: one work item per group (v, g), whose rows are contiguous runs of ``Cg * L`` values
  (a channel plane of an image batch, a layer-norm row). The group is read from memory once;
  the variance and output passes find it in the core's L2 cache.
- *row chunks* (``Cg * L == 1`` and ``B > 1``: batch norm of (N, C)): a channel's values are C
  apart, so an item takes a fixed chunk of whole rows (contiguous memory, every channel) and
  computes each channel's count, mean and M2 over the chunk (two passes, the chunk in L2); the
  chunks of a row-group are then merged channel by channel in chunk order (Chan et al.'s
  pairwise update). The chunk size depends on the shape only, so results do not depend on the
  number of threads either.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from ._jit import jit, serial_and_parallel

#: Inputs with fewer elements than this run on the calling thread only.
PARALLEL_MIN_SIZE = 1 << 15

# Backward accumulates dgamma/dbeta of row-chunks into partial sums, then adds the chunks in a
# fixed order: a fixed chunk count keeps results independent of the thread count.
_MAX_CHUNKS = 64

# Row-chunk driver: a chunk of rows covers about this many bytes of the input, so its two
# statistics passes find it in a core's L2 cache (512 KiB on the machine the benchmarks ran on).
_CHUNK_BYTES = 1 << 18
_MERGE_BLOCK = 256          # channels per work item when merging chunk statistics

# Statistics sum blocks of this many values in the input's dtype (SIMD lanes of float32 for
# float32 data), then add the block sums in float64; see _group_moments for why that is exact
# enough.
_BLOCK = 512
_ROW_BLOCK = 64             # the row-chunk driver sums each channel row by row: shorter blocks

# Outputs of at least this many bytes (more than the L3 cache) are written with non-temporal
# stores: they go to memory without first reading the destination's cache lines.
STREAM_MIN_BYTES = 8 << 20
_JIT_ENABLED = not numba.config.DISABLE_JIT
_VECTOR_BYTES = 32
_LINE_BYTES = 64

# Forward driver modes.
STATS_AND_APPLY = 0     # statistics, then y (training)
STATS_ONLY = 1          # statistics only (batch renorm computes its correction in between)
APPLY_ONLY = 2          # y with given statistics (evaluation, renorm)


def _cast_like(a, value):
    """``value`` as a scalar of ``a``'s dtype."""
    return a.dtype.type(value)


@overload(_cast_like)
def _cast_like_jit(a, value):
    dtype = a.dtype
    return lambda a, value: dtype(value)


@jit(reduction=True)
def all_finite(a):
    """Whether every value of the 1-D array ``a`` is finite (x * 0 is NaN for NaN and inf)."""
    total = 0.0
    for k in range(a.size):
        total += a[k] * 0.0
    return np.isfinite(total)


@jit()
def output_like(x, out):
    """``out`` if given (C-contiguous, x's shape and dtype: not checked), else a new array."""
    if out is None:
        return np.empty_like(x)
    return out


# ---------------------------------------------------------------------------------------------
# Output passes: element-wise formulas, with non-temporal (streaming) stores for large outputs
#
# Each formula exists twice: as a plain loop (LLVM vectorizes it) and as a vector intrinsic that
# computes one 32-byte vector of results and writes it with a non-temporal store, so the output
# goes to memory without its cache lines being read first. Both do the same IEEE operations in
# the same order (no FMA contraction), so a value does not depend on which path wrote it. The
# streaming path writes whole 64-byte lines only; the partial lines at both ends of a span get
# ordinary stores (a line written both ways would be flushed and read back).
# ---------------------------------------------------------------------------------------------

def _vector_codegen(formula, n_arrays):
    """Codegen of an intrinsic (dst, i, *arrays, *scalars): dst[i:i + W] = formula(lanes of
    arrays[a][i:i + W], splatted scalars), stored non-temporally (dst + i is 32-byte aligned)."""
    def codegen(context, builder, signature, args):
        dst_type = signature.args[0]
        element = context.get_value_type(dst_type.dtype)
        itemsize = context.get_abi_sizeof(element)
        vector = ir.VectorType(element, _VECTOR_BYTES // itemsize)
        index = args[1]

        def lanes(array_type, array_value, align):
            data = context.make_array(array_type)(context, builder, array_value).data
            return builder.gep(data, [index]), align

        operands = []
        for k in range(n_arrays):
            ptr, _ = lanes(signature.args[2 + k], args[2 + k], itemsize)
            operands.append(builder.load(builder.bitcast(ptr, vector.as_pointer()), align=itemsize))
        for value in args[2 + n_arrays:]:
            splat = ir.Constant(vector, ir.Undefined)
            for lane in range(vector.count):
                splat = builder.insert_element(splat, value, ir.Constant(ir.IntType(32), lane))
            operands.append(splat)
        result = formula(builder, *operands)
        dst_ptr, _ = lanes(dst_type, args[0], _VECTOR_BYTES)
        store = builder.store(result, builder.bitcast(dst_ptr, vector.as_pointer()),
                              align=_VECTOR_BYTES)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return codegen


def _affine_ir(b, x, mean_hi, scale, shift):
    return b.fadd(b.fmul(b.fsub(x, mean_hi), scale), shift)


def _affine_per_element_ir(b, x, gamma, beta, mean_hi, inv, shift):
    return b.fadd(b.fmul(b.fadd(b.fmul(b.fsub(x, mean_hi), inv), shift), gamma), beta)


def _dx_ir(b, dy, x, dy_coef, mean_hi, x_coef, const):
    return b.fadd(b.fadd(b.fmul(dy, dy_coef), b.fmul(b.fsub(x, mean_hi), x_coef)), const)


def _dx_per_element_ir(b, dy, x, gamma, inv, mean_hi, x_coef, const):
    return b.fadd(b.fadd(b.fmul(b.fmul(dy, gamma), inv), b.fmul(b.fsub(x, mean_hi), x_coef)),
                  const)


@intrinsic
def _stream_affine(typingctx, dst, i, x, mean_hi, scale, shift):
    return (types.void(dst, i, x, mean_hi, scale, shift), _vector_codegen(_affine_ir, 1))


@intrinsic
def _stream_affine_per_element(typingctx, dst, i, x, gamma, beta, mean_hi, inv, shift):
    return (types.void(dst, i, x, gamma, beta, mean_hi, inv, shift),
            _vector_codegen(_affine_per_element_ir, 3))


@intrinsic
def _stream_dx(typingctx, dst, i, dy, x, dy_coef, mean_hi, x_coef, const):
    return (types.void(dst, i, dy, x, dy_coef, mean_hi, x_coef, const), _vector_codegen(_dx_ir, 2))


@intrinsic
def _stream_dx_per_element(typingctx, dst, i, dy, x, gamma, inv, mean_hi, x_coef, const):
    return (types.void(dst, i, dy, x, gamma, inv, mean_hi, x_coef, const),
            _vector_codegen(_dx_per_element_ir, 3))


def _affine_channels_ir(b, x, mean_hi, scale, shift):
    return b.fadd(b.fmul(b.fsub(x, mean_hi), scale), shift)


def _dx_channels_ir(b, dy, x, dy_coef, mean_hi, x_coef, const):
    return b.fadd(b.fadd(b.fmul(dy, dy_coef), b.fmul(b.fsub(x, mean_hi), x_coef)), const)


@intrinsic
def _stream_affine_channels(typingctx, dst, i, x, mean_hi, scale, shift):
    return (types.void(dst, i, x, mean_hi, scale, shift),
            _vector_codegen(_affine_channels_ir, 4))


@intrinsic
def _stream_dx_channels(typingctx, dst, i, dy, x, dy_coef, mean_hi, x_coef, const):
    return (types.void(dst, i, dy, x, dy_coef, mean_hi, x_coef, const),
            _vector_codegen(_dx_channels_ir, 6))


@jit()
def _streamed_range(dst, n):
    """(head, body_end): dst[head:body_end] are the whole 64-byte lines of dst[:n]."""
    line = _LINE_BYTES // dst.itemsize
    head = min((-dst.ctypes.data % _LINE_BYTES) // dst.itemsize, n)
    return head, head + (n - head) // line * line


@jit()
def _affine(xs, ys, mean_hi, scale, shift, stream):
    """ys = (xs - mean_hi) * scale + shift, all in x's dtype; xs, ys: (K,) contiguous."""
    head, body_end = _streamed_range(ys, ys.size) if stream else (ys.size, ys.size)
    for k in range(head):
        ys[k] = (xs[k] - mean_hi) * scale + shift
    for k in range(head, body_end, _VECTOR_BYTES // ys.itemsize):
        _stream_affine(ys, k, xs, mean_hi, scale, shift)
    for k in range(body_end, ys.size):
        ys[k] = (xs[k] - mean_hi) * scale + shift


@jit()
def _affine_per_element(xs, ys, gamma, beta, mean_hi, inv, shift, stream):
    """ys = ((xs - mean_hi) * inv + shift) * gamma + beta, gamma/beta per element (K,)."""
    head, body_end = _streamed_range(ys, ys.size) if stream else (ys.size, ys.size)
    for k in range(head):
        ys[k] = ((xs[k] - mean_hi) * inv + shift) * gamma[k] + beta[k]
    for k in range(head, body_end, _VECTOR_BYTES // ys.itemsize):
        _stream_affine_per_element(ys, k, xs, gamma, beta, mean_hi, inv, shift)
    for k in range(body_end, ys.size):
        ys[k] = ((xs[k] - mean_hi) * inv + shift) * gamma[k] + beta[k]


@jit()
def _dx(ds, xs, dxs, dy_coef, mean_hi, x_coef, const, stream):
    """dxs = ds * dy_coef + (xs - mean_hi) * x_coef + const in x's dtype; (K,) contiguous."""
    head, body_end = _streamed_range(dxs, dxs.size) if stream else (dxs.size, dxs.size)
    for k in range(head):
        dxs[k] = ds[k] * dy_coef + (xs[k] - mean_hi) * x_coef + const
    for k in range(head, body_end, _VECTOR_BYTES // dxs.itemsize):
        _stream_dx(dxs, k, ds, xs, dy_coef, mean_hi, x_coef, const)
    for k in range(body_end, dxs.size):
        dxs[k] = ds[k] * dy_coef + (xs[k] - mean_hi) * x_coef + const


@jit()
def _dx_per_element(ds, xs, dxs, gamma, inv, mean_hi, x_coef, const, stream):
    """dxs = ds * gamma * inv + (xs - mean_hi) * x_coef + const, gamma per element (K,)."""
    head, body_end = _streamed_range(dxs, dxs.size) if stream else (dxs.size, dxs.size)
    for k in range(head):
        dxs[k] = ds[k] * gamma[k] * inv + (xs[k] - mean_hi) * x_coef + const
    for k in range(head, body_end, _VECTOR_BYTES // dxs.itemsize):
        _stream_dx_per_element(dxs, k, ds, xs, gamma, inv, mean_hi, x_coef, const)
    for k in range(body_end, dxs.size):
        dxs[k] = ds[k] * gamma[k] * inv + (xs[k] - mean_hi) * x_coef + const


@jit()
def _affine_channels(xs, ys, mean_hi, scale, shift, stream):
    """ys = (xs - mean_hi) * scale + shift with per-element coefficients, all (K,) of x's dtype."""
    head, body_end = _streamed_range(ys, ys.size) if stream else (ys.size, ys.size)
    for k in range(head):
        ys[k] = (xs[k] - mean_hi[k]) * scale[k] + shift[k]
    for k in range(head, body_end, _VECTOR_BYTES // ys.itemsize):
        _stream_affine_channels(ys, k, xs, mean_hi, scale, shift)
    for k in range(body_end, ys.size):
        ys[k] = (xs[k] - mean_hi[k]) * scale[k] + shift[k]


@jit()
def _dx_channels(ds, xs, dxs, dy_coef, mean_hi, x_coef, const, stream):
    """dxs = ds * dy_coef + (xs - mean_hi) * x_coef + const, per-element coefficients (K,)."""
    head, body_end = _streamed_range(dxs, dxs.size) if stream else (dxs.size, dxs.size)
    for k in range(head):
        dxs[k] = ds[k] * dy_coef[k] + (xs[k] - mean_hi[k]) * x_coef[k] + const[k]
    for k in range(head, body_end, _VECTOR_BYTES // dxs.itemsize):
        _stream_dx_channels(dxs, k, ds, xs, dy_coef, mean_hi, x_coef, const)
    for k in range(body_end, dxs.size):
        dxs[k] = ds[k] * dy_coef[k] + (xs[k] - mean_hi[k]) * x_coef[k] + const[k]


@jit()
def _streams(out):
    """Whether to write ``out`` with non-temporal stores: when it is larger than the L3 cache
    (never as plain Python, NUMBA_DISABLE_JIT=1, where the vector intrinsics do not exist)."""
    return _JIT_ENABLED and out.nbytes >= STREAM_MIN_BYTES


# ---------------------------------------------------------------------------------------------
# Group driver: statistics and output of one group (v, g)
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _block_sum(xs):
    """sum(xs) in xs's dtype; xs: (<= _BLOCK,) contiguous."""
    total = _cast_like(xs, 0.0)
    for k in range(xs.size):
        total += xs[k]
    return total


@jit(reduction=True)
def _block_dev_sums(xs, shift):
    """(sum(d), sum(d^2)) with d = xs - shift, in xs's dtype; xs: (<= _BLOCK,) contiguous."""
    s1 = _cast_like(xs, 0.0)
    s2 = _cast_like(xs, 0.0)
    for k in range(xs.size):
        d = xs[k] - shift
        s1 += d
        s2 += d * d
    return s1, s2


@jit()
def _sum(xs):
    """sum(xs), block sums added in float64; xs: (K,) contiguous."""
    total = 0.0
    for b0 in range(0, xs.size, _BLOCK):
        total += _block_sum(xs[b0:b0 + _BLOCK])
    return total


@jit()
def _dev_sums(xs, shift):
    """(sum(xs - shift), sum((xs - shift)^2)), block sums added in float64; xs: (K,) contiguous."""
    s1 = 0.0
    s2 = 0.0
    for b0 in range(0, xs.size, _BLOCK):
        a, b = _block_dev_sums(xs[b0:b0 + _BLOCK], shift)
        s1 += a
        s2 += b
    return s1, s2


@jit()
def _moments_from_sums(shift, s1, s2, count, centered):
    """Mean and biased variance from the sums of d = x - shift and d^2 over ``count`` values:
    mean = shift + mean(d), var = mean(d^2) - mean(d)^2 (the corrected two-pass formula: the
    shift is a first estimate of the mean, so mean(d)^2 is tiny and nothing cancels)."""
    if not centered:
        return 0.0, s2 / count
    mean_dev = s1 / count
    return shift + mean_dev, max(s2 / count - mean_dev * mean_dev, 0.0)


@jit()
def _group_moments(x3, n0, n1, g, centered):
    """Mean and biased variance (float64) of x3[n0:n1, g, :] — x3: (N, G, K).

    Two passes: a first mean (block sums), rounded to x's dtype as the shift; then the sums of
    d = x - shift and d^2. Blocks of _BLOCK float32 values carry a relative error of a few
    float32 ulps of their own sum, which the float64 total does not grow further; the shift
    makes d of the order of the spread, so the variance does not lose digits to the mean.
    """
    count = (n1 - n0) * x3.shape[2]
    shift = _cast_like(x3, 0.0)
    if centered:
        total = 0.0
        for n in range(n0, n1):
            total += _sum(x3[n, g])
        shift = _cast_like(x3, total / count)
    s1 = 0.0
    s2 = 0.0
    for n in range(n0, n1):
        a, b = _dev_sums(x3[n, g], shift)
        s1 += a
        s2 += b
    return _moments_from_sums(np.float64(shift), s1, s2, count, centered)


@jit()
def _apply_group(x3, y3, n0, n1, g, L, mean, inv_std, gamma2, beta2, stream):
    """y = (x - mean) * inv_std * gamma + beta on rows n0:n1 of group g — x3, y3: (N, G, Cg * L)."""
    gamma = gamma2[g]                          # (Cg,)
    beta = beta2[g]
    Cg = gamma.size
    mean_hi = _cast_like(x3, mean)
    mean_lo = mean - mean_hi
    if L == 1:                                 # gamma per element of the row (layer norm)
        inv = _cast_like(x3, inv_std)
        shift = _cast_like(x3, -mean_lo * inv_std)
        for n in range(n0, n1):
            _affine_per_element(x3[n, g], y3[n, g], gamma, beta, mean_hi, inv, shift, stream)
        return
    for c in range(Cg):
        scale64 = inv_std * gamma[c]
        scale = _cast_like(x3, scale64)
        shift = _cast_like(x3, beta[c] - mean_lo * scale64)
        for n in range(n0, n1):
            _affine(x3[n, g][c * L:(c + 1) * L], y3[n, g][c * L:(c + 1) * L], mean_hi, scale,
                    shift, stream)


@jit()
def _forward_group_item(s, x3, y3, B, L, gamma2, beta2, eps, centered, mean, var, mode, stream):
    """Group s = v * G + g: statistics into mean[v, g], var[v, g] and/or the output y."""
    G = x3.shape[1]
    v, g = s // G, s % G
    n0, n1 = v * B, (v + 1) * B
    if mode != APPLY_ONLY:
        mean[v, g], var[v, g] = _group_moments(x3, n0, n1, g, centered)
    if mode != STATS_ONLY:
        _apply_group(x3, y3, n0, n1, g, L, mean[v, g], 1.0 / np.sqrt(var[v, g] + eps), gamma2,
                     beta2, stream)


# ---------------------------------------------------------------------------------------------
# Row-chunk driver: statistics per channel over chunks of whole rows, merged per row-group
# ---------------------------------------------------------------------------------------------

@jit()
def _chunk_rows(B, C, itemsize):
    """Rows per chunk: about _CHUNK_BYTES of input, at least 8, at most B (shape only)."""
    return min(B, max(8, _CHUNK_BYTES // (C * itemsize)))


@jit()
def _chunk_bounds(item, B, R, J):
    """Rows [r0, r1) of chunk j of row-group v, item = v * J + j."""
    v, j = item // J, item % J
    r0 = v * B + j * R
    return v, j, r0, min(r0 + R, (v + 1) * B)


@jit()
def _rows_sum(x2, r0, r1, total):
    """total[c] += sum of x2[r0:r1, c] — x2: (N, C); total (C,) float64; rows added in x's dtype
    in blocks of _ROW_BLOCK."""
    block = np.empty(x2.shape[1], x2.dtype)    # (C,)
    for b0 in range(r0, r1, _ROW_BLOCK):
        block[:] = 0
        for n in range(b0, min(b0 + _ROW_BLOCK, r1)):
            xr = x2[n]                         # (C,)
            for c in range(xr.size):
                block[c] += xr[c]
        for c in range(block.size):
            total[c] += block[c]


@jit()
def _rows_dev_sums(x2, r0, r1, shift, s1, s2):
    """s1[c] += sum(d), s2[c] += sum(d^2) over rows r0:r1, d = x2[n, c] - shift[c]."""
    b1 = np.empty(x2.shape[1], x2.dtype)       # (C,)
    b2 = np.empty(x2.shape[1], x2.dtype)
    for b0 in range(r0, r1, _ROW_BLOCK):
        b1[:] = 0
        b2[:] = 0
        for n in range(b0, min(b0 + _ROW_BLOCK, r1)):
            xr = x2[n]
            for c in range(xr.size):
                d = xr[c] - shift[c]
                b1[c] += d
                b2[c] += d * d
        for c in range(b1.size):
            s1[c] += b1[c]
            s2[c] += b2[c]


@jit()
def _chunk_stats_item(item, x2, B, R, J, centered, chunk_mean, chunk_m2):
    """Mean and M2 = sum((x - mean)^2) of each channel over one chunk of rows, into
    chunk_mean[v, j], chunk_m2[v, j] (C,), float64 (M2 is the sum of squares if not centered)."""
    v, j, r0, r1 = _chunk_bounds(item, B, R, J)
    C = x2.shape[1]
    count = r1 - r0
    shift = np.zeros(C, x2.dtype)              # (C,) the chunk's first mean, x's dtype
    mean = chunk_mean[v, j]                    # (C,) output views
    m2 = chunk_m2[v, j]
    if centered:
        mean[:] = 0.0
        _rows_sum(x2, r0, r1, mean)
        for c in range(C):
            shift[c] = mean[c] / count
    s1 = np.zeros(C)
    m2[:] = 0.0
    _rows_dev_sums(x2, r0, r1, shift, s1, m2)
    for c in range(C):                         # mean = shift + mean(d), M2 = sum(d^2) - sum(d)^2/n
        if centered:
            mean_dev = s1[c] / count
            mean[c] = shift[c] + mean_dev
            m2[c] = max(m2[c] - s1[c] * mean_dev, 0.0)
        else:
            mean[c] = 0.0


@jit()
def _merge_chunks_item(item, B, R, J, centered, chunk_mean, chunk_m2, mean, var):
    """Channels [c0, c0 + _MERGE_BLOCK) of row-group v (item = v * blocks + b): merge the chunk
    statistics in order j = 0, 1, ... (Chan et al.: with delta = mean_j - mean,
    mean += delta * n_j / n and M2 += M2_j + delta^2 * n_prev * n_j / n)."""
    C = mean.shape[1]
    blocks = (C + _MERGE_BLOCK - 1) // _MERGE_BLOCK
    v, b = item // blocks, item % blocks
    c0 = b * _MERGE_BLOCK
    c1 = min(c0 + _MERGE_BLOCK, C)
    m = mean[v, c0:c1]                         # (w,) output views
    m2 = var[v, c0:c1]
    m[:] = chunk_mean[v, 0, c0:c1]
    m2[:] = chunk_m2[v, 0, c0:c1]
    count = min(R, B)
    for j in range(1, J):
        n_j = min(R, B - j * R)
        total = count + n_j
        weight = n_j / total
        cross = count * weight
        mj = chunk_mean[v, j, c0:c1]
        m2j = chunk_m2[v, j, c0:c1]
        for c in range(m.size):
            delta = mj[c] - m[c] if centered else 0.0
            m[c] += delta * weight
            m2[c] += m2j[c] + delta * delta * cross
        count = total
    for c in range(m2.size):
        m2[c] /= B                             # M2 -> biased variance, in place


@jit()
def _affine_coefficients(x2, mean, var, eps, gamma, beta):
    """Per (v, c), in x's dtype: mean_hi, scale = gamma * inv_std, shift = beta - mean_lo * scale;
    each (V, C)."""
    V, C = mean.shape
    mean_hi = np.empty((V, C), x2.dtype)
    scale = np.empty((V, C), x2.dtype)
    shift = np.empty((V, C), x2.dtype)
    for v in range(V):
        _affine_coefficients_row(mean[v], var[v], eps, gamma, beta, mean_hi[v], scale[v], shift[v])
    return mean_hi, scale, shift


@jit()
def _affine_coefficients_row(mean, var, eps, gamma, beta, mean_hi, scale, shift):
    """One row-group of _affine_coefficients; every array (C,) contiguous, so it vectorizes."""
    for c in range(mean.size):
        mean64 = mean[c]
        mean_rounded = _cast_like(mean_hi, mean64)   # a local, not a read back: vectorizes
        scale64 = gamma[c] / np.sqrt(var[c] + eps)
        mean_hi[c] = mean_rounded
        scale[c] = scale64
        shift[c] = beta[c] - (mean64 - mean_rounded) * scale64


@jit()
def _chunk_apply_item(item, x2, y2, B, R, J, mean_hi, scale, shift, stream):
    v, j, r0, r1 = _chunk_bounds(item, B, R, J)
    for n in range(r0, r1):
        _affine_channels(x2[n], y2[n], mean_hi[v], scale[v], shift[v], stream)


def _forward_loop(x4, B, gamma2, beta2, eps, centered, y4, mean, var, mode):
    N, G, Cg, L = x4.shape
    stream = _streams(y4)
    if Cg * L == 1 and B > 1:
        x2 = x4.reshape((N, G))
        y2 = y4.reshape((N, G))
        V = N // B
        R = _chunk_rows(B, G, x4.itemsize)
        J = (B + R - 1) // R
        if mode != APPLY_ONLY:
            chunk_mean = np.empty((V, J, G))   # (V, J, C) per-chunk statistics
            chunk_m2 = np.empty((V, J, G))
            for item in prange(V * J):
                _chunk_stats_item(item, x2, B, R, J, centered, chunk_mean, chunk_m2)
            for item in prange(V * ((G + _MERGE_BLOCK - 1) // _MERGE_BLOCK)):
                _merge_chunks_item(item, B, R, J, centered, chunk_mean, chunk_m2, mean, var)
        if mode != STATS_ONLY:
            mean_hi, scale, shift = _affine_coefficients(x2, mean, var, eps, gamma2.reshape(G),
                                                         beta2.reshape(G))
            for item in prange(V * J):
                _chunk_apply_item(item, x2, y2, B, R, J, mean_hi, scale, shift, stream)
    else:
        x3 = x4.reshape((N, G, Cg * L))
        y3 = y4.reshape((N, G, Cg * L))
        for s in prange((N // B) * G):
            _forward_group_item(s, x3, y3, B, L, gamma2, beta2, eps, centered, mean, var, mode,
                                stream)


_forward_serial, _forward_parallel = serial_and_parallel(_forward_loop)


@jit()
def _forward(x4, B, gamma2, beta2, eps, centered, y4, mean, var, mode):
    if x4.size < PARALLEL_MIN_SIZE:
        _forward_serial(x4, B, gamma2, beta2, eps, centered, y4, mean, var, mode)
    else:
        _forward_parallel(x4, B, gamma2, beta2, eps, centered, y4, mean, var, mode)


@jit()
def forward_train(x4, B, gamma2, beta2, eps, centered, y4=None):
    """Normalize with the statistics of each group: returns (y4, mean, var), stats (N // B, G).

    x4, y4 (N, G, Cg, L) C-contiguous, same dtype (y4 given: written into; None: allocated);
    gamma2, beta2 (G, Cg); var is biased, float64.
    """
    y4 = output_like(x4, y4)
    shape = (x4.shape[0] // B, x4.shape[1])
    mean = np.empty(shape)
    var = np.empty(shape)
    _forward(x4, B, gamma2, beta2, eps, centered, y4, mean, var, STATS_AND_APPLY)
    return y4, mean, var


@jit()
def moments(x4, B, centered):
    """Mean and biased variance of each group, float64 (N // B, G); x4 (N, G, Cg, L)."""
    shape = (x4.shape[0] // B, x4.shape[1])
    mean = np.empty(shape)
    var = np.empty(shape)
    gamma2 = np.empty((x4.shape[1], x4.shape[2]), x4.dtype)   # unused without the output pass
    _forward(x4, B, gamma2, gamma2, 1.0, centered, x4, mean, var, STATS_ONLY)
    return mean, var


@jit()
def apply(x4, B, mean, var, eps, gamma2, beta2, y4=None):
    """y4 = (x - mean) / sqrt(var + eps) * gamma + beta with given statistics (N // B, G), float64."""
    y4 = output_like(x4, y4)
    _forward(x4, B, gamma2, beta2, eps, True, y4, mean, var, APPLY_ONLY)
    return y4


# ---------------------------------------------------------------------------------------------
# Backward, group driver
# ---------------------------------------------------------------------------------------------

@jit(reduction=True)
def _block_sums_dy(ds, xs, shift):
    """(sum(dy), sum(dy * (x - shift))) in x's dtype; ds, xs: (<= _BLOCK,) contiguous."""
    sum_dy = _cast_like(xs, 0.0)
    sum_dy_dev = _cast_like(xs, 0.0)
    for k in range(ds.size):
        d = ds[k]
        sum_dy += d
        sum_dy_dev += d * (xs[k] - shift)
    return sum_dy, sum_dy_dev


@jit()
def _sums_dy(ds, xs, mean):
    """(sum(dy), sum(dy * (x - mean))), block sums (as in _sum) added in float64; (K,) contiguous.

    With shift = mean rounded to x's dtype, sum(dy * (x - mean)) = sum(dy * (x - shift))
    - (mean - shift) * sum(dy); x - shift is exact for x near the mean.
    """
    shift = _cast_like(xs, mean)
    sum_dy = 0.0
    sum_dy_dev = 0.0
    for b0 in range(0, xs.size, _BLOCK):
        a, b = _block_sums_dy(ds[b0:b0 + _BLOCK], xs[b0:b0 + _BLOCK], shift)
        sum_dy += a
        sum_dy_dev += b
    return sum_dy, sum_dy_dev - (mean - shift) * sum_dy


@jit(reduction=True)
def _row_sums_dy(ds, xs, mean, inv_std, gamma, sum_dy, sum_dy_xhat):
    """One row of a per-element-gamma group (layer norm): adds dy and dy * xhat into sum_dy,
    sum_dy_xhat (D,); returns (sum(gamma * dy), sum(gamma * dy * (x - mean)))."""
    total_dy = 0.0
    total_dy_dev = 0.0
    for k in range(ds.size):
        d = np.float64(ds[k])
        dev = xs[k] - mean
        gd = gamma[k] * d
        sum_dy[k] += d
        sum_dy_xhat[k] += d * dev * inv_std
        total_dy += gd
        total_dy_dev += gd * dev
    return total_dy, total_dy_dev


@jit()
def _backward_group(dy3, x3, dx3, n0, n1, g, L, mean, inv_std, gamma, centered, frozen,
                    sum_dy, sum_dy_xhat, stream):
    """dx for rows n0:n1 of group g; adds the group's per-channel dbeta/dgamma into sum_dy,
    sum_dy_xhat (Cg,). dy3, x3, dx3: (N, G, Cg * L); gamma: (Cg,)."""
    Cg = gamma.size
    total_dy = 0.0                             # sum over the group of gamma * dy
    total_dy_dev = 0.0                         # sum over the group of gamma * dy * (x - mean)
    if L == 1:
        for n in range(n0, n1):
            t_dy, t_dy_dev = _row_sums_dy(dy3[n, g], x3[n, g], mean, inv_std, gamma, sum_dy,
                                          sum_dy_xhat)
            total_dy += t_dy
            total_dy_dev += t_dy_dev
    else:
        for c in range(Cg):
            s_dy = 0.0
            s_dy_dev = 0.0
            for n in range(n0, n1):
                a, b = _sums_dy(dy3[n, g][c * L:(c + 1) * L], x3[n, g][c * L:(c + 1) * L], mean)
                s_dy += a
                s_dy_dev += b
            sum_dy[c] += s_dy
            sum_dy_xhat[c] += s_dy_dev * inv_std
            total_dy += gamma[c] * s_dy
            total_dy_dev += gamma[c] * s_dy_dev
    count = (n1 - n0) * Cg * L
    mean_dxhat = total_dy / count if centered and not frozen else 0.0
    mean_dxhat_xhat = total_dy_dev * inv_std / count if not frozen else 0.0
    # dx = inv_std * (gamma * dy - mean_dxhat - (x - mean) * inv_std * mean_dxhat_xhat)
    x_coef64 = -inv_std * inv_std * mean_dxhat_xhat
    mean_hi = _cast_like(x3, mean)
    x_coef = _cast_like(x3, x_coef64)
    const = _cast_like(x3, -inv_std * mean_dxhat - (mean - mean_hi) * x_coef64)
    if L == 1:
        inv = _cast_like(x3, inv_std)
        for n in range(n0, n1):
            _dx_per_element(dy3[n, g], x3[n, g], dx3[n, g], gamma, inv, mean_hi, x_coef, const,
                            stream)
        return
    for c in range(Cg):
        dy_coef = _cast_like(x3, inv_std * gamma[c])
        for n in range(n0, n1):
            span = slice(c * L, (c + 1) * L)
            _dx(dy3[n, g][span], x3[n, g][span], dx3[n, g][span], dy_coef, mean_hi, x_coef, const,
                stream)


@jit()
def _backward_group_item(item, dy3, x3, dx3, B, L, mean, var, eps, gamma2, centered, frozen,
                         chunk_groups, part_dy, part_dy_xhat, stream):
    """Groups (v, g) for v in chunk j = item // G: dx, and the chunk's partial dbeta/dgamma."""
    G = x3.shape[1]
    j, g = item // G, item % G
    V = x3.shape[0] // B
    for v in range(j * chunk_groups, min((j + 1) * chunk_groups, V)):
        _backward_group(dy3, x3, dx3, v * B, (v + 1) * B, g, L, mean[v, g],
                        1.0 / np.sqrt(var[v, g] + eps), gamma2[g], centered, frozen,
                        part_dy[j, g], part_dy_xhat[j, g], stream)


# ---------------------------------------------------------------------------------------------
# Backward, row-chunk driver
# ---------------------------------------------------------------------------------------------

@jit()
def _rows_sums_dy(dy2, x2, r0, r1, mean, s_dy, s_dy_dev):
    """s_dy[c] += sum(dy), s_dy_dev[c] += sum(dy * (x - mean[c])) over rows r0:r1, float64."""
    for n in range(r0, r1):
        xr = x2[n]                             # (C,)
        dr = dy2[n]
        for c in range(xr.size):
            d = np.float64(dr[c])
            s_dy[c] += d
            s_dy_dev[c] += d * (xr[c] - mean[c])


@jit()
def _chunk_sums_dy_item(item, dy2, x2, B, R, J, mean, chunk_dy, chunk_dy_dev):
    v, j, r0, r1 = _chunk_bounds(item, B, R, J)
    chunk_dy[v, j] = 0.0
    chunk_dy_dev[v, j] = 0.0
    _rows_sums_dy(dy2, x2, r0, r1, mean[v], chunk_dy[v, j], chunk_dy_dev[v, j])


@jit()
def _dx_coefficients(x2, B, J, mean, var, eps, gamma, centered, frozen, chunk_dy, chunk_dy_dev,
                     part_dy, part_dy_xhat):
    """Per (v, c): the chunk sums added in order into dbeta/dgamma of row-group v (part_dy,
    part_dy_xhat (V, C, 1)), and dx's coefficients in x's dtype (dy_coef, mean_hi, x_coef,
    const), each (V, C)."""
    V, C = mean.shape
    dy_coef = np.empty((V, C), x2.dtype)
    mean_hi = np.empty((V, C), x2.dtype)
    x_coef = np.empty((V, C), x2.dtype)
    const = np.empty((V, C), x2.dtype)
    s_dy = np.empty(C)                         # (C,) sums over the row-group
    s_dy_dev = np.empty(C)
    for v in range(V):
        s_dy[:] = chunk_dy[v, 0]
        s_dy_dev[:] = chunk_dy_dev[v, 0]
        for j in range(1, J):
            _add(s_dy, chunk_dy[v, j])
            _add(s_dy_dev, chunk_dy_dev[v, j])
        _dx_coefficients_row(mean[v], var[v], eps, gamma, B, centered, frozen, s_dy, s_dy_dev,
                             part_dy[v].reshape(C), part_dy_xhat[v].reshape(C), dy_coef[v],
                             mean_hi[v], x_coef[v], const[v])
    return dy_coef, mean_hi, x_coef, const


@jit()
def _add(total, part):
    for c in range(total.size):
        total[c] += part[c]


@jit()
def _dx_coefficients_row(mean, var, eps, gamma, B, centered, frozen, s_dy, s_dy_dev, dbeta,
                         dgamma, dy_coef, mean_hi, x_coef, const):
    """One row-group of _dx_coefficients, every array (C,)."""
    for c in range(mean.size):
        inv_std = 1.0 / np.sqrt(var[c] + eps)
        gamma_c = np.float64(gamma[c])
        dbeta[c] = s_dy[c]
        dgamma[c] = s_dy_dev[c] * inv_std
        mean_dxhat = gamma_c * s_dy[c] / B if centered and not frozen else 0.0
        mean_dxhat_xhat = gamma_c * s_dy_dev[c] * inv_std / B if not frozen else 0.0
        x_coef64 = -inv_std * inv_std * mean_dxhat_xhat
        mean64 = mean[c]
        mean_rounded = _cast_like(mean_hi, mean64)
        mean_hi[c] = mean_rounded
        dy_coef[c] = inv_std * gamma_c
        x_coef[c] = x_coef64
        const[c] = -inv_std * mean_dxhat - (mean64 - mean_rounded) * x_coef64


@jit()
def _chunk_dx_item(item, dy2, x2, dx2, B, R, J, dy_coef, mean_hi, x_coef, const, stream):
    v, j, r0, r1 = _chunk_bounds(item, B, R, J)
    for n in range(r0, r1):
        _dx_channels(dy2[n], x2[n], dx2[n], dy_coef[v], mean_hi[v], x_coef[v], const[v], stream)


@jit()
def _sum_chunks(part):
    """part.sum(axis=0) for part (J, G, Cg), adding the chunks in order j = 0, 1, ..."""
    total = np.zeros(part.shape[1:])
    for j in range(part.shape[0]):
        total += part[j]
    return total


def _backward_loop(dy4, x4, B, gamma2, mean, var, eps, centered, frozen, dx4):
    N, G, Cg, L = x4.shape
    V = N // B
    stream = _streams(dx4)
    if Cg * L == 1 and B > 1:
        x2 = x4.reshape((N, G))
        dy2 = dy4.reshape((N, G))
        dx2 = dx4.reshape((N, G))
        R = _chunk_rows(B, G, x4.itemsize)
        J = (B + R - 1) // R
        chunk_dy = np.empty((V, J, G))             # (V, J, C) per-chunk sums
        chunk_dy_dev = np.empty((V, J, G))
        for item in prange(V * J):
            _chunk_sums_dy_item(item, dy2, x2, B, R, J, mean, chunk_dy, chunk_dy_dev)
        part_dy = np.empty((V, G, 1))              # (V, C, 1) dbeta of each row-group
        part_dy_xhat = np.empty((V, G, 1))         # (V, C, 1) dgamma of each row-group
        dy_coef, mean_hi, x_coef, const = _dx_coefficients(
            x2, B, J, mean, var, eps, gamma2.reshape(G), centered, frozen, chunk_dy, chunk_dy_dev,
            part_dy, part_dy_xhat)
        for item in prange(V * J):
            _chunk_dx_item(item, dy2, x2, dx2, B, R, J, dy_coef, mean_hi, x_coef, const, stream)
    else:
        x3 = x4.reshape((N, G, Cg * L))
        dy3 = dy4.reshape((N, G, Cg * L))
        dx3 = dx4.reshape((N, G, Cg * L))
        chunks = min(V, _MAX_CHUNKS)
        chunk_groups = (V + chunks - 1) // chunks
        part_dy = np.zeros((chunks, G, Cg))        # (J, G, Cg) partial dbeta per row-chunk
        part_dy_xhat = np.zeros((chunks, G, Cg))   # (J, G, Cg) partial dgamma per row-chunk
        for item in prange(chunks * G):
            _backward_group_item(item, dy3, x3, dx3, B, L, mean, var, eps, gamma2, centered,
                                 frozen, chunk_groups, part_dy, part_dy_xhat, stream)
    return _sum_chunks(part_dy_xhat), _sum_chunks(part_dy)


_backward_serial, _backward_parallel = serial_and_parallel(_backward_loop)


@jit()
def _backward(dy4, x4, B, gamma2, mean, var, eps, centered, frozen, dx4):
    if x4.size < PARALLEL_MIN_SIZE:
        dgamma2, dbeta2 = _backward_serial(dy4, x4, B, gamma2, mean, var, eps, centered, frozen, dx4)
    else:
        dgamma2, dbeta2 = _backward_parallel(dy4, x4, B, gamma2, mean, var, eps, centered, frozen,
                                             dx4)
    return dx4, dgamma2, dbeta2


@jit()
def backward(dy4, x4, B, gamma2, mean, var, eps, centered, dx4=None):
    """Gradient of forward_train: returns (dx4, dgamma2, dbeta2), dgamma2/dbeta2 float64 (G, Cg).
    dy4, x4, dx4 (N, G, Cg, L) C-contiguous (dx4 None: allocated); mean, var (N // B, G) as
    forward_train returned them."""
    return _backward(dy4, x4, B, gamma2, mean, var, eps, centered, False, output_like(x4, dx4))


@jit()
def backward_frozen(dy4, x4, gamma2, mean, var, eps, dx4=None):
    """Gradient with the statistics held constant (evaluation mode):
    dx = dy * gamma / sqrt(var + eps); returns (dx4, dgamma2, dbeta2). mean, var: (1, G) float64."""
    return _backward(dy4, x4, x4.shape[0], gamma2, mean, var, eps, True, True,
                     output_like(x4, dx4))
