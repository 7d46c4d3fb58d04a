"""The sweep runner: grids, outcomes, runs.csv (append, resume, torn lines, SIGKILL), executors,
tables. The toy study in tests/studies_fixture/toy.py is the study under test; its metrics are
recomputed here from the same seeded draws as the oracle."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import io
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import normkit
from normkit import sweep
from normkit.sweep import Diverged, Study, SweepError

FIXTURE = Path(__file__).parent / "studies_fixture"
REPO = Path(__file__).parent.parent
TOY = sweep.load_study(FIXTURE / "toy.py")
Config = TOY.config


def toy_variant(**changes) -> Study:
    """The toy study with other grids; workers still import toy.py, whose run is unchanged."""
    return dataclasses.replace(TOY, **changes)


def oracle(config) -> dict[str, float]:
    """The toy's ok metrics, recomputed here: the same seeded draws as tests/.../_toy_sample.py."""
    x = np.random.default_rng([config.seed, config.width]).normal(config.shift, 1.0,
                                                                  size=config.width)
    return {"loss": float(np.mean(x**2)), "score": float(np.max(x))}


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def parse(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def pool():
    """Two spawned local workers, shared by the tests that do not break their pool."""
    with sweep.open_executor(jobs=2) as executor:
        yield executor


# ------------------------------------------------------------------------------------------ grids

def test_grid_is_the_cartesian_product_in_field_order():
    assert sweep.expand_grid({"a": [1, 2], "b": ["x", "y"]}, ["a", "b", "seed"]) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


def test_grid_list_is_a_union_without_duplicates_and_defaults_fill_the_rest():
    study = toy_variant(grid_quick=[{"width": [4, 8], "seed": [0]}, {"width": [8], "seed": [0]}])
    assert study.configs(quick=True) == [Config(width=4), Config(width=8)]
    assert len(TOY.configs(quick=False)) == 4 * 5 + 2
    assert TOY.configs(quick=False)[-1] == Config(width=4, shift=1.0, seed=1)


@pytest.mark.parametrize("grid, error, words", [
    ({"mode": "normal"}, TypeError, "grid_quick['mode'] must be a list"),
    ({"nope": [1]}, ValueError, "unknown config fields ['nope']"),
    ({"width": []}, ValueError, "grid_quick['width'] is empty"),
    ([], TypeError, "non-empty list"),
    ({"width": ["x"]}, ValueError, "raised ValueError: width must be an int"),
])
def test_grid_mistakes_are_refused_with_the_field_named(grid, error, words):
    @dataclasses.dataclass(frozen=True)
    class Checked:
        width: int = 4
        mode: str = "normal"
        seed: int = 0

        def __post_init__(self):
            if not isinstance(self.width, int):
                raise ValueError("width must be an int")

    with pytest.raises(error, match=re.escape(words)):
        Study(name="t", config=Checked, metrics=("loss",), grid_quick=grid,
              grid_full={"seed": [0]}, run=oracle)


@pytest.mark.parametrize("changes, error, words", [
    ({"metrics": "loss"}, TypeError, "one string"),
    ({"metrics": ("loss", "width")}, ValueError, "offending: ['width']"),
    ({"metrics": ("loss", "status")}, ValueError, "offending: ['status']"),
    ({"metrics": ()}, ValueError, "at least one metric"),
    ({"name": "has space"}, ValueError, "Study name"),
    ({"config": dict}, TypeError, "dataclass"),
    ({"run": "not callable"}, TypeError, "run must be callable"),
])
def test_study_mistakes_are_refused(changes, error, words):
    with pytest.raises(error, match=re.escape(words)):
        toy_variant(**changes)


def test_config_without_seed_is_refused():
    @dataclasses.dataclass
    class NoSeed:
        width: int = 4

    with pytest.raises(ValueError, match="needs a `seed` field"):
        Study(name="t", config=NoSeed, metrics=("loss",), grid_quick={"width": [1]},
              grid_full={"width": [1]}, run=oracle)


def test_study_name_must_match_its_file(tmp_path):
    source = (FIXTURE / "toy.py").read_text()
    (tmp_path / "other.py").write_text(source)
    (tmp_path / "_toy_sample.py").write_text((FIXTURE / "_toy_sample.py").read_text())
    with pytest.raises(SweepError, match="STUDY.name is 'toy' but the file is other.py"):
        sweep.load_study(tmp_path / "other.py")


def test_find_studies_skips_helpers():
    assert list(sweep.find_studies(FIXTURE)) == ["toy"]
    assert sweep.find_studies(FIXTURE / "missing") == {}


# --------------------------------------------------------------------------------------- outcomes

@pytest.mark.parametrize("mode, status", [
    ("normal", "ok"), ("nan_loss", "diverged"), ("flag", "diverged"),
    ("raise_diverged", "diverged")])
def test_outcome_of_finished_runs(mode, status):
    config = Config(mode=mode, width=8, seed=3)
    got_status, metrics, error, trace = sweep._outcome(TOY, config)
    expected = oracle(config)
    if mode == "nan_loss":
        expected["loss"] = float("nan")
    assert (got_status, error, trace) == (status, "", "")
    np.testing.assert_equal(metrics, expected)   # exact: the same draws, and NaN == NaN here


def test_outcome_of_an_exception_is_failed_with_a_one_line_message():
    status, metrics, error, trace = sweep._outcome(TOY, Config(mode="fail", seed=2))
    assert (status, metrics) == ("failed", {})
    assert error == "ValueError: deliberate failure, | seed 2"
    assert "Traceback" in trace and "deliberate failure" in trace


@pytest.mark.parametrize("returned, words", [
    ({"loss": 1.0, "extra": 2.0}, "undeclared metrics ['extra']"),
    ([1.0], "run returned list, expected a dict"),
    ({"loss": "low"}, "metric 'loss' must be a real number"),
])
def test_outcome_of_bad_metrics_is_failed(returned, words):
    study = toy_variant(run=lambda config: returned)
    status, metrics, error, _ = sweep._outcome(study, Config())
    assert status == "failed" and words in error


def test_diverged_keeps_the_last_finite_metrics_it_carries():
    study = toy_variant(run=lambda config: (_ for _ in ()).throw(Diverged({"loss": 2.5})))
    assert sweep._outcome(study, Config())[:2] == ("diverged", {"loss": 2.5})


# ------------------------------------------------------------------------------------- the sweep

@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory, pool):
    """The toy's quick grid, run once: 4 ok, 4 diverged (NaN loss), 4 failed."""
    directory = tmp_path_factory.mktemp("quick") / "toy" / "quick"
    report = sweep.run_sweep(TOY, directory, pool, quick=True)
    return directory, report


