"""One training run: a config in, per-epoch curves and final metrics out.

    from normkit.train import TrainConfig, train
    metrics = train(TrainConfig(dataset="mnist1d", model="cnn1d", norm="group", batch_size=8))
    metrics["test_error"], metrics["history"]["test_error"], metrics["diverged"]

The pieces, for studies that build their own model (an RNN, another loss):

- :func:`build_model` — ``"mlp"`` or ``"cnn1d"`` with a normalizer after every hidden layer,
  chosen by name through :func:`normkit.make` (see :func:`make_norm` for what each name means
  after a Dense and after a convolution).
- :func:`fit` — the loop: shuffles with the Generator it is given, drops the last incomplete
  batch of every epoch (so every step sees ``batch_size`` examples), records the per-epoch
  curves, and stops with ``diverged=True`` at the first non-finite training loss (or parameter),
  keeping the curves of the epochs that finished.
- :func:`evaluate` — loss and error in evaluation mode (running statistics), or with batch
  statistics on test batches of a given size without changing the model's state.
- :func:`stat_error` — how far the first normalizer's running statistics are from the true
  statistics of its input over a data set.

Everything is deterministic given ``seed``: one ``numpy.random.SeedSequence`` gives the init and
the shuffling their own Generators, and :func:`train` runs with one BLAS and one Numba thread
(``threads``), which also keeps parallel sweep workers from fighting over the cores.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from . import data as _data
from . import norms as _norms
from .nn import (SGD, Adam, Conv1d, Dense, GlobalAvgPool, ReLU, RMSProp, Sequential,
                 SoftmaxCrossEntropy)
from .nn import init as _init

__all__ = [
    "TrainConfig", "History", "NotApplicable", "train", "fit", "evaluate", "stat_error",
    "build_model", "make_norm", "load_data", "make_optimizer", "renorm_limits",
    "classification_errors", "not_applicable_reason",
]

DATASETS = ("mnist1d", "digits", "circles")
MODELS = ("mlp", "cnn1d")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_WIDTHS = {"mlp": (128, 128), "cnn1d": (32, 32, 32)}
#: Norms that normalize with statistics over the batch in training.
BATCH_STAT_NORMS = ("batch", "renorm", "ghost")
#: Normalization-activation layers: they replace "norm + ReLU", so no ReLU follows them.
NORM_ACTIVATIONS = ("frn", "evonorm_s0", "evonorm_b0")
#: Norm names that are not a single normalizer: "gn+ws" is group norm after layers with weight
#: standardization (Qiao et al., 2019).
COMPOSITE_NORMS = ("gn+ws",)
#: Norms whose statistics need spatial axes (more than one value per sample and channel).
SPATIAL_NORMS = ("instance", "evonorm_b0", "switchable")


class NotApplicable(ValueError):
    """The config cannot train at all (e.g. batch norm on one value per channel)."""


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one run depends on; every field has a default.

    - ``widths``: hidden sizes of the MLP or channels of the CNN's convolutions; None -> (128,
      128) for "mlp", (32, 32, 32) for "cnn1d". The CNN's convolutions have ``kernel_size`` and
      ``conv_stride``, padding ``kernel_size // 2``.
    - ``norm`` and ``norm_options`` (extra keyword arguments for :func:`normkit.make`);
      ``num_groups`` is group norm's G, ``virtual_batch_size`` ghost batch norm's.
    - Batch renormalization follows :func:`renorm_limits`: plain batch norm for the first
      ``renorm_warmup`` of the epochs, then r_max/d_max ramped linearly to ``renorm_r_max``/
      ``renorm_d_max``, reached at ``renorm_ramp_end`` of the epochs.
    - ``optimizer``: "sgd" (``momentum``, Nesterov off), "adam" (``adam_betas``; momentum is not
      used) or "rmsprop" (``momentum``); ``weight_decay`` is L2 in the gradient;
      ``max_grad_norm`` clips the global gradient norm.
    - ``lr_schedule``: "constant" or "cosine" (from ``lr`` to 0 over all steps).
    - ``num_samples``: the data set size where the generator takes one (MNIST-1D: train + test,
      a multiple of 10, default 5000; circles: default 1000); None for the loader's default.
      ``data_seed`` fixes the data set, ``seed`` the init and the order of the batches.
    - ``threads``: BLAS and Numba threads during the run (None: leave them as they are).
    """

    dataset: str = "mnist1d"
    model: str = "cnn1d"
    norm: str = "batch"
    norm_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_groups: int = 8
    virtual_batch_size: int = 4
    renorm_r_max: float = 3.0
    renorm_d_max: float = 5.0
    renorm_warmup: float = 0.1
    renorm_ramp_end: float = 0.5
    widths: tuple[int, ...] | None = None
    kernel_size: int = 5
    conv_stride: int = 2
    batch_size: int = 32
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.05
    lr_schedule: str = "constant"
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    init: str = "he_uniform"
    init_scale: float = 1.0
    seed: int = 0
    data_seed: int = 0
    num_samples: int | None = None
    eval_batch_size: int = 1000
    dtype: str = "float32"
    threads: int | None = 1

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("model", self.model, MODELS)
        _check_choice("norm", self.norm, [*_norms.available(), *COMPOSITE_NORMS])
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("init", self.init, _init.names())
        _check_choice("dtype", self.dtype, ("float32", "float64"))
        if not isinstance(self.norm_options, Mapping):
            raise TypeError(f"norm_options must be a dict of keyword arguments for "
                            f"normkit.make, got {self.norm_options!r}")
        for name in ("num_groups", "virtual_batch_size", "kernel_size", "conv_stride",
                     "batch_size", "epochs", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("seed", "data_seed"):
            _check_int(name, getattr(self, name), 0)
        if self.num_samples is not None:
            _check_int("num_samples", self.num_samples, 2)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.widths is not None:
            if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, Sequence) \
                    or not self.widths:
                raise ValueError(f"widths must be a non-empty tuple of ints, got {self.widths!r}")
            for w in self.widths:
                _check_int("widths[i]", w, 1)
        _check_real("lr", self.lr, 0.0, open_low=True)
        _check_real("momentum", self.momentum, 0.0, 1.0)
        _check_real("weight_decay", self.weight_decay, 0.0)
        _check_real("init_scale", self.init_scale, 0.0, open_low=True)
        _check_real("renorm_r_max", self.renorm_r_max, 1.0)
        _check_real("renorm_d_max", self.renorm_d_max, 0.0)
        _check_real("renorm_warmup", self.renorm_warmup, 0.0, 1.0)
        _check_real("renorm_ramp_end", self.renorm_ramp_end, self.renorm_warmup, 1.0)
        if self.max_grad_norm is not None:
            _check_real("max_grad_norm", self.max_grad_norm, 0.0, open_low=True)

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return tuple(self.widths) if self.widths is not None else DEFAULT_WIDTHS[self.model]


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_real(name: str, value, low: float, high: float = math.inf, *, open_low=False) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


