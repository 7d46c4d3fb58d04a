"""Tables, figures and verdicts of the RNN study, computed from runs.csv.

Each experiment has a ``section_<name>(frame) -> Section`` (its tables, figure and, where a
published claim is tested, verdicts from a stated rule). :func:`tables`, :func:`figures` and
:func:`reports` are the study's hooks. Verdicts come from the rule objects of
``_verdicts`` (a difference counts only beyond two standard errors of the difference of the
means over seeds, Welch; fewer than 3 seeds in a compared cell is undetermined).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from normkit.sweep import Stat, legends_outside, markdown_table

from _verdicts import Combined, Difference, Level, Outcome, arm, verdicts_csv
from _verdicts import difference as _difference

TASK_NAMES = {"sequential": "sequential digits (64 steps)", "permuted": "permuted digits (64 steps)",
              "mnist1d": "MNIST-1D (40 steps)"}
LN_NO_X = "LN-LSTM, no input LN"
COLORS = {"LSTM": "tab:gray", "BN-LSTM γ=0.1": "tab:blue", "BN-LSTM γ=1.0": "tab:cyan",
          "LN-LSTM": "tab:orange", LN_NO_X: "tab:red",
          "BN-LSTM γ=0.1, shared stats": "tab:purple"}
#: Cooijmans et al. (2017), Table 1: test accuracy (%), MNIST read pixel by pixel (784 steps).
PUBLISHED = {"LSTM": {"sequential": 98.9, "permuted": 90.2},
             "BN-LSTM γ=0.1": {"sequential": 99.0, "permuted": 95.4}}
SCALE_NOTE = ("Scale of the full grid (the quick grid uses 32 units throughout): one LSTM "
              "layer of 64 units (100 in the gradient-flow runs at initialization) and a "
              "linear head; scikit-learn's 8x8 digits read pixel by pixel "
              "(64 steps, 1347 training images) stand in for MNIST (784 steps, 60k images); "
              "RMSProp, gradient clipping, identity W_h and noise on h0 as Cooijmans et al. "
              "(2017). The budget and what was trimmed are in the docstring of "
              "`studies/rnn.py`.")
SIGNIFICANCE = ("A difference counts only if it exceeds two standard errors of the difference "
                "of the means over seeds (Welch); a verdict needs at least 3 seeds in every "
                "compared cell, else it reads \"undetermined (n=...)\". verdicts.csv has the "
                "verdicts with the numbers each rule read.")


@dataclasses.dataclass
class Verdict:
    claim: str
    source: str
    rule: str
    outcome: Outcome
    evidence: str

    @property
    def verdict(self) -> str:
        return self.outcome.label


@dataclasses.dataclass
class Section:
    key: str
    title: str
    setup: str
    tables: dict[str, pd.DataFrame]
    draw: Callable | None = None
    verdicts: list[Verdict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    figsize: tuple[float, float] = (10, 3.6)
    caption: str = ("Lines: mean over the seeds; bands: ± 1 standard deviation over the seeds "
                    "(n as in the table).")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def label(row) -> str:
    """The model variant's name in tables: LSTM, BN-LSTM γ=g (, shared stats), LN-LSTM,
    LN-LSTM without input LN, BN tanh RNN γ=g."""
    if row["model"] == "lstm":
        return "LSTM"
    if row["model"] == "ln_lstm":
        return "LN-LSTM"
    if row["model"] == "ln_lstm_no_x":
        return LN_NO_X
    if row["model"] == "bn_tanh_rnn":
        return f"BN tanh RNN γ={float(row['gamma']):.1f}"
    name = f"BN-LSTM γ={float(row['gamma']):.1f}"
    return name if _true(row["per_step"]) else name + ", shared stats"


def _true(value) -> bool:
    return value is True or str(value).lower() in ("true", "1")


def _with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame.assign(variant=pd.Series(dtype=str))
    return frame.assign(variant=frame.apply(label, axis=1))


def _arm(variant: str, **where) -> object:
    return arm(variant, variant=variant, **where)


def _values(frame: pd.DataFrame, column: str, **where) -> pd.Series:
    part = _ok(frame)
    for key, value in where.items():
        part = part[part[key] == value]
    return part[column].dropna().astype(float)


def _diff_text(lower: pd.Series, higher: pd.Series, scale: float = 100, digits: int = 1,
               unit: str = " points") -> str:
    difference, error = _difference(lower, higher)
    if math.isnan(difference):
        return "—"
    return f"{scale * difference:+.{digits}f} ± {scale * error:.{digits}f}{unit}"


def _pm(values: pd.Series, scale: float = 1.0, digits: int = 3) -> Stat:
    """mean ± std of the values times ``scale`` (a table cell that keeps its numbers)."""
    return Stat.of(values.dropna().astype(float), scale, digits)


def _cell(part: pd.DataFrame, column: str, scale: float = 1.0, digits: int = 3) -> Stat:
    """mean ± std over the ok runs, with the count of diverged/failed runs if any."""
    return Stat.of(_ok(part)[column].dropna().astype(float), scale, digits,
                   diverged=int((part["status"] == "diverged").sum()),
                   failed=int((part["status"] == "failed").sum()))


def _seeds(frame: pd.DataFrame) -> int:
    return int(frame["seed"].nunique()) if not frame.empty else 0


def _one(frame: pd.DataFrame, column: str):
    values = sorted(frame[column].dropna().unique()) if column in frame else []
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "—"


def _integer_epochs(axes) -> None:
    from matplotlib.ticker import MaxNLocator
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _curve_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("acc_epoch_") and frame[c].notna().any()]


# ---------------------------------------------------------------------------------------------
# Selections: which runs belong to which experiment
# ---------------------------------------------------------------------------------------------

def _classify(frame):
    part = frame[frame["experiment"] == "classify"]
    return _with_labels(part)


def main_runs(frame):
    """Experiment 1: batch 64, per-step statistics."""
    part = _classify(frame)
    return part[(part["batch_size"] == 64) & part["per_step"].map(_true)]


def shared_runs(frame):
    """Experiment 3: BN-LSTM γ=0.1 on the permuted digits at batch 64, per-step or shared."""
    part = _classify(frame)
    return part[(part["batch_size"] == 64) & (part["task"] == "permuted")
                & (part["model"] == "bn_lstm") & (part["gamma"] == 0.1)]


def small_batch_runs(frame):
    part = _classify(frame)
    return part[(part["batch_size"] != 64) & part["per_step"].map(_true)]


# ---------------------------------------------------------------------------------------------
# 1. Sequence classification
# ---------------------------------------------------------------------------------------------

VARIANT_ORDER = ["LSTM", "BN-LSTM γ=0.1", "BN-LSTM γ=1.0", "LN-LSTM", LN_NO_X]


def _ordered(variants) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in set(variants)]
    return known + sorted(set(variants) - set(known))


def section_classify(frame: pd.DataFrame) -> Section | None:
    runs = main_runs(frame)
    if runs.empty:
        return None
    tasks = [t for t in TASK_NAMES if t in set(runs["task"])]
    variants = _ordered(runs["variant"].unique())

    def pivot(column, scale=100.0, digits=3):
        table = pd.DataFrame({TASK_NAMES[t]: [_cell(runs[(runs["variant"] == v)
                                                          & (runs["task"] == t)], column, scale,
                                                     digits) for v in variants]
                              for t in tasks}, index=pd.Index(variants, name="model"))
        return table.reset_index()

    accuracy = pivot("test_acc")
    published = pd.DataFrame([{"model": f"{name} — published, MNIST 784 steps",
                               **{TASK_NAMES[t]: (f"{v[t]:.1f}" if t in v else "—")
                                  for t in tasks}} for name, v in PUBLISHED.items()])
    tables = {"test accuracy (%), mean ± std over seeds": pd.concat([accuracy, published],
                                                                    ignore_index=True),
              "mean test accuracy over the epochs (%; the area under the learning curve)":
                  pivot("curve_mean_acc"),
              "epochs to the target accuracy (epochs + 1 if never reached)":
                  pivot("epochs_to_target", 1.0, 3)}

    verdicts = []
    faster, lines = [], []
    for task in tasks:
        bn = _values(runs, "curve_mean_acc", variant="BN-LSTM γ=0.1", task=task)
        plain = _values(runs, "curve_mean_acc", variant="LSTM", task=task)
        if bn.empty or plain.empty:
            continue
        faster.append(Difference(task, "curve_mean_acc", _arm("BN-LSTM γ=0.1", task=task),
                                 _arm("LSTM", task=task), "higher"))
        lines.append(f"{task}: BN-LSTM − LSTM {_diff_text(plain, bn)}")
    if faster:
        verdicts.append(Verdict(
            "BN-LSTM converges faster than LSTM", "Cooijmans et al. (2017), Sec. 5: \"faster "
            "convergence\" in every task",
            "per task, the mean test accuracy over the epochs (area under the learning curve) of "
            "BN-LSTM γ=0.1 is higher than LSTM's; holds if on every task, mixed if on some",
            Combined("faster", faster, "each").judge(runs), "; ".join(lines)))
    bn = _values(runs, "test_acc", variant="BN-LSTM γ=0.1", task="permuted")
    plain = _values(runs, "test_acc", variant="LSTM", task="permuted")
    if not bn.empty and not plain.empty:
        verdicts.append(Verdict(
            "BN-LSTM is more accurate than LSTM on the permuted task",
            "Cooijmans et al. (2017), Table 1: permuted MNIST 95.4 % vs 90.2 %",
            "final test accuracy (evaluation mode) of BN-LSTM γ=0.1 higher than LSTM's on the "
            "permuted digits",
            Difference("accuracy", "test_acc", _arm("BN-LSTM γ=0.1", task="permuted"),
                       _arm("LSTM", task="permuted"), "higher").judge(runs),
            f"BN-LSTM {_pm(bn, 100)} %, LSTM {_pm(plain, 100)} %, difference "
            f"{_diff_text(plain, bn)}"))
    ln = _values(runs, "test_acc", variant="LN-LSTM", task="permuted")
    if not bn.empty and not ln.empty:
        verdicts.append(Verdict(
            "(measured) BN-LSTM is more accurate than LN-LSTM on the permuted task",
            "not claimed by either paper",
            "final test accuracy of BN-LSTM γ=0.1 higher than LN-LSTM's",
            Difference("accuracy", "test_acc", _arm("BN-LSTM γ=0.1", task="permuted"),
                       _arm("LN-LSTM", task="permuted"), "higher").judge(runs),
            f"BN-LSTM − LN-LSTM {_diff_text(ln, bn)}"))
    rank_one, lines = [], []
    for task in tasks:
        with_x = _values(runs, "test_acc", variant="LN-LSTM", task=task)
        without_x = _values(runs, "test_acc", variant=LN_NO_X, task=task)
        if with_x.empty or without_x.empty:
            continue
        rank_one.append(Difference(task, "test_acc", _arm(LN_NO_X, task=task),
                                   _arm("LN-LSTM", task=task), "higher"))
        lines.append(f"{task}: without − with {_diff_text(with_x, without_x)}")
    if rank_one:
        verdicts.append(Verdict(
            "(measured) layer norm of the rank-one input term costs accuracy",
            "not claimed: Ba et al. (2016) normalize the input term too; with one input value "
            "per step its layer norm keeps only the sign of x_t",
            "per task, final test accuracy of the LN-LSTM without layer norm on x_t W_x higher "
            "than the LN-LSTM's; holds if on every task, mixed if on some",
            Combined("rank one", rank_one, "each").judge(runs), "; ".join(lines)))

    def draw(figure):
        axes_row = [figure.add_subplot(1, len(tasks), i + 1) for i in range(len(tasks))]
        for axes, task in zip(axes_row, tasks):
            part = runs[runs["task"] == task]
            for variant in variants:
                _curve_band(axes, part[part["variant"] == variant], variant,
                            COLORS.get(variant))
            axes.set(xlabel="epoch", ylabel="test accuracy (%)", title=TASK_NAMES[task])
            _integer_epochs(axes)
            axes.title.set_fontsize(9)
            axes.legend(fontsize=7)

    return Section(
        "classify", "1. Sequence classification",
        f"Hidden {_one(runs, 'hidden')}, batch 64, epochs {_one(runs, 'epochs')}, "
        f"{_seeds(runs)} seeds; test accuracy in evaluation mode (population statistics). "
        f"The published rows are Cooijmans et al.'s Table 1 on MNIST (784 steps, 100 units, "
        f"60k training images): a reference at a different scale, not a target for the digits "
        f"(64 steps, 1347 training images).",
        tables, draw, verdicts, figsize=(4.2 * max(1, len(tasks)), 3.6))


# ---------------------------------------------------------------------------------------------
# 2. Gradient flow
# ---------------------------------------------------------------------------------------------

def _curve_band(axes, part: pd.DataFrame, label: str, color=None, scale: float = 100.0):
    """The ok runs' per-epoch test accuracy: mean line, ± 1 std band over the seeds."""
    columns = _curve_columns(part)
    values = _ok(part)[columns].astype(float)
    if values.empty:
        return
    epochs = [int(c.rsplit("_", 1)[1]) for c in columns]
    mean, std = values.mean(), values.std().fillna(0)
    line, = axes.plot(epochs, scale * mean, marker="o", markersize=2.5, label=label, color=color)
    axes.fill_between(epochs, scale * (mean - std), scale * (mean + std), alpha=0.15,
                      color=line.get_color())


