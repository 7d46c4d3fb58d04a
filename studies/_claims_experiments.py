"""The experiment behind each claim of the claims study: ``run_<claim>(config) -> metrics``.

Every run is deterministic given ``config.seed``: one ``numpy.random.SeedSequence`` gives the
initialization, the batch order, dropout and the measurement batches their own Generators. The
data set is fixed (data seed 0). Models are normkit.nn Sequentials with normalizers from
``normkit.make`` (through ``normkit.train.build_model`` where its MLP/CNN fits the claim).
"""
from __future__ import annotations

import math
import time

import numpy as np

import normkit
from normkit import train as T
from normkit.data import load_circles_example
from normkit.inference import fold, precise_statistics
from normkit.nn import (SGD, Adam, BinaryCrossEntropy, Dense, Dropout, ReLU, Sequential, Sigmoid,
                        SoftmaxCrossEntropy, Tanh)
from normkit.sweep import Diverged

from _claims_measure import (gradient_norms, internal_covariate_shift, landscape, saturation,
                             stat_errors)

#: MNIST-1D size for the CNN (train 80 %, test 20 %).
MNIST1D_SAMPLES = 4000
#: Claim 2: the test error that counts as "trained" on the digits.
TARGET_ERROR = 0.1
#: Claim 5: the steps along the gradient, as multiples of the learning rate.
LANDSCAPE_STEPS = (0.5, 1.0, 2.0, 4.0)
#: Claims 7 and 8: the epochs whose numbers are kept as columns (the curves).
SATURATION_EPOCHS = (0, 1, 2, 3, 5, 10, 15, 20)
CURVE_EPOCHS = (1, 2, 3, 5, 10, 15, 20, 30, 40, 60, 80, 100)
#: The Keras example's data: scikit-learn's make_circles with these arguments (its default
#: factor), the first CIRCLES_TRAIN points for training, the rest for testing.
CIRCLES = {"n_samples": 1000, "noise": 0.1, "random_state": 1}
CIRCLES_FACTOR = 0.8
CIRCLES_TRAIN = 500
KERAS_ADAM_EPS = 1e-7
#: The digits split of normkit.train (scikit-learn's 1797 digits, a quarter for testing).
DIGITS_TRAIN, DIGITS_TEST = 1347, 450
#: Claim 4: timed repeats (the minimum is kept: the least disturbed by other processes).
TIMED_EPOCHS, INFERENCE_REPEATS = 3, 5


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def _generators(seed: int, count: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def _train_config(config, **overrides) -> T.TrainConfig:
    """The normkit.train config of an MLP on the digits or the CNN on MNIST-1D."""
    cnn = config.model == "cnn"
    fields = dict(dataset="mnist1d" if cnn else "digits", model="cnn1d" if cnn else "mlp",
                  norm=config.norm, widths=None if cnn else (config.width,) * config.depth,
                  num_samples=MNIST1D_SAMPLES if cnn else None, batch_size=config.batch_size,
                  epochs=config.epochs, optimizer=config.optimizer, lr=config.lr,
                  momentum=config.momentum, init_scale=config.init_scale, seed=config.seed,
                  norm_options=_norm_options(config))
    fields.update(overrides)
    return T.TrainConfig(**fields)


def _norm_options(config) -> dict:
    if config.norm == "batch":
        return {"momentum": config.bn_momentum, "eps": config.bn_eps}
    return {}


def _norm(config, width: int):
    options = dict(_norm_options(config), dtype=np.float32)
    return normkit.make(config.norm, width, **options)


def _mlp(config, num_inputs: int, num_outputs: int, rng, *, init="he_uniform",
         last_init=None, dropout_rng=None) -> Sequential:
    """Dense -> [norm, activation] or [activation, norm] (``config.placement``) -> Dropout per
    hidden layer, then Dense(num_outputs). ``config.norm == "none"`` adds no layer."""
    activation = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}[config.activation]
    layers, width_in = [], num_inputs
    for _ in range(config.depth):
        layers.append(Dense(width_in, config.width, rng=rng, init=init,
                            init_scale=config.init_scale))
        block = [activation()]
        if config.norm != "none":
            norm = _norm(config, config.width)
            block = [norm] + block if config.placement == "before" else block + [norm]
        layers += block
        if config.dropout > 0:
            layers.append(Dropout(config.dropout, rng=dropout_rng))
        width_in = config.width
    layers.append(Dense(width_in, num_outputs, rng=rng, init=last_init or init,
                        init_scale=config.init_scale))
    return Sequential(layers)