# ---------------------------------------------------------------------------------------------
# Data, model, optimizer
# ---------------------------------------------------------------------------------------------

def load_data(config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) from :mod:`normkit.data`; x is (N, F) for the MLP and
    (N, 1, F) for the CNN (one input channel)."""
    dtype = np.dtype(config.dtype)
    if config.dataset == "mnist1d":
        arrays = _data.make_mnist1d(config.data_seed, num_samples=config.num_samples or 5000,
                                    dtype=dtype)
    elif config.dataset == "digits":
        if config.num_samples is not None:
            raise ValueError("num_samples must be None for the digits (a fixed set of 1797)")
        arrays = _data.load_digits(config.data_seed, dtype=dtype)
    else:
        arrays = _data.make_circles(config.num_samples or 1000, seed=config.data_seed, dtype=dtype)
    x_train, y_train, x_test, y_test = arrays
    if config.model == "cnn1d":
        x_train, x_test = x_train[:, None, :], x_test[:, None, :]    # (N, 1, L)
    return (np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


def make_norm(config: TrainConfig, num_features: int, length: int | None = None):
    """The normalizer ``config.norm`` after a layer with ``num_features`` outputs: a Dense layer
    (``length=None``, input (N, C)) or a convolution (input (N, C, length)).

    - "batch", "renorm" (r_max = 1, d_max = 0: the schedule relaxes them), "ghost" (virtual
      batches of ``virtual_batch_size``), "group" (``num_groups`` groups of channels, or of units
      after a Dense), "instance" (convolutions only), "none": per channel, as named.
    - "layer": after a Dense, layer norm over the C units; after a convolution, over (C, L) per
      example with a per-channel gain and bias, i.e. group norm with one group (Wu & He's LN).
    - "rms": over the C units after a Dense; over (C, L) per example after a convolution, with
      a gain per element of (C, L) (RMS norm's own convention: gain of the normalized shape).
    - "gn+ws": group norm as "group" (the layers before it standardize their weights, see
      :func:`build_model`).
    - "frn": per channel; after a Dense (1x1 maps) with the paper's learned eps.
    - "evonorm_s0": ``num_groups`` groups, as "group" (the paper's 32 would be groups of one
      channel in these narrow networks); "evonorm_b0", "switchable": convolutions only (their
      instance statistics need spatial axes); "dyt": per channel, alpha 0.5.
    """
    name, options = config.norm, dict(config.norm_options)
    options.setdefault("dtype", np.dtype(config.dtype))
    if name in SPATIAL_NORMS and length is None:
        raise NotApplicable(f"{name} needs spatial axes: its instance statistics have one value "
                            f"per channel after a Dense layer")
    if name == "gn+ws":
        name = "group"
    if name in ("group", "evonorm_s0"):
        options.setdefault("num_groups", config.num_groups)
    elif name == "ghost":
        options.setdefault("virtual_batch_size", config.virtual_batch_size)
    elif name == "renorm":
        options.setdefault("r_max", 1.0)
        options.setdefault("d_max", 0.0)
    elif name == "frn" and length is None:
        options.setdefault("learned_eps", True)
    elif name == "layer" and length is not None:
        return _norms.make("group", num_features, num_groups=1, **options)
    elif name == "rms" and length is not None:
        return _norms.make("rms", (num_features, length), **options)
    return _norms.make(name, num_features, **options)


def _conv_length(length: int, kernel_size: int, stride: int) -> int:
    return (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def _norm_layer(config: TrainConfig, num_features: int, length: int | None = None) -> list:
    """[the norm layer, ReLU] ([ReLU] for "none": the baseline has no layer there, not an
    identity that copies, which would charge the baseline for work it does not do); a
    normalization-activation layer alone."""
    if config.norm == "none":
        return [ReLU()]
    norm = make_norm(config, num_features, length)
    return [norm] if config.norm in NORM_ACTIVATIONS else [norm, ReLU()]


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                rng: np.random.Generator) -> Sequential:
    """The model for ``config.model``; ``input_shape`` is one example's shape.

    - "mlp": (F,) -> [Dense, norm, ReLU] per width -> Dense(num_classes).
    - "cnn1d": (C_in, L) -> [Conv1d(kernel_size, conv_stride, padding kernel_size // 2), norm,
      ReLU] per width -> global average pool -> Dense(num_classes).

    A normalization-activation layer (frn, evonorm_s0, evonorm_b0) takes the place of "norm,
    ReLU"; with "gn+ws" the hidden Dense/Conv1d layers standardize their weights.
    """
    dtype = np.dtype(config.dtype)
    layer_options = dict(rng=rng, init=config.init, init_scale=config.init_scale, dtype=dtype)
    hidden_options = dict(layer_options, weight_standardization=config.norm == "gn+ws")
    layers: list = []
    if config.model == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"the mlp takes examples of shape (F,), got {input_shape}")
        width_in = input_shape[0]
        for width in config.hidden_widths:
            layers += [Dense(width_in, width, **hidden_options), *_norm_layer(config, width)]
            width_in = width
    else:
        if len(input_shape) != 2:
            raise ValueError(f"the cnn1d takes examples of shape (C, L), got {input_shape}")
        width_in, length = input_shape
        k, stride = config.kernel_size, config.conv_stride
        for width in config.hidden_widths:
            length = _conv_length(length, k, stride)         # >= 1: padding is k // 2
            layers += [Conv1d(width_in, width, k, stride=stride, padding=k // 2,
                              **hidden_options), *_norm_layer(config, width, length)]
            width_in = width
        layers.append(GlobalAvgPool())
    layers.append(Dense(width_in, num_classes, **layer_options))
    return Sequential(layers)


def make_optimizer(config: TrainConfig, model):
    common = dict(weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
    if config.optimizer == "sgd":
        return SGD(model, config.lr, momentum=config.momentum, **common)
    if config.optimizer == "adam":
        return Adam(model, config.lr, betas=tuple(config.adam_betas), **common)
    return RMSProp(model, config.lr, momentum=config.momentum, **common)


def renorm_limits(epoch: int, epochs: int, *, r_max: float = 3.0, d_max: float = 5.0,
                  warmup: float = 0.1, ramp_end: float = 0.5) -> tuple[float, float]:
    """Batch renormalization's (r_max, d_max) for ``epoch`` (0-based) of ``epochs``.

    Ioffe (2017) trains as plain batch norm (1, 0) for the first steps, then relaxes the clips
    to (3, 5). In epochs: (1, 0) for the first ``ceil(warmup * epochs)`` epochs (at least one),
    then linear in the epoch index up to (r_max, d_max) at epoch ``round(ramp_end * epochs)``
    (never earlier than the first relaxed epoch), held after. With 10 epochs: epoch 0 plain BN,
    epochs 1..5 r_max = 1.4, 1.8, 2.2, 2.6, 3.0 and d_max = 1, 2, 3, 4, 5.
    """
    first = max(1, math.ceil(warmup * epochs))
    last = max(first, round(ramp_end * epochs))
    if epoch < first:
        return 1.0, 0.0
    t = min(1.0, (epoch - first + 1) / (last - first + 1))
    return 1.0 + t * (r_max - 1.0), t * d_max


def not_applicable_reason(config: TrainConfig) -> str | None:
    """Why ``config`` cannot train, or None: a batch-statistics norm with one value per channel
    per (virtual) batch, ghost batches that do not divide the batch, instance norm on an MLP."""
    if config.norm in SPATIAL_NORMS and config.model == "mlp":
        return f"{config.norm} needs spatial axes (one value per channel after a Dense layer)"
    if config.norm not in BATCH_STAT_NORMS:
        return None
    if config.norm == "ghost":
        if config.batch_size % config.virtual_batch_size:
            return (f"virtual_batch_size {config.virtual_batch_size} does not divide "
                    f"batch_size {config.batch_size}")
        per_batch = config.virtual_batch_size
    else:
        per_batch = config.batch_size
    if config.model == "mlp" and per_batch < 2:
        return f"{config.norm} norm cannot train on one value per channel (batch of one after a Dense layer)"
    return None


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class History:
    """Per-epoch curves: ``train_loss``/``train_error`` are the means over the epoch's steps
    (training mode, as the weights changed), ``test_loss``/``test_error`` evaluation mode at the
    epoch's end, ``seconds`` the time since the start. ``diverged`` is set when training stopped
    at a non-finite loss or parameter; ``steps`` counts the updates made."""

    epoch: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    train_error: list[float] = dataclasses.field(default_factory=list)
    test_loss: list[float] = dataclasses.field(default_factory=list)
    test_error: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    diverged: bool = False
    steps: int = 0

    def last(self) -> dict[str, float]:
        """The last finished epoch's numbers (empty before the first)."""
        if not self.epoch:
            return {}
        return {key: getattr(self, key)[-1]
                for key in ("train_loss", "train_error", "test_loss", "test_error")}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def classification_errors(outputs: np.ndarray, targets: np.ndarray) -> int:
    """How many rows are misclassified: argmax of (N, K) logits, or the sign of (N,)/(N, 1)
    logits of a binary classifier."""
    if outputs.ndim == 2 and outputs.shape[1] > 1:
        predicted = np.argmax(outputs, axis=1)
    else:
        predicted = (outputs.reshape(len(outputs)) > 0).astype(np.int64)
    return int(np.count_nonzero(predicted != targets.reshape(len(targets))))


def _params_finite(model) -> bool:
    return all(np.isfinite(p).all() for p in model.params.values())


def fit(model, criterion, optimizer, data, *, epochs: int, batch_size: int,
        rng: np.random.Generator, on_epoch: Callable[[int, History], Any] | None = None,
        lr_schedule: Callable[[float], float] | None = None,
        before_epoch: Callable[[int], Any] | None = None,
        error_fn: Callable[[np.ndarray, np.ndarray], float] | None = classification_errors,
        eval_batch_size: int = 1000, keep_last_batch: bool = False) -> History:
    """Train ``model`` for ``epochs`` over ``data = (x_train, y_train, x_test, y_test)``.

    Every epoch shuffles the training set with ``rng`` and takes ``len(x_train) // batch_size``
    full batches (the remainder is left out of that epoch; ``keep_last_batch=True``: trained on
    as a last, smaller batch, as Keras' ``fit`` does). A step is
    ``criterion.forward(model.forward(x, training=True), y)``, ``model.backward(...)``,
    ``optimizer.step()``. ``lr_schedule(progress)`` (progress = steps done / all steps, in
    [0, 1)) sets ``optimizer.lr`` before each step; ``before_epoch(epoch)`` runs before an epoch,
    ``on_epoch(epoch, history)`` after it is recorded. ``error_fn(outputs, targets)`` counts the
    errors of a batch (None: errors are NaN). The test curve is :func:`evaluate` in evaluation
    mode with ``eval_batch_size``. The epoch's train loss and error are means over its examples.

    Stops at the first non-finite training loss (or when a parameter became non-finite) with
    ``history.diverged = True``; the recorded epochs are those that finished.
    """
    x_train, y_train, x_test, y_test = data
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"x and y must have the same length: train {len(x_train)} vs "
                         f"{len(y_train)}, test {len(x_test)} vs {len(y_test)}")
    keep_last_batch = _norms._check_bool("keep_last_batch", keep_last_batch)
    steps_per_epoch = len(x_train) // batch_size
    if keep_last_batch:
        steps_per_epoch = -(-len(x_train) // batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the training set "
                         f"({len(x_train)} examples)")
    total_steps = epochs * steps_per_epoch
    history = History()
    start = time.perf_counter()
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        order = rng.permutation(len(x_train))
        x_epoch, y_epoch = x_train[order], y_train[order]       # contiguous batches below
        loss_sum, error_sum = 0.0, 0.0
        for i in range(steps_per_epoch):
            x_batch = x_epoch[i * batch_size:(i + 1) * batch_size]
            y_batch = y_epoch[i * batch_size:(i + 1) * batch_size]
            if lr_schedule is not None:
                optimizer.lr = lr_schedule(history.steps / total_steps)
            result = _train_step(model, criterion, optimizer, x_batch, y_batch)
            if result is None:
                history.diverged = True
                return history
            loss, outputs = result
            history.steps += 1
            loss_sum += loss * len(x_batch)
            if error_fn is not None:
                error_sum += error_fn(outputs, y_batch)
        test_loss, test_error = evaluate(model, criterion, x_test, y_test,
                                         batch_size=eval_batch_size, error_fn=error_fn)
        examples = min(steps_per_epoch * batch_size, len(x_train))
        history.epoch.append(epoch)
        history.train_loss.append(loss_sum / examples)
        history.train_error.append(error_sum / examples if error_fn is not None else math.nan)
        history.test_loss.append(test_loss)
        history.test_error.append(test_error)
        history.seconds.append(time.perf_counter() - start)
        if on_epoch is not None:
            on_epoch(epoch, history)
    return history


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def _train_step(model, criterion, optimizer, x_batch, y_batch):
    """One update: (loss, outputs), or None (and no update) if the loss or a parameter is not
    finite. ``outputs`` is the model's buffer: read it before the next forward. Overflow on the
    way to a divergence is expected (the loss check catches it), so it does not warn."""
    try:
        outputs = model.forward(x_batch, training=True)
    except ValueError:
        if _params_finite(model):
            raise
        return None                     # a normalizer refused its non-finite parameters
    loss = criterion.forward(outputs, y_batch)
    if not math.isfinite(loss):
        return None
    model.backward(criterion.backward())
    optimizer.step()
    return loss, outputs


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def evaluate(model, criterion, x: np.ndarray, y: np.ndarray, *, batch_size: int,
             error_fn: Callable[[np.ndarray, np.ndarray], float] | None = classification_errors,
             batch_stats: bool = False) -> tuple[float, float]:
    """(mean loss, error rate) of ``model`` on (x, y).

    ``batch_stats=False``: evaluation mode (running statistics), in chunks of ``batch_size``.
    ``batch_stats=True``: the training-mode forward (each batch normalized with its own
    statistics) on consecutive batches of exactly ``batch_size`` rows in the given order, the
    last one filled up by wrapping around to the first rows, which are not counted twice.
    ``model.state`` is restored after every batch, so running statistics (and batch
    renormalization's r and d, which depend on them) are the same for every batch and the model
    is left as it was. ``error_fn=None`` gives an error of NaN. A model on its way to diverge
    may overflow here: that gives an inf/NaN loss, not a warning.
    """
    _check_int("batch_size", batch_size, 1)
    n = len(x)
    if n == 0 or n != len(y):
        raise ValueError(f"x and y must be non-empty and of one length, got {len(x)} and {len(y)}")
    saved_state = {key: value.copy() for key, value in model.state.items()} if batch_stats else {}
    loss_sum, error_sum = 0.0, 0.0
    for start in range(0, n, batch_size):
        counted = min(batch_size, n - start)
        if batch_stats:
            rows = (start + np.arange(batch_size)) % n                 # (batch_size,)
            x_batch, y_batch = x[rows], y[rows]
        else:
            x_batch, y_batch = x[start:start + counted], y[start:start + counted]
        try:
            outputs = model.forward(x_batch, training=batch_stats)[:counted]
        finally:
            for key, value in model.state.items():
                if key in saved_state:
                    value[...] = saved_state[key]
        loss_sum += criterion.forward(outputs, y_batch[:counted]) * counted
        if error_fn is not None:
            error_sum += error_fn(outputs, y_batch[:counted])
    return loss_sum / n, (error_sum / n if error_fn is not None else math.nan)


def stat_error(model, x: np.ndarray, *, batch_size: int = 1000) -> float | None:
    """How far the running statistics of the first normalizer that keeps them are from the true
    statistics of its input over ``x`` (its input computed in evaluation mode); None if no
    layer keeps ``running_mean``.

    With m, v the population mean and unbiased variance per channel (over the rows and any
    spatial axes), rm, rv the running ones and eps the normalizer's: the root mean square over
    channels of (rm - m) / sqrt(v + eps) plus that of (rv + eps) / (v + eps) - 1. Both terms are
    in units the normalization itself uses (a mean error in standard deviations, a relative
    error of the variance it divides by), so channels with a mean near zero do not blow up the
    measure the way ||rm - m|| / ||m|| would.
    """
    layers = list(model)
    index = next((i for i, layer in enumerate(layers) if "running_mean" in layer.state), None)
    if index is None:
        return None
    norm = layers[index]
    chunks = []
    for start in range(0, len(x), batch_size):
        h = x[start:start + batch_size]
        for layer in layers[:index]:
            h = layer.forward(h, training=False)
        chunks.append(h.astype(np.float64))                            # copies the buffer
    inputs = np.concatenate(chunks)                                    # (N, C, *spatial)
    axes = (0,) + tuple(range(2, inputs.ndim))
    mean = inputs.mean(axis=axes)                                      # (C,)
    var = inputs.var(axis=axes, ddof=1)                                # (C,)
    running_mean = norm.state["running_mean"].astype(np.float64)
    running_var = norm.state["running_var"].astype(np.float64)
    eps = float(getattr(norm, "eps", 0.0))
    mean_error = np.sqrt(np.mean((running_mean - mean) ** 2 / (var + eps)))
    var_error = np.sqrt(np.mean(((running_var + eps) / (var + eps) - 1.0) ** 2))
    return float(mean_error + var_error)


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """BLAS (through threadpoolctl, if installed) and Numba limited to ``count`` threads."""
    if count is None:
        yield
        return
    import numba
    saved = numba.get_num_threads()
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:                       # then OPENBLAS_NUM_THREADS etc. decide
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=count)
        with limits:
            yield
    finally:
        numba.set_num_threads(saved)


def _renorm_schedule(config: TrainConfig, model) -> Callable[[int], None] | None:
    renorms = [layer for layer in model if isinstance(layer, _norms.BatchRenorm)]
    if not renorms:
        return None

    def before_epoch(epoch: int) -> None:
        r_max, d_max = renorm_limits(epoch, config.epochs, r_max=config.renorm_r_max,
                                     d_max=config.renorm_d_max, warmup=config.renorm_warmup,
                                     ramp_end=config.renorm_ramp_end)
        for layer in renorms:
            layer.r_max, layer.d_max = r_max, d_max
    return before_epoch


def _lr_schedule(config: TrainConfig) -> Callable[[float], float] | None:
    if config.lr_schedule == "cosine":
        return lambda progress: 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))
    return None


