"""The runs of the RNN study: data, the sequence models and one function per experiment.

Every trained model is one normkit.nn.LSTM layer (its last state) and a Dense head, trained with
normkit.train.fit (RMSProp lr 1e-3, gradient norm clipped to 1 inside the optimizer). Inputs are
batch-major (N, T, D); the wrapper makes them time-major for the LSTM. A NaN in x marks a padded
position: the wrapper turns it into the LSTM's mask (or, with ``use_mask=False``, into a 0 that
enters everything, statistics included, as a framework without masks would).
"""
from __future__ import annotations

import math

import numpy as np

from normkit import data as datasets
from normkit.kernels import batch as batch_kernels
from normkit.nn import LSTM, Dense, RMSProp, SoftmaxCrossEntropy
from normkit.nn.lstm import _orthogonal
from normkit.train import evaluate, fit

#: LSTM models: (normkit.nn.LSTM's norm, whether the input term is normalized too).
MODELS = {"lstm": ("none", True), "bn_lstm": ("recurrent_batch", True),
          "ln_lstm": ("layer", True), "ln_lstm_no_x": ("layer", False)}
#: The batch-normalized tanh RNN of Cooijmans et al.'s Fig. 1a (gradient flow only).
TANH_RNN = "bn_tanh_rnn"
#: The length of each classification task's sequences.
TASK_STEPS = {"sequential": 64, "permuted": 64, "mnist1d": 40}
PERMUTATION_SEED = 1234             # one fixed permutation of the 64 pixels for every run
ADDING_TRAIN_STEPS = 50
ADDING_TEST_STEPS = (50, 100, 200, 400)
ADDING_TEST_SAMPLES = 500
MNIST1D_SAMPLES = 5000              # 4000 training, 1000 test signals
PADDING_MIN_STEPS = 32              # variable-length digits: lengths uniform in [32, 64]
GRADIENT_BATCH = 64
LEARNING_RATE = 1e-3
CLIP = 1.0
H0_NOISE = 0.1
MAX_CURVE_EPOCHS = 30               # acc_epoch_01 .. acc_epoch_30 (fewer epochs leave blanks)
#: Test accuracy a run must reach for ``epochs_to_target`` (epochs + 1 if it never does).
TARGET_ACCURACY = {"sequential": 0.6, "permuted": 0.6, "mnist1d": 0.4}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def permutation() -> np.ndarray:
    return np.random.default_rng(PERMUTATION_SEED).permutation(64)


def load_task(task: str, train_size: int = 0, seed: int = 0):
    """(x_train, y_train, x_test, y_test) with x (N, T, 1): the digits read pixel by pixel
    (``sequential``), the same under one fixed permutation (``permuted``), or MNIST-1D's 40
    values (``mnist1d``). ``train_size`` > 0 keeps the first N training examples. The split is
    fixed (seed 0); ``seed`` is unused here and kept for symmetry."""
    if task in ("sequential", "permuted"):
        x_train, y_train, x_test, y_test = datasets.load_digits(0)
        if task == "permuted":
            order = permutation()
            x_train, x_test = x_train[:, order], x_test[:, order]
    elif task == "mnist1d":
        x_train, y_train, x_test, y_test = datasets.make_mnist1d(0, num_samples=MNIST1D_SAMPLES)
    else:
        raise ValueError(f"task must be one of {sorted(TASK_STEPS)}, got {task!r}")
    if train_size:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    return (np.ascontiguousarray(x_train[:, :, None]), y_train,
            np.ascontiguousarray(x_test[:, :, None]), y_test)


