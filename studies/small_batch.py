"""Test error against batch size for each normalizer (Wu & He 2018, at toy scale).

Question: how does test error depend on the batch size for each normalizer? Wu & He (Group
Normalization, ECCV 2018, Table 2) found batch norm's ImageNet error rising from 23.6% at 32
images per GPU to 34.7% at 2, group norm flat at about 24% (``PAPER`` below). Here:

- Models: ``cnn1d`` on MNIST-1D (4000 training, 1000 test signals): three Conv1d(32, kernel 5,
  stride 2), a norm after each, ReLU, global average pool, Dense(10); ``mlp`` on scikit-learn's
  digits (1347 / 450): Dense(128), norm, ReLU, twice, then Dense(10). What each norm name means
  after a Dense and after a convolution is :func:`normkit.train.make_norm`'s docstring.
- Norms: none, batch, renorm (Ioffe's clips relaxed over the epochs: plain BN for the first
  epoch, r_max 1 -> 3 and d_max 0 -> 5 reached at half of the epochs,
  :func:`normkit.train.renorm_limits`), ghost (virtual batches of 4, run from batch 8 up), group
  (8 groups: of channels in the CNN, of 16 units in the MLP), layer, rms, instance (CNN only);
  the batch-independent competitors (``COMPETITORS``): frn (FRN + TLU; learned eps in the MLP),
  evonorm_s0 (8 groups, as group), evonorm_b0 and switchable (CNN only: they need spatial
  axes), gn+ws (group norm after weight-standardized layers), dyt (Dynamic Tanh). FRN and the
  EvoNorms are normalization-activation layers: no ReLU follows them.
- Batch sizes 1..128. At batch 1 the MLP has one value per channel, so batch/renorm cannot train
  there; those cells, ghost below 8 and instance norm in the MLP are not in the grid and read
  "n/a". The CNN's batch norm at batch 1 does train: its statistics are over the positions of
  one signal (>= 5 per channel), as PyTorch allows.
- Training: SGD, momentum 0.9, the same number of epochs at every batch size (CNN 10, MLP 20),
  the learning rate scaled linearly with the batch size from ``base_lr`` = 0.05 at 32
  (``lr_scaling="fixed"`` keeps ``base_lr`` at every batch size). The linear rule gives batch 1
  1/32 of the base rate, so a rise at the smallest batches may be the rate, not the batch
  statistics: the grids add a fixed-rate arm for the smallest batches (``FIXED_LR_BATCH_SIZES``,
  norms ``FIXED_LR_NORMS``) and a rule (:func:`rules`) says which explanation the numbers
  support. Five seeds (init and batch order; the data set is fixed).
- Metrics per run: ``test_error`` (evaluation mode, running statistics),
  ``test_error_batchstats`` (the same net on test batches of the training batch size, each
  normalized with its own statistics; running statistics untouched), ``train_error``
  (evaluation mode), ``stat_error`` (first norm layer's running statistics against the true
  statistics of its input over the training set, :func:`normkit.train.stat_error`; empty for
  norms without running statistics), ``lr``; the runner adds ``status`` (ok/diverged/failed)
  and ``seconds``.
- Quick grid (``--quick``): 2 seeds (so its verdicts read "undetermined"), batch sizes 1, 2, 8,
  32, 128 (the competitors at 2 and 32 only), the fixed-rate arm at 1 and 2, the CNN on 1600
  training signals for 3 epochs, the MLP for 5 epochs.

Outputs: table.md (per model: rows norms, columns batch sizes, mean ± std test error in % over
seeds, the paper's BN/GN rows beside; then the batch-statistics error and stat_error),
error_vs_batch.png, README.md with findings written from the numbers, and verdicts.csv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from normkit.sweep import Study, aggregate, legends_outside, markdown_table
from normkit.train import NotApplicable, TrainConfig, not_applicable_reason, train

from _verdicts import HOLDS, MIXED, UNDETERMINED, Combined, Difference, arm, verdicts_csv

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_BATCH_SIZES = (1, 2, 8, 32, 128)
#: The fixed-learning-rate arm: the smallest batches, the norms that tell the explanations apart.
FIXED_LR_BATCH_SIZES = (1, 2, 4)
QUICK_FIXED_LR_BATCH_SIZES = (1, 2)
FIXED_LR_NORMS = ("none", "batch", "group", "layer")
#: The batch size the verdicts read as "small" (the smallest where every model trains batch norm).
SMALL_BATCH = 2
#: A difference of test error smaller than this (in points) is not an effect.
MARGIN_POINTS = 1.0
#: The batch-independent competitors (and EvoNorm-B0/switchable, which mix batch statistics in):
#: each its paper's definition; FRN and the EvoNorms replace "norm + ReLU" (no ReLU after them);
#: "gn+ws" is group norm after weight-standardized layers. B0 and switchable need spatial axes.
COMPETITORS = {
    "cnn1d": ("frn", "evonorm_s0", "evonorm_b0", "gn+ws", "switchable", "dyt"),
    "mlp": ("frn", "evonorm_s0", "gn+ws", "dyt"),
}
NORMS = {
    "cnn1d": ("none", "batch", "renorm", "ghost", "group", "layer", "rms", "instance",
              *COMPETITORS["cnn1d"]),
    "mlp": ("none", "batch", "renorm", "ghost", "group", "layer", "rms", *COMPETITORS["mlp"]),
}
#: The quick grid runs the competitors at these batch sizes only (small and the reference).
QUICK_COMPETITOR_BATCH_SIZES = (2, 32)
DATASET = {"cnn1d": "mnist1d", "mlp": "digits"}
DATASET_NAME = {"cnn1d": "MNIST-1D", "mlp": "digits"}
EPOCHS = {"cnn1d": 10, "mlp": 20}
QUICK_EPOCHS = {"cnn1d": 3, "mlp": 5}
REFERENCE_BATCH = 32
GHOST_VIRTUAL_BATCH = 4
#: Wu & He (2018), ResNet-50 on ImageNet, validation error (%) by images per GPU.
PAPER = {
    "BN (Wu & He, ResNet-50/ImageNet)": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "GN (Wu & He, ResNet-50/ImageNet)": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
}


@dataclass(frozen=True)
class Config:
    model: str = "cnn1d"            # cnn1d (on MNIST-1D) | mlp (on digits)
    norm: str = "batch"
    batch_size: int = 32
    epochs: int = 10
    base_lr: float = 0.05           # the learning rate at batch 32
    lr_scaling: str = "linear"      # linear: base_lr * batch_size / 32 | fixed: base_lr
    mnist1d_samples: int = 5000     # MNIST-1D train + test (80% train); the MLP ignores it
    seed: int = 0

    def __post_init__(self):
        if self.model not in NORMS:
            raise ValueError(f"model must be one of {sorted(NORMS)}, got {self.model!r}")
        if self.lr_scaling not in ("linear", "fixed"):
            raise ValueError(f"lr_scaling must be 'linear' or 'fixed', got {self.lr_scaling!r}")


def learning_rate(config: Config) -> float:
    if config.lr_scaling == "fixed":
        return config.base_lr
    return config.base_lr * config.batch_size / REFERENCE_BATCH


def train_config(config: Config) -> TrainConfig:
    return TrainConfig(
        dataset=DATASET[config.model], model=config.model, norm=config.norm,
        num_samples=config.mnist1d_samples if config.model == "cnn1d" else None,
        virtual_batch_size=GHOST_VIRTUAL_BATCH, batch_size=config.batch_size,
        epochs=config.epochs, optimizer="sgd", lr=learning_rate(config), momentum=0.9,
        seed=config.seed)


def applicable(model: str, norm: str, batch_size: int) -> bool:
    """Whether the grid runs this cell: the norm can train at this batch size, and ghost batch
    norm only where the batch holds at least two virtual batches."""
    if norm not in NORMS[model]:
        return False
    if norm == "ghost" and batch_size < 2 * GHOST_VIRTUAL_BATCH:
        return False
    return not_applicable_reason(train_config(Config(model=model, norm=norm,
                                                     batch_size=batch_size))) is None


METRICS = ("lr", "test_error", "test_error_batchstats", "train_error", "stat_error",
           "test_loss", "train_loss", "epochs_run")


def run(config: Config) -> dict[str, float]:
    if not applicable(config.model, config.norm, config.batch_size):
        raise NotApplicable(f"{config.norm} at batch size {config.batch_size} is not in the "
                            f"study for the {config.model}")
    result = train(train_config(config))
    metrics = {"lr": learning_rate(config), "diverged": result["diverged"]}
    for name in METRICS[1:]:
        if result.get(name) is not None:
            metrics[name] = result[name]
    return metrics


def grid(batch_sizes, seeds, epochs, cnn_samples=None, fixed_lr_sizes=(),
         competitor_sizes=None) -> list[dict]:
    """One part per (model, norm): the batch sizes where it applies (the COMPETITORS only at
    ``competitor_sizes`` if given), the model's epochs; and per (model, norm in FIXED_LR_NORMS)
    the ``fixed_lr_sizes`` at ``lr_scaling="fixed"``."""
    parts = []
    for model in NORMS:
        fixed = {"epochs": [epochs[model]]}
        if model == "cnn1d" and cnn_samples is not None:
            fixed["mnist1d_samples"] = [cnn_samples]
        for norm in NORMS[model]:
            candidates = batch_sizes
            if competitor_sizes is not None and norm in COMPETITORS[model]:
                candidates = [size for size in batch_sizes if size in competitor_sizes]
            sizes = [size for size in candidates if applicable(model, norm, size)]
            parts.append({"model": [model], "norm": [norm], "batch_size": sizes, **fixed,
                          "seed": list(seeds)})
            small = [size for size in fixed_lr_sizes if applicable(model, norm, size)]
            if norm in FIXED_LR_NORMS and small:
                parts.append({"model": [model], "norm": [norm], "batch_size": small,
                              "lr_scaling": ["fixed"], **fixed, "seed": list(seeds)})
    return parts


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def _pivot(frame, model: str, value: str, scale: float, digits: int, with_paper: bool):
    import pandas as pd

    part = frame[frame["model"] == model]
    if part.empty:
        return None
    part = part.assign(**{value: part[value] * scale})
    table = aggregate(part, rows="norm", cols="batch_size", value=value, digits=digits)
    norms = [n for n in NORMS[model] if n in set(part["norm"])]
    sizes = sorted(set(part["batch_size"]))
    table = table.reindex(index=norms, columns=sizes)
    for norm in norms:
        for size in sizes:
            if not applicable(model, norm, size):
                table.loc[norm, size] = "n/a"
    table = table.fillna("—")
    if with_paper:
        paper = pd.DataFrame([{size: (f"{row[size]:.1f}" if size in row else "")
                               for size in sizes} for row in PAPER.values()],
                             index=list(PAPER), columns=sizes)
        table = pd.concat([table, paper])
    table.index.name = "norm"
    table.columns = pd.Index([str(size) for size in sizes], name="batch_size")
    return table


def linear(frame):
    """The runs of the main grid (learning rate linear in the batch size)."""
    return frame[frame["lr_scaling"] == "linear"] if "lr_scaling" in frame else frame


def fixed_lr_table(frame, model: str):
    """Test error (%) at the batch sizes of the fixed-rate arm: rows (norm, learning-rate
    rule), both rules side by side; None without fixed-rate runs."""
    import pandas as pd

    part = frame[frame["model"] == model]
    fixed = part[part["lr_scaling"] == "fixed"] if "lr_scaling" in part else part.iloc[:0]
    if fixed.empty:
        return None
    sizes = sorted(set(fixed["batch_size"]))
    rows = part[part["batch_size"].isin(sizes) & part["norm"].isin(set(fixed["norm"]))]
    rows = rows.assign(test_error=rows["test_error"] * 100)
    table = aggregate(rows, rows=["norm", "lr_scaling"], cols="batch_size", value="test_error",
                      digits=3)
    table.columns = pd.Index([str(size) for size in table.columns], name="batch_size")
    return table


def tables(frame):
    """Per model: test error (%), test error with batch statistics (%), stat_error (the main
    grid), and the fixed-learning-rate arm against the linear rule."""
    named = {}
    everything, frame = frame, linear(frame)
    for model in NORMS:
        title = f"{model} on {DATASET_NAME[model]}"
        sections = {
            f"{title}: test error (%), evaluation mode": ("test_error", 100, 3, True),
            f"{title}: test error (%) with batch statistics at the training batch size":
                ("test_error_batchstats", 100, 3, False),
            f"{title}: stat_error of the first norm layer's running statistics":
                ("stat_error", 1, 2, False),
        }
        for name, (value, scale, digits, with_paper) in sections.items():
            table = _pivot(frame, model, value, scale, digits, with_paper)
            if table is not None:
                if value == "stat_error":
                    keep = [n for n in table.index if n in ("batch", "renorm", "ghost")]
                    table = table.loc[keep]
                if len(table):
                    named[name] = table
        table = fixed_lr_table(everything, model)
        if table is not None:
            named[f"{title}: test error (%) with a fixed learning rate against the linear "
                  f"rule"] = table
    return named


# ---------------------------------------------------------------------------------------------
# Findings, written from the numbers
# ---------------------------------------------------------------------------------------------

def cell_stats(frame, model: str, value: str = "test_error", scale: float = 100.0):
    """{norm: {batch_size: (mean, std, ok runs, diverged runs)}} of ``value * scale`` over the
    ok runs (errors in %)."""
    stats = {}
    part = frame[frame["model"] == model]
    for (norm, size), group in part.groupby(["norm", "batch_size"], sort=False):
        ok = group[group["status"] == "ok"][value].dropna() * scale
        diverged = int((group["status"] == "diverged").sum())
        mean = float(ok.mean()) if len(ok) else math.nan
        std = float(ok.std()) if len(ok) > 1 else math.nan
        stats.setdefault(norm, {})[int(size)] = (mean, std, len(ok), diverged)
    return stats


def _significantly_worse(cell, reference, min_gap: float = MARGIN_POINTS) -> bool:
    """cell's mean error above reference's by more than ``min_gap`` points and more than two
    standard errors of the difference."""
    (mean, std, n, _), (ref_mean, ref_std, ref_n, _) = cell, reference
    if math.isnan(mean) or math.isnan(ref_mean):
        return False
    se = math.sqrt((0 if math.isnan(std) else std ** 2 / n)
                   + (0 if math.isnan(ref_std) else ref_std ** 2 / ref_n))
    return mean - ref_mean > max(min_gap, 2 * se)


def degradation(cells: dict[int, tuple], reference: int = REFERENCE_BATCH) -> int | None:
    """The largest batch size below ``reference`` from which on (it and every smaller batch
    size measured) the error is significantly above the error at ``reference``; None if not."""
    if reference not in cells:
        return None
    smaller = sorted((s for s in cells if s < reference and not math.isnan(cells[s][0])),
                     reverse=True)
    onset = None
    for size in reversed(smaller):          # from the smallest batch up
        if _significantly_worse(cells[size], cells[reference]):
            onset = size
        else:
            break
    return onset


def _fmt(mean: float) -> str:
    return f"{mean:.1f}%"


def findings(frame) -> list[str]:
    """Markdown bullet lines: which norms degrade, from which batch size, by how much, whether
    renorm/ghost recover it, how the statistics and the paper's numbers compare (main grid)."""
    lines = []
    frame = linear(frame)
    for model in NORMS:
        stats = cell_stats(frame, model)
        if not stats:
            continue
        lines += ["", f"### {model} on {DATASET_NAME[model]}", ""]
        ref = REFERENCE_BATCH
        degrading, flat = [], []
        for norm in NORMS[model]:
            cells = stats.get(norm)
            if not cells or ref not in cells:
                continue
            smallest = min(cells)
            onset = degradation(cells)
            at_ref, at_small = cells[ref][0], cells[smallest][0]
            if onset is not None:
                degrading.append(norm)
                path = f"{_fmt(cells[onset][0])} at {onset}, " if onset != smallest else ""
                lines.append(
                    f"- **{norm}** degrades from batch size {onset}: {_fmt(at_ref)} at {ref}, "
                    f"{path}{_fmt(at_small)} at {smallest} ({at_small - at_ref:+.1f} points).")
            else:
                means = [c[0] for s, c in cells.items() if s <= ref and not math.isnan(c[0])]
                flat.append(norm)
                lines.append(
                    f"- **{norm}** does not degrade below {ref}: {_fmt(at_ref)} at {ref}, "
                    f"{_fmt(at_small)} at {smallest}; range {_fmt(min(means))} to "
                    f"{_fmt(max(means))} over batch sizes up to {ref}.")
            diverged = sum(c[3] for c in cells.values())
            if diverged:
                where = sorted(s for s, c in cells.items() if c[3])
                lines[-1] += f" {diverged} run(s) diverged (batch sizes {where}), left out."
        lines += _recovery(stats, model)
        lines += _competitor_lines(stats, model)
        lines += _statistics_lines(frame, model, stats)
        lines += _large_batch_lines(stats)
        lines += _paper_lines(stats)
    return lines


