"""normkit.train: determinism, divergence, learning, the model builder's norm mapping, the
batch-statistics evaluation (state untouched, against a deep-copy oracle), stat_error (against
population statistics computed here), the renorm schedule and the config checks."""
from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np
import pytest

import normkit
from normkit import train as T
from normkit.nn import SGD, Conv1d, Dense, ReLU, Sequential, SoftmaxCrossEntropy

pytest.importorskip("sklearn")

# The digits MLP is the cheap case: 1347 training images, one epoch in well under a second.
DIGITS = T.TrainConfig(dataset="digits", model="mlp", norm="batch", batch_size=16, epochs=1,
                       lr=0.05)
# A small MNIST-1D CNN: 160 training signals.
MNIST1D = T.TrainConfig(dataset="mnist1d", model="cnn1d", norm="batch", num_samples=200,
                        batch_size=8, epochs=2, lr=0.05)


def without_timing(metrics: dict) -> dict:
    metrics = dict(metrics)
    metrics.pop("seconds")
    history = dict(metrics.pop("history"))
    history.pop("seconds")
    return {**metrics, "history": history}


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [DIGITS, dataclasses.replace(MNIST1D, norm="renorm")],
                         ids=["mlp-batch", "cnn1d-renorm"])
def test_same_seed_gives_identical_metrics_and_another_seed_does_not(config):
    first, second = T.train(config), T.train(config)
    assert without_timing(first) == without_timing(second)
    other = T.train(dataclasses.replace(config, seed=1))
    assert other["history"]["train_loss"] != first["history"]["train_loss"]


