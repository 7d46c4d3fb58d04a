"""Tables, verdicts and figures of the claims study, computed from runs.csv.

Each claim has an ``analyze_<claim>(frame) -> ClaimReport``: its tables, a verdict from a rule
object of ``_verdicts`` (its outcome: the verdict, the numbers it read, the seeds per arm), the
rule in words, the line of numbers behind it, and a figure. :func:`tables`, :func:`figures` and
:func:`reports` (the per-claim ``<claim>.md`` pages, the ``README.md`` with the verdicts and
``verdicts.csv``) are the study's hooks.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from normkit.sweep import Stat, legends_outside, aggregate, markdown_table

from _claims_experiments import (CIRCLES, CIRCLES_FACTOR, CIRCLES_TRAIN, CURVE_EPOCHS,
                                 DIGITS_TEST, KERAS_ADAM_EPS, LANDSCAPE_STEPS, MNIST1D_SAMPLES,
                                 SATURATION_EPOCHS, TARGET_ERROR)
from _claims_measure import SATURATION_DERIVATIVE, SATURATION_Z
from _verdicts import (HOLDS, Combined, Difference, Level, Outcome,
                       Summary, arm, verdicts_csv)
from _verdicts import difference as _difference

if TYPE_CHECKING:                      # matplotlib is imported by the figures hook only
    from matplotlib.figure import Figure

CHANCE_ERROR = 0.9                     # ten classes
NORM_COLORS = {"none": "tab:gray", "batch": "tab:blue", "layer": "tab:orange"}


@dataclasses.dataclass
class ClaimReport:
    claim: str
    title: str
    statement: str                       # the published statement tested, with its source
    setup: str                           # what was run
    rule: str                            # how the verdict follows from the numbers
    outcome: Outcome                     # the rule object's verdict, numbers and seeds
    evidence: str                        # the numbers behind the verdict, one paragraph
    tables: dict[str, pd.DataFrame]
    draw: Callable[[Figure], None]
    figsize: tuple[float, float] = (10, 3.6)
    caption: str = "Lines: mean over the seeds; bands: ± 1 standard deviation over the seeds."
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: list[tuple[str, Outcome]] = dataclasses.field(default_factory=list)  # (title, outcome)

    @property
    def verdict(self) -> str:
        return self.outcome.label


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"]


def _mean(frame: pd.DataFrame, by: list[str], column: str) -> pd.Series:
    """Mean of ``column`` over the ok runs per group."""
    return _ok(frame).groupby(by)[column].mean()


def _pm(values: pd.Series, digits: int = 3) -> Stat:
    """mean ± std of the values (a table cell that keeps its numbers for the CSV)."""
    return Stat.of(values.dropna().astype(float), digits=digits)


def _one(frame: pd.DataFrame, column: str) -> str:
    """The distinct values of a config column, as written in a setup line."""
    values = sorted(frame[column].dropna().unique()) if column in frame else []
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "—"


def _seeds(frame: pd.DataFrame) -> int:
    return int(frame["seed"].nunique())


def _diff_text(lower: pd.Series, higher: pd.Series, scale: float = 100, digits: int = 1) -> str:
    difference, error = _difference(lower, higher)
    if math.isnan(difference):
        return "—"
    return f"{scale * difference:+.{digits}f} ± {scale * error:.{digits}f}"


SIGNIFICANCE = ("\"Lower\" means lower by more than two standard errors of the difference of the "
                "means over seeds (Welch), so a difference within the seed noise does not count. "
                "Fewer than 3 seeds in a compared cell: undetermined.")


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def _axes_row(figure: Figure, count: int):
    return [figure.add_subplot(1, count, i + 1) for i in range(count)]


def _band(axes, x, mean, std, label, color=None, **style):
    mean, std = np.asarray(mean, float), np.nan_to_num(np.asarray(std, float))
    line, = axes.plot(x, mean, label=label, color=color, **{"marker": "o", "markersize": 3,
                                                             **style})
    axes.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())


# ---------------------------------------------------------------------------------------------
# 1. Higher learning rates
# ---------------------------------------------------------------------------------------------

LR_TOLERANCE = 0.05


def _good_learning_rates(best: float) -> Callable[[pd.DataFrame], list[float]]:
    """The learning rates of a norm's runs where no seed diverged and the mean test error is
    within LR_TOLERANCE of ``best``."""
    def good(runs: pd.DataFrame) -> list[float]:
        lrs = []
        for lr, cell in runs.groupby("lr"):
            ok = cell["status"] == "ok"
            if ok.all() and cell.loc[ok, "test_error"].mean() <= best + LR_TOLERANCE:
                lrs.append(float(lr))
        return sorted(lrs)
    return good


def _learning_rate_rule(frame: pd.DataFrame) -> Combined:
    per_model = []
    for model, part in frame.groupby("model", sort=False):
        good = _good_learning_rates(_mean(part, ["norm", "lr"], "test_error").min())
        batch, none = arm("batch", model=model, norm="batch"), arm("none", model=model, norm="none")
        per_model.append(Combined(model, [
            Summary("more good learning rates", "good learning rates",
                    lambda runs, good=good: len(good(runs)), batch, none, "higher"),
            Summary("a higher largest good learning rate", "largest good lr",
                    lambda runs, good=good: max(good(runs), default=0.0), batch, none,
                    "higher")], "all"))
    return Combined("1. Higher learning rates", per_model, "each")


def analyze_learning_rate(frame: pd.DataFrame) -> ClaimReport:
    summary_rows, lines = [], []
    for model, part in frame.groupby("model", sort=False):
        counts = part.groupby(["norm", "lr"])["status"]
        stable = counts.apply(lambda s: bool((s == "ok").all()))           # no diverged seed
        mean = _mean(part, ["norm", "lr"], "test_error")
        best = mean.min()
        good = {}
        for norm in part["norm"].unique():
            lrs = [lr for lr in sorted(part["lr"].unique())
                   if stable.get((norm, lr), False)
                   and mean.get((norm, lr), math.inf) <= best + LR_TOLERANCE]
            diverged = (part[part["norm"] == norm]["status"] == "diverged").mean()
            stable_lrs = [lr for lr in sorted(part["lr"].unique()) if stable.get((norm, lr), False)]
            good[norm] = lrs
            own_best = mean.xs(norm).min() if norm in mean.index else math.inf
            own = [lr for lr in stable_lrs if mean.get((norm, lr), math.inf)
                   <= own_best + LR_TOLERANCE]
            summary_rows.append({
                "model": model, "norm": norm, "good learning rates": len(lrs),
                "good range": f"{min(lrs):g} .. {max(lrs):g}" if lrs else "—",
                "within tolerance of its own best": _range(own),
                "largest stable lr": f"{max(stable_lrs):g}" if stable_lrs else "—",
                "best test error": _pct(mean.xs(norm).min()) if norm in mean.index else "—",
                "diverged runs": f"{100 * diverged:.0f} %"})
        if "batch" in good and "none" in good:
            lines.append(f"{model}: batch trains well at {len(good['batch'])} of "
                         f"{part['lr'].nunique()} learning rates "
                         f"({_range(good['batch'])}), none at {len(good['none'])} "
                         f"({_range(good['none'])}), layer at {len(good.get('layer', []))} "
                         f"(best mean test error {_pct(best)})")
    table = aggregate(frame, rows="lr", cols=["model", "norm"], value="test_error")
    summary = pd.DataFrame(summary_rows)

    def draw(figure: Figure) -> None:
        models = list(frame["model"].unique())
        for axes, model in zip(_axes_row(figure, len(models)), models):
            part = frame[frame["model"] == model]
            for norm, rows in part.groupby("norm", sort=False):
                ok = _ok(rows).groupby("lr")["test_error"]
                _band(axes, ok.mean().index, ok.mean(), ok.std(), norm, NORM_COLORS.get(norm))
                diverged = rows.groupby("lr")["status"].apply(lambda s: (s == "diverged").mean())
                hit = diverged[diverged > 0]
                axes.scatter(hit.index, [1.0] * len(hit), marker="x", s=20 + 60 * hit.values,
                             color=NORM_COLORS.get(norm))
            axes.set_xscale("log")
            axes.set_ylim(0, 1.05)
            axes.set_xlabel("learning rate (SGD, no momentum)")
            axes.set_ylabel("test error")
            axes.set_title(f"{'MLP, digits' if model == 'mlp' else 'CNN, MNIST-1D'}"
                           " (x: diverged)", fontsize=9)
            axes.legend(fontsize=8)

    return ClaimReport(
        claim="learning_rate", title="1. Higher learning rates",
        statement="Ioffe & Szegedy (2015), Sec. 3.3 \"Batch Normalization enables higher "
                  "learning rates\": without it, high learning rates make gradients explode or "
                  "vanish; with it, training tolerates them.",
        setup=f"MLP 64-128-128-10 on the digits and the 3-layer Conv1d network of normkit.train "
              f"on MNIST-1D ({MNIST1D_SAMPLES} samples), plain SGD (no momentum), batch 32, "
              f"{int(frame['epochs'].max())} epochs, learning rates "
              f"{', '.join(f'{v:g}' for v in sorted(frame['lr'].unique()))}; "
              f"{_seeds(frame)} seeds.",
        rule=f"A learning rate *trains well* for a norm if no seed diverged (non-finite loss) "
             f"and the mean test error is within {LR_TOLERANCE:.2f} of the best mean test error "
             f"any norm reached on that model. The claim holds on a model if batch norm trains "
             f"well at more learning rates than no normalization and its largest good learning "
             f"rate is higher; holds overall if on every model, mixed if on some. (The "
             f"summary also gives, for context, the range within the tolerance of each norm's "
             f"own best error.)",
        outcome=_learning_rate_rule(frame).judge(frame), evidence="; ".join(lines) + ".",
        tables={"test error (mean ± std over seeds)": table, "range of good learning rates":
                summary},
        draw=draw)


def _range(lrs: list[float]) -> str:
    return f"{min(lrs):g} .. {max(lrs):g}" if lrs else "none"


# ---------------------------------------------------------------------------------------------
# 2. Initialization
# ---------------------------------------------------------------------------------------------

def analyze_initialization(frame: pd.DataFrame) -> ClaimReport:
    frame = frame.assign(error_or_chance=frame["test_error"].where(frame["status"] == "ok",
                                                                   CHANCE_ERROR))
    error = frame.groupby(["norm", "init_scale"])["error_or_chance"].mean()
    spread = {norm: float(error.xs(norm).max() - error.xs(norm).min())
              for norm in frame["norm"].unique()}
    layers = [c for c in frame.columns if c.startswith("grad_norm_")]
    hidden = layers[:-1]                                          # the output layer has no norm
    grads = frame.groupby(["norm", "init_scale"])[layers].median()   # diverged runs included
    typical = np.exp(np.log(grads[hidden].clip(lower=1e-300)).mean(axis=1))   # geometric mean
    decades = {norm: float(np.log10(typical.xs(norm).max() / typical.xs(norm).min()))
               for norm in frame["norm"].unique()}
    depth_ratio = grads[hidden[0]] / grads[hidden[-1]]

    def spread_of(runs: pd.DataFrame) -> float:
        error_by_scale = runs.groupby("init_scale")["error_or_chance"].mean()
        return float(error_by_scale.max() - error_by_scale.min())

    def decades_of(runs: pd.DataFrame) -> float:
        medians = runs.groupby("init_scale")[hidden].median()
        typical_by_scale = np.exp(np.log(medians.clip(lower=1e-300)).mean(axis=1))
        return float(np.log10(typical_by_scale.max() / typical_by_scale.min()))

    batch, none = arm("batch", norm="batch"), arm("none", norm="none")
    rule = Combined("2. Less sensitivity to initialization", [
        Summary("error spread", "error spread over the scales", spread_of, batch, none, "lower",
                factor=0.5),
        Combined("gradient decades", [
            Summary("batch within a decade", "gradient decades", decades_of, batch, 1.0, "lower"),
            Summary("none beyond a decade", "gradient decades", decades_of, none, 1.0, "higher")],
            "all")], "each")

    error_table = aggregate(frame, rows="init_scale", cols="norm", value="test_error")
    epochs_table = aggregate(frame, rows="init_scale", cols="norm", value="epochs_to_target",
                             digits=3)
    grad_table = grads.apply(lambda col: col.map(lambda v: f"{v:.2e}"))
    grad_table.columns = [f"layer {c.rsplit('_', 1)[1]}" for c in grad_table.columns]
    grad_table["first / last hidden"] = depth_ratio.map(lambda v: f"{v:.3g}")
    evidence = (f"final test error (diverged runs counted as chance, {CHANCE_ERROR}) varies over "
                f"the init scales by {_spread_text(spread)}; the typical hidden-layer gradient "
                f"norm at init spans {', '.join(f'{k} {v:.1f}' for k, v in decades.items())} "
                f"decades over the scales; first/last hidden layer gradient ratio with batch "
                f"norm {_ratio_range(depth_ratio, 'batch')}, without "
                f"{_ratio_range(depth_ratio, 'none')}")

    def draw(figure: Figure) -> None:
        left, middle, right = _axes_row(figure, 3)
        per_run = np.exp(np.log(frame[hidden].clip(lower=1e-300)).mean(axis=1))
        for norm, rows in frame.groupby("norm", sort=False):
            stats = rows.groupby("init_scale")["error_or_chance"]
            _band(left, stats.mean().index, stats.mean(), stats.std(), norm, NORM_COLORS.get(norm))
            quartiles = per_run[rows.index].groupby(rows["init_scale"]).quantile([0.25, 0.75])
            middle.plot(typical.xs(norm).index, typical.xs(norm), marker="o", label=norm,
                        color=NORM_COLORS.get(norm))
            middle.fill_between(typical.xs(norm).index, quartiles.xs(0.25, level=1),
                                quartiles.xs(0.75, level=1), alpha=0.15,
                                color=NORM_COLORS.get(norm))
        scales = sorted(frame["init_scale"].unique())
        colors = dict(zip(scales, ("tab:purple", "tab:blue", "tab:green", "tab:red", "tab:brown")))
        for (norm, scale), row in grads.iterrows():
            if norm in ("none", "batch"):
                right.plot(range(len(layers)), row.values, marker=".", color=colors.get(scale),
                           linestyle="-" if norm == "batch" else "--",
                           label=f"{norm} ×{scale:g}")
        left.set(xscale="log", xlabel="init scale (×He)", ylabel="final test error",
                 ylim=(0, 1))
        middle.set(xscale="log", yscale="log", xlabel="init scale (×He)",
                   ylabel="||dL/dW|| at init (hidden layers)")
        right.set(yscale="log", xlabel="layer", ylabel="||dL/dW|| at init")
        for axes in (left, middle):
            axes.legend(fontsize=8)
        right.legend(fontsize=6, ncol=2)
        left.set_title("error (diverged = chance)", fontsize=9)
        middle.set_title("gradient size vs weight scale", fontsize=9)
        right.set_title("per layer: batch (solid), none (dashed)", fontsize=9)

    return ClaimReport(
        claim="initialization", title="2. Less sensitivity to initialization",
        statement="Ioffe & Szegedy (2015), abstract and Sec. 3.3: batch norm lets us be less "
                  "careful about initialization; BN(Wu) = BN((aW)u), so back-propagation "
                  "through a layer is unaffected by the scale of its weights (larger weights "
                  "get smaller gradients) and gradients do not vanish or explode.",
        setup=f"MLP with 6 hidden layers of 64 on the digits, He-uniform init times the scale "
              f"(every layer, output included), SGD lr 0.02 momentum 0.9, batch 32, "
              f"{int(frame['epochs'].max())} epochs; target test error {TARGET_ERROR} "
              f"(epochs to target = epochs + 1 if never reached); gradient norms on the first "
              f"256 training digits at init (training mode; median over {_seeds(frame)} seeds). "
              f"He-uniform gives ||W|| ≈ a sqrt(2 fan_out), so a layer's relative gradient "
              f"||dL/dW|| / ||W|| is the table's norm / (a sqrt(2 fan_out)).",
        rule="Sensitivity: the claim holds for the error if the spread (max - min over the "
             "scales) of batch norm's mean final test error is at most half of that without "
             "normalization. Gradients: it holds if the typical hidden-layer gradient norm "
             "(geometric mean over the hidden layers) spans at most one decade over the scales "
             "with batch norm and more than one without. Holds if both, mixed if one.",
        outcome=rule.judge(frame), evidence=evidence + ".",
        tables={"final test error": error_table,
                f"epochs to test error {TARGET_ERROR}": epochs_table,
                "gradient norms at init (median over seeds)": grad_table.reset_index()},
        draw=draw, figsize=(13, 3.8),
        caption="Left: mean over the seeds, band ± 1 standard deviation (diverged runs counted "
                "as chance). Middle: median over the seeds of the hidden layers' geometric-mean "
                "gradient norm; band: the seeds' interquartile range. Right: median over the "
                "seeds, per layer.")


def _spread_text(spread: dict) -> str:
    return ", ".join(f"{k} {100 * v:.1f} points" for k, v in spread.items())


def _ratio_range(ratio: pd.Series, norm: str) -> str:
    if norm not in ratio.index.get_level_values(0):
        return "—"
    values = ratio.xs(norm)
    return f"{values.min():.3g} .. {values.max():.3g}"


# ---------------------------------------------------------------------------------------------
# 3. Regularization
# ---------------------------------------------------------------------------------------------

def _variant(row) -> str:
    name = "batch" if row["norm"] == "batch" else "none"
    if row["dropout"] > 0:
        name = "dropout" if name == "none" else "batch+dropout"
    return name


def analyze_regularization(frame: pd.DataFrame) -> ClaimReport:
    frame = frame.assign(variant=frame.apply(_variant, axis=1),
                         gap=frame["test_error"] - frame["train_error"])
    ok = _ok(frame)

    def values(variant: str, batch_size: int, column: str = "test_error") -> pd.Series:
        return ok.loc[(ok["variant"] == variant) & (ok["batch_size"] == batch_size), column]

    sizes = sorted(frame["batch_size"].unique())
    parts = []
    rule = Combined("3. A regularizing effect", [
        Combined(f"batch {bs}", [
            Difference(column, column, arm("batch", variant="batch", batch_size=bs),
                       arm("none", variant="none", batch_size=bs), "lower")
            for column in ("test_error", "gap")], "all") for bs in sizes], "each")
    if {"none", "batch"} <= set(frame["variant"]):
        parts += ["test error none - batch (points, ± s.e.) by batch size: " + ", ".join(
                      f"{bs}: {_diff_text(values('batch', bs), values('none', bs))}"
                      for bs in sizes),
                  "train-test gap none - batch: " + ", ".join(
                      f"{bs}: {_diff_text(values('batch', bs, 'gap'), values('none', bs, 'gap'))}"
                      for bs in sizes)]
    if {"batch", "batch+dropout"} <= set(frame["variant"]):
        parts.append("dropout added to batch norm, batch - batch+dropout: " + ", ".join(
            f"{bs}: {_diff_text(values('batch+dropout', bs), values('batch', bs))}"
            for bs in sizes))
    if {"none", "dropout"} <= set(frame["variant"]):
        diverged = frame[(frame["variant"] == "dropout") & (frame["status"] == "diverged")]
        parts.append("dropout alone, none - dropout: " + ", ".join(
            f"{bs}: {_diff_text(values('dropout', bs), values('none', bs))}" for bs in sizes)
            + (f" (dropout alone diverged in {len(diverged)} of "
               f"{int((frame['variant'] == 'dropout').sum())} runs)" if len(diverged) else ""))
    evidence = "; ".join(parts) if parts else "no runs of both none and batch"
    order = [v for v in ("none", "batch", "batch+dropout", "dropout") if v in frame["variant"].unique()]

    def draw(figure: Figure) -> None:
        left, right = _axes_row(figure, 2)
        for variant in order:
            rows = _ok(frame[frame["variant"] == variant])
            for axes, column in ((left, "test_error"), (right, "gap")):
                stats = rows.groupby("batch_size")[column]
                _band(axes, stats.mean().index, stats.mean(), stats.std(), variant)
        left.set(xscale="log", xlabel="batch size", ylabel="test error")
        right.set(xscale="log", xlabel="batch size", ylabel="test error - train error")
        for axes in (left, right):
            axes.legend(fontsize=8)
        left.set_title(f"{int(frame['train_size'].max())} training digits", fontsize=9)

    tables = {"test error": aggregate(frame, rows="batch_size", cols="variant",
                                      value="test_error")[order],
              "train error": aggregate(frame, rows="batch_size", cols="variant",
                                       value="train_error")[order],
              "train-test gap": aggregate(frame, rows="batch_size", cols="variant",
                                          value="gap")[order]}
    return ClaimReport(
        claim="regularization", title="3. A regularizing effect",
        statement="Ioffe & Szegedy (2015), Sec. 3.4 \"Batch Normalization regularizes the "
                  "model\": an example is seen together with the others of its mini-batch, so "
                  "the network no longer produces deterministic values for it; dropout can be "
                  "removed or reduced. The noise of the batch statistics is the supposed "
                  "regularizer, so the effect should grow as the batch shrinks.",
        setup=f"The first {int(frame['train_size'].max())} training digits (the full test set "
              f"of {DIGITS_TEST} for testing), MLP 64-128-128-10, SGD lr 0.02 momentum 0.9, "
              f"{int(frame['steps'].max())} updates at every batch size (so every variant "
              f"fits the training set), dropout p = 0.5 after each hidden layer where named; "
              f"errors in evaluation mode; {_seeds(frame)} seeds.",
        rule="Holds at a batch size if batch norm's test error and train-test gap are both "
             "lower than without normalization; holds if at every batch size, mixed if at some. "
             + SIGNIFICANCE + " (With the batch as large as the training set, batch statistics "
             "carry no noise: a benefit there is not the noise.)",
        outcome=rule.judge(frame), evidence=evidence + ".", tables=tables, draw=draw,
        notes=["A diverged run (non-finite loss) is counted, not averaged: at small batches "
               "the unnormalized networks are also the unstable ones, so a lower error there "
               "can be optimization rather than regularization; the gap criterion separates "
               "them."])


# ---------------------------------------------------------------------------------------------
# 4. Cost
# ---------------------------------------------------------------------------------------------

COST_FACTOR = 1.1
COST_COLUMNS = {"train_epoch_s": "train epoch", "infer_batch_s": "inference, 256 examples",
                "infer_one_s": "inference, 1 example"}


def analyze_cost(frame: pd.DataFrame) -> ClaimReport:
    ok = _ok(frame).reindex(columns=list(frame.columns) + [
        c for c in ("infer_batch_folded_s", "infer_one_folded_s", "fold_error")
        if c not in frame.columns])
    rows, lines = [], []
    rule = Combined("4. A cost in computation", [
        Summary(model, "median epoch time", lambda runs: runs["train_epoch_s"].median(),
                arm("batch", model=model, norm="batch"), arm("none", model=model, norm="none"),
                "higher", factor=COST_FACTOR)
        for model in ok["model"].unique()], "each")
    for model, part in ok.groupby("model", sort=False):
        median = part.groupby("norm")[list(COST_COLUMNS) + ["infer_batch_folded_s",
                                                              "infer_one_folded_s"]].median()
        if "none" not in median.index:
            continue
        base = median.loc["none"]
        for norm in median.index:
            row = {"model": model, "norm": norm}
            for column, label in COST_COLUMNS.items():
                row[f"{label} (ms)"] = 1e3 * median.loc[norm, column]
                row[f"{label} / none"] = median.loc[norm, column] / base[column]
            rows.append(row)
            if norm == "batch":
                rows.append({"model": model, "norm": "batch, folded",
                             **{f"{COST_COLUMNS[c]} (ms)": 1e3 * median.loc[norm, f]
                                for c, f in (("infer_batch_s", "infer_batch_folded_s"),
                                             ("infer_one_s", "infer_one_folded_s"))},
                             **{f"{COST_COLUMNS[c]} / none": median.loc[norm, f] / base[c]
                                for c, f in (("infer_batch_s", "infer_batch_folded_s"),
                                             ("infer_one_s", "infer_one_folded_s"))}})
        if "batch" in median.index:
            train_ratio = median.loc["batch", "train_epoch_s"] / base["train_epoch_s"]
            infer_ratio = median.loc["batch", "infer_batch_s"] / base["infer_batch_s"]
            folded_ratio = median.loc["batch", "infer_batch_folded_s"] / base["infer_batch_s"]
            layer = (f", layer norm {median.loc['layer', 'train_epoch_s'] / base['train_epoch_s']:.2f}x"
                     if "layer" in median.index else "")
            lines.append(f"{model}: a training epoch with batch norm takes "
                         f"{train_ratio:.2f}x the time without{layer}; inference on 256 "
                         f"examples {infer_ratio:.2f}x, folded {folded_ratio:.2f}x")
    fold_error = ok["fold_error"].dropna()
    table = pd.DataFrame(rows)
    spread = ok.groupby(["model", "norm"])["train_epoch_s"].agg(
        lambda times: times.std() / times.mean()).dropna()
    spread_text = (f"the training-epoch times of one cell vary over its runs by "
                   f"{100 * spread.min():.0f} to {100 * spread.max():.0f} % (std / mean)"
                   if len(spread) else "one run per cell: no spread to report")

    def ratios(model, norm, column):
        """Each run's time over the median time of ``none`` (the same model)."""
        part = ok[ok["model"] == model]
        base = part.loc[part["norm"] == "none", column].median()
        return part.loc[part["norm"] == norm, column].dropna() / base
    if not fold_error.empty:
        lines.append(f"folded outputs differ from unfolded by at most "
                     f"{fold_error.max():.1e} of the largest output (float32)")

    def draw(figure: Figure) -> None:
        models = list(table["model"].unique()) if len(table) else []
        for axes, model in zip(_axes_row(figure, max(len(models), 1)), models):
            part = table[table["model"] == model].set_index("norm")
            labels = list(COST_COLUMNS.values())
            width = 0.8 / len(part)
            for i, (norm, row) in enumerate(part.iterrows()):
                values = [row.get(f"{label} / none", np.nan) for label in labels]
                low, high = [], []                 # the runs' interquartile range
                for column, value in zip(COST_COLUMNS, values):
                    runs = ratios(model, norm, column) if norm in set(ok["norm"]) else None
                    if runs is None or len(runs) < 2 or np.isnan(value):
                        low.append(0.0), high.append(0.0)
                        continue
                    low.append(max(0.0, value - runs.quantile(0.25)))
                    high.append(max(0.0, runs.quantile(0.75) - value))
                axes.bar(np.arange(len(labels)) + i * width, values, width, label=norm,
                         yerr=[low, high], capsize=2, error_kw={"linewidth": 0.8})
            axes.axhline(1.0, color="black", linewidth=0.8)
            axes.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, fontsize=8)
            axes.set_ylabel("time / time without normalization")
            axes.set_title(f"{'MLP, digits' if model == 'mlp' else 'CNN, MNIST-1D'} "
                           "(median over repeats)", fontsize=9)
            axes.legend(fontsize=8)

    return ClaimReport(
        claim="cost", title="4. A cost in computation",
        statement="Batch norm adds work to every training step (statistics, normalization and "
                  "their backward); at inference it is a fixed affine map per channel (Ioffe & "
                  "Szegedy, 2015, Sec. 3.1) that can be folded into the preceding linear layer "
                  "for free.",
        setup=f"The MLP (digits) and CNN (MNIST-1D) of claim 1, batch 32, SGD; per run: one "
              f"warm-up epoch, then the fastest of 3 timed epochs, and the fastest of 5 repeats "
              f"of 20 (256 examples) or 200 (1 example) evaluation-mode calls; batch norm also "
              f"through normkit.inference.fold. One thread per process, {_seeds(frame)} runs "
              f"per cell (median), two runs in parallel on a shared 2-core machine: "
              f"{spread_text}.",
        rule=f"Holds if a training epoch with batch norm takes more than {COST_FACTOR:g}x the time "
             f"without normalization on every model (median over runs), mixed if on some; the "
             f"folded inference time is reported, not judged.",
        outcome=rule.judge(frame), evidence="; ".join(lines) + ".",
        tables={"time per call, and relative to none": table.round(4)}, draw=draw,
        figsize=(10, 3.6),
        caption="Bars: median over the runs of the time relative to the median time of the "
                "same model without normalization (linear axis; 1 = no cost); error bars: the "
                "runs' interquartile range of that ratio (none for the folded model, timed "
                "once per run beside the unfolded one).")