def _recovery(stats, model) -> list[str]:
    lines = []
    batch = stats.get("batch", {})
    for other, label in (("renorm", "Batch renorm"), ("ghost", "Ghost batch norm")):
        cells = stats.get(other, {})
        shared = sorted(s for s in cells if s in batch and s < REFERENCE_BATCH
                        and not math.isnan(cells[s][0]) and not math.isnan(batch[s][0]))
        if not shared:
            continue
        parts = [f"{cells[s][0]:.1f}% vs {batch[s][0]:.1f}% at {s}" for s in shared]
        better = [s for s in shared if _significantly_worse(batch[s], cells[s])]
        worse = [s for s in shared if _significantly_worse(cells[s], batch[s])]
        if better and worse:
            verdict = f"is better at batch sizes {better} and worse at {worse}"
        elif better:
            verdict = f"recovers part of it (better at batch sizes {better})"
        elif worse:
            verdict = f"is worse at batch sizes {worse}"
        else:
            verdict = "does not change it (no significant difference)"
        lines.append(f"- {label} against batch norm below {REFERENCE_BATCH}: "
                     f"{'; '.join(parts)}; it {verdict}.")
    return lines


def _competitor_lines(stats, model) -> list[str]:
    """Each competitor at the reference batch size against group norm and batch norm there,
    and its smallest batch size against group norm's (significance as in :func:`degradation`)."""
    lines = []
    ref = REFERENCE_BATCH
    group, batch = stats.get("group", {}), stats.get("batch", {})

    def against(cell, other, name):
        if other is None or math.isnan(other[0]):
            return None
        if _significantly_worse(cell, other):
            word = "worse than"
        elif _significantly_worse(other, cell):
            word = "better than"
        else:
            word = "level with"
        return f"{word} {name} ({_fmt(other[0])})"

    for norm in COMPETITORS[model]:
        cells = stats.get(norm, {})
        if ref not in cells or math.isnan(cells[ref][0]):
            continue
        parts = [p for p in (against(cells[ref], group.get(ref), "group"),
                             against(cells[ref], batch.get(ref), "batch")) if p]
        text = f"- **{norm}** at batch {ref}: {_fmt(cells[ref][0])}" + (
            f", {' and '.join(parts)}" if parts else "")
        smallest = min(cells)
        if smallest < ref and not math.isnan(cells[smallest][0]):
            compared = against(cells[smallest], group.get(smallest), "group")
            text += f"; at batch {smallest}: {_fmt(cells[smallest][0])}" + (
                f", {compared}" if compared else "")
        lines.append(text + ".")
    return lines


