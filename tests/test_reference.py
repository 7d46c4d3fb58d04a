"""The oracle itself, proven against PyTorch autograd and against finite differences.

``normkit.reference`` is what every kernel is tested against, so it is checked here against two
independent things: PyTorch's functional norms (forward, and backward through autograd) in
float32 and float64, and ``normkit.testing.check_vjp`` (central differences, float64).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from normkit import reference as ref
from normkit.testing import GradientMismatch, check_vjp

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Tolerances, as a fraction of the largest magnitude in the expected array (errors of reductions and
# of cancelling terms such as BN's dx scale with the array's size, not with each entry's).
#  - float64: reference and PyTorch evaluate the same formulas in float64 and differ only in the
#    order of summation and grouping of products: a few ulp (~1e-16) times a small factor.
#  - float32: the reference computes in float64 and rounds once (<= 0.5 ulp ~ 6e-8); PyTorch
#    computes in float32 with its own accumulation: a few float32 ulp.
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
# Finite differences (check_vjp defaults: step 1e-6, rtol 1e-6): truncation ~ step**2 and
# round-off ~ 1e-16 / step ~ 1e-10, both far inside 1e-6 on unit-scale data.
EPS = 1e-5
DTYPES = [np.float64, np.float32]

#: worst max-abs difference against PyTorch seen in this session, per dtype (read by the report).
WORST_ABS_DIFF: dict[str, float] = {"float64": 0.0, "float32": 0.0}


def assert_close(actual, expected, dtype, what: str = "") -> None:
    """|actual - expected| <= TOL[dtype] * max(1, max|expected|), entrywise; records the worst diff."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = TOL[np.dtype(dtype)]
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    diff = float(np.abs(actual - expected).max(initial=0.0))
    name = np.dtype(dtype).name
    WORST_ABS_DIFF[name] = max(WORST_ABS_DIFF[name], diff)
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} > {tol:g} * {scale:.3g} ({name})"


def to_torch(a, grad: bool = False):
    if a is None:
        return None
    return torch.from_numpy(np.array(a, copy=True)).requires_grad_(grad)


def to_numpy(t):
    return None if t is None else t.detach().numpy()


def make_rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ----------------------------------------------------------------------------------------------
# A small independent batch renormalization in PyTorch (r, d detached: stop_grad)
# ----------------------------------------------------------------------------------------------

def torch_renorm(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    dims = (0,) + tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    sigma_batch = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.view(view) + eps)
    r = (sigma_batch / sigma).clamp(1.0 / r_max, r_max).detach()
    d = ((mean - running_mean.view(view)) / sigma).clamp(-d_max, d_max).detach()
    xhat = (x - mean) / sigma_batch * r + d
    y = xhat if weight is None else xhat * weight.view(view)
    y = y if bias is None else y + bias.view(view)
    return y, r.reshape(-1), d.reshape(-1)


def torch_ghost(x, weight, bias, eps, virtual_batch_size):
    chunks = torch.split(x, virtual_batch_size, dim=0)
    return torch.cat([F.batch_norm(c, None, None, weight, bias, training=True, eps=eps) for c in chunks])


# ----------------------------------------------------------------------------------------------
# Cases: one reference forward/backward against one PyTorch forward, on odd shapes
# ----------------------------------------------------------------------------------------------

def batch_stats(x):
    """(mean, biased var) per channel of x (N, C, *S) in float64 (numpy, two-pass)."""
    axes = (0,) + tuple(range(2, x.ndim))
    x = x.astype(np.float64)
    return x.mean(axis=axes), x.var(axis=axes)


def renorm_running_stats(r_ratio, d_ratio):
    """Running stats making sigma_B/sigma = r_ratio and (mu_B - mu)/sigma = d_ratio per channel."""
    def consts(x):
        mean, var = batch_stats(x)
        sigma = np.sqrt(var + EPS) / np.asarray(r_ratio)
        return {"running_mean": mean - np.asarray(d_ratio) * sigma, "running_var": sigma**2 - EPS}
    return consts


