"""The training engine: finite-difference checks of every layer, loss and whole networks (float64),
PyTorch autograd for an MLP and a CNN, optimizers against torch.optim, init, and the behaviour
checklist (buffers reused, grads overwritten, bad input refused without changing anything)."""
from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit.nn import (SGD, Adam, BinaryCrossEntropy, Conv1d, Conv2d, Dense, Dropout, Flatten,
                        GlobalAvgPool, ReLU, RMSProp, Sequential, Sigmoid, SoftmaxCrossEntropy,
                        Tanh, clip_grad_norm, init)
from normkit.nn.layers import SMALL_DENSE_MACS
from normkit.testing import GradientMismatch, check_norm, check_vjp

torch = pytest.importorskip("torch")


class StandinBatchNorm:
    """Training-mode batch norm over (N, C, *spatial) in plain NumPy (torch.nn.BatchNorm's
    training computation: biased variance; no running statistics). The stand-in for
    ``normkit.make("batch")`` until it lands (see :func:`batch_norm`)."""

    def __init__(self, num_features, eps=1e-5, dtype=np.float64):
        self.eps = eps
        self.params = {"gamma": np.ones(num_features, dtype), "beta": np.zeros(num_features, dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.state = {}

    def forward(self, x, training):
        self.axes = (0,) + tuple(range(2, x.ndim))
        self.shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = x.mean(axis=self.axes, keepdims=True)
        self.inv_std = 1 / np.sqrt(x.var(axis=self.axes, keepdims=True) + self.eps)
        self.x_hat = (x - mean) * self.inv_std
        return self.params["gamma"].reshape(self.shape) * self.x_hat + self.params["beta"].reshape(self.shape)

    def backward(self, dy):
        m = dy.size // dy.shape[1]
        self.grads["beta"][...] = dy.sum(axis=self.axes)
        self.grads["gamma"][...] = (dy * self.x_hat).sum(axis=self.axes)
        gamma = self.params["gamma"].reshape(self.shape)
        return gamma * self.inv_std / m * (
            m * dy - self.grads["beta"].reshape(self.shape) - self.x_hat * self.grads["gamma"].reshape(self.shape))


def batch_norm(num_features, dtype=np.float64):
    """The real batch norm once ``normkit.make`` exists, the stand-in before."""
    if hasattr(normkit, "make"):
        return normkit.make("batch", num_features, dtype=dtype)
    return StandinBatchNorm(num_features, dtype=dtype)


def rng_(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Finite differences, layer by layer (float64)
# ---------------------------------------------------------------------------------------------

F64 = dict(dtype=np.float64)

LAYERS = {
    "dense_small": (lambda: Dense(5, 4, rng=1, **F64), (3, 5)),
    "dense_blas": (lambda: Dense(300, 150, rng=1, **F64), (3, 300)),
    "dense_no_bias": (lambda: Dense(5, 4, rng=1, bias=False, **F64), (3, 5)),
    "conv1d_same": (lambda: Conv1d(3, 4, 5, padding="same", rng=1, **F64), (2, 3, 11)),
    "conv1d_stride2": (lambda: Conv1d(2, 3, 3, stride=2, padding=1, rng=1, **F64), (3, 2, 10)),
    "conv2d": (lambda: Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), rng=1, **F64), (2, 2, 7, 5)),
    "conv2d_no_bias": (lambda: Conv2d(1, 2, 3, padding="same", bias=False, rng=1, **F64), (2, 1, 4, 4)),
    "relu": (ReLU, (4, 6)),
    "tanh": (Tanh, (4, 3, 5)),
    "sigmoid": (Sigmoid, (4, 6)),
    "flatten": (Flatten, (3, 2, 4)),
    "global_avg_pool_1d": (GlobalAvgPool, (3, 2, 5)),
    "global_avg_pool_2d": (GlobalAvgPool, (3, 2, 4, 5)),
}


def test_dense_blas_case_takes_the_blas_path():
    assert 3 * 300 * 150 > SMALL_DENSE_MACS >= 3 * 5 * 4


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradients_match_finite_differences(name):
    build, shape = LAYERS[name]
    layer = build()
    x = rng_(2).standard_normal(shape)
    for p in layer.params.values():                      # non-trivial biases too
        p += 0.1 * rng_(3).standard_normal(p.shape)
    check_norm(layer, x, training=True)
    check_norm(layer, x, training=False)


@pytest.mark.parametrize("training", [True, False])
def test_dropout_gradient_matches_finite_differences_for_a_fixed_mask(training):
    layer = Dropout(0.4, rng=0)
    x = rng_(1).standard_normal((5, 7))

    def fun(x):
        layer.rng = np.random.default_rng(7)            # the same mask on every call
        return layer.forward(x, training).copy()

    y = fun(x)
    dy = rng_(2).standard_normal(y.shape)
    dx = layer.backward(dy).copy()
    check_vjp(fun, {"x": x}, {"x": dx}, dy)
    if training:
        kept = y != 0
        assert 0 < kept.mean() < 1
        np.testing.assert_allclose(y[kept], x[kept] / 0.6, rtol=1e-15)
        np.testing.assert_allclose(dx, np.where(kept, dy / 0.6, 0), rtol=1e-15)
    else:
        assert np.array_equal(y, x) and np.array_equal(dx, dy)


def test_the_checker_catches_a_wrong_gradient():
    layer = Dense(4, 3, rng=0, **F64)
    x = rng_(1).standard_normal((2, 4))
    original = layer.backward
    layer.backward = lambda dy: original(dy) * 1.001
    with pytest.raises(GradientMismatch):
        check_norm(layer, x)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def _loss_check(criterion, logits, targets):
    def fun(logits):
        return np.array(criterion.forward(logits, targets))
    fun(logits)
    check_vjp(fun, {"logits": logits}, {"logits": criterion.backward().copy()}, np.array(1.0))


def test_softmax_cross_entropy_gradient_and_value_match_torch():
    logits = 3 * rng_(0).standard_normal((6, 4))
    targets = np.array([0, 3, 1, 1, 2, 0])
    criterion = SoftmaxCrossEntropy()
    _loss_check(criterion, logits, targets)
    loss = criterion.forward(logits, targets)
    z = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(z, torch.tensor(targets))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-14)
    np.testing.assert_allclose(criterion.backward(), z.grad.numpy(), rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("shape", [(7,), (7, 1), (3, 4)])
def test_binary_cross_entropy_gradient_and_value_match_torch(shape):
    logits = 3 * rng_(0).standard_normal(shape)
    targets = rng_(1).uniform(0, 1, shape)
    criterion = BinaryCrossEntropy()
    _loss_check(criterion, logits, targets)
    loss = criterion.forward(logits, targets)
    z = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(targets))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-14)
    np.testing.assert_allclose(criterion.backward(), z.grad.numpy(), rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_are_stable_for_huge_logits(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-3e4, 2e4, 1e4]], dtype)
    targets = np.array([1, 1])
    ce = SoftmaxCrossEntropy()
    loss = ce.forward(logits, targets)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64), torch.tensor(targets))
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-6)
    assert np.isfinite(ce.backward()).all() and ce.backward().dtype == dtype
    bce = BinaryCrossEntropy()
    z = np.array([1e4, -1e4, 50.0, -50.0], dtype)
    t = np.array([0, 1, 1, 0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(z, dtype=torch.float64), torch.tensor(t, dtype=torch.float64))
    np.testing.assert_allclose(bce.forward(z, t), expected.item(), rtol=1e-6)
    assert np.isfinite(bce.backward()).all()


def test_loss_refuses_bad_targets_and_keeps_the_last_gradient():
    ce = SoftmaxCrossEntropy()
    logits = rng_(0).standard_normal((3, 4))
    ce.forward(logits, np.array([0, 1, 2]))
    before = ce.backward().copy()
    with pytest.raises(ValueError, match=r"targets\[1\] = 4"):
        ce.forward(logits, np.array([0, 4, 2]))
    with pytest.raises(ValueError, match=r"targets\[0\] = -1"):
        ce.forward(logits, np.array([-1, 0, 2]))
    with pytest.raises(TypeError, match="integer"):
        ce.forward(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="targets must be"):
        ce.forward(logits, np.array([0, 1]))
    np.testing.assert_array_equal(ce.backward(), before)
    with pytest.raises(RuntimeError, match="before forward"):
        SoftmaxCrossEntropy().backward()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BinaryCrossEntropy().forward(np.zeros(2), np.array([0.5, 2.0]))


# ---------------------------------------------------------------------------------------------
# Whole networks: finite differences, then PyTorch autograd
# ---------------------------------------------------------------------------------------------

def _mlp(dtype=np.float64, dropout=0.0):
    rng = rng_(0)
    return Sequential([
        Dense(6, 8, rng=rng, dtype=dtype), batch_norm(8, dtype), ReLU(),
        Dense(8, 8, rng=rng, init="orthogonal", dtype=dtype), batch_norm(8, dtype), Tanh(),
        Dropout(dropout, rng=5),
        Dense(8, 3, rng=rng, init="glorot_uniform", dtype=dtype),
    ])


def _cnn1d(dtype=np.float64):
    rng = rng_(0)
    return Sequential([
        Conv1d(1, 4, 5, padding="same", rng=rng, dtype=dtype), batch_norm(4, dtype), ReLU(),
        Conv1d(4, 4, 3, stride=2, padding=1, rng=rng, dtype=dtype), batch_norm(4, dtype), Sigmoid(),
        Flatten(), Dense(4 * 6, 3, rng=rng, dtype=dtype),
    ])


def _cnn2d(dtype=np.float64):
    rng = rng_(0)
    return Sequential([
        Conv2d(1, 4, 3, padding=1, rng=rng, dtype=dtype), batch_norm(4, dtype), ReLU(),
        Conv2d(4, 5, 3, stride=2, padding=1, rng=rng, dtype=dtype), batch_norm(5, dtype), ReLU(),
        GlobalAvgPool(), Dense(5, 3, rng=rng, dtype=dtype),
    ])


NETWORKS = {"mlp": (_mlp, (5, 6)), "cnn1d": (_cnn1d, (4, 1, 12)), "cnn2d": (_cnn2d, (3, 1, 6, 6))}


def _perturb_params(model, seed=1):
    rng = rng_(seed)
    for p in model.params.values():
        p += 0.1 * rng.standard_normal(p.shape)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_loss_gradient_matches_finite_differences(name):
    build, shape = NETWORKS[name]
    model = build()
    _perturb_params(model)
    if name == "mlp":
        model[6].p = 0.3                                  # dropout with a fixed mask per call
    criterion = SoftmaxCrossEntropy()
    x = rng_(2).standard_normal(shape)
    targets = rng_(3).integers(0, 3, shape[0])
    keys = list(model.params)

    def loss(x, **params):
        if name == "mlp":
            model[6].rng = np.random.default_rng(11)
        for key, value in params.items():
            model.params[key.replace("__", ".")][...] = value
        return np.array(criterion.forward(model.forward(x, training=True), targets))

    inputs = {"x": x, **{k.replace(".", "__"): model.params[k].copy() for k in keys}}
    loss(**inputs)
    dx = model.backward(criterion.backward()).copy()
    grads = {"x": dx, **{k.replace(".", "__"): model.grads[k].copy() for k in keys}}
    check_vjp(loss, inputs, grads, np.array(1.0))


def _to_torch(model, dtype=torch.float64):
    """The same network in torch, with our parameters copied in."""
    layers = []
    for layer in model:
        if isinstance(layer, Dense):
            t = torch.nn.Linear(layer.in_features, layer.out_features)
        elif isinstance(layer, Conv1d):
            w = layer.params["weight"]
            t = torch.nn.Conv1d(w.shape[1], w.shape[0], w.shape[2], stride=layer._stride[1],
                                padding=layer._padding[1])
        elif isinstance(layer, Conv2d):
            w = layer.params["weight"]
            t = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=layer._stride,
                                padding=layer._padding)
        elif set(layer.params) == {"gamma", "beta"}:             # batch norm, (N, C) or (N, C, *)
            t = torch.nn.BatchNorm1d(layer.params["gamma"].size)   # 1d takes (N, C) and (N, C, L)
            if isinstance(model[0], Conv2d):
                t = torch.nn.BatchNorm2d(layer.params["gamma"].size)
        elif isinstance(layer, GlobalAvgPool):
            t = torch.nn.Sequential(torch.nn.Flatten(2), _Mean())
        else:
            assert not isinstance(layer, Dropout) or layer.p == 0
            t = {ReLU: torch.nn.ReLU, Tanh: torch.nn.Tanh, Sigmoid: torch.nn.Sigmoid,
                 Flatten: torch.nn.Flatten, Dropout: torch.nn.Identity}[type(layer)]()
        layers.append(t.to(dtype))
    net = torch.nn.Sequential(*layers)
    ours = iter(model.params.values())
    with torch.no_grad():
        for p in net.parameters():                     # same order: weight/gamma then bias/beta
            p.copy_(torch.from_numpy(next(ours)))
    return net


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(-1)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_matches_torch_autograd(name):
    build, shape = NETWORKS[name]
    model = build()
    _perturb_params(model)
    net = _to_torch(model)
    x = rng_(2).standard_normal(shape)
    targets = rng_(3).integers(0, 3, shape[0])
    criterion = SoftmaxCrossEntropy()
    logits = model.forward(x, training=True)
    loss = criterion.forward(logits, targets)
    dx = model.backward(criterion.backward())

    tx = torch.tensor(x, requires_grad=True)
    t_logits = net(tx)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(targets))
    t_loss.backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-8, atol=1e-13)
    for (key, grad), p in zip(model.grads.items(), net.parameters()):
        np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-8, atol=1e-13, err_msg=key)


