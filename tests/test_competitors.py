"""FRN, EvoNorm-S0/B0, switchable norm and Dynamic Tanh against the NumPy oracle, a plain PyTorch
implementation (autograd), timm's layers where it has them, and finite differences; their
behaviour checklist (batch independence, train vs eval, running statistics, bad input)."""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

import normkit
from normkit import reference as ref
from normkit.testing import check_norm

DTYPES = [np.float32, np.float64]
# The oracles run in float64 on the same (rounded) inputs: float64 agrees to rounding; float32
# kernels compute in float64 and round once, so they differ by float32 ulps of the result.
# Tolerances are relative to the largest value compared (sums such as dgamma grow with N*L).
RTOL = {np.float64: 1e-10, np.float32: 3e-6}
SHAPE = (4, 8, 3, 5)
STEPS = 3


def close(actual, expected, dtype, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL[dtype] * scale, err_msg=what)


def build(name, dtype, seed=0, **kwargs):
    """A norm with non-trivial parameters (gamma of both signs, v and tau random, the mixing
    weights unequal)."""
    defaults = {"evonorm_s0": {"num_groups": 4}}
    norm = normkit.make(name, SHAPE[1], dtype=dtype, **{**defaults.get(name, {}), **kwargs})
    rng = np.random.default_rng(seed)
    for key, value in norm.params.items():
        if key == "gamma":
            value[...] = rng.uniform(0.5, 1.5, value.shape) * rng.choice([-1, 1], value.shape)
        elif key == "eps_l":
            value[...] = 0.3
        elif key == "alpha":
            value[...] = 0.7
        elif key == "v":
            value[...] = rng.uniform(0.2, 1.5, value.shape)
        else:
            value[...] = 0.5 * rng.standard_normal(value.shape)
    return norm