def test_a_tiny_run_learns():
    metrics = T.train(dataclasses.replace(DIGITS, epochs=2))
    assert not metrics["diverged"]
    assert metrics["test_error"] < 0.15            # chance is 0.9
    assert metrics["train_error"] < 0.1
    assert metrics["history"]["train_loss"][1] < metrics["history"]["train_loss"][0]
    assert metrics["epochs_run"] == 2
    assert metrics["steps"] == 2 * (1347 // 16)      # the incomplete last batch is dropped


def test_a_huge_learning_rate_is_recorded_as_diverged_not_raised():
    metrics = T.train(dataclasses.replace(DIGITS, norm="none", lr=1e4, epochs=2))
    assert metrics["diverged"] is True
    assert metrics["epochs_run"] == 0 and metrics["history"]["test_error"] == []
    assert "test_error" not in metrics and "stat_error" not in metrics
    assert metrics["steps"] < 1347 // 16


def test_divergence_keeps_the_last_finished_epochs_numbers():
    data = T.load_data(DIGITS)
    model = T.build_model(DIGITS, data[0].shape[1:], 10, np.random.default_rng(0))
    optimizer = SGD(model, lr=0.05, momentum=0.9)

    def blow_up(epoch, history):                   # after epoch 0: make the next step diverge
        model.params["0.weight"][...] = np.inf

    history = T.fit(model, SoftmaxCrossEntropy(), optimizer, data, epochs=3, batch_size=16,
                    rng=np.random.default_rng(0), on_epoch=blow_up)
    assert history.diverged and history.epoch == [0]
    assert history.steps == 1347 // 16
    assert history.last()["test_error"] == history.test_error[0] < 0.5


def test_a_normalizer_refusing_non_finite_parameters_counts_as_divergence():
    data = T.load_data(DIGITS)
    model = T.build_model(DIGITS, data[0].shape[1:], 10, np.random.default_rng(0))
    model.params["1.gamma"][0] = np.nan            # batch norm raises ValueError on it
    history = T.fit(model, SoftmaxCrossEntropy(), SGD(model, lr=0.05), data, epochs=1,
                    batch_size=16, rng=np.random.default_rng(0))
    assert history.diverged and history.steps == 0


def test_other_value_errors_in_the_loop_are_raised():
    data = T.load_data(DIGITS)
    model = T.build_model(DIGITS, data[0].shape[1:], 10, np.random.default_rng(0))
    bad = (data[0][:, :10], data[1], data[2], data[3])                  # 10 features, not 64
    with pytest.raises(ValueError, match="x must be"):
        T.fit(model, SoftmaxCrossEntropy(), SGD(model, lr=0.05), bad, epochs=1, batch_size=16,
              rng=np.random.default_rng(0))


def test_lr_schedule_and_hooks_are_called_in_order():
    data = T.load_data(DIGITS)
    small = (data[0][:64], data[1][:64], data[2][:32], data[3][:32])
    model = T.build_model(DIGITS, (64,), 10, np.random.default_rng(0))
    optimizer = SGD(model, lr=1.0)
    seen, lrs = [], []

    def schedule(progress):
        lrs.append(progress)
        return 0.01 * (1 - progress)

    T.fit(model, SoftmaxCrossEntropy(), optimizer, small, epochs=2, batch_size=16,
          rng=np.random.default_rng(0), lr_schedule=schedule,
          before_epoch=lambda e: seen.append(("before", e)),
          on_epoch=lambda e, h: seen.append(("after", e, len(h.epoch))))
    assert lrs == [i / 8 for i in range(8)]
    assert optimizer.lr == pytest.approx(0.01 / 8)
    assert seen == [("before", 0), ("after", 0, 1), ("before", 1), ("after", 1, 2)]


def test_cosine_schedule_runs_and_differs_from_constant():
    constant = T.train(DIGITS)
    cosine = T.train(dataclasses.replace(DIGITS, lr_schedule="cosine"))
    assert cosine["history"]["train_loss"] != constant["history"]["train_loss"]


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_other_optimizers_learn(optimizer):
    config = dataclasses.replace(DIGITS, optimizer=optimizer, lr=1e-3, momentum=0.0)
    assert T.train(config)["test_error"] < 0.3


def test_renorm_in_its_first_epoch_is_batch_norm_bit_for_bit():
    batch = T.train(dataclasses.replace(DIGITS, epochs=1))
    renorm = T.train(dataclasses.replace(DIGITS, norm="renorm", epochs=1))
    assert without_timing(batch) == without_timing(renorm)


# ---------------------------------------------------------------------------------------------
# Not applicable, config checks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    (dict(norm="batch", batch_size=1), "one value per channel"),
    (dict(norm="renorm", batch_size=1), "one value per channel"),
    (dict(norm="ghost", batch_size=6), "does not divide"),
    (dict(norm="ghost", batch_size=4, virtual_batch_size=1), "one value per channel"),
    (dict(norm="instance"), "spatial axes"),
])
def test_configs_that_cannot_train_raise_not_applicable(changes, words):
    config = dataclasses.replace(DIGITS, **changes)
    assert words in T.not_applicable_reason(config)
    with pytest.raises(T.NotApplicable, match=words):
        T.train(config)


def test_batch_norm_on_one_signal_of_a_cnn_is_applicable():
    config = dataclasses.replace(MNIST1D, batch_size=1, epochs=1)
    assert T.not_applicable_reason(config) is None
    assert not T.train(config)["diverged"]


@pytest.mark.parametrize("changes, words", [
    (dict(dataset="cifar"), "dataset must be one of"),
    (dict(norm="weight"), "norm must be one of"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(epochs=1.5), "epochs must be an int"),
    (dict(lr=0.0), "lr must be a number in (0.0"),
    (dict(lr=math.nan), "lr must be a number"),
    (dict(momentum=1.5), "momentum must be a number in [0.0, 1.0]"),
    (dict(optimizer="lbfgs"), "optimizer must be one of"),
    (dict(widths=()), "widths must be a non-empty tuple"),
    (dict(renorm_warmup=0.6, renorm_ramp_end=0.5), "renorm_ramp_end must be a number in [0.6"),
    (dict(norm_options=[("eps", 1e-3)]), "norm_options must be a dict"),
])
def test_bad_configs_are_refused_with_the_field_named(changes, words):
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        dataclasses.replace(DIGITS, **changes)


def test_digits_has_no_num_samples():
    with pytest.raises(ValueError, match="num_samples must be None for the digits"):
        T.train(dataclasses.replace(DIGITS, num_samples=100))


def test_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(ValueError, match="larger than the training set"):
        T.train(dataclasses.replace(MNIST1D, batch_size=256))