def test_float32_mlp_matches_torch_float32():
    model = _mlp(np.float32)
    net = _to_torch(model, torch.float32)
    x = rng_(2).standard_normal((5, 6)).astype(np.float32)
    logits = model.forward(x, training=True)
    assert logits.dtype == np.float32
    criterion = SoftmaxCrossEntropy()
    criterion.forward(logits, np.arange(5) % 3)
    model.backward(criterion.backward())
    t_loss = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(np.arange(5) % 3))
    t_loss.backward()
    for (key, grad), p in zip(model.grads.items(), net.parameters()):
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, p.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Optimizers and clipping against torch (float64, identical hyperparameters and gradients)
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": (lambda m: SGD(m, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum_wd": (lambda m: SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-2),
                        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "sgd_nesterov": (lambda m: SGD(m, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)),
    "adam": (lambda m: Adam(m, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-2),
             lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-2)),
    "adamw": (lambda m: Adam(m, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
              lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "rmsprop": (lambda m: RMSProp(m, lr=1e-2, alpha=0.9, eps=1e-3, weight_decay=1e-2),
                lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, eps=1e-3, weight_decay=1e-2)),
    "rmsprop_momentum": (lambda m: RMSProp(m, lr=1e-3, momentum=0.9, eps=1e-1),
                         lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, eps=1e-1)),
    "rmsprop_clipped": (lambda m: RMSProp(m, lr=1e-3, max_grad_norm=0.5),
                        lambda p: torch.optim.RMSprop(p, lr=1e-3)),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_matches_torch(name, dtype):
    model = Sequential([Dense(5, 4, rng=0, dtype=dtype), Dense(4, 2, rng=1, dtype=dtype)])
    ours_factory, torch_factory = OPTIMIZERS[name]
    opt = ours_factory(model)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in model.params.values()]
    topt = torch_factory(tparams)
    rng = rng_(4)
    for _ in range(6):
        for grad, tp in zip(model.grads.values(), tparams):
            grad[...] = rng.standard_normal(grad.shape)
            tp.grad = torch.tensor(grad.copy())
        norm = opt.step()
        if opt.max_grad_norm is not None:
            expected = torch.nn.utils.clip_grad_norm_(tparams, opt.max_grad_norm)
            np.testing.assert_allclose(norm, expected.item(), rtol=1e-6)
        topt.step()
    tolerance = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-6, atol=1e-7)
    for (key, p), tp in zip(model.params.items(), tparams):
        assert p.dtype == dtype
        np.testing.assert_allclose(p, tp.detach().numpy(), err_msg=key, **tolerance)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    grads = {"a": rng_(0).standard_normal((3, 4)), "b": rng_(1).standard_normal(5)}
    tensors = [torch.tensor(g.copy()) for g in grads.values()]
    params = [torch.zeros_like(t, requires_grad=True) for t in tensors]
    for p, t in zip(params, tensors):
        p.grad = t
    norm = clip_grad_norm(grads, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm)
    np.testing.assert_allclose(norm, expected.item(), rtol=1e-14)
    for g, p in zip(grads.values(), params):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-14)
    assert (np.sqrt(sum((g ** 2).sum() for g in grads.values())) <= max_norm + 1e-9)