def _grad_columns(frame):
    return [c for c in frame.columns if c.startswith("grad_t") and frame[c].notna().any()]


VANISHING_RATIO = 0.1


def _geometric_curve(part: pd.DataFrame, columns: list[str]) -> pd.Series:
    return np.exp(np.log(part[columns].astype(float)).mean())


def section_gradient(frame: pd.DataFrame) -> Section | None:
    runs = _with_labels(frame[frame["experiment"] == "gradient"])
    runs = _ok(runs)
    if runs.empty:
        return None
    columns = _grad_columns(runs)
    T = len(columns)
    variants = sorted(runs["variant"].unique(),
                      key=lambda v: (not v.startswith("BN tanh"), not v.startswith("BN"), v))
    rows = []
    for variant in variants:
        part = runs[runs["variant"] == variant]
        geo = _geometric_curve(part, columns)
        log_ratio = np.log10(part["grad_ratio"].astype(float))
        rows.append({"model": variant, "‖dL/dh_0‖": f"{geo.iloc[0]:.3g}",
                     f"‖dL/dh_{T // 2}‖": f"{geo.iloc[T // 2]:.3g}",
                     f"‖dL/dh_{T - 1}‖": f"{geo.iloc[-1]:.3g}",
                     "minimum over t (at t)": f"{geo.min():.3g} ({int(np.argmin(geo.values))})",
                     f"‖dL/dh_0‖ / ‖dL/dh_{T - 1}‖": f"{10 ** log_ratio.mean():.3g}",
                     "log10 ratio, mean ± std": _pm(log_ratio, 1, 3)})
    table = pd.DataFrame(rows)
    logged = runs.assign(log10_ratio=np.log10(runs["grad_ratio"].astype(float)))
    verdicts = []
    for model, name, source in (
            ("BN tanh RNN", "γ=1.0 makes dL/dh_t vanish over time in a batch-normalized tanh "
             "RNN, γ=0.1 does not", "Cooijmans et al. (2017), Sec. 4 and Fig. 1a (a "
             "batch-normalized tanh RNN on sequential MNIST, at initialization)"),
            ("BN-LSTM", "(second measurement) the same in the BN-LSTM",
             "not claimed: Fig. 1a is about the tanh RNN; the LSTM's cell path carries "
             "gradients past the saturated tanh")):
        small = np.log10(_values(runs, "grad_ratio", variant=f"{model} γ=0.1"))
        large = np.log10(_values(runs, "grad_ratio", variant=f"{model} γ=1.0"))
        if small.empty or large.empty:
            continue
        rule = Combined("gradient", [
            Difference("γ=0.1 flows better", "log10_ratio", _arm(f"{model} γ=0.1"),
                       _arm(f"{model} γ=1.0"), "higher"),
            Level("γ=1.0 vanishes", "log10_ratio", _arm(f"{model} γ=1.0"),
                  math.log10(VANISHING_RATIO), "lower"),
            Level("γ=0.1 does not vanish", "log10_ratio", _arm(f"{model} γ=0.1"),
                  math.log10(VANISHING_RATIO), "no_worse_higher")], "each")
        verdicts.append(Verdict(
            name, source,
            f"log10(‖dL/dh_0‖ / ‖dL/dh_{T - 1}‖) of the {model} higher for γ=0.1 than for "
            f"γ=1.0; at γ=1.0 the ratio below {VANISHING_RATIO:g} (vanishing by more than a "
            f"decade over {T} steps); at γ=0.1 not below {VANISHING_RATIO:g} (the paper: "
            f"\"nearly constant\"); each beyond two standard errors; holds if all three, "
            f"mixed if some",
            rule.judge(logged),
            f"ratio γ=0.1: {10 ** small.mean():.3g}, γ=1.0: {10 ** large.mean():.3g} "
            f"(log10 difference {_diff_text(large, small, 1, 2, '')})"))

    def draw(figure):
        cmap = __import__("matplotlib").colormaps["viridis"]
        panels = [("BN tanh RNN (Cooijmans et al., Fig. 1a), sequential digits",
                   [v for v in variants if v.startswith("BN tanh")]),
                  ("LSTMs (second measurement, permuted digits)",
                   [v for v in variants if not v.startswith("BN tanh")])]
        panels = [(title, names) for title, names in panels if names]
        for k, (title, names) in enumerate(panels):
            axes = figure.add_subplot(1, len(panels), k + 1)
            bn = [v for v in names if v.startswith("BN")]
            for variant in names:
                logs = np.log(runs.loc[runs["variant"] == variant, columns].astype(float))
                style = (dict(color=cmap(bn.index(variant) / max(1, len(bn) - 1)))
                         if variant in bn else dict(color=COLORS.get(variant), linestyle="--"))
                centre, spread = logs.mean(), logs.std().fillna(0)
                axes.plot(range(T), np.exp(centre.values), label=variant, **style)
                axes.fill_between(range(T), np.exp((centre - spread).values),
                                  np.exp((centre + spread).values), alpha=0.12,
                                  color=style["color"])
            axes.set(yscale="log", xlabel="t", ylabel="‖dLoss/dh_t‖ (geometric mean over seeds)",
                     title=f"{title}, hidden {_one(runs, 'hidden')}")
            axes.title.set_fontsize(9)
            axes.legend(fontsize=7)

    return Section(
        "gradient", "2. Gradient flow against γ",
        f"At initialization (training mode, batch statistics), one batch of 64 digits "
        f"(the tanh RNN on the sequential digits, as the paper's Sec. 4 on sequential MNIST; "
        f"the LSTMs on the permuted digits), hidden {_one(runs, 'hidden')}, "
        f"{_seeds(runs)} seeds; ‖dLoss/dh_t‖ is the "
        f"Frobenius norm over the batch of the gradient reaching the output of step t, "
        f"geometric mean over seeds. The verdict rests on the batch-normalized tanh RNN "
        f"h_t = tanh(BN(h_(t-1) W_h; γ) + BN(x_t W_x; γ) + b), the model of Cooijmans et al.'s "
        f"Fig. 1a (backpropagation through each step's batch statistics); the BN-LSTM, LSTM "
        f"and LN-LSTM curves (normkit.nn.LSTM.hidden_gradients) are a second measurement. The "
        f"ratio of the first to the last step summarizes the figure; the minimum over t shows "
        f"how deep the gradient dips in between. An LSTM curve can rise again towards t=0: the "
        f"first cells c_t have a small spread over the batch and the batch norm on c_t divides "
        f"by it.",
        {"gradient norm at initialization": table}, draw, verdicts, figsize=(11, 4),
        caption="Lines: geometric mean over the seeds; bands: the geometric mean times and "
                "divided by one geometric standard deviation over the seeds; log axis.")