# ---------------------------------------------------------------------------------------------
# build_model / make_norm
# ---------------------------------------------------------------------------------------------

def norms_of(model):
    return [layer for layer in model if isinstance(layer, normkit.Norm)]


@pytest.mark.parametrize("base", ["mnist1d", "digits"])
def test_no_norm_means_no_layer_not_an_identity(base):
    config = dataclasses.replace(MNIST1D if base == "mnist1d" else DIGITS, norm="none")
    shape = (1, 40) if base == "mnist1d" else (64,)
    model = T.build_model(config, shape, 10, np.random.default_rng(0))
    assert norms_of(model) == []
    first = "Conv1d" if base == "mnist1d" else "Dense"
    assert [type(layer).__name__ for layer in model][:2] == [first, "ReLU"]


@pytest.mark.parametrize("norm, cls, shape", [
    ("batch", normkit.BatchNorm, None), ("ghost", normkit.GhostBatchNorm, None),
    ("renorm", normkit.BatchRenorm, None), ("group", normkit.GroupNorm, None),
    ("layer", normkit.GroupNorm, None), ("rms", normkit.RMSNorm, (32, 20)),
    ("instance", normkit.InstanceNorm, None),
])
def test_cnn_gets_the_norm_after_every_convolution(norm, cls, shape):
    config = dataclasses.replace(MNIST1D, norm=norm)
    model = T.build_model(config, (1, 40), 10, np.random.default_rng(0))
    norms = norms_of(model)
    assert len(norms) == 3 and all(type(n) is cls for n in norms)
    assert [type(layer).__name__ for layer in model][:3] == ["Conv1d", cls.__name__, "ReLU"]
    if norm == "layer":
        assert all(n.num_groups == 1 for n in norms)            # over (C, L), per-channel affine
    if norm == "group":
        assert all(n.num_groups == 8 for n in norms)
    if shape:
        assert [n.normalized_shape for n in norms] == [(32, 20), (32, 10), (32, 5)]
    out = model.forward(np.zeros((4, 1, 40), np.float32) + np.arange(40, dtype=np.float32),
                        training=True)
    assert out.shape == (4, 10)


def test_renorm_starts_as_batch_norm():
    model = T.build_model(dataclasses.replace(MNIST1D, norm="renorm"), (1, 40), 10,
                          np.random.default_rng(0))
    assert all((n.r_max, n.d_max) == (1.0, 0.0) for n in norms_of(model))


def test_mlp_group_norm_normalizes_groups_of_units():
    config = dataclasses.replace(DIGITS, norm="group", num_groups=4, widths=(8,))
    model = T.build_model(config, (5,), 3, np.random.default_rng(0))
    dense, norm = model[0], model[1]
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    h = (x @ dense.params["weight"].T + dense.params["bias"]).astype(np.float64)    # (3, 8)
    groups = h.reshape(3, 4, 2)
    expected = (groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True)
                                                                   + norm.eps)
    got = norm.forward(dense.forward(x, training=True), training=True)
    np.testing.assert_allclose(got, expected.reshape(3, 8), rtol=1e-4, atol=1e-5)


def test_mlp_layer_and_rms_norm_over_the_units():
    for norm, cls in (("layer", normkit.LayerNorm), ("rms", normkit.RMSNorm)):
        model = T.build_model(dataclasses.replace(DIGITS, norm=norm), (64,), 10,
                              np.random.default_rng(0))
        assert [n.normalized_shape for n in norms_of(model)] == [(128,), (128,)]
        assert all(type(n) is cls for n in norms_of(model))