def _statistics_lines(frame, model, stats) -> list[str]:
    lines = []
    batch_stats = cell_stats(frame, model, "test_error_batchstats").get("batch", {})
    stat_error = cell_stats(frame, model, "stat_error", scale=1.0).get("batch", {})
    eval_cells = stats.get("batch", {})
    if not batch_stats or not eval_cells:
        return lines
    sizes = sorted(s for s in eval_cells if s in batch_stats and not math.isnan(eval_cells[s][0]))
    if not sizes:
        return lines
    pairs = [f"{eval_cells[s][0]:.1f}% / {batch_stats[s][0]:.1f}% at {s}" for s in sizes]
    lines.append("- Batch norm, test error with running statistics / with the test batch's own "
                 f"statistics: {'; '.join(pairs)}.")
    instance = stats.get("instance", {})
    if 1 in batch_stats and 1 in instance and 1 in eval_cells:
        lines.append("- At batch 1 the CNN's batch norm normalizes each signal over its own "
                     "positions, as instance norm does: with the test signal's own statistics "
                     f"it scores {_fmt(batch_stats[1][0])} (instance norm: "
                     f"{_fmt(instance[1][0])}), with the running statistics "
                     f"{_fmt(eval_cells[1][0])}.")
    if stat_error:
        values = [f"{stat_error[s][0]:.2f} at {s}" for s in sizes if s in stat_error
                  and not math.isnan(stat_error[s][0])]
        lines.append("- stat_error of batch norm's running statistics (0 = the population "
                     f"statistics): {', '.join(values)}.")
    return lines


