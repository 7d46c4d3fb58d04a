"""The RNN study: LSTM.hidden_gradients against torch autograd and finite differences, the
study's pieces on cases with a known answer, and a smoke run of the whole study on a tiny grid
checking every output file."""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normkit import sweep
from normkit.nn import LSTM, RMSProp
from normkit.testing import check_vjp

STUDIES = Path(__file__).parent.parent / "studies"
STUDY = sweep.load_study(STUDIES / "rnn.py")               # puts studies/ on sys.path
experiments = sys.modules.get("_rnn_experiments") or __import__("_rnn_experiments")
report = sys.modules.get("_rnn_report") or __import__("_rnn_report")

torch = pytest.importorskip("torch")
F = torch.nn.functional

NORMS = ["none", "recurrent_batch", "layer"]


def _lstm(norm, D=2, H=3, T=6, seed=0):
    """float64, random non-trivial parameters (not the structured initialization)."""
    lstm = LSTM(D, H, norm=norm, max_steps=T, dtype=np.float64, seed=seed,
                return_sequences=False)
    rng = np.random.default_rng(seed + 100)
    for key, value in lstm.params.items():
        if key.startswith("gamma"):
            value[...] = rng.uniform(0.2, 0.8, value.shape)
        else:
            value[...] = rng.standard_normal(value.shape) * (0.6 if key.startswith("W") else 0.3)
    return lstm


def _inputs(T=6, N=5, D=2, H=3, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T, N, D)), rng.standard_normal((N, H)) * 0.5,
            rng.standard_normal((N, H)) * 0.5, rng.standard_normal((N, H)))


def _torch_hidden_gradients(lstm, x, h0, c0, d_last):
    """dL/dh_t, t = 0..T, by autograd through a plain PyTorch loop (batch norm in training
    mode with the batch statistics of each step, biased variance, as F.batch_norm)."""
    p = {k: torch.tensor(v) for k, v in lstm.params.items()}
    H, eps, kind = lstm.hidden_size, lstm.eps, lstm.norm

    def norm(v, site):
        if kind == "recurrent_batch":
            return F.batch_norm(v, None, None, p[f"gamma_{site}"], p.get(f"beta_{site}"), True,
                                0.0, eps)
        if kind == "layer":
            return F.layer_norm(v, v.shape[1:], p[f"gamma_{site}"], p[f"beta_{site}"], eps)
        return v

    x = torch.tensor(x)
    h = torch.tensor(h0, requires_grad=True)
    c = torch.tensor(c0)
    states = [h]
    for t in range(x.shape[0]):
        a = norm(h @ p["W_h"], "h") + norm(x[t] @ p["W_x"], "x") + p["b"]
        f, i, o, g = a.split(H, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(norm(c, "c"))
        h.retain_grad()
        states.append(h)
    (h * torch.tensor(d_last)).sum().backward()
    return np.stack([s.grad.numpy() for s in states])


@pytest.mark.parametrize("norm", NORMS)
def test_hidden_gradients_match_torch_autograd(norm):
    lstm = _lstm(norm)
    x, h0, c0, d_last = _inputs()
    expected = _torch_hidden_gradients(lstm, x, h0, c0, d_last)
    actual = lstm.hidden_gradients(x, d_last, h0=h0, c0=c0)
    assert actual.shape == (7, 5, 3)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)
    assert np.abs(expected[0]).max() > 1e-3              # a gradient that reaches the start


def _torch_tanh_rnn_gradients(rnn, x, h0, d_last):
    """dL/dh_t of the batch-normalized tanh RNN by autograd (F.batch_norm in training mode)."""
    p = {k: torch.tensor(getattr(rnn, k)) for k in ("W_x", "W_h", "b", "gamma_x", "gamma_h")}
    x = torch.tensor(x)
    h = torch.tensor(h0, requires_grad=True)
    states = [h]
    for t in range(x.shape[0]):
        a = (F.batch_norm(h @ p["W_h"], None, None, p["gamma_h"], None, True, 0.0, rnn.eps)
             + F.batch_norm(x[t] @ p["W_x"], None, None, p["gamma_x"], None, True, 0.0, rnn.eps)
             + p["b"])
        h = torch.tanh(a)
        h.retain_grad()
        states.append(h)
    (h * torch.tensor(d_last)).sum().backward()
    return np.stack([s.grad.numpy() for s in states])


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_tanh_rnn_hidden_gradients_match_torch_and_finite_differences(gamma):
    """The gradient-flow model of Cooijmans et al.'s Fig. 1a: BPTT through each step's batch
    statistics, against autograd and (dL/dh0) central differences."""
    rnn = experiments.BNTanhRNN(2, 3, gamma, seed=0)
    rng = np.random.default_rng(4)
    rnn.W_h = rng.standard_normal((3, 3)) * 0.8          # not the identity: every path counts
    rnn.b = rng.standard_normal(3) * 0.3
    x, h0, _, d_last = _inputs()
    expected = _torch_tanh_rnn_gradients(rnn, x, h0, d_last)
    actual = rnn.hidden_gradients(x, d_last, h0=h0)
    assert actual.shape == (7, 5, 3)
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)
    assert np.abs(expected[0]).max() > 1e-4
    check_vjp(lambda h0: rnn.forward(x, h0)[0][-1], {"h0": h0}, {"h0": actual[0]}, d_last)