def data(dtype, seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


VARIANTS = [("frn", {}), ("frn", {"learned_eps": True}), ("evonorm_s0", {}), ("evonorm_b0", {}),
            ("switchable", {}), ("dyt", {})]
IDS = ["frn", "frn-learned-eps", "evonorm_s0", "evonorm_b0", "switchable", "dyt"]


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------

def reference_forward(norm, x, training):
    p = {k: v.astype(np.float64) for k, v in norm.params.items()}
    if norm.name == "frn":
        eps = norm.eps + (abs(p["eps_l"][0]) if "eps_l" in p else 0.0)
        return ref.frn_forward(x, p["gamma"], p["beta"], p["tau"], eps)
    if norm.name == "evonorm_s0":
        return ref.evonorm_s0_forward(x, p["v"], p["gamma"], p["beta"], norm.num_groups, norm.eps)
    if norm.name == "evonorm_b0":
        batch_var = None if training else norm.state["running_var"]
        return ref.evonorm_b0_forward(x, p["v"], p["gamma"], p["beta"], norm.eps, batch_var)
    if norm.name == "switchable":
        running = None if training else (norm.state["running_mean"], norm.state["running_var"])
        return ref.switchable_forward(x, p["gamma"], p["beta"], p["mean_weight"],
                                      p["var_weight"], norm.eps, running)[0]
    return ref.dyt_forward(x, p["alpha"][0], p["gamma"], p["beta"])


def torch_forward(torch, norm, x, training, params, state):
    """A plain PyTorch version of each norm (float64); updates ``state`` in training."""
    c = lambda p: p.view(1, -1, *([1] * (x.dim() - 2)))                   # noqa: E731
    spatial = tuple(range(2, x.dim()))
    if norm.name == "frn":
        eps = norm.eps + (params["eps_l"].abs()[0] if "eps_l" in params else 0.0)
        nu2 = x.pow(2).mean(dim=spatial, keepdim=True)
        y = c(params["gamma"]) * x * torch.rsqrt(nu2 + eps) + c(params["beta"])
        return torch.maximum(y, c(params["tau"]))
    if norm.name == "evonorm_s0":
        n, ch = x.shape[:2]
        g = norm.num_groups
        xg = x.reshape(n, g, -1)
        std = (xg.var(dim=2, unbiased=False, keepdim=True) + norm.eps).sqrt()
        std = std.expand(xg.shape).reshape(x.shape)
        y = x * torch.sigmoid(c(params["v"]) * x) / std
        return y * c(params["gamma"]) + c(params["beta"])
    if norm.name in ("evonorm_b0", "switchable"):
        batch_axes = (0,) + spatial
        count = x.numel() // x.shape[1]
        if training:
            bm, bv = x.mean(dim=batch_axes), x.var(dim=batch_axes, unbiased=False)
            m = norm.momentum
            if "running_mean" in state:
                state["running_mean"] = (1 - m) * state["running_mean"] + m * bm.detach()
            state["running_var"] = ((1 - m) * state["running_var"]
                                    + m * bv.detach() * count / (count - 1))
        else:
            bm, bv = state.get("running_mean"), state["running_var"]
        if norm.name == "evonorm_b0":
            left = (c(bv) + norm.eps).sqrt()
            right = c(params["v"]) * x + (x.var(dim=spatial, unbiased=False, keepdim=True)
                                          + norm.eps).sqrt()
            return x / torch.maximum(left, right) * c(params["gamma"]) + c(params["beta"])
        layer_axes = tuple(range(1, x.dim()))
        means = (x.mean(dim=spatial, keepdim=True), x.mean(dim=layer_axes, keepdim=True), c(bm))
        variances = (x.var(dim=spatial, unbiased=False, keepdim=True),
                     x.var(dim=layer_axes, unbiased=False, keepdim=True), c(bv))
        wm = torch.softmax(params["mean_weight"], 0)
        wv = torch.softmax(params["var_weight"], 0)
        mean = sum(wm[k] * means[k] for k in range(3))
        var = sum(wv[k] * variances[k] for k in range(3))
        return (x - mean) / (var + norm.eps).sqrt() * c(params["gamma"]) + c(params["beta"])
    return c(params["gamma"]) * torch.tanh(params["alpha"] * x) + c(params["beta"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=IDS)
def test_matches_reference(name, kwargs, dtype):
    """Forward in training over several steps, then in evaluation, against normkit.reference."""
    norm = build(name, dtype, **kwargs)
    for step in range(STEPS + 1):
        training = step < STEPS
        x = data(dtype, 10 + step)
        expected = reference_forward(norm, x, training)
        y = norm.forward(x, training=training)
        assert y.dtype == dtype
        close(y, expected, dtype, f"{name} step {step}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=IDS)
def test_matches_torch(name, kwargs, dtype):
    """Forward, every gradient and the running statistics against PyTorch's autograd of a plain
    implementation, over training steps and one evaluation step."""
    torch = pytest.importorskip("torch")
    norm = build(name, dtype, **kwargs)
    params = {k: torch.tensor(v.astype(np.float64), requires_grad=True)
              for k, v in norm.params.items()}
    state = {k: torch.tensor(v.astype(np.float64)) for k, v in norm.state.items()
             if k != "num_batches_tracked"}
    rng = np.random.default_rng(3)
    for step in range(STEPS + 1):
        training = step < STEPS
        x = data(dtype, 20 + step)
        dy = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        for p in params.values():
            p.grad = None
        yt = torch_forward(torch, norm, xt, training, params, state)
        yt.backward(torch.tensor(dy.astype(np.float64)))
        y = norm.forward(x, training=training)
        dx = norm.backward(dy)
        what = f"{name} step {step} ({'train' if training else 'eval'})"
        close(y, yt.detach().numpy(), dtype, f"forward, {what}")
        assert dx.dtype == dtype
        close(dx, xt.grad.numpy(), dtype, f"dx, {what}")
        assert set(norm.grads) == set(params)
        for key, p in params.items():
            assert norm.grads[key].dtype == dtype
            close(norm.grads[key], p.grad.numpy(), dtype, f"grads[{key}], {what}")
        for key, value in state.items():
            close(norm.state[key], value.numpy(), dtype, f"{key}, {what}")
    if norm.state:
        assert int(norm.state["num_batches_tracked"]) == STEPS


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=IDS)
def test_backward_finite_differences(name, kwargs):
    """Every gradient (x, gamma, beta, tau, eps_l, v, the mixing weights, alpha) in float64,
    in training and in evaluation after a few steps."""
    norm = build(name, np.float64, **kwargs)
    x = data(np.float64, 5)
    check_norm(norm, x, training=True)
    for seed in range(3):
        norm.forward(data(np.float64, 30 + seed), training=True)
    check_norm(norm, x, training=False)


def test_frn_learned_eps_on_1x1_maps_finite_differences():
    """The paper's case for the learned eps: 1x1 maps ((N, C) input), where nu2 = x^2."""
    norm = build("frn", np.float64, learned_eps=True)
    norm.params["eps_l"][...] = -0.2                   # |eps_l|: the sign enters the gradient
    check_norm(norm, data(np.float64, 4, shape=(6, 8)), training=True)
    check_norm(norm, data(np.float64, 4, shape=(6, 8, 1, 1)), training=True)


# ---------------------------------------------------------------------------------------------
# timm (PyTorch image models): loaded from its layer files, without `import timm` (which pulls in
# torchvision, absent beside the CPU torch here)
# ---------------------------------------------------------------------------------------------

def timm_layers(module: str):
    """timm's layer file, or a skip where torch or timm is missing."""
    from normkit.testing import timm_layers as load
    try:
        return load(module)
    except ImportError as error:
        pytest.skip(str(error))


#: timm computes its statistics in float32 whatever the input's dtype (``x.float()`` in
#: ``inv_instance_rms``, ``group_std``, ``instance_std``), so even in float64 it agrees with
#: normkit only to float32 rounding; float64 exactness is checked against PyTorch above.
TIMM_RTOL = RTOL[np.float32]


def timm_case(name, dtype):
    """(normkit norm, timm module) with the same parameters and definitions (eps passed)."""
    torch = pytest.importorskip("torch")
    if name == "frn":
        norm = build("frn", dtype, eps=1e-5)
        layer = timm_layers("filter_response_norm").FilterResponseNormTlu2d(SHAPE[1], eps=1e-5)
        pairs = {"gamma": layer.weight, "beta": layer.bias, "tau": layer.tau}
    elif name == "evonorm_s0":
        norm = build("evonorm_s0", dtype)
        layer = timm_layers("evo_norm").EvoNorm2dS0(SHAPE[1], groups=norm.num_groups, eps=norm.eps)
        pairs = {"gamma": layer.weight, "beta": layer.bias, "v": layer.v}
    else:
        norm = build("evonorm_b0", dtype)
        layer = timm_layers("evo_norm").EvoNorm2dB0(SHAPE[1], eps=norm.eps, momentum=norm.momentum)
        pairs = {"gamma": layer.weight, "beta": layer.bias, "v": layer.v}
    layer = layer.double()
    with torch.no_grad():
        for key, p in pairs.items():
            p.copy_(torch.tensor(norm.params[key].astype(np.float64)))
    return norm, layer, pairs


def timm_differences(name, dtype, steps=STEPS):
    """Largest |normkit - timm| over forward, dx and parameter gradients (and running_var), over
    training steps and one evaluation step; timm runs in float64 on the same inputs."""
    torch = pytest.importorskip("torch")
    norm, layer, pairs = timm_case(name, dtype)
    rng = np.random.default_rng(7)
    worst = {}
    for step in range(steps + 1):
        training = step < steps
        layer.train(training)
        x = data(dtype, 40 + step)
        dy = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        for p in pairs.values():
            p.grad = None
        yt = layer(xt)
        yt.backward(torch.tensor(dy.astype(np.float64)))
        compared = {"y": (norm.forward(x, training=training), yt.detach().numpy()),
                    "dx": (norm.backward(dy), xt.grad.numpy())}
        compared.update({key: (norm.grads[key], p.grad.numpy()) for key, p in pairs.items()})
        if name == "evonorm_b0":
            compared["running_var"] = (norm.state["running_var"], layer.running_var.numpy())
        for key, (ours, theirs) in compared.items():
            scale = max(1.0, float(np.max(np.abs(theirs))))
            diff = float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)))
            worst[key] = max(worst.get(key, 0.0), diff / scale)
    return worst


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["frn", "evonorm_s0", "evonorm_b0"])
def test_matches_timm(name, dtype):
    """timm's FilterResponseNormTlu2d, EvoNorm2dS0 and EvoNorm2dB0 (autograd through the module),
    with eps and groups set to normkit's: forward, dx, every parameter gradient, running_var."""
    worst = timm_differences(name, dtype)
    assert set(worst) >= {"y", "dx", "gamma", "beta"}
    for key, diff in worst.items():
        assert diff <= TIMM_RTOL, f"{name} {key}: relative difference {diff:.3g} from timm"