def _large_batch_lines(stats) -> list[str]:
    ref, worse = REFERENCE_BATCH, []
    for norm, cells in stats.items():
        larger = [s for s in cells if s > ref and ref in cells
                  and _significantly_worse(cells[s], cells[ref])]
        if larger:
            size = max(larger, key=lambda s: cells[s][0])
            worse.append(f"{norm} {_fmt(cells[size][0])} at {size} vs {_fmt(cells[ref][0])}")
    if not worse:
        return []
    return [f"- Worse at the large-batch end than at {ref} (the same epochs are fewer steps): "
            f"{'; '.join(worse)}."]


def _paper_lines(stats) -> list[str]:
    bn_paper, gn_paper = PAPER.values()
    lines = [f"- Paper (Wu & He, 2018, ResNet-50/ImageNet): BN {bn_paper[32]}% at 32 -> "
             f"{bn_paper[2]}% at 2; GN {gn_paper[32]}% -> {gn_paper[2]}% (flat)."]
    for norm in ("batch", "group"):
        cells = stats.get(norm, {})
        if 2 in cells and 32 in cells and not math.isnan(cells[2][0]) and cells[32][0] > 0:
            lines[-1] += (f" Here {norm}: {cells[32][0]:.1f}% -> {cells[2][0]:.1f}% "
                          f"({cells[2][0] - cells[32][0]:+.1f} points, "
                          f"x{cells[2][0] / cells[32][0]:.2f}).")
    return lines


