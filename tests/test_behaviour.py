"""The behaviour checklist every normalizer keeps, bad input, and properties (hypothesis)."""
from __future__ import annotations

import copy

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normkit
from normkit.kernels import _engine

from cases import CASES


def _snapshot(norm):
    return copy.deepcopy((norm.params, norm.grads, norm.state, norm._saved))


def _assert_same_snapshot(a, b):
    for da, db in zip(a[:3], b[:3]):
        assert da.keys() == db.keys()
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)
    if a[3] is None or b[3] is None:
        assert a[3] is None and b[3] is None
    else:
        np.testing.assert_array_equal(a[3][0], b[3][0])


# -- checklist -----------------------------------------------------------------------------------

def test_available_lists_every_name():
    assert normkit.available() == sorted(
        ["batch", "ghost", "renorm", "layer", "group", "instance", "rms", "none", "recurrent_batch",
         "frn", "evonorm_s0", "evonorm_b0", "switchable", "dyt"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_params_grads_same_keys_and_eval_changes_nothing(case):
    norm = case.make(np.float32)
    assert norm.params.keys() == norm.grads.keys()
    x = case.input(np.float32)
    norm.forward(x, training=True)
    before = _snapshot(norm)
    y1 = norm.forward(x, training=False)
    y2 = norm.forward(x, training=False)
    np.testing.assert_array_equal(y1, y2)
    after = _snapshot(norm)
    for da, db in zip(before[:3], after[:3]):
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)


@pytest.mark.parametrize("case", [c for c in CASES if not c.has_running_stats], ids=lambda c: c.id)
def test_train_equals_eval_without_running_stats(case):
    norm = case.make(np.float64)
    x = case.input(np.float64)
    np.testing.assert_array_equal(norm.forward(x, training=True), norm.forward(x, training=False))
    assert norm.state == {}


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 6)])
def test_renorm_without_correction_is_batch_norm_bit_for_bit(shape):
    bn = normkit.make("batch", 4)
    rn = normkit.make("renorm", 4, r_max=1.0, d_max=0.0)
    rng = np.random.default_rng(0)
    for norm in (bn, rn):
        norm.params["gamma"][...] = [1.5, -0.5, 2.0, 0.7]
        norm.params["beta"][...] = [0.1, 0.2, -0.3, 0.0]
    for step in range(3):
        x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
        dy = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(rn.forward(x, training=True), bn.forward(x, training=True))
        np.testing.assert_array_equal(rn.backward(dy), bn.backward(dy))
        for key in bn.params:
            np.testing.assert_array_equal(rn.grads[key], bn.grads[key])
        for key in bn.state:
            np.testing.assert_array_equal(rn.state[key], bn.state[key])
    np.testing.assert_array_equal(rn.last_r, 1.0)
    np.testing.assert_array_equal(rn.last_d, 0.0)


def test_renorm_limits_settable_between_steps_and_clipping_changes_output():
    rn = normkit.make("renorm", 3, r_max=1.0, d_max=0.0, dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((8, 3)) * 4 + 2
    y_bn = rn.forward(x, training=True)
    rn.r_max, rn.d_max = 3.0, 5.0
    y_rn = rn.forward(x, training=True)
    assert not np.allclose(y_bn, y_rn)          # running stats (0, ~1) differ from the batch's
    assert np.all(rn.last_r <= 3.0) and np.all(rn.last_r >= 1 / 3.0)
    with pytest.raises(ValueError, match="r_max"):
        rn.r_max = 0.5
    with pytest.raises(ValueError, match="d_max"):
        rn.d_max = -1
    assert rn.r_max == 3.0 and rn.d_max == 5.0


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5)])
def test_ghost_with_one_virtual_batch_is_batch_norm_bit_for_bit(shape):
    bn, gh = normkit.make("batch", 3), normkit.make("ghost", 3, virtual_batch_size=shape[0])
    rng = np.random.default_rng(0)
    for step in range(2):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(gh.forward(x, training=True), bn.forward(x, training=True))
        np.testing.assert_array_equal(gh.backward(dy), bn.backward(dy))
        for key in bn.state:
            np.testing.assert_array_equal(gh.state[key], bn.state[key])