def test_timm_default_eps_differs_where_documented():
    """normkit's defaults follow the papers/authors: FRN eps 1e-6 (timm 1e-5), EvoNorm-B0 eps
    1e-5 (timm 1e-3); the tests above pass eps explicitly for that reason."""
    frn, b0 = timm_layers("filter_response_norm"), timm_layers("evo_norm")
    assert frn.FilterResponseNormTlu2d(4).eps == 1e-5 and normkit.make("frn", 4).eps == 1e-6
    assert b0.EvoNorm2dB0(4).eps == 1e-3 and normkit.make("evonorm_b0", 4).eps == 1e-5


# ---------------------------------------------------------------------------------------------
# Behaviour checklist
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["frn", "evonorm_s0", "dyt"])
def test_batch_independent(name):
    """A sample's output and gradient do not depend on the other samples of the batch."""
    norm = build(name, np.float64)
    x = data(np.float64, 1)
    dy = data(np.float64, 2)
    y_full, dx_full = norm.forward(x, training=True).copy(), norm.backward(dy).copy()
    for i in range(x.shape[0]):
        y_one = norm.forward(x[i:i + 1], training=True)
        np.testing.assert_allclose(y_one[0], y_full[i], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(norm.backward(dy[i:i + 1])[0], dx_full[i], rtol=1e-13,
                                   atol=1e-13)


@pytest.mark.parametrize("name", ["evonorm_b0", "switchable"])
def test_batch_terms_depend_on_the_batch_in_training_only(name):
    norm = build(name, np.float64)
    x = data(np.float64, 1)
    for seed in range(3):
        norm.forward(data(np.float64, 50 + seed), training=True)
    full = norm.forward(x, training=True)[0].copy()
    alone = norm.forward(x[:2], training=True)[0].copy()
    assert np.max(np.abs(full - alone)) > 1e-6                    # batch statistics differ
    state = {k: v.copy() for k, v in norm.state.items()}
    eval_full = norm.forward(x, training=False)[0].copy()
    np.testing.assert_allclose(norm.forward(x[:2], training=False)[0], eval_full, rtol=1e-13)
    for key, value in state.items():                             # evaluation changes nothing
        np.testing.assert_array_equal(norm.state[key], value)


def test_switchable_with_one_weight_is_instance_layer_or_batch_norm():
    """Mixing logits that put all weight on one term reproduce instance, layer and batch norm."""
    x = data(np.float64, 3)
    others = {0: normkit.make("instance", 8, dtype=np.float64),
              1: normkit.make("group", 8, num_groups=1, dtype=np.float64),
              2: normkit.make("batch", 8, dtype=np.float64)}
    for k, other in others.items():
        norm = normkit.make("switchable", 8, dtype=np.float64)
        logits = np.full(3, -1e3)
        logits[k] = 0.0
        norm.params["mean_weight"][...] = logits
        norm.params["var_weight"][...] = logits
        np.testing.assert_allclose(norm.forward(x, training=True),
                                   other.forward(x, training=True), rtol=1e-10, atol=1e-10)


def test_dyt_channels_last_and_default_alpha():
    norm = normkit.make("dyt", 6, axis=-1, dtype=np.float64)
    assert norm.params["alpha"].tolist() == [0.5]             # the paper's default
    norm.params["gamma"][...] = np.arange(6)
    x = data(np.float64, 1, shape=(2, 5, 6))
    np.testing.assert_allclose(norm.forward(x, training=False),
                               np.arange(6) * np.tanh(0.5 * x), rtol=1e-14)
    check_norm(norm, x)


def test_defaults_follow_the_papers():
    frn = normkit.make("frn", 4)
    assert frn.eps == 1e-6 and not frn.params["tau"].any() and "eps_l" not in frn.params
    assert normkit.make("frn", 4, learned_eps=True).params["eps_l"].tolist() == [pytest.approx(1e-4)]
    assert normkit.make("evonorm_s0", 64).num_groups == 32
    assert normkit.make("evonorm_s0", 24).num_groups == 24     # the authors' rule: <= 32, divides C
    assert normkit.make("evonorm_s0", 40).num_groups == 20
    s0 = normkit.make("evonorm_s0", 64)
    assert s0.eps == 1e-5 and s0.params["v"].tolist() == [1.0] * 64
    assert set(normkit.make("evonorm_b0", 4).state) == {"running_var", "num_batches_tracked"}
    sn = normkit.make("switchable", 4)
    assert sn.params["mean_weight"].tolist() == [1.0] * 3 == sn.params["var_weight"].tolist()
    assert {"frn", "evonorm_s0", "evonorm_b0", "switchable", "dyt"} <= set(normkit.available())


BAD = [
    ("frn", (3, 8, 4), {}, ValueError, "channels"),
    ("evonorm_s0", (4, 8, 3), {"num_groups": 3}, ValueError, "num_groups"),
    ("evonorm_b0", (4, 8), {}, ValueError, "spatial"),
    ("switchable", (4, 8, 1), {}, ValueError, "spatial"),
    ("dyt", (4, 8), {"alpha": float("nan")}, ValueError, "alpha"),
    ("frn", (4, 8), {"eps": 0.0}, ValueError, "eps"),
    ("evonorm_b0", (4, 8, 3), {"momentum": 2.0}, ValueError, "momentum"),
    ("frn", (4, 8), {"learned_eps": 1}, TypeError, "learned_eps"),
]


@pytest.mark.parametrize("name,shape,kwargs,error,word", BAD,
                         ids=[f"{b[0]}-{b[4]}" for b in BAD])
def test_bad_input_is_refused_by_name(name, shape, kwargs, error, word):
    with pytest.raises(error, match=word):
        norm = normkit.make(name, 8 if word != "channels" else 5, dtype=np.float64, **kwargs)
        norm.forward(np.ones(shape), training=True)


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=IDS)
def test_refused_call_changes_nothing(name, kwargs):
    norm = build(name, np.float64, **kwargs)
    x = data(np.float64, 1)
    norm.forward(x, training=True)
    dx = norm.backward(np.ones_like(x)).copy()
    owned = {"params": norm.params, "state": norm.state, "grads": norm.grads}
    before = {(w, k): v.copy() for w, d in owned.items() for k, v in d.items()}
    with pytest.raises(TypeError, match="dtype"):
        norm.forward(x.astype(np.float32), training=True)
    with pytest.raises(ValueError, match="channels"):
        norm.forward(np.ones((4, 5, 3, 5)), training=True)
    key = next(iter(norm.params))
    saved = norm.params[key].copy()
    norm.params[key][...] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        norm.forward(x, training=True)
    norm.params[key][...] = saved
    for (where, k), v in before.items():       # state, params, grads as they were
        np.testing.assert_array_equal(owned[where][k], v, err_msg=f"{where}[{k!r}]")
    np.testing.assert_array_equal(norm.backward(np.ones_like(x)), dx)   # the saved input too