def eval_running_stats(x):
    rng = make_rng("eval running stats", x.shape)
    channels = x.shape[1]
    return {"running_mean": rng.normal(0.0, 1.0, channels), "running_var": rng.uniform(0.3, 3.0, channels)}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    ref_forward: Callable      # (x, gamma, beta, **consts) -> y
    ref_backward: Callable     # (dy, x, gamma, **consts) -> (dx, dgamma, dbeta)
    torch_forward: Callable    # (x, weight, bias, **consts) -> y
    consts: Callable = field(default=lambda x: {})  # base float64 x -> constant arrays (running stats)
    has_beta: bool = True
    # False where stop_grad makes the analytic gradient differ from the forward's derivative
    # (renorm with r or d inside the clipping range): checked separately with r, d frozen.
    fd_exact: bool = True
    options: dict = field(default_factory=dict)  # e.g. renorm's r_max, d_max


def _batch_case(shape):
    return Case(
        f"batch{shape}", shape, (shape[1],),
        lambda x, g, b: ref.batch_forward_train(x, g, b, EPS)[0],
        lambda dy, x, g: ref.batch_backward(dy, x, g, EPS),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=EPS),
    )


def _batch_eval_case(shape):
    return Case(
        f"batch_eval{shape}", shape, (shape[1],),
        lambda x, g, b, running_mean, running_var: ref.batch_forward_eval(x, g, b, running_mean, running_var, EPS),
        lambda dy, x, g, running_mean, running_var: ref.batch_backward_eval(dy, x, g, running_mean, running_var, EPS),
        lambda x, w, b, running_mean, running_var: F.batch_norm(
            x, running_mean, running_var, w, b, training=False, eps=EPS),
        consts=eval_running_stats,
    )


def _ghost_case(shape, vbs):
    return Case(
        f"ghost{shape}/vbs{vbs}", shape, (shape[1],),
        lambda x, g, b: ref.ghost_forward_train(x, g, b, EPS, vbs)[0],
        lambda dy, x, g: ref.ghost_backward(dy, x, g, EPS, vbs),
        lambda x, w, b: torch_ghost(x, w, b, EPS, vbs),
    )


def _renorm_case(label, shape, r_max, d_max, r_ratio, d_ratio, fd_exact):
    def ref_forward(x, g, b, running_mean, running_var):
        return ref.renorm_forward_train(x, g, b, running_mean, running_var, EPS, r_max, d_max)[0]

    def ref_backward(dy, x, g, running_mean, running_var):
        return ref.renorm_backward(dy, x, g, running_mean, running_var, EPS, r_max, d_max)

    def torch_forward(x, w, b, running_mean, running_var):
        return torch_renorm(x, w, b, running_mean, running_var, EPS, r_max, d_max)[0]

    return Case(f"renorm_{label}{shape}", shape, (shape[1],), ref_forward, ref_backward, torch_forward,
                consts=renorm_running_stats(r_ratio, d_ratio), fd_exact=fd_exact,
                options={"r_max": r_max, "d_max": d_max})


# C = 7 channels: r ratios and d offsets chosen so the mixed case clips r on channels 0, 1 and d on
# channels 2, 3 (r_max 1.5, d_max 1), leaving 4..6 inside both ranges.
R_MIXED = [0.2, 5.0, 1.2, 0.9, 1.0, 1.1, 0.8]
D_MIXED = [0.1, -0.2, 3.0, -3.0, 0.3, 0.0, -0.4]
R_ALL_CLIPPED = [0.1, 10.0] * 3 + [0.1]
D_ALL_CLIPPED = [3.0, -3.0] * 3 + [-4.0]


def _layer_case(shape, k):
    return Case(
        f"layer{shape}/last{k}", shape, shape[-k:],
        lambda x, g, b: ref.layer_forward(x, g, b, k, EPS)[0],
        lambda dy, x, g: ref.layer_backward(dy, x, g, k, EPS),
        lambda x, w, b: F.layer_norm(x, shape[-k:], w, b, eps=EPS),
    )


