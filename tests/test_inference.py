"""normkit.inference: folding batch norm into linear layers (against the unfolded model and
torch's fusion utilities) and precise statistics (against NumPy and torch's cumulative average)."""
from __future__ import annotations

import numpy as np
import pytest

import normkit
from normkit.inference import batch_norms, fold, precise_statistics
from normkit.nn import Conv1d, Conv2d, Dense, Dropout, GlobalAvgPool, ReLU, Sequential

torch = pytest.importorskip("torch")


def _randomize_batch_norms(model, seed=1):
    """Statistics and affine parameters far from their initial 0/1, so folding is not trivial."""
    rng = np.random.default_rng(seed)
    for norm in batch_norms(model):
        c = norm.num_features
        norm.state["running_mean"][...] = rng.normal(0, 2, c)
        norm.state["running_var"][...] = rng.uniform(0.05, 4, c)
        if norm.affine:
            norm.params["gamma"][...] = rng.normal(1, 0.5, c)
            norm.params["beta"][...] = rng.normal(0, 1, c)
    for key, value in model.params.items():
        if key.endswith("bias"):
            value[...] = rng.normal(0, 0.5, value.shape)
    return model


def _mlp(dtype, bias=True, norm="batch"):
    rng = np.random.default_rng(0)
    return Sequential([
        Dense(6, 16, rng=rng, bias=bias, dtype=dtype), normkit.make(norm, 16, dtype=dtype), ReLU(),
        Dense(16, 12, rng=rng, dtype=dtype), ReLU(), normkit.make("batch", 12, dtype=dtype),
        Dense(12, 3, rng=rng, dtype=dtype)])


def _cnn1d(dtype):
    rng = np.random.default_rng(0)
    return Sequential([
        Conv1d(2, 8, 5, stride=2, padding=2, rng=rng, bias=False, dtype=dtype),
        normkit.make("batch", 8, dtype=dtype), ReLU(),
        Conv1d(8, 8, 3, padding=1, rng=rng, dtype=dtype), normkit.make("batch", 8, dtype=dtype),
        ReLU(), GlobalAvgPool(), Dense(8, 4, rng=rng, dtype=dtype)])


def _cnn2d(dtype):
    rng = np.random.default_rng(0)
    return Sequential([
        Conv2d(3, 6, (3, 2), stride=(2, 1), padding=1, rng=rng, dtype=dtype),
        normkit.make("batch", 6, dtype=dtype, affine=False), ReLU(), GlobalAvgPool(),
        normkit.make("batch", 6, dtype=dtype), Dense(6, 2, rng=rng, dtype=dtype)])


MODELS = {"mlp": (_mlp, (6,)), "mlp_no_bias": (lambda d: _mlp(d, bias=False), (6,)),
          "renorm": (lambda d: _mlp(d, norm="renorm"), (6,)),
          "cnn1d": (_cnn1d, (2, 20)), "cnn2d": (_cnn2d, (3, 7, 5))}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_folded_model_evaluates_as_the_original(name, dtype, rtol):
    build, shape = MODELS[name]
    model = _randomize_batch_norms(build(dtype))
    x = np.random.default_rng(2).normal(0, 1, (9,) + shape).astype(dtype)
    expected = model.forward(x, training=False).copy()
    params = {k: v.copy() for k, v in model.params.items()}
    state = {k: v.copy() for k, v in model.state.items()}

    folded = fold(model)

    assert not batch_norms(folded)
    got = folded.forward(x, training=False)
    assert got.dtype == dtype
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * scale)
    for key, value in params.items():                     # the original is untouched
        np.testing.assert_array_equal(model.params[key], value)
    for key, value in state.items():
        np.testing.assert_array_equal(model.state[key], value)
    np.testing.assert_array_equal(model.forward(x, training=False), expected)


