"""The claims study: its measurements on cases with a known answer (and against torch
autograd), and a smoke run of the whole study on a tiny grid checking every output file."""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import normkit
import normkit.inference
from normkit import sweep
from normkit.nn import Dense, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, Tanh

STUDIES = Path(__file__).parent.parent / "studies"
STUDY = sweep.load_study(STUDIES / "claims.py")          # puts studies/ on sys.path
measure = sys.modules.get("_claims_measure") or __import__("_claims_measure")
report = __import__("_claims_report")
experiments = sys.modules.get("_claims_experiments") or __import__("_claims_experiments")

torch = pytest.importorskip("torch")


def _mlp(norm="batch", widths=(6, 5), seed=0, eps=1e-5):
    rng = np.random.default_rng(seed)
    layers, width_in = [], 4
    for width in widths:
        layers += [Dense(width_in, width, rng=rng, dtype=np.float64)]
        if norm != "none":
            layers.append(normkit.make(norm, width, dtype=np.float64, eps=eps))
        layers.append(ReLU())
        width_in = width
    return Sequential(layers + [Dense(width_in, 3, rng=rng, dtype=np.float64)])


def _batch(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.integers(0, 3, n)


def _snapshot(model):
    return ({k: v.copy() for k, v in model.params.items()},
            {k: v.copy() for k, v in model.state.items()})


def _assert_unchanged(model, snapshot):
    params, state = snapshot
    for key, value in params.items():
        np.testing.assert_array_equal(model.params[key], value)
    for key, value in state.items():
        np.testing.assert_array_equal(model.state[key], value)


# ---------------------------------------------------------------------------------------------
# Internal covariate shift
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["none", "batch"])
def test_ics_is_zero_for_the_first_layer_and_the_model_is_restored(norm):
    model, (x, y) = _mlp(norm), _batch()
    before = _snapshot(model)
    shift = measure.internal_covariate_shift(model, SoftmaxCrossEntropy(), x, y, lr=0.5)
    assert shift["l2"][0] == 0.0 and shift["relative"][0] == 0.0
    assert shift["cosine"][0] == pytest.approx(1.0, abs=1e-15)
    assert (shift["l2"][1:] > 0).all()                   # a real step moves the later layers
    _assert_unchanged(model, before)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_ics_is_zero_when_the_preceding_layers_do_not_move(norm):
    model, (x, y) = _mlp(norm), _batch()
    shift = measure.internal_covariate_shift(model, SoftmaxCrossEntropy(), x, y, lr=0.0)
    np.testing.assert_array_equal(shift["l2"], 0.0)
    np.testing.assert_allclose(shift["cosine"], 1.0, atol=1e-15)


class _TorchTwin:
    """The float64 MLP in torch (batch norm in training mode) for gradients by autograd."""

    def __init__(self, model):
        self.model = model

    def gradients(self, params, x, y):
        tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        h = torch.from_numpy(x)
        for i, layer in enumerate(self.model):
            if isinstance(layer, Dense):
                h = h @ tensors[f"{i}.weight"].T + tensors[f"{i}.bias"]
            elif isinstance(layer, normkit.BatchNorm):
                h = torch.nn.functional.batch_norm(h, None, None, tensors[f"{i}.gamma"],
                                                   tensors[f"{i}.beta"], training=True,
                                                   eps=layer.eps)
            else:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, torch.from_numpy(y))
        loss.backward()
        return float(loss.detach()), {k: t.grad.numpy() for k, t in tensors.items()}