# ---------------------------------------------------------------------------------------------
# 3. Per-step against shared statistics
# ---------------------------------------------------------------------------------------------

def section_shared(frame: pd.DataFrame) -> Section | None:
    runs = shared_runs(frame)
    if runs.empty or runs["per_step"].map(_true).all():
        return None
    runs = runs.assign(statistics=runs["per_step"].map(
        lambda p: "per step" if _true(p) else "shared over steps"))
    rows = [{"statistics": s, "test accuracy (%)": _cell(part, "test_acc", 100),
             "train accuracy (%)": _cell(part, "train_acc", 100),
             "mean accuracy over epochs (%)": _cell(part, "curve_mean_acc", 100)}
            for s, part in runs.groupby("statistics", sort=False)]
    per_step = _values(runs, "test_acc", statistics="per step")
    shared = _values(runs, "test_acc", statistics="shared over steps")
    verdicts = []
    if not per_step.empty and not shared.empty:
        verdicts.append(Verdict(
            "Sharing statistics over time severely degrades BN-LSTM",
            "Cooijmans et al. (2017), Sec. 4: averaging statistics over time \"severely "
            "degrades performance\"",
            "test accuracy with per-step statistics higher than with one shared set",
            Difference("per step", "test_acc", arm("per step", statistics="per step"),
                       arm("shared", statistics="shared over steps"), "higher").judge(runs),
            f"per step {_pm(per_step, 100)} %, shared {_pm(shared, 100)} %, difference "
            f"{_diff_text(shared, per_step)}"))

    def draw(figure):
        axes = figure.add_subplot()
        for s, part in runs.groupby("statistics", sort=False):
            _curve_band(axes, part, s)
        axes.set(xlabel="epoch", ylabel="test accuracy (%)",
                 title="BN-LSTM γ=0.1, permuted digits")
        _integer_epochs(axes)
        axes.legend(fontsize=8)

    return Section(
        "shared", "3. Per-step against shared statistics",
        f"BN-LSTM γ=0.1 on the permuted digits, as in experiment 1, with ``per_step=False``: "
        f"one set of running statistics for all steps (used at test time); in training the "
        f"input term is normalized with the statistics of all steps of the batch together, "
        f"the recurrent term and the cell still with each step's batch statistics (pooling "
        f"those would need the future steps). {_seeds(runs)} seeds.",
        {"per-step against shared statistics": pd.DataFrame(rows)}, draw, verdicts,
        figsize=(5.5, 3.6))


