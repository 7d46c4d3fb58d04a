"""What batch norm is said to do, tested one claim at a time on small networks, with seeds.

Eight claims, one study: the config's ``claim`` field picks the experiment
(``_claims_experiments.RUNS``), the grid is the union of the claims' grids, and the hooks write
one section of table.md, one ``table_<claim>*.csv``, one ``<claim>.png`` and one ``<claim>.md``
per claim, ``README.md`` with the verdicts computed from the numbers and ``verdicts.csv``
(``_claims_report``). Per-layer and per-epoch numbers are plain metric columns
(``grad_norm_3``, ``sat_e010``, ``test_acc_e020``...); a claim leaves the others empty.

    normkit run claims --quick     # results/claims/quick/
    normkit run claims             # results/claims/
"""
from __future__ import annotations

from dataclasses import dataclass

from normkit.sweep import Study

CLAIMS = ("learning_rate", "initialization", "regularization", "cost", "covariate_shift",
          "inference", "saturation", "keras_example")


@dataclass(frozen=True)
class Config:
    """One run. Fields a claim does not use keep their defaults.

    - ``model``: "mlp" (the digits; ``depth`` hidden layers of ``width``) or "cnn" (MNIST-1D,
      normkit.train's Conv1d network); the Keras example uses the circles whatever it says.
    - ``norm``: "none", "batch" or "layer" after each hidden Dense/Conv; ``placement``: the
      norm "before" or "after" the activation; ``dropout``: p after each hidden layer.
    - ``optimizer`` "sgd" (``momentum``) or "adam"; ``lr``; ``init_scale`` multiplies the init.
    - ``bn_momentum`` is the weight of the new batch (PyTorch's convention: Keras' 0.99 is
      0.01 here); ``bn_eps`` batch norm's epsilon.
    - ``train_size``: the first N training examples (0: all); ``steps``: updates to make,
      whatever the batch size (claim "regularization"; the others count ``epochs``).
    """

    claim: str = "learning_rate"
    model: str = "mlp"
    norm: str = "batch"
    placement: str = "before"
    activation: str = "relu"
    dropout: float = 0.0
    depth: int = 2
    width: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    init_scale: float = 1.0
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    batch_size: int = 32
    epochs: int = 10
    train_size: int = 0
    steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"claim": CLAIMS, "model": ("mlp", "cnn"), "norm": ("none", "batch", "layer"),
                   "placement": ("before", "after"), "activation": ("relu", "sigmoid", "tanh"),
                   "optimizer": ("sgd", "adam")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.claim == "regularization" and (self.steps < 1 or self.train_size < 1):
            raise ValueError("claim 'regularization' needs steps >= 1 and train_size >= 1")


# --------------------------------------------------------------------------------------- grids
# The quick grid: every claim, one or two seeds, few epochs (a smoke run: its verdicts read
# "undetermined", fewer than 3 seeds). The full grid: 5 seeds (10 for the Keras example).

LR_GRID = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
INIT_SCALES = [0.01, 0.1, 1.0, 10.0]
SEEDS = range(5)