# ---------------------------------------------------------------------------------------------
# 5. Internal covariate shift and the landscape
# ---------------------------------------------------------------------------------------------

def analyze_covariate_shift(frame: pd.DataFrame) -> ClaimReport:
    rel = [c for c in frame.columns if c.startswith("ics_rel_")]
    cos = [c for c in frame.columns if c.startswith("ics_cos_")]
    ok = _ok(frame).assign(ics_rel=lambda f: f[rel].mean(axis=1),
                           ics_cos=lambda f: f[cos].mean(axis=1))
    means = ok.groupby(["lr", "norm"])[["ics_l2", "ics_rel", "ics_cos", "loss_range",
                                        "gradient_change", "beta", "test_error"]].mean()
    lines = []
    lrs = [lr for lr in sorted(ok["lr"].unique())
           if {"none", "batch"} <= set(means.xs(lr).index)] if len(means) else []
    frame = frame.assign(ics_rel=frame[rel].mean(axis=1), ics_cos=frame[cos].mean(axis=1))

    def per_lr(claim: str, columns: dict[str, str]) -> Combined:
        return Combined(claim, [Combined(f"lr {lr:g}", [
            Difference(column, column, arm("batch", lr=lr, norm="batch"),
                       arm("none", lr=lr, norm="none"), direction)
            for column, direction in columns.items()], "all") for lr in lrs], "each")

    ics_rule = per_lr("5. Reduced internal covariate shift",
                      {"ics_rel": "lower", "ics_cos": "higher"})
    smooth_rule = per_lr("5b. Smoother loss landscape (Santurkar et al., 2018)",
                         {"loss_range": "lower", "gradient_change": "lower"})
    for lr in lrs:
        none, batch = means.loc[(lr, "none")], means.loc[(lr, "batch")]

        def runs(norm: str, column: str) -> pd.Series:
            return ok.loc[(ok["lr"] == lr) & (ok["norm"] == norm), column]

        lines.append(f"lr {lr:g}: relative ICS none {none['ics_rel']:.3f} vs batch "
                     f"{batch['ics_rel']:.3f} (difference "
                     f"{_diff_text(runs('batch', 'ics_rel'), runs('none', 'ics_rel'), 1, 3)}; "
                     f"raw ||G - G'|| {none['ics_l2']:.3g} vs {batch['ics_l2']:.3g}), cosine "
                     f"{none['ics_cos']:.3f} vs {batch['ics_cos']:.3f} (difference "
                     f"{_diff_text(runs('none', 'ics_cos'), runs('batch', 'ics_cos'), 1, 3)}); "
                     f"loss range along the gradient {none['loss_range']:.3g} vs "
                     f"{batch['loss_range']:.3g} (difference "
                     f"{_diff_text(runs('batch', 'loss_range'), runs('none', 'loss_range'), 1, 3)}"
                     f"), relative gradient change {none['gradient_change']:.3g} vs "
                     f"{batch['gradient_change']:.3g} (difference "
                     f"{_diff_text(runs('batch', 'gradient_change'), runs('none', 'gradient_change'), 1, 3)}"
                     f"), beta {none['beta']:.3g} vs {batch['beta']:.3g}")
    per_layer = ok.groupby(["lr", "norm"])[rel + cos].mean()
    per_layer.columns = [("relative ICS, layer " if c.startswith("ics_rel") else "cosine, layer ")
                         + c.rsplit("_", 1)[1] for c in per_layer.columns]
    summary = {column: aggregate(frame, rows="lr", cols="norm", value=column)
               for column in ("ics_l2", "ics_rel", "ics_cos", "loss_range", "gradient_change",
                              "beta", "test_error")}
    summary_table = pd.concat(summary, axis=1)
    summary_table.columns = [" · ".join(map(str, c)) for c in summary_table.columns]

    def draw(figure: Figure) -> None:
        left, middle, right = _axes_row(figure, 3)
        layers = [int(c.rsplit("_", 1)[1]) for c in rel]
        grouped = ok.groupby(["lr", "norm"])
        keys = ["loss_range", "gradient_change"]
        groups = list(means.index)
        width = 0.6 / max(len(groups), 1)
        for i, ((lr, norm), rows) in enumerate(grouped):
            style = dict(linestyle="-" if lr == ok["lr"].max() else ":")
            label = f"{norm}, lr {lr:g}"
            _band(left, layers, rows[rel].mean(), rows[rel].std(), label,
                  NORM_COLORS.get(norm), **style)
            _band(middle, layers, rows[cos].mean(), rows[cos].std(), label,
                  NORM_COLORS.get(norm), **style)
            right.errorbar(np.arange(len(keys)) + (i - (len(groups) - 1) / 2) * width,
                           rows[keys].mean().values, yerr=rows[keys].std().fillna(0).values,
                           marker="o", linestyle="none", capsize=3, label=label,
                           color=NORM_COLORS.get(norm),
                           alpha=1.0 if lr == ok["lr"].max() else 0.5)
        right.set_xticks(np.arange(len(keys)), ["loss range", "rel. gradient change"],
                         fontsize=8)
        right.set_xlim(-0.5, len(keys) - 0.5)
        right.set_yscale("log")
        left.set(xlabel="layer", ylabel="||G - G'|| / ||G||")
        middle.set(xlabel="layer", ylabel="cos(G, G')")
        left.set_title("internal covariate shift", fontsize=9)
        middle.set_title("(1 = no shift)", fontsize=9)
        right.set_title("along the gradient", fontsize=9)
        for axes in (left, middle, right):
            axes.legend(fontsize=7)

    report = ClaimReport(
        claim="covariate_shift", title="5. Reduced internal covariate shift",
        statement="Ioffe & Szegedy (2015): batch norm works by reducing internal covariate "
                  "shift. Santurkar et al. (2018): measured as the change of a layer's gradient "
                  "when the layers before it are updated, it does not (it may even grow); what "
                  "batch norm does is make the loss landscape smoother (the loss and gradient "
                  "change less along the gradient).",
        setup=f"MLP with 6 hidden layers of 64 on the digits, plain SGD (the measurement applies "
              f"the same update lr * G to the preceding layers), batch 32, "
              f"{int(frame['epochs'].max())} epochs. ICS of weight layer i (Santurkar et al.'s "
              f"definition): G is the gradient of its weights on a batch, G' the same gradient "
              f"after the layers before i took their step on that batch; layers 1..6 (layer 0 "
              f"has nothing before it), on a fresh training batch at the start of every epoch "
              f"and after the last, averaged; "
              f"landscape: steps of {', '.join(f'{k:g}' for k in LANDSCAPE_STEPS)} x lr along "
              f"the gradient on the same batch; {_seeds(frame)} seeds.",
        rule="ICS: reduced at a learning rate if batch norm's relative ICS ||G - G'|| / ||G|| "
             "(mean over layers and points) is lower and its cosine higher than without "
             "normalization. Landscape: smoother at a learning rate if both the loss range and "
             "the relative gradient change along the gradient are lower. Each holds if at every "
             "learning rate, mixed if at some. " + SIGNIFICANCE + " The verdict line is the ICS "
             "claim; the landscape has its own line (5b).",
        outcome=ics_rule.judge(frame), evidence="; ".join(lines) + ".",
        tables={"summary (mean ± std over seeds)": summary_table,
                "per layer (mean over seeds)": per_layer.round(4)},
        draw=draw, figsize=(13, 3.8))
    report.extra.append((smooth_rule.claim, smooth_rule.judge(frame)))
    return report