# ---------------------------------------------------------------------------------------------
# 4. The adding problem beyond the training length
# ---------------------------------------------------------------------------------------------

def _mse_columns(frame):
    columns = [c for c in frame.columns if c.startswith("mse_T") and frame[c].notna().any()]
    return sorted(columns, key=lambda c: int(c[5:]))


def section_adding(frame: pd.DataFrame) -> Section | None:
    runs = _with_labels(frame[frame["experiment"] == "adding"])
    if runs.empty:
        return None
    columns = _mse_columns(runs)
    variants = _ordered(runs["variant"].unique())
    table = pd.DataFrame({f"T={c[5:]}": [_cell(runs[runs["variant"] == v], c, 1, 3)
                                         for v in variants] for c in columns},
                         index=pd.Index(variants, name="model")).reset_index()
    verdicts = []
    beyond = [c for c in columns if int(c[5:]) > int(columns[0][5:])] if columns else []
    bn_name = next((v for v in variants if v.startswith("BN")), None)
    if beyond and bn_name and "LN-LSTM" in variants:
        rule = Combined("beyond", [Difference(f"T={c[5:]}", c, _arm("LN-LSTM"), _arm(bn_name),
                                              "lower") for c in beyond], "each")
        verdicts.append(Verdict(
            "LN-LSTM generalizes beyond the training length better than BN-LSTM",
            "Ba et al. (2016): no per-step statistics, so no problem with test sequences longer "
            "than the training ones; Cooijmans et al. use step T_max's statistics beyond it",
            f"test MSE of LN-LSTM lower than BN-LSTM's at each T > {columns[0][5:]}; holds if "
            f"at every such T, mixed if at some",
            rule.judge(runs),
            "; ".join(f"T={c[5:]}: LN {_pm(_values(runs, c, variant='LN-LSTM'))}, BN "
                      f"{_pm(_values(runs, c, variant=bn_name))}" for c in beyond)))
        bn50 = _values(runs, columns[0], variant=bn_name)
        bn_long = _values(runs, beyond[-1], variant=bn_name)
        grown = runs.assign(growth=runs[beyond[-1]].astype(float) - runs[columns[0]].astype(float))
        verdicts.append(Verdict(
            "(measured) BN-LSTM's error grows beyond T_max", "the T_max rule's cost",
            f"BN-LSTM's test MSE at T={beyond[-1][5:]} higher than at T={columns[0][5:]} "
            f"(paired by run)",
            Level("growth", "growth", _arm(bn_name), 0.0, "higher").judge(grown),
            f"T={columns[0][5:]} {_pm(bn50)}, T={beyond[-1][5:]} {_pm(bn_long)}"))

    def draw(figure):
        axes = figure.add_subplot()
        lengths = [int(c[5:]) for c in columns]
        for variant in variants:
            values = _ok(runs[runs["variant"] == variant])[columns].astype(float)
            if values.empty:
                continue
            mean, std = values.mean(), values.std().fillna(0)
            line, = axes.plot(lengths, mean, marker="o", label=variant, color=COLORS.get(variant))
            axes.fill_between(lengths, mean - std, mean + std, alpha=0.15, color=line.get_color())
        axes.axhline(1 / 6, color="k", linewidth=0.8, linestyle=":", label="predict 1 (MSE 1/6)")
        axes.set(xscale="log", xlabel="test sequence length T (trained at 50)",
                 ylabel="test MSE", title="the adding problem")
        axes.minorticks_off()
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.legend(fontsize=8)

    return Section(
        "adding", "4. Longer sequences than trained on: the adding problem",
        f"Trained at T={columns[0][5:] if columns else '—'} on {_one(runs, 'train_size')} "
        f"sequences for {_one(runs, 'epochs')} "
        f"epochs, hidden {_one(runs, 'hidden')}, batch 64; tested (evaluation mode) on 500 fresh "
        f"sequences of each length. BN-LSTM keeps statistics for the training length and uses "
        f"its last step's beyond (the T_max rule). Predicting the mean (1) gives MSE 1/6. "
        f"{_seeds(runs)} seeds.",
        {"test MSE by sequence length": table}, draw, verdicts, figsize=(6, 4))


