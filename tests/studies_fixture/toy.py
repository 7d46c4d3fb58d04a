"""Toy study for the sweep runner's tests: seeded random metrics, some runs diverge or fail."""
import os
import time
from dataclasses import dataclass

from _toy_sample import sample

from normkit.sweep import Diverged, Study, aggregate, line_plot


@dataclass(frozen=True)
class Config:
    mode: str = "normal"    # normal | nan_loss | flag | raise_diverged | fail | crash
    width: int = 4
    shift: float = 0.0
    seed: int = 0


def run(config: Config) -> dict[str, float]:
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))   # not in the config: same keys
    x = sample(config.seed, config.width, config.shift)     # (width,)
    metrics = {"loss": float((x**2).mean()), "score": float(x.max())}
    if config.mode == "nan_loss":
        return {"loss": float("nan"), "score": metrics["score"]}
    if config.mode == "flag":
        return {**metrics, "diverged": True}
    if config.mode == "raise_diverged":
        raise Diverged(metrics)
    if config.mode == "fail":
        raise ValueError(f"deliberate failure,\nseed {config.seed}")
    if config.mode == "crash":
        os._exit(3)
    return metrics


def tables(df):
    return aggregate(df, rows="width", cols="mode", value="loss")


def figures(df):
    return {"score": line_plot(df, x="width", y="score", hue="mode", logx=True)}


STUDY = Study(
    name="toy",
    config=Config,
    metrics=("loss", "score"),
    grid_quick={"mode": ["normal", "nan_loss", "fail"], "width": [4, 8], "seed": [0, 1]},
    grid_full=[{"width": [2, 4, 8, 16], "seed": range(5)}, {"shift": [1.0], "seed": [0, 1]}],
    run=run,
    tables=tables,
    figures=figures,
)