def test_ghost_differs_from_batch_norm_with_several_virtual_batches():
    x = np.random.default_rng(0).standard_normal((8, 3))
    y_bn = normkit.make("batch", 3, dtype=np.float64).forward(x, training=True)
    y_gh = normkit.make("ghost", 3, virtual_batch_size=2, dtype=np.float64).forward(x, training=True)
    assert not np.allclose(y_bn, y_gh)
    np.testing.assert_allclose(y_gh[:2].mean(axis=0), 0, atol=1e-12)   # each ghost batch centred


def test_cumulative_average_weights_all_batches_equally():
    bn = normkit.make("batch", 2, running_average="cumulative", dtype=np.float64)
    rng = np.random.default_rng(0)
    means = []
    for step in range(5):
        x = rng.standard_normal((6, 2)) + step
        means.append(x.mean(axis=0))
        bn.forward(x, training=True)
    np.testing.assert_allclose(bn.state["running_mean"], np.mean(means, axis=0), rtol=1e-12)


def test_no_running_stats_uses_batch_statistics_in_eval():
    bn = normkit.make("batch", 3, track_running_stats=False, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 3)) * 2 + 3
    assert bn.state == {}
    np.testing.assert_array_equal(bn.forward(x, training=False), bn.forward(x, training=True))


