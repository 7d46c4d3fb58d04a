"""The verdict engine (studies/_verdicts.py): each rule kind on made-up runs whose answer is
known: a clear effect, no effect, a mixed result, too few seeds."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "studies"))
import _verdicts as v  # noqa: E402

NOISE = np.array([-0.01, 0.0, 0.01, 0.005, -0.005])


def runs(cells: dict[tuple[str, str], float], seeds: int = 5, noise: float = 1.0,
         statuses: dict | None = None) -> pd.DataFrame:
    """One row per (norm, group, seed): metric = the cell's value + noise * NOISE[seed]."""
    rows = []
    for (norm, group), value in cells.items():
        for seed in range(seeds):
            rows.append({"norm": norm, "group": group, "seed": seed,
                         "status": (statuses or {}).get((norm, group, seed), "ok"),
                         "error": value + noise * NOISE[seed]})
    return pd.DataFrame(rows)


BATCH, NONE = v.arm("batch", norm="batch", group="a"), v.arm("none", norm="none", group="a")


def test_difference_holds_for_a_clear_effect_and_not_for_none():
    clear = runs({("batch", "a"): 0.10, ("none", "a"): 0.20})
    outcome = v.Difference("batch lower", "error", BATCH, NONE, "lower", 0.01).judge(clear)
    assert outcome.verdict == v.HOLDS and outcome.n == {"batch": 5, "none": 5}
    assert outcome.numbers["difference"] == pytest.approx(-0.10)
    assert outcome.numbers["batch error"] == pytest.approx(0.10)
    same = runs({("batch", "a"): 0.20, ("none", "a"): 0.20})
    assert v.Difference("x", "error", BATCH, NONE, "lower").judge(same).verdict == v.FAILS
    # the effect in the other direction does not hold either
    assert v.Difference("x", "error", BATCH, NONE, "higher").judge(clear).verdict == v.FAILS


def test_difference_within_the_margin_or_the_noise_does_not_count():
    small = runs({("batch", "a"): 0.195, ("none", "a"): 0.20})
    assert v.Difference("x", "error", BATCH, NONE, "lower", 0.01).judge(small).verdict == v.FAILS
    noisy = runs({("batch", "a"): 0.18, ("none", "a"): 0.20}, noise=5.0)
    assert v.Difference("x", "error", BATCH, NONE, "lower").judge(noisy).verdict == v.FAILS


def test_same_and_no_worse_are_judged_against_the_margin():
    flat = runs({("batch", "a"): 0.200, ("none", "a"): 0.201}, noise=0.2)
    assert v.Difference("x", "error", BATCH, NONE, "same", 0.01).judge(flat).verdict == v.HOLDS
    apart = runs({("batch", "a"): 0.10, ("none", "a"): 0.20})
    assert v.Difference("x", "error", BATCH, NONE, "same", 0.01).judge(apart).verdict == v.FAILS
    slightly_worse = runs({("batch", "a"): 0.205, ("none", "a"): 0.20}, noise=0.1)
    rule = v.Difference("x", "error", BATCH, NONE, "no_worse_lower", 0.01)
    assert rule.judge(slightly_worse).verdict == v.HOLDS
    assert rule.judge(runs({("batch", "a"): 0.25, ("none", "a"): 0.20})).verdict == v.FAILS


def test_no_difference_claims_too_noisy_for_the_margin_are_undetermined_not_refuted():
    # the means are equal, but the seeds' spread is wider than the margin: the data neither
    # confirm "same within 0.01" nor show a difference beyond it
    noisy = runs({("batch", "a"): 0.20, ("none", "a"): 0.20}, noise=20.0)
    for direction in ("same", "no_worse_lower"):
        outcome = v.Difference("x", "error", BATCH, NONE, direction, 0.01).judge(noisy)
        assert outcome.numbers["standard error"] > 0.01
        assert outcome.verdict == v.UNDETERMINED and outcome.n_min == 5
        assert outcome.label.startswith("undetermined (n=5; within the noise")
    # a clear difference far beyond the margin and the noise is still refuted
    apart = runs({("batch", "a"): 0.40, ("none", "a"): 0.20}, noise=0.5)
    assert v.Difference("x", "error", BATCH, NONE, "same", 0.01).judge(apart).verdict == v.FAILS


