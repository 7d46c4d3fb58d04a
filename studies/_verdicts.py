"""Verdict rules: the one engine behind the studies' verdicts.

A rule names the metric, the arms it compares (each a selection of runs), the direction and the
margin, and ``judge(frame)`` returns an :class:`Outcome`: the verdict, the numbers it read and
the seed count per arm. Four kinds:

- :class:`Difference`: the mean of a metric over seeds in one arm against another; an effect
  counts only beyond the margin and two standard errors of the difference (Welch).
- :func:`Level`: a Difference against a fixed value (the one-sample standard error).
- :class:`Summary`: a statistic of each arm's runs taken together (a count, a median, an epoch
  of a mean curve), compared across arms or with a fixed value; no standard error.
- :class:`Combined`: several rules; "all" (every one holds), "any" (one holds) or "each" (holds
  if all hold, does not hold if none, mixed otherwise).

Any arm with fewer than :data:`MIN_SEEDS` seeds, or with no runs, makes the verdict
"undetermined": one seed has no variance, so one seed cannot tell an effect from noise. A claim
of no difference ("same", "no_worse_*") is also undetermined when the data neither confirm it
(the difference and two standard errors within the margin) nor refute it (the difference beyond
the margin by two standard errors): the seeds are too noisy for the margin, and "does not hold"
would claim a difference the data do not show. Its label says which (:attr:`Outcome.label`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

HOLDS, FAILS, MIXED, UNDETERMINED = "holds", "does not hold", "mixed", "undetermined"
VERDICTS = (HOLDS, FAILS, MIXED, UNDETERMINED)
MIN_SEEDS = 3
COLUMNS = ("study", "claim", "verdict", "n_min", "numbers")
DIRECTIONS = ("lower", "higher", "same", "no_worse_lower", "no_worse_higher")


@dataclasses.dataclass(frozen=True)
class Outcome:
    verdict: str
    numbers: dict[str, float]               # what the rule read, by name
    n: dict[str, int]                       # seeds behind each arm

    @property
    def n_min(self) -> int:
        return min(self.n.values(), default=0)

    @property
    def label(self) -> str:
        """The verdict; an undetermined one with the seed count and, with enough seeds, why."""
        if self.verdict != UNDETERMINED:
            return self.verdict
        if self.n_min >= MIN_SEEDS:
            return f"{UNDETERMINED} (n={self.n_min}; within the noise: neither within the " \
                   "margin nor beyond it)"
        return f"{UNDETERMINED} (n={self.n_min})"

    def numbers_text(self) -> str:
        return "; ".join(f"{name} = {_number(value)}" for name, value in self.numbers.items())


def _number(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.4g}"


@dataclasses.dataclass(frozen=True)
class Arm:
    """The runs of one side: rows whose columns equal ``where``'s values (a callable value is a
    predicate on the column)."""
    name: str
    where: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def runs(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The finished runs (ok or diverged) of this arm."""
        mask = frame["status"].isin(["ok", "diverged"])
        for column, value in self.where.items():
            mask &= frame[column].map(value) if callable(value) else frame[column] == value
        return frame[mask]

    def values(self, frame: pd.DataFrame, metric: str) -> pd.Series:
        """The metric of the ok runs, finite values only."""
        runs = self.runs(frame)
        values = pd.to_numeric(runs.loc[runs["status"] == "ok", metric], errors="coerce")
        return values[values.map(math.isfinite)].astype(float)


def arm(name: str, **where: Any) -> Arm:
    return Arm(name, where)


def difference(lower: pd.Series, higher: pd.Series) -> tuple[float, float]:
    """mean(higher) - mean(lower) and the standard error of that difference (Welch); NaN for
    the error when a side has fewer than two values."""
    lower, higher = lower.dropna(), higher.dropna()
    if lower.empty or higher.empty:
        return math.nan, math.nan
    if len(lower) < 2 or len(higher) < 2:
        return float(higher.mean() - lower.mean()), math.nan
    variance = lower.var(ddof=1) / len(lower) + higher.var(ddof=1) / len(higher)
    return float(higher.mean() - lower.mean()), math.sqrt(variance)


def _decide(effect: float, error: float, direction: str, margin: float) -> str:
    """``effect`` is signed so that positive favours the claim ("lower"/"higher": the first
    arm better; "same"/"no_worse_*": the first arm's advantage)."""
    if math.isnan(effect) or math.isnan(error):
        return UNDETERMINED
    if direction in ("lower", "higher"):
        return HOLDS if effect > max(margin, 2 * error) else FAILS
    if direction == "same":
        if abs(effect) + 2 * error <= margin:
            return HOLDS
        return FAILS if abs(effect) - 2 * error > margin else UNDETERMINED
    if effect - 2 * error > -margin:                                 # no worse than by margin
        return HOLDS
    return FAILS if effect + 2 * error < -margin else UNDETERMINED


def _sign(direction: str) -> float:
    return -1.0 if direction in ("lower", "no_worse_lower", "same") else 1.0


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _seed_count(runs: pd.DataFrame) -> int:
    return int(runs["seed"].nunique()) if "seed" in runs else len(runs)