def test_momentum_zero_freezes_running_stats_and_one_copies_the_batch():
    x = np.random.default_rng(0).standard_normal((6, 2)) * 3 + 1
    frozen = normkit.make("batch", 2, momentum=0.0, dtype=np.float64)
    frozen.forward(x, training=True)
    np.testing.assert_array_equal(frozen.state["running_mean"], 0.0)
    np.testing.assert_array_equal(frozen.state["running_var"], 1.0)
    copy_ = normkit.make("batch", 2, momentum=1.0, dtype=np.float64)
    copy_.forward(x, training=True)
    np.testing.assert_allclose(copy_.state["running_mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(copy_.state["running_var"], x.var(axis=0, ddof=1), rtol=1e-12)


def test_instances_do_not_share_state():
    a, b = normkit.make("batch", 2), normkit.make("batch", 2)
    a.forward(np.float32([[0, 1], [1, 3], [2, 5]]), True)
    assert np.all(a.state["running_mean"] != 0)
    np.testing.assert_array_equal(b.state["running_mean"], 0.0)


@pytest.mark.parametrize("name,kwargs,mean_axes", [
    ("batch", {}, (0, 2)), ("layer", {}, (-1,)), ("group", {"num_groups": 2}, None),
    ("instance", {}, (2,)), ("ghost", {"virtual_batch_size": 4}, None)])
def test_float32_large_mean_small_spread_is_stable(name, kwargs, mean_axes):
    """Mean 1e4, std 1e-2 in float32: E[x^2] - E[x]^2 would lose every digit."""
    rng = np.random.default_rng(0)
    x64 = 1e4 + 1e-2 * rng.standard_normal((8, 4, 32))
    x32 = x64.astype(np.float32)
    num = 32 if name == "layer" else 4
    y32 = normkit.make(name, num, **kwargs).forward(x32, training=True)
    y64 = normkit.make(name, num, dtype=np.float64, **kwargs).forward(x32.astype(np.float64), True)
    assert np.abs(y32 - y64).max() <= 1e-3
    assert np.abs(y64).max() > 0.5             # the data really was normalized, not flattened


# -- bad input: a clear error naming the argument, and nothing mutated ---------------------------

def _trained(name, *args, **kwargs):
    norm = normkit.make(name, *args, **kwargs)
    shape = (4, args[0]) if name in ("layer", "rms") else (4, args[0], 3)
    x = np.random.default_rng(0).standard_normal(shape).astype(norm.dtype)
    norm.forward(x, training=True)
    return norm


F32 = np.float32
BAD_CALLS = [
    # (id, norm factory, call, exception, message fragment)
    ("wrong ndim", lambda: _trained("batch", 4), lambda n: n.forward(np.ones(4, F32), True),
     ValueError, "(N, C)"),
    ("wrong channels", lambda: _trained("batch", 4), lambda n: n.forward(np.ones((3, 5), F32), True),
     ValueError, "num_features=4"),
    ("one value per channel", lambda: _trained("batch", 4),
     lambda n: n.forward(np.ones((1, 4), F32), True), ValueError, "more than 1 value per channel"),
    ("one value per channel, 3-D", lambda: _trained("batch", 4),
     lambda n: n.forward(np.ones((1, 4, 1), F32), True), ValueError, "more than 1 value"),
    ("integer dtype", lambda: _trained("batch", 4), lambda n: n.forward(np.ones((3, 4), int), True),
     TypeError, "floating-point"),
    ("dtype mismatch", lambda: _trained("batch", 4),
     lambda n: n.forward(np.ones((3, 4), np.float64), True), TypeError, "dtype=np.float64"),
    ("not an array", lambda: _trained("batch", 4), lambda n: n.forward([[1.0] * 4] * 3, True),
     TypeError, "numpy array"),
    ("training not bool", lambda: _trained("batch", 4), lambda n: n.forward(np.ones((3, 4), F32), "yes"),
     TypeError, "training"),
    ("nan in params", lambda: _trained("batch", 4),
     lambda n: (n.params["gamma"].__setitem__(0, np.nan), n.forward(np.ones((3, 4), F32), True)),
     ValueError, "params['gamma']"),
    ("virtual batch does not divide", lambda: _trained("ghost", 4, virtual_batch_size=2),
     lambda n: n.forward(np.ones((3, 4), F32), True), ValueError, "virtual_batch_size=2"),
    ("layer shape", lambda: _trained("layer", 4), lambda n: n.forward(np.ones((3, 5), F32), True),
     ValueError, "normalized shape (4,)"),
    ("rms shape", lambda: _trained("rms", 4), lambda n: n.forward(np.ones((3, 5), F32), True),
     ValueError, "normalized shape (4,)"),
    ("group channels", lambda: _trained("group", 4, num_groups=2),
     lambda n: n.forward(np.ones((3, 6, 2), F32), True), ValueError, "num_features=4"),
    ("instance one spatial element", lambda: _trained("instance", 4),
     lambda n: n.forward(np.ones((3, 4, 1), F32), True), ValueError, "spatial element"),
    ("dy wrong shape", lambda: _trained("batch", 4), lambda n: n.backward(np.ones((3, 4), F32)),
     ValueError, "dy must have the shape"),
    ("dy wrong dtype", lambda: _trained("batch", 4),
     lambda n: n.backward(np.ones((4, 4, 3), np.float64)), TypeError, "dy has dtype float64"),
    ("empty batch", lambda: _trained("batch", 4), lambda n: n.forward(np.ones((0, 4), F32), True),
     ValueError, "x is empty"),
]


@pytest.mark.parametrize("factory,call,exc,fragment", [b[1:] for b in BAD_CALLS],
                         ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_clearly_and_mutates_nothing(factory, call, exc, fragment):
    norm = factory()
    before = _snapshot(norm)
    with pytest.raises(exc) as info:
        call(norm)
    assert fragment in str(info.value)
    after = _snapshot(norm)
    if "nan" not in str(info.value).lower():
        _assert_same_snapshot(before, after)
    else:   # the test itself wrote the NaN; nothing else may change
        for k in before[2]:
            np.testing.assert_array_equal(before[2][k], after[2][k])


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match="before forward"):
        normkit.make("layer", 4).backward(np.ones((2, 4), np.float32))


@pytest.mark.parametrize("call,exc,fragment", [
    (lambda: normkit.make("batch", 0), ValueError, "num_features"),
    (lambda: normkit.make("batch", 4, eps=0), ValueError, "eps"),
    (lambda: normkit.make("batch", 4, eps=-1e-5), ValueError, "eps"),
    (lambda: normkit.make("batch", 4, momentum=1.5), ValueError, "momentum"),
    (lambda: normkit.make("batch", 4, momentum=-0.1), ValueError, "momentum"),
    (lambda: normkit.make("batch", 4, running_average="simple"), ValueError, "running_average"),
    (lambda: normkit.make("batch", 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: normkit.make("batch", 4, dtype=np.float16), TypeError, "dtype"),
    (lambda: normkit.make("group", 6, num_groups=4), ValueError, "num_groups=4 must divide"),
    (lambda: normkit.make("ghost", 4, virtual_batch_size=0), ValueError, "virtual_batch_size"),
    (lambda: normkit.make("renorm", 4, r_max=0.5), ValueError, "r_max"),
    (lambda: normkit.make("renorm", 4, d_max=-1), ValueError, "d_max"),
    (lambda: normkit.make("layer", (4, 0)), ValueError, "num_features"),
    (lambda: normkit.make("layer", 4, normalized_shape=4), ValueError, "normalized shape once"),
    (lambda: normkit.make("layer", 4, eps=float("nan")), ValueError, "eps"),
    (lambda: normkit.make("bach", 4), ValueError, "unknown normalizer 'bach'"),
    (lambda: normkit.make("batch", 4, affine="yes"), TypeError, "affine"),
])
def test_bad_construction_raises_clearly(call, exc, fragment):
    with pytest.raises(exc, match=None) as info:
        call()
    assert fragment in str(info.value)


def test_backward_after_eval_forward_uses_frozen_statistics():
    """Fine-tuning with frozen statistics: gradient of y = gamma * (x - mu) / sigma + beta."""
    bn = _trained("batch", 4, dtype=np.float64)
    x = np.random.default_rng(5).standard_normal((3, 4, 3))
    bn.forward(x, training=False)
    dx = bn.backward(np.ones_like(x))
    inv = 1 / np.sqrt(bn.state["running_var"] + bn.eps)
    np.testing.assert_allclose(dx, np.broadcast_to((bn.params["gamma"] * inv)[None, :, None], x.shape),
                               rtol=1e-12)


# -- kernels: deterministic, and serial == parallel ---------------------------------------------

@pytest.mark.parametrize("name,shape,kwargs", [
    ("batch", (16, 8, 40, 20), {}), ("layer", (64, 1024), {}),
    ("group", (8, 16, 40, 20), {"num_groups": 4}), ("ghost", (16, 8, 40, 20), {"virtual_batch_size": 4})])
def test_large_inputs_repeat_exactly(name, shape, kwargs, monkeypatch):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 2 + 1
    dy = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    num = shape[-1] if name == "layer" else shape[1]
    monkeypatch.setattr(_engine, "PARALLEL_MIN_SIZE", 1)     # the parallel twin

    def run():
        norm = normkit.make(name, num, **kwargs)
        return norm.forward(x, training=True), norm.backward(dy), norm.grads, norm.state

    first, second = run(), run()
    for a, b in zip(first[:2], second[:2]):
        np.testing.assert_array_equal(a, b)
    for k in first[2]:
        np.testing.assert_array_equal(first[2][k], second[2][k])


@pytest.mark.parametrize("view,B", [((16, 8, 1, 800), 16), ((16, 8, 1, 800), 4), ((64, 1, 1024, 1), 1),
                                    ((8, 4, 4, 800), 1), ((1024, 100, 1, 1), 1024),
                                    ((1024, 100, 1, 1), 256)])
@pytest.mark.parametrize("frozen", [False, True])
def test_one_thread_and_two_threads_agree_bit_for_bit(view, B, frozen, monkeypatch):
    """Each group is reduced by one thread in a fixed order, whatever the number of threads:
    the parallel twin on 1 and on 2 threads and the serial twin agree bit for bit."""
    rng = np.random.default_rng(0)
    x4 = rng.standard_normal(view).astype(np.float32) + 3
    dy4 = rng.standard_normal(view).astype(np.float32)
    G, Cg = view[1], view[2]
    V = view[0] // B
    gamma2 = rng.standard_normal((G, Cg)).astype(np.float32)
    beta2 = rng.standard_normal((G, Cg)).astype(np.float32)
    monkeypatch.setattr(_engine, "PARALLEL_MIN_SIZE", 1)     # the parallel twin
    outputs = []
    threads = numba.get_num_threads()
    try:
        for n in (1, threads):
            numba.set_num_threads(n)
            y4, dx4 = np.empty_like(x4), np.empty_like(x4)
            mean, var, count = np.empty((V, G)), np.empty((V, G)), np.empty(V)
            dgamma, dbeta = np.empty((G, Cg)), np.empty((G, Cg))
            _engine.run_forward(x4, B, gamma2, beta2, 1e-5, True, _engine.NO_MASK, False, y4,
                                mean, var, count, _engine.STATS_AND_APPLY)
            _engine.run_backward(dy4, x4, B, gamma2, mean, var, count, 1e-5, True, frozen,
                                 _engine.NO_MASK, False, dx4, dgamma, dbeta)
            outputs.append((y4, mean, var, dx4, dgamma, dbeta))
    finally:
        numba.set_num_threads(threads)
    y4, mean, var, count = np.empty_like(x4), np.empty((V, G)), np.empty((V, G)), np.empty(V)
    dx4, dgamma, dbeta = np.empty_like(x4), np.empty((G, Cg)), np.empty((G, Cg))
    _engine.forward_serial(x4, B, gamma2, beta2, 1e-5, True, _engine.NO_MASK, False, y4, mean,
                           var, count, _engine.STATS_AND_APPLY)
    _engine.backward_serial(dy4, x4, B, gamma2, mean, var, count, 1e-5, True, frozen,
                            _engine.NO_MASK, False, dx4, dgamma, dbeta)
    outputs.append((y4, mean, var, dx4, dgamma, dbeta))
    for a, b, c in zip(*outputs):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


# -- hypothesis: invariants ----------------------------------------------------------------------

finite = st.floats(-100, 100, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=5),
                    elements=finite),
       shift=st.floats(-50, 50))
def test_batch_norm_output_standardized_and_shift_invariant(x, shift):
    C = x.shape[1]
    axes = tuple(i for i in range(x.ndim) if i != 1)
    if np.any(x.var(axis=axes) < 1e-2):
        return                                  # eps dominates a near-constant channel
    bn = normkit.make("batch", C, dtype=np.float64)
    y = bn.forward(x, training=True)
    var = x.var(axis=axes)
    np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=axes), var / (var + bn.eps), rtol=1e-9)
    per_channel = shift * np.arange(1, C + 1).reshape((1, C) + (1,) * (x.ndim - 2))
    y_shifted = normkit.make("batch", C, dtype=np.float64).forward(x + per_channel, training=True)
    np.testing.assert_allclose(y_shifted, y, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=6),
                    elements=finite),
       shift=st.floats(-50, 50))