def variable_lengths(x: np.ndarray, rng: np.random.Generator, min_steps: int) -> np.ndarray:
    """Each sequence of x (N, T, 1) resampled (linear interpolation) to its own length, drawn
    uniformly from [min_steps, T], and padded at the front with NaN to T: the digits read at
    different speeds, pre-padded as Keras' pad_sequences does by default. Returns (N, T, 1)."""
    N, T, _ = x.shape
    lengths = rng.integers(min_steps, T + 1, N)
    out = np.full(x.shape, np.nan, x.dtype)
    source = np.linspace(0, 1, T)
    for n, length in enumerate(lengths):
        out[n, T - length:, 0] = np.interp(np.linspace(0, 1, length), source, x[n, :, 0])
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class SequenceModel:
    """LSTM (last state) -> Dense(outputs) over x (N, T, D); ``params``/``grads``/``state`` are
    flat dicts of the layers' arrays (the same objects, so an optimizer can hold them)."""

    def __init__(self, lstm: LSTM, head: Dense, *, use_mask: bool = True):
        self.lstm, self.head, self.use_mask = lstm, head, use_mask
        self.params = {**{f"lstm.{k}": v for k, v in lstm.params.items()},
                       **{f"head.{k}": v for k, v in head.params.items()}}
        self.grads = {**{f"lstm.{k}": v for k, v in lstm.grads.items()},
                      **{f"head.{k}": v for k, v in head.grads.items()}}

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.lstm.state                # replaced arrays (grow) are picked up here

    def time_major(self, x: np.ndarray):
        """x (N, T, D) -> (x (T, N, D) with NaN replaced by 0, mask (T, N) or None)."""
        xt = np.ascontiguousarray(np.swapaxes(x, 0, 1))
        padded = np.isnan(xt[:, :, 0])
        if not padded.any():
            return xt, None
        xt = np.where(np.isnan(xt), 0, xt).astype(xt.dtype)
        return xt, (~padded if self.use_mask else None)

    def forward(self, x, training):
        xt, mask = self.time_major(x)
        if training and mask is not None:
            # Batch statistics need 0 or 2+ valid rows per step: a step where one sequence
            # alone has begun (pre-padding) gets that value masked out too. Rare: the longest
            # sequence of a batch loses its first few values.
            mask[mask.sum(axis=1) == 1] = False
        return self.head.forward(self.lstm.forward(xt, training, mask=mask), training)

    def backward(self, d_out):
        self.lstm.backward(self.head.backward(d_out))


def build_model(model: str, *, inputs: int, outputs: int, hidden: int, max_steps: int,
                gamma: float, per_step: bool, seed: int, use_mask: bool = True) -> SequenceModel:
    """The paper's setup: identity W_h, orthogonal W_x, forget bias 1, h0 noise 0.1 in training;
    ``gamma`` for BN-LSTM (LN-LSTM's gains start at 1, as Ba et al.); ``ln_lstm_no_x`` is the
    LN-LSTM without layer norm on the input term."""
    norm, input_norm = MODELS[model]
    lstm = LSTM(inputs, hidden, norm=norm, max_steps=max_steps, per_step=per_step,
                gamma_init=gamma if norm == "recurrent_batch" else None,
                recurrent_init="identity", h0_noise_std=H0_NOISE, return_sequences=False,
                input_norm=input_norm, seed=seed)
    head = Dense(hidden, outputs, rng=np.random.default_rng(seed + 10_000), init="glorot_uniform")
    return SequenceModel(lstm, head, use_mask=use_mask)