# ---------------------------------------------------------------------------------------------
# 5. Small batches
# ---------------------------------------------------------------------------------------------

def section_small_batch(frame: pd.DataFrame) -> Section | None:
    runs = small_batch_runs(frame)
    if runs.empty:
        return None
    sizes = sorted(runs["batch_size"].unique())
    variants = _ordered(runs["variant"].unique())
    table = pd.DataFrame({f"batch {b}": [_cell(runs[(runs["variant"] == v)
                                                    & (runs["batch_size"] == b)], "test_acc", 100)
                                         for v in variants] for b in sizes},
                         index=pd.Index(variants, name="model")).reset_index()
    verdicts = []
    bn_name = next((v for v in variants if v.startswith("BN")), None)
    if bn_name and "LN-LSTM" in variants:
        smallest = sizes[0]
        bn = _values(runs, "test_acc", variant=bn_name, batch_size=smallest)
        ln = _values(runs, "test_acc", variant="LN-LSTM", batch_size=smallest)
        verdicts.append(Verdict(
            f"(measured) LN-LSTM is more accurate than BN-LSTM at batch {smallest}",
            "Ba et al. (2016): layer norm works with batch size 1 (no batch statistics); "
            "batch statistics of a few examples are noisy",
            f"test accuracy of LN-LSTM higher than BN-LSTM's at batch {smallest}",
            Difference("accuracy", "test_acc", _arm("LN-LSTM", batch_size=smallest),
                       _arm(bn_name, batch_size=smallest), "higher").judge(runs),
            f"LN {_pm(ln, 100)} %, BN {_pm(bn, 100)} %, LN − BN {_diff_text(bn, ln)}; by batch "
            f"size, BN − LN: " + ", ".join(
                f"{b}: {_diff_text(_values(runs, 'test_acc', variant='LN-LSTM', batch_size=b), _values(runs, 'test_acc', variant=bn_name, batch_size=b))}"
                for b in sizes)))

    def draw(figure):
        axes = figure.add_subplot()
        for variant in variants:
            part = _ok(runs[runs["variant"] == variant]).groupby("batch_size")["test_acc"]
            mean, std = 100 * part.mean(), 100 * part.std().fillna(0)
            line, = axes.plot(mean.index, mean, marker="o", label=variant,
                              color=COLORS.get(variant))
            axes.fill_between(mean.index, mean - std, mean + std, alpha=0.15,
                              color=line.get_color())
        axes.set(xscale="log", xlabel="batch size", ylabel="test accuracy (%)",
                 title=f"permuted digits, epochs: {_one(runs, 'epochs')} at every batch size")
        axes.minorticks_off()
        axes.set_xticks(sizes, [str(b) for b in sizes])
        axes.title.set_fontsize(9)
        axes.legend(fontsize=8)

    return Section(
        "small_batch", "5. Small batches",
        f"The permuted digits at batch sizes {', '.join(map(str, sizes))}, the same number of "
        f"epochs ({_one(runs, 'epochs')}) and learning rate at every batch size (so smaller "
        f"batches make more updates), hidden {_one(runs, 'hidden')}, {_seeds(runs)} seeds; test "
        f"accuracy in evaluation mode.",
        {"test accuracy (%) by batch size": table}, draw, verdicts, figsize=(6, 4))