@dataclasses.dataclass(frozen=True)
class Difference:
    """``metric`` of arm ``first`` against arm ``second`` (or a fixed number: then the standard
    error is the one-sample one of first's mean): "lower"/"higher" holds when first's mean is
    lower/higher by more than ``margin`` and two standard errors; "same" when the difference
    and two standard errors stay within ``margin``; "no_worse_lower"/"no_worse_higher" when
    first is not worse than second by ``margin`` (two standard errors included)."""
    claim: str
    metric: str
    first: Arm
    second: Arm | float
    direction: str = "lower"
    margin: float = 0.0

    def __post_init__(self) -> None:
        _check_direction(self.direction)

    def judge(self, frame: pd.DataFrame) -> Outcome:
        a = self.first.values(frame, self.metric)
        numbers = {f"{self.first.name} {self.metric}": _mean(a)}
        n = {self.first.name: len(a)}
        if isinstance(self.second, Arm):
            b = self.second.values(frame, self.metric)
            diff, error = difference(b, a)                  # mean(first) - mean(second)
            numbers[f"{self.second.name} {self.metric}"] = _mean(b)
            n[self.second.name] = len(b)
        else:
            diff = _mean(a) - self.second
            error = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
            numbers["against"] = float(self.second)
        numbers.update({"difference": diff, "standard error": error})
        verdict = _decide(_sign(self.direction) * diff, error, self.direction, self.margin)
        return Outcome(_gate(n, verdict), numbers, n)


def Level(claim: str, metric: str, arm: Arm, value: float, direction: str = "lower",  # noqa: N802
          margin: float = 0.0) -> Difference:
    """The mean of ``metric`` in ``arm`` against a fixed ``value`` (a :class:`Difference`)."""
    return Difference(claim, metric, arm, float(value), direction, margin)


@dataclasses.dataclass(frozen=True)
class Summary:
    """``statistic(runs)`` of arm ``first`` against that of arm ``second`` (or a fixed number):
    "lower" holds when first <= factor * second - margin (strictly below when margin is 0),
    "higher" when first >= factor * second + margin (strictly above when margin is 0)."""
    claim: str
    metric: str                             # the statistic's name
    statistic: Callable[[pd.DataFrame], float]
    first: Arm
    second: Arm | float
    direction: str = "lower"
    margin: float = 0.0
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"a Summary compares 'lower' or 'higher', got {self.direction!r}")

    def judge(self, frame: pd.DataFrame) -> Outcome:
        runs = self.first.runs(frame)
        mine = float(self.statistic(runs)) if len(runs) else math.nan
        numbers = {f"{self.first.name} {self.metric}": mine}
        n = {self.first.name: _seed_count(runs)}
        if isinstance(self.second, Arm):
            other_runs = self.second.runs(frame)
            other = float(self.statistic(other_runs)) if len(other_runs) else math.nan
            numbers[f"{self.second.name} {self.metric}"] = other
            n[self.second.name] = _seed_count(other_runs)
        else:
            other = float(self.second)
            numbers["against"] = other
        bound = self.factor * other
        if math.isnan(mine) or math.isnan(other):
            verdict = UNDETERMINED
        elif self.direction == "lower":
            verdict = HOLDS if (mine < bound if self.margin == 0 else mine <= bound - self.margin) \
                else FAILS
        else:
            verdict = HOLDS if (mine > bound if self.margin == 0 else mine >= bound + self.margin) \
                else FAILS
        return Outcome(_gate(n, verdict), numbers, n)


@dataclasses.dataclass(frozen=True)
class Combined:
    """Several rules. mode "all": holds if every one holds; "any": if one holds; "each": holds
    if all hold, does not hold if none, mixed otherwise. Undetermined if any part is."""
    claim: str
    rules: Sequence[Any]
    mode: str = "each"
    labels: Sequence[str] | None = None     # a prefix per part for the numbers

    def __post_init__(self) -> None:
        if self.mode not in ("all", "any", "each"):
            raise ValueError(f"mode must be 'all', 'any' or 'each', got {self.mode!r}")

    def judge(self, frame: pd.DataFrame) -> Outcome:
        outcomes = [rule.judge(frame) for rule in self.rules]
        labels = self.labels or [rule.claim for rule in self.rules]
        numbers, n = {}, {}
        for label, outcome in zip(labels, outcomes):
            numbers.update({f"{label}: {k}": v for k, v in outcome.numbers.items()})
            for name, count in outcome.n.items():
                n[f"{label}: {name}"] = count
        verdicts = [o.verdict for o in outcomes]
        if not verdicts or UNDETERMINED in verdicts:
            return Outcome(UNDETERMINED, numbers, n)
        held = [v == HOLDS for v in verdicts]
        if self.mode == "all":
            verdict = HOLDS if all(held) else FAILS
        elif self.mode == "any":
            verdict = HOLDS if any(held) else FAILS
        else:
            verdict = HOLDS if all(held) else (FAILS if all(v == FAILS for v in verdicts)
                                               else MIXED)
        return Outcome(verdict, numbers, n)


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def _gate(n: Mapping[str, int], verdict: str) -> str:
    """Undetermined when an arm has fewer than MIN_SEEDS seeds (or none)."""
    return UNDETERMINED if min(n.values(), default=0) < MIN_SEEDS else verdict


def verdict_rows(study: str, judged: Sequence[tuple[str, Outcome]]) -> pd.DataFrame:
    """The rows of ``verdicts.csv``: study, claim, verdict, n_min, numbers."""
    rows = [{"study": study, "claim": claim, "verdict": outcome.verdict,
             "n_min": outcome.n_min, "numbers": outcome.numbers_text()}
            for claim, outcome in judged]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def verdicts_csv(study: str, judged: Sequence[tuple[str, Outcome]]) -> str:
    return verdict_rows(study, judged).to_csv(index=False)