# ---------------------------------------------------------------------------------------------
# Weight standardization (an option of Dense / Conv1d / Conv2d)
# ---------------------------------------------------------------------------------------------

def _ws_layers(dtype, **kwargs):
    from normkit.nn import Conv1d, Conv2d, Dense
    common = dict(weight_standardization=True, dtype=dtype, **kwargs)
    return {"dense": (Dense(6, 5, rng=0, **common), (4, 6)),
            "conv1d": (Conv1d(3, 4, 3, padding=1, rng=1, **common), (2, 3, 7)),
            "conv2d": (Conv2d(3, 4, 3, stride=2, padding=1, rng=2, **common), (2, 3, 6, 5))}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_weight_standardization_matches_reference_and_torch(dtype):
    """Forward, dx, dweight and dbias against torch autograd through (W - mean) / sqrt(var + eps)
    and the plain layer; the effective weight against normkit.reference."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for name, (layer, shape) in _ws_layers(dtype).items():
        layer.params["bias"][...] = np.linspace(-1, 1, layer.params["bias"].size)
        x = data(dtype, 1, shape)
        dy_shape = layer.forward(x, training=True).shape
        dy = data(dtype, 2, dy_shape)
        close(layer.effective_weight(), ref.weight_standardize(layer.params["weight"], 1e-5),
              dtype, f"{name} effective weight")
        w = torch.tensor(layer.params["weight"].astype(np.float64), requires_grad=True)
        b = torch.tensor(layer.params["bias"].astype(np.float64), requires_grad=True)
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        rows = w.reshape(w.shape[0], -1)
        centered = rows - rows.mean(1, keepdim=True)
        w_hat = (centered / (centered.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()).reshape(w.shape)
        if name == "dense":
            yt = xt @ w_hat.T + b
        elif name == "conv1d":
            yt = F.conv1d(xt, w_hat, b, padding=1)
        else:
            yt = F.conv2d(xt, w_hat, b, stride=2, padding=1)
        yt.backward(torch.tensor(dy.astype(np.float64)))
        y = layer.forward(x, training=True).copy()
        dx = layer.backward(dy)
        close(y, yt.detach().numpy(), dtype, f"{name} forward")
        close(dx, xt.grad.numpy(), dtype, f"{name} dx")
        close(layer.grads["weight"], w.grad.numpy(), dtype, f"{name} dweight")
        close(layer.grads["bias"], b.grad.numpy(), dtype, f"{name} dbias")


def test_weight_standardization_finite_differences():
    from normkit.testing import check_vjp
    for name, (layer, shape) in _ws_layers(np.float64).items():
        x = data(np.float64, 3, shape)
        dy = data(np.float64, 4, layer.forward(x, training=True).shape)

        def out(x, weight, bias):
            layer.params["weight"][...] = weight
            layer.params["bias"][...] = bias
            return layer.forward(x, training=True).copy()

        inputs = {"x": x, "weight": layer.params["weight"].copy(),
                  "bias": layer.params["bias"].copy()}
        out(**inputs)
        grads = {"x": layer.backward(dy).copy(), "weight": layer.grads["weight"].copy(),
                 "bias": layer.grads["bias"].copy()}
        check_vjp(out, inputs, grads, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_weight_standardization_matches_timm_std_conv(dtype):
    """timm's StdConv2d (eps passed: its default is 1e-6) with autograd."""
    torch = pytest.importorskip("torch")
    std_conv = timm_layers("std_conv")
    layer, shape = _ws_layers(dtype, ws_eps=1e-6)["conv2d"]
    theirs = std_conv.StdConv2d(3, 4, 3, stride=2, padding=1, bias=True, eps=1e-6).double()
    with torch.no_grad():
        theirs.weight.copy_(torch.tensor(layer.params["weight"].astype(np.float64)))
        theirs.bias.copy_(torch.tensor(layer.params["bias"].astype(np.float64)))
    x = data(dtype, 5, shape)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    yt = theirs(xt)
    dy = data(dtype, 6, tuple(yt.shape))
    yt.backward(torch.tensor(dy.astype(np.float64)))
    close(layer.forward(x, training=True), yt.detach().numpy(), dtype, "forward")
    close(layer.backward(dy), xt.grad.numpy(), dtype, "dx")
    close(layer.grads["weight"], theirs.weight.grad.numpy(), dtype, "dweight")


