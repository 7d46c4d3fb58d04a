"""The small-batch study: its grids, a smoke run of a tiny grid through the sweep runner that
checks what it writes (runs.csv schema, table.md, figure, README.md), and the findings logic on
made-up numbers."""
from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normkit import sweep

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

REPO = Path(__file__).parent.parent
STUDY = sweep.load_study(REPO / "studies" / "small_batch.py")
study_module = __import__("sys").modules[STUDY.run.__module__]

REQUIRED_COLUMNS = ["model", "norm", "batch_size", "seed", "lr", "epochs", "test_error",
                    "test_error_batchstats", "train_error", "stat_error", "status", "seconds"]


def test_grids_leave_out_what_cannot_train_and_ghost_below_eight():
    for quick in (True, False):
        cells = {(c.model, c.norm, c.batch_size) for c in STUDY.configs(quick)}
        assert ("mlp", "batch", 1) not in cells and ("mlp", "renorm", 1) not in cells
        assert ("mlp", "group", 1) in cells and ("cnn1d", "batch", 1) in cells
        assert not any(n == "ghost" and b < 8 for _, n, b in cells)
        assert not any(m == "mlp" and n == "instance" for m, n, _ in cells)
    full = STUDY.configs(quick=False)
    assert {c.batch_size for c in full} == {1, 2, 4, 8, 16, 32, 64, 128}
    assert {c.seed for c in full} == set(range(5))
    assert {c.seed for c in STUDY.configs(quick=True)} == {0, 1}
    for model in ("cnn1d", "mlp"):        # the same epochs at every batch size
        assert len({c.epochs for c in full if c.model == model}) == 1


def test_learning_rate_is_linear_in_the_batch_size_or_fixed():
    Config = STUDY.config
    assert study_module.learning_rate(Config(batch_size=8, base_lr=0.1)) == pytest.approx(0.025)
    assert study_module.learning_rate(Config(batch_size=8, base_lr=0.1,
                                             lr_scaling="fixed")) == 0.1
    with pytest.raises(ValueError, match="lr_scaling"):
        Config(lr_scaling="sqrt")


TINY_GRID = [
    {"model": ["mlp"], "norm": ["batch", "group"], "batch_size": [16, 64], "epochs": [1],
     "seed": [0, 1]},
    {"model": ["mlp"], "norm": ["group"], "batch_size": [1], "epochs": [1], "seed": [0]},
    {"model": ["mlp"], "norm": ["group"], "batch_size": [16], "lr_scaling": ["fixed"],
     "epochs": [1], "seed": [0]},
    {"model": ["cnn1d"], "norm": ["batch", "layer"], "batch_size": [8], "epochs": [1],
     "mnist1d_samples": [200], "seed": [0]},
]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    study = dataclasses.replace(STUDY, grid_quick=TINY_GRID)
    directory = tmp_path_factory.mktemp("small_batch") / "quick"
    with cf.ThreadPoolExecutor(1) as executor:
        report = sweep.run_sweep(study, directory, executor, quick=True, progress=False)
    written = sweep.summarize(study, directory, quick=True)
    return study, directory, report, written


def test_tiny_sweep_writes_the_promised_runs_csv(tiny_sweep):
    study, directory, report, _ = tiny_sweep
    assert (report.total, report.ok, report.failed) == (12, 12, 0)
    rows = list(csv.DictReader(io.StringIO((directory / "runs.csv").read_text())))
    assert set(REQUIRED_COLUMNS) <= set(rows[0])
    for row in rows:
        assert row["status"] == "ok"
        expected_lr = 0.05 * (int(row["batch_size"]) / 32 if row["lr_scaling"] == "linear"
                              else 1)
        assert float(row["lr"]) == pytest.approx(expected_lr)
        for name in ("test_error", "test_error_batchstats", "train_error"):
            assert 0 <= float(row[name]) <= 1
        if row["norm"] == "batch":
            assert float(row["stat_error"]) > 0
        else:
            assert row["stat_error"] == ""        # no running statistics: left empty
            assert row["test_error_batchstats"] == row["test_error"]
        assert float(row["seconds"]) > 0