def test_folded_weights_match_torch_fusion():
    model = _randomize_batch_norms(_mlp(np.float64))
    folded = fold(model)
    dense, norm = model[0], model[1]
    weight, bias = torch.nn.utils.fusion.fuse_linear_bn_weights(
        *(torch.from_numpy(a) for a in (dense.params["weight"], dense.params["bias"],
                                        norm.state["running_mean"], norm.state["running_var"])),
        norm.eps, torch.from_numpy(norm.params["gamma"]), torch.from_numpy(norm.params["beta"]))
    np.testing.assert_allclose(folded[0].params["weight"], weight.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(folded[0].params["bias"], bias.detach().numpy(), rtol=1e-13,
                               atol=1e-14)

    cnn = _randomize_batch_norms(_cnn1d(np.float64))
    conv, norm = cnn[0], cnn[1]
    weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
        torch.from_numpy(conv.params["weight"]), None,
        *(torch.from_numpy(a) for a in (norm.state["running_mean"], norm.state["running_var"])),
        norm.eps, torch.from_numpy(norm.params["gamma"]), torch.from_numpy(norm.params["beta"]))
    folded = fold(cnn)
    np.testing.assert_allclose(folded[0].params["weight"], weight.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(folded[0].params["bias"], bias.detach().numpy(), rtol=1e-13,
                               atol=1e-14)


def test_fold_into_the_next_dense_when_nothing_linear_precedes():
    model = _randomize_batch_norms(_mlp(np.float64))     # [4] ReLU, [5] batch, [6] Dense
    folded = fold(model)
    assert [type(layer).__name__ for layer in folded] == ["Dense", "ReLU", "Dense", "ReLU", "Dense"]
    norm, dense = model[5], model[6]
    s = norm.params["gamma"] / np.sqrt(norm.state["running_var"] + norm.eps)
    t = norm.params["beta"] - s * norm.state["running_mean"]
    np.testing.assert_allclose(folded[4].params["weight"], dense.params["weight"] * s, rtol=1e-14)
    np.testing.assert_allclose(folded[4].params["bias"],
                               dense.params["weight"] @ t + dense.params["bias"], rtol=1e-12)


def test_nested_sequentials_are_folded():
    rng = np.random.default_rng(0)
    inner = Sequential([Dense(4, 5, rng=rng, dtype=np.float64), normkit.make("batch", 5, dtype=np.float64)])
    model = _randomize_batch_norms(Sequential([inner, ReLU(), Dense(5, 2, rng=rng, dtype=np.float64)]))
    x = rng.normal(size=(3, 4))
    expected = model.forward(x, training=False).copy()
    folded = fold(model)
    assert not batch_norms(folded)
    np.testing.assert_allclose(folded.forward(x, training=False), expected, rtol=1e-12)


@pytest.mark.parametrize("layers, words", [
    (lambda r: [Dense(3, 4, rng=r), ReLU(), normkit.make("batch", 4)], "[2] (BatchNorm)"),
    (lambda r: [Conv1d(1, 4, 3, rng=r), ReLU(), normkit.make("batch", 4),
                Conv1d(4, 4, 3, padding=1, rng=r)], "[2] (BatchNorm)"),
    (lambda r: [Dense(3, 4, rng=r), normkit.make("batch", 4, track_running_stats=False)],
     "track_running_stats=False"),
])
def test_unfoldable_batch_norms_are_refused(layers, words):
    model = Sequential(layers(np.random.default_rng(0)))
    with pytest.raises(ValueError) as error:
        fold(model)
    assert words in str(error.value)


def test_fold_refuses_what_is_not_a_sequential():
    with pytest.raises(TypeError, match="Sequential"):
        fold([Dense(2, 2, rng=0)])


# ---------------------------------------------------------------------------------------------
# Precise statistics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(50, 3), (50, 3, 4)])
def test_precise_statistics_average_batch_means_and_unbiased_variances(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, shape) * rng.uniform(0.5, 2, shape[1]).reshape((1, -1) + (1,) * (len(shape) - 2))
    norm = normkit.make("batch", shape[1], dtype=np.float64)
    norm.forward(x[:8], training=True)                        # some history to be replaced
    tracked = int(norm.state["num_batches_tracked"])

    assert precise_statistics(Sequential([norm]), x, batch_size=8) == 6   # 50 // 8; 2 rows left out

    axes = (0,) + tuple(range(2, len(shape)))
    batches = [x[i:i + 8] for i in range(0, 48, 8)]
    np.testing.assert_allclose(norm.state["running_mean"],
                               np.mean([b.mean(axis=axes) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.state["running_var"],
                               np.mean([b.var(axis=axes, ddof=1) for b in batches], axis=0),
                               rtol=1e-12)
    assert int(norm.state["num_batches_tracked"]) == tracked
    assert norm.running_average == "exponential" and norm.momentum == 0.1


def _torch_twin(model):
    """The same MLP in torch, its batch norms averaging cumulatively (momentum=None)."""
    modules = []
    for layer in model:
        if isinstance(layer, Dense):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(layer.params["weight"]))
                linear.bias.copy_(torch.from_numpy(layer.params["bias"]))
            modules.append(linear)
        elif isinstance(layer, normkit.BatchNorm):
            bn = torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=None,
                                      dtype=torch.float64)
            with torch.no_grad():
                bn.weight.copy_(torch.from_numpy(layer.params["gamma"]))
                bn.bias.copy_(torch.from_numpy(layer.params["beta"]))
            modules.append(bn)
        elif isinstance(layer, ReLU):
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def test_precise_statistics_match_torch_cumulative_average_through_a_network():
    rng = np.random.default_rng(0)
    model = _randomize_batch_norms(Sequential([
        Dense(5, 7, rng=rng, dtype=np.float64), normkit.make("batch", 7, dtype=np.float64), ReLU(),
        Dense(7, 6, rng=rng, dtype=np.float64), normkit.make("batch", 6, dtype=np.float64), ReLU(),
        Dense(6, 2, rng=rng, dtype=np.float64)]))
    x = rng.normal(1, 2, (64, 5))
    twin = _torch_twin(model).train()
    with torch.no_grad():
        for start in range(0, 64, 16):
            twin(torch.from_numpy(x[start:start + 16]))

    assert precise_statistics(model, x, batch_size=16) == 4

    torch_norms = [m for m in twin if isinstance(m, torch.nn.BatchNorm1d)]
    for ours, theirs in zip(batch_norms(model), torch_norms):
        np.testing.assert_allclose(ours.state["running_mean"], theirs.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours.state["running_var"], theirs.running_var.numpy(), rtol=1e-12)


def test_precise_statistics_pass_runs_dropout_in_evaluation_mode():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))

    def model(with_dropout):
        r = np.random.default_rng(1)
        layers = [Dense(4, 6, rng=r, dtype=np.float64)]
        layers += [Dropout(0.5, rng=2)] if with_dropout else []
        return Sequential(layers + [normkit.make("batch", 6, dtype=np.float64)])

    plain, dropped = model(False), model(True)
    precise_statistics(plain, x, batch_size=10)
    precise_statistics(dropped, x, batch_size=10)
    np.testing.assert_array_equal(plain.state["1.running_var"], dropped.state["2.running_var"])


