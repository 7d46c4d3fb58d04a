"""The performance paths of the kernels, each against the NumPy oracle with the shared tolerances:
``out=`` arrays at any alignment, streaming (non-temporal) stores for outputs larger than
``STREAM_MIN_BYTES``, the row-chunk driver of batch norm on (N, C) (several chunks merged, several
virtual batches), reused buffers in ``Norm``, and the cache of kernels that call parallel twins.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normkit
from normkit import reference as ref
from normkit.kernels import _core, batch, group, layer

from cases import TOL

F32 = np.float32


def _data(shape, dtype=F32, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[-1] if len(shape) == 2 else shape[1]
    gamma = (rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, gamma, beta


def _close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, **TOL[actual.dtype.type], err_msg=what)


def _misaligned(shape, dtype, offset):
    """An uninitialized C-contiguous array starting ``offset`` elements into a larger buffer."""
    size = int(np.prod(shape))
    return np.empty(size + 16, dtype)[offset:offset + size].reshape(shape)


# -- out= and streaming stores --------------------------------------------------------------------

BATCH_SHAPES = [
    (3, 7, 5),                  # tiny, group driver
    (5, 7),                     # tiny, row-chunk driver
    (4, 16, 182, 182),          # 8.4 MB: group driver, streamed output
    (4096, 600),                # 9.8 MB: row-chunk driver (several chunks), streamed output
]


@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
def test_batch_out_any_alignment_matches_reference(shape):
    x, dy, gamma, beta = _data(shape)
    y_ref, mean_ref, var_ref = ref.batch_forward_train(x, gamma, beta, 1e-5)
    dx_ref, dgamma_ref, dbeta_ref = ref.batch_backward(dy, x, gamma, 1e-5)
    results = []
    for offset in (0, 1, 3):
        out, dout = _misaligned(shape, F32, offset), _misaligned(shape, F32, offset)
        y, mean, var = batch.forward_train(x, gamma, beta, 1e-5, out)
        dx, dgamma, dbeta = batch.backward(dy, x, gamma, mean, var, 1e-5, dout)
        assert y is out and dx is dout
        _close(y, y_ref, f"y, offset {offset}")
        _close(dx, dx_ref, f"dx, offset {offset}")
        _close(dgamma.astype(F32), dgamma_ref, "dgamma")
        _close(dbeta.astype(F32), dbeta_ref, "dbeta")
        _close(mean.astype(F32), mean_ref, "mean")
        _close(var.astype(F32), var_ref, "var")
        results.append((y.copy(), dx.copy()))
    fresh = batch.forward_train(x, gamma, beta, 1e-5)[0]
    for y, dx in results:                      # streamed or not, aligned or not: same bits
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])
        np.testing.assert_array_equal(y, fresh)


def test_output_larger_than_threshold_is_streamed():
    """The large cases above do take the streaming path (and the small ones do not)."""
    assert np.prod(BATCH_SHAPES[2]) * 4 >= _core.STREAM_MIN_BYTES
    assert np.prod(BATCH_SHAPES[3]) * 4 >= _core.STREAM_MIN_BYTES
    assert _core._streams(np.empty(_core.STREAM_MIN_BYTES // 4, F32))
    assert not _core._streams(np.empty(1000, F32))


@pytest.mark.parametrize("shape", [(4, 6), (2048, 1100)], ids=str)
def test_layer_and_rms_out_match_reference(shape):
    x, dy, gamma, beta = _data(shape)
    out = _misaligned(shape, F32, 5)
    y, mean, var = layer.forward(x, gamma, beta, 1e-5, out)
    assert y is out
    _close(y, ref.layer_forward(x, gamma, beta, 1, 1e-5)[0], "layer y")
    dout = _misaligned(shape, F32, 3)
    dx, dgamma, dbeta = layer.backward(dy, x, gamma, mean, var, 1e-5, dout)
    dx_ref, dgamma_ref, dbeta_ref = ref.layer_backward(dy, x, gamma, 1, 1e-5)
    _close(dx, dx_ref, "layer dx")
    _close(dgamma.astype(F32), dgamma_ref, "layer dgamma")
    _close(dbeta.astype(F32), dbeta_ref, "layer dbeta")
    y, mean_square = layer.rms_forward(x, gamma, 1e-5, out)
    _close(y, ref.rms_forward(x, gamma, 1, 1e-5)[0], "rms y")
    dx, dgamma = layer.rms_backward(dy, x, gamma, mean_square, 1e-5, dout)
    dx_ref, dgamma_ref = ref.rms_backward(dy, x, gamma, 1, 1e-5)
    _close(dx, dx_ref, "rms dx")
    _close(dgamma.astype(F32), dgamma_ref, "rms dgamma")


@pytest.mark.parametrize("shape", [(3, 12, 5), (8, 64, 90, 90)], ids=str)
def test_group_out_matches_reference(shape):
    x, dy, gamma, beta = _data(shape)
    out, dout = _misaligned(shape, F32, 1), _misaligned(shape, F32, 2)
    y, mean, var = group.forward(x, gamma, beta, 4, 1e-5, out)
    dx, dgamma, dbeta = group.backward(dy, x, gamma, 4, mean, var, 1e-5, dout)
    assert y is out and dx is dout
    _close(y, ref.group_forward(x, gamma, beta, 4, 1e-5)[0], "y")
    dx_ref, dgamma_ref, dbeta_ref = ref.group_backward(dy, x, gamma, 4, 1e-5)
    _close(dx, dx_ref, "dx")
    _close(dgamma.astype(F32), dgamma_ref, "dgamma")
    _close(dbeta.astype(F32), dbeta_ref, "dbeta")


def test_eval_out_matches_reference():
    x, dy, gamma, beta = _data((4, 16, 182, 182))
    rm = np.linspace(-1, 1, 16).astype(F32)
    rv = np.linspace(0.5, 2, 16).astype(F32)
    y = batch.forward_eval(x, gamma, beta, rm, rv, 1e-5, _misaligned(x.shape, F32, 3))
    _close(y, ref.batch_forward_eval(x, gamma, beta, rm, rv, 1e-5), "eval y")
    dx, dgamma, dbeta = batch.backward_eval(dy, x, gamma, rm, rv, 1e-5, _misaligned(x.shape, F32, 1))
    dx_ref, dgamma_ref, dbeta_ref = ref.batch_backward_eval(dy, x, gamma, rm, rv, 1e-5)
    _close(dx, dx_ref, "eval dx")
    _close(dgamma.astype(F32), dgamma_ref, "eval dgamma")
    _close(dbeta.astype(F32), dbeta_ref, "eval dbeta")


# -- the row-chunk driver: several chunks and several virtual batches ---------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("virtual", [None, 1200])
def test_row_chunks_merge_like_one_pass(dtype, virtual):
    """(N, C) with N much larger than a chunk: chunk statistics merged in order, per virtual
    batch (1200 rows is not a multiple of the chunk size, so the last chunk is short)."""
    shape = (2400, 96)
    x, dy, gamma, beta = _data(shape, dtype, seed=4)
    x[:, :8] += 1e3                            # large means in some channels
    assert _core._chunk_rows(virtual or shape[0], shape[1], x.itemsize) < (virtual or shape[0])
    if virtual is None:
        y, mean, var = batch.forward_train(x, gamma, beta, 1e-5)
        dx, dgamma, dbeta = batch.backward(dy, x, gamma, mean, var, 1e-5)
        y_ref, mean_ref, var_ref = ref.batch_forward_train(x, gamma, beta, 1e-5)
        dx_ref, dgamma_ref, dbeta_ref = ref.batch_backward(dy, x, gamma, 1e-5)
    else:
        y, mean, var = batch.ghost_forward_train(x, gamma, beta, 1e-5, virtual)
        dx, dgamma, dbeta = batch.ghost_backward(dy, x, gamma, mean, var, 1e-5, virtual)
        y_ref, means_ref, vars_ref = ref.ghost_forward_train(x, gamma, beta, 1e-5, virtual)
        dx_ref, dgamma_ref, dbeta_ref = ref.ghost_backward(dy, x, gamma, 1e-5, virtual)
        mean_ref, var_ref = means_ref.reshape(mean.shape), vars_ref.reshape(var.shape)
    _close(y, y_ref, "y")
    _close(dx, dx_ref, "dx")
    _close(mean.astype(dtype), np.asarray(mean_ref, dtype), "mean")
    _close(var.astype(dtype), np.asarray(var_ref, dtype), "var")
    _close(dgamma.astype(dtype), dgamma_ref, "dgamma")
    _close(dbeta.astype(dtype), dbeta_ref, "dbeta")


# -- Norm with reuse_buffers ---------------------------------------------------------------------

@pytest.mark.parametrize("name,shape,kwargs", [
    ("batch", (6, 4, 5), {}), ("batch", (6, 4), {}), ("ghost", (6, 4), {"virtual_batch_size": 3}),
    ("renorm", (6, 4), {}), ("group", (3, 4, 5), {"num_groups": 2}), ("instance", (3, 4, 5), {}),
    ("layer", (3, 4), {}), ("rms", (3, 4), {})])
def test_reuse_buffers_same_results_and_same_arrays(name, shape, kwargs):
    features = shape[-1] if name in ("layer", "rms") else shape[1]
    plain = normkit.make(name, features, **kwargs)
    reusing = normkit.make(name, features, reuse_buffers=True, **kwargs)
    rng = np.random.default_rng(0)
    outputs = []
    for step in range(3):
        x = rng.standard_normal(shape).astype(F32)
        dy = rng.standard_normal(shape).astype(F32)
        y, dx = reusing.forward(x, training=True), reusing.backward(dy)
        np.testing.assert_array_equal(y, plain.forward(x, training=True))
        np.testing.assert_array_equal(dx, plain.backward(dy))
        for key in plain.grads:
            np.testing.assert_array_equal(reusing.grads[key], plain.grads[key])
        outputs.append((y, dx))
    for y, dx in outputs[1:]:                  # views of the same two buffers
        assert np.shares_memory(y, outputs[0][0]) and np.shares_memory(dx, outputs[0][1])


def test_reuse_buffers_never_overwrites_an_input():
    """Feeding the returned y back in (or dx as dy) gets a fresh output, and the right answer."""
    norm = normkit.make("layer", 4, reuse_buffers=True)
    plain = normkit.make("layer", 4)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(F32)
    y1 = norm.forward(x, training=True)
    expected = plain.forward(plain.forward(x, training=True).copy(), training=True)
    y2 = norm.forward(y1, training=True)
    assert not np.shares_memory(y2, y1)
    np.testing.assert_array_equal(y2, expected)
    dx1 = norm.backward(np.ones_like(x))
    dx2 = norm.backward(dx1)
    assert not np.shares_memory(dx1, dx2)
    plain.backward(np.ones_like(x))
    np.testing.assert_array_equal(dx2, plain.backward(dx1.copy()))


def test_reuse_buffers_must_be_bool():
    with pytest.raises(TypeError, match="reuse_buffers"):
        normkit.make("batch", 4, reuse_buffers="yes")


def test_all_finite():
    assert _core.all_finite(np.ones(37, F32))
    for bad in (np.nan, np.inf, -np.inf):
        a = np.ones(37, F32)
        a[20] = bad
        assert not _core.all_finite(a)
    assert _core.all_finite(np.full(5, np.finfo(F32).max))   # no overflow in the check


# -- the cache: a cached serial function calling a cached parallel twin --------------------------

_CACHED_CALLER = textwrap.dedent('''
    import numpy as np
    from numba import prange
    from normkit.kernels._jit import jit, serial_and_parallel

    def _double(x):
        out = np.zeros_like(x)
        for i in prange(x.size):
            out[i] = 2 * x[i]
        return out

    _double_serial, _double_parallel = serial_and_parallel(_double)

    @jit()
    def double(x):
        if x.size < 1000:
            return _double_serial(x)
        return _double_parallel(x)

    @jit()
    def outer(x):                   # like batch.forward_train -> _core.forward_train -> twins
        return double(x.reshape(x.size))
''')


def test_cached_caller_of_parallel_twin_runs_from_cache(tmp_path):
    """numba issue #8578: loading such a caller from the cache in a new process crashed unless
    the thread pool was started; normkit.kernels._jit starts it on import."""
    (tmp_path / "cached_caller.py").write_text(_CACHED_CALLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    env.pop("NUMBA_CACHE_DIR", None)
    call = "import numpy as np, cached_caller as m; print(m.outer(np.ones({})).sum())"
    # 2-D (parallel twin) compiles outer, double and the twins; 1-D compiles another outer and
    # loads double from the cache; the third process loads everything: it segfaulted with plain
    # numba.njit(cache=True) in the same layout.
    for shape in ("(100, 100)", "10", "10"):
        done = subprocess.run([sys.executable, "-c", call.format(shape)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert float(done.stdout) == 2 * np.prod(eval(shape))
    assert any(p.suffix == ".nbi" for p in (tmp_path / "__pycache__").iterdir())


def test_core_allocates_outputs_when_not_given():
    """_core.forward_train/backward keep their allocating form (out omitted) for other kernels."""
    x, dy, gamma, beta = _data((4, 3, 5))
    x4, dy4 = x.reshape(4, 3, 1, 5), dy.reshape(4, 3, 1, 5)
    g2, b2 = gamma.reshape(3, 1), beta.reshape(3, 1)
    y4, mean, var = _core.forward_train(x4, 4, g2, b2, 1e-5, True)
    dx4, dgamma2, dbeta2 = _core.backward(dy4, x4, 4, g2, mean, var, 1e-5, True)
    _close(y4.reshape(x.shape), ref.batch_forward_train(x, gamma, beta, 1e-5)[0], "y")
    dx_ref, dgamma_ref, _ = ref.batch_backward(dy, x, gamma, 1e-5)
    _close(dx4.reshape(x.shape), dx_ref, "dx")
    _close(dgamma2[:, 0].astype(F32), dgamma_ref, "dgamma")


# -- default buffer reuse: only when nothing outside the norm holds the last output --------------

REUSE_CASES = [
    ("batch", (6, 4, 5), {}), ("batch", (6, 4), {}), ("ghost", (6, 4), {"virtual_batch_size": 3}),
    ("renorm", (6, 4), {}), ("group", (3, 4, 5), {"num_groups": 2}), ("instance", (3, 4, 5), {}),
    ("layer", (3, 4), {}), ("rms", (3, 4), {})]


def _features(name, shape):
    return shape[-1] if name in ("layer", "rms") else shape[1]


@pytest.mark.parametrize("name,shape,kwargs", REUSE_CASES)
def test_default_reuse_never_overwrites_an_output_the_caller_holds(name, shape, kwargs):
    norm = normkit.make(name, _features(name, shape), **kwargs)
    rng = np.random.default_rng(1)
    x1, x2 = (rng.standard_normal(shape).astype(F32) for _ in range(2))
    dy1, dy2 = (rng.standard_normal(shape).astype(F32) for _ in range(2))
    y1 = norm.forward(x1, training=True)
    dx1 = norm.backward(dy1)
    y1_row = y1[0]                             # a view also keeps its base
    kept = (y1.copy(), dx1.copy())
    y2 = norm.forward(x2, training=True)
    dx2 = norm.backward(dy2)
    assert not np.shares_memory(y1, y2) and not np.shares_memory(dx1, dx2)
    np.testing.assert_array_equal(y1, kept[0])
    np.testing.assert_array_equal(dx1, kept[1])
    del y1, dx1
    y3 = norm.forward(x1, training=True)       # y1 lives on through its row view
    assert not np.shares_memory(y3, y1_row)
    np.testing.assert_array_equal(y1_row, kept[0][0])


@pytest.mark.parametrize("name,shape,kwargs", REUSE_CASES)
def test_default_reuse_takes_the_last_output_once_it_is_dropped(name, shape, kwargs):
    norm = normkit.make(name, _features(name, shape), **kwargs)
    plain = normkit.make(name, _features(name, shape), **kwargs)
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal(shape).astype(F32), rng.standard_normal(shape).astype(F32)
    y = norm.forward(x, training=True)
    dx = norm.backward(dy)
    y_address, dx_address = y.ctypes.data, dx.ctypes.data
    del y, dx
    y = norm.forward(x, training=True)
    dx = norm.backward(dy)
    assert (y.ctypes.data, dx.ctypes.data) == (y_address, dx_address)
    plain.forward(x, training=True)
    plain.backward(dy)
    np.testing.assert_array_equal(y, plain.forward(x, training=True))
    np.testing.assert_array_equal(dx, plain.backward(dy))


def test_default_reuse_never_overwrites_an_input():
    """An earlier output fed back in (y as x, dx as dy) is an input: the call writes elsewhere."""
    norm = normkit.make("layer", 4)
    plain = normkit.make("layer", 4)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(F32)
    y1 = norm.forward(x, training=True)
    expected = plain.forward(plain.forward(x, training=True).copy(), training=True)
    y2 = norm.forward(y1, training=True)
    assert not np.shares_memory(y2, y1)
    np.testing.assert_array_equal(y2, expected)


# -- batch norm's fast path ----------------------------------------------------------------------

def _no_checks(norm, monkeypatch):
    """Make the checked path fail loudly, so a call that passes took the fast path."""
    def checked(*args, **kwargs):
        raise AssertionError("the checked path ran")
    for method in ("_check", "_check_array", "_check_params"):
        monkeypatch.setattr(norm, method, checked)


@pytest.mark.parametrize("shape", [(2, 512), (6, 4, 5), (3, 4, 2, 3)], ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"running_average": "cumulative"}, {"affine": False},
                                    {"track_running_stats": False}], ids=str)
def test_batch_fast_path_equals_checked_path(shape, kwargs, monkeypatch):
    fast = normkit.make("batch", shape[1], **kwargs)
    checked = normkit.make("batch", shape[1], **kwargs)
    rng = np.random.default_rng(3)
    for step in range(4):
        x = rng.standard_normal(shape).astype(F32) * 2 + 0.5
        dy = rng.standard_normal(shape).astype(F32)
        if step == 1:
            _no_checks(fast, monkeypatch)      # the first call checked and cached the signature
        y = fast.forward(x, training=True)
        dx = fast.backward(dy)
        checked._fast_signature = None         # always the checked path
        np.testing.assert_array_equal(y, checked.forward(x, training=True))
        checked._fast_signature = None
        np.testing.assert_array_equal(dx, checked.backward(dy))
        for member in ("grads", "state"):
            for key, value in getattr(checked, member).items():
                np.testing.assert_array_equal(getattr(fast, member)[key], value, err_msg=key)
    gamma = np.ones(shape[1], F32)
    y_ref, _, _ = ref.batch_forward_train(x, gamma, np.zeros(shape[1], F32), 1e-5)
    _close(y, y_ref, "y")
    _close(dx, ref.batch_backward(dy, x, gamma, 1e-5)[0], "dx")


def test_batch_fast_path_follows_a_changed_momentum_and_eps():
    norm = normkit.make("batch", 3)
    x = np.random.default_rng(4).standard_normal((5, 3)).astype(F32)
    norm.forward(x, training=True)
    norm.momentum, norm.eps = 0.5, 0.25
    before = norm.state["running_mean"].copy()
    y = norm.forward(x, training=True)
    gamma, beta = np.ones(3, F32), np.zeros(3, F32)
    _close(y, ref.batch_forward_train(x, gamma, beta, 0.25)[0], "y with the new eps")
    _close(norm.state["running_mean"], 0.5 * before + 0.5 * x.mean(axis=0), "running_mean")


FAST_BAD_CALLS = [
    ("x float64", lambda x: x.astype(np.float64), TypeError, "x has dtype float64"),
    ("x list", lambda x: x.tolist(), TypeError, "x must be a numpy array"),
    ("x channels", lambda x: x[:, :3], ValueError, "num_features=4"),
    ("x one row", lambda x: x[:1], ValueError, "more than 1 value per channel"),
    ("x int", lambda x: x.astype(np.int32), TypeError, "floating-point"),
]


@pytest.mark.parametrize("what,make_bad,exc,fragment", FAST_BAD_CALLS, ids=[c[0] for c in FAST_BAD_CALLS])
def test_batch_fast_path_still_refuses_bad_x_and_changes_nothing(what, make_bad, exc, fragment):
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    norm.forward(x, training=True)             # the fast path is warm
    state = {k: v.copy() for k, v in norm.state.items()}
    with pytest.raises(exc, match=fragment):
        norm.forward(make_bad(x), training=True)
    for key, value in state.items():
        np.testing.assert_array_equal(norm.state[key], value, err_msg=key)
    plain = normkit.make("batch", 4)
    plain.forward(x, training=True)
    np.testing.assert_array_equal(norm.backward(dy), plain.backward(dy))   # _saved intact


@pytest.mark.parametrize("key", ["gamma", "beta"])
def test_batch_fast_path_refuses_non_finite_params_and_changes_nothing(key):
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    y_kept = norm.forward(x, training=True)
    state = {k: v.copy() for k, v in norm.state.items()}
    stats = norm._stats.copy()
    norm.params[key][1] = np.nan
    with pytest.raises(ValueError, match=rf"params\['{key}'\] contains NaN"):
        norm.forward(x + 1, training=True)
    for name, value in state.items():
        np.testing.assert_array_equal(norm.state[name], value, err_msg=name)
    np.testing.assert_array_equal(norm._stats, stats)
    norm.params[key][1] = 1.0 if key == "gamma" else 0.0
    plain = normkit.make("batch", 4)
    plain.forward(x, training=True)
    np.testing.assert_array_equal(y_kept, plain.forward(x, training=True))
    np.testing.assert_array_equal(norm.backward(dy), plain.backward(dy))


@pytest.mark.parametrize("bad,exc,fragment", [
    (lambda dy: dy.astype(np.float64), TypeError, "dy has dtype float64"),
    (lambda dy: dy[:, :3].copy(), ValueError, "dy must have the shape"),
    (lambda dy: dy.tolist(), TypeError, "dy must be a numpy array"),
], ids=["float64", "shape", "list"])
def test_batch_fast_backward_still_refuses_bad_dy_and_changes_nothing(bad, exc, fragment):
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(7)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    norm.backward(dy)
    grads = {k: v.copy() for k, v in norm.grads.items()}
    with pytest.raises(exc, match=fragment):
        norm.backward(bad(dy))
    for key, value in grads.items():
        np.testing.assert_array_equal(norm.grads[key], value, err_msg=key)


def test_batch_fast_backward_needs_the_shape_of_the_last_forward():
    """A forward of another shape in between: backward checks dy against that one."""
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    norm.backward(dy)
    norm.forward(x[:3].copy(), training=True)
    with pytest.raises(ValueError, match="dy must have the shape"):
        norm.backward(dy)


def test_batch_fast_path_handles_non_contiguous_x_by_the_checked_path():
    norm = normkit.make("batch", 4)
    plain = normkit.make("batch", 4)
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(F32)
    norm.forward(np.ascontiguousarray(x.T), training=True)
    y = norm.forward(x.T, training=True)       # same shape, other strides
    plain.forward(np.ascontiguousarray(x.T), training=True)
    np.testing.assert_array_equal(y, plain.forward(np.ascontiguousarray(x.T), training=True))
