"""Recurrent batch norm (BN-LSTM) against LSTM and layer-norm LSTM, six experiments.

Cooijmans et al. (Recurrent Batch Normalization, ICLR 2017) and Ba et al. (Layer Normalization,
2016) at a scale this machine runs. The config's ``experiment`` picks the run
(``_rnn_experiments.RUNS``), the grid is the union of the experiments' grids, and the hooks
(``_rnn_report``) write one section of table.md per experiment, ``table_<experiment>.csv``, one
figure per experiment, ``README.md`` with the verdicts computed from the numbers and
``verdicts.csv``.

1. ``classify`` (tasks ``sequential``/``permuted`` digits, 64 steps of one pixel, and
   ``mnist1d``, 40 steps): LSTM, BN-LSTM gamma 0.1 and 1.0, LN-LSTM, and LN-LSTM without layer
   norm on the input term (``ln_lstm_no_x``: with one input value per step, x_t W_x is rank one
   and its layer norm keeps only the sign of x_t); test accuracy in evaluation mode, the curve
   per epoch (``acc_epoch_NN``), epochs to a target accuracy.
2. ``gradient``: ||dLoss/dh_t|| at initialization for every t (``grad_tNN``) and
   grad_t00 / grad_t63: the batch-normalized tanh RNN of Cooijmans et al.'s Fig. 1a
   (``bn_tanh_rnn``, gamma 0.1 .. 1.0) on the sequential digits, as the paper's Sec. 4 runs it
   on sequential MNIST, the measurement the claim is about; and, as a second measurement,
   BN-LSTM with the same gammas, LSTM and LN-LSTM on the permuted digits.
3. shared statistics: ``classify`` with ``per_step=False`` (one set of running statistics for
   all steps: see normkit.nn.LSTM; training still normalizes the recurrent and cell terms with
   each step's batch statistics, the input term with those of all steps together).
4. ``adding``: train at T = 50, test MSE at T = 50, 100, 200, 400 (BN-LSTM: the T_max rule).
5. small batches: ``classify`` on the permuted digits at batch sizes 2, 4, 8, 32.
6. ``padding``: the digits resampled to lengths 32..64 and pre-padded; BN-LSTM with masked
   statistics (``use_mask``) against the padding entering them; accuracy and the shift of the
   input term's running statistics from those of the valid positions.

Common setup: RMSProp lr 1e-3, gradient norm clipped at 1, batch 64, identity W_h, orthogonal
W_x, forget bias 1, h0 ~ N(0, 0.1^2) in training, BN momentum 0.1, eps 1e-5; one fixed split of
the digits (1347 train / 450 test) and of MNIST-1D (4000 / 1000).

Budget: the full grid (171 runs) in at most 85 minutes wall on 2 cores (``--jobs 2``); the
quick grid (78 runs) in at most 5 minutes. Estimate, from CPU seconds (``time.process_time``)
of one- and two-epoch runs at the full settings, one Numba thread, measured at load average
~6 on the 2 cores (other sessions running): digits epoch 0.9 s (LSTM) / 1.3 s (BN-, LN-LSTM);
MNIST-1D epoch 1.7-2.4 s; adding epoch (5000 sequences + validation) ~5 s; one epoch of the
permuted digits at batch 2 / 4 / 8 / 32: 3.7 / 2.3 / 1.7 / 1.2 s (BN); a gradient run 2 s.
Sum over the full grid: classification 1440 + MNIST-1D 730 + shared 195 + padding 390 +
adding 880 + small batches 710 + gradient 40 = about 4400 CPU seconds, 37 minutes on two
free cores, about 55 minutes if other work takes a third of the machine; the LN-LSTM without
input norm adds about 15 runs of the classification's cost (~600 CPU s) and the tanh RNN's 15
gradient runs a few seconds each. The quick grid took
3 min 21 s wall (93 s CPU) at load average ~7.

Trimmed relative to the papers' setups: hidden 64 in training runs, not 100 (the gradient-flow
runs at initialization keep 100); the digits (1347 training images, 64 steps) stand in for MNIST
(784 steps), 30 epochs; MNIST-1D 15 epochs; 5 seeds for the classification, shared-statistics
and padding runs but 3 for gradient flow, the adding problem (5000 training sequences, 20
epochs) and the small batches (10 epochs at every batch size); gamma 0.1 and 1.0 in training,
the five gammas only in the gradient-flow runs; batch sizes 2/4/8/32 for BN-LSTM gamma 0.1.
"""
from __future__ import annotations

from dataclasses import dataclass

from normkit.sweep import Study

EXPERIMENTS = ("classify", "gradient", "adding", "padding")
TASKS = ("sequential", "permuted", "mnist1d")
MODEL_NAMES = ("lstm", "bn_lstm", "ln_lstm", "ln_lstm_no_x", "bn_tanh_rnn")
#: Trained in every classification and adding run; ln_lstm_no_x in classification only,
#: bn_tanh_rnn in the gradient-flow runs only.
LSTM_MODELS = ("lstm", "bn_lstm", "ln_lstm")
GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)
ADDING_T = (50, 100, 200, 400)
CURVE_EPOCHS = 30                   # acc_epoch_01 .. acc_epoch_30 (= _rnn_experiments.MAX_CURVE_EPOCHS)
SEQ_STEPS = 64

# -- the budget (see the docstring) -----------------------------------------------------------
HIDDEN = 64
FULL_SEEDS, FEW_SEEDS = 5, 3
EPOCHS = {"sequential": 30, "permuted": 30, "mnist1d": 15}
QUICK_EPOCHS = {"sequential": 3, "permuted": 3, "mnist1d": 2}
ADDING_EPOCHS, ADDING_TRAIN = 20, 5000
QUICK_ADDING_EPOCHS, QUICK_ADDING_TRAIN = 1, 1000
SMALL_BATCHES = (2, 4, 8, 32)
SMALL_EPOCHS, QUICK_SMALL_EPOCHS = 10, 1
GRADIENT_HIDDEN, QUICK_GRADIENT_HIDDEN = 100, 32