def train(config: TrainConfig, *, on_epoch: Callable[[int, History], Any] | None = None
          ) -> dict[str, Any]:
    """Train ``config.model`` on ``config.dataset`` with ``config.norm``; return the metrics.

    Keys: ``test_error``, ``test_loss`` (evaluation mode, running statistics), ``train_error``,
    ``train_loss`` (evaluation mode over the whole training set), ``test_error_batchstats``
    (:func:`evaluate` with ``batch_stats=True`` and the training batch size), ``stat_error``
    (:func:`stat_error` over the training set; None without running statistics), ``diverged``,
    ``epochs_run``, ``steps``, ``seconds`` and ``history`` (:meth:`History.as_dict`).

    A diverged run returns the test/train numbers of its last finished epoch (the means of
    its training steps for train_*), absent if none finished, and no batch-statistics or
    stat_error. Raises :class:`NotApplicable` for a config that cannot train
    (:func:`not_applicable_reason`).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    reason = not_applicable_reason(config)
    if reason:
        raise NotApplicable(reason)
    start = time.perf_counter()
    with _threads(config.threads):
        x_train, y_train, x_test, y_test = load_data(config)
        init_seed, order_seed = np.random.SeedSequence(config.seed).spawn(2)
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        model = build_model(config, x_train.shape[1:], num_classes, np.random.default_rng(init_seed))
        criterion = SoftmaxCrossEntropy()
        optimizer = make_optimizer(config, model)
        history = fit(model, criterion, optimizer, (x_train, y_train, x_test, y_test),
                      epochs=config.epochs, batch_size=config.batch_size,
                      rng=np.random.default_rng(order_seed), on_epoch=on_epoch,
                      lr_schedule=_lr_schedule(config), before_epoch=_renorm_schedule(config, model),
                      eval_batch_size=config.eval_batch_size)
        metrics: dict[str, Any] = {"diverged": history.diverged, "epochs_run": len(history.epoch),
                                   "steps": history.steps}
        if history.diverged:
            metrics.update(history.last())
        else:
            metrics["test_loss"], metrics["test_error"] = history.test_loss[-1], history.test_error[-1]
            metrics["train_loss"], metrics["train_error"] = evaluate(
                model, criterion, x_train, y_train, batch_size=config.eval_batch_size)
            metrics["test_error_batchstats"] = evaluate(
                model, criterion, x_test, y_test, batch_size=config.batch_size, batch_stats=True)[1]
            metrics["stat_error"] = stat_error(model, x_train, batch_size=config.eval_batch_size)
    metrics["history"] = history.as_dict()
    metrics["seconds"] = time.perf_counter() - start
    return metrics