class BNTanhRNN:
    """The batch-normalized tanh RNN of Cooijmans et al. (2017), Sec. 4 and Fig. 1a::

        h_t = tanh(BN(h_{t-1} W_h; gamma_h) + BN(x_t W_x; gamma_x) + b)

    each BN with the step's own batch statistics (training mode) and no shift of its own (b is
    the shift), gamma_h = gamma_x = ``gamma``; identity W_h and orthogonal W_x as the BN-LSTM
    here, float64. Only what the gradient-flow experiment needs: the forward in training mode
    and dLoss/dh_t for every t."""

    def __init__(self, inputs: int, hidden: int, gamma: float, seed: int, eps: float = 1e-5):
        rng = np.random.default_rng(seed)
        self.W_x = np.ascontiguousarray(_orthogonal(rng, inputs, hidden))     # (D, H)
        self.W_h = np.eye(hidden)                                             # (H, H)
        self.b = np.zeros(hidden)
        self.gamma_x = np.full(hidden, float(gamma))
        self.gamma_h = np.full(hidden, float(gamma))
        self.eps = eps
        self.hidden = hidden

    def forward(self, x: np.ndarray, h0: np.ndarray):
        """x (T, N, D), h0 (N, H) -> h (T+1, N, H) (h[0] = h0) and what the backward needs."""
        T, N, _ = x.shape
        zero = np.zeros(self.hidden)
        h = np.empty((T + 1, N, self.hidden))
        h[0] = h0
        steps = []
        for t in range(T):
            xn = batch_kernels.forward_train(np.ascontiguousarray(x[t] @ self.W_x),
                                             self.gamma_x, zero, self.eps)[0]
            r = np.ascontiguousarray(h[t] @ self.W_h)
            rn, mean, var = batch_kernels.forward_train(r, self.gamma_h, zero, self.eps)
            h[t + 1] = np.tanh(rn + xn + self.b)
            steps.append((r, mean, var))
        return h, steps

    def hidden_gradients(self, x: np.ndarray, d_last: np.ndarray, *, h0: np.ndarray):
        """dLoss/dh_t (T+1, N, H) for a loss of the last state with dLoss/dh_T = ``d_last``:
        backpropagation through time, through each step's batch statistics (row t + 1: the
        gradient reaching the output of step t; row 0: dLoss/dh0)."""
        h, steps = self.forward(x.astype(np.float64), h0.astype(np.float64))
        T = x.shape[0]
        dh = np.empty_like(h)
        dh[T] = d_last
        for t in range(T - 1, -1, -1):
            r, mean, var = steps[t]
            da = dh[t + 1] * (1 - h[t + 1] ** 2)
            dr = batch_kernels.backward(da, r, self.gamma_h, mean, var, self.eps)[0]
            dh[t] = dr @ self.W_h.T
        return dh


class MeanSquaredError:
    """mean((y_hat - y)^2) for predictions (N, 1) and targets (N,); gradient 2 (y_hat - y) / N."""

    def forward(self, predictions, targets) -> float:
        residual = predictions[:, 0].astype(np.float64) - targets
        self._grad = (2 * residual / len(residual))[:, None].astype(predictions.dtype)
        return float(np.mean(residual ** 2))

    def backward(self):
        return self._grad


def _train(model, criterion, data, config, *, error_fn="default"):
    optimizer = RMSProp(model, lr=LEARNING_RATE, max_grad_norm=CLIP)
    kwargs = {} if error_fn == "default" else {"error_fn": error_fn}
    return fit(model, criterion, optimizer, data, epochs=config.epochs,
               batch_size=config.batch_size, rng=np.random.default_rng(config.seed),
               eval_batch_size=500, **kwargs)


# ---------------------------------------------------------------------------------------------
# Experiments
# ---------------------------------------------------------------------------------------------

def _curve_metrics(history, task: str, epochs: int) -> dict[str, float]:
    accuracy = [1 - e for e in history.test_error]
    metrics = {f"acc_epoch_{e + 1:02d}": a for e, a in enumerate(accuracy[:MAX_CURVE_EPOCHS])}
    reached = [e + 1 for e, a in enumerate(accuracy) if a >= TARGET_ACCURACY[task]]
    metrics["epochs_to_target"] = reached[0] if reached else epochs + 1
    metrics["curve_mean_acc"] = float(np.mean(accuracy)) if accuracy else math.nan
    return metrics