def test_optimizer_takes_a_params_grads_pair_and_refuses_bad_ones():
    p = {"w": np.ones(3)}
    g = {"w": np.full(3, 2.0)}
    SGD((p, g), lr=0.5).step()
    np.testing.assert_array_equal(p["w"], np.zeros(3))
    with pytest.raises(TypeError, match="one dtype"):
        SGD(({"a": np.ones(2), "b": np.ones(2, np.float32)}, {"a": np.ones(2), "b": np.ones(2, np.float32)}), lr=1)
    with pytest.raises(ValueError, match="same keys"):
        SGD(({"a": np.ones(2)}, {"b": np.ones(2)}), lr=1)
    with pytest.raises(ValueError, match="C-contiguous"):
        SGD(({"a": np.ones((2, 2)).T}, {"a": np.ones((2, 2))}), lr=1)
    with pytest.raises(ValueError, match="lr"):
        SGD((p, g), lr=-1)
    with pytest.raises(ValueError, match="nesterov"):
        SGD((p, g), lr=1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        Adam((p, g), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="params and grads"):
        SGD(object(), lr=1)


# ---------------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 32), (16, 8, 3), (8, 4, 3, 3)])
def test_uniform_inits_have_their_bounds(shape):
    receptive = int(np.prod(shape[2:]))
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    for fn, bound in [(init.he_uniform, np.sqrt(6 / fan_in)),
                      (init.glorot_uniform, np.sqrt(6 / (fan_in + fan_out)))]:
        w = fn(shape, rng_(0), scale=2.0)
        assert w.shape == shape and np.abs(w).max() <= 2 * bound
        assert np.abs(w).max() > 1.8 * bound                      # fills the interval
        np.testing.assert_allclose(w.var(), (2 * bound) ** 2 / 3, rtol=0.25)
        np.testing.assert_array_equal(w, fn(shape, rng_(0), scale=2.0))


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 2, 5), (5, 5)])
def test_orthogonal_init_is_orthogonal(shape):
    w = init.orthogonal(shape, rng_(0), scale=0.5)
    flat = w.reshape(shape[0], -1)
    gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
    np.testing.assert_allclose(gram, 0.25 * np.eye(gram.shape[0]), atol=1e-12)