# ---------------------------------------------------------------------------------------------
# Verdicts (studies/_verdicts.py rules)
# ---------------------------------------------------------------------------------------------

def _cell(model: str, norm: str, batch_size: int, lr_scaling: str = "linear"):
    name = f"{norm} at {batch_size}" + (", fixed lr" if lr_scaling == "fixed" else "")
    return arm(name, model=model, norm=norm, batch_size=batch_size, lr_scaling=lr_scaling)


def rules(model: str) -> dict[str, object]:
    """The verdict rules for one model, on ``test_error`` (a fraction; margin MARGIN_POINTS).

    - degrades: batch norm's error at SMALL_BATCH higher than at REFERENCE_BATCH (Wu & He).
    - flat: group norm's error the same at SMALL_BATCH and REFERENCE_BATCH (Wu & He).
    - rate: with the fixed rate, the norms without batch statistics (group, layer) do better at
      SMALL_BATCH than with the linear rule: the linear rule's small rate explains part of the
      rise.
    - statistics: with the fixed rate at SMALL_BATCH, batch norm worse than group norm: the
      batch statistics explain the rest.
    """
    margin, small, ref = MARGIN_POINTS / 100, SMALL_BATCH, REFERENCE_BATCH
    return {
        "degrades": Difference(
            f"{model}: batch norm's test error higher at batch {small} than at {ref} "
            "(Wu & He, 2018)", "test_error", _cell(model, "batch", small),
            _cell(model, "batch", ref), "higher", margin),
        "flat": Difference(
            f"{model}: group norm's test error the same at batch {small} and {ref} "
            "(Wu & He, 2018)", "test_error", _cell(model, "group", small),
            _cell(model, "group", ref), "same", margin),
        "rate": Combined(
            f"{model}: the linearly scaled learning rate explains a rise at batch {small} "
            "(group and layer norm do better there with the fixed rate)",
            [Difference(f"{norm}", "test_error", _cell(model, norm, small, "fixed"),
                        _cell(model, norm, small), "lower", margin)
             for norm in ("group", "layer")], "each"),
        "statistics": Difference(
            f"{model}: the batch statistics explain a rise at batch {small} (with the fixed "
            "rate, batch norm worse than group norm)", "test_error",
            _cell(model, "batch", small, "fixed"), _cell(model, "group", small, "fixed"),
            "higher", margin),
    }