def test_tanh_rnn_is_only_a_gradient_flow_model():
    with pytest.raises(ValueError, match="gradient"):
        STUDY.config(model="bn_tanh_rnn", experiment="classify", seed=0)


@pytest.mark.parametrize("norm", NORMS)
def test_hidden_gradient_at_t0_matches_finite_differences_and_backward(norm):
    lstm = _lstm(norm)
    x, h0, c0, d_last = _inputs()
    dh = lstm.hidden_gradients(x, d_last, h0=h0, c0=c0)

    def last_state(h0):
        return lstm.forward(x, True, h0=h0, c0=c0)

    check_vjp(last_state, {"h0": h0}, {"h0": dh[0]}, d_last)
    lstm.forward(x, True, h0=h0, c0=c0)
    lstm.backward(d_last)
    np.testing.assert_allclose(dh[0], lstm.dh0, rtol=1e-10, atol=1e-13)


def test_hidden_gradients_leave_parameters_and_running_statistics_alone():
    lstm = _lstm("recurrent_batch")
    x, h0, c0, d_last = _inputs()
    lstm.forward(x, True, h0=h0, c0=c0)                  # running statistics away from init
    params = {k: v.copy() for k, v in lstm.params.items()}
    state = {k: v.copy() for k, v in lstm.state.items()}
    lstm.hidden_gradients(x, d_last, h0=h0, c0=c0)
    for key, value in params.items():
        np.testing.assert_array_equal(lstm.params[key], value)
    for key, value in state.items():
        np.testing.assert_array_equal(lstm.state[key], value)
    with pytest.raises(RuntimeError, match="before forward"):
        lstm.backward(d_last)                            # the saved forward was dropped


def test_hidden_gradients_refuse_bad_input():
    lstm = _lstm("recurrent_batch")
    x, h0, c0, d_last = _inputs()
    with pytest.raises(ValueError, match="d_last must have shape"):
        lstm.hidden_gradients(x, d_last[:, :2])
    with pytest.raises(ValueError, match="x has 9 time steps"):
        lstm.hidden_gradients(np.zeros((9, 5, 2)), d_last)
    with pytest.raises(ValueError, match="more than 1 value"):
        lstm.hidden_gradients(x[:, :1], d_last[:1])


def test_lstm_parameters_are_c_contiguous_for_an_optimizer():
    lstm = LSTM(2, 8, norm="recurrent_batch", max_steps=4)     # W_x built from transposes
    assert all(v.flags.c_contiguous for v in lstm.params.values())
    RMSProp(lstm, lr=1e-3)                                      # refused non-contiguous before


# ---------------------------------------------------------------------------------------------
# The study's pieces
# ---------------------------------------------------------------------------------------------

def test_variable_lengths_resample_each_sequence_and_pad_at_the_front():
    x = np.tile(np.linspace(-1, 1, 64, dtype=np.float32), (20, 1))[:, :, None]   # (20, 64, 1)
    out = experiments.variable_lengths(x, np.random.default_rng(0), 32)
    lengths = (~np.isnan(out[:, :, 0])).sum(axis=1)
    assert lengths.min() >= 32 and lengths.max() <= 64 and len(set(lengths)) > 3
    for row, length in zip(out[:, :, 0], lengths):
        assert np.isnan(row[:64 - length]).all()                  # padding first
        np.testing.assert_allclose(row[64 - length:], np.linspace(-1, 1, length), atol=1e-6)


