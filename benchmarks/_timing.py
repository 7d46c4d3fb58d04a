"""Timing helpers shared by the benchmark scripts: warm, interleaved, repeated until stable.

    from _timing import interleaved, median_iqr, stream_bandwidth

    t = median_iqr(lambda: f(x))                       # one function: Timing(median, iqr, ...)
    ts = interleaved({"normkit": f, "torch": g})       # several, timed in turns in one loop
    print(ts["normkit"].median / ts["torch"].median)
    bw = stream_bandwidth()                            # bytes/s of a large NumPy copy

Every function is called once untimed (warm-up: compilation, first-touch page faults), then timed
in *samples*: a sample runs the function ``number`` times back to back (``number`` chosen so a
sample lasts at least ``min_sample`` seconds, which keeps timer overhead out of microsecond
calls) and records the time per call. With several functions, each round takes one sample of
each, in an order that rotates every round, so a slow spell of a shared machine hits every
function alike. Sampling stops when the median has settled (the median of the last half of the
samples within ``rtol`` of the median of all) and at least ``min_rounds`` were taken, or when
``max_time`` seconds have passed. Times are seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

__all__ = ["Timing", "interleaved", "median_iqr", "stream_bandwidth", "warm_up_threads"]


@dataclass(frozen=True)
class Timing:
    """Per-call times of one function: median and interquartile range (seconds)."""

    median: float
    iqr: float
    samples: np.ndarray        # (S,) seconds per call, one entry per sample
    number: int                # calls per sample

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median > 0 else float("nan")


def _summary(samples, number) -> Timing:
    samples = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return Timing(median=float(med), iqr=float(q3 - q1), samples=samples, number=number)


def _calls_per_sample(fn: Callable[[], object], min_sample: float) -> int:
    """Smallest power of two of calls lasting at least ``min_sample`` seconds (fn is warm)."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_sample or number >= 1 << 20:
            return number
        number *= 2


def _sample(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _settled(samples, rtol: float) -> bool:
    half = samples[len(samples) // 2:]
    return abs(np.median(half) - np.median(samples)) <= rtol * np.median(samples)


def interleaved(fns: Mapping[str, Callable[[], object]], *, min_rounds: int = 7,
                max_rounds: int = 200, max_time: float = 2.0, min_sample: float = 2e-4,
                rtol: float = 0.02, warmup: int = 1, gap: float = 0.0) -> dict[str, Timing]:
    """Time several zero-argument functions in turns; returns {name: Timing}.

    ``max_time`` bounds the sampling of all functions together (the calibration and warm-up
    calls come on top). Each function gets the same number of samples. ``gap`` seconds of
    sleep before each sample let thread pools that spin after a parallel region (OpenMP's
    default) go idle, so one library's workers do not slow the next library's sample.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    number = {name: _calls_per_sample(fns[name], min_sample) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_ in range(max_rounds):
        k = round_ % len(names)
        for name in names[k:] + names[:k]:               # rotate the order every round
            if gap:
                time.sleep(gap)
            samples[name].append(_sample(fns[name], number[name]))
        done = round_ + 1 >= min_rounds and all(_settled(s, rtol) for s in samples.values())
        if done or time.perf_counter() - start > max_time:
            break
    return {name: _summary(samples[name], number[name]) for name in names}


def median_iqr(fn: Callable[[], object], **kwargs) -> Timing:
    """Time one zero-argument function (same options as :func:`interleaved`)."""
    return interleaved({"fn": fn}, **kwargs)["fn"]


def stream_bandwidth(nbytes: int = 256 << 20, repeats: int = 9) -> float:
    """Streaming memory bandwidth in bytes/s: a NumPy copy of ``nbytes`` into a preallocated
    array, counted as ``2 * nbytes`` moved (read the source, write the destination); the median
    of ``repeats`` copies after one untimed copy that touches every page."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    timing = median_iqr(lambda: np.copyto(dst, src), min_rounds=repeats, max_rounds=repeats,
                        max_time=10.0, min_sample=0.0)
    return 2 * nbytes / timing.median


def warm_up_threads(seconds: float = 0.2) -> None:
    """Keep every Numba worker busy for a moment so the cores leave their idle state before the
    first timed call (the second core of a small VM otherwise starts slow)."""
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def spin(n):
        total = 0.0
        for i in prange(n):
            total += np.sqrt(i)
        return total

    spin(1000)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        spin(1 << 22)