def test_layer_norm_output_standardized_and_shift_invariant(x, shift):
    D = x.shape[-1]
    if np.any(x.var(axis=-1) < 1e-2):
        return
    ln = normkit.make("layer", D, dtype=np.float64)
    y = ln.forward(x, training=True)
    var = x.var(axis=-1)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=-1), var / (var + ln.eps), rtol=1e-9)
    per_row = shift * np.arange(x.size // D).reshape(x.shape[:-1] + (1,))
    np.testing.assert_allclose(ln.forward(x + per_row, training=True), y, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.just(6), st.integers(2, 5)),
                    elements=finite))
def test_group_norm_standardizes_each_group(x):
    gn = normkit.make("group", 6, num_groups=3, dtype=np.float64)
    grouped = x.reshape(x.shape[0], 3, -1)
    if np.any(grouped.var(axis=-1) < 1e-2):
        return
    y = gn.forward(x, training=True).reshape(grouped.shape)
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-9)
    var = grouped.var(axis=-1)
    np.testing.assert_allclose(y.var(axis=-1), var / (var + gn.eps), rtol=1e-9)


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 8)), elements=finite),
       scale=st.floats(0.1, 10))
def test_rms_norm_unit_rms_and_scale_invariant(x, scale):
    if np.any((x ** 2).mean(axis=-1) < 1e-2):
        return
    rms = normkit.make("rms", x.shape[1], eps=1e-12, dtype=np.float64)   # eps would break
    y = rms.forward(x, training=True)                                    # scale invariance
    ms = (x ** 2).mean(axis=-1)
    np.testing.assert_allclose((y ** 2).mean(axis=-1), ms / (ms + rms.eps), rtol=1e-9)
    np.testing.assert_allclose(rms.forward(x * scale, training=True), y, atol=1e-6)