def _group_case(shape, groups):
    return Case(
        f"group{shape}/G{groups}", shape, (shape[1],),
        lambda x, g, b: ref.group_forward(x, g, b, groups, EPS)[0],
        lambda dy, x, g: ref.group_backward(dy, x, g, groups, EPS),
        lambda x, w, b: F.group_norm(x, groups, w, b, eps=EPS),
    )


def _instance_case(shape):
    channels = shape[1]
    return Case(
        f"instance{shape}", shape, (channels,),
        lambda x, g, b: ref.group_forward(x, g, b, channels, EPS)[0],
        lambda dy, x, g: ref.group_backward(dy, x, g, channels, EPS),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, use_input_stats=True, eps=EPS),
    )


def _rms_case(shape, k):
    return Case(
        f"rms{shape}/last{k}", shape, shape[-k:],
        lambda x, g, b: ref.rms_forward(x, g, k, EPS)[0],
        lambda dy, x, g: ref.rms_backward(dy, x, g, k, EPS) + (None,),
        lambda x, w, b: F.rms_norm(x, shape[-k:], w, eps=EPS),
        has_beta=False,
    )


BN_SHAPES = [(3, 7, 5, 3), (3, 7, 5), (3, 7)]
CASES = [
    *[_batch_case(s) for s in BN_SHAPES],
    *[_batch_eval_case(s) for s in BN_SHAPES],
    _ghost_case((6, 7, 5), 2),
    _ghost_case((6, 7), 3),
    _ghost_case((4, 7, 5, 3), 4),  # one virtual batch: plain batch norm
    _renorm_case("mixed_clip", (3, 7, 5, 3), 1.5, 1.0, R_MIXED, D_MIXED, fd_exact=False),
    _renorm_case("all_clipped", (3, 7, 5), 3.0, 1.0, R_ALL_CLIPPED, D_ALL_CLIPPED, fd_exact=True),
    _renorm_case("unclipped", (3, 7), 3.0, 5.0, R_MIXED[2:] + [1.3, 0.7], D_MIXED[4:] + [1.0, -2.0, 0.5, 0.2],
                 fd_exact=False),
    _layer_case((3, 7, 5, 3), 2),
    _layer_case((3, 7), 1),
    _layer_case((3, 7, 5), 3),
    _group_case((3, 12, 5, 3), 3),
    _group_case((3, 12, 5), 3),
    _group_case((3, 12), 4),
    _instance_case((3, 7, 5, 3)),
    _instance_case((3, 7, 5)),
    _rms_case((3, 7, 5, 3), 2),
    _rms_case((3, 7), 1),
]


def case_data(case: Case, dtype, affine: bool):
    """x with a different mean and spread per channel, dy, gamma, beta and the case's constants."""
    rng = make_rng(case.name)
    channel_view = (1, case.shape[1]) + (1,) * (len(case.shape) - 2)
    loc = rng.normal(0.0, 2.0, case.shape[1]).reshape(channel_view)
    scale = rng.uniform(0.5, 3.0, case.shape[1]).reshape(channel_view)
    x = loc + scale * rng.standard_normal(case.shape)
    dy = rng.standard_normal(case.shape)
    gamma = rng.normal(1.0, 0.5, case.param_shape) if affine else None
    beta = rng.normal(0.0, 1.0, case.param_shape) if affine and case.has_beta else None
    consts = {k: v.astype(dtype) for k, v in case.consts(x).items()}
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return cast(x), cast(dy), cast(gamma), cast(beta), consts


def torch_forward_backward(case: Case, x, dy, gamma, beta, consts):
    xt, wt, bt = to_torch(x, True), to_torch(gamma, True), to_torch(beta, True)
    yt = case.torch_forward(xt, wt, bt, **{k: to_torch(v) for k, v in consts.items()})
    yt.backward(to_torch(dy))
    return to_numpy(yt), to_numpy(xt.grad), to_numpy(None if wt is None else wt.grad), \
        to_numpy(None if bt is None else bt.grad)