def test_identity_init_matches_torch_eye_and_dirac():
    np.testing.assert_array_equal(init.identity((3, 5), rng_(), scale=2.0),
                                  2 * torch.nn.init.eye_(torch.empty(3, 5)).numpy())
    for shape in [(4, 3, 5), (3, 4, 3, 3)]:
        expected = torch.nn.init.dirac_(torch.empty(shape)).numpy()
        np.testing.assert_array_equal(init.identity(shape, rng_()), expected)


def test_init_refuses_bad_arguments_and_layers_accept_a_callable():
    with pytest.raises(ValueError, match="shape"):
        init.he_uniform((5,), rng_())
    with pytest.raises(TypeError, match="Generator"):
        init.he_uniform((5, 5), 0)
    with pytest.raises(ValueError, match="init must be one of"):
        Dense(3, 2, rng=0, init="xavier")
    layer = Dense(3, 2, rng=0, init=lambda shape, rng, scale: np.full(shape, scale), init_scale=0.5)
    np.testing.assert_array_equal(layer.params["weight"], np.full((2, 3), 0.5, np.float32))
    a, b = Dense(3, 2, rng=7), Dense(3, 2, rng=7)
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])


# ---------------------------------------------------------------------------------------------
# Behaviour checklist
# ---------------------------------------------------------------------------------------------