def run_classify(config) -> dict[str, float]:
    """Experiments 1, 3, 5: train on a task, test accuracy in evaluation mode per epoch."""
    data = load_task(config.task, config.train_size)
    model = build_model(config.model, inputs=1, outputs=10, hidden=config.hidden,
                        max_steps=TASK_STEPS[config.task], gamma=config.gamma,
                        per_step=config.per_step, seed=config.seed)
    history = _train(model, SoftmaxCrossEntropy(), data, config)
    metrics = {"diverged": history.diverged, **_curve_metrics(history, config.task, config.epochs)}
    if history.epoch:
        metrics.update(test_acc=1 - history.test_error[-1], test_loss=history.test_loss[-1],
                       train_acc=1 - history.train_error[-1])
    return metrics


def run_gradient(config) -> dict[str, float]:
    """Experiment 2: ||dLoss/dh_t|| (Frobenius over the batch) at initialization, training
    mode, on one batch of the task; t = 0 .. T-1 are the outputs of the steps. The model is
    the batch-normalized tanh RNN (``bn_tanh_rnn``, the paper's Fig. 1a) or an LSTM."""
    x_train, y_train, _, _ = load_task(config.task)
    rows = np.random.default_rng(config.seed).choice(len(x_train), GRADIENT_BATCH, replace=False)
    h0 = (np.random.default_rng(config.seed + 1).standard_normal((GRADIENT_BATCH, config.hidden))
          * H0_NOISE).astype(np.float32)
    criterion = SoftmaxCrossEntropy()
    if config.model == TANH_RNN:
        rnn = BNTanhRNN(1, config.hidden, config.gamma, config.seed)
        head = Dense(config.hidden, 10, rng=np.random.default_rng(config.seed + 10_000),
                     init="glorot_uniform", dtype=np.float64)
        xt = np.ascontiguousarray(np.swapaxes(x_train[rows], 0, 1)).astype(np.float64)
        last = rnn.forward(xt, h0)[0][-1]
        criterion.forward(head.forward(np.ascontiguousarray(last), True), y_train[rows])
        dh = rnn.hidden_gradients(xt, head.backward(criterion.backward()), h0=h0)
    else:
        model = build_model(config.model, inputs=1, outputs=10, hidden=config.hidden,
                            max_steps=TASK_STEPS[config.task], gamma=config.gamma,
                            per_step=True, seed=config.seed)
        xt, _ = model.time_major(x_train[rows])
        last = model.lstm.forward(xt, True, h0=h0)
        criterion.forward(model.head.forward(last, True), y_train[rows])
        d_last = model.head.backward(criterion.backward())
        dh = model.lstm.hidden_gradients(xt, np.ascontiguousarray(d_last), h0=h0)  # (T+1, N, H)
    norms = np.sqrt((dh[1:].astype(np.float64) ** 2).sum(axis=(1, 2)))        # (T,)
    metrics = {f"grad_t{t:02d}": float(v) for t, v in enumerate(norms)}
    metrics["grad_ratio"] = float(norms[0] / norms[-1])
    return metrics


def run_adding(config) -> dict[str, float]:
    """Experiment 4: train on the adding problem at T = 50, test MSE at T = 50 .. 400
    (evaluation mode; BN-LSTM uses step 49's statistics beyond step 49)."""
    train_size = config.train_size or 5000
    x_train, y_train, x_val, y_val = datasets.make_adding(
        train_size + ADDING_TEST_SAMPLES, ADDING_TRAIN_STEPS, seed=config.seed,
        test_fraction=ADDING_TEST_SAMPLES / (train_size + ADDING_TEST_SAMPLES))
    model = build_model(config.model, inputs=2, outputs=1, hidden=config.hidden,
                        max_steps=ADDING_TRAIN_STEPS, gamma=config.gamma,
                        per_step=config.per_step, seed=config.seed)
    history = _train(model, MeanSquaredError(), (x_train, y_train, x_val, y_val), config,
                     error_fn=None)
    metrics = {"diverged": history.diverged}
    if history.diverged:
        return metrics
    for steps in ADDING_TEST_STEPS:
        _, _, x_test, y_test = datasets.make_adding(          # 500 fresh test sequences
            2 * ADDING_TEST_SAMPLES, steps, seed=20_000 + 1000 * config.seed + steps,
            test_fraction=0.5)
        metrics[f"mse_T{steps}"] = evaluate(model, MeanSquaredError(), x_test, y_test,
                                            batch_size=500, error_fn=None)[0]
    return metrics


