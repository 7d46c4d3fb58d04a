"""The statistics engine through the interface: masks, the channel axis, odd memory layouts,
extreme values, and the faults that used to crash or read out of bounds."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import normkit
from normkit import reference as ref
from normkit.kernels import _engine, batch, group, layer, renorm
from normkit.testing import check_norm, check_vjp

from cases import TOL

F32, F64 = np.float32, np.float64


def _rng(seed=0):
    return np.random.default_rng(seed)


def _padded(N=5, C=3, L=7, seed=0, dtype=F64):
    rng = _rng(seed)
    x = (rng.standard_normal((N, C, L)) * 2 + 1).astype(dtype)
    mask = rng.random((N, L)) < 0.7
    mask[0, :2] = True                         # at least two valid positions
    return x, mask


# -- masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_masked_batch_norm_equals_torch_on_the_valid_positions(dtype):
    """Forward, dx, dgamma, dbeta and running statistics over two steps equal PyTorch's batch
    norm of the valid positions only; padded positions get y = 0 and dx = 0."""
    torch = pytest.importorskip("torch")
    N, C, L = 6, 4, 9
    tol = TOL[dtype]
    norm = normkit.make("batch", C, momentum=0.3, dtype=dtype)
    rng = _rng(1)
    norm.params["gamma"][...] = rng.uniform(0.5, 2, C)
    norm.params["beta"][...] = rng.standard_normal(C)
    running_mean, running_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(2):
        x, mask = _padded(N, C, L, seed=step, dtype=dtype)
        x[~np.broadcast_to(mask[:, None, :], x.shape)] = np.nan   # padding may hold anything
        dy = rng.standard_normal(x.shape).astype(dtype)
        y = norm.forward(x, training=True, mask=mask)
        dx = norm.backward(dy)
        valid = np.moveaxis(x, 1, 2)[mask]                        # (M, C)
        xt = torch.tensor(valid.astype(F64), requires_grad=True)
        gt = torch.tensor(norm.params["gamma"].astype(F64), requires_grad=True)
        bt = torch.tensor(norm.params["beta"].astype(F64), requires_grad=True)
        yt = torch.nn.functional.batch_norm(xt, running_mean, running_var, gt, bt, True, 0.3, 1e-5)
        yt.backward(torch.tensor(np.moveaxis(dy, 1, 2)[mask].astype(F64)))
        np.testing.assert_allclose(np.moveaxis(y, 1, 2)[mask], yt.detach().numpy(), **tol)
        np.testing.assert_allclose(np.moveaxis(dx, 1, 2)[mask], xt.grad.numpy(), **tol)
        assert np.all(np.moveaxis(y, 1, 2)[~mask] == 0)
        assert np.all(np.moveaxis(dx, 1, 2)[~mask] == 0)
        np.testing.assert_allclose(norm.grads["gamma"], gt.grad.numpy(), **tol)
        np.testing.assert_allclose(norm.grads["beta"], bt.grad.numpy(), **tol)
        np.testing.assert_allclose(norm.state["running_mean"], running_mean.numpy(), **tol)
        np.testing.assert_allclose(norm.state["running_var"], running_var.numpy(), **tol)


@pytest.mark.parametrize("name,kwargs", [("batch", {}), ("renorm", {}),
                                         ("ghost", {"virtual_batch_size": 2})])
@pytest.mark.parametrize("layout", ["(N, C, L)", "(N, L, C)"])
def test_padding_changes_nothing(name, kwargs, layout):
    """Appending padded positions (holding garbage) to every sequence changes no output,
    gradient or running statistic."""
    N, C, L, extra = 4, 3, 5, 3
    rng = _rng(2)
    x = rng.standard_normal((N, C, L))
    dy = rng.standard_normal((N, C, L))
    padded = np.concatenate([x, rng.standard_normal((N, C, extra)) * 1e6], axis=2)
    dy_padded = np.concatenate([dy, rng.standard_normal((N, C, extra))], axis=2)
    mask = np.arange(L + extra)[None, :] < L
    mask = np.broadcast_to(mask, (N, L + extra)).copy()
    axis = 1
    if layout == "(N, L, C)":
        x, dy, padded, dy_padded = (np.ascontiguousarray(np.moveaxis(a, 1, 2))
                                    for a in (x, dy, padded, dy_padded))
        axis = -1
    plain = normkit.make(name, C, axis=axis, dtype=F64, **kwargs)
    masked = normkit.make(name, C, axis=axis, dtype=F64, **kwargs)
    for _ in range(2):
        y = plain.forward(x, training=True)
        dx = plain.backward(dy)
        y_m = masked.forward(padded, training=True, mask=mask)
        dx_m = masked.backward(dy_padded)
        keep = (slice(None), slice(None), slice(0, L)) if axis == 1 else (slice(None), slice(0, L))
        np.testing.assert_allclose(y_m[keep], y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx_m[keep], dx, rtol=1e-12, atol=1e-12)
        for key in plain.grads:
            np.testing.assert_allclose(masked.grads[key], plain.grads[key], rtol=1e-12, atol=1e-12)
        for key in plain.state:
            np.testing.assert_allclose(masked.state[key], plain.state[key], rtol=1e-12)
    y_eval = masked.forward(padded, training=False, mask=mask)
    np.testing.assert_allclose(y_eval[keep], plain.forward(x, training=False), rtol=1e-12)


def test_mask_must_be_bool_of_the_right_shape_and_refusal_changes_nothing():
    norm = normkit.make("batch", 3)
    x = np.ones((4, 3, 5), F32)
    x[1] = 2
    state = {k: v.copy() for k, v in norm.state.items()}
    with pytest.raises(TypeError, match="mask must be a bool array.*astype\\(bool\\)"):
        norm.forward(x, training=True, mask=np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"mask must have shape .* = \(4, 5\)"):
        norm.forward(x, training=True, mask=np.ones((4, 3), bool))
    only_one = np.zeros((4, 5), bool)
    only_one[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 valid value"):
        norm.forward(x, training=True, mask=only_one)
    with pytest.raises(TypeError, match="takes no mask"):
        normkit.make("layer", 5).forward(x, training=True, mask=np.ones((4, 3), bool))
    for key, value in state.items():
        np.testing.assert_array_equal(norm.state[key], value)


def test_a_batch_with_no_valid_position_leaves_the_running_statistics_alone():
    norm = normkit.make("batch", 3)
    norm.forward(np.ones((4, 3, 5), F32), training=True, mask=np.zeros((4, 5), bool))
    np.testing.assert_array_equal(norm.state["running_mean"], 0)
    assert int(norm.state["num_batches_tracked"]) == 0


# -- the channel axis ---------------------------------------------------------------------------

AXIS_CASES = [("batch", {}), ("ghost", {"virtual_batch_size": 2}), ("renorm", {}),
              ("group", {"num_groups": 2}), ("instance", {})]


@pytest.mark.parametrize("name,kwargs", AXIS_CASES)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_axis_minus_one_equals_the_transposed_computation(name, kwargs, dtype):
    """Channels-last x (N, H, W, C) with axis=-1 gives the (N, C, H, W) result transposed, to
    1 ulp (the sums run in another order), without copying x."""
    rng = _rng(3)
    x = (rng.standard_normal((4, 5, 6, 4)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    first = normkit.make(name, 4, dtype=dtype, **kwargs)
    last = normkit.make(name, 4, axis=-1, dtype=dtype, **kwargs)
    for norm in (first, last):
        norm.params["gamma"][...] = np.linspace(0.5, 2, 4)
        norm.params["beta"][...] = np.linspace(-1, 1, 4)
    to_first = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 1))   # noqa: E731
    for training in (True, True, False):
        y = last.forward(x, training=training)
        y_ref = first.forward(to_first(x), training=training)
        dx = last.backward(dy)
        dx_ref = first.backward(to_first(dy))
        ulp = np.finfo(dtype).eps * 4
        np.testing.assert_allclose(to_first(y), y_ref, rtol=ulp, atol=ulp * np.abs(y_ref).max())
        np.testing.assert_allclose(to_first(dx), dx_ref, rtol=ulp,
                                   atol=ulp * np.abs(dx_ref).max())
        for key in first.grads:                # sums of x.size / C terms: ulps of the largest
            np.testing.assert_allclose(last.grads[key], first.grads[key], rtol=ulp,
                                       atol=ulp * x.size * np.abs(first.grads[key]).max())
        for key in first.state:
            np.testing.assert_allclose(last.state[key], first.state[key], rtol=ulp * 10)


def test_axis_is_checked():
    with pytest.raises(ValueError, match="axis"):
        normkit.make("batch", 3, axis=0)
    with pytest.raises(ValueError, match="axis=3 must name a channel axis"):
        normkit.make("batch", 3, axis=3).forward(np.ones((2, 3), F32), training=True)
    with pytest.raises(ValueError, match=r"x has 2 channels \(axis -1\)"):
        normkit.make("batch", 3, axis=-1).forward(np.ones((4, 3, 2), F32), training=True)


# -- memory layouts -----------------------------------------------------------------------------

NORMS = [("batch", (6, 4, 5), {}), ("ghost", (6, 4, 5), {"virtual_batch_size": 3}),
         ("renorm", (6, 4, 5), {}), ("group", (3, 4, 5), {"num_groups": 2}),
         ("instance", (3, 4, 5), {}), ("layer", (3, 4, 5), {}), ("rms", (3, 4, 5), {}),
         ("recurrent_batch", (3, 4, 5), {"max_steps": 3})]


def _features(name, shape):
    return shape[-1] if name in ("layer", "rms", "recurrent_batch") else shape[1]


@pytest.mark.parametrize("name,shape,kwargs", NORMS, ids=[n[0] for n in NORMS])
@pytest.mark.parametrize("layout", ["read-only", "fortran", "negative-strides"])
def test_every_norm_takes_odd_memory_layouts(name, shape, kwargs, layout):
    x = _rng(4).standard_normal(shape).astype(F32)
    dy = _rng(5).standard_normal(shape).astype(F32)
    if layout == "read-only":
        odd = x.copy()
        odd.flags.writeable = False
        odd_dy = dy.copy()
        odd_dy.flags.writeable = False
    elif layout == "fortran":
        odd, odd_dy = np.asfortranarray(x), np.asfortranarray(dy)
    else:
        odd = np.ascontiguousarray(x[::-1])[::-1]
        odd_dy = np.ascontiguousarray(dy[::-1])[::-1]
    plain = normkit.make(name, _features(name, shape), **kwargs)
    other = normkit.make(name, _features(name, shape), **kwargs)
    np.testing.assert_array_equal(other.forward(odd, training=True),
                                  plain.forward(x, training=True))
    np.testing.assert_array_equal(other.backward(odd_dy), plain.backward(dy))


# -- extreme values -----------------------------------------------------------------------------

def test_rms_backward_stays_finite_with_a_huge_float32_value():
    """One value of 1e20 in a row: x^2 overflows float32, not the float64 accumulators."""
    torch = pytest.importorskip("torch")
    x = _rng(6).standard_normal((3, 8)).astype(F32)
    x[1, 3] = 1e20
    dy = _rng(7).standard_normal(x.shape).astype(F32)
    norm = normkit.make("rms", 8)
    y = norm.forward(x, training=True)
    dx = norm.backward(dy)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert np.isfinite(norm.grads["gamma"]).all()
    xt = torch.tensor(x.astype(F64), requires_grad=True)
    yt = xt / torch.sqrt((xt * xt).mean(-1, keepdim=True) + 1e-5)
    yt.backward(torch.tensor(dy.astype(F64)))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,shape,axis", [("batch", (4, 3, 6), 1), ("instance", (4, 3, 6), 1),
                                             ("rms", (4, 18), 1), ("batch", (64, 3), 1),
                                             ("batch", (8, 6, 3), -1)],
                         ids=["batch", "instance", "rms", "batch (N,C)", "batch channels-last"])
def test_values_near_the_float32_maximum_stay_finite(name, shape, axis):
    """|x| ~ 1e38: statistics and outputs finite wherever PyTorch's are (here: everywhere)."""
    rng = _rng(8)
    x = (rng.uniform(-1, 1, shape) * 3e38).astype(F32)
    x[0] = 3.3e38                              # x - mean beyond the float32 maximum
    x[1] = -3.3e38
    dy = rng.standard_normal(shape).astype(F32)
    kwargs = {} if name == "rms" else {"axis": axis}
    norm = normkit.make(name, shape[-1] if name == "rms" or axis == -1 else shape[1], **kwargs)
    y = norm.forward(x, training=True)
    dx = norm.backward(dy)
    assert np.isfinite(y).all(), np.isfinite(y).mean()
    assert np.isfinite(dx).all(), np.isfinite(dx).mean()
    expected = {"batch": ref.batch_forward_train, "instance": None, "rms": None}[name]
    if expected is not None and axis == 1:
        np.testing.assert_allclose(y, expected(x.astype(F64), np.ones(3), np.zeros(3), 1e-5)[0],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["ordinary", "one group overflows", "one group extreme"])