# ---------------------------------------------------------------------------------------------
# 6. Training vs inference
# ---------------------------------------------------------------------------------------------

LAG_MARGIN = 0.01


def analyze_inference(frame: pd.DataFrame) -> ClaimReport:
    frame = frame.assign(gap_before=frame["test_error"] - frame["test_error_batch"],
                         gap_after=frame["test_error_precise"] - frame["test_error_batch"],
                         running_minus_precise=frame["test_error"] - frame["test_error_precise"])
    means = _ok(frame).groupby(["batch_size", "bn_momentum"])[
        ["test_error", "test_error_precise", "test_error_batch", "gap_before", "gap_after",
         "running_minus_precise", "stat_error", "stat_error_precise"]].mean()
    ok = _ok(frame)
    frame = frame.assign(precise_gain=frame["stat_error"] - frame["stat_error_precise"])
    settings = [(bs, m) for bs, m in means.index]
    cells = {key: arm(f"batch {key[0]}, momentum {key[1]:g}", batch_size=key[0],
                      bn_momentum=key[1]) for key in settings}
    lag_rule = Combined("the discrepancy is real somewhere", [
        Level(cells[key].name, "running_minus_precise", cells[key], 0.0, "higher", LAG_MARGIN)
        for key in settings], "any")
    remedy_rule = Combined("the precise pass lowers the error of the statistics everywhere", [
        Level(cells[key].name, "precise_gain", cells[key], 0.0, "higher") for key in settings],
        "all")
    rule = Combined("6. Training vs inference discrepancy", [lag_rule, remedy_rule], "each")
    lagging = [key for key in settings
               if Level("", "running_minus_precise", cells[key], 0.0, "higher",
                        LAG_MARGIN).judge(frame).verdict == HOLDS]
    worst = means["running_minus_precise"].idxmax() if len(means) else None
    closes = bool(len(means) and means["gap_after"].abs().mean() < means["gap_before"].abs().mean())
    evidence = (f"test error with running statistics minus precise statistics (paired, same "
                f"weights): up to {100 * means['running_minus_precise'].max():+.1f} points "
                f"(batch {worst[0]}, momentum {worst[1]:g}), mean "
                f"{100 * means['running_minus_precise'].mean():+.1f}; at least "
                f"{100 * LAG_MARGIN:g} point and beyond the seed noise at (batch, momentum) "
                f"{', '.join(f'({b}, {m:g})' for b, m in lagging) or 'none'}"
                f"; mean |gap to batch statistics| before {100 * means['gap_before'].abs().mean():.1f}"
                f" points, after {100 * means['gap_after'].abs().mean():.1f}; error of the "
                f"running statistics {means['stat_error'].min():.3f} .. "
                f"{means['stat_error'].max():.3f}, after the precise pass "
                f"{means['stat_error_precise'].min():.3f} .. {means['stat_error_precise'].max():.3f}"
                if len(means) else "no runs")
    tables = {name: aggregate(frame, rows="batch_size", cols="bn_momentum", value=column)
              for name, column in (("test error, running statistics", "test_error"),
                                   ("test error, precise statistics", "test_error_precise"),
                                   ("test error, batch statistics (test batches of the training "
                                    "batch size)", "test_error_batch"),
                                   ("gap before: running - batch statistics", "gap_before"),
                                   ("gap after: precise - batch statistics", "gap_after"),
                                   ("error of the running statistics", "stat_error"),
                                   ("error of the precise statistics", "stat_error_precise"))}

    def draw(figure: Figure) -> None:
        left, right = _axes_row(figure, 2)
        ok = _ok(frame)
        for (bs, column, style) in [(bs, c, s) for bs in sorted(ok["batch_size"].unique())
                                    for c, s in (("test_error", "-"),
                                                 ("test_error_precise", "--"))]:
            stats = ok[ok["batch_size"] == bs].groupby("bn_momentum")[column]
            name = "running" if column == "test_error" else "precise"
            _band(left, stats.mean().index, stats.mean(), stats.std(), f"batch {bs}, {name}",
                  linestyle=style)
        for bs in sorted(ok["batch_size"].unique()):
            stats = ok[ok["batch_size"] == bs].groupby("bn_momentum")
            for column, name, style in (("stat_error", "running", "-"),
                                        ("stat_error_precise", "precise", "--")):
                _band(right, stats[column].mean().index, stats[column].mean(),
                      stats[column].std(), f"batch {bs}, {name}", linestyle=style)
        left.set(xscale="log", xlabel="batch norm momentum (weight of the new batch)",
                 ylabel="test error")
        right.set(xscale="log", yscale="log", xlabel="batch norm momentum",
                  ylabel="error of the statistics")
        left.legend(fontsize=7)
        right.legend(fontsize=7)

    return ClaimReport(
        claim="inference", title="6. Training vs inference discrepancy",
        statement="Batch norm computes different functions in training (batch statistics) and "
                  "inference (running averages) (Ioffe, 2017); the exponential running average "
                  "is a poor estimate with a small momentum over few steps or a large one with "
                  "small batches, and recomputing population statistics in one pass after "
                  "training (\"precise BN\") fixes it (Wu & Johnson, 2021, \"Rethinking 'Batch' "
                  "in BatchNorm\").",
        setup=f"MLP 64-128-128-10 with batch norm on the digits, SGD lr 0.05 momentum 0.9, "
              f"{int(frame['epochs'].max())} epochs at every batch size (so the smaller batches "
              f"make more updates); the trained weights do not depend "
              f"on the momentum (it only feeds the running statistics). Precise statistics: "
              f"normkit.inference.precise_statistics over the shuffled training set with the "
              f"training batch size. Error of the statistics: normkit.train.stat_error's "
              f"measure, mean over the two batch norms; {_seeds(frame)} seeds.",
        rule=f"Holds if, in some setting, the test error with running statistics exceeds the "
             f"error with precise statistics by more than {100 * LAG_MARGIN:g} point and two "
             f"standard errors of the per-seed (paired) differences (the discrepancy is real "
             f"here), and the precise pass lowers the error of the statistics in every "
             f"setting, beyond two standard errors of the paired differences (the remedy "
             f"works); mixed if only one of the two.",
        outcome=rule.judge(frame),
        evidence=evidence + (" (the mean |gap| to batch statistics does "
                             f"{'' if closes else 'not '}shrink)") + ".",
        tables=tables, draw=draw,
        notes=["Batch statistics on test batches of 8 are themselves noisy, so the gap to "
               "them is not the target at small batches: the error of the statistics is."])