def test_sequence_model_turns_nan_into_a_mask_or_into_zeros():
    x = np.random.default_rng(0).standard_normal((4, 6, 1)).astype(np.float32)
    x[0, :2] = np.nan
    for use_mask in (True, False):
        model = experiments.build_model("bn_lstm", inputs=1, outputs=3, hidden=5, max_steps=6,
                                        gamma=0.1, per_step=True, seed=0, use_mask=use_mask)
        xt, mask = model.time_major(x)
        assert xt.shape == (6, 4, 1) and not np.isnan(xt).any() and (xt[:2, 0] == 0).all()
        if use_mask:
            assert mask.sum() == 22 and not mask[:2, 0].any()
        else:
            assert mask is None
    # two rows valid at step 0 of 3 would be fine; one alone is masked out in training
    x3 = x.copy()
    x3[1:, :1] = np.nan                                           # only row 0 at step 0
    x3[0, :2] = 1.0
    model.use_mask = True
    model.forward(x3, training=True)                              # no ValueError
    assert model.params["lstm.W_x"].flags.c_contiguous


def test_stat_shift_is_zero_for_the_population_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8, 1)).astype(np.float32)
    x[:10, :3] = np.nan
    model = experiments.build_model("bn_lstm", inputs=1, outputs=3, hidden=4, max_steps=8,
                                    gamma=0.1, per_step=True, seed=0)
    norm = model.lstm.norms["x"]
    xt = np.swapaxes(x, 0, 1).astype(np.float64)
    w = model.lstm.params["W_x"].astype(np.float64)
    for t in range(8):
        valid = xt[t][~np.isnan(xt[t, :, 0])] @ w
        norm.state["running_mean"][t] = valid.mean(axis=0)
        norm.state["running_var"][t] = valid.var(axis=0, ddof=1)
    shift = experiments.stat_shift(model, x)
    assert shift["shift_mean"] < 1e-6 and shift["shift_var"] < 1e-6
    everything = xt[~np.isnan(xt[:, :, 0])] @ w                  # all valid positions (n, 4H)
    scale = everything.var(axis=0, ddof=1).mean()
    norm.state["running_mean"][...] += 0.5 * np.sqrt(scale)      # half the overall spread
    norm.state["running_var"][...] += 0.25 * scale
    shift = experiments.stat_shift(model, x)
    assert shift["shift_mean"] == pytest.approx(0.5, rel=1e-4)
    assert shift["shift_var"] == pytest.approx(0.25, rel=1e-4)


def test_mean_squared_error_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    predictions, targets = rng.standard_normal((7, 1)), rng.standard_normal(7)
    criterion = experiments.MeanSquaredError()
    loss = criterion.forward(predictions, targets)
    assert loss == pytest.approx(np.mean((predictions[:, 0] - targets) ** 2))
    check_vjp(lambda p: np.array(criterion.forward(p, targets)), {"p": predictions},
              {"p": criterion.backward()}, np.array(1.0))


def test_config_refuses_unknown_choices_and_bn_options_on_other_models():
    with pytest.raises(ValueError, match="experiment must be one of"):
        STUDY.config(experiment="nope", seed=0)
    with pytest.raises(ValueError, match="BN-LSTM options"):
        STUDY.config(model="lstm", per_step=False, seed=0)


def test_grids_cover_every_experiment():
    for quick in (True, False):
        configs = STUDY.configs(quick=quick)
        assert {c.experiment for c in configs} == set(experiments.RUNS)
        assert any(not c.per_step for c in configs) and any(not c.use_mask for c in configs)
        assert {c.batch_size for c in configs} > {64, 2}


# ---------------------------------------------------------------------------------------------
# A smoke run of the whole study
# ---------------------------------------------------------------------------------------------