def judge(frame) -> list[tuple[str, object]]:
    """(claim, Outcome) of every rule, for the models with runs."""
    judged = []
    for model in NORMS:
        if (frame["model"] == model).any():
            judged += [(rule.claim, rule.judge(frame)) for rule in rules(model).values()]
    return judged


def explanation(rate, statistics) -> str:
    """Which explanation of a small-batch rise the two outcomes support."""
    if UNDETERMINED in (rate.verdict, statistics.verdict):
        return (f"undetermined (n={min(rate.n_min, statistics.n_min)}): too few seeds to tell "
                "the learning rate from the batch statistics")
    rate_helps = rate.verdict in (HOLDS, MIXED)
    if rate_helps and statistics.verdict == HOLDS:
        return "both: the smaller rate and the batch statistics each account for part of it"
    if rate.verdict == MIXED:
        return ("partly the learning rate: the fixed rate helps some of the norms without batch "
                "statistics, and with it batch norm is not worse than group norm")
    if rate.verdict == HOLDS:
        return "the learning rate: with the fixed rate, batch norm is not worse than group norm"
    if statistics.verdict == HOLDS:
        return ("the batch statistics: the fixed rate does not help the norms without batch "
                "statistics, and batch norm stays worse than group norm")
    return ("neither: with the fixed rate the norms without batch statistics do no better at "
            "the small batch, and batch norm is not worse than group norm there")


def verdict_lines(frame) -> list[str]:
    lines = ["| claim | verdict | n_min | numbers (test error as a fraction) |",
             "|---|---|---:|---|"]
    for claim, outcome in judge(frame):
        lines.append(f"| {claim} | **{outcome.label}** | {outcome.n_min} | "
                     f"{outcome.numbers_text()} |")
    for model in NORMS:
        if (frame["model"] == model).any():
            model_rules = rules(model)
            lines.append(f"\n- {model}: which explanation the numbers support: "
                         + explanation(model_rules["rate"].judge(frame),
                                       model_rules["statistics"].judge(frame)) + ".")
    return lines


def reports(frame) -> dict[str, str]:
    return {"README.md": readme(frame), "headline.md": headline(frame),
            "verdicts.csv": verdicts_csv("small_batch", judge(frame))}