@pytest.mark.parametrize("layout", ["planes", "columns"])
def test_fast_drivers_leave_to_the_full_ones_exactly_what_needs_float64(layout, case, dtype):
    """An unmasked call runs its layout's fast driver (sums in x's dtype only), then the full
    one if the fast one says an item needs the float64 loops: the results equal the full
    driver's bit for bit, and the fast forward asks for it exactly when a group's sums overflow
    x's dtype (planes: or x - mean could; columns write such groups as x * scale + shift)."""
    rng = _rng(11)
    # planes: several blocks of 512 per channel row; columns: several chunks of 64 rows
    N, G, K, L = (6, 4, 2, 700) if layout == "planes" else (300, 4, 1, 1)
    x = (rng.standard_normal((N, G, K, L)) * 2 + 1).astype(dtype)
    big = np.finfo(dtype).max
    if case == "one group overflows":          # a sum in x's dtype overflows; x - mean not
        x[:, 1] = (rng.uniform(0.5, 1.0, (N, K, L)) * big / 2).astype(dtype)
    elif case == "one group extreme":          # x - mean itself could overflow x's dtype
        x[:, 2] = (rng.uniform(-1, 1, (N, K, L)) * big * 0.9).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma2, beta2 = rng.uniform(0.5, 1.5, (G, K)), rng.standard_normal((G, K))
    full = {"planes": (_engine.forward_planes_serial, _engine.backward_planes_serial),
            "columns": (_engine.forward_columns_serial, _engine.backward_columns_serial)}[layout]
    fast = {"planes": (_engine.fast_forward_planes[0], _engine.fast_backward_planes[0]),
            "columns": (_engine.fast_forward_columns[0], _engine.fast_backward_columns[0])}[layout]
    # the drivers take count filled (run_forward fills it) and the planes backward its scratch
    work = (_engine._planes_work(x, N),) if layout == "planes" else ()
    results = {}
    for how in ("run", "full", "fast"):
        y, mean, var = np.empty_like(x), np.empty((1, G)), np.empty((1, G))
        count = np.full(1, np.nan) if how == "run" else np.full(1, float(N * K * L))
        dx, dgamma, dbeta = np.empty_like(x), np.empty((G, K)), np.empty((G, K))
        fwd = (x, N, gamma2, beta2, 1e-5, True, _engine.NO_MASK, False, y, mean, var, count,
               _engine.STATS_AND_APPLY)
        bwd = (dy, x, N, gamma2, mean, var, count, 1e-5, True, False, _engine.NO_MASK, False,
               dx, dgamma, dbeta)
        with np.errstate(all="ignore"):
            if how == "run":
                _engine.run_forward(*fwd)
                _engine.run_backward(*bwd)
            elif how == "full":
                full[0](*fwd)
                full[1](*bwd, *work)
            else:                              # backward with the full driver's statistics
                full_mean, full_var = results["full"][1:3]
                bwd = bwd[:4] + (full_mean, full_var) + bwd[6:]
                results["asked"] = (bool(fast[0](*fwd)), bool(fast[1](*bwd, *work)))
                continue
        results[how] = (y, mean, var, dx, dgamma, dbeta)
    for run, expected in zip(results["run"], results["full"]):
        np.testing.assert_array_equal(run, expected)
    assert results["asked"][0] == (case != "ordinary")
    if case == "ordinary" or layout == "planes":
        assert results["asked"][1] == (case != "ordinary")
    if dtype == F32:                           # float64 sums hold float32's extremes
        assert np.isfinite(results["run"][0]).all() and np.isfinite(results["run"][3]).all()