TINY = dict(hidden=[4], epochs=[2], train_size=[128], seed=[0, 1])
TINY_GRID = [
    dict(experiment=["classify"], task=["sequential", "permuted"],
         model=["lstm", "ln_lstm", "ln_lstm_no_x"], **TINY),
    dict(experiment=["classify"], task=["sequential", "permuted"], model=["bn_lstm"],
         gamma=[0.1, 1.0], **TINY),
    dict(experiment=["classify"], task=["permuted"], model=["bn_lstm"], per_step=[False], **TINY),
    dict(experiment=["classify"], task=["permuted"], model=["lstm", "bn_lstm", "ln_lstm"],
         batch_size=[4], **TINY),
    dict(experiment=["gradient"], model=["bn_tanh_rnn", "bn_lstm"], gamma=[0.1, 1.0], hidden=[4],
         seed=[0, 1]),
    dict(experiment=["adding"], model=["lstm", "bn_lstm", "ln_lstm"], hidden=[4], epochs=[1],
         train_size=[128], seed=[0, 1]),
    dict(experiment=["padding"], model=["bn_lstm"], use_mask=[True, False], **TINY),
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    study = dataclasses.replace(STUDY, grid_quick=TINY_GRID)
    directory = tmp_path_factory.mktemp("rnn") / "quick"
    with cf.ThreadPoolExecutor(1) as executor:           # in-process: no worker start-up cost
        result = sweep.run_sweep(study, directory, executor, quick=True, progress=False)
    written = sweep.summarize(study, directory, quick=True)
    return study, directory, result, written


def test_smoke_run_records_every_config_with_its_metrics(tiny_run):
    study, directory, result, _ = tiny_run
    assert result.failed == 0, (directory / "errors.log").read_text()
    assert result.ran == len(study.configs(quick=True))
    runs = pd.read_csv(directory / "runs.csv")
    assert tuple(runs.columns) == study.columns
    ok = runs[runs["status"] == "ok"]
    classify = ok[ok["experiment"] == "classify"]
    assert classify[["test_acc", "acc_epoch_01", "acc_epoch_02", "epochs_to_target"]].notna().all().all()
    assert classify["acc_epoch_03"].isna().all()
    gradient = ok[ok["experiment"] == "gradient"]
    assert gradient[[f"grad_t{t:02d}" for t in range(64)]].gt(0).all().all()
    np.testing.assert_allclose(gradient["grad_ratio"], gradient["grad_t00"] / gradient["grad_t63"],
                               rtol=1e-4)
    assert ok[ok["experiment"] == "adding"][["mse_T50", "mse_T400"]].notna().all().all()
    assert ok[ok["experiment"] == "padding"][["shift_mean", "shift_var"]].notna().all().all()


def test_smoke_run_writes_tables_figures_and_the_readme(tiny_run):
    _, directory, _, written = tiny_run
    for key in ("classify", "gradient", "shared", "adding", "small_batch", "padding"):
        assert (directory / f"{key}.png") in written, key
    table = (directory / "table.md").read_text()
    for title in ("1. Sequence classification", "2. Gradient flow", "3. Per-step",
                  "4. Longer sequences", "5. Small batches", "6. Variable lengths"):
        assert title in table
    readme = (directory / "README.md").read_text()
    assert "## Verdicts" in readme and "published, MNIST 784 steps" in readme
    for claim in ("converges faster", "permuted task", "vanish", "Sharing statistics",
                  "beyond the training length", "batch-normalized tanh RNN", "rank-one input"):
        assert claim in readme
    csvs = sorted(p.name for p in directory.glob("table*.csv"))
    assert len(csvs) >= 8, csvs


def test_smoke_run_main_table_has_models_by_tasks_and_the_published_rows(tiny_run):
    _, directory, _, _ = tiny_run
    tables = report.tables(pd.read_csv(directory / "runs.csv"))
    main = next(t for title, t in tables.items() if title.startswith("1.") and "test accuracy" in title)
    assert list(main["model"][:5]) == ["LSTM", "BN-LSTM γ=0.1", "BN-LSTM γ=1.0", "LN-LSTM",
                                       "LN-LSTM, no input LN"]
    assert set(main.columns) == {"model", "sequential digits (64 steps)",
                                 "permuted digits (64 steps)"}
    published = main[main["model"].str.contains("published")]
    assert list(published["permuted digits (64 steps)"]) == ["90.2", "95.4"]


def test_verdicts_use_the_shared_rules_and_need_three_seeds():
    frame = pd.DataFrame({"variant": ["A"] * 3 + ["B"] * 3, "seed": [0, 1, 2] * 2,
                          "status": "ok", "test_acc": [0.50, 0.52, 0.48, 0.55, 0.57, 0.53]})
    rule = report.Difference("B higher", "test_acc", report._arm("B"), report._arm("A"), "higher")
    assert rule.judge(frame).verdict == "holds"                 # 5 points, s.e. ~1.6
    assert rule.judge(frame[frame["seed"] < 2]).label == "undetermined (n=2)"


def test_smoke_run_writes_verdicts_csv(tiny_run):
    _, directory, _, written = tiny_run
    assert directory / "verdicts.csv" in written
    verdicts = pd.read_csv(directory / "verdicts.csv")
    assert list(verdicts.columns) == ["study", "claim", "verdict", "n_min", "numbers"]
    assert set(verdicts["study"]) == {"rnn"} and len(verdicts) >= 5
    assert set(verdicts["verdict"]) == {"undetermined"}          # two seeds