def test_weight_standardization_folds_and_refuses_bad_options():
    from normkit.inference import fold
    from normkit.nn import Conv1d, Sequential
    conv = Conv1d(2, 4, 3, padding=1, rng=0, weight_standardization=True, dtype=np.float64)
    bn = normkit.make("batch", 4, dtype=np.float64)
    model = Sequential([conv, bn])
    for seed in range(3):
        model.forward(data(np.float64, seed, (5, 2, 6)), training=True)
    x = data(np.float64, 9, (5, 2, 6))
    np.testing.assert_allclose(fold(model).forward(x, training=False),
                               model.forward(x, training=False), rtol=1e-12, atol=1e-12)
    assert "weight_standardization=True" in repr(conv)
    plain = Conv1d(2, 4, 3, padding=1, rng=0, dtype=np.float64)
    np.testing.assert_array_equal(plain.effective_weight(), plain.params["weight"])
    with pytest.raises(ValueError, match="ws_eps"):
        Conv1d(2, 4, 3, rng=0, weight_standardization=True, ws_eps=0.0)
    with pytest.raises(TypeError, match="weight_standardization"):
        Conv1d(2, 4, 3, rng=0, weight_standardization="yes")


# ---------------------------------------------------------------------------------------------
# In the training engine and the small-batch study
# ---------------------------------------------------------------------------------------------