case_ids = [c.name for c in CASES]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_forward_and_backward_match_torch(case, dtype, affine):
    x, dy, gamma, beta, consts = case_data(case, dtype, affine)
    y_torch, dx_torch, dgamma_torch, dbeta_torch = torch_forward_backward(case, x, dy, gamma, beta, consts)

    y = case.ref_forward(x, gamma, beta, **consts)
    dx, dgamma, dbeta = case.ref_backward(dy, x, gamma, **consts)

    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert_close(y, y_torch, dtype, "y")
    assert_close(dx, dx_torch, dtype, "dx")
    if affine:
        assert dgamma.dtype == gamma.dtype
        assert_close(dgamma, dgamma_torch, dtype, "dgamma")
        if case.has_beta:
            assert_close(dbeta, dbeta_torch, dtype, "dbeta")
        else:
            assert dbeta is None
    else:
        assert dgamma is None and dbeta is None


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", [c for c in CASES if c.fd_exact], ids=[c.name for c in CASES if c.fd_exact])
def test_backward_matches_finite_differences(case, affine):
    x, dy, gamma, beta, consts = case_data(case, np.float64, affine)
    dx, dgamma, dbeta = case.ref_backward(dy, x, gamma, **consts)
    inputs, grads = {"x": x}, {"x": dx}
    if affine:
        inputs["gamma"], grads["gamma"] = gamma, dgamma
    if affine and case.has_beta:
        inputs["beta"], grads["beta"] = beta, dbeta

    def forward(x, gamma=None, beta=None):
        return case.ref_forward(x, gamma, beta, **consts)

    check_vjp(forward, inputs, grads, dy)


@pytest.mark.parametrize("case", [c for c in CASES if not c.fd_exact], ids=[c.name for c in CASES if not c.fd_exact])
def test_renorm_backward_matches_finite_differences_with_r_d_frozen(case):
    # Inside the clipping range r and d move with x but are stop_grad: the gradient is that of
    # y = gamma * (xhat_B(x) * r0 + d0) + beta with r0, d0 fixed at the base point.
    x, dy, gamma, beta, consts = case_data(case, np.float64, affine=True)
    r_max, d_max = case.options["r_max"], case.options["d_max"]
    _, _, _, r0, d0 = ref.renorm_forward_train(x, gamma, beta, consts["running_mean"], consts["running_var"],
                                               EPS, r_max, d_max)
    dx, dgamma, dbeta = case.ref_backward(dy, x, gamma, **consts)
    assert np.allclose(case.ref_forward(x, gamma, beta, **consts),
                       frozen_renorm(x, gamma, beta, r0, d0), rtol=0, atol=1e-13)

    check_vjp(lambda x, gamma, beta: frozen_renorm(x, gamma, beta, r0, d0),
              {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dgamma, "beta": dbeta}, dy)


def frozen_renorm(x, gamma, beta, r, d):
    view = (1, -1) + (1,) * (x.ndim - 2)
    xhat_batch = ref.batch_forward_train(x, None, None, EPS)[0]
    return gamma.reshape(view) * (xhat_batch * r.reshape(view) + d.reshape(view)) + beta.reshape(view)