def test_tiny_sweep_tables_figure_and_readme(tiny_sweep):
    pytest.importorskip("matplotlib")
    _, directory, _, written = tiny_sweep
    names = {p.name for p in written}
    assert {"table.md", "error_vs_batch.png"} <= names
    assert (directory / "error_vs_batch.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (directory / "table.md").read_text()
    assert "## mlp on digits: test error (%), evaluation mode" in markdown
    assert "## cnn1d on MNIST-1D: test error (%), evaluation mode" in markdown
    assert "| norm | 1 | 16 | 64 |" in markdown
    batch_row = next(line for line in markdown.splitlines() if line.startswith("| batch | n/a"))
    assert batch_row.count("±") == 2                       # two seeds at 16 and 64
    assert "| BN (Wu & He, ResNet-50/ImageNet) |  | 23.7 |  |" in markdown
    readme = (directory / "README.md").read_text()
    assert readme.startswith("# Small-batch study")
    assert "### mlp on digits" in readme and "### cnn1d on MNIST-1D" in readme
    assert "## Verdicts" in readme and "**undetermined (n=" in readme


def test_tiny_sweep_writes_verdicts_csv(tiny_sweep):
    _, directory, _, written = tiny_sweep
    assert directory / "verdicts.csv" in written
    verdicts = pd.read_csv(directory / "verdicts.csv")
    assert list(verdicts.columns) == ["study", "claim", "verdict", "n_min", "numbers"]
    assert set(verdicts["study"]) == {"small_batch"} and len(verdicts) == 8   # 4 rules x 2 models
    assert set(verdicts["verdict"]) == {"undetermined"}                        # 1 or 2 seeds
    assert (verdicts["n_min"] < 3).all()


def test_tables_show_the_numbers_of_the_runs(tiny_sweep):
    study, directory, _, _ = tiny_sweep
    frame, _ = sweep.read_runs(study, directory, quick=True)
    table = study.tables(frame)["mlp on digits: test error (%), evaluation mode"]
    runs = frame[(frame.model == "mlp") & (frame.norm == "group") & (frame.batch_size == 16)
                 & (frame.lr_scaling == "linear")]
    values = runs.test_error * 100
    assert table.loc["group", "16"] == f"{values.mean():.3g} ± {values.std():.2g}"
    assert table.loc["batch", "1"] == "n/a"
    fixed = study.tables(frame)["mlp on digits: test error (%) with a fixed learning rate "
                                "against the linear rule"]
    assert set(fixed.index) == {("group", "fixed"), ("group", "linear")}


# ---------------------------------------------------------------------------------------------
# Findings from made-up numbers
# ---------------------------------------------------------------------------------------------

def made_up_frame(errors: dict[str, dict[int, float]], model="mlp", seeds=3, spread=0.001,
                  diverged=()):
    rows = []
    for norm, by_size in errors.items():
        for size, error in by_size.items():
            for seed in range(seeds):
                status = "diverged" if (norm, size, seed) in diverged else "ok"
                rows.append({"model": model, "norm": norm, "batch_size": size, "epochs": 20,
                             "seed": seed, "status": status,
                             "test_error": error + spread * (seed - 1),
                             "test_error_batchstats": error + 0.01,
                             "stat_error": 0.1 * 32 / size if norm == "batch" else np.nan})
    return pd.DataFrame(rows)


BN = {2: 0.30, 4: 0.10, 8: 0.05, 16: 0.032, 32: 0.03, 64: 0.03}
GN = {2: 0.031, 4: 0.03, 8: 0.029, 16: 0.03, 32: 0.03, 64: 0.031}


def test_degradation_onset_is_the_largest_batch_from_which_on_it_is_worse():
    stats = study_module.cell_stats(made_up_frame({"batch": BN, "group": GN}), "mlp")
    assert study_module.degradation(stats["batch"]) == 8
    assert study_module.degradation(stats["group"]) is None
    # worse at 2 and 8 but not at 4: the onset is 4's neighbour below, 2
    bumpy = study_module.cell_stats(made_up_frame({"batch": {**BN, 4: 0.03}}), "mlp")
    assert study_module.degradation(bumpy["batch"]) == 2


def test_noise_within_two_standard_errors_is_not_degradation():
    noisy = made_up_frame({"batch": {2: 0.05, 32: 0.03}}, spread=0.03)
    stats = study_module.cell_stats(noisy, "mlp")
    assert study_module.degradation(stats["batch"]) is None


def test_findings_name_the_onset_the_size_of_the_effect_and_recovery():
    renorm = {2: 0.12, 4: 0.05, 8: 0.05, 16: 0.032, 32: 0.03, 64: 0.03}
    frame = made_up_frame({"batch": BN, "renorm": renorm, "group": GN},
                          diverged={("batch", 2, 1)})
    text = "\n".join(study_module.findings(frame))
    assert ("**batch** degrades from batch size 8: 3.0% at 32, 5.0% at 8, 30.0% at 2 "
            "(+27.0 points).") in text
    assert "1 run(s) diverged (batch sizes [2]), left out." in text
    assert "**group** does not degrade below 32" in text
    assert "Batch renorm against batch norm below 32" in text
    assert "it recovers part of it (better at batch sizes [2, 4])" in text
    assert "Here batch: 3.0% -> 30.0% (+27.0 points, x10.00)" in text
    assert "stat_error of batch norm's running statistics" in text


def test_findings_say_when_renorm_is_better_somewhere_and_worse_elsewhere():
    renorm = {2: 0.12, 4: 0.15, 8: 0.05, 16: 0.032, 32: 0.03, 64: 0.03}
    text = "\n".join(study_module.findings(made_up_frame({"batch": BN, "renorm": renorm})))
    assert "it is better at batch sizes [2] and worse at [4]" in text


# ---------------------------------------------------------------------------------------------
# Verdicts from made-up numbers: which explanation of the small-batch rise
# ---------------------------------------------------------------------------------------------

def explanation_frame(fixed_group: float, fixed_batch: float, seeds: int = 5):
    """The MLP at batch 2 and 32: linear-rate errors BN 30% / 3%, GN 10% / 3%; the fixed-rate
    arm at batch 2 with the given errors for group/layer and batch norm."""
    linear = {"batch": {2: 0.30, 32: 0.03}, "group": {2: 0.10, 32: 0.03},
              "layer": {2: 0.10, 32: 0.03}}
    frame = made_up_frame(linear, seeds=seeds).assign(lr_scaling="linear")
    fixed = made_up_frame({"batch": {2: fixed_batch}, "group": {2: fixed_group},
                           "layer": {2: fixed_group}}, seeds=seeds).assign(lr_scaling="fixed")
    return pd.concat([frame, fixed], ignore_index=True)


@pytest.mark.parametrize("fixed_group, fixed_batch, expected", [
    (0.03, 0.031, "the learning rate"),        # the fixed rate cures every norm
    (0.10, 0.30, "the batch statistics"),      # the fixed rate changes nothing, BN stays worse
    (0.03, 0.20, "both"),
    (0.10, 0.10, "neither"),
])
def test_the_rules_say_which_explanation_the_numbers_support(fixed_group, fixed_batch, expected):
    frame = explanation_frame(fixed_group, fixed_batch)
    rules = study_module.rules("mlp")
    text = study_module.explanation(rules["rate"].judge(frame), rules["statistics"].judge(frame))
    assert text.startswith(expected)
    assert rules["degrades"].judge(frame).verdict == "holds"
    assert rules["flat"].judge(frame).verdict == "does not hold"       # GN 10% vs 3%


def test_a_fixed_rate_that_helps_one_norm_only_is_partly_the_learning_rate():
    frame = explanation_frame(0.10, 0.10)
    fixed_layer = (frame["lr_scaling"] == "fixed") & (frame["norm"] == "layer")
    frame.loc[fixed_layer, "test_error"] -= 0.07                 # layer norm 3%, group norm 10%
    rules = study_module.rules("mlp")
    assert rules["rate"].judge(frame).verdict == "mixed"
    text = study_module.explanation(rules["rate"].judge(frame), rules["statistics"].judge(frame))
    assert text.startswith("partly the learning rate")


def test_one_or_two_seeds_leave_the_explanation_undetermined():
    frame = explanation_frame(0.03, 0.031, seeds=2)
    rules = study_module.rules("mlp")
    assert study_module.explanation(rules["rate"].judge(frame),
                                    rules["statistics"].judge(frame)).startswith(
        "undetermined (n=2)")
    lines = study_module.verdict_lines(frame)
    assert sum("**undetermined (n=2)**" in line for line in lines) == 4