def test_sweep_records_every_outcome_and_goes_on(quick_sweep):
    directory, report = quick_sweep
    assert (report.total, report.ran, report.ok, report.diverged) == (12, 12, 4, 4)
    assert report.failed == 4
    assert report.exit_code == 1
    rows = parse(directory / "runs.csv")
    assert list(rows[0]) == list(TOY.columns)
    assert sorted((r["mode"], r["width"], r["seed"]) for r in rows) == sorted(
        (c.mode, str(c.width), str(c.seed)) for c in TOY.configs(quick=True))
    for row in rows:
        config = Config(mode=row["mode"], width=int(row["width"]), seed=int(row["seed"]))
        expected = {"normal": "ok", "nan_loss": "diverged", "fail": "failed"}[config.mode]
        assert row["status"] == expected
        if expected == "failed":
            assert (row["loss"], row["score"]) == ("", "")
            assert row["error"] == f"ValueError: deliberate failure, | seed {config.seed}"
        else:
            assert float(row["score"]) == oracle(config)["score"]   # repr round-trips exactly
            assert row["error"] == ""
        assert row["normkit_version"] == normkit.__version__
        assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", row["git_rev"])
        assert dt.datetime.fromisoformat(row["started_at"]).tzinfo is not None
        assert 0 <= float(row["seconds"]) < 60
    assert "deliberate failure" in (directory / "errors.log").read_text()
    frame = pd.read_csv(directory / "runs.csv")      # one table for pandas, failed rows too
    assert frame.shape == (12, len(TOY.columns))