# ---------------------------------------------------------------------------------------------
# 7. Saturating nonlinearities
# ---------------------------------------------------------------------------------------------

def analyze_saturation(frame: pd.DataFrame) -> ClaimReport:
    final = [c for c in frame.columns if c.startswith("sat_") and c[4:].isdigit()]
    epochs = [c for c in frame.columns if c.startswith("sat_e")]
    ok = _ok(frame).assign(sat_final=lambda f: f[final].mean(axis=1),
                           sat_initial=lambda f: f["sat_e000"])
    means = ok.groupby(["activation", "norm"])[["sat_initial", "sat_final", "test_error"]].mean()
    lines, parts = [], []
    frame = frame.assign(sat_final=frame[final].mean(axis=1))
    for activation in ok["activation"].unique():
        part = means.xs(activation)
        if not {"none", "batch"} <= set(part.index):
            continue
        none, batch = part.loc["none"], part.loc["batch"]
        parts += [Difference(f"{activation} {column}", column,
                             arm("batch", activation=activation, norm="batch"),
                             arm("none", activation=activation, norm="none"), "lower")
                  for column in ("sat_final", "test_error")]
        layer = part.loc["layer"] if "layer" in part.index else None
        lines.append(f"{activation}: saturated fraction at the end none {_pct(none['sat_final'])}"
                     f" vs batch {_pct(batch['sat_final'])}"
                     + (f" vs layer {_pct(layer['sat_final'])}" if layer is not None else "")
                     + f" (at init {_pct(none['sat_initial'])} / {_pct(batch['sat_initial'])}); "
                     f"test error none {_pct(none['test_error'])} vs batch "
                     f"{_pct(batch['test_error'])}"
                     + (f" vs layer {_pct(layer['test_error'])}" if layer is not None else ""))
    per_layer = ok.groupby(["activation", "norm"])[final].mean()
    per_layer.columns = [f"layer {c.rsplit('_', 1)[1]}" for c in final]
    over_time = ok.groupby(["activation", "norm"])[epochs].mean()
    over_time.columns = [f"epoch {int(c[5:])}" for c in epochs]
    summary = pd.concat({"test error": aggregate(frame, rows="activation", cols="norm",
                                                 value="test_error"),
                         "saturated at init": aggregate(frame, rows="activation",
                                                        cols="norm", value="sat_e000"),
                         "saturated at the end": aggregate(frame.assign(
                             s=frame[final].mean(axis=1)), rows="activation", cols="norm",
                             value="s")}, axis=1)
    summary.columns = [" · ".join(map(str, c)) for c in summary.columns]

    def draw(figure: Figure) -> None:
        activations = list(ok["activation"].unique())
        grid = figure.subplots(2, len(activations), squeeze=False)
        for column, activation in enumerate(activations):
            top, bottom = grid[0][column], grid[1][column]
            for norm in ok["norm"].unique():
                if (activation, norm) not in over_time.index:
                    continue
                rows = ok[(ok["activation"] == activation) & (ok["norm"] == norm)]
                shown = [c for c in epochs if rows[c].notna().any()]
                _band(top, [int(c[5:]) for c in shown], rows[shown].mean(), rows[shown].std(),
                      norm, NORM_COLORS.get(norm))
                _band(bottom, range(len(final)), rows[final].mean(), rows[final].std(), norm,
                      NORM_COLORS.get(norm))
            top.set(xlabel="epoch", ylabel="saturated fraction (mean over layers)")
            bottom.set(xlabel="layer", ylabel="saturated fraction at the end")
            top.set_title(f"{activation}: derivative < {SATURATION_DERIVATIVE}", fontsize=9)
            top.legend(fontsize=8)

    return ClaimReport(
        claim="saturation", title="7. Saturating nonlinearities",
        statement="Ioffe & Szegedy (2015), Sec. 3.3 and 4.2: batch norm keeps the inputs of "
                  "saturating nonlinearities out of their saturated regimes, so sigmoid "
                  "networks train with it (their sigmoid Inception did, without it never).",
        setup=f"MLP with 8 hidden layers of 64 on the digits, sigmoid or tanh after the norm "
              f"(Dense -> norm -> activation), Glorot-uniform init, SGD lr 0.05 momentum 0.9, "
              f"batch 32, {int(frame['epochs'].max())} epochs. Saturated: the activation's "
              f"derivative at the pre-activation is below {SATURATION_DERIVATIVE} (|z| > "
              f"{SATURATION_Z['sigmoid']:.3f} for sigmoid, {SATURATION_Z['tanh']:.3f} for "
              f"tanh), over the first 256 training digits in training "
              f"mode, at epochs {', '.join(map(str, SATURATION_EPOCHS))}; {_seeds(frame)} seeds.",
        rule="For each activation: batch norm's final mean saturated fraction lower than "
             "none's, and its final test error lower than none's. Holds if all four comparisons, "
             "mixed if some. " + SIGNIFICANCE,
        outcome=Combined("7. Saturating nonlinearities", parts, "each").judge(frame),
        evidence="; ".join(lines) + ".",
        tables={"summary (mean ± std over seeds)": summary,
                "saturated fraction per layer at the end (mean)": per_layer.round(4),
                "saturated fraction over training (mean over layers)": over_time.round(4)},
        draw=draw, figsize=(10, 6.5))