# ---------------------------------------------------------------------------------------------
# 6. Variable lengths and padding
# ---------------------------------------------------------------------------------------------

def section_padding(frame: pd.DataFrame) -> Section | None:
    runs = frame[frame["experiment"] == "padding"]
    if runs.empty:
        return None
    runs = runs.assign(statistics=runs["use_mask"].map(
        lambda m: "masked (padding left out)" if _true(m) else "unmasked (padding in the statistics)"))
    rows = [{"BN-LSTM γ=0.1": s, "test accuracy (%)": _cell(part, "test_acc", 100),
             "running-mean error (std units)": _cell(part, "shift_mean", 1, 3),
             "running-variance error (relative)": _cell(part, "shift_var", 1, 3)}
            for s, part in runs.groupby("statistics", sort=False)]
    masked = runs[runs["use_mask"].map(_true)]
    unmasked = runs[~runs["use_mask"].map(_true)]
    verdicts = []
    if not masked.empty and not unmasked.empty:
        acc_m, acc_u = _values(masked, "test_acc"), _values(unmasked, "test_acc")
        shift_m, shift_u = _values(masked, "shift_mean"), _values(unmasked, "shift_mean")
        verdicts.append(Verdict(
            "(measured) masking the padding out of the statistics raises test accuracy",
            "no published claim; frameworks' batch norm sees the padding",
            "masked test accuracy higher than unmasked",
            Difference("masked", "test_acc", arm("masked", use_mask=_true),
                       arm("unmasked", use_mask=lambda m: not _true(m)), "higher").judge(runs),
            f"masked {_pm(acc_m, 100)} %, unmasked {_pm(acc_u, 100)} %, difference "
            f"{_diff_text(acc_u, acc_m)}; input-term running statistics against those of the "
            f"valid positions: mean error masked {_pm(shift_m)}, unmasked {_pm(shift_u)}; "
            f"variance error masked {_pm(_values(masked, 'shift_var'))}, unmasked "
            f"{_pm(_values(unmasked, 'shift_var'))}"))

    def draw(figure):
        axes = figure.add_subplot()
        for s, part in runs.groupby("statistics", sort=False):
            _curve_band(axes, part, s)
        axes.set(xlabel="epoch", ylabel="test accuracy (%)",
                 title="digits at variable speed (lengths 32..64), pre-padded")
        _integer_epochs(axes)
        axes.title.set_fontsize(9)
        axes.legend(fontsize=8)

    return Section(
        "padding", "6. Variable lengths and padding",
        f"The digits resampled to random lengths 32..64 (read at different speeds) and "
        f"padded at the front to 64 (Keras' default). Masked: padded positions enter no "
        f"statistics and carry the state; unmasked: the zeros of the padding run through the "
        f"LSTM and enter every statistic, as a framework's batch norm without masks. In "
        f"training, a step where a single sequence has begun is masked out too (batch "
        f"statistics need 2+ values). The running-statistics error compares the input term's "
        f"running mean/variance per step with the mean/variance of the valid positions of the "
        f"training set (in units of the input term's variance over all valid positions). Hidden "
        f"{_one(runs, 'hidden')}, epochs {_one(runs, 'epochs')}, {_seeds(runs)} seeds.",
        {"masked against unmasked statistics": pd.DataFrame(rows)}, draw, verdicts,
        figsize=(6, 4))


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------