def test_build_model_places_the_competitors():
    from normkit.nn import Conv1d, Dense, ReLU
    from normkit.train import NotApplicable, TrainConfig, build_model, not_applicable_reason
    rng = np.random.default_rng(0)
    for norm in ("frn", "evonorm_s0", "evonorm_b0"):            # they replace "norm + ReLU"
        model = build_model(TrainConfig(model="cnn1d", norm=norm), (1, 40), 10, rng)
        kinds = [type(layer).__name__ for layer in model]
        assert "ReLU" not in kinds and kinds.count(type(normkit.make(norm, 4)).__name__) == 3
    for norm in ("switchable", "dyt", "gn+ws"):
        model = build_model(TrainConfig(model="cnn1d", norm=norm), (1, 40), 10, rng)
        assert sum(isinstance(layer, ReLU) for layer in model) == 3
    ws = build_model(TrainConfig(model="mlp", norm="gn+ws"), (64,), 10, rng)
    linear = [layer for layer in ws if isinstance(layer, (Dense, Conv1d))]
    assert [layer.weight_standardization for layer in linear] == [True, True, False]
    assert all(isinstance(layer, normkit.GroupNorm) for layer in ws
               if isinstance(layer, normkit.Norm))
    frn = [layer for layer in build_model(TrainConfig(model="mlp", norm="frn"), (64,), 10, rng)
           if isinstance(layer, normkit.Norm)]
    assert frn and all(layer.learned_eps for layer in frn)     # the paper's 1x1 option
    for norm in ("evonorm_b0", "switchable"):
        assert "spatial" in not_applicable_reason(TrainConfig(model="mlp", norm=norm))
        with pytest.raises(NotApplicable, match="spatial"):
            build_model(TrainConfig(model="mlp", norm=norm), (64,), 10, rng)