def run_padding(config) -> dict[str, float]:
    """Experiment 6: the digits at variable speed (lengths 32..64, pre-padded); BN-LSTM with
    masked statistics (``use_mask``) or with the padding entering them. Test accuracy in
    evaluation mode, and how far the input term's running statistics are from the statistics
    of the valid positions (x W_x over the training set, per step), :func:`stat_shift`."""
    x_train, y_train, x_test, y_test = load_task("sequential", config.train_size)
    rng = np.random.default_rng(PERMUTATION_SEED)
    x_train = variable_lengths(x_train, rng, PADDING_MIN_STEPS)
    x_test = variable_lengths(x_test, rng, PADDING_MIN_STEPS)
    model = build_model(config.model, inputs=1, outputs=10, hidden=config.hidden,
                        max_steps=64, gamma=config.gamma, per_step=config.per_step,
                        seed=config.seed, use_mask=config.use_mask)
    history = _train(model, SoftmaxCrossEntropy(), (x_train, y_train, x_test, y_test), config)
    metrics = {"diverged": history.diverged, **_curve_metrics(history, "sequential", config.epochs)}
    if history.epoch:
        metrics["test_acc"] = 1 - history.test_error[-1]
        if config.model == "bn_lstm":
            metrics.update(stat_shift(model, x_train))
    return metrics


def stat_shift(model: SequenceModel, x: np.ndarray) -> dict[str, float]:
    """The input-term norm's running statistics against the statistics of its valid inputs.

    With m_t, v_t (4H,) the mean and unbiased variance of x_t W_x over the valid positions of
    step t in x (N, T, 1) (NaN = padding), rm_t, rv_t the running ones and V (4H,) the
    variance over all valid positions of all steps, per step
    e_mean_t = sqrt(mean_f (rm_t - m_t)^2 / mean_f V) and e_var_t = mean_f |rv_t - v_t| /
    mean_f V: errors in units of the input term's overall spread (one scale for all steps, so
    steps where every sequence holds the same value, v_t = 0, do not blow up).
    ``shift_mean``, ``shift_var``: their root mean square over the steps with 2+ valid rows."""
    lstm = model.lstm
    norm = lstm.norms["x"]
    xt = np.swapaxes(x, 0, 1).astype(np.float64)                   # (T, N, 1)
    valid = ~np.isnan(xt[:, :, 0])                                  # (T, N)
    xw = np.where(np.isnan(xt), 0, xt) @ lstm.params["W_x"].astype(np.float64)   # (T, N, 4H)
    scale = xw[valid].var(axis=0, ddof=1).mean() + norm.eps
    mean_err, var_err = [], []
    slots = norm.state["running_mean"].shape[0]
    for t in range(xt.shape[0]):
        values = xw[t][valid[t]]                                    # (n_t, 4H)
        if len(values) < 2:
            continue
        m, v = values.mean(axis=0), values.var(axis=0, ddof=1)
        s = min(t, slots - 1)
        rm = norm.state["running_mean"][s].astype(np.float64)
        rv = norm.state["running_var"][s].astype(np.float64)
        mean_err.append(np.mean((rm - m) ** 2) / scale)
        var_err.append(np.mean(np.abs(rv - v)) / scale)
    return {"shift_mean": float(np.sqrt(np.mean(mean_err))),
            "shift_var": float(np.sqrt(np.mean(np.square(var_err))))}


RUNS = {"classify": run_classify, "gradient": run_gradient, "adding": run_adding,
        "padding": run_padding}