def _digits(train_size: int = 0):
    x_train, y_train, x_test, y_test = T.load_data(T.TrainConfig(dataset="digits", model="mlp"))
    if train_size:
        x_train, y_train = x_train[:train_size], y_train[:train_size]   # the split is shuffled
    return x_train, y_train, x_test, y_test


def _optimizer(config, model, adam_eps: float = 1e-8):
    if config.optimizer == "adam":
        return Adam(model, config.lr, eps=adam_eps)
    return SGD(model, config.lr, momentum=config.momentum)


def _fit(config, model, data, order_rng, criterion=None, epochs=None, optimizer=None,
         **hooks) -> T.History:
    return T.fit(model, criterion or SoftmaxCrossEntropy(),
                 optimizer or _optimizer(config, model), data, epochs=epochs or config.epochs,
                 batch_size=config.batch_size, rng=order_rng, **hooks)


def _diverged(history: T.History, extra: dict | None = None):
    last = history.last()
    metrics = {k: last[k] for k in ("test_error", "train_error") if k in last}
    raise Diverged({**metrics, **(extra or {})})


def _first_epoch_reaching(errors, target: float, epochs: int) -> int:
    """1-based epoch of the first error <= target; epochs + 1 if never (censored)."""
    for epoch, error in enumerate(errors, start=1):
        if error <= target:
            return epoch
    return epochs + 1


# ---------------------------------------------------------------------------------------------
# 1. Higher learning rates
# ---------------------------------------------------------------------------------------------

def run_learning_rate(config) -> dict:
    """normkit.train.train on the digits MLP or the MNIST-1D CNN at ``config.lr``."""
    result = T.train(_train_config(config))
    metrics = {k: result[k] for k in ("test_error", "train_error") if k in result}
    if result["diverged"]:
        raise Diverged(metrics)
    return metrics


# ---------------------------------------------------------------------------------------------
# 2. Initialization scale
# ---------------------------------------------------------------------------------------------

def run_initialization(config) -> dict:
    """Per-layer gradient norms at init on the first 256 training digits, then training."""
    tc = _train_config(config)
    x_train, y_train, x_test, y_test = T.load_data(tc)
    init_rng, order_rng = _generators(config.seed, 2)
    model = T.build_model(tc, x_train.shape[1:], 10, init_rng)
    criterion = SoftmaxCrossEntropy()
    norms, _ = gradient_norms(model, criterion, x_train[:256], y_train[:256])
    metrics = {f"grad_norm_{i}": float(v) for i, v in enumerate(norms)}
    history = _fit(config, model, (x_train, y_train, x_test, y_test), order_rng, criterion)
    if history.diverged:
        _diverged(history, metrics)
    metrics["test_error"] = history.test_error[-1]
    metrics["train_error"] = history.train_error[-1]
    metrics["epochs_to_target"] = _first_epoch_reaching(history.test_error, TARGET_ERROR,
                                                        config.epochs)
    return metrics


# ---------------------------------------------------------------------------------------------
# 3. Regularization
# ---------------------------------------------------------------------------------------------