SECTIONS = (section_classify, section_gradient, section_shared, section_adding,
            section_small_batch, section_padding)


def sections(frame: pd.DataFrame) -> list[Section]:
    frame = frame.copy()              # one block per dtype: later columns add cheaply
    found = (make(frame) for make in SECTIONS)
    return [s for s in found if s is not None]


def tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    for section in sections(frame):
        for title, table in section.tables.items():
            out[f"{section.title}: {title}"] = table
    return out


def figures(frame: pd.DataFrame) -> dict:
    from matplotlib.figure import Figure
    out = {}
    for section in sections(frame):
        if section.draw is None:
            continue
        figure = Figure(figsize=section.figsize)
        section.draw(figure)
        legends_outside(figure)
        figure.tight_layout()
        out[section.key] = figure
    return out


def _verdict_table(found: list[Section]) -> str:
    rows = [{"claim": v.claim, "source": v.source, "here": v.verdict, "n_min": v.outcome.n_min,
             "numbers": v.evidence} for s in found for v in s.verdicts]
    return markdown_table(pd.DataFrame(rows)) if rows else "(no verdicts: no runs yet)"


def judged(found: list[Section]) -> list[tuple[str, Outcome]]:
    return [(v.claim, v.outcome) for section in found for v in section.verdicts]