# ---------------------------------------------------------------------------------------------
# 8. The Keras example
# ---------------------------------------------------------------------------------------------

KERAS_TARGET = 0.8
KERAS_MARGIN = 0.01                    # a point of accuracy
KERAS_OPTIMIZER = "adam"               # the example's optimizer; SGD is run beside it


def _keras_variant(row) -> str:
    return "no BN" if row["norm"] == "none" else f"BN {row['placement']} ReLU"


def analyze_keras_example(frame: pd.DataFrame) -> ClaimReport:
    frame = frame.assign(variant=frame.apply(_keras_variant, axis=1),
                         train_acc=1 - frame["train_error"], test_acc=1 - frame["test_error"])
    ok = _ok(frame)
    test_cols = [f"test_acc_e{e:03d}" for e in CURVE_EPOCHS if f"test_acc_e{e:03d}" in frame
                 and frame[f"test_acc_e{e:03d}"].notna().any()]
    train_cols = [c.replace("test", "train") for c in test_cols]
    curves = ok.groupby(["optimizer", "variant"])[train_cols + test_cols].mean()
    reach = {}
    for key, row in curves.iterrows():
        hit = [int(c[-3:]) for c in test_cols if row[c] >= KERAS_TARGET]
        reach[key] = hit[0] if hit else None
    final = ok.groupby(["optimizer", "variant"])["test_acc"].mean()
    max_epoch = int(frame["epochs"].max())
    frame = frame.assign(epoch_to_target=frame[test_cols].ge(KERAS_TARGET).apply(
        lambda row: next((int(c[-3:]) for c, hit in row.items() if hit), max_epoch + 1), axis=1))
    cell = {variant: arm(variant, optimizer=KERAS_OPTIMIZER, variant=variant)
            for variant in ("no BN", "BN after ReLU", "BN before ReLU")}
    rule = Combined("8. The classic Keras example", [
        Difference("faster", "epoch_to_target", cell["BN after ReLU"], cell["no BN"], "lower"),
        Difference("as accurate", "test_error", cell["BN after ReLU"], cell["no BN"],
                   "no_worse_lower", KERAS_MARGIN)], "all")
    placement = Difference("8b. BN before or after the ReLU: the same final test error",
                           "test_error", cell["BN before ReLU"], cell["BN after ReLU"], "same",
                           KERAS_MARGIN)
    lines = []
    for optimizer in ok["optimizer"].unique():
        if (optimizer, "no BN") not in reach or (optimizer, "BN after ReLU") not in reach:
            continue
        none, after = reach[(optimizer, "no BN")], reach[(optimizer, "BN after ReLU")]
        before = reach.get((optimizer, "BN before ReLU"))
        lines.append(f"{optimizer}: mean test accuracy first >= {KERAS_TARGET} at epoch "
                     f"{_epoch(none)} without BN, {_epoch(after)} with BN after the ReLU, "
                     f"{_epoch(before)} before it; final test accuracy "
                     + ", ".join(f"{v} {100 * final[(optimizer, v)]:.1f} %"
                                 for v in ("no BN", "BN after ReLU", "BN before ReLU")
                                 if (optimizer, v) in final.index))
    accuracy = pd.concat({"train accuracy (training mode, last epoch)": aggregate(
        frame, rows="optimizer", cols="variant", value="train_acc"),
        "test accuracy": aggregate(frame, rows="optimizer", cols="variant", value="test_acc")},
        axis=1)
    accuracy.columns = [" · ".join(map(str, c)) for c in accuracy.columns]
    curve_table = curves[test_cols].T
    curve_table.index = [int(c[-3:]) for c in test_cols]
    curve_table.index.name = "epoch"
    curve_table.columns = [" · ".join(c) for c in curve_table.columns]

    def draw(figure: Figure) -> None:
        optimizers = list(ok["optimizer"].unique())
        colors = {"no BN": "tab:gray", "BN after ReLU": "tab:blue", "BN before ReLU": "tab:green"}
        for axes, optimizer in zip(_axes_row(figure, len(optimizers)), optimizers):
            for variant in colors:
                if (optimizer, variant) not in curves.index:
                    continue
                rows = ok[(ok["optimizer"] == optimizer) & (ok["variant"] == variant)]
                epochs = [int(c[-3:]) for c in test_cols]
                _band(axes, epochs, rows[test_cols].mean(), rows[test_cols].std(),
                      f"{variant}, test", colors[variant], marker="none")
                axes.plot(epochs, rows[train_cols].mean().values, color=colors[variant],
                          linestyle="--", label=f"{variant}, train (mean)")
            axes.set(xlabel="epoch", ylabel="accuracy (mean over seeds)", ylim=(0.4, 1.0))
            axes.set_title(f"circles, {optimizer}", fontsize=9)
            axes.legend(fontsize=7)

    return ClaimReport(
        claim="keras_example", title="8. The classic Keras example",
        statement="Brownlee, \"How to Accelerate Learning of Deep Neural Networks With Batch "
                  "Normalization\" (Machine Learning Mastery): on two circles, adding a "
                  "BatchNormalization layer to a one-hidden-layer MLP accelerates learning. "
                  "Its code puts the layer after the ReLU although its text recommends before.",
        setup=f"scikit-learn's make_circles(n_samples={CIRCLES['n_samples']}, "
              f"noise={CIRCLES['noise']:g}, random_state={CIRCLES['random_state']}) (its default "
              f"factor {CIRCLES_FACTOR:g}), the first {CIRCLES_TRAIN} points for training and the "
              f"rest for testing, as the example; Dense({_one(frame, 'width')}, ReLU, He-uniform) "
              f"-> [BN] -> Dense(1, sigmoid, Glorot-uniform), binary cross-entropy, batch "
              f"{_one(frame, 'batch_size')} with the last partial batch of each epoch kept (as "
              f"Keras does), {_one(frame, 'epochs')} epochs, Keras' BN defaults through normkit "
              f"(momentum {_one(frame, 'bn_momentum')} as the weight of the new batch, eps "
              f"{_one(frame, 'bn_eps')}); "
              + "; ".join(f"{o} lr {_one(frame[frame['optimizer'] == o], 'lr')}"
                          for o in frame["optimizer"].unique())
              + f" (Adam with Keras' eps {KERAS_ADAM_EPS:g}, SGD with momentum "
              f"{_one(frame[frame['optimizer'] == 'sgd'], 'momentum')}); {_seeds(frame)} seeds. "
              f"Train accuracy is Keras': the mean over the epoch's batches in training mode.",
        rule=f"Holds if, with {KERAS_OPTIMIZER} (the example's optimizer), the example's model "
             f"(BN after the ReLU) reaches test accuracy {KERAS_TARGET:g} at an earlier recorded "
             f"epoch than without BN (per seed; never = epochs + 1) and its final test error is "
             f"not higher by more than {100 * KERAS_MARGIN:g} point; both beyond two standard "
             f"errors. 8b: BN before and after the ReLU end within {100 * KERAS_MARGIN:g} point "
             f"of each other (two standard errors included).",
        outcome=rule.judge(frame), evidence="; ".join(lines) + ".",
        tables={"final accuracy": accuracy, "mean test accuracy per epoch": curve_table.round(3)},
        draw=draw, figsize=(10, 3.8),
        caption="Solid: test accuracy (evaluation mode), mean over the seeds with a ± 1 "
                "standard deviation band; dashed: train accuracy (training mode), mean.",
        notes=["A small momentum (the weight of the new batch) makes the running statistics lag "
               "the weights over the first epochs, so evaluation-mode test accuracy can trail "
               "the training-mode train accuracy by a wide margin (see claim 6)."],
        extra=[(placement.claim, placement.judge(frame))])


