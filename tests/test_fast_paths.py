"""The performance paths of the engine, each against the NumPy oracle with the shared tolerances:
``out=`` arrays at any alignment, large (parallel) inputs, the columns driver of batch norm on
(N, C) (several chunks merged, several virtual batches), the memory contract of ``Norm`` (fresh
outputs unless ``out=``), refused calls that change nothing, and the cache of kernels that call
parallel ones.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normkit
from normkit import reference as ref
from normkit.kernels import _engine, batch, group, layer

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


# -- out= at any alignment --------------------------------------------------------------------

BATCH_SHAPES = [
    (3, 7, 5),                  # tiny, planes driver
    (5, 7),                     # tiny, columns driver
    (4, 16, 182, 182),          # 8.4 MB: planes driver, parallel
    (4096, 600),                # 9.8 MB: columns driver (several chunks), parallel
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
    for y, dx in results:                      # aligned or not: same bits
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])
        np.testing.assert_array_equal(y, fresh)


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


# -- the columns driver: several chunks and several virtual batches ---------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("virtual", [None, 1200])
def test_row_chunks_merge_like_one_pass(dtype, virtual):
    """(N, C) with N much larger than a chunk: chunk statistics merged in order, per virtual
    batch (1200 rows is not a multiple of the chunk size, so the last chunk is short)."""
    shape = (2400, 96)
    x, dy, gamma, beta = _data(shape, dtype, seed=4)
    x[:, :8] += 1e3                            # large means in some channels
    assert _engine._chunk_rows(virtual or shape[0], shape[1], x.itemsize) < (virtual or shape[0])
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


def test_all_finite():
    assert _engine.all_finite(np.ones(37, F32))
    for bad in (np.nan, np.inf, -np.inf):
        a = np.ones(37, F32)
        a[20] = bad
        assert not _engine.all_finite(a)
    assert _engine.all_finite(np.full(5, np.finfo(F32).max))   # no overflow in the check


# -- the cache: a cached serial function calling a cached parallel one --------------------------

_CACHED_CALLER = textwrap.dedent('''
    import numpy as np
    from numba import prange
    from normkit.kernels._jit import jit

    @jit(parallel=True)
    def double(x):
        out = np.zeros_like(x)
        if x.size < 1000:
            for i in range(x.size):
                out[i] = 2 * x[i]
        else:
            for i in prange(x.size):
                out[i] = 2 * x[i]
        return out

    @jit()
    def outer(x):                   # like batch.forward_train -> _engine.forward
        return double(x.reshape(x.size))
''')


def test_cached_caller_of_parallel_kernel_runs_from_cache(tmp_path):
    """numba issue #8578: loading such a caller from the cache in a new process crashed unless
    the thread pool was started; normkit.kernels._jit starts it on import."""
    (tmp_path / "cached_caller.py").write_text(_CACHED_CALLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    env.pop("NUMBA_CACHE_DIR", None)
    call = "import numpy as np, cached_caller as m; print(m.outer(np.ones({})).sum())"
    # 2-D (parallel loop) compiles outer and double; 1-D compiles another outer and
    # loads double from the cache; the third process loads everything: it segfaulted with plain
    # numba.njit(cache=True) in the same layout.
    for shape in ("(100, 100)", "10", "10"):
        done = subprocess.run([sys.executable, "-c", call.format(shape)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert float(done.stdout) == 2 * np.prod(eval(shape))
    assert any(p.suffix == ".nbi" for p in (tmp_path / "__pycache__").iterdir())


NORM_CASES = [
    ("batch", (6, 4, 5), {}), ("batch", (6, 4), {}), ("ghost", (6, 4), {"virtual_batch_size": 3}),
    ("renorm", (6, 4), {}), ("group", (3, 4, 5), {"num_groups": 2}), ("instance", (3, 4, 5), {}),
    ("layer", (3, 4), {}), ("rms", (3, 4), {})]


def _features(name, shape):
    return shape[-1] if name in ("layer", "rms") else shape[1]


@pytest.mark.parametrize("name,shape,kwargs", NORM_CASES)
def test_outputs_are_fresh_unless_out_is_given(name, shape, kwargs):
    """The memory contract: each call returns a new array, or writes into out= and returns it."""
    norm, twin = (normkit.make(name, _features(name, shape), **kwargs) for _ in range(2))
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(F32)
    dy = rng.standard_normal(shape).astype(F32)
    y1, y2 = norm.forward(x, training=True), norm.forward(x, training=True)
    dx1, dx2 = norm.backward(dy), norm.backward(dy)
    assert not np.shares_memory(y1, y2) and not np.shares_memory(dx1, dx2)
    out, dout = np.empty_like(x), np.empty_like(x)
    twin.forward(x, training=True)             # the same history as norm's
    assert twin.forward(x, training=True, out=out) is out
    assert twin.backward(dy, out=dout) is dout
    np.testing.assert_array_equal(out, y2)
    np.testing.assert_array_equal(dout, dx2)


WORKSPACE_CASES = NORM_CASES + [("frn", (3, 4, 5), {}), ("dyt", (3, 4, 5), {}),
                                 ("recurrent_batch", (3, 2, 4), {"max_steps": 3})]


@pytest.mark.parametrize("name,shape,kwargs", WORKSPACE_CASES)
def test_workspace_reuses_its_arrays_and_computes_as_fresh_outputs(name, shape, kwargs):
    """workspace=True: forward and backward each return the norm's own array, the same one call
    after call, holding what a norm without workspace returns (same history, bit for bit)."""
    features = shape[-1] if name == "recurrent_batch" else _features(name, shape)
    norm = normkit.make(name, features, workspace=True, **kwargs)
    fresh = normkit.make(name, features, **kwargs)
    rng = np.random.default_rng(2)
    ys, dxs = [], []
    for step in range(3):
        x = rng.standard_normal(shape).astype(F32)
        dy = rng.standard_normal(shape).astype(F32)
        y, dx = norm.forward(x, training=step < 2), norm.backward(dy)
        np.testing.assert_array_equal(y, fresh.forward(x, training=step < 2))
        np.testing.assert_array_equal(dx, fresh.backward(dy))
        for key in norm.grads:
            np.testing.assert_array_equal(norm.grads[key], fresh.grads[key])
        ys.append(y)
        dxs.append(dx)
    assert ys[0] is ys[1] is ys[2] and dxs[0] is dxs[1] is dxs[2]
    assert not np.shares_memory(ys[0], dxs[0])
    assert norm.forward_saved(x, training=True)[0] is not ys[0]    # forward_saved: always fresh


def test_workspace_takes_a_new_array_for_a_new_shape_an_overlapping_input_or_out():
    norm = normkit.make("layer", 4, workspace=True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4)).astype(F32)
    y = norm.forward(x, training=True)
    expected = normkit.make("layer", 4).forward(y.copy(), training=True)
    y2 = norm.forward(y, training=True)        # its own output as input: not overwritten
    assert y2 is not y and not np.shares_memory(y2, y)
    np.testing.assert_array_equal(y2, expected)
    assert norm.forward(y, training=True) is y2    # the new array is the workspace now
    y3 = norm.forward(rng.standard_normal((5, 4)).astype(F32), training=True)
    assert y3.shape == (5, 4) and y3 is not y2
    out = np.empty((5, 4), F32)
    assert norm.forward(rng.standard_normal((5, 4)).astype(F32), training=True, out=out) is out
    assert norm.forward(rng.standard_normal((5, 4)).astype(F32), training=True) is y3


def test_workspace_refused_call_keeps_its_arrays_and_bad_flag_is_refused():
    norm = normkit.make("batch", 4, workspace=True)
    x = np.random.default_rng(4).standard_normal((6, 4)).astype(F32)
    y = norm.forward(x, training=True)
    kept = dict(norm._buffers)
    with pytest.raises(TypeError, match="dtype float64"):
        norm.forward(x.astype(np.float64), training=True)
    with pytest.raises(ValueError, match="channels"):
        norm.forward(np.ones((6, 5), F32), training=True)
    assert norm._buffers == kept and norm.forward(x, training=True) is y
    with pytest.raises(TypeError, match="workspace must be True or False"):
        normkit.make("batch", 4, workspace="yes")
    clone = pickle.loads(pickle.dumps(norm))   # a copy owns no arrays of the original
    assert clone.workspace and not np.shares_memory(clone.forward(x, training=True), y)


@pytest.mark.parametrize("bad,fragment", [
    (lambda x: np.empty(x.shape, np.float64), "out must be a writeable C-contiguous float32"),
    (lambda x: np.empty(x.shape[::-1], F32), "out must be a writeable C-contiguous float32"),
    (lambda x: np.empty(x.shape[::-1], F32).T, "C-contiguous: False"),
    (lambda x: x, "out must not overlap"),
], ids=["dtype", "shape", "fortran", "overlap"])
def test_bad_out_is_refused_and_changes_nothing(bad, fragment):
    norm = normkit.make("batch", 4)
    x = np.random.default_rng(2).standard_normal((6, 4)).astype(F32)
    state = {k: v.copy() for k, v in norm.state.items()}
    with pytest.raises((ValueError, TypeError), match=fragment):
        norm.forward(x, training=True, out=bad(x))
    for key, value in state.items():
        np.testing.assert_array_equal(norm.state[key], value, err_msg=key)




# -- refused calls change nothing ----------------------------------------------------------------


BAD_CALLS = [
    ("x float64", lambda x: x.astype(np.float64), TypeError, "x has dtype float64"),
    ("x list", lambda x: x.tolist(), TypeError, "x must be a numpy array"),
    ("x channels", lambda x: x[:, :3], ValueError, "num_features=4"),
    ("x one row", lambda x: x[:1], ValueError, "more than 1 value per channel"),
    ("x int", lambda x: x.astype(np.int32), TypeError, "floating-point"),
]


@pytest.mark.parametrize("what,make_bad,exc,fragment", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_batch_refuses_bad_x_and_changes_nothing(what, make_bad, exc, fragment):
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    state = {k: v.copy() for k, v in norm.state.items()}
    with pytest.raises(exc, match=fragment):
        norm.forward(make_bad(x), training=True)
    for key, value in state.items():
        np.testing.assert_array_equal(norm.state[key], value, err_msg=key)
    plain = normkit.make("batch", 4)
    plain.forward(x, training=True)
    np.testing.assert_array_equal(norm.backward(dy), plain.backward(dy))   # _saved intact


@pytest.mark.parametrize("key", ["gamma", "beta"])
def test_batch_refuses_non_finite_params_and_changes_nothing(key):
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(6)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    y_kept = norm.forward(x, training=True)
    state = {k: v.copy() for k, v in norm.state.items()}
    norm.params[key][1] = np.nan
    with pytest.raises(ValueError, match=rf"params\['{key}'\] contains NaN"):
        norm.forward(x + 1, training=True)
    for name, value in state.items():
        np.testing.assert_array_equal(norm.state[name], value, err_msg=name)
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
def test_batch_backward_refuses_bad_dy_and_changes_nothing(bad, exc, fragment):
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


def test_batch_backward_needs_the_shape_of_the_last_forward():
    """A forward of another shape in between: backward checks dy against that one."""
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    norm.backward(dy)
    norm.forward(x[:3].copy(), training=True)
    with pytest.raises(ValueError, match="dy must have the shape"):
        norm.backward(dy)


def test_batch_non_contiguous_x_gives_the_contiguous_result():
    norm = normkit.make("batch", 4)
    plain = normkit.make("batch", 4)
    x = np.random.default_rng(9).standard_normal((4, 6)).astype(F32)
    norm.forward(np.ascontiguousarray(x.T), training=True)
    y = norm.forward(x.T, training=True)       # same shape, other strides
    plain.forward(np.ascontiguousarray(x.T), training=True)
    np.testing.assert_array_equal(y, plain.forward(np.ascontiguousarray(x.T), training=True))


# -- checks run once per input signature; the per-call checks stay ----------------------------


def _state_of(norm):
    return {k: v.copy() for k, v in norm.state.items()}


def _assert_state(norm, state):
    for key, value in state.items():
        np.testing.assert_array_equal(norm.state[key], value, err_msg=key)


def test_checked_signature_is_not_reused_for_another_shape_dtype_or_mode():
    norm = normkit.make("batch", 4)
    x = np.random.default_rng(10).standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    norm.forward(x[:1].copy(), training=False)  # (1, 4) in evaluation: fine, and now checked
    state = _state_of(norm)
    for bad, exc, fragment in [(x[:1].copy(), ValueError, "more than 1 value per channel"),
                               (x[:, :3].copy(), ValueError, "num_features=4"),
                               (x.astype(np.float64), TypeError, "x has dtype float64"),
                               (x.reshape(6, 4, 1)[:, :, :0], ValueError, "x is empty")]:
        with pytest.raises(exc, match=fragment):
            norm.forward(bad, training=True)
        _assert_state(norm, state)


def test_mask_and_out_are_checked_on_every_call_of_a_checked_signature():
    norm, plain = normkit.make("batch", 4), normkit.make("batch", 4)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 4, 5)).astype(F32)
    mask = rng.random((6, 5)) > 0.2
    norm.forward(x, training=True)
    plain.forward(x, training=True)
    state = _state_of(norm)
    for kwargs, exc, fragment in [({"mask": mask[:, :4]}, ValueError, "mask must have shape"),
                                  ({"mask": mask.astype(F32)}, TypeError, "bool array"),
                                  ({"out": np.empty((6, 4, 4), F32)}, ValueError, "out must be"),
                                  ({"out": x}, ValueError, "out must not overlap")]:
        with pytest.raises(exc, match=fragment):
            norm.forward(x, training=True, **kwargs)
        _assert_state(norm, state)
    out = np.empty_like(x)
    assert norm.forward(x, training=True, mask=mask, out=out) is out
    np.testing.assert_array_equal(out, plain.forward(x, training=True, mask=mask))
    assert (out[~np.broadcast_to(mask[:, None, :], x.shape)] == 0).all()
    y = norm.forward(x, training=True)         # back to no mask and no out: a fresh array
    assert not np.shares_memory(y, out)
    np.testing.assert_array_equal(y, plain.forward(x, training=True))
    _assert_state(norm, _state_of(plain))


@pytest.mark.parametrize("key", ["running_mean", "running_var", "num_batches_tracked"])
def test_state_replaced_with_a_wrong_array_is_refused_and_changes_nothing(key):
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(12)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    norm.backward(dy)
    state, grads = _state_of(norm), {k: v.copy() for k, v in norm.grads.items()}
    norm.state[key] = np.zeros(3, norm.state[key].dtype)
    for call in (lambda: norm.forward(x, training=True), lambda: norm.backward(dy)):
        with pytest.raises(ValueError, match=rf"state\['{key}'\] must be a writeable"):
            call()
        for other, value in state.items():
            if other != key:
                np.testing.assert_array_equal(norm.state[other], value, err_msg=other)
        for name, value in grads.items():
            np.testing.assert_array_equal(norm.grads[name], value, err_msg=name)


def test_replaced_arrays_of_the_right_shape_are_the_ones_used():
    """Views of params and state follow an array replaced from outside (same shape and dtype)."""
    norm, plain = normkit.make("batch", 4), normkit.make("batch", 4)
    rng = np.random.default_rng(13)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    plain.forward(x, training=True)
    gamma = rng.uniform(0.5, 2, 4).astype(F32)
    old_mean = norm.state["running_mean"]
    norm.params["gamma"] = gamma.copy()
    norm.state["running_mean"] = old_mean.copy()
    plain.params["gamma"][...] = gamma
    np.testing.assert_array_equal(norm.forward(x, training=True), plain.forward(x, training=True))
    np.testing.assert_array_equal(norm.backward(dy), plain.backward(dy))
    _assert_state(norm, _state_of(plain))      # the new running_mean was updated...
    assert not np.array_equal(old_mean, norm.state["running_mean"])   # ...not the old one
    np.testing.assert_array_equal(norm.forward(x[:2].copy(), training=False),
                                  plain.forward(x[:2].copy(), training=False))


@pytest.mark.parametrize("name,kwargs,shape", [("group", {"num_groups": 2}, (3, 4, 5)),
                                               ("layer", {}, (3, 4)), ("rms", {}, (3, 4))])
def test_replaced_params_are_used_by_the_other_engine_norms(name, kwargs, shape):
    norm, plain = (normkit.make(name, _features(name, shape), **kwargs) for _ in range(2))
    rng = np.random.default_rng(14)
    x, dy = rng.standard_normal(shape).astype(F32), rng.standard_normal(shape).astype(F32)
    norm.forward(x, training=True)
    for key, value in norm.params.items():
        new = rng.standard_normal(value.shape).astype(F32)
        norm.params[key] = new
        plain.params[key][...] = new
    np.testing.assert_array_equal(norm.forward(x, training=True), plain.forward(x, training=True))
    np.testing.assert_array_equal(norm.backward(dy), plain.backward(dy))
    for key in norm.grads:
        np.testing.assert_array_equal(norm.grads[key], plain.grads[key], err_msg=key)


def test_gamma_replaced_between_forward_and_backward_is_refused():
    norm = normkit.make("batch", 4)
    rng = np.random.default_rng(15)
    x, dy = rng.standard_normal((6, 4)).astype(F32), rng.standard_normal((6, 4)).astype(F32)
    norm.forward(x, training=True)
    grads = {k: v.copy() for k, v in norm.grads.items()}
    norm.params["gamma"] = np.ones(5, F32)
    with pytest.raises(ValueError, match=r"params\['gamma'\] must be a writeable"):
        norm.backward(dy)
    for key, value in grads.items():
        np.testing.assert_array_equal(norm.grads[key], value, err_msg=key)


def test_changing_a_setting_checks_the_signature_again():
    ghost = normkit.make("ghost", 4, virtual_batch_size=3)
    x = np.random.default_rng(16).standard_normal((6, 4)).astype(F32)
    ghost.forward(x, training=True)
    state = _state_of(ghost)
    ghost.virtual_batch_size = 4
    with pytest.raises(ValueError, match="virtual_batch_size=4 must divide the batch size"):
        ghost.forward(x, training=True)
    _assert_state(ghost, state)
    ghost.virtual_batch_size = 2
    twin = normkit.make("ghost", 4, virtual_batch_size=2)
    twin.state["num_batches_tracked"][...] = 1
    for key in ("running_mean", "running_var"):
        twin.state[key][...] = state[key]
    np.testing.assert_array_equal(ghost.forward(x, training=True), twin.forward(x, training=True))
    _assert_state(ghost, _state_of(twin))

    group = normkit.make("group", 4, num_groups=2)
    x3 = x.reshape(6, 4, 1) + np.arange(3, dtype=F32)
    group.forward(x3, training=True)
    group.num_groups = 4                       # the (G, C/G) views of gamma/beta follow
    np.testing.assert_array_equal(group.forward(x3, training=True),
                                  normkit.make("group", 4, num_groups=4).forward(x3, training=True))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda norm: pickle.loads(pickle.dumps(norm))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name,kwargs,shape", [("batch", {}, (6, 4)),
                                               ("group", {"num_groups": 2}, (3, 4, 5)),
                                               ("layer", {}, (3, 4))])
def test_a_copy_of_a_used_norm_computes_with_its_own_arrays(clone, name, kwargs, shape):
    """A copy's params/state are arrays of its own; its views must follow them, not the
    original's nor copies of the original's views."""
    norm, plain = (normkit.make(name, _features(name, shape), **kwargs) for _ in range(2))
    rng = np.random.default_rng(17)
    x, dy = rng.standard_normal(shape).astype(F32), rng.standard_normal(shape).astype(F32)
    norm.forward(x, training=True)
    plain.forward(x, training=True)
    twin = clone(norm)
    before = _state_of(norm), {k: v.copy() for k, v in norm.params.items()}
    for key, value in twin.params.items():
        value[...] = rng.standard_normal(value.shape)   # an optimizer step on the copy
        plain.params[key][...] = value
    np.testing.assert_array_equal(twin.forward(x, training=True), plain.forward(x, training=True))
    np.testing.assert_array_equal(twin.backward(dy), plain.backward(dy))
    _assert_state(twin, _state_of(plain))
    _assert_state(norm, before[0])             # the original is untouched
    for key, value in before[1].items():
        np.testing.assert_array_equal(norm.params[key], value, err_msg=key)