FIGURE_CAPTION = ("Test error against batch size (evaluation mode, learning rate linear in the "
                  "batch size). Points: mean over seeds; error bars: ± 1 standard deviation over "
                  "the seeds (n per cell as in the tables). Top: the norms of Wu & He's "
                  "comparison, with their BN and GN (ResNet-50 on ImageNet) in grey on the "
                  "right-hand axis, another model and data set: compare shapes, not levels. "
                  "Bottom: the batch-independent competitors, batch and group norm dashed.")


def headline(frame) -> str:
    """The README's headline for this study: the first model's test error table."""
    for name, table in tables(frame).items():
        if "evaluation mode" in name:
            seeds = linear(frame).groupby(["model", "norm", "batch_size"])["seed"].nunique()
            count = (f"{seeds.min()}" if seeds.min() == seeds.max()
                     else f"{seeds.min()} to {seeds.max()}")
            return (f"{name}, mean ± std over {count} seeds per cell (n/a: not trainable or "
                    "not run there). The two paper rows are ResNet-50 on ImageNet (Wu & He, "
                    "2018): compare the shape, not the level.\n\n"
                    + markdown_table(table) + "\n")
    return "(no runs yet)\n"


def _base_lrs(frame) -> str:
    return ", ".join(f"{lr:g}" for lr in sorted(set(frame["base_lr"])))