def _epoch(epoch) -> str:
    return "never" if epoch is None else str(epoch)


# ---------------------------------------------------------------------------------------------
# The hooks
# ---------------------------------------------------------------------------------------------

ANALYSES = {
    "learning_rate": analyze_learning_rate,
    "initialization": analyze_initialization,
    "regularization": analyze_regularization,
    "cost": analyze_cost,
    "covariate_shift": analyze_covariate_shift,
    "inference": analyze_inference,
    "saturation": analyze_saturation,
    "keras_example": analyze_keras_example,
}


def analyze(frame: pd.DataFrame) -> dict[str, ClaimReport]:
    """A report per claim with at least one finished (ok or diverged) run."""
    reports = {}
    for claim, analysis in ANALYSES.items():
        part = frame[(frame["claim"] == claim) & frame["status"].isin(["ok", "diverged"])]
        if len(part):
            reports[claim] = analysis(part.dropna(axis=1, how="all").reset_index(drop=True))
    return reports


def tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    reports = analyze(frame)
    named = {"verdicts": verdict_table(reports)}
    for claim, report in reports.items():
        for title, table in report.tables.items():
            named[f"{claim}: {title}"] = table
    return named


def verdict_table(reports: dict[str, ClaimReport]) -> pd.DataFrame:
    rows = []
    for claim, report in reports.items():
        rows.append({"claim": report.title, "verdict": report.verdict,
                     "figure": f"{claim}.png", "evidence": report.evidence})
        for title, outcome in report.extra:
            rows.append({"claim": title, "verdict": outcome.label, "figure": f"{claim}.png",
                         "evidence": outcome.numbers_text()})
    return pd.DataFrame(rows, columns=["claim", "verdict", "figure", "evidence"])