def test_norm_options_reach_normkit_make():
    config = dataclasses.replace(DIGITS, norm_options={"eps": 1e-3, "momentum": 0.5})
    model = T.build_model(config, (64,), 10, np.random.default_rng(0))
    assert all((n.eps, n.momentum) == (1e-3, 0.5) for n in norms_of(model))


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def trained_model(norm="batch", batch_size=8, steps=30):
    rng = np.random.default_rng(0)
    model = Sequential([Dense(6, 8, rng=rng), normkit.make(norm, 8, **(
        {"virtual_batch_size": 4} if norm == "ghost" else {})), ReLU(), Dense(8, 3, rng=rng)])
    x = rng.standard_normal((203, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)
    criterion, optimizer = SoftmaxCrossEntropy(), SGD(model, lr=0.1, momentum=0.9)
    for step in range(steps):
        rows = slice(step * batch_size % 192, step * batch_size % 192 + batch_size)
        criterion.forward(model.forward(x[rows], training=True), y[rows])
        model.backward(criterion.backward())
        optimizer.step()
    return model, criterion, x, y


def batch_stats_oracle(model, x, y, batch_size):
    """Each batch through a fresh deep copy of the model in training mode; wrap-around fill."""
    n, wrong, loss = len(x), 0, 0.0
    for start in range(0, n, batch_size):
        rows = (start + np.arange(batch_size)) % n
        counted = min(batch_size, n - start)
        logits = copy.deepcopy(model).forward(x[rows], training=True)[:counted]
        wrong += int((logits.argmax(1) != y[rows][:counted]).sum())
        shifted = logits - logits.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        loss -= log_probs[np.arange(counted), y[rows][:counted]].sum()
    return loss / n, wrong / n


@pytest.mark.parametrize("norm, batch_size", [("batch", 8), ("batch", 2), ("ghost", 8),
                                              ("renorm", 4)])
def test_batch_stats_evaluation_matches_fresh_copies_and_leaves_the_state(norm, batch_size):
    model, criterion, x, y = trained_model(norm)
    if norm == "renorm":
        model[1].r_max, model[1].d_max = 1.5, 0.5       # r, d depend on the running stats
    state = {k: v.copy() for k, v in model.state.items()}
    eval_before = T.evaluate(model, criterion, x, y, batch_size=50)
    got = T.evaluate(model, criterion, x, y, batch_size=batch_size, batch_stats=True)
    expected = batch_stats_oracle(model, x, y, batch_size)
    assert got[1] == expected[1]
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    for key, value in model.state.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    assert T.evaluate(model, criterion, x, y, batch_size=50) == eval_before
    assert got != eval_before                         # batch statistics do differ here


def test_evaluation_mode_matches_a_plain_forward():
    model, criterion, x, y = trained_model()
    logits = copy.deepcopy(model).forward(x, training=False)
    loss, error = T.evaluate(model, criterion, x, y, batch_size=64)
    assert error == np.mean(logits.argmax(1) != y)
    assert loss == pytest.approx(SoftmaxCrossEntropy().forward(logits, y), rel=1e-5)


def test_batch_stats_without_running_stats_is_evaluation_mode():
    model, criterion, x, y = trained_model("layer")
    assert T.evaluate(model, criterion, x, y, batch_size=4, batch_stats=True) == \
        pytest.approx(T.evaluate(model, criterion, x, y, batch_size=64), rel=1e-6)


def test_classification_errors_binary_and_multiclass():
    assert T.classification_errors(np.array([[0.1, 0.9], [2.0, 1.0]]), np.array([1, 1])) == 1
    assert T.classification_errors(np.array([[-1.0], [3.0]]), np.array([0, 0])) == 1


# ---------------------------------------------------------------------------------------------
# stat_error
# ---------------------------------------------------------------------------------------------

def population_stats_of_first_norm_input(model, x):
    dense = model[0]
    h = x.astype(np.float64) @ dense.params["weight"].T.astype(np.float64) + dense.params["bias"]
    return h.mean(0), h.var(0, ddof=1)


def test_stat_error_is_zero_at_the_population_statistics_and_grows_away_from_them():
    model, _, x, _ = trained_model()
    mean, var = population_stats_of_first_norm_input(model, x)
    norm = model[1]
    norm.state["running_mean"][...] = mean
    norm.state["running_var"][...] = var
    assert T.stat_error(model, x) == pytest.approx(0.0, abs=1e-5)
    norm.state["running_mean"][...] = mean + np.sqrt(var + norm.eps)    # one std off: 1
    assert T.stat_error(model, x) == pytest.approx(1.0, rel=1e-4)
    norm.state["running_mean"][...] = mean
    norm.state["running_var"][...] = 2 * var + norm.eps               # ratio 2: 1
    assert T.stat_error(model, x) == pytest.approx(1.0, rel=1e-4)


def test_stat_error_on_a_convolution_uses_every_position():
    rng = np.random.default_rng(0)
    conv = Conv1d(1, 4, 3, padding=1, rng=rng)
    model = Sequential([conv, normkit.make("batch", 4), ReLU()])
    x = rng.standard_normal((50, 1, 12)).astype(np.float32) + 2
    h = copy.deepcopy(conv).forward(x, training=False).astype(np.float64)     # (50, 4, 12)
    model[1].state["running_mean"][...] = h.mean((0, 2))
    model[1].state["running_var"][...] = h.var((0, 2), ddof=1)
    assert T.stat_error(model, x, batch_size=7) == pytest.approx(0.0, abs=1e-5)


def test_stat_error_is_none_without_running_statistics():
    model, _, x, _ = trained_model("layer")
    assert T.stat_error(model, x) is None


# ---------------------------------------------------------------------------------------------
# The renorm schedule
# ---------------------------------------------------------------------------------------------

def test_renorm_limits_ten_epochs():
    limits = [T.renorm_limits(e, 10) for e in range(10)]
    np.testing.assert_allclose([r for r, _ in limits], [1, 1.4, 1.8, 2.2, 2.6, 3, 3, 3, 3, 3])
    np.testing.assert_allclose([d for _, d in limits], [0, 1, 2, 3, 4, 5, 5, 5, 5, 5])


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 20])
def test_renorm_limits_start_at_batch_norm_and_reach_the_maximum(epochs):
    limits = [T.renorm_limits(e, epochs) for e in range(epochs)]
    assert limits[0] == (1.0, 0.0)
    if epochs > 1:
        assert limits[-1] == (3.0, 5.0)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(limits, limits[1:]))