# -- faults that crashed or read out of bounds --------------------------------------------------

def test_a_replaced_state_array_of_the_wrong_size_is_refused():
    """It used to segfault: a checkpoint assigned into norm.state instead of written into it."""
    norm = normkit.make("batch", 4)
    x = np.ones((3, 4), F32)
    x[0] = 2
    norm.forward(x, training=True)
    norm.state["running_mean"] = np.zeros(2, F32)
    with pytest.raises(ValueError, match=r"state\['running_mean'\] must be a writeable "
                                         r"C-contiguous float32 array of shape \(4,\)"):
        norm.forward(x, training=True)
    norm.state["running_mean"] = np.zeros(4, F64)
    with pytest.raises(ValueError, match="float32"):
        norm.forward(x, training=False)
    norm.params["gamma"] = np.ones(5, F32)
    norm.state["running_mean"] = np.zeros(4, F32)          # a right one is taken
    with pytest.raises(ValueError, match=r"params\['gamma'\]"):
        norm.backward(np.ones_like(x))



@pytest.mark.parametrize("replace", [
    lambda d, a: d.update(running_mean=a),
    lambda d, a: d.__ior__({"running_mean": a}),
    lambda d, a: (d.pop("running_mean"), d.setdefault("running_mean", a)),
    lambda d, a: (d.clear(), d.update({"running_mean": a}))],
    ids=["update", "ior", "pop-setdefault", "clear-update"])