def test_small_batch_grids_hold_the_competitors():
    from normkit import sweep
    study = sweep.load_study(pathlib.Path(__file__).parent.parent / "studies" / "small_batch.py")
    module = sys.modules[study.run.__module__]
    quick, full = study.configs(quick=True), study.configs(quick=False)
    for model, norms in module.COMPETITORS.items():
        for norm in norms:
            assert {c.batch_size for c in quick if (c.model, c.norm) == (model, norm)} == {2, 32}
            assert {c.batch_size for c in full if (c.model, c.norm) == (model, norm)} == \
                {1, 2, 4, 8, 16, 32, 64, 128}
    assert {"frn", "evonorm_s0", "evonorm_b0", "gn+ws", "switchable", "dyt"} == \
        set(module.COMPETITORS["cnn1d"])
    assert not any(c.model == "mlp" and c.norm in ("evonorm_b0", "switchable") for c in full)


def test_small_batch_findings_compare_each_competitor_with_group_and_batch_norm():
    pd = pytest.importorskip("pandas")
    from normkit import sweep
    study = sweep.load_study(pathlib.Path(__file__).parent.parent / "studies" / "small_batch.py")
    module = sys.modules[study.run.__module__]
    errors = {"batch": {2: 0.30, 32: 0.03}, "group": {2: 0.031, 32: 0.03},
              "frn": {2: 0.10, 32: 0.10}, "dyt": {2: 0.031, 32: 0.03}}
    rows = [{"model": "mlp", "norm": norm, "batch_size": size, "epochs": 20, "seed": seed,
             "status": "ok", "test_error": error + 0.001 * (seed - 1),
             "test_error_batchstats": error, "stat_error": np.nan}
            for norm, cells in errors.items() for size, error in cells.items() for seed in range(3)]
    text = "\n".join(module.findings(pd.DataFrame(rows)))
    assert "**frn** at batch 32: 10.0%, worse than group (3.0%) and worse than batch (3.0%); " \
           "at batch 2: 10.0%, worse than group (3.1%)." in text
    assert "**dyt** at batch 32: 3.0%, level with group (3.0%) and level with batch (3.0%); " \
           "at batch 2: 3.1%, level with group (3.1%)." in text


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_evonorm_s0_parallel_twin_equals_the_serial_kernel(dtype):
    """A large input runs EvoNorm-S0 with the samples on threads; it computes exactly what the
    public single-threaded kernels compute (the same arithmetic per sample and group)."""
    from normkit.kernels import pointwise
    shape = (64, SHAPE[1], 8, 8)                  # 32768 values: the parallel twins
    norm = build("evonorm_s0", dtype)
    x = data(dtype, 3, shape)
    dy = data(dtype, 4, shape)
    y = norm.forward(x, training=True)
    dx = norm.backward(dy)
    _, mean, var = norm._saved
    x3, dy3 = x.reshape(64, SHAPE[1], -1), dy.reshape(64, SHAPE[1], -1)
    y_serial, dx_serial = np.empty_like(x3), np.empty_like(x3)
    part = np.empty((3, 64, SHAPE[1]))
    pointwise.evonorm_s0_forward(x3, norm.params["v"], norm.params["gamma"],
                                 norm.params["beta"], var, norm.eps, y_serial)
    pointwise.evonorm_s0_backward(dy3, x3, norm.params["v"], norm.params["gamma"], mean, var,
                                  norm.eps, dx_serial, part)
    assert np.array_equal(y.reshape(x3.shape), y_serial)
    assert np.array_equal(dx.reshape(x3.shape), dx_serial)
    np.testing.assert_array_equal(norm.grads["v"], part[2].sum(axis=0).astype(dtype))