def test_train_applies_the_renorm_schedule_every_epoch(monkeypatch):
    seen = []
    original = T._renorm_schedule

    def spy(config, model):
        before_epoch = original(config, model)
        renorms = [layer for layer in model if isinstance(layer, normkit.BatchRenorm)]

        def wrapped(epoch):
            before_epoch(epoch)
            seen.append((epoch, {(n.r_max, n.d_max) for n in renorms}))
        return wrapped

    monkeypatch.setattr(T, "_renorm_schedule", spy)
    T.train(dataclasses.replace(MNIST1D, norm="renorm", epochs=4))
    assert seen == [(e, {T.renorm_limits(e, 4)}) for e in range(4)]


class _CountingCriterion(SoftmaxCrossEntropy):
    """Records the size of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, logits, targets):
        self.sizes.append(len(targets))
        return super().forward(logits, targets)


@pytest.mark.parametrize("keep", [False, True])
def test_keep_last_batch_trains_on_the_remainder_as_keras_does(keep):
    """70 examples, batch 16: four full batches, and with keep_last_batch a fifth of 6; the
    epoch's train loss and error are means over the examples it trained on."""
    data = T.load_data(DIGITS)
    small = (data[0][:70], data[1][:70], data[2][:32], data[3][:32])
    model = T.build_model(DIGITS, (64,), 10, np.random.default_rng(0))
    criterion = _CountingCriterion()
    history = T.fit(model, criterion, SGD(model, lr=0.01), small, epochs=1, batch_size=16,
                    rng=np.random.default_rng(0), keep_last_batch=keep)
    train_sizes = criterion.sizes[:5 if keep else 4]               # then evaluation batches
    assert train_sizes == ([16, 16, 16, 16, 6] if keep else [16, 16, 16, 16])
    assert history.steps == len(train_sizes)
    seen = sum(train_sizes)
    assert 0 <= history.train_error[0] * seen <= seen
    assert history.train_error[0] * seen == pytest.approx(round(history.train_error[0] * seen))
    with pytest.raises(TypeError, match="keep_last_batch"):
        T.fit(model, criterion, SGD(model, lr=0.01), small, epochs=1, batch_size=16,
              rng=np.random.default_rng(0), keep_last_batch="yes")