def judged(reports: dict[str, ClaimReport]) -> list[tuple[str, Outcome]]:
    """(claim, Outcome) of every verdict, the extra lines (5b, 8b) included."""
    out = []
    for report in reports.values():
        out += [(report.title, report.outcome), *report.extra]
    return out


def figures(frame: pd.DataFrame) -> dict[str, Figure]:
    from matplotlib.figure import Figure

    reports = analyze(frame)
    out = {}
    for claim, report in reports.items():
        figure = Figure(figsize=report.figsize)
        report.draw(figure)
        figure.suptitle(report.title, fontsize=10)
        legends_outside(figure)
        figure.tight_layout()
        out[claim] = figure
    return out


def reports(frame: pd.DataFrame) -> dict[str, str]:
    """The per-claim pages ``<claim>.md`` and the ``README.md`` with every verdict."""
    analyzed = analyze(frame)
    pages = {f"{claim}.md": claim_markdown(report) for claim, report in analyzed.items()}
    return {**pages, "README.md": readme_markdown(analyzed, frame),
            "verdicts.csv": verdicts_csv("claims", judged(analyzed))}


def claim_markdown(report: ClaimReport) -> str:
    lines = [f"# {report.title}", "", f"**Verdict here: {report.verdict}.** {report.evidence}", "",
             f"**Numbers the rule read** (n_min {report.outcome.n_min}): "
             f"{report.outcome.numbers_text()}.", "",
             f"**Published statement.** {report.statement}", "",
             f"**Setup.** {report.setup}", "", f"**Verdict rule.** {report.rule}", ""]
    for title, outcome in report.extra:
        lines += [f"**{title}: {outcome.label}** (rule above; n_min {outcome.n_min}; numbers: "
                  f"{outcome.numbers_text()}).", ""]
    lines += [f"![{report.title}]({report.claim}.png)", "", f"*{report.caption}*", ""]
    for note in report.notes:
        lines += [f"Note: {note}", ""]
    for title, table in report.tables.items():
        lines += [f"## {title}", "", markdown_table(table), ""]
    return "\n".join(lines)