def test_rerun_skips_finished_and_failed_runs_and_leaves_the_file_alone(quick_sweep, pool):
    directory, _ = quick_sweep
    before = (directory / "runs.csv").read_bytes()
    report = sweep.run_sweep(TOY, directory, pool, quick=True)
    assert (report.skipped, report.ran, report.failed, report.exit_code) == (12, 0, 4, 1)
    assert (directory / "runs.csv").read_bytes() == before


def test_rerun_failed_retries_only_the_failed_runs(tmp_path, quick_sweep, pool):
    source, _ = quick_sweep
    directory = tmp_path / "toy"
    directory.mkdir()
    (directory / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    finished = [line for line in read_lines(directory / "runs.csv") if ",failed," not in line]
    report = sweep.run_sweep(TOY, directory, pool, quick=True, rerun_failed=True)
    assert (report.ran, report.failed) == (4, 4)      # they fail again: the toy always does
    lines = read_lines(directory / "runs.csv")
    assert lines[:len(finished)] == finished          # kept rows byte-identical, same order
    keys = [tuple(r[f] for f in TOY.field_names) for r in parse(directory / "runs.csv")]
    assert len(keys) == len(set(keys)) == 12


def test_a_changed_config_never_reuses_a_stale_row(tmp_path, quick_sweep, pool):
    source, _ = quick_sweep
    directory = tmp_path / "toy"
    directory.mkdir()
    (directory / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    shifted = toy_variant(grid_quick={"width": [4, 8], "seed": [0, 1], "shift": [0.5]})
    report = sweep.run_sweep(shifted, directory, pool, quick=True)
    assert (report.skipped, report.ran, report.ok) == (0, 4, 4)
    frame, left_out = sweep.read_runs(shifted, directory, quick=True)
    assert left_out == 12 and list(frame["shift"]) == [0.5] * 4
    assert list(frame["loss"]) == [oracle(c)["loss"] for c in shifted.configs(quick=True)]


def test_runs_csv_of_another_study_shape_is_refused_untouched(tmp_path, pool):
    (tmp_path / "runs.csv").write_text("mode,width,seed,loss\nnormal,4,0,1.0\n")
    with pytest.raises(SweepError, match="config fields or metrics changed. Move the old file"):
        sweep.run_sweep(TOY, tmp_path, pool, quick=True)
    assert (tmp_path / "runs.csv").read_text() == "mode,width,seed,loss\nnormal,4,0,1.0\n"


def test_a_torn_last_line_is_cut_and_its_run_redone(tmp_path, pool):
    study = toy_variant(grid_quick={"width": [4, 8], "seed": [0, 1, 2]})
    sweep.run_sweep(study, tmp_path, pool, quick=True)
    lines = read_lines(tmp_path / "runs.csv")
    intact = "".join(lines[:-1])
    (tmp_path / "runs.csv").write_text(intact + lines[-1][:25])   # a write cut short
    report = sweep.run_sweep(study, tmp_path, pool, quick=True)
    assert (report.skipped, report.ran) == (5, 1)
    text = (tmp_path / "runs.csv").read_text()
    assert text.startswith(intact) and text.endswith("\n")
    assert len(parse(tmp_path / "runs.csv")) == 6


def test_a_torn_header_is_rewritten(tmp_path, pool):
    (tmp_path / "runs.csv").write_text("mode,wid")
    study = toy_variant(grid_quick={"seed": [0]})
    assert sweep.run_sweep(study, tmp_path, pool, quick=True).ran == 1
    assert read_lines(tmp_path / "runs.csv")[0] == ",".join(TOY.columns) + "\n"


def test_second_sweep_on_the_same_folder_is_refused(tmp_path, pool):
    with sweep._exclusive(tmp_path):
        with pytest.raises(SweepError, match="another sweep is writing to"):
            sweep.run_sweep(TOY, tmp_path, pool, quick=True)
    assert not (tmp_path / "runs.csv").exists()


def test_unwritable_results_folder_is_refused(tmp_path, pool):
    (tmp_path / "file").write_text("")
    with pytest.raises(SweepError, match="cannot write to .*file/toy"):
        sweep.run_sweep(TOY, tmp_path / "file" / "toy", pool, quick=True)


def test_a_dead_worker_leaves_its_runs_for_the_next_sweep(tmp_path):
    crashing = toy_variant(grid_quick={"mode": ["normal", "crash"], "seed": [0, 1, 2]})
    with sweep.open_executor(jobs=1) as executor:
        report = sweep.run_sweep(crashing, tmp_path, executor, quick=True)
    assert (report.ok, report.failed, report.not_done, report.exit_code) == (3, 0, 3, 1)
    assert [r["mode"] for r in parse(tmp_path / "runs.csv")] == ["normal"] * 3


def test_pool_workers_run_numerics_single_threaded():
    before = os.environ.get("NUMBA_NUM_THREADS")
    with sweep.open_executor(jobs=1) as executor:
        assert executor.submit(os.getenv, "NUMBA_NUM_THREADS").result() == "1"
        assert executor.submit(os.getenv, "OMP_NUM_THREADS").result() == "1"
    assert os.environ.get("NUMBA_NUM_THREADS") == before


def test_jobs_must_be_positive():
    with pytest.raises(ValueError, match="jobs must be a positive integer, got 0"):
        with sweep.open_executor(jobs=0):
            pass


# ------------------------------------------------------------------------ kill and resume (SIGKILL)

def test_sigkill_mid_sweep_then_rerun_gives_every_config_once(tmp_path):
    """Kill the whole sweep (parent and workers) while runs are in flight; the rerun finishes it."""
    command = [sys.executable, "-m", "normkit", "run", "toy", "--jobs", "2",
               "--studies-dir", str(FIXTURE), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOY_SLEEP": "0.25"}
    runs = tmp_path / "toy" / "runs.csv"
    sweep_process = subprocess.Popen(command, env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not runs.exists() or len(read_lines(runs)) < 5):
        time.sleep(0.02)
    os.killpg(sweep_process.pid, signal.SIGKILL)
    sweep_process.wait(timeout=10)
    assert sweep_process.returncode == -signal.SIGKILL
    killed = runs.read_bytes()
    done = len(killed.splitlines()) - 1
    assert 4 <= done < 22, "the kill must land mid-sweep"

    env["TOY_SLEEP"] = "0"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already recorded, {22 - done} ran now" in rerun.stdout
    final = runs.read_bytes()
    assert final.startswith(killed)                      # finished rows byte-identical
    assert final.endswith(b"\n")
    rows = parse(runs)
    keys = [tuple(r[f] for f in TOY.field_names) for r in rows]
    assert sorted(keys) == sorted(sweep.config_key(c) for c in TOY.configs(quick=False))
    assert all(len(r) == len(TOY.columns) and None not in r.values() for r in rows)


def sweep_command(tmp_path: Path, toy_sleep: str) -> tuple[list[str], dict[str, str]]:
    """`python -m normkit run toy` (full grid, 2 workers) and its environment."""
    command = [sys.executable, "-m", "normkit", "run", "toy", "--jobs", "2",
               "--studies-dir", str(FIXTURE), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOY_SLEEP": toy_sleep}
    return command, env


def live_processes(group: int) -> list[int]:
    """PIDs in a process group that are alive (a zombie waiting for its reaper is not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            state, _parent, process_group = text[text.rindex(")") + 2:].split()[:3]
            if int(process_group) == group and state != "Z":
                alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes with /proc")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killing_only_the_parent_leaves_no_process_of_the_sweep(tmp_path, signum):
    """`kill PID`, `timeout` and the OOM killer signal the parent alone: its workers and the
    resource tracker must not run on as orphans; SIGTERM is handled like Ctrl-C."""
    command, env = sweep_command(tmp_path, toy_sleep="0.5")
    runs = tmp_path / "toy" / "runs.csv"
    with open(tmp_path / "stderr.txt", "wb") as stderr:   # a file: orphans could hold a pipe
        sweep_process = subprocess.Popen(command, env=env, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=stderr)
    group = sweep_process.pid
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not runs.exists() or len(read_lines(runs)) < 3):
            time.sleep(0.02)
        assert len(live_processes(group)) >= 3, "parent, resource tracker and workers"
        sweep_process.send_signal(signum)
        sweep_process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while live_processes(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live_processes(group) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    lines = read_lines(runs)
    assert 3 <= len(lines) < 23 and all(line.endswith("\n") for line in lines)
    if signum == signal.SIGTERM:
        assert sweep_process.returncode == 143
        messages = [line for line in (tmp_path / "stderr.txt").read_text().splitlines()
                    if not line.startswith("[")]          # not the per-run log lines
        assert messages == ["normkit: terminated; finished runs are kept in runs.csv: run the "
                            "same command again to resume"]


# ------------------------------------------------------------------------ executors: same results

def metric_cells(path: Path) -> list[tuple[str, ...]]:
    """(config..., loss, score, status) as written, sorted by config."""
    names = (*TOY.field_names, "loss", "score", "status")
    return sorted(tuple(r[n] for n in names) for r in parse(path))


def test_jobs_1_jobs_2_and_dask_give_identical_metrics(tmp_path, pool):
    distributed = pytest.importorskip("distributed")
    with sweep.open_executor(jobs=1) as executor:
        sweep.run_sweep(TOY, tmp_path / "one", executor)
    sweep.run_sweep(TOY, tmp_path / "two", pool)
    # processes=False: workers are threads of this process (light; the process path is tested
    # through the CLI). No dashboard: it would need bokeh and a free port.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        sweep.run_sweep(TOY, tmp_path / "dask", client.get_executor(pure=False))
    one = metric_cells(tmp_path / "one" / "runs.csv")
    assert len(one) == 22
    assert one == metric_cells(tmp_path / "two" / "runs.csv")
    assert one == metric_cells(tmp_path / "dask" / "runs.csv")
    for row in one:
        config = Config(mode=row[0], width=int(row[1]), shift=float(row[2]), seed=int(row[3]))
        assert (float(row[4]), float(row[5])) == tuple(oracle(config).values())


# --------------------------------------------------------------------------------------- tables

def test_default_table_is_mean_and_std_over_seeds_of_ok_runs(tmp_path, quick_sweep):
    source, _ = quick_sweep
    (tmp_path / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    plain = toy_variant(tables=None, figures=None)
    written = sweep.summarize(plain, tmp_path, quick=True)
    assert written == [tmp_path / "table.md", tmp_path / "table.csv"]
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == ["mode", "width", "loss_mean", "loss_std", "score_mean",
                                   "score_std", "ok", "diverged", "failed"]
    for row in table.itertuples():
        configs = [Config(mode=row.mode, width=row.width, seed=s) for s in (0, 1)]
        counts = {"normal": (2, 0, 0), "nan_loss": (0, 2, 0), "fail": (0, 0, 2)}[row.mode]
        assert (row.ok, row.diverged, row.failed) == counts
        if row.mode != "normal":
            assert np.isnan(row.loss_mean) and np.isnan(row.score_mean)  # not averaged
            continue
        losses = [oracle(c)["loss"] for c in configs]
        np.testing.assert_allclose([row.loss_mean, row.loss_std],
                                   [np.mean(losses), np.std(losses, ddof=1)], rtol=1e-12)
    markdown = (tmp_path / "table.md").read_text()
    assert "12 of 12 runs recorded: 4 ok, 4 diverged, 4 failed." in markdown
    assert "Fixed: shift=0.0." in markdown
    assert "| mode | width | loss_mean |" in markdown


def test_study_hooks_write_their_table_and_figure(tmp_path, quick_sweep):
    pytest.importorskip("matplotlib")
    source, _ = quick_sweep
    (tmp_path / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    written = sweep.summarize(TOY, tmp_path, quick=True)
    assert written == [tmp_path / "table.md", tmp_path / "table.csv", tmp_path / "score.png"]
    assert (tmp_path / "score.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the CSV is numeric and long: one row per cell, mean/std/n and the status counts
    table = pd.read_csv(tmp_path / "table.csv").set_index(["width", "mode"])
    assert list(table.columns) == ["mean", "std", "n", "diverged", "failed", "note"]
    frame, _ = sweep.read_runs(TOY, tmp_path, quick=True)
    for (width, mode), row in table.iterrows():
        runs = frame[(frame["width"] == width) & (frame["mode"] == mode)]
        ok = runs.loc[runs["status"] == "ok", "loss"]
        assert (row["n"], row["diverged"], row["failed"]) == (
            len(ok), (runs["status"] == "diverged").sum(), (runs["status"] == "failed").sum())
        if len(ok):
            # the CSV keeps 12 significant digits: a relative rounding of at most 5e-12
            np.testing.assert_allclose([row["mean"], row["std"]], [ok.mean(), ok.std()],
                                       rtol=5e-12)
        else:
            assert np.isnan(row["mean"]) and np.isnan(row["std"])
    assert (table.loc[(4, "nan_loss"), "diverged"], table.loc[(8, "fail"), "failed"]) == (2, 2)


def test_named_tables_get_a_section_and_a_csv_each(tmp_path, quick_sweep):
    source, _ = quick_sweep
    (tmp_path / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    study = toy_variant(figures=None, tables=lambda df: {
        "Loss by width": sweep.aggregate(df, "width", "mode", "loss"),
        "score": sweep.aggregate(df, "mode", [], "score")})
    written = sweep.summarize(study, tmp_path, quick=True)
    assert [p.name for p in written] == ["table.md", "table_Loss_by_width.csv", "table_score.csv"]
    markdown = (tmp_path / "table.md").read_text()
    assert "\n## Loss by width\n\n| width | normal | nan_loss | fail |\n" in markdown
    assert "\n## score\n\n| mode | score |\n" in markdown
    scores = pd.read_csv(tmp_path / "table_score.csv", index_col="mode")
    assert (scores.loc["nan_loss", "diverged"], scores.loc["fail", "failed"]) == (4, 4)
    assert scores.loc["normal", "n"] == 4 and set(scores["column"]) == {"score"}


def test_reports_hook_writes_its_text_files_beside_the_tables(tmp_path, quick_sweep):
    source, _ = quick_sweep
    (tmp_path / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    study = toy_variant(figures=None, reports=lambda df: {
        "README.md": f"# toy\n{int((df['status'] == 'ok').sum())} ok runs\n",
        "notes.txt": "widths " + " ".join(map(str, sorted(set(df["width"]))))})
    written = sweep.summarize(study, tmp_path, quick=True)
    assert [p.name for p in written] == ["table.md", "table.csv", "README.md", "notes.txt"]
    assert (tmp_path / "README.md").read_text() == "# toy\n4 ok runs\n"
    assert (tmp_path / "notes.txt").read_text() == "widths 4 8"


@pytest.mark.parametrize("name", ["../escape.md", "sub/README.md", ""])
def test_reports_refuse_paths_outside_the_results_folder(tmp_path, quick_sweep, name):
    source, _ = quick_sweep
    (tmp_path / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    study = toy_variant(figures=None, reports=lambda df: {name: "text"})
    with pytest.raises(sweep.SweepError, match="plain files in the results folder"):
        sweep.summarize(study, tmp_path, quick=True)
    assert not (tmp_path.parent / "escape.md").exists()


def test_read_runs_builds_a_wide_frame_without_fragmenting(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Wide:
        seed: int = 0

    metrics = tuple(f"m{i}" for i in range(300))
    study = Study(name="wide", config=Wide, metrics=metrics, grid_quick={"seed": [0, 1]},
                  grid_full={"seed": [0, 1]}, run=lambda config: {})
    header = ",".join(study.columns)
    rows = [",".join([str(seed), *(str(seed + i / 10) for i in range(300)),
                      "ok", "", "0.5", "0.1", "rev", "2026"])
            for seed in (0, 1)]
    (tmp_path / "runs.csv").write_text("\n".join([header, *rows]) + "\n")
    frame, left_out = sweep.read_runs(study, tmp_path, quick=True)   # a warning would fail here
    assert left_out == 0 and list(frame.columns) == list(study.columns)
    np.testing.assert_array_equal(frame["m299"], [29.9, 30.9])


def test_table_is_written_without_matplotlib(tmp_path, quick_sweep, monkeypatch, caplog):
    source, _ = quick_sweep
    (tmp_path / "runs.csv").write_bytes((source / "runs.csv").read_bytes())
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` fails
    with caplog.at_level(logging.WARNING, logger="normkit.sweep"):
        written = sweep.summarize(TOY, tmp_path, quick=True)
    assert written == [tmp_path / "table.md", tmp_path / "table.csv"]
    assert "figures skipped: matplotlib is not installed" in caplog.text


def test_summary_of_an_empty_runs_csv(tmp_path):
    (tmp_path / "runs.csv").write_text(",".join(TOY.columns) + "\n")
    sweep.summarize(TOY, tmp_path, quick=True)
    assert "0 of 12 runs recorded" in (tmp_path / "table.md").read_text()


def test_aggregate_pivots_mean_and_std_and_counts_the_rest():
    frame = pd.DataFrame({
        "norm": ["batch"] * 4 + ["layer"] * 4,
        "size": [2, 2, 8, 8] * 2,
        "acc": [0.5, 0.7, 0.9, np.nan, 0.8, 0.8, 0.875, 0.9],
        "status": ["ok", "ok", "ok", "diverged", "ok", "ok", "ok", "failed"],
    })
    table = sweep.aggregate(frame, rows="size", cols="norm", value="acc")
    assert table.to_dict() == {
        "batch": {2: f"0.6 ± {np.std([0.5, 0.7], ddof=1):.2g}", 8: "0.9 (1 div)"},
        "layer": {2: "0.8 ± 0", 8: "0.875 (1 failed)"}}
    assert sweep.markdown_table(table).splitlines() == [
        "| size | batch | layer |", "| ---: | --- | --- |",
        "| 2 | 0.6 ± 0.14 | 0.8 ± 0 |", "| 8 | 0.9 (1 div) | 0.875 (1 failed) |"]


def test_stat_cells_print_as_text_and_keep_their_numbers():
    cell = sweep.Stat.of([0.5, 0.7, float("nan")], scale=100, digits=3, diverged=1)
    assert cell == f"60 ± {np.std([50, 70], ddof=1):.2g} (1 div)"
    assert (cell.mean, cell.n, cell.diverged, cell.failed) == (60.0, 2, 1, 0)
    np.testing.assert_allclose(cell.std, np.std([50.0, 70.0], ddof=1), rtol=1e-12)
    one = sweep.Stat.of([0.25])
    assert one == "0.25" and one.n == 1 and np.isnan(one.std)
    assert pickle.loads(pickle.dumps(cell)) == cell and pickle.loads(pickle.dumps(cell)).n == 2


def test_numeric_table_melts_stat_cells_and_keeps_reference_numbers_and_notes():
    table = pd.DataFrame({"2": [sweep.Stat.of([1.0, 3.0]), "24.1", "n/a"],
                          "8": [sweep.Stat.of([2.0]), "—", sweep.Stat.of([], failed=2)]},
                         index=pd.Index(["batch", "paper", "ghost"], name="norm"))
    table.columns.name = "batch_size"
    long = sweep.numeric_table(table)
    assert list(long.columns) == ["norm", "batch_size", "mean", "std", "n", "diverged",
                                  "failed", "note"]
    rows = {(r.norm, r.batch_size): r for r in long.itertuples()}
    assert set(rows) == {("batch", "2"), ("batch", "8"), ("paper", "2"), ("ghost", "2"),
                         ("ghost", "8")}                                   # "—" left out
    assert (rows["batch", "2"].mean, rows["batch", "2"].n) == (2.0, 2)
    np.testing.assert_allclose(rows["batch", "2"].std, np.sqrt(2.0))
    assert rows["paper", "2"].mean == 24.1 and pd.isna(rows["paper", "2"].n)
    assert rows["ghost", "2"].note == "n/a" and np.isnan(rows["ghost", "2"].mean)
    assert rows["ghost", "8"].failed == 2 and rows["ghost", "8"].n == 0
    assert sweep.numeric_table(pd.DataFrame({"a": [1.0], "b": ["x"]})) is None



def test_numeric_table_writes_the_same_csv_for_means_one_ulp_apart():
    # NumPy's transcendental functions differ in the last bits between CPUs (SIMD paths); the
    # same runs.csv must give the same table CSV on every machine.
    mean = -1.6215625311743551
    std = 0.7246214945239162
    cells = [sweep.Stat(m, s, 3)
             for m, s in ((mean, std), (np.nextafter(mean, 0), np.nextafter(std, 1)))]
    csvs = [sweep.numeric_table(pd.DataFrame({"x": [cell]})).to_csv(index=False) for cell in cells]
    assert cells[0].mean != cells[1].mean and cells[0].std != cells[1].std
    assert csvs[0] == csvs[1]
    long = sweep.numeric_table(pd.DataFrame({"x": [cells[0]]}))
    assert long["mean"].iloc[0] == -1.62156253117 and long["std"].iloc[0] == 0.724621494524

def test_curves_go_to_curves_csv_in_long_format(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Curve:
        lr: float = 0.1
        seed: int = 0

    study = Study(name="curvy", config=Curve, metrics=("final", "acc_01", "acc_02", "acc_03"),
                  grid_quick={"lr": [0.1, 1.0], "seed": [0]}, grid_full={"seed": [0]},
                  run=lambda config: {}, curves={"acc_": "accuracy"})
    header = ",".join(study.columns)
    rows = ["0.1,0,0.9,0.5,0.7,0.9,ok,,1.0,v,rev,2026",
            "1.0,0,,0.2,,,diverged,,1.0,v,rev,2026"]
    (tmp_path / "runs.csv").write_text("\n".join([header, *rows]) + "\n")
    written = sweep.summarize(study, tmp_path, quick=True)
    assert tmp_path / "curves.csv" in written
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert list(curves.columns) == ["run", "lr", "seed", "status", "curve", "step", "value"]
    assert curves[curves["lr"] == 0.1].sort_values("step")["value"].tolist() == [0.5, 0.7, 0.9]
    assert curves[curves["lr"] == 1.0][["step", "value", "status"]].values.tolist() == [
        [1, 0.2, "diverged"]]                                # steps not reached are left out
    assert set(curves["curve"]) == {"accuracy"} and curves["run"].nunique() == 2
    with pytest.raises(ValueError, match="no metric is 'loss_'"):
        Study(name="bad", config=Curve, metrics=("acc_01",), grid_quick={"seed": [0]},
              grid_full={"seed": [0]}, run=lambda config: {}, curves={"loss_": "loss"})


def test_legends_outside_moves_each_legend_under_its_axes():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figure = Figure()
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], label="a")
    twin = axes.twinx()
    twin.plot([0, 1], [1, 0], label="b")
    handles, labels = axes.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    axes.legend(handles + more, labels + more_labels, title="t")
    sweep.legends_outside(figure)
    legend = axes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]    # the twin's entry kept
    assert legend.get_title().get_text() == "t"
    assert legend.get_bbox_to_anchor().transformed(axes.transAxes.inverted()).y0 < 0


@pytest.mark.parametrize("mean, std, text", [
    (0.91234, 0.0041, "0.9123 ± 0.0041"), (0.5, float("nan"), "0.5"),
    (float("nan"), float("nan"), "—")])
def test_format_mean_std(mean, std, text):
    assert sweep.format_mean_std(mean, std) == text


def test_git_revision_outside_git_is_unknown(tmp_path):
    assert sweep.git_revision(tmp_path) == "unknown"
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", sweep.git_revision(REPO))