def test_a_state_array_replaced_by_any_dict_method_is_refused(replace):
    """Norm skips its array checks while no entry of params/grads/state was set: every way of
    setting one must count (a wrong array must never reach the kernels)."""
    norm = normkit.make("batch", 4)
    x = np.ones((3, 4), F32)
    x[0] = 2
    norm.forward(x, training=True)
    norm.forward(x, training=True)             # checked once, then trusted
    replace(norm.state, np.zeros(2, F32))
    with pytest.raises(ValueError, match=r"state\['running_mean'\] must be a writeable"):
        norm.forward(x, training=True)


def test_params_assigned_whole_or_copied_are_checked_again():
    norm = normkit.make("batch", 4)
    x = np.ones((3, 4), F32)
    x[0] = 2
    norm.forward(x, training=True)
    norm.params = {"gamma": np.ones(5, F32), "beta": np.zeros(4, F32)}   # a plain dict
    with pytest.raises(ValueError, match=r"params\['gamma'\]"):
        norm.forward(x, training=True)
    norm.params = {"gamma": np.full(4, 2, F32), "beta": np.zeros(4, F32)}
    y = norm.forward(x, training=True)
    copy_ = pickle.loads(pickle.dumps(norm))
    copy_.params["gamma"][...] = 3                 # the copy's own arrays, not the original's
    np.testing.assert_array_equal(norm.forward(x, training=True), y)
    np.testing.assert_allclose(copy_.forward(x, training=True), 1.5 * y, rtol=1e-6)