@pytest.mark.parametrize("seeds", [1, 2])
def test_fewer_than_three_seeds_is_undetermined_whatever_the_effect(seeds):
    frame = runs({("batch", "a"): 0.10, ("none", "a"): 0.90}, seeds=seeds)
    for rule in (v.Difference("x", "error", BATCH, NONE, "lower"),
                 v.Level("x", "error", BATCH, 0.5, "lower"),
                 v.Summary("x", "median", lambda r: r["error"].median(), BATCH, NONE, "lower")):
        outcome = rule.judge(frame)
        assert outcome.verdict == v.UNDETERMINED and outcome.n_min == seeds
        assert outcome.label == f"undetermined (n={seeds})"


def test_missing_runs_and_diverged_runs_leave_too_few_seeds():
    frame = runs({("batch", "a"): 0.10})
    assert v.Difference("x", "error", BATCH, NONE).judge(frame).verdict == v.UNDETERMINED
    diverged = {("none", "a", s): "diverged" for s in range(3)}
    frame = runs({("batch", "a"): 0.10, ("none", "a"): 0.90}, statuses=diverged)
    outcome = v.Difference("x", "error", BATCH, NONE).judge(frame)
    assert outcome.verdict == v.UNDETERMINED and outcome.n == {"batch": 5, "none": 2}


def test_level_compares_a_mean_with_a_fixed_value():
    frame = runs({("batch", "a"): -2.0})
    assert v.Level("x", "error", BATCH, -1.0, "lower").judge(frame).verdict == v.HOLDS
    assert v.Level("x", "error", BATCH, -1.0, "higher").judge(frame).verdict == v.FAILS
    assert v.Level("x", "error", BATCH, -2.0, "lower").judge(frame).verdict == v.FAILS


def test_summary_compares_a_statistic_of_all_runs_with_a_factor_or_a_number():
    frame = runs({("batch", "a"): 1.0, ("none", "a"): 3.0})
    median = lambda r: r["error"].median()                           # noqa: E731
    assert v.Summary("x", "median", median, BATCH, NONE, "lower").judge(frame).verdict == v.HOLDS
    half = v.Summary("x", "median", median, BATCH, NONE, "lower", factor=0.3)
    assert half.judge(frame).verdict == v.FAILS
    assert v.Summary("x", "median", median, NONE, 2.0, "higher").judge(frame).verdict == v.HOLDS


def test_combined_each_gives_mixed_when_some_parts_hold():
    frame = runs({("batch", "a"): 0.1, ("none", "a"): 0.2, ("batch", "b"): 0.2,
                  ("none", "b"): 0.2})
    parts = [v.Difference(g, "error", v.arm("batch", norm="batch", group=g),
                          v.arm("none", norm="none", group=g), "lower") for g in ("a", "b")]
    assert v.Combined("x", parts, "each").judge(frame).verdict == v.MIXED
    assert v.Combined("x", parts, "all").judge(frame).verdict == v.FAILS
    assert v.Combined("x", parts, "any").judge(frame).verdict == v.HOLDS
    assert v.Combined("x", parts[:1], "each").judge(frame).verdict == v.HOLDS
    assert v.Combined("x", parts[1:], "each").judge(frame).verdict == v.FAILS
    outcome = v.Combined("x", parts, "each").judge(frame)
    assert outcome.numbers["a: difference"] == pytest.approx(-0.1)
    assert outcome.n_min == 5


def test_combined_is_undetermined_when_a_part_is():
    frame = pd.concat([runs({("batch", "a"): 0.1, ("none", "a"): 0.2}),
                       runs({("batch", "b"): 0.1, ("none", "b"): 0.2}, seeds=1)])
    parts = [v.Difference(g, "error", v.arm("batch", norm="batch", group=g),
                          v.arm("none", norm="none", group=g), "lower") for g in ("a", "b")]
    outcome = v.Combined("x", parts).judge(frame)
    assert outcome.verdict == v.UNDETERMINED and outcome.n_min == 1


def test_verdicts_csv_has_the_promised_columns():
    frame = runs({("batch", "a"): 0.1, ("none", "a"): 0.2})
    outcome = v.Difference("x", "error", BATCH, NONE, "lower").judge(frame)
    table = v.verdict_rows("demo", [("batch is lower", outcome)])
    assert list(table.columns) == ["study", "claim", "verdict", "n_min", "numbers"]
    assert table.iloc[0].tolist()[:4] == ["demo", "batch is lower", "holds", 5]
    assert "difference = -0.1" in table.iloc[0]["numbers"]