def test_a_training_step_reuses_every_buffer_and_overwrites_grads():
    model = _mlp(np.float32)
    opt = SGD(model, lr=0.01, momentum=0.9)
    criterion = SoftmaxCrossEntropy()
    x = rng_(1).standard_normal((4, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    params = {k: id(v) for k, v in model.params.items()}
    grads = {k: id(v) for k, v in model.grads.items()}
    outputs = []
    for _ in range(3):
        criterion.forward(model.forward(x, training=True), y)
        outputs.append(id(model.backward(criterion.backward())))
        opt.step()
    assert {k: id(v) for k, v in model.params.items()} == params
    assert {k: id(v) for k, v in model.grads.items()} == grads
    assert len(set(outputs)) == 1
    model.forward(x, training=True)
    first = {k: v.copy() for k, v in model.grads.items()}
    model.backward(criterion.backward())
    second = {k: v.copy() for k, v in model.grads.items()}
    model.backward(criterion.backward())                  # no accumulation
    for key in first:
        np.testing.assert_array_equal(model.grads[key], second[key])


def test_dense_fed_its_own_output_computes_from_a_copy():
    layer = Dense(3, 3, rng=0, **F64)
    x = rng_(1).standard_normal((2, 3))
    first = layer.forward(x, training=True)
    expected_input = first.copy()
    second = layer.forward(first, training=True)
    weight, bias = layer.params["weight"], layer.params["bias"]
    np.testing.assert_allclose(second, expected_input @ weight.T + bias, rtol=1e-14)
    dy = rng_(2).standard_normal((2, 3))
    layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], dy.T @ expected_input, rtol=1e-14)