def readme_markdown(reports: dict[str, ClaimReport], frame: pd.DataFrame) -> str:
    counts = frame["status"].value_counts()
    lines = ["# The claims study: what batch norm is said to do, tested here", "",
             "One line per claim: the verdict on these small networks, the figure that shows "
             "it, and the published statement it tests. Each verdict follows from the numbers "
             "by the rule written in the claim's page (`<claim>.md`), which also has the setup "
             "and the tables; `table.md` has every table, `runs.csv` every run.", "",
             f"Runs: {counts.get('ok', 0)} ok, {counts.get('diverged', 0)} diverged, "
             f"{counts.get('failed', 0)} failed. Written by `normkit run claims` "
             "(studies/claims.py). A verdict needs at least 3 seeds in every cell it compares; "
             "with fewer it reads \"undetermined (n=...)\" (the quick grid). verdicts.csv has "
             "the verdicts with the numbers each rule read.", "",
             "| claim | verdict here | figure | published statement | numbers |",
             "|---|---|---|---|---|"]
    for claim, report in reports.items():
        lines.append(f"| [{report.title}]({claim}.md) | **{report.verdict}** | "
                     f"[{claim}.png]({claim}.png) | {report.statement} | {report.evidence} |")
        for title, outcome in report.extra:
            lines.append(f"| [{title}]({claim}.md) | **{outcome.label}** | "
                         f"[{claim}.png]({claim}.png) | (see {report.title}) | "
                         f"{outcome.numbers_text()} |")
    return "\n".join(line.replace("\n", " ") for line in lines) + "\n"