def _grids(quick: bool) -> list[dict]:
    seeds = range(1) if quick else SEEDS
    lr = dict(claim=["learning_rate"], model=["mlp", "cnn"], norm=["none", "batch", "layer"],
              lr=[1e-2, 0.3, 3.0] if quick else LR_GRID, momentum=[0.0],
              epochs=[3 if quick else 10], seed=seeds)
    init = dict(claim=["initialization"], norm=["none", "batch", "layer"],
                init_scale=INIT_SCALES, depth=[6], width=[64], lr=[0.02],
                epochs=[3 if quick else 20], seed=seeds)
    regularization = [dict(claim=["regularization"], norm=[norm], dropout=[dropout],
                           batch_size=[20, 100] if quick else [5, 20, 100, 300], lr=[0.02],
                           train_size=[300], steps=[300 if quick else 3000], seed=seeds)
                      for norm, dropout in (("none", 0.0), ("batch", 0.0), ("batch", 0.5),
                                            ("none", 0.5))]
    cost = dict(claim=["cost"], model=["mlp"] if quick else ["mlp", "cnn"],
                norm=["none", "batch", "layer"], seed=seeds)
    shift = dict(claim=["covariate_shift"], norm=["none", "batch"], depth=[6], width=[64],
                 lr=[0.1] if quick else [0.02, 0.1], momentum=[0.0],
                 epochs=[2 if quick else 10], seed=seeds)
    inference = dict(claim=["inference"], bn_momentum=[0.01, 0.1, 0.5],
                     batch_size=[8, 128] if quick else [8, 32, 128],
                     epochs=[3 if quick else 10], seed=seeds)
    saturation = dict(claim=["saturation"], activation=["sigmoid", "tanh"],
                      norm=["none", "batch", "layer"], depth=[8], width=[64],
                      epochs=[3 if quick else 20], seed=seeds)
    keras = []
    for optimizer, rate in (("adam", 1e-3), ("sgd", 0.01)) if not quick else (("adam", 1e-3),):
        common = dict(claim=["keras_example"], optimizer=[optimizer], lr=[rate], momentum=[0.9],
                      width=[50], depth=[1], bn_momentum=[0.01], bn_eps=[1e-3],
                      epochs=[20 if quick else 100], seed=range(2) if quick else range(10))
        keras += [dict(common, norm=["none"]),
                  dict(common, norm=["batch"], placement=["before", "after"])]
    return [lr, init, *regularization, cost, shift, inference, saturation, *keras]


# ------------------------------------------------------------------------------------- metrics

def _metrics() -> tuple[str, ...]:
    from _claims_experiments import CURVE_EPOCHS, SATURATION_EPOCHS
    names = ["test_error", "train_error", "test_loss", "train_loss", "epochs_to_target"]
    names += [f"grad_norm_{i}" for i in range(7)]
    names += ["train_epoch_s", "infer_batch_s", "infer_one_s", "infer_batch_folded_s",
              "infer_one_folded_s", "fold_error"]
    names += [f"ics_rel_{i}" for i in range(1, 7)] + [f"ics_cos_{i}" for i in range(1, 7)]
    names += ["ics_l2", "loss_range", "gradient_change", "beta"]
    names += ["test_error_batch", "test_error_precise", "stat_error", "stat_error_precise"]
    names += [f"sat_{i}" for i in range(8)]
    names += [f"sat_e{e:03d}" for e in SATURATION_EPOCHS]
    names += [f"train_acc_e{e:03d}" for e in CURVE_EPOCHS]
    names += [f"test_acc_e{e:03d}" for e in CURVE_EPOCHS]
    return tuple(names)


def run(config: Config) -> dict[str, float]:
    """One thread for Numba and BLAS whatever the executor (the timings of claim "cost" need
    it; pool workers have it already); overflow in diverging runs is expected, not warned."""
    import contextlib

    import numba
    import numpy as np
    from _claims_experiments import RUNS
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                      # then OPENBLAS_NUM_THREADS etc. decide
        blas_limit = contextlib.nullcontext()
    else:
        blas_limit = threadpool_limits(limits=1)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with blas_limit, np.errstate(over="ignore", invalid="ignore"):
            return RUNS[config.claim](config)
    finally:
        numba.set_num_threads(threads)


def tables(frame):
    from _claims_report import tables as claim_tables
    return claim_tables(frame)


def figures(frame):
    from _claims_report import figures as claim_figures
    return claim_figures(frame)


def reports(frame):
    from _claims_report import reports as claim_reports
    return claim_reports(frame)


STUDY = Study(
    name="claims",
    config=Config,
    metrics=_metrics(),
    grid_quick=_grids(quick=True),
    grid_full=_grids(quick=False),
    run=run,
    tables=tables,
    figures=figures,
    reports=reports,
    curves={"sat_e": "saturated_fraction", "train_acc_e": "train_acc",
            "test_acc_e": "test_acc"},
)