def test_sequential_names_and_interface():
    model = _cnn2d()
    assert list(model.params) == ["0.weight", "0.bias", "1.gamma", "1.beta", "3.weight", "3.bias",
                                  "4.gamma", "4.beta", "7.weight", "7.bias"]
    assert model.params["0.weight"] is model[0].params["weight"]
    assert model.grads["7.bias"] is model[7].grads["bias"]
    assert model.num_params() == sum(p.size for p in model.params.values())
    nested = Sequential([model, Dense(3, 2, rng=0, **F64)])
    assert "0.0.weight" in nested.params and "1.weight" in nested.params
    with pytest.raises(TypeError, match="lacks"):
        Sequential([Dense(3, 2, rng=0), object()])
    relu = ReLU()
    with pytest.raises(ValueError, match="twice"):
        Sequential([relu, relu])


def test_bad_input_is_refused_and_changes_nothing():
    layer = Dense(4, 3, rng=0, **F64)
    x = rng_(0).standard_normal((2, 4))
    layer.forward(x, training=True)
    dx = layer.backward(np.ones((2, 3))).copy()
    for bad, error in [(np.ones((2, 5)), ValueError), (np.ones(4), ValueError),
                       (np.ones((2, 4), np.float32), TypeError), ([[1.0] * 4], TypeError)]:
        with pytest.raises(error):
            layer.forward(bad, training=True)
    with pytest.raises(TypeError, match="training"):
        layer.forward(x, training=1)
    with pytest.raises(ValueError, match="dy"):
        layer.backward(np.ones((3, 3)))
    np.testing.assert_array_equal(layer.backward(np.ones((2, 3))), dx)   # still the last forward
    with pytest.raises(RuntimeError, match="before forward"):
        ReLU().backward(np.ones(3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        Conv1d(1, 1, 5, rng=0).forward(np.ones((1, 1, 3), np.float32), training=True)
    with pytest.raises(ValueError, match="same"):
        Conv1d(1, 1, 4, padding="same", rng=0)
    with pytest.raises(ValueError, match="p must be"):
        Dropout(1.0, rng=0)
    with pytest.raises(ValueError, match="in_features"):
        Dense(0, 3, rng=0)


def test_dropout_is_deterministic_given_the_seed_and_identity_in_eval():
    x = np.ones((50, 40), np.float32)
    a = Dropout(0.25, rng=3).forward(x, training=True).copy()
    b = Dropout(0.25, rng=3).forward(x, training=True)
    np.testing.assert_array_equal(a, b)
    assert abs((a == 0).mean() - 0.25) < 0.03
    assert Dropout(0.25, rng=3).forward(x, training=False) is x


def test_float32_and_float64_layers_keep_the_dtype():
    for dtype in (np.float32, np.float64):
        model = _cnn1d(dtype)
        x = rng_(0).standard_normal((2, 1, 12)).astype(dtype)
        y = model.forward(x, training=True)
        assert y.dtype == dtype and model.backward(np.ones_like(y)).dtype == dtype


@pytest.mark.skipif(not hasattr(normkit, "make"), reason="normkit.make (issue 7, main) not on this branch yet")
def test_every_norm_drops_into_a_sequential_by_name():
    # (N, C, L) = (6, 4, 5) into the norm; per-name constructor arguments. Batch renorm's backward
    # treats r and d as constants (stop-gradient, by definition), which finite differences of its
    # forward only agree with when the clipping pins them (r_max = 1, d_max = 0).
    arguments = {"group": ((4,), {"num_groups": 2}), "ghost": ((4,), {"virtual_batch_size": 3}),
                 "renorm": ((4,), {"r_max": 1.0, "d_max": 0.0}),
                 "layer": ((), {"normalized_shape": (4, 5)}), "rms": ((), {"normalized_shape": (4, 5)})}
    for name in normkit.available():
        if name.startswith("recurrent"):
            continue
        args, kwargs = arguments.get(name, ((4,), {}))
        norm = normkit.make(name, *args, dtype=np.float64, **kwargs)
        if "tau" in norm.params:    # FRN's TLU at tau = 0 puts values on the ReLU's kink exactly
            norm.params["tau"][...] = -0.5
        model = Sequential([Conv1d(2, 4, 3, padding="same", rng=0, **F64), norm, ReLU(), Flatten(),
                            Dense(20, 2, rng=1, **F64)])
        x = rng_(0).standard_normal((6, 2, 5))
        keys = list(model.params)
        state = {k: np.array(v, copy=True) for k, v in model.state.items()}

        def out(x, **params):
            for key, value in params.items():
                model.params[key.replace("__", ".")][...] = value
            for key, value in state.items():        # each call sees the same running statistics
                model.state[key][...] = value
            return model.forward(x, training=True).copy()

        inputs = {"x": x, **{k.replace(".", "__"): model.params[k].copy() for k in keys}}
        dy = rng_(1).standard_normal((6, 2))
        out(**inputs)
        grads = {"x": model.backward(dy).copy(), **{k.replace(".", "__"): model.grads[k].copy() for k in keys}}
        try:
            check_vjp(out, inputs, grads, dy)
        except GradientMismatch as error:
            raise AssertionError(f"normkit.make({name!r}) in a Sequential: {error}") from None


@pytest.mark.parametrize("make", [lambda rng: Conv1d(3, 4, 5, rng=rng),
                                  lambda rng: Conv2d(2, 3, 3, rng=rng)], ids=["conv1d", "conv2d"])
def test_copied_conv_computes_with_its_own_weights(make):
    import copy
    import pickle

    conv = make(np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(2, conv.in_channels) + (
        (12,) if isinstance(conv, Conv1d) else (6, 6))).astype(np.float32)
    expected = conv.forward(x, training=False)
    for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        np.testing.assert_array_equal(clone.forward(x, training=False), expected)
        clone.params["weight"][...] = 0.0          # the copy's weights drive the copy ...
        assert not clone.forward(x, training=False).any()
        np.testing.assert_array_equal(conv.forward(x, training=False), expected)  # ... only
        clone.backward(np.ones_like(expected))
        assert clone.grads["weight"].any() and not conv.grads["weight"].any()
