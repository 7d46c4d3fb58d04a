"""The statistics engine: one forward, one backward and one running-statistics update for every
normalizer that reduces over axes (batch, ghost, renorm, recurrent, group, instance, layer, RMS).

A norm is a view of its input and an integer ``B``; the engine never sees anything else::

    x4: (N, G, K, L)  C-contiguous. Statistics per (v, g) over the rows n in [v*B, (v+1)*B) and
                      all k, l; affine per channel (g, k): y = gamma2[g, k] * xhat + beta2[g, k]
    mask2: (N, L)     bool, optional: False marks a padded position. It enters no statistic, its
                      output is 0 and its gradient 0.
    stats: (V, G)     float64 mean and biased variance, V = N // B; count (V,) valid values

    batch          (N, C, *S) -> (N, C, 1, L)      B = N        stats (1, C)   mask (N, L)
    batch axis=-1  (*R, C)    -> (R, C, 1, 1)      B = R        stats (1, C)   mask (R, 1)
    ghost          (N, C, *S) -> (N, C, 1, L)      B = virtual  stats (N/B, C)
    recurrent      (T, N, C)  -> (T*N, C, 1, 1)    B = N        stats (T, C)   mask (T*N, 1)
    group          (N, C, *S) -> (N, G, C/G, L)    B = 1        stats (N, G)
    group axis=-1  (N, *S, C) -> (N*S, G, C/G, 1)  B = S        stats (N, G)
    layer / rms    (*R, *D)   -> (R, 1, D, 1)      B = 1        stats (R, 1)

Forward, per group (v, g) with M valid values; everything in float64 whatever the input's
dtype, rounded once when stored (so float32 neither overflows in x^2 near its maximum nor
loses the spread to a large mean)::

    shift = sum(x) / M                              (first pass: an estimate of the mean)
    mean  = shift + sum(x - shift) / M              var = sum((x - shift)^2) / M - (mean - shift)^2
    y     = (x - mean) * (gamma * inv_std) + beta   inv_std = 1 / sqrt(var + eps)

``centered=False`` is RMS norm: mean = 0 and var = mean(x^2). Backward, with
xhat = (x - mean) * inv_std and dxhat = gamma * dy::

    dbeta  = sum dy                 dgamma = sum dy * xhat          (per channel, over n, l)
    dx     = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))     (group means)
           = dy * (gamma * inv_std) + (x - mean) * c2 + c3
             c2 = -inv_std^3 * sum(gamma dy (x - mean)) / M        c3 = -inv_std * sum(gamma dy) / M

(RMS: c3 = 0. ``frozen``, statistics held constant as in evaluation mode: c2 = c3 = 0.)

Two layouts share those formulas, one result per group whatever the number of threads (each
group is reduced by one thread in a fixed order, so serial and parallel runs agree bit for bit):

- *planes* (``K * L > 1`` or ``B == 1``): a work item is a group; each of its rows is one
  contiguous run x4[n, g] of K * L values (a channel plane; with L == 1, a layer-norm row).
- *columns* (``K * L == 1`` and ``B > 1``: batch norm of (N, C), channels-last, recurrent): a
  channel's values are C apart, so an item takes a fixed chunk of whole rows (contiguous, every
  channel) and computes each channel's count, mean and M2; the chunks of a row-group are merged
  in chunk order (Chan et al.'s pairwise update). The chunk size depends on the shape only.

The fast planes drivers (below) exist twice, for *rows* (``L == 1``: gamma per element of the
row: layer norm, RMS, group norm channels-last) and for channel planes (``L > 1``): the items'
branches that differ test the module constant ``_ROWS``, which Numba reads at compile time and
prunes, and the fast drivers are copies that see ``_ROWS = 1`` or ``0``
(``serial_and_parallel(..., _ROWS=1)``); the full planes drivers take both kinds, chosen by L.
So a first batch norm on images compiles no layer-norm output code.

Every driver takes its flags as runtime arguments, so each compiles once per dtype. Each
driver has a serial and a parallel twin compiled from the same source and picked by the
input's size; ``run_forward``/``run_backward`` pick the drivers of one layout and size from
Python and so compile only those (a first batch norm on images never compiles the layer-norm
rows or the columns code). Jitted callers take ``forward``/``backward`` (every driver) or
``forward_serial``/``backward_serial``.

Shapes are checked once per call, by whoever calls a driver: the jitted entry points
(:func:`forward`, :func:`backward` and their ``_serial`` forms, which the public kernels call)
check what the drivers index with (ValueError naming the argument) and count the valid values;
:func:`run_forward`/:func:`run_backward` (the ``Norm`` classes, which check x, mask and out in
Python and build every other array themselves) do not, so a first call from a ``Norm``
compiles no checks. The drivers allocate nothing either: the planes backward takes its scratch
from its caller (:func:`_planes_work`), so no NumPy allocation code is compiled into them.

A work item runs its fast path (in x's dtype, unmasked, no overflow) and falls back to float64
loops where it cannot (a masked call, sums that overflow x's dtype; planes: x - mean that
could). Every driver also exists over the fast paths alone (``fast_forward_planes``,
``fast_backward_columns``...): an unmasked call from Python runs one, which returns True if
any item needed the float64 loops, and only then the full driver, which computes every item
again from scratch. So a first unmasked call compiles no float64 loops, and results are the
same as the full driver's bit for bit.

Compile cost: Numba links a jitted callee's optimized code into each caller and optimizes and
compiles it again there, so a work item compiled on its own costs its LLVM work twice. The
planes items are therefore inlined at Numba IR level (``inline=True``) into the serial twins of
their drivers (which take the items' reduction flags), as are the columns drivers' coefficient
loops (:func:`_apply_coefficients`, :func:`_rows_coefficients`). The threaded twins call them
as functions of their own (``serial_and_parallel(..., serial_inline=True)``): Numba's parallel
passes cost more on the larger loop body than inlining saves there. The columns work items
stay functions of their own in both twins: with the reduction flags on the columns drivers,
masked float64 results moved by 1 ulp.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload, register_jitable

from ._jit import jit, serial_and_parallel

#: Inputs with fewer elements than this run on the calling thread only.
PARALLEL_MIN_SIZE = 1 << 15

#: The mask of an unmasked call (``masked=False``): never read.
NO_MASK = np.ones((1, 1), np.bool_)

# Forward modes.
STATS_AND_APPLY = 0     # statistics, then y (training)
STATS_ONLY = 1          # statistics only (batch renorm computes its correction in between)
APPLY_ONLY = 2          # y with given statistics (evaluation, renorm)

# Backward: dgamma/dbeta of the planes driver are summed per chunk of row-groups, then the
# chunks are added in order: a fixed chunk count keeps the result independent of the threads.
_MAX_CHUNKS = 64
# Columns driver: a chunk of rows covers about this many bytes, so its passes find it in L2.
_CHUNK_BYTES = 1 << 18
_MERGE_BLOCK = 256      # channels per work item when merging chunk statistics

# The fast loops sum blocks of this many values (planes) or rows (columns) in the input's dtype
# (SIMD lanes of float32 for float32 data), then add the block sums in float64. A block whose
# float32 sum overflows (|x| near the float32 maximum) sends its group to the exact float64 loops.
_BLOCK = 512
_ROW_BLOCK = 64

# Outputs of at least this many bytes (more than the L3 cache) are written with non-temporal
# stores: they go to memory without first reading the destination's cache lines.
STREAM_MIN_BYTES = 8 << 20
_JIT_ENABLED = not numba.config.DISABLE_JIT
_VECTOR_BYTES = 32
_LINE_BYTES = 64

# Which of the planes items' branches a driver compiles: those for rows (1: L == 1, gamma per
# element, a layer-norm row), for channel planes (0: L > 1), or both, chosen by L at run time
# (-1). Numba reads a global as a constant and prunes the branches a fixed choice excludes. The
# full drivers take both (they also serve the jitted entry points, which would otherwise compile
# two); the fast drivers are copies that see 1 or 0, so a first call compiles one kind only.
_ROWS = -1

# What a work item still needs after its fast path (in x's dtype, no mask, no overflow).
_DONE, _NEEDS_STATS, _NEEDS_Y = 0, 1, 2

# Driver phases: planes do everything in one; columns take three forward and two backward.
_PLANES, _CHUNK_STATS, _MERGE, _ROWS_APPLY = 0, 1, 2, 3
_ROWS_SUMS, _ROWS_DX = 1, 3


def _cast_like(a, value):
    """``value`` as a scalar of ``a``'s dtype."""
    return a.dtype.type(value)