def test_precise_statistics_leave_renorm_limits_and_remove_the_lag():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (64, 3))
    renorm = normkit.make("renorm", 3, dtype=np.float64, r_max=2.0, d_max=1.0, momentum=0.01)
    model = Sequential([renorm])
    for start in range(0, 64, 16):                        # momentum 0.01: far from the data's stats
        model.forward(x[start:start + 16], training=True)
    assert np.abs(renorm.state["running_mean"] - 5).max() > 3
    precise_statistics(model, x, batch_size=16)
    np.testing.assert_allclose(renorm.state["running_mean"], x.mean(axis=0), rtol=1e-12)
    assert (renorm.r_max, renorm.d_max, renorm.running_average) == (2.0, 1.0, "exponential")


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x: precise_statistics(m, x, 0), ValueError, "batch_size"),
    (lambda m, x: precise_statistics(m, x, 2.0), ValueError, "batch_size"),
    (lambda m, x: precise_statistics(m, x[:3], 4), ValueError, "fewer than one batch"),
    (lambda m, x: precise_statistics(m, list(x), 4), TypeError, "x must be"),
    (lambda m, x: precise_statistics(list(m), x, 4), TypeError, "Sequential"),
    (lambda m, x: precise_statistics(m, x, 1), ValueError, "more than 1 value"),
    (lambda m, x: precise_statistics(m, x, 6), ValueError, "virtual_batch_size"),
])
def test_refused_or_failed_calls_change_no_state(call, error, words):
    rng = np.random.default_rng(0)
    model = Sequential([Dense(3, 4, rng=rng, dtype=np.float64),
                        normkit.make("batch", 4, dtype=np.float64),
                        normkit.make("ghost", 4, 4, dtype=np.float64)])
    x = rng.normal(size=(20, 3))
    model.forward(x[:8], training=True)
    before = {k: v.copy() for k, v in model.state.items()}
    with pytest.raises(error, match=words):
        call(model, x)
    for key, value in before.items():
        np.testing.assert_array_equal(model.state[key], value)
    assert all(n.running_average == "exponential" for n in batch_norms(model))


def test_a_model_without_batch_norm_is_left_alone():
    model = Sequential([Dense(3, 2, rng=0), normkit.make("layer", 2)])
    assert precise_statistics(model, np.zeros((8, 3), np.float32), 4) == 0