def test_backward_saved_refuses_a_saved_of_another_norm():
    """A Norm passes the engine arrays it built itself, unchecked (``run_backward``); a saved
    that backward_saved gets from its caller is checked: one of another norm (other channels,
    another layout) is refused and leaves the grads alone, and the norm's own saved of an
    earlier forward still works."""
    rng = _rng(5)
    x = rng.standard_normal((4, 64, 3, 3)).astype(F32)
    wide, narrow, layer = (normkit.make("batch", 64), normkit.make("batch", 32),
                           normkit.make("layer", 3))
    foreign = (wide.forward_saved(x, training=True)[1], layer.forward_saved(x, training=True)[1])
    for saved in foreign:
        for norm in (narrow, wide if saved is foreign[1] else layer):
            grads = {key: value.copy() for key, value in norm.grads.items()}
            with pytest.raises(ValueError, match="saved does not belong to this norm"):
                norm.backward_saved(np.ones_like(x), saved)
            for key, value in grads.items():
                np.testing.assert_array_equal(norm.grads[key], value)
    _, mine = wide.forward_saved(x, training=True)
    wide.forward(x + 1, training=True)
    dx, grads = wide.backward_saved(np.ones_like(x), mine)
    expected = ref.batch_backward(np.ones_like(x, dtype=F64), x.astype(F64),
                                                np.ones(64), 1e-5)
    np.testing.assert_allclose(dx, expected[0], atol=1e-5)