def test_ics_matches_torch_autograd():
    model, (x, y), lr = _mlp("batch"), _batch(), 0.3
    twin = _TorchTwin(model)
    params = {k: v.copy() for k, v in model.params.items()}
    _, grads = twin.gradients(params, x, y)
    expected_l2, expected_cos = [], []
    for position in measure.weight_layers(model):
        moved = {k: v - lr * grads[k] if int(k.split(".")[0]) < position else v
                 for k, v in params.items()}
        _, shifted = twin.gradients(moved, x, y)
        g, g2 = grads[f"{position}.weight"], shifted[f"{position}.weight"]
        expected_l2.append(np.linalg.norm(g - g2))
        expected_cos.append(np.vdot(g, g2) / (np.linalg.norm(g) * np.linalg.norm(g2)))

    shift = measure.internal_covariate_shift(model, SoftmaxCrossEntropy(), x, y, lr)

    np.testing.assert_allclose(shift["l2"], expected_l2, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(shift["cosine"], expected_cos, rtol=1e-9)


def test_landscape_matches_torch_autograd_and_restores_the_model():
    model, (x, y) = _mlp("batch"), _batch()
    twin = _TorchTwin(model)
    params = {k: v.copy() for k, v in model.params.items()}
    loss, grads = twin.gradients(params, x, y)
    flat = np.concatenate([grads[k].ravel() for k in params])
    losses, changes = [loss], []
    steps = [0.1, 0.4]
    for eta in steps:
        moved_loss, moved = twin.gradients({k: v - eta * grads[k] for k, v in params.items()}, x, y)
        losses.append(moved_loss)
        changes.append(np.linalg.norm(np.concatenate([moved[k].ravel() for k in params]) - flat))
    before = _snapshot(model)

    got = measure.landscape(model, SoftmaxCrossEntropy(), x, y, steps)

    assert got["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-9)
    norm = np.linalg.norm(flat)
    assert got["gradient_change"] == pytest.approx(max(changes) / norm, rel=1e-9)
    assert got["beta"] == pytest.approx(max(c / (e * norm) for c, e in zip(changes, steps)),
                                        rel=1e-9)
    _assert_unchanged(model, before)


def test_batch_norm_makes_the_gradient_inversely_proportional_to_the_weight_scale():
    """BN(aWx) = BN(Wx) (up to eps): dL/dW scales as 1/a, the other layers' gradients not at all."""
    (x, y), criterion = _batch(), SoftmaxCrossEntropy()
    reference = measure.gradient_norms(_mlp("batch", eps=1e-12), criterion, x, y)[0]
    scaled_model = _mlp("batch", eps=1e-12)
    scaled_model[0].params["weight"] *= 100.0
    scaled = measure.gradient_norms(scaled_model, criterion, x, y)[0]
    assert scaled[0] == pytest.approx(reference[0] / 100.0, rel=1e-6)
    np.testing.assert_allclose(scaled[1:], reference[1:], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Saturation and statistics
# ---------------------------------------------------------------------------------------------

SIGMOID_EDGE = 2 * math.atanh(math.sqrt(0.8))        # s (1 - s) = 0.05 at |z| = 2.8873
TANH_EDGE = math.atanh(math.sqrt(0.95))              # 1 - tanh^2 = 0.05 at |z| = 2.1781


@pytest.mark.parametrize("activation, edge", [("sigmoid", SIGMOID_EDGE), ("tanh", TANH_EDGE)])
def test_saturated_fraction_counts_the_entries_beyond_the_derivative_threshold(activation, edge):
    z = np.array([0.0, edge - 0.01, -(edge - 0.01), edge + 0.01, -(edge + 0.01), 50.0, -800.0,
                  1.0])
    assert measure.saturated_fraction(z, activation) == 4 / 8
    assert measure.saturated_fraction(z.astype(np.float32), activation) == 4 / 8


def test_saturated_fraction_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        measure.saturated_fraction(np.zeros(3), "relu")


def test_saturation_reads_the_inputs_of_each_sigmoid_and_tanh_layer():
    first = Dense(2, 2, rng=0, dtype=np.float64)
    first.params["weight"][...] = np.eye(2)
    first.params["bias"][...] = 0.0
    second = Dense(2, 2, rng=0, dtype=np.float64)
    second.params["weight"][...] = 10.0 * np.eye(2)     # tanh outputs in (-1, 1) times 10
    second.params["bias"][...] = 0.0
    model = Sequential([first, Tanh(), second, Sigmoid()])
    x = np.array([[0.0, 3.0], [0.5, -0.1]])           # tanh inputs: 1 of 4 beyond 2.178
    fractions = measure.saturation(model, x)
    expected_sigmoid = np.mean(np.abs(10 * np.tanh(x)) > SIGMOID_EDGE)
    np.testing.assert_array_equal(fractions, [0.25, expected_sigmoid])


def test_stat_errors_are_zero_for_population_statistics_and_match_normkit_train():
    rng = np.random.default_rng(0)
    x = rng.normal(2, 3, (64, 4))
    model = _mlp("batch", seed=3)
    model.forward(x[:16], training=True)              # running statistics: 1 step, far off
    errors = measure.stat_errors(model, x)
    assert errors.shape == (2,) and (errors > 0.1).all()
    from normkit.train import stat_error
    assert errors[0] == pytest.approx(stat_error(model, x), rel=1e-12)

    single = Sequential([normkit.make("batch", 4, dtype=np.float64)])
    normkit.inference.precise_statistics(single, x, batch_size=64)   # one batch: the population
    assert measure.stat_errors(single, x)[0] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def test_both_grids_cover_every_claim():
    claims = set(sys.modules[STUDY.run.__module__].CLAIMS)
    assert claims == set(report.ANALYSES)
    for quick in (True, False):
        assert {c.claim for c in STUDY.configs(quick)} == claims


def test_config_refuses_unknown_choices():
    with pytest.raises(ValueError, match="claim"):
        STUDY.config(claim="magic")
    with pytest.raises(ValueError, match="steps"):
        STUDY.config(claim="regularization")


SMALL = dict(depth=[2], width=[16], epochs=[1], seed=[0])
TINY_GRID = [
    dict(claim=["learning_rate"], norm=["none", "batch"], lr=[0.1], momentum=[0.0], **SMALL),
    dict(claim=["initialization"], norm=["none", "batch"], init_scale=[0.1, 1.0], **SMALL),
    dict(claim=["regularization"], norm=["none", "batch"], batch_size=[50], train_size=[100],
         steps=[10], **SMALL),
    dict(claim=["cost"], norm=["none", "batch"], seed=[0]),
    dict(claim=["covariate_shift"], norm=["none", "batch"], momentum=[0.0], **SMALL),
    dict(claim=["inference"], bn_momentum=[0.1], batch_size=[64], **SMALL),
    dict(claim=["saturation"], activation=["sigmoid"], norm=["none", "batch"], **SMALL),
    dict(claim=["keras_example"], norm=["none"], width=[50], depth=[1], optimizer=["adam"],
         lr=[1e-3], epochs=[3], seed=[0]),
    dict(claim=["keras_example"], norm=["batch"], placement=["after"], width=[50], depth=[1],
         optimizer=["adam"], lr=[1e-3], bn_momentum=[0.01], bn_eps=[1e-3], epochs=[3],
         seed=[0]),
]

EXPECTED_COLUMNS = {
    "table_verdicts.csv": ["claim", "verdict", "figure", "evidence"],
    "table_learning_rate_range_of_good_learning_rates.csv":
        ["model", "norm", "good learning rates", "good range", "largest stable lr",
         "best test error", "diverged runs"],
    # tables of mean ± std cells are written long and numeric (normkit.sweep.numeric_table)
    "table_initialization_final_test_error.csv": ["init_scale", "norm", "mean", "std", "n"],
    "table_regularization_test_error.csv": ["batch_size", "variant", "mean", "std", "n"],
    "table_cost_time_per_call_and_relative_to_none.csv":
        ["model", "norm", "train epoch (ms)", "train epoch / none"],
    "table_inference_test_error_precise_statistics.csv": ["batch_size", "bn_momentum", "mean",
                                                          "std", "n"],
    "table_keras_example_final_accuracy.csv": ["optimizer", "column", "mean", "std", "n"],
    "curves.csv": ["run", "claim", "seed", "status", "curve", "step", "value"],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    study = dataclasses.replace(STUDY, grid_quick=TINY_GRID)
    directory = tmp_path_factory.mktemp("claims") / "quick"
    with cf.ThreadPoolExecutor(1) as executor:        # in-process: no worker start-up cost
        result = sweep.run_sweep(study, directory, executor, quick=True, progress=False)
    written = sweep.summarize(study, directory, quick=True)
    return study, directory, result, written


def test_smoke_run_records_every_config(tiny_run):
    study, directory, result, _ = tiny_run
    assert result.failed == 0, (directory / "errors.log").read_text()
    assert result.ran == len(study.configs(quick=True))
    runs = pd.read_csv(directory / "runs.csv")
    assert tuple(runs.columns) == study.columns
    assert set(runs["claim"]) == set(report.ANALYSES)


def test_smoke_run_writes_every_claim_page_figure_and_the_readme(tiny_run):
    _, directory, _, written = tiny_run
    for claim in report.ANALYSES:
        assert (directory / f"{claim}.png") in written
        page = (directory / f"{claim}.md").read_text()
        assert page.startswith("# ") and "**Verdict here: " in page and f"({claim}.png)" in page
    readme = (directory / "README.md").read_text()
    for claim in report.ANALYSES:
        assert f"]({claim}.md)" in readme
    assert (directory / "table.md").exists() and not (directory / "verdicts.png").exists()


def test_smoke_run_tables_have_the_expected_columns(tiny_run):
    _, directory, _, _ = tiny_run
    for name, columns in EXPECTED_COLUMNS.items():
        table = pd.read_csv(directory / name)
        missing = [c for c in columns if c not in table.columns]
        assert not missing, f"{name} lacks {missing}; has {list(table.columns)}"
        for column in {"mean", "std", "n", "value"} & set(columns):
            assert pd.api.types.is_numeric_dtype(table[column]), (name, column)
    verdicts = pd.read_csv(directory / "table_verdicts.csv")
    assert set(verdicts["verdict"]) <= {"undetermined (n=1)", "undetermined (n=0)"}  # 1 seed
    assert len(verdicts) == len(report.ANALYSES) + 2           # 5b: the landscape, 8b: placement


def test_smoke_run_writes_verdicts_csv_undetermined_with_one_seed(tiny_run):
    _, directory, _, written = tiny_run
    assert directory / "verdicts.csv" in written
    verdicts = pd.read_csv(directory / "verdicts.csv")
    assert list(verdicts.columns) == ["study", "claim", "verdict", "n_min", "numbers"]
    assert set(verdicts["study"]) == {"claims"} and len(verdicts) == len(report.ANALYSES) + 2
    assert set(verdicts["verdict"]) == {"undetermined"} and (verdicts["n_min"] <= 1).all()


def test_keras_example_runs_on_scikit_learns_circles_split_in_order():
    sklearn = pytest.importorskip("sklearn.datasets")
    from normkit.data import load_circles_example
    x, y = sklearn.make_circles(n_samples=1000, noise=0.1, random_state=1)
    x_train, y_train, x_test, y_test = load_circles_example(dtype=np.float64)
    np.testing.assert_array_equal(x_train, x[:500])
    np.testing.assert_array_equal(x_test, x[500:])
    np.testing.assert_array_equal(np.concatenate([y_train, y_test]), y)
    # the example's own arguments are the experiment's
    assert experiments.CIRCLES == {"n_samples": 1000, "noise": 0.1, "random_state": 1}
    assert (experiments.CIRCLES_FACTOR, experiments.CIRCLES_TRAIN) == (0.8, 500)


def test_smoke_run_fold_and_precise_statistics_hold_up(tiny_run):
    _, directory, _, _ = tiny_run
    runs = pd.read_csv(directory / "runs.csv")
    assert runs.loc[runs["claim"] == "cost", "fold_error"].dropna().max() < 1e-5
    inference = runs[runs["claim"] == "inference"].iloc[0]
    assert inference["stat_error_precise"] < inference["stat_error"]