def readme(frame) -> str:
    """results/small_batch/README.md: the question, the setup, the tables, the verdicts and the
    findings; every number is computed from ``frame`` or is a constant of this script."""
    main = linear(frame)
    seeds = sorted(set(frame["seed"]))
    epochs = {m: sorted(set(frame.loc[frame["model"] == m, "epochs"])) for m in NORMS}
    counts = frame["status"].value_counts()
    smallest = [s for s in sorted(set(main["batch_size"])) if s < REFERENCE_BATCH][:2]
    fractions = ", ".join(f"1/{REFERENCE_BATCH // s}" for s in smallest)
    lines = [
        "# Small-batch study: test error against batch size",
        "",
        "Generated by `normkit table small_batch` from runs.csv (do not edit). Question (Wu & He,"
        " 2018, Group Normalization): how does test error depend on the batch size for each "
        "normalizer? The setup is in the docstring of studies/small_batch.py.",
        "",
        f"{len(frame)} runs: {counts.get('ok', 0)} ok, {counts.get('diverged', 0)} diverged, "
        f"{counts.get('failed', 0)} failed; seeds {seeds}; epochs "
        + ", ".join(f"{m} {e}" for m, e in epochs.items() if e)
        + f"; SGD, learning rate linear in the batch size from {_base_lrs(main)} at "
        f"{REFERENCE_BATCH} (a fixed-rate arm beside it at the smallest batches). "
        "Mean ± std over seeds of the ok runs, in %; n/a: the norm cannot train at that batch "
        "size or is not run there (ghost below 8).",
    ]
    for name, table in tables(frame).items():
        if "evaluation mode" in name or "fixed learning rate" in name:
            lines += ["", f"## {name}", "", markdown_table(table)]
    lines += ["", "![test error against batch size](error_vs_batch.png)", "",
              f"*{FIGURE_CAPTION}*"]
    lines += ["", "## Verdicts", "",
              f"Each rule compares the mean test error over seeds of two cells; an effect counts "
              f"beyond {MARGIN_POINTS:g} point and two standard errors of the difference (Welch); "
              f"\"same\" means the difference and two standard errors stay within "
              f"{MARGIN_POINTS:g} point, and is refuted only when the difference exceeds "
              f"{MARGIN_POINTS:g} point by two standard errors (in between: undetermined, too "
              "noisy for the margin). Fewer than 3 seeds in a cell: undetermined. "
              "verdicts.csv has the same rows.", ""]
    lines += verdict_lines(frame)
    lines += ["", "## Findings (computed from the numbers above)",
              "", "A norm \"degrades from b\" when its error at b and at every smaller batch "
              f"size exceeds its own error at {REFERENCE_BATCH} by more than "
              f"{MARGIN_POINTS:g} point and two standard errors."]
    lines += findings(frame)
    lines += ["", "How to read the batch-statistics error: it normalizes each test batch of the "
              "training batch size with its own statistics, as in training. For batch renorm it "
              "equals the evaluation-mode error wherever r and d are not clipped (then "
              "(x - mu_B) / sigma_B * r + d is (x - mu) / sigma); ghost batch norm uses virtual "
              f"batches of {GHOST_VIRTUAL_BATCH} there as in training."]
    lines += ["", "## Where the toy scale differs from the paper", "",
              "- The paper's numbers are ResNet-50 on ImageNet: compare the shape of the curves, "
              "not the level.",
              "- These nets are small and trained for few epochs; with the learning rate "
              f"scaled linearly, the smallest batches ({', '.join(map(str, smallest))}) train "
              f"with {fractions} of the base rate (the fixed-rate arm and its rules above test "
              "what that explains), and the large batches take few steps.",
              "- The CNN's batch norm at batch 1 takes its statistics over the positions of one "
              "signal; the paper never goes below 2.",
              "- Instance norm in this CNN stays near chance for the first epochs and needs "
              "most of the budget to learn, so it is the norm most sensitive to the number of "
              "epochs."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------

#: The figure's two rows: the norms of Wu & He's comparison, and the competitors (with batch and
#: group norm again as the references).
FIGURE_ROWS = ("the norms of Wu & He's comparison", "the batch-independent competitors")


#: One color per norm in every panel (batch and group, the references, in both rows).
NORM_COLORS = {"none": "black", "batch": "tab:blue", "group": "tab:orange", "renorm": "tab:cyan",
               "ghost": "tab:purple", "layer": "tab:green", "rms": "tab:olive",
               "instance": "tab:brown", "frn": "tab:red", "evonorm_s0": "tab:pink",
               "evonorm_b0": "tab:gray", "gn+ws": "goldenrod", "switchable": "teal",
               "dyt": "navy"}


def _figure_norms(model: str, row: int) -> list[str]:
    if row == 0:
        return [n for n in NORMS[model] if n not in COMPETITORS[model]]
    return ["batch", "group", *COMPETITORS[model]]


def figures(frame):
    """Test error against batch size (log 2 axis), mean ± std over seeds as error bars; per
    model a column, the classic norms on top and the competitors below; Wu & He's BN and GN
    on a right-hand axis of their own (another model and data set: compare shapes)."""
    from matplotlib.figure import Figure

    frame = linear(frame)
    models = [m for m in NORMS if (frame["model"] == m).any()]
    figure = Figure(figsize=(5.5 * len(models), 8.4))
    for i, model in enumerate(models):
        stats = cell_stats(frame, model)
        sizes = sorted(set(frame.loc[frame["model"] == model, "batch_size"]))
        for row in range(2):
            axes = figure.add_subplot(2, len(models), row * len(models) + i + 1)
            for norm in _figure_norms(model, row):
                cells = stats.get(norm)
                if not cells:
                    continue
                shown = sorted(s for s in cells if not math.isnan(cells[s][0]))
                axes.errorbar(shown, [cells[s][0] for s in shown],
                              yerr=[0 if math.isnan(cells[s][1]) else cells[s][1]
                                    for s in shown],
                              marker="o", markersize=3, capsize=2, label=norm,
                              color=NORM_COLORS.get(norm),
                              linestyle="--" if row == 1 and norm in ("batch", "group") else "-")
            axes.set_xscale("log", base=2)
            axes.set_xticks(sizes, [str(s) for s in sizes])
            axes.set_xlabel("batch size")
            axes.set_ylabel("test error (%)")
            axes.set_title(f"{model} on {DATASET_NAME[model]}: {FIGURE_ROWS[row]}", fontsize=9)
            if row == 0:
                paper = axes.twinx()
                for (name, values), marker in zip(PAPER.items(), ("s", "D")):
                    shown = sorted(values)
                    paper.plot(shown, [values[s] for s in shown], color="0.45", linestyle=":",
                               marker=marker, markersize=4, markerfacecolor="none",
                               label=name.split(" (")[0] + ", Wu & He 2018 (right axis)")
                paper.set_ylabel("Wu & He, ResNet-50 on ImageNet:\nvalidation error (%)",
                                 fontsize=8, color="0.45")
                paper.tick_params(axis="y", colors="0.45", labelsize=8)
                handles, labels = axes.get_legend_handles_labels()
                more, more_labels = paper.get_legend_handles_labels()
                axes.legend(handles + more, labels + more_labels)
            else:
                axes.legend()
    legends_outside(figure)
    figure.tight_layout()
    return {"error_vs_batch": figure}


STUDY = Study(
    name="small_batch",
    config=Config,
    metrics=METRICS,
    grid_quick=grid(QUICK_BATCH_SIZES, range(2), QUICK_EPOCHS, cnn_samples=2000,
                    fixed_lr_sizes=QUICK_FIXED_LR_BATCH_SIZES,
                    competitor_sizes=QUICK_COMPETITOR_BATCH_SIZES),
    grid_full=grid(BATCH_SIZES, range(5), EPOCHS, fixed_lr_sizes=FIXED_LR_BATCH_SIZES),
    run=run,
    tables=tables,
    figures=figures,
    reports=reports,
)