def test_public_kernels_check_the_shapes_they_index():
    x = np.ones((4, 3), F32)
    x[0] = 2
    g, b = np.ones(3, F32), np.zeros(3, F32)
    with pytest.raises(ValueError, match="running_mean, running_var, batch_mean and batch_var"):
        batch.running_update(np.zeros(3), np.ones(2), np.zeros(3), np.ones(3), 4, 0.1)
    with pytest.raises(ValueError, match="batch_mean, batch_var, running_mean and running_var"):
        renorm.forward_train(x, g, b, np.zeros(2, F32), np.ones(3, F32), 1e-5, 3.0, 5.0)
    for virtual in (0, 3):
        with pytest.raises(ValueError, match="B \\(rows per statistics group\\)"):
            batch.ghost_forward_train(x, g, b, 1e-5, virtual)
    with pytest.raises(ValueError, match="gamma must have one value per channel"):
        batch.forward_train(x, np.ones(5, F32), b, 1e-5)
    with pytest.raises(ValueError, match="out must have the shape"):
        batch.forward_train(x, g, b, 1e-5, np.empty((2, 3), F32))
    with pytest.raises(ValueError, match="mean and var must have one value per row"):
        layer.backward(x, x, g, np.zeros(2), np.ones(4), 1e-5)
    with pytest.raises(ValueError, match="num_groups"):
        group.forward(x.reshape(4, 3, 1), g, b, 2, 1e-5)
    mean, var, count = np.empty((1, 3)), np.empty((1, 3)), np.empty(1)
    with pytest.raises(ValueError, match="mask must have the shape"):
        _engine.forward(x.reshape(4, 3, 1, 1), 4, g.reshape(3, 1), b.reshape(3, 1), 1e-5, True,
                        np.ones((3, 1), bool), True, np.empty((4, 3, 1, 1), F32), mean, var,
                        count, _engine.STATS_AND_APPLY)


def test_renorm_takes_a_read_only_input():
    x = np.arange(12, dtype=F32).reshape(4, 3)
    x.flags.writeable = False
    y = normkit.make("renorm", 3).forward(x, training=True)
    expected = normkit.make("renorm", 3).forward(np.array(x), training=True)
    np.testing.assert_array_equal(y, expected)


# -- gradients by finite differences (float64) --------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [("batch", {}), ("ghost", {"virtual_batch_size": 2}),
                                         ("renorm", {"r_max": 1.5, "d_max": 0.5})])
@pytest.mark.parametrize("axis", [1, -1])
def test_masked_backward_matches_finite_differences(name, kwargs, axis):
    """dx, dgamma and dbeta of a masked training forward, both layouts, against central
    differences along random directions (the running statistics restored before each call).
    Renorm's r and d carry no gradient by definition: the running statistics here are far
    enough from the batch's that both sit at their clip bounds, where they are constants."""
    x, mask = _padded(4, 3, 6, seed=9)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, 2))     # (N, L, C)
    norm = normkit.make(name, 3, axis=axis, dtype=F64, **kwargs)
    norm.params["gamma"][...] = [0.7, 1.3, -0.9]
    norm.params["beta"][...] = [0.1, -0.2, 0.3]
    norm.forward(x * 0.5 + 1, training=True, mask=mask)      # non-trivial running statistics
    if name == "renorm":                       # r and d at their clip bounds: constants
        norm.state["running_mean"][...] = -50.0
        norm.state["running_var"][...] = 0.01
    state = {k: v.copy() for k, v in norm.state.items()}
    dy = _rng(10).standard_normal(x.shape)
    norm.forward(x, training=True, mask=mask)
    dx = norm.backward(dy)
    grads = {"x": dx, "gamma": norm.grads["gamma"].copy(), "beta": norm.grads["beta"].copy()}

    def fun(x, gamma, beta):
        norm.params["gamma"][...] = gamma
        norm.params["beta"][...] = beta
        for key, value in state.items():
            norm.state[key][...] = value
        return norm.forward(x, training=True, mask=mask)

    inputs = {"x": x.copy(), "gamma": norm.params["gamma"].copy(),
              "beta": norm.params["beta"].copy()}
    check_vjp(fun, inputs, grads, dy, seed=1)


@pytest.mark.parametrize("name,kwargs", AXIS_CASES)
def test_channels_last_backward_matches_finite_differences(name, kwargs):
    norm = normkit.make(name, 4, axis=-1, dtype=F64, **kwargs)
    norm.params["gamma"][...] = np.linspace(0.5, 2, 4)
    if name == "renorm":                       # r and d at their clip bounds: constants
        norm.state["running_mean"][...] = -50.0
        norm.state["running_var"][...] = 0.01
    x = _rng(11).standard_normal((4, 3, 5, 4)) * 2 + 1
    check_norm(norm, x)