@dataclass(frozen=True)
class Config:
    """One run; fields an experiment does not use keep their defaults.

    ``model`` lstm | bn_lstm | ln_lstm | ln_lstm_no_x | bn_tanh_rnn (experiment ``gradient``
    only); ``gamma`` the BN models' initial gammas (LN gains start at 1 whatever it says);
    ``per_step`` False shares BN statistics over steps; ``use_mask`` False
    lets padding into the statistics (experiment ``padding``); ``train_size`` the first N
    training examples (0: all; ``adding``: 0 means 5000 sequences); ``hidden`` units.
    """

    experiment: str = "classify"
    task: str = "permuted"
    model: str = "bn_lstm"
    gamma: float = 0.1
    per_step: bool = True
    use_mask: bool = True
    hidden: int = 64
    batch_size: int = 64
    epochs: int = 30
    train_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"experiment": EXPERIMENTS, "task": TASKS, "model": MODEL_NAMES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.model != "bn_lstm" and (not self.per_step or not self.use_mask):
            raise ValueError("per_step and use_mask are BN-LSTM options; keep them True for "
                             f"model {self.model!r}")
        if self.model == "bn_tanh_rnn" and self.experiment != "gradient":
            raise ValueError("model 'bn_tanh_rnn' is measured at initialization only: use it "
                             f"with experiment 'gradient', not {self.experiment!r}")


def _grids(quick: bool) -> list[dict]:
    """The union of the six experiments' grids (quick: hidden 32, 2 seeds, few epochs, a smoke
    run: with 2 seeds its verdicts read "undetermined")."""
    seeds = range(2) if quick else range(FULL_SEEDS)
    few_seeds = range(2) if quick else range(FEW_SEEDS)
    hidden = [32 if quick else HIDDEN]
    gradient_hidden = [QUICK_GRADIENT_HIDDEN if quick else GRADIENT_HIDDEN]
    epochs = {task: [QUICK_EPOCHS[task] if quick else EPOCHS[task]] for task in TASKS}
    classify = []
    for task in TASKS:
        common = dict(experiment=["classify"], task=[task], hidden=hidden, epochs=epochs[task],
                      seed=seeds)
        classify += [dict(common, model=["lstm", "ln_lstm", "ln_lstm_no_x"]),
                     dict(common, model=["bn_lstm"], gamma=[0.1, 1.0])]
    shared = dict(experiment=["classify"], task=["permuted"], model=["bn_lstm"],
                  per_step=[False], hidden=hidden, epochs=epochs["permuted"], seed=seeds)
    gradient = [dict(experiment=["gradient"], task=["sequential"], model=["bn_tanh_rnn"],
                     gamma=list(GAMMAS), hidden=gradient_hidden, seed=few_seeds),
                dict(experiment=["gradient"], task=["permuted"], model=["bn_lstm"],
                     gamma=list(GAMMAS), hidden=gradient_hidden, seed=few_seeds),
                dict(experiment=["gradient"], task=["permuted"], model=["lstm", "ln_lstm"],
                     hidden=gradient_hidden, seed=few_seeds)]
    adding = dict(experiment=["adding"], model=list(LSTM_MODELS), hidden=hidden,
                  epochs=[QUICK_ADDING_EPOCHS if quick else ADDING_EPOCHS],
                  train_size=[QUICK_ADDING_TRAIN if quick else ADDING_TRAIN], seed=few_seeds)
    small = dict(experiment=["classify"], task=["permuted"], model=list(LSTM_MODELS),
                 batch_size=[2, 8] if quick else list(SMALL_BATCHES), hidden=hidden,
                 epochs=[QUICK_SMALL_EPOCHS if quick else SMALL_EPOCHS], seed=few_seeds)
    padding = dict(experiment=["padding"], task=["sequential"], model=["bn_lstm"],
                   use_mask=[True, False], hidden=hidden, epochs=epochs["sequential"],
                   seed=seeds)
    return [*classify, shared, *gradient, adding, small, padding]


def _metrics() -> tuple[str, ...]:
    names = ["test_acc", "test_loss", "train_acc", "epochs_to_target", "curve_mean_acc"]
    names += [f"acc_epoch_{e:02d}" for e in range(1, CURVE_EPOCHS + 1)]
    names += [f"grad_t{t:02d}" for t in range(SEQ_STEPS)] + ["grad_ratio"]
    names += [f"mse_T{T}" for T in ADDING_T]
    names += ["shift_mean", "shift_var"]
    return tuple(names)


def run(config: Config) -> dict[str, float]:
    """Overflow on the way to a divergence is expected (fit catches it), so it does not warn."""
    import numpy as np
    from _rnn_experiments import RUNS
    with np.errstate(over="ignore", invalid="ignore"):
        return RUNS[config.experiment](config)


def tables(frame):
    from _rnn_report import tables as report_tables
    return report_tables(frame)


def figures(frame):
    from _rnn_report import figures as report_figures
    return report_figures(frame)


def reports(frame):
    from _rnn_report import reports as report_readme
    return report_readme(frame)


STUDY = Study(
    name="rnn",
    config=Config,
    metrics=_metrics(),
    grid_quick=_grids(quick=True),
    grid_full=_grids(quick=False),
    run=run,
    tables=tables,
    figures=figures,
    reports=reports,
    curves={"acc_epoch_": "test_acc", "grad_t": "grad_norm", "mse_T": "adding_test_mse"},
)