def reports(frame: pd.DataFrame) -> dict[str, str]:
    found = sections(frame)
    quick = bool(frame["hidden"].max() < 64) if "hidden" in frame and not frame.empty else False
    seconds = float(frame["seconds"].sum()) if "seconds" in frame else math.nan
    lines = ["# The RNN study: recurrent batch norm against LSTM and layer-norm LSTM", "",
             "Cooijmans et al. (2017, Recurrent Batch Normalization) and Ba et al. (2016, Layer "
             "Normalization) at a small scale. Written by `studies/_rnn_report.py` from "
             "`runs.csv`; every number below is a mean over seeds of this folder's runs.", ""]
    if quick:
        lines += [f"**Quick grid**: hidden {_one(frame, 'hidden')}, seeds "
                  f"{_one(frame, 'seed')}, epochs {_one(frame, 'epochs')}. A smoke run: with "
                  f"fewer than 3 seeds its verdicts read undetermined.", ""]
    status = frame["status"].value_counts().to_dict() if "status" in frame else {}
    lines += [f"Runs: {len(frame)} ({', '.join(f'{v} {k}' for k, v in status.items())}); "
              f"{seconds / 60:.1f} core-minutes of run time.", "",
              SCALE_NOTE, "", "## Verdicts", "", SIGNIFICANCE, "", _verdict_table(found), ""]
    for section in found:
        lines += [f"## {section.title}", "", section.setup, ""]
        for title, table in section.tables.items():
            lines += [f"**{title}**", "", markdown_table(table), ""]
        for verdict in section.verdicts:
            lines += [f"- *{verdict.claim}* — **{verdict.verdict}**. Rule: {verdict.rule}. "
                      f"Numbers: {verdict.evidence}."]
        lines += [f"- {note}" for note in section.notes]
        if section.draw is not None:
            lines += ["", f"![{section.title}]({section.key}.png)", "", f"*{section.caption}*"]
        lines += [""]
    return {"README.md": "\n".join(lines), "headline.md": headline(found),
            "verdicts.csv": verdicts_csv("rnn", judged(found))}


def headline(found: list[Section]) -> str:
    """The README's headline for this study: the sequence-classification accuracy table."""
    for section in found:
        for title, table in section.tables.items():
            if section.key == "classify" and title.startswith("test accuracy"):
                return (f"{section.title}: {title}; {section.setup.split(';')[0]}. The published "
                        "rows are MNIST at 784 steps: a reference at another scale.\n\n"
                        + markdown_table(table) + "\n")
    return "(no sequence-classification runs yet)\n"
