"""The significance rule the studies' verdicts share: a difference of means over seeds counts
only beyond two standard errors of that difference (Welch)."""
from __future__ import annotations

import math

import pandas as pd


def difference(lower: pd.Series, higher: pd.Series) -> tuple[float, float]:
    """mean(higher) - mean(lower) and the standard error of that difference (Welch; a side
    with one value contributes no variance; NaN values are left out)."""
    lower, higher = lower.dropna(), higher.dropna()
    if lower.empty or higher.empty:
        return math.nan, math.nan
    variance = sum(v.var(ddof=1) / len(v) for v in (lower, higher) if len(v) > 1)
    return float(higher.mean() - lower.mean()), math.sqrt(variance)


def clearly_lower(lower: pd.Series, higher: pd.Series) -> bool:
    """mean(lower) < mean(higher) by more than two standard errors of the difference."""
    diff, error = difference(lower, higher)
    return bool(diff > 2 * error)