@overload(_cast_like)
def _cast_like_jit(a, value):
    dtype = a.dtype
    return lambda a, value: dtype(value)


@jit()
def _extreme(x, mean, var, count):
    """Whether x - mean may overflow x's dtype for values of this group (|mean| + the largest
    possible deviation, sqrt(count * var), beyond half the dtype's maximum): such groups take
    the float64 loops (planes) or are written as x * scale + (shift - mean * scale) (columns,
    where the spread is then so large that the cancellation costs nothing)."""
    limit = 1.7e38 if x.itemsize == 4 else 8.9e307
    return abs(mean) + np.sqrt(var * max(count, 1.0)) > limit


@jit(inline=True)
def _means_hi(mean, var, count, v, out, k):
    """out[k, v] (C,) in out's dtype: the means of row-group v (C,) rounded, or 0 where x - mean
    could overflow (:func:`_extreme`)."""
    for c in range(out.shape[2]):
        extreme = _extreme(out, mean[v, c], var[v, c], count[v])
        out[k, v, c] = _cast_like(out, 0.0) if extreme else _cast_like(out, mean[v, c])


@jit()
def _chunk_rows(B, C, itemsize):
    """Rows per chunk of the columns driver: about _CHUNK_BYTES, at least 8, at most B."""
    return min(B, max(8, _CHUNK_BYTES // (C * itemsize)))


@jit()
def check_view(x4, B, mask2, masked, mean, var, count):
    """Shape checks of the engine's arguments: raises ValueError naming the argument."""
    N, G = x4.shape[0], x4.shape[1]
    if B < 1 or N % B != 0:
        raise ValueError("B (rows per statistics group) must be >= 1 and divide x's rows")
    V = N // B
    if mean.shape[0] != V or mean.shape[1] != G or var.shape[0] != V or var.shape[1] != G:
        raise ValueError("mean and var must have shape (N // B, G)")
    if count.shape[0] != V:
        raise ValueError("count must have shape (N // B,)")
    if masked and (mask2.shape[0] != N or mask2.shape[1] != x4.shape[3]):
        raise ValueError("mask must have the shape of x without its channel axis")


@jit()
def count_valid(mask2, masked, B, K, L, count):
    """count[v] = valid values per (v, g) group: B * K * L, or K * (valid positions)."""
    for v in range(count.size):
        if not masked:
            count[v] = B * K * L
            continue
        total = 0
        for n in range(v * B, (v + 1) * B):
            for l in range(L):
                total += mask2[n, l]
        count[v] = K * total


# ---------------------------------------------------------------------------------------------
# Streaming output spans (planes, L > 1): y and dx of a channel run written with non-temporal
# stores. Each formula exists as a plain loop and as a vector intrinsic computing one 32-byte
# vector with the same IEEE operations in the same order (no FMA contraction, no reassociation),
# so a value does not depend on which path wrote it. Whole 64-byte lines only are streamed; the
# partial lines at both ends of a span get ordinary stores.
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

        def lanes(array_type, array_value):
            data = context.make_array(array_type)(context, builder, array_value).data
            return builder.gep(data, [index])

        operands = []
        for k in range(n_arrays):
            ptr = lanes(signature.args[2 + k], args[2 + k])
            operands.append(builder.load(builder.bitcast(ptr, vector.as_pointer()), align=itemsize))
        for value in args[2 + n_arrays:]:
            splat = ir.Constant(vector, ir.Undefined)
            for lane in range(vector.count):
                splat = builder.insert_element(splat, value, ir.Constant(ir.IntType(32), lane))
            operands.append(splat)
        result = formula(builder, *operands)
        dst_ptr = lanes(dst_type, args[0])
        store = builder.store(result, builder.bitcast(dst_ptr, vector.as_pointer()),
                              align=_VECTOR_BYTES)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return codegen


def _affine_ir(b, x, mean_hi, scale, shift):
    return b.fadd(b.fmul(b.fsub(x, mean_hi), scale), shift)


def _dx_ir(b, dy, x, dy_coef, mean_hi, x_coef, const):
    return b.fadd(b.fadd(b.fmul(dy, dy_coef), b.fmul(b.fsub(x, mean_hi), x_coef)), const)


@intrinsic
def _stream_affine_vector(typingctx, dst, i, x, mean_hi, scale, shift):
    return (types.void(dst, i, x, mean_hi, scale, shift), _vector_codegen(_affine_ir, 1))


@intrinsic
def _stream_dx_vector(typingctx, dst, i, dy, x, dy_coef, mean_hi, x_coef, const):
    return (types.void(dst, i, dy, x, dy_coef, mean_hi, x_coef, const), _vector_codegen(_dx_ir, 2))


@jit()
def _streamed_range(dst, n):
    """(head, body_end): dst[head:body_end] are the whole 64-byte lines of dst[:n]."""
    line = _LINE_BYTES // dst.itemsize
    head = min((-dst.ctypes.data % _LINE_BYTES) // dst.itemsize, n)
    return head, head + (n - head) // line * line


@jit()
def _affine_span(xs, ys, mean_hi, scale, shift, stream):
    """ys = (xs - mean_hi) * scale + shift in x's dtype (streamed if ``stream``); xs, ys (K,)
    contiguous. Output formulas live in functions without fastmath, so a value is the same in
    every caller whatever LLVM does with the sums around it."""
    head, body_end = _streamed_range(ys, ys.size) if stream else (ys.size, ys.size)
    for k in range(head):
        ys[k] = (xs[k] - mean_hi) * scale + shift
    for k in range(head, body_end, _VECTOR_BYTES // ys.itemsize):
        _stream_affine_vector(ys, k, xs, mean_hi, scale, shift)
    for k in range(body_end, ys.size):
        ys[k] = (xs[k] - mean_hi) * scale + shift


@jit()
def _dx_span(ds, xs, dxs, dy_coef, mean_hi, x_coef, const, stream):
    """dxs = ds * dy_coef + (xs - mean_hi) * x_coef + const in x's dtype (streamed if
    ``stream``); (K,) contiguous."""
    head, body_end = _streamed_range(dxs, dxs.size) if stream else (dxs.size, dxs.size)
    for k in range(head):
        dxs[k] = ds[k] * dy_coef + (xs[k] - mean_hi) * x_coef + const
    for k in range(head, body_end, _VECTOR_BYTES // dxs.itemsize):
        _stream_dx_vector(dxs, k, ds, xs, dy_coef, mean_hi, x_coef, const)
    for k in range(body_end, dxs.size):
        dxs[k] = ds[k] * dy_coef + (xs[k] - mean_hi) * x_coef + const


@jit()
def _affine_row(xs, ys, mean_hi, inv, lo, gamma, beta):
    """ys = ((xs - mean_hi) * inv + lo) * gamma + beta, gamma and beta per element (a layer-norm
    row); (K,) in x's dtype."""
    for k in range(ys.size):
        ys[k] = ((xs[k] - mean_hi) * inv + lo) * gamma[k] + beta[k]


@jit()
def _affine_channels(xs, ys, mean_hi, scale, shift):
    """ys = (xs - mean_hi) * scale + shift with per-element coefficients (a row of channels);
    (C,) in x's dtype."""
    for k in range(ys.size):
        ys[k] = (xs[k] - mean_hi[k]) * scale[k] + shift[k]


@jit()
def _dx_row(ds, xs, dxs, gamma, inv, mean_hi, x_coef, const):
    """dxs = ds * gamma * inv + (xs - mean_hi) * x_coef + const, gamma per element (a
    layer-norm row); (K,) in x's dtype."""
    for k in range(dxs.size):
        dxs[k] = ds[k] * gamma[k] * inv + (xs[k] - mean_hi) * x_coef + const


@jit()
def _dx_channels(ds, xs, dxs, c1, mean_hi, c2, c3):
    """dxs = ds * c1 + (xs - mean_hi) * c2 + c3 with per-element coefficients (a row of
    channels); (C,) in x's dtype."""
    for k in range(dxs.size):
        dxs[k] = ds[k] * c1[k] + (xs[k] - mean_hi[k]) * c2[k] + c3[k]


@jit()
def _streams(out):
    """Whether to write ``out`` with non-temporal stores: when it is larger than the L3 cache
    (never as plain Python, NUMBA_DISABLE_JIT=1, where the vector intrinsics do not exist)."""
    return _JIT_ENABLED and out.nbytes >= STREAM_MIN_BYTES


# ---------------------------------------------------------------------------------------------
# Planes: one item per group (v, g), rows of K * L contiguous values
# ---------------------------------------------------------------------------------------------

@jit()
def _zero_padding(row, m, K, L):
    """row[k * L + l] = 0 where m[l] is False; row (K * L,), m (L,) one row of the mask."""
    for k in range(K):
        for l in range(L):
            if not m[l]:
                row[k * L + l] = 0


@jit(reduction=True, inline=True)
def _set_stats(mean, var, v, g, M, centered, shift, s1, s2):
    """mean[v, g], var[v, g] from the sums about ``shift``: s1 = sum(x - shift), s2 =
    sum((x - shift)^2) over M values (RMS: mean 0, var = s2 / M)."""
    if M == 0:
        mean[v, g], var[v, g] = 0.0, 0.0
    elif centered:
        mean_dev = s1 / M
        mean[v, g], var[v, g] = shift + mean_dev, max(s2 / M - mean_dev * mean_dev, 0.0)
    else:
        mean[v, g], var[v, g] = 0.0, s2 / M


@jit(reduction=True, inline=True)
def _normalize_group(s, x3, y3, B, K, L, gamma2, beta2, eps, mask2, masked, mean, var, count,
                     stream, exact):
    """y of group s = v * G + g from its statistics: (x - mean_hi) * scale + shift in x's dtype
    (mean_hi: the mean rounded to x's dtype, so x - mean_hi is exact near the mean; its rounding
    error goes into shift in float64); 0 where masked. A group where x - mean could overflow
    x's dtype is written in float64 if ``exact``, else left alone: returns False."""
    G = x3.shape[1]
    v, g = s // G, s % G
    mu = mean[v, g]
    extreme = _extreme(x3, mu, var[v, g], count[v])
    if extreme and not exact:
        return False
    inv_std = 1.0 / np.sqrt(var[v, g] + eps)
    mean_hi = _cast_like(x3, mu)
    mean_lo = mu - np.float64(mean_hi)
    inv = _cast_like(x3, inv_std)
    lo = _cast_like(x3, -mean_lo * inv_std)
    for n in range(v * B, (v + 1) * B):
        xs = x3[n, g]                          # (K * L,)
        ys = y3[n, g]
        if extreme:                            # x - mean could overflow x's dtype: float64
            for k in range(K):
                scale64 = inv_std * gamma2[g, k]
                for l in range(L):
                    ys[k * L + l] = (np.float64(xs[k * L + l]) - mu) * scale64 + beta2[g, k]
        elif _ROWS == 1 or _ROWS == -1 and L == 1:     # gamma per element (a layer-norm row)
            _affine_row(xs, ys, mean_hi, inv, lo, gamma2[g], beta2[g])
        else:
            for k in range(K):
                scale64 = inv_std * gamma2[g, k]
                scale = _cast_like(x3, scale64)
                shift = _cast_like(x3, beta2[g, k] - mean_lo * scale64)
                xk = xs[k * L:(k + 1) * L]     # (L,)
                yk = ys[k * L:(k + 1) * L]
                _affine_span(xk, yk, mean_hi, scale, shift, stream)
        if masked:
            _zero_padding(ys, mask2[n], K, L)
    return True


@jit(reduction=True, inline=True)
def _plane_forward_fast(s, x3, y3, B, K, L, gamma2, beta2, eps, centered, mask2, masked, mean,
                        var, count, mode, stream):
    """Group s = v * G + g of an unmasked call in x's dtype: statistics into mean[v, g],
    var[v, g] (two passes over blocks summed in x's dtype, then in float64; see the module
    docstring) and/or y. Returns _DONE, or what :func:`_plane_forward_item` must still do:
    _NEEDS_STATS (the sums overflow x's dtype; nothing written) or _NEEDS_Y (x - mean could
    overflow x's dtype; the statistics are written)."""
    G = x3.shape[1]
    v, g = s // G, s % G
    n0, n1 = v * B, (v + 1) * B
    M = count[v]
    if mode != APPLY_ONLY:
        if M == 0:
            return _NEEDS_STATS
        shift = 0.0
        if centered:
            total = 0.0
            for n in range(n0, n1):
                row = x3[n, g]                 # (K * L,)
                for b0 in range(0, row.size, _BLOCK):
                    block = row[b0:b0 + _BLOCK]
                    acc = _cast_like(row, 0.0)
                    for j in range(block.size):
                        acc += block[j]
                    total += acc
            shift = total / M
        shift_hi = _cast_like(x3, shift)       # x - shift_hi is exact near the mean
        s1 = 0.0
        s2 = 0.0
        for n in range(n0, n1):
            row = x3[n, g]
            for b0 in range(0, row.size, _BLOCK):
                block = row[b0:b0 + _BLOCK]
                a1 = _cast_like(row, 0.0)
                a2 = _cast_like(row, 0.0)
                for j in range(block.size):
                    d = block[j] - shift_hi
                    a1 += d
                    a2 += d * d
                s1 += a1
                s2 += a2
        if not np.isfinite(s1 + s2):           # overflow in x's dtype (or NaN in x)
            return _NEEDS_STATS
        _set_stats(mean, var, v, g, M, centered, np.float64(shift_hi), s1, s2)
    if mode == STATS_ONLY or _normalize_group(s, x3, y3, B, K, L, gamma2, beta2, eps, mask2,
                                              False, mean, var, count, stream, False):
        return _DONE
    return _NEEDS_Y


@jit(reduction=True, inline=True)
def _plane_forward_item(s, x3, y3, B, K, L, gamma2, beta2, eps, centered, mask2, masked, mean,
                        var, count, mode, stream):
    """Group s = v * G + g: :func:`_plane_forward_fast`, and where it cannot (a masked call,
    sums that overflow x's dtype, x - mean that could) the statistics in float64 over the valid
    positions and/or y in float64, 0 where masked; x3, y3 (N, G, K*L). Returns _DONE."""
    todo = _NEEDS_STATS
    if not masked:
        todo = _plane_forward_fast(s, x3, y3, B, K, L, gamma2, beta2, eps, centered, mask2,
                                   masked, mean, var, count, mode, stream)
        if todo == _DONE:
            return _DONE
    G = x3.shape[1]
    v, g = s // G, s % G
    n0, n1 = v * B, (v + 1) * B
    M = count[v]
    if mode != APPLY_ONLY and todo == _NEEDS_STATS:    # float64; masked positions skipped
        shift = 0.0                            # pass 1: the mean's first estimate
        if centered and M > 0:
            total = 0.0
            for n in range(n0, n1):
                row = x3[n, g]                 # (K * L,)
                if masked:
                    m = mask2[n]               # (L,)
                    for k in range(K):
                        for l in range(L):
                            if m[l]:
                                total += row[k * L + l]
                else:
                    for j in range(row.size):
                        total += row[j]
            shift = total / M
        s1 = 0.0                               # pass 2: sums of d = x - shift and d^2
        s2 = 0.0
        for n in range(n0, n1):
            row = x3[n, g]
            if masked:
                m = mask2[n]
                for k in range(K):
                    for l in range(L):
                        if m[l]:
                            d = np.float64(row[k * L + l]) - shift
                            s1 += d
                            s2 += d * d
            else:
                for j in range(row.size):
                    d = np.float64(row[j]) - shift
                    s1 += d
                    s2 += d * d
        _set_stats(mean, var, v, g, M, centered, shift, s1, s2)
    if mode != STATS_ONLY:
        _normalize_group(s, x3, y3, B, K, L, gamma2, beta2, eps, mask2, masked, mean, var, count,
                         stream, True)
    return _DONE


@jit(reduction=True, inline=True)
def _add_group(g, K, gamma2, inv_std, group_dy, group_dy_dev, sum_dy, sum_dy_dev):
    """Add one group's per-channel sums (K,) of dy and dy (x - mean) into the chunk's dbeta and
    dgamma sums; returns the group's totals of gamma * dy and gamma * dy * (x - mean)."""
    total_dy = 0.0
    total_dy_dev = 0.0
    for k in range(K):
        sum_dy[k] += group_dy[k]
        sum_dy_dev[k] += group_dy_dev[k] * inv_std
        total_dy += gamma2[g, k] * group_dy[k]
        total_dy_dev += gamma2[g, k] * group_dy_dev[k]
    return total_dy, total_dy_dev


@jit(reduction=True, inline=True)
def _dx_group(v, g, dy3, x3, dx3, B, K, L, gamma2, mu, inv_std, count, centered, frozen, mask2,
              masked, total_dy, total_dy_dev, stream, extreme):
    """dx of group (v, g) = dy * gamma * inv_std + (x - mean) c2 + c3 (see the module
    docstring), in x's dtype about mean_hi, or in float64 if ``extreme``; 0 where masked."""
    c2 = 0.0
    c3 = 0.0
    if not frozen and count[v] > 0:
        c2 = -inv_std * inv_std * inv_std * total_dy_dev / count[v]
        if centered:
            c3 = -inv_std * total_dy / count[v]
    mean_hi = _cast_like(x3, mu)
    mean_lo = mu - np.float64(mean_hi)
    x_coef = _cast_like(x3, c2)
    const = _cast_like(x3, c3 - mean_lo * c2)
    inv = _cast_like(x3, inv_std)
    for n in range(v * B, (v + 1) * B):
        xs = x3[n, g]
        ds = dy3[n, g]
        dxs = dx3[n, g]
        if extreme:
            for k in range(K):
                c1 = gamma2[g, k] * inv_std
                for l in range(L):
                    i = k * L + l
                    dxs[i] = np.float64(ds[i]) * c1 + (np.float64(xs[i]) - mu) * c2 + c3
        elif _ROWS == 1 or _ROWS == -1 and L == 1:
            _dx_row(ds, xs, dxs, gamma2[g], inv, mean_hi, x_coef, const)
        else:
            for k in range(K):
                c1 = _cast_like(x3, gamma2[g, k] * inv_std)
                xk = xs[k * L:(k + 1) * L]     # (L,)
                dk = ds[k * L:(k + 1) * L]
                dxk = dxs[k * L:(k + 1) * L]
                _dx_span(dk, xk, dxk, c1, mean_hi, x_coef, const, stream)
        if masked:
            _zero_padding(dxs, mask2[n], K, L)


@jit(reduction=True, inline=True)
def _plane_backward_group_fast(v, g, dy3, x3, dx3, B, K, L, gamma2, mean, var, count, eps,
                               centered, frozen, mask2, sum_dy, sum_dy_dev, group_dy,
                               group_dy_dev, stream):
    """Group (v, g) of an unmasked call in x's dtype: its sums added into sum_dy, sum_dy_dev
    (K,) and dx. Returns False, having added nothing, when x - mean could overflow x's dtype
    or the sums do (the group needs the float64 loops). group_dy, group_dy_dev (K,) scratch."""
    mu = mean[v, g]
    if _extreme(x3, mu, var[v, g], count[v]):
        return False
    inv_std = 1.0 / np.sqrt(var[v, g] + eps)
    mean_hi = _cast_like(x3, mu)
    mean_lo = mu - np.float64(mean_hi)
    n0, n1 = v * B, (v + 1) * B
    total_dy = 0.0                             # sum over the group of gamma * dy
    total_dy_dev = 0.0                         # ... of gamma * dy * (x - mean)
    if _ROWS == 1 or _ROWS == -1 and L == 1:   # one pass, float64: per-element sums, totals
        gamma = gamma2[g]                      # (K,)
        for n in range(n0, n1):
            xs = x3[n, g]                      # (K,)
            ds = dy3[n, g]
            for k in range(K):
                d = np.float64(ds[k])
                dev = d * (np.float64(xs[k]) - mu)
                sum_dy[k] += d
                sum_dy_dev[k] += dev * inv_std
                total_dy += gamma[k] * d
                total_dy_dev += gamma[k] * dev
    else:                                      # blocks in x's dtype: sum(dy), sum(dy (x - mean_hi))
        for k in range(K):
            group_dy[k] = 0.0
            group_dy_dev[k] = 0.0
        for n in range(n0, n1):
            xs = x3[n, g]                      # (K * L,)
            ds = dy3[n, g]
            for k in range(K):
                for b0 in range(k * L, (k + 1) * L, _BLOCK):
                    b1 = min(b0 + _BLOCK, (k + 1) * L)
                    xb = xs[b0:b1]
                    db = ds[b0:b1]
                    a = _cast_like(xs, 0.0)
                    b = _cast_like(xs, 0.0)
                    for i in range(xb.size):
                        a += db[i]
                        b += db[i] * (xb[i] - mean_hi)
                    group_dy[k] += a
                    group_dy_dev[k] += b
        for k in range(K):                     # sum(dy (x - mean)) from the one about mean_hi
            group_dy_dev[k] -= mean_lo * group_dy[k]
            if not np.isfinite(group_dy_dev[k] + group_dy[k]):
                return False                   # overflow in x's dtype (or NaN)
        total_dy, total_dy_dev = _add_group(g, K, gamma2, inv_std, group_dy, group_dy_dev,
                                            sum_dy, sum_dy_dev)
    _dx_group(v, g, dy3, x3, dx3, B, K, L, gamma2, mu, inv_std, count, centered, frozen,
              mask2, False, total_dy, total_dy_dev, stream, False)
    return True


@jit(inline=True)
def _chunk_sums(work, j, g):
    """The (K,) rows of item (j, g) in the planes backward's work (4, chunks, G, K): its chunk's
    sums of dy and dy (x - mean) / std, zeroed, and scratch for one group's sums."""
    sum_dy, sum_dy_dev = work[0, j, g], work[1, j, g]
    for k in range(sum_dy.size):
        sum_dy[k] = 0.0
        sum_dy_dev[k] = 0.0
    return sum_dy, sum_dy_dev, work[2, j, g], work[3, j, g]


@jit(reduction=True, inline=True)
def _plane_backward_fast(item, dy3, x3, dx3, B, K, L, gamma2, mean, var, count, eps, centered,
                         frozen, mask2, masked, chunk_groups, work, stream):
    """:func:`_plane_backward_item` of an unmasked call in x's dtype; returns _NEEDS_STATS as
    soon as one of its groups needs the float64 loops (its sums are then incomplete)."""
    G = x3.shape[1]
    j, g = item // G, item % G
    V = x3.shape[0] // B
    sum_dy, sum_dy_dev, group_dy, group_dy_dev = _chunk_sums(work, j, g)
    for v in range(j * chunk_groups, min((j + 1) * chunk_groups, V)):
        if not _plane_backward_group_fast(v, g, dy3, x3, dx3, B, K, L, gamma2, mean, var, count,
                                          eps, centered, frozen, mask2, sum_dy, sum_dy_dev,
                                          group_dy, group_dy_dev, stream):
            return _NEEDS_STATS
    return _DONE


@jit(reduction=True, inline=True)
def _plane_backward_item(item, dy3, x3, dx3, B, K, L, gamma2, mean, var, count, eps, centered,
                         frozen, mask2, masked, chunk_groups, work, stream):
    """Groups (v, g) for v in chunk j = item // G: dx (0 where masked), and the chunk's partial
    dbeta and dgamma per channel into work[0, j, g], work[1, j, g] (K,): each group through
    :func:`_plane_backward_group_fast` or, where it cannot, in float64 over the valid
    positions. Returns _DONE."""
    G = x3.shape[1]
    j, g = item // G, item % G
    V = x3.shape[0] // B
    sum_dy, sum_dy_dev, group_dy, group_dy_dev = _chunk_sums(work, j, g)
    for v in range(j * chunk_groups, min((j + 1) * chunk_groups, V)):
        if not masked and _plane_backward_group_fast(v, g, dy3, x3, dx3, B, K, L, gamma2, mean,
                                                     var, count, eps, centered, frozen, mask2,
                                                     sum_dy, sum_dy_dev, group_dy,
                                                     group_dy_dev, stream):
            continue
        mu = mean[v, g]                        # float64 throughout, valid positions only
        inv_std = 1.0 / np.sqrt(var[v, g] + eps)
        for k in range(K):
            group_dy[k] = 0.0
            group_dy_dev[k] = 0.0
        for n in range(v * B, (v + 1) * B):
            xs = x3[n, g]
            ds = dy3[n, g]
            for k in range(K):
                a = 0.0
                b = 0.0
                for l in range(L):
                    if masked and not mask2[n, l]:
                        continue               # padding may hold anything, even NaN
                    d = np.float64(ds[k * L + l])
                    a += d
                    b += d * (np.float64(xs[k * L + l]) - mu)
                group_dy[k] += a
                group_dy_dev[k] += b
        total_dy, total_dy_dev = _add_group(g, K, gamma2, inv_std, group_dy, group_dy_dev,
                                            sum_dy, sum_dy_dev)
        _dx_group(v, g, dy3, x3, dx3, B, K, L, gamma2, mu, inv_std, count, centered, frozen,
                  mask2, masked, total_dy, total_dy_dev, stream, True)
    return _DONE


# ---------------------------------------------------------------------------------------------
# Columns: chunks of whole rows, every channel at once; x2 (N, C), C = G, K = L = 1
# ---------------------------------------------------------------------------------------------

@jit(inline=True)
def _chunk(s, B, R, J):
    """Work item s = v * J + j of the columns drivers: (v, j, r0, r1), chunk j of row-group v
    covering rows r0:r1."""
    v, j = s // J, s % J
    r0 = v * B + j * R
    return v, j, r0, min(r0 + R, (v + 1) * B)


@jit(inline=True)
def _zeroed(a, b, v, j):
    """a[v, j] and b[v, j] (C,) of (V, J, C) per-chunk arrays, zeroed and returned."""
    a_vj, b_vj = a[v, j], b[v, j]
    for c in range(a_vj.size):
        a_vj[c] = 0.0
        b_vj[c] = 0.0
    return a_vj, b_vj


@jit(reduction=True, inline=True)
def _start_chunk(chunk_count, chunk_mean, chunk_m2, v, j, rows):
    """chunk_count[v, j] = rows; the chunk's mean and M2 (C,) zeroed and returned."""
    chunk_count[v, j] = rows
    return _zeroed(chunk_mean, chunk_m2, v, j)


@jit(reduction=True, inline=True)
def _rows_apply(s, x2, y2, B, R, J, mask2, masked, coef):
    """_ROWS_APPLY of chunk j of row-group v (s = v * J + j): y = (x - mean_hi) * scale + shift
    with coef[:, v] = (mean_hi, scale, shift) (C,) in x's dtype (0 in a masked row)."""
    C = x2.shape[1]
    v, j, r0, r1 = _chunk(s, B, R, J)
    mean_hi, scale, shift = coef[0, v], coef[1, v], coef[2, v]     # (C,)
    for n in range(r0, r1):
        xr = x2[n]                             # (C,)
        yr = y2[n]
        if masked and not mask2[n, 0]:
            for c in range(C):
                yr[c] = 0
            continue
        _affine_channels(xr, yr, mean_hi, scale, shift)


@jit(reduction=True, inline=True)
def _finish_chunk(centered, rows, mean, m2, s1):
    """A chunk's mean = shift + mean(d) and M2 = sum(d^2) - sum(d)^2 / rows from the sums
    about the shift in ``mean`` (C,)."""
    if centered:
        for c in range(mean.size):
            mean_dev = s1[c] / rows
            mean[c] += mean_dev
            m2[c] = max(m2[c] - s1[c] * mean_dev, 0.0)


@jit(reduction=True)
def _rows_fast(phase, s, x2, y2, B, R, J, mask2, masked, centered, chunk_count, chunk_mean,
               chunk_m2, coef):
    """:func:`_rows_item` of an unmasked call: _CHUNK_STATS in blocks of _ROW_BLOCK rows summed
    in x's dtype, then in float64. Returns _NEEDS_STATS (the chunk's statistics unfinished)
    when the block sums overflow x's dtype, else _DONE."""
    if phase == _ROWS_APPLY:
        _rows_apply(s, x2, y2, B, R, J, mask2, False, coef)
        return _DONE
    C = x2.shape[1]
    v, j, r0, r1 = _chunk(s, B, R, J)
    rows = r1 - r0                             # >= 1: every row is valid
    mean, m2 = _start_chunk(chunk_count, chunk_mean, chunk_m2, v, j, rows)    # (C,)
    s1 = np.zeros(C)
    b1 = np.empty(C, x2.dtype)                 # (C,) block sums
    b2 = np.empty(C, x2.dtype)
    shift_hi = np.zeros(C, x2.dtype)           # (C,) the first mean, rounded to x's dtype
    if centered:
        for n0 in range(r0, r1, _ROW_BLOCK):
            b1[:] = 0
            for n in range(n0, min(n0 + _ROW_BLOCK, r1)):
                xr = x2[n]
                for c in range(C):
                    b1[c] += xr[c]
            for c in range(C):
                mean[c] += b1[c]
        for c in range(C):
            shift_hi[c] = mean[c] / rows
    for n0 in range(r0, r1, _ROW_BLOCK):
        b1[:] = 0
        b2[:] = 0
        for n in range(n0, min(n0 + _ROW_BLOCK, r1)):
            xr = x2[n]
            for c in range(C):
                d = xr[c] - shift_hi[c]
                b1[c] += d
                b2[c] += d * d
        for c in range(C):
            s1[c] += b1[c]
            m2[c] += b2[c]
    total = 0.0
    for c in range(C):
        mean[c] = shift_hi[c]
        total += s1[c] + m2[c]
    if not np.isfinite(total):                 # overflow in x's dtype (or NaN in x)
        return _NEEDS_STATS
    _finish_chunk(centered, rows, mean, m2, s1)
    return _DONE


@jit(reduction=True)
def _rows_item(phase, s, x2, y2, B, R, J, mask2, masked, centered, chunk_count, chunk_mean,
               chunk_m2, coef):
    """Chunk j of row-group v (s = v * J + j), rows r0:r1.

    _CHUNK_STATS: each channel's valid row count, mean and M2 = sum((x - mean)^2) (sum(x^2) if
    not centered) into chunk_count[v, j], chunk_mean[v, j], chunk_m2[v, j], in two passes:
    :func:`_rows_fast`, or float64 throughout for a masked call or a chunk whose block sums
    overflow. _ROWS_APPLY: see :func:`_rows_apply`. Returns _DONE.
    """
    if phase == _ROWS_APPLY:
        _rows_apply(s, x2, y2, B, R, J, mask2, masked, coef)
        return _DONE
    if not masked and _rows_fast(phase, s, x2, y2, B, R, J, mask2, masked, centered,
                                 chunk_count, chunk_mean, chunk_m2, coef) == _DONE:
        return _DONE
    C = x2.shape[1]                            # float64 throughout, valid rows only
    v, j, r0, r1 = _chunk(s, B, R, J)
    rows = r1 - r0
    if masked:
        rows = 0
        for n in range(r0, r1):
            if mask2[n, 0]:
                rows += 1
    # (C,) the shift, then the chunk's mean; M2
    mean, m2 = _start_chunk(chunk_count, chunk_mean, chunk_m2, v, j, rows)
    if rows == 0:
        return _DONE
    s1 = np.zeros(C)
    if centered:
        for n in range(r0, r1):
            if masked and not mask2[n, 0]:
                continue
            xr = x2[n]
            for c in range(C):
                mean[c] += xr[c]
        for c in range(C):
            mean[c] /= rows                    # the shift: a first estimate of the mean
    for n in range(r0, r1):
        if masked and not mask2[n, 0]:
            continue
        xr = x2[n]
        for c in range(C):
            d = np.float64(xr[c]) - mean[c]
            s1[c] += d
            m2[c] += d * d
    _finish_chunk(centered, rows, mean, m2, s1)
    return _DONE


@jit()
def _merge_chunks(s, blocks, J, chunk_count, chunk_mean, chunk_m2, mean, var):
    """Channels of block b of row-group v (s = v * blocks + b): merge the chunks' (count, mean,
    M2) in order j = 0, 1, ... (Chan et al.: with delta = mean_j - mean, mean += delta * n_j / n,
    M2 += M2_j + delta^2 * n_prev * n_j / n), then var = M2 / count (biased). M2 is summed in
    var; the counts are per chunk, so the weights are computed once per chunk."""
    C = mean.shape[1]
    v, b = s // blocks, s % blocks
    c0, c1 = b * _MERGE_BLOCK, min((b + 1) * _MERGE_BLOCK, C)
    m = mean[v, c0:c1]                         # (block,)
    m2 = var[v, c0:c1]
    m[:] = 0.0
    m2[:] = 0.0
    n = 0.0
    for j in range(J):
        n_j = chunk_count[v, j]
        if n_j == 0:
            continue
        total = n + n_j
        weight = n_j / total
        weight2 = n * n_j / total
        m_j = chunk_mean[v, j, c0:c1]
        m2_j = chunk_m2[v, j, c0:c1]
        for c in range(m.size):
            delta = m_j[c] - m[c]
            m[c] += delta * weight
            m2[c] += m2_j[c] + delta * delta * weight2
        n = total
    for c in range(m.size):
        m2[c] = m2[c] / n if n > 0 else 0.0


@jit(inline=True)
def _apply_coefficients(gamma2, beta2, mean, var, count, eps, coef):
    """y = (x - mean_hi) * scale + shift per (v, c): coef[0..2] = (mean_hi, scale, shift)
    (V, C) in x's dtype, scale = gamma / sqrt(var + eps), shift = beta - (mean - mean_hi) *
    scale (mean_hi: :func:`_means_hi`). Channels innermost, as in :func:`_rows_coefficients`."""
    V, C = mean.shape
    scale = np.empty(C)                        # (C,) float64
    for v in range(V):
        _means_hi(mean, var, count, v, coef, 0)
        for c in range(C):
            scale[c] = gamma2[c, 0] / np.sqrt(var[v, c] + eps)
        for c in range(C):
            coef[1, v, c] = scale[c]
            coef[2, v, c] = beta2[c, 0] - (mean[v, c] - np.float64(coef[0, v, c])) * scale[c]


@jit(inline=True)
def _rows_coefficients(gamma2, mean, var, count, eps, centered, frozen, chunk_dy, chunk_dy_dev,
                       coefficients, dgamma2, dbeta2):
    """From the chunk sums chunk_dy, chunk_dy_dev (V, J, C) of dy and dy * (x - mean), added
    in order: dbeta and dgamma (C, 1) float64 (summed over the row-groups v in order), and
    dx = dy * c1 + (x - mean_hi) * c2 + c3 per (v, c): coefficients[0..3] = (c1, mean_hi, c2,
    c3) (V, C) in x's dtype. The channels are the inner loops, square roots and divisions in
    loops of their own, so that they vectorize (a small batch spends its time here)."""
    V, J, C = chunk_dy.shape
    s_dy = np.empty(C)                         # (C,) sums over the chunks of row-group v
    s_dy_dev = np.empty(C)
    inv_std = np.empty(C)
    for c in range(C):
        dbeta2[c, 0] = 0.0
        dgamma2[c, 0] = 0.0
    for v in range(V):
        per_value = 1.0 / count[v] if count[v] > 0 else 0.0
        for c in range(C):
            s_dy[c] = 0.0
            s_dy_dev[c] = 0.0
        for j in range(J):
            for c in range(C):
                s_dy[c] += chunk_dy[v, j, c]
                s_dy_dev[c] += chunk_dy_dev[v, j, c]
        for c in range(C):
            inv_std[c] = 1.0 / np.sqrt(var[v, c] + eps)
        _means_hi(mean, var, count, v, coefficients, 1)
        for c in range(C):
            gamma = np.float64(gamma2[c, 0])
            dbeta2[c, 0] += s_dy[c]
            dgamma2[c, 0] += s_dy_dev[c] * inv_std[c]
            slope = 0.0
            shift = 0.0
            if not frozen:
                slope = -inv_std[c] * inv_std[c] * inv_std[c] * gamma * s_dy_dev[c] * per_value
                if centered:
                    shift = -inv_std[c] * gamma * s_dy[c] * per_value
            coefficients[0, v, c] = gamma * inv_std[c]
            coefficients[2, v, c] = slope
            mean_hi = np.float64(coefficients[1, v, c])
            coefficients[3, v, c] = shift - (mean[v, c] - mean_hi) * slope


@jit(reduction=True, inline=True)
def _rows_dx(s, dy2, x2, dx2, B, R, J, mask2, masked, coefficients):
    """_ROWS_DX of chunk j of row-group v (s = v * J + j): dx = dy * c1 + (x - mean_hi) * c2 +
    c3 with coefficients[:, v] = (c1, mean_hi, c2, c3) (C,) (0 in a masked row)."""
    C = x2.shape[1]
    v, j, r0, r1 = _chunk(s, B, R, J)
    c1, mean_hi, c2, c3 = (coefficients[0, v], coefficients[1, v], coefficients[2, v],
                           coefficients[3, v])
    for n in range(r0, r1):
        xr = x2[n]                             # (C,)
        dr = dy2[n]
        dxr = dx2[n]
        if masked and not mask2[n, 0]:
            for c in range(C):
                dxr[c] = 0
            continue
        _dx_channels(dr, xr, dxr, c1, mean_hi, c2, c3)


@jit(reduction=True)
def _rows_backward_fast(phase, s, dy2, x2, dx2, B, R, J, mask2, masked, mean, chunk_dy,
                        chunk_dy_dev, coefficients):
    """:func:`_rows_backward_item` of an unmasked call: _ROWS_SUMS in blocks of rows in x's
    dtype about mean_hi. Returns _NEEDS_STATS (the sums unfinished) when they overflow x's
    dtype, else _DONE."""
    if phase == _ROWS_DX:
        _rows_dx(s, dy2, x2, dx2, B, R, J, mask2, False, coefficients)
        return _DONE
    C = x2.shape[1]
    v, j, r0, r1 = _chunk(s, B, R, J)
    mu = mean[v]                               # (C,)
    s_dy, s_dy_dev = _zeroed(chunk_dy, chunk_dy_dev, v, j)     # (C,)
    mean_hi = np.empty(C, x2.dtype)            # (C,)
    b1 = np.empty(C, x2.dtype)                 # (C,) block sums
    b2 = np.empty(C, x2.dtype)
    for c in range(C):
        mean_hi[c] = mu[c]
    for n0 in range(r0, r1, _ROW_BLOCK):
        b1[:] = 0
        b2[:] = 0
        for n in range(n0, min(n0 + _ROW_BLOCK, r1)):
            xr = x2[n]
            dr = dy2[n]
            for c in range(C):
                b1[c] += dr[c]
                b2[c] += dr[c] * (xr[c] - mean_hi[c])
        for c in range(C):
            s_dy[c] += b1[c]
            s_dy_dev[c] += b2[c]
    total = 0.0
    for c in range(C):                         # about the mean, not mean_hi
        s_dy_dev[c] -= (mu[c] - np.float64(mean_hi[c])) * s_dy[c]
        total += s_dy[c] + s_dy_dev[c]
    return _DONE if np.isfinite(total) else _NEEDS_STATS


@jit(reduction=True)
def _rows_backward_item(phase, s, dy2, x2, dx2, B, R, J, mask2, masked, mean, chunk_dy,
                        chunk_dy_dev, coefficients):
    """Chunk j of row-group v (s = v * J + j), rows r0:r1, valid rows only.

    _ROWS_SUMS: sum(dy) and sum(dy * (x - mean)) per channel into chunk_dy[v, j],
    chunk_dy_dev[v, j] (:func:`_rows_backward_fast`, or float64 if masked or overflowing).
    _ROWS_DX: see :func:`_rows_dx`. Returns _DONE.
    """
    if phase == _ROWS_DX:
        _rows_dx(s, dy2, x2, dx2, B, R, J, mask2, masked, coefficients)
        return _DONE
    if not masked and _rows_backward_fast(phase, s, dy2, x2, dx2, B, R, J, mask2, masked, mean,
                                          chunk_dy, chunk_dy_dev, coefficients) == _DONE:
        return _DONE
    C = x2.shape[1]                            # float64, valid rows only
    v, j, r0, r1 = _chunk(s, B, R, J)
    mu = mean[v]                               # (C,)
    s_dy, s_dy_dev = _zeroed(chunk_dy, chunk_dy_dev, v, j)     # (C,)
    for n in range(r0, r1):
        if masked and not mask2[n, 0]:
            continue
        xr = x2[n]
        dr = dy2[n]
        for c in range(C):
            d = np.float64(dr[c])
            s_dy[c] += d
            s_dy_dev[c] += d * (np.float64(xr[c]) - mu[c])
    return _DONE


# ---------------------------------------------------------------------------------------------
# Drivers: each runs its work items in phases through one ``prange`` loop; a serial and a
# parallel twin of each, chosen by size (the serial one compiles in a fraction of the time).
# ---------------------------------------------------------------------------------------------

@jit()
def _check_forward(x4, B, gamma2, beta2, mask2, masked, y4, mean, var, count):
    """The shapes a forward driver indexes with; then the valid counts of a masked call."""
    G, K = x4.shape[1], x4.shape[2]
    check_view(x4, B, mask2, masked, mean, var, count)
    if gamma2.shape[0] != G or gamma2.shape[1] != K or beta2.shape[0] != G or beta2.shape[1] != K:
        raise ValueError("gamma and beta must have one value per channel (G, K)")
    if y4.shape != x4.shape:
        raise ValueError("out must have the shape of x")
    count_valid(mask2, masked, B, K, x4.shape[3], count)


# Layouts, each with its drivers: see the module docstring.
_PLANES_LAYOUT, _ROWS_LAYOUT, _COLUMNS_LAYOUT = 0, 1, 2


@register_jitable
def _layout(x4, B):
    """The drivers of this view (a plain function in Python, compiled into jitted callers):
    columns for one value per (row, group) and groups over B > 1 rows, else rows for L == 1
    (gamma per element), else planes."""
    if x4.shape[2] * x4.shape[3] == 1 and B > 1:
        return _COLUMNS_LAYOUT
    return _ROWS_LAYOUT if x4.shape[3] == 1 else _PLANES_LAYOUT


@register_jitable
def _planes_work(x4, B):
    """Scratch of the planes backward, (4, chunks, G, K) float64 (:func:`_chunk_sums`; chunks
    of row-groups, at most _MAX_CHUNKS), allocated by the driver's caller: in Python that
    compiles no allocation code."""
    return np.empty((4, min(x4.shape[0] // B, _MAX_CHUNKS), x4.shape[1], x4.shape[2]))


def _forward_planes_loop(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var,
                         count, mode):
    """:func:`forward` on the planes layout (a work item per row-group and group)."""
    N, G, K, L = x4.shape
    stream = _streams(y4)
    V = N // B
    x3 = x4.reshape((N, G, K * L))
    y3 = y4.reshape((N, G, K * L))
    todo = 0                                   # items left to the float64 loops
    for item in prange(V * G):
        todo += _plane_forward_item(np.int64(item), x3, y3, B, K, L, gamma2, beta2, eps,
                                    centered, mask2, masked, mean, var, count, mode,
                                    stream) != _DONE
    return todo > 0


def _forward_columns_loop(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var,
                          count, mode):
    """:func:`forward` on the columns layout (x4 (N, C, 1, 1), B > 1): chunks of rows, their
    statistics merged per channel, then the rows normalized, in phases."""
    N, G, K, L = x4.shape
    V = N // B
    x2 = x4.reshape((N, G * K * L))            # rows of the columns driver: (N, C)
    y2 = y4.reshape((N, G * K * L))
    R = _chunk_rows(B, G, x4.itemsize)
    J = (B + R - 1) // R
    blocks = (G + _MERGE_BLOCK - 1) // _MERGE_BLOCK
    chunk_count = np.empty((V, J))             # (V, J) valid rows of each chunk
    chunk_mean = np.empty((V, J, G))           # (V, J, C) per-chunk statistics
    chunk_m2 = np.empty((V, J, G))
    coef = np.empty((3, V, G), x4.dtype)       # (3, V, C) mean_hi, scale, shift in x's dtype
    first = _ROWS_APPLY if mode == APPLY_ONLY else _CHUNK_STATS
    last = _MERGE if mode == STATS_ONLY else _ROWS_APPLY
    todo = 0                                   # items left to the float64 loops
    for phase in range(first, last + 1):
        if todo > 0:
            return True
        if phase == _ROWS_APPLY:
            _apply_coefficients(gamma2, beta2, mean, var, count, eps, coef)
        items = V * blocks if phase == _MERGE else V * J
        for item in prange(items):
            s = np.int64(item)
            if phase == _MERGE:
                _merge_chunks(s, blocks, J, chunk_count, chunk_mean, chunk_m2, mean, var)
            else:
                todo += _rows_item(phase, s, x2, y2, B, R, J, mask2, masked, centered,
                                   chunk_count, chunk_mean, chunk_m2, coef) != _DONE
    return todo > 0


def _planes_drivers(loop, item, fast_item):
    """The drivers of a planes loop, each a (serial, parallel) pair: the full one (both kinds of
    branch, :data:`_ROWS` = -1), and the same loop over the fast items only (``item``, the name
    of the work item the loop calls, replaced by ``fast_item``) for channel planes and for rows.
    A call with no mask runs a fast one first and the full one only when it returns True (values
    near the dtype's maximum), so a first call compiles no float64 loops."""
    def variant(name, **replace):
        return serial_and_parallel(loop, name, reduction=True, serial_inline=True, **replace)
    return (variant(""), variant("fast", **{item: fast_item}, _ROWS=0),
            variant("fast_rows", **{item: fast_item}, _ROWS=1))


(forward_planes_serial, forward_planes_parallel), fast_forward_planes, fast_forward_rows = \
    _planes_drivers(_forward_planes_loop, "_plane_forward_item", _plane_forward_fast)
forward_columns_serial, forward_columns_parallel = serial_and_parallel(_forward_columns_loop,
                                                                       serial_inline=True)
fast_forward_columns = serial_and_parallel(_forward_columns_loop, "fast", serial_inline=True,
                                           _rows_item=_rows_fast)


@jit()
def forward_serial(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var, count,
                   mode):
    """:func:`forward` on the calling thread (for jitted callers, e.g. the LSTM's steps)."""
    _check_forward(x4, B, gamma2, beta2, mask2, masked, y4, mean, var, count)
    if _layout(x4, B) == _COLUMNS_LAYOUT:
        forward_columns_serial(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean,
                               var, count, mode)
    else:
        forward_planes_serial(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean,
                              var, count, mode)


@jit()
def forward(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var, count, mode):
    """Statistics of every group into mean, var (V, G) float64 and count (V,) (unless
    mode == APPLY_ONLY: then mean, var are given), and/or y4 = the normalized output.

    x4, y4 (N, G, K, L) C-contiguous, same dtype; gamma2, beta2 (G, K); mask2 (N, L) bool read
    only if ``masked``. Runs in parallel when x4 has PARALLEL_MIN_SIZE values or more.
    """
    if x4.size < PARALLEL_MIN_SIZE:
        forward_serial(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var,
                       count, mode)
        return
    _check_forward(x4, B, gamma2, beta2, mask2, masked, y4, mean, var, count)
    if _layout(x4, B) == _COLUMNS_LAYOUT:
        forward_columns_parallel(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean,
                                 var, count, mode)
    else:
        forward_planes_parallel(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean,
                                var, count, mode)


@jit()
def _check_backward(dy4, x4, B, gamma2, mean, var, count, mask2, masked, dx4, dgamma2,
                    dbeta2):
    """The shapes a backward driver indexes with."""
    G, K = x4.shape[1], x4.shape[2]
    check_view(x4, B, mask2, masked, mean, var, count)
    if dy4.shape != x4.shape or dx4.shape != x4.shape:
        raise ValueError("dy and out must have the shape of x")
    if gamma2.shape[0] != G or gamma2.shape[1] != K:
        raise ValueError("gamma must have one value per channel (G, K)")
    if (dgamma2.shape[0] != G or dgamma2.shape[1] != K or dbeta2.shape[0] != G
            or dbeta2.shape[1] != K):
        raise ValueError("dgamma and dbeta must have shape (G, K)")


def _backward_planes_loop(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2,
                          masked, dx4, dgamma2, dbeta2, work):
    """:func:`backward` on the planes layout: a work item per chunk of row-groups and group,
    its partial sums of dy and dy (x - mean) added over the chunks in order; ``work``
    (:func:`_planes_work`) holds them."""
    N, G, K, L = x4.shape
    stream = _streams(dx4)
    V = N // B
    x3 = x4.reshape((N, G, K * L))
    dy3 = dy4.reshape((N, G, K * L))
    dx3 = dx4.reshape((N, G, K * L))
    chunks = work.shape[1]
    todo = 0                                   # items left to the float64 loops
    for item in prange(chunks * G):
        todo += _plane_backward_item(np.int64(item), dy3, x3, dx3, B, K, L, gamma2, mean, var,
                                     count, eps, centered, frozen, mask2, masked,
                                     (V + chunks - 1) // chunks, work, stream) != _DONE
    for g in range(G):
        for k in range(K):
            dbeta2[g, k] = 0.0
            dgamma2[g, k] = 0.0
    for j in range(chunks):
        for g in range(G):
            for k in range(K):
                dbeta2[g, k] += work[0, j, g, k]
                dgamma2[g, k] += work[1, j, g, k]
    return todo > 0


def _backward_columns_loop(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2,
                           masked, dx4, dgamma2, dbeta2):
    """:func:`backward` on the columns layout: per chunk of rows the sums of dy and
    dy (x - mean), the coefficients of dx (and dgamma, dbeta) from them, then dx."""
    N, G, K, L = x4.shape
    V = N // B
    x2 = x4.reshape((N, G * K * L))            # rows of the columns driver: (N, C)
    dy2 = dy4.reshape((N, G * K * L))
    dx2 = dx4.reshape((N, G * K * L))
    R = _chunk_rows(B, G, x4.itemsize)
    J = (B + R - 1) // R
    part_dy = np.zeros((V, J, G))              # (V, J, C) per chunk
    part_dy_dev = np.zeros((V, J, G))
    coefficients = np.empty((4, V, G), x4.dtype)   # dx's c1, mean_hi, c2, c3 (V, C)
    todo = 0                                   # items left to the float64 loops
    for phase in range(_ROWS_SUMS, _ROWS_DX + 1, 2):
        if phase == _ROWS_DX:
            if todo > 0:
                return True
            _rows_coefficients(gamma2, mean, var, count, eps, centered, frozen, part_dy,
                               part_dy_dev, coefficients, dgamma2, dbeta2)
        for item in prange(V * J):
            todo += _rows_backward_item(phase, np.int64(item), dy2, x2, dx2, B, R, J, mask2,
                                        masked, mean, part_dy, part_dy_dev,
                                        coefficients) != _DONE
    return False


(backward_planes_serial, backward_planes_parallel), fast_backward_planes, fast_backward_rows = \
    _planes_drivers(_backward_planes_loop, "_plane_backward_item", _plane_backward_fast)
backward_columns_serial, backward_columns_parallel = serial_and_parallel(_backward_columns_loop,
                                                                         serial_inline=True)
fast_backward_columns = serial_and_parallel(_backward_columns_loop, "fast", serial_inline=True,
                                            _rows_backward_item=_rows_backward_fast)


@jit()
def backward_serial(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2, masked,
                    dx4, dgamma2, dbeta2):
    """:func:`backward` on the calling thread (for jitted callers, e.g. the LSTM's steps)."""
    _check_backward(dy4, x4, B, gamma2, mean, var, count, mask2, masked, dx4, dgamma2, dbeta2)
    if _layout(x4, B) == _COLUMNS_LAYOUT:
        backward_columns_serial(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen,
                                mask2, masked, dx4, dgamma2, dbeta2)
    else:
        backward_planes_serial(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen,
                               mask2, masked, dx4, dgamma2, dbeta2, _planes_work(x4, B))


@jit()
def backward(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2, masked, dx4,
             dgamma2, dbeta2):
    """Gradient of :func:`forward`: dx into dx4, dgamma and dbeta (G, K) float64 into
    dgamma2, dbeta2 (overwritten). mean, var (V, G) and count (V,) as forward wrote them;
    ``frozen``: the statistics are constants (evaluation mode)."""
    if x4.size < PARALLEL_MIN_SIZE:
        backward_serial(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2,
                        masked, dx4, dgamma2, dbeta2)
        return
    _check_backward(dy4, x4, B, gamma2, mean, var, count, mask2, masked, dx4, dgamma2, dbeta2)
    if _layout(x4, B) == _COLUMNS_LAYOUT:
        backward_columns_parallel(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen,
                                  mask2, masked, dx4, dgamma2, dbeta2)
    else:
        backward_planes_parallel(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen,
                                 mask2, masked, dx4, dgamma2, dbeta2, _planes_work(x4, B))


def by_size(x, serial, parallel):
    """The twin a call from Python takes: ``parallel`` when x has PARALLEL_MIN_SIZE values or
    more, else ``serial`` (only the twin called is compiled)."""
    return parallel if x.size >= PARALLEL_MIN_SIZE else serial


def _run(drivers, x4, masked, args):
    """Call the drivers of the layout a Python call takes, serial or parallel by size (so a
    first call compiles only the work items its layout runs): ``drivers`` is (full, fast) of
    that layout, each a (serial, parallel) pair. An unmasked call runs the fast driver first,
    and the full one only if the fast one left items to the float64 loops (the full one then
    computes every item again, from scratch)."""
    full, fast = drivers
    if masked or by_size(x4, *fast)(*args):
        by_size(x4, *full)(*args)


# (full, fast) drivers per layout (_layout), each a (serial, parallel) pair: rows and planes
# share the full planes drivers (_ROWS)
_FORWARD = (((forward_planes_serial, forward_planes_parallel), fast_forward_planes),
            ((forward_planes_serial, forward_planes_parallel), fast_forward_rows),
            ((forward_columns_serial, forward_columns_parallel), fast_forward_columns))
_BACKWARD = (((backward_planes_serial, backward_planes_parallel), fast_backward_planes),
             ((backward_planes_serial, backward_planes_parallel), fast_backward_rows),
             ((backward_columns_serial, backward_columns_parallel), fast_backward_columns))


def run_forward(x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var, count,
                mode):
    """:func:`forward` from Python, compiling only the drivers this layout and size take.

    Unchecked: the caller guarantees the shapes :func:`forward` checks (a ``Norm`` builds every
    array it passes from an x, mask and out it has checked), so a first call compiles no
    checks. count (V,) is filled here (:func:`count_valid` for a masked call).
    """
    if masked:
        count_valid(mask2, True, B, x4.shape[2], x4.shape[3], count)
    else:
        count.fill(B * x4.shape[2] * x4.shape[3])
    _run(_FORWARD[_layout(x4, B)], x4, masked,
         (x4, B, gamma2, beta2, eps, centered, mask2, masked, y4, mean, var, count, mode))


def run_backward(dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2, masked,
                 dx4, dgamma2, dbeta2):
    """:func:`backward` from Python, compiling only the drivers this layout and size take;
    unchecked, as :func:`run_forward`."""
    args = (dy4, x4, B, gamma2, mean, var, count, eps, centered, frozen, mask2, masked, dx4,
            dgamma2, dbeta2)
    layout = _layout(x4, B)
    if layout == _COLUMNS_LAYOUT:
        _run(_BACKWARD[layout], x4, masked, args)
    else:
        _run(_BACKWARD[layout], x4, masked, (*args, _planes_work(x4, B)))


@jit()
def running_update(running_mean, running_var, tracked, mean, var, count, momentum, cumulative,
                   pooled):
    """Update running statistics in place (PyTorch's rule) from the batch statistics of
    :func:`forward`: new = (1 - m) * old + m * batch, the variance unbiased
    (var * count / (count - 1)); m = ``momentum`` (the weight of the new batch, as in PyTorch),
    or 1 / (tracked + 1) when ``cumulative``.

    running_mean, running_var (S, G) any float dtype; tracked (S,) int64; mean, var (V, G),
    count (V,). ``pooled=False``: slot v takes group v (v < min(V, S); a group with no valid
    value leaves its slot alone). ``pooled=True`` (ghost batch norm): slot 0 takes the mean over
    the groups of their means and of their unbiased variances.
    """
    S, G = running_mean.shape
    V = mean.shape[0]
    if (running_var.shape[0] != S or running_var.shape[1] != G or tracked.shape[0] != S
            or mean.shape[1] != G or var.shape[0] != V or var.shape[1] != G
            or count.shape[0] != V):
        raise ValueError("running statistics (S, G), tracked (S,), mean and var (V, G) and "
                         "count (V,) must agree")
    slots = 1 if pooled else min(V, S)
    for s in range(slots):
        if not pooled and count[s] == 0:
            continue
        m = 1.0 / (tracked[s] + 1) if cumulative else momentum
        for c in range(G):
            if pooled:
                batch_mean = 0.0
                batch_var = 0.0
                for v in range(V):
                    batch_mean += mean[v, c]
                    batch_var += var[v, c] * count[v] / (count[v] - 1.0)
                batch_mean /= V
                batch_var /= V
            else:
                batch_mean = mean[s, c]
                batch_var = var[s, c] * count[s] / (count[s] - 1.0)
            running_mean[s, c] = (1.0 - m) * running_mean[s, c] + m * batch_mean
            running_var[s, c] = (1.0 - m) * running_var[s, c] + m * batch_var
        tracked[s] += 1


@jit(reduction=True)
def all_finite(a):
    """Whether every value of the 1-D array ``a`` is finite (x * 0 is NaN for NaN and inf)."""
    total = 0.0
    for k in range(a.size):
        total += a[k] * 0.0
    return np.isfinite(total)