def run_regularization(config) -> dict:
    """``config.train_size`` digits, ``config.steps`` updates whatever the batch size."""
    x_train, y_train, x_test, y_test = _digits(config.train_size)
    init_rng, order_rng, dropout_rng = _generators(config.seed, 3)
    model = _mlp(config, x_train.shape[1], 10, init_rng, dropout_rng=dropout_rng)
    epochs = math.ceil(config.steps / (len(x_train) // config.batch_size))
    criterion = SoftmaxCrossEntropy()
    history = _fit(config, model, (x_train, y_train, x_test, y_test), order_rng, criterion,
                   epochs=epochs)
    if history.diverged:
        _diverged(history)
    train_loss, train_error = T.evaluate(model, criterion, x_train, y_train, batch_size=1000)
    test_loss, test_error = T.evaluate(model, criterion, x_test, y_test, batch_size=1000)
    return {"train_error": train_error, "test_error": test_error, "train_loss": train_loss,
            "test_loss": test_loss}


# ---------------------------------------------------------------------------------------------
# 4. Cost
# ---------------------------------------------------------------------------------------------

def _time_epoch(model, criterion, optimizer, x, y, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(len(x) // batch_size):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        criterion.forward(model.forward(x[rows], training=True), y[rows])
        model.backward(criterion.backward())
        optimizer.step()
    return time.perf_counter() - start


def _time_calls(model, x: np.ndarray, calls: int) -> float:
    """Seconds per evaluation-mode forward of ``x``: the minimum over repeats of ``calls``."""
    best = math.inf
    for _ in range(INFERENCE_REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            model.forward(x, training=False)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def run_cost(config) -> dict:
    """Time per training epoch (minimum of TIMED_EPOCHS after one warm-up epoch) and per
    inference call (a batch of 256 test examples, and one example), unfolded and folded."""
    tc = _train_config(config)
    x_train, y_train, x_test, y_test = T.load_data(tc)
    init_rng, order_rng = _generators(config.seed, 2)
    model = T.build_model(tc, x_train.shape[1:], 10, init_rng)
    criterion, optimizer = SoftmaxCrossEntropy(), _optimizer(config, model)
    order = order_rng.permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]
    _time_epoch(model, criterion, optimizer, x_train, y_train, config.batch_size)    # warm-up
    epoch = min(_time_epoch(model, criterion, optimizer, x_train, y_train, config.batch_size)
                for _ in range(TIMED_EPOCHS))
    batch, one = x_test[:256], x_test[:1]
    metrics = {"train_epoch_s": epoch, "infer_batch_s": _time_calls(model, batch, 20),
               "infer_one_s": _time_calls(model, one, 200)}
    if config.norm == "batch":
        folded = fold(model)
        expected = model.forward(x_test, training=False).astype(np.float64)
        got = folded.forward(x_test, training=False).astype(np.float64)
        metrics["fold_error"] = float(np.abs(got - expected).max() / np.abs(expected).max())
        metrics["infer_batch_folded_s"] = _time_calls(folded, batch, 20)
        metrics["infer_one_folded_s"] = _time_calls(folded, one, 200)
    return metrics


# ---------------------------------------------------------------------------------------------
# 5. Internal covariate shift and the landscape
# ---------------------------------------------------------------------------------------------

def run_covariate_shift(config) -> dict:
    """Plain SGD (the update the measurement applies to the preceding layers); at the start of
    every epoch and after the last, ICS per weight layer and the landscape along the gradient
    on a fresh training batch of ``batch_size``; means over those points (``ics_l2``: the raw
    ||G - G'|| averaged over the layers after the first)."""
    tc = _train_config(config)
    x_train, y_train, x_test, y_test = T.load_data(tc)
    init_rng, order_rng, probe_rng = _generators(config.seed, 3)
    model = T.build_model(tc, x_train.shape[1:], 10, init_rng)
    criterion = SoftmaxCrossEntropy()
    points: list[dict] = []

    def measure(_epoch=None, _history=None) -> None:
        rows = probe_rng.choice(len(x_train), config.batch_size, replace=False)
        x, y = x_train[rows], y_train[rows]
        shift = internal_covariate_shift(model, criterion, x, y, config.lr)
        point = landscape(model, criterion, x, y, [config.lr * k for k in LANDSCAPE_STEPS])
        point["ics_l2"] = float(np.mean(shift["l2"][1:]))
        point.update({f"ics_rel_{i}": v for i, v in enumerate(shift["relative"])})
        point.update({f"ics_cos_{i}": v for i, v in enumerate(shift["cosine"])})
        points.append(point)

    history = T.fit(model, criterion, SGD(model, config.lr), (x_train, y_train, x_test, y_test),
                    epochs=config.epochs, batch_size=config.batch_size, rng=order_rng,
                    before_epoch=measure)
    if history.diverged:
        _diverged(history)
    measure()
    metrics = {key: float(np.mean([p[key] for p in points])) for key in points[0]
               if key not in ("ics_rel_0", "ics_cos_0")}           # layer 0: 0 and 1 always
    metrics["test_error"] = history.test_error[-1]
    return metrics


# ---------------------------------------------------------------------------------------------
# 6. Training vs inference
# ---------------------------------------------------------------------------------------------

def run_inference(config) -> dict:
    """Test error with running, precise and batch statistics, and the running statistics'
    error (mean over the batch norms) before and after precise statistics."""
    tc = _train_config(config)
    x_train, y_train, x_test, y_test = T.load_data(tc)
    init_rng, order_rng, pass_rng = _generators(config.seed, 3)
    model = T.build_model(tc, x_train.shape[1:], 10, init_rng)
    criterion = SoftmaxCrossEntropy()
    history = _fit(config, model, (x_train, y_train, x_test, y_test), order_rng, criterion)
    if history.diverged:
        _diverged(history)
    metrics = {
        "test_error": T.evaluate(model, criterion, x_test, y_test, batch_size=1000)[1],
        "test_error_batch": T.evaluate(model, criterion, x_test, y_test,
                                       batch_size=config.batch_size, batch_stats=True)[1],
        "stat_error": float(np.mean(stat_errors(model, x_train))),
    }
    precise_statistics(model, x_train[pass_rng.permutation(len(x_train))], config.batch_size)
    metrics["test_error_precise"] = T.evaluate(model, criterion, x_test, y_test,
                                               batch_size=1000)[1]
    metrics["stat_error_precise"] = float(np.mean(stat_errors(model, x_train)))
    return metrics


# ---------------------------------------------------------------------------------------------
# 7. Saturating nonlinearities
# ---------------------------------------------------------------------------------------------

def run_saturation(config) -> dict:
    """A deep sigmoid/tanh MLP (Glorot init, the usual one for these activations); saturation
    per layer on the first 256 training digits (training-mode forward) at SATURATION_EPOCHS."""
    x_train, y_train, x_test, y_test = _digits()
    init_rng, order_rng = _generators(config.seed, 2)
    model = _mlp(config, x_train.shape[1], 10, init_rng, init="glorot_uniform")
    probe = x_train[:256]
    metrics = {"sat_e000": float(saturation(model, probe).mean())}

    def on_epoch(epoch: int, _history) -> None:
        if epoch + 1 in SATURATION_EPOCHS:
            metrics[f"sat_e{epoch + 1:03d}"] = float(saturation(model, probe).mean())

    history = _fit(config, model, (x_train, y_train, x_test, y_test), order_rng,
                   on_epoch=on_epoch)
    if history.diverged:
        _diverged(history)
    final = saturation(model, probe)
    metrics.update({f"sat_{i}": float(v) for i, v in enumerate(final)})
    metrics["test_error"] = history.test_error[-1]
    metrics["train_error"] = history.train_error[-1]
    return metrics


# ---------------------------------------------------------------------------------------------
# 8. The Keras example
# ---------------------------------------------------------------------------------------------

def run_keras_example(config) -> dict:
    """The Keras example: scikit-learn's circles (CIRCLES, first CIRCLES_TRAIN points train),
    Dense(50, ReLU, He-uniform) [-> BatchNormalization before or after the ReLU] -> Dense(1,
    sigmoid, Glorot-uniform as Keras' default), binary cross-entropy on the logit, Keras' batch
    loop (last partial batch kept). Train accuracy per epoch as Keras reports it (over the
    epoch's batches, training mode); test accuracy in evaluation mode at the end of each epoch.
    Adam with Keras' eps (KERAS_ADAM_EPS)."""
    x_train, y_train, x_test, y_test = load_circles_example(
        **CIRCLES, factor=CIRCLES_FACTOR, n_train=CIRCLES_TRAIN)
    y_train = y_train.astype(np.float32).reshape(-1, 1)                  # (N, 1) targets
    y_test = y_test.astype(np.float32).reshape(-1, 1)
    init_rng, order_rng = _generators(config.seed, 2)
    model = _mlp(config, 2, 1, init_rng, init="he_uniform", last_init="glorot_uniform")
    history = T.fit(model, BinaryCrossEntropy(),
                    _optimizer(config, model, adam_eps=KERAS_ADAM_EPS),
                    (x_train, y_train, x_test, y_test), epochs=config.epochs,
                    batch_size=config.batch_size, rng=order_rng, keep_last_batch=True)
    if history.diverged:
        _diverged(history)
    metrics = {}
    for epoch in CURVE_EPOCHS:
        if epoch <= len(history.epoch):
            metrics[f"train_acc_e{epoch:03d}"] = 1.0 - history.train_error[epoch - 1]
            metrics[f"test_acc_e{epoch:03d}"] = 1.0 - history.test_error[epoch - 1]
    metrics["test_error"] = history.test_error[-1]
    metrics["train_error"] = history.train_error[-1]
    return metrics


RUNS = {
    "learning_rate": run_learning_rate,
    "initialization": run_initialization,
    "regularization": run_regularization,
    "cost": run_cost,
    "covariate_shift": run_covariate_shift,
    "inference": run_inference,
    "saturation": run_saturation,
    "keras_example": run_keras_example,
}