def test_finite_difference_check_rejects_a_wrong_gradient():
    # The checker is sensitive enough at its defaults: dropping BN's variance term from dx
    # (dx = inv_std * (dxhat - mean(dxhat))) must be caught.
    case = CASES[0]
    x, dy, gamma, beta, _ = case_data(case, np.float64, affine=True)
    dx, dgamma, dbeta = ref.batch_backward(dy, x, gamma, EPS)
    _, mean, var = ref.batch_forward_train(x, gamma, beta, EPS)
    view = (1, -1, 1, 1)
    dxhat = dy * gamma.reshape(view)
    wrong_dx = (dxhat - dxhat.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(var.reshape(view) + EPS)
    forward = lambda x, gamma, beta: ref.batch_forward_train(x, gamma, beta, EPS)[0]  # noqa: E731
    check_vjp(forward, {"x": x, "gamma": gamma, "beta": beta}, {"x": dx, "gamma": dgamma, "beta": dbeta}, dy)
    with pytest.raises(GradientMismatch):
        check_vjp(forward, {"x": x, "gamma": gamma, "beta": beta},
                  {"x": wrong_dx, "gamma": dgamma, "beta": dbeta}, dy)


# ----------------------------------------------------------------------------------------------
# Statistics returned by the forwards
# ----------------------------------------------------------------------------------------------

def torch_var_mean(x, dims):
    var, mean = torch.var_mean(to_torch(x).double(), dim=dims, correction=0)
    return to_numpy(mean), to_numpy(var)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_statistics_match_torch(shape, dtype):
    x = case_data(_batch_case(shape), dtype, affine=False)[0]
    _, mean, var = ref.batch_forward_train(x, None, None, EPS)
    torch_mean, torch_var = torch_var_mean(x, (0,) + tuple(range(2, x.ndim)))
    assert mean.dtype == var.dtype == np.float64 and mean.shape == var.shape == (shape[1],)
    assert_close(mean, torch_mean, np.float64, "mean")
    assert_close(var, torch_var, np.float64, "var")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_layer_group_rms_statistics_match_torch(dtype):
    x = case_data(_group_case((3, 12, 5, 3), 3), dtype, affine=False)[0]  # (N, C, H, W)
    _, mean, var = ref.layer_forward(x, None, None, 2, EPS)
    assert mean.shape == var.shape == (3, 12) and mean.dtype == np.float64
    torch_mean, torch_var = torch_var_mean(x, (2, 3))
    assert_close(mean, torch_mean, np.float64, "layer mean")
    assert_close(var, torch_var, np.float64, "layer var")

    _, mean, var = ref.group_forward(x, None, None, 3, EPS)
    assert mean.shape == var.shape == (3, 3)
    torch_mean, torch_var = torch_var_mean(x.reshape(3, 3, -1), 2)
    assert_close(mean, torch_mean, np.float64, "group mean")
    assert_close(var, torch_var, np.float64, "group var")

    _, mean_square = ref.rms_forward(x, None, 3, EPS)
    assert mean_square.shape == (3,) and mean_square.dtype == np.float64
    assert_close(mean_square, to_numpy(to_torch(x).double().pow(2).mean(dim=(1, 2, 3))), np.float64, "ms")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_ghost_statistics_match_torch_per_chunk(dtype):
    x = case_data(_ghost_case((6, 7, 5), 2), dtype, affine=False)[0]
    _, means, variances = ref.ghost_forward_train(x, None, None, EPS, 2)
    assert means.shape == variances.shape == (3, 7)
    for v, chunk in enumerate(np.split(x, 3)):
        torch_mean, torch_var = torch_var_mean(chunk, (0, 2))
        assert_close(means[v], torch_mean, np.float64, f"chunk {v} mean")
        assert_close(variances[v], torch_var, np.float64, f"chunk {v} var")


def test_ghost_batch_stats_average_the_unbiased_chunk_statistics():
    x = case_data(_ghost_case((6, 7, 5), 2), np.float64, affine=False)[0]
    _, means, variances = ref.ghost_forward_train(x, None, None, EPS, 2)
    batch_mean, batch_var = ref.ghost_batch_stats(means, variances, count_per_ghost=2 * 5)
    chunks = [to_torch(c) for c in np.split(x, 3)]
    expected_mean = np.mean([to_numpy(c.mean(dim=(0, 2))) for c in chunks], axis=0)
    expected_var = np.mean([to_numpy(c.var(dim=(0, 2), correction=1)) for c in chunks], axis=0)
    assert_close(batch_mean, expected_mean, np.float64, "ghost batch mean")
    assert_close(batch_var, expected_var, np.float64, "ghost batch var")

    # One ghost batch: plain batch norm's mean and unbiased variance.
    _, mean, var = ref.batch_forward_train(x, None, None, EPS)
    _, means, variances = ref.ghost_forward_train(x, None, None, EPS, 6)
    one_mean, one_var = ref.ghost_batch_stats(means, variances, count_per_ghost=6 * 5)
    np.testing.assert_allclose(one_mean, mean, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(one_var, var * 30 / 29, rtol=1e-15, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Running statistics against torch's BatchNorm buffers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", ["exponential", "cumulative"])
def test_running_statistics_match_torch_buffers(mode, dtype):
    channels = 7
    module = torch.nn.BatchNorm2d(channels, momentum=0.1 if mode == "exponential" else None,
                                  dtype=torch.float64 if dtype == np.float64 else torch.float32)
    module.train()
    running_mean, running_var = np.zeros(channels, dtype), np.ones(channels, dtype)
    rng = make_rng("running", mode)
    for step, batch_size in enumerate([3, 5, 2, 4], start=1):  # varying counts per channel
        x = (rng.normal(0, 2, (1, channels, 1, 1)) + rng.uniform(0.5, 3, (1, channels, 1, 1))
             * rng.standard_normal((batch_size, channels, 5, 3))).astype(dtype)
        with torch.no_grad():
            module(to_torch(x))
        _, mean, var = ref.batch_forward_train(x, None, None, EPS)
        momentum = 0.1 if mode == "exponential" else 1.0 / step
        before = running_mean.copy(), running_var.copy()
        running_mean, running_var = ref.running_update(running_mean, running_var, mean, var,
                                                       batch_size * 5 * 3, momentum)
        assert running_mean.dtype == running_var.dtype == dtype
        assert not np.shares_memory(running_mean, before[0]) and not np.shares_memory(running_var, before[1])
    assert int(module.num_batches_tracked) == 4
    assert_close(running_mean, to_numpy(module.running_mean), dtype, "running_mean")
    assert_close(running_var, to_numpy(module.running_var), dtype, "running_var")


def test_running_update_mutates_nothing():
    running_mean, running_var = np.full(3, 0.5), np.full(3, 2.0)
    batch_mean, batch_var = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    copies = [a.copy() for a in (running_mean, running_var, batch_mean, batch_var)]
    new_mean, new_var = ref.running_update(running_mean, running_var, batch_mean, batch_var, 5, 0.25)
    for original, copy in zip((running_mean, running_var, batch_mean, batch_var), copies):
        np.testing.assert_array_equal(original, copy)
    np.testing.assert_allclose(new_mean, 0.75 * 0.5 + 0.25 * batch_mean, rtol=1e-15)
    np.testing.assert_allclose(new_var, 0.75 * 2.0 + 0.25 * batch_var * 5 / 4, rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# Batch renormalization: r, d, clipping, and r_max=1, d_max=0 == batch norm
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_renorm_r_d_match_torch_and_clip(dtype):
    case = next(c for c in CASES if c.name.startswith("renorm_mixed_clip"))
    x, _, gamma, beta, consts = case_data(case, dtype, affine=True)
    _, mean, var, r, d = ref.renorm_forward_train(x, gamma, beta, consts["running_mean"], consts["running_var"],
                                                  EPS, 1.5, 1.0)
    _, r_torch, d_torch = torch_renorm(to_torch(x).double(), None, None, to_torch(consts["running_mean"]).double(),
                                       to_torch(consts["running_var"]).double(), EPS, 1.5, 1.0)
    assert_close(r, to_numpy(r_torch), np.float64, "r")
    assert_close(d, to_numpy(d_torch), np.float64, "d")
    # the case exercises both bounds of r, both bounds of d, and the unclipped range
    assert r[0] == pytest.approx(1 / 1.5) and r[1] == pytest.approx(1.5)
    assert d[2] == pytest.approx(1.0) and d[3] == pytest.approx(-1.0)
    assert np.all((1 / 1.5 < r[2:]) & (r[2:] < 1.5)) and np.all(np.abs(d[[0, 1, 4, 5, 6]]) < 1.0)
    np.testing.assert_allclose(mean, batch_stats(x)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, batch_stats(x)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_renorm_without_relaxation_is_batch_norm(shape, dtype):
    x, dy, gamma, beta, _ = case_data(_batch_case(shape), dtype, affine=True)
    rng = make_rng("renorm == bn", shape)
    running_mean = rng.normal(0, 3, shape[1]).astype(dtype)
    running_var = rng.uniform(0.1, 5, shape[1]).astype(dtype)
    y, mean, var, r, d = ref.renorm_forward_train(x, gamma, beta, running_mean, running_var, EPS, 1.0, 0.0)
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(d, 0.0)
    y_torch, dx_torch, dgamma_torch, dbeta_torch = torch_forward_backward(
        _batch_case(shape), x, dy, gamma, beta, {})
    assert_close(y, y_torch, dtype, "y")
    grads = ref.renorm_backward(dy, x, gamma, running_mean, running_var, EPS, 1.0, 0.0)
    for name, ours, theirs in zip(("dx", "dgamma", "dbeta"), grads, (dx_torch, dgamma_torch, dbeta_torch)):
        assert_close(ours, theirs, dtype, name)
    bn_y, bn_mean, bn_var = ref.batch_forward_train(x, gamma, beta, EPS)
    np.testing.assert_array_equal(y, bn_y)
    np.testing.assert_array_equal(mean, bn_mean)
    np.testing.assert_array_equal(var, bn_var)
    for ours, bn in zip(grads, ref.batch_backward(dy, x, gamma, EPS)):
        np.testing.assert_array_equal(ours, bn)


# ----------------------------------------------------------------------------------------------
# Numerical stability: large mean, small spread, float32
# ----------------------------------------------------------------------------------------------

STABILITY_MAX_ERROR = 1e-3


def hard_float32_input(shape):
    """Mean 1e4, std 1e-2 in float32: E[x**2] - E[x]**2 in float32 loses the variance entirely."""
    rng = make_rng("stability", shape)
    return (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)


def test_stability_input_defeats_the_one_pass_formula():
    # Guards the test below: on this input the naive float32 formula is far outside the bound.
    x = hard_float32_input((64, 4, 8))
    mean = x.mean(axis=(0, 2), keepdims=True, dtype=np.float32)
    naive_var = np.maximum((x * x).mean(axis=(0, 2), keepdims=True, dtype=np.float32) - mean * mean, 0)
    naive_y = (x - mean) / np.sqrt(naive_var + np.float32(EPS))
    exact_y = to_numpy(F.batch_norm(to_torch(x).double(), None, None, training=True, eps=EPS))
    assert np.abs(naive_y - exact_y).max() > STABILITY_MAX_ERROR


@pytest.mark.parametrize("norm", ["batch", "ghost", "layer", "group", "instance"])
def test_float32_large_mean_small_spread_is_stable(norm):
    x = hard_float32_input((64, 4, 8))
    x64 = to_torch(x).double()  # the same float32 values, computed in float64 by torch
    ours, exact = {
        "batch": (lambda: ref.batch_forward_train(x, None, None, EPS)[0],
                  lambda: F.batch_norm(x64, None, None, training=True, eps=EPS)),
        "ghost": (lambda: ref.ghost_forward_train(x, None, None, EPS, 16)[0],
                  lambda: torch_ghost(x64, None, None, EPS, 16)),
        "layer": (lambda: ref.layer_forward(x, None, None, 2, EPS)[0],
                  lambda: F.layer_norm(x64, (4, 8), eps=EPS)),
        "group": (lambda: ref.group_forward(x, None, None, 2, EPS)[0],
                  lambda: F.group_norm(x64, 2, eps=EPS)),
        "instance": (lambda: ref.group_forward(x, None, None, 4, EPS)[0],
                     lambda: F.instance_norm(x64, eps=EPS)),
    }[norm]
    y, y_exact = ours(), to_numpy(exact())
    assert y.dtype == np.float32
    assert np.abs(y_exact).max() > 1.0  # normalized: the spread is resolved, not flattened to 0
    assert np.abs(y - y_exact).max() <= STABILITY_MAX_ERROR


# ----------------------------------------------------------------------------------------------
# Contract: dtypes, no mutation, refusals
# ----------------------------------------------------------------------------------------------

def test_inputs_are_not_mutated():
    case = _renorm_case("mixed_clip", (3, 7, 5, 3), 1.5, 1.0, R_MIXED, D_MIXED, fd_exact=False)
    x, dy, gamma, beta, consts = case_data(case, np.float32, affine=True)
    arrays = [x, dy, gamma, beta, consts["running_mean"], consts["running_var"]]
    copies = [a.copy() for a in arrays]
    rm, rv = consts["running_mean"], consts["running_var"]
    ref.batch_forward_train(x, gamma, beta, EPS)
    ref.batch_backward(dy, x, gamma, EPS)
    ref.batch_forward_eval(x, gamma, beta, rm, rv, EPS)
    ref.batch_backward_eval(dy, x, gamma, rm, rv, EPS)
    ref.renorm_forward_train(x, gamma, beta, rm, rv, EPS, 1.5, 1.0)
    ref.renorm_backward(dy, x, gamma, rm, rv, EPS, 1.5, 1.0)
    ref.ghost_forward_train(x, gamma, beta, EPS, 3)
    ref.ghost_backward(dy, x, gamma, EPS, 3)
    ref.group_forward(x, gamma, beta, 7, EPS)
    ref.group_backward(dy, x, gamma, 7, EPS)
    for original, copy in zip(arrays, copies):
        np.testing.assert_array_equal(original, copy)


X = np.zeros((4, 6, 5))
ONES6 = np.ones(6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: ref.batch_forward_train(X.astype(int), None, None, EPS), TypeError, "x must be a floating"),
    (lambda: ref.batch_forward_train(np.zeros(6), None, None, EPS), ValueError, "x must have shape"),
    (lambda: ref.batch_forward_train(X, np.ones(5), None, EPS), ValueError, r"gamma must have shape \(6,\)"),
    (lambda: ref.batch_forward_train(X, None, None, 0.0), ValueError, "eps must be > 0"),
    (lambda: ref.batch_forward_train(np.zeros((1, 6)), None, None, EPS), ValueError, "more than 1 value"),
    (lambda: ref.batch_backward(np.zeros((4, 6)), X, None, EPS), ValueError, "dy must have the shape"),
    (lambda: ref.batch_forward_eval(X, None, None, None, ONES6, EPS), ValueError, "running_mean"),
    (lambda: ref.running_update(ONES6, ONES6, ONES6, ONES6, 1, 0.1), ValueError, "more than 1 value"),
    (lambda: ref.running_update(ONES6, ONES6, ONES6, ONES6, 5, 1.5), ValueError, "momentum"),
    (lambda: ref.ghost_forward_train(X, None, None, EPS, 3), ValueError, "virtual_batch_size"),
    (lambda: ref.ghost_forward_train(np.zeros((4, 6)), None, None, EPS, 1), ValueError, "more than 1 value"),
    (lambda: ref.group_forward(X, None, None, 4, EPS), ValueError, "num_groups"),
    (lambda: ref.layer_forward(X, None, None, 4, EPS), ValueError, "normalized_ndim"),
    (lambda: ref.rms_forward(X, np.ones(6), 1, EPS), ValueError, r"gamma must have shape \(5,\)"),
    (lambda: ref.renorm_forward_train(X, None, None, ONES6, ONES6, EPS, 0.5, 0.0), ValueError, "r_max"),
    (lambda: ref.renorm_forward_train(X, None, None, ONES6, ONES6, EPS, 1.0, -1.0), ValueError, "d_max"),
])
def test_bad_input_is_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()
