"""The `normkit` command: each subcommand, each error message, each exit code."""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normkit import __version__, sweep
from normkit.cli import main

FIXTURE = Path(__file__).parent / "studies_fixture"
REPO = Path(__file__).parent.parent
STUDIES = ["--studies-dir", str(FIXTURE)]

BROKEN_STUDY = "raise RuntimeError('broken on purpose')\n"
HOOK_FAILS = '''
from dataclasses import dataclass
from normkit.sweep import Study

@dataclass(frozen=True)
class Config:
    seed: int = 0

def run(config):
    return {"loss": float(config.seed)}

def tables(df):
    raise KeyError("no such column")

STUDY = Study(name="hookfails", config=Config, metrics=("loss",), grid_quick={"seed": [0, 1]},
              grid_full={"seed": [0, 1]}, run=run, tables=tables)
'''


def normkit(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_each_study_and_its_grids(capsys):
    code, out, _ = normkit(capsys, "list", *STUDIES)
    assert code == 0
    assert out.splitlines() == [
        "toy  Toy study for the sweep runner's tests: seeded random metrics, some runs diverge "
        "or fail.",
        "  quick   12 runs  mode=[normal, nan_loss, fail] x width=[4, 8] x seed=[0, 1]",
        "  full    22 runs  width=[2, 4, 8, 16] x seed=[0, 1, 2, 3, 4] + shift=[1.0] x seed=[0, 1]",
    ]


def test_list_without_studies_says_so(capsys, tmp_path):
    code, out, _ = normkit(capsys, "list", "--studies-dir", tmp_path)
    assert (code, out) == (0, f"no studies in {tmp_path}/ (studies/README.md says how to add "
                               "one)\n")


def test_list_reports_a_broken_study(capsys, tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_STUDY)
    code, out, err = normkit(capsys, "list", "--studies-dir", tmp_path)
    assert code == 2
    assert out == (f"broken  ERROR: study script {tmp_path / 'broken.py'} failed to import: "
                   "RuntimeError: broken on purpose\n")
    assert "Traceback" in err


def test_run_quick_records_failures_writes_the_table_and_exits_1(capsys, tmp_path):
    code, out, err = normkit(capsys, "run", "toy", "--quick", "--jobs", 2, "--out", tmp_path,
                             *STUDIES)
    folder = tmp_path / "toy" / "quick"
    assert code == 1
    assert out.splitlines() == [
        f"toy: 12 runs in the grid, 0 already recorded, 12 ran now (4 ok, 4 diverged); 4 failed "
        f"in {folder / 'runs.csv'} (retry them with --rerun-failed)",
        "wrote " + ", ".join(str(folder / f) for f in ("table.md", "table.csv", "score.png")),
    ]
    run_lines = [line for line in err.splitlines() if line.startswith("[")]
    assert len(run_lines) == 12                              # one log line per finished run
    assert any(" failed " in line and "ValueError: deliberate failure" in line
               for line in run_lines)


def test_run_full_grid_exits_0_and_a_rerun_runs_nothing(capsys, tmp_path):
    args = ("run", "toy", "--jobs", 1, "--out", tmp_path, *STUDIES)
    code, out, _ = normkit(capsys, *args)
    assert code == 0 and "22 ran now (22 ok, 0 diverged); 0 failed" in out
    code, out, err = normkit(capsys, *args)
    assert code == 0 and "22 already recorded, 0 ran now" in out
    assert not [line for line in err.splitlines() if line.startswith("[")]


def test_run_no_summary_writes_only_runs_csv(capsys, tmp_path):
    code, out, _ = normkit(capsys, "run", "toy", "--jobs", 1, "--no-summary", "--out", tmp_path,
                           *STUDIES)
    assert code == 0 and "wrote" not in out
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [".lock", "runs.csv"]


def test_table_rewrites_the_tables_without_running(capsys, tmp_path):
    normkit(capsys, "run", "toy", "--quick", "--jobs", 2, "--out", tmp_path, *STUDIES)
    folder = tmp_path / "toy" / "quick"
    runs = (folder / "runs.csv").read_bytes()
    (folder / "table.md").unlink()
    code, out, err = normkit(capsys, "table", "toy", "--quick", "--out", tmp_path, *STUDIES)
    assert code == 0 and out.startswith(f"wrote {folder / 'table.md'}, ")
    assert "| width | normal | nan_loss | fail |" in (folder / "table.md").read_text()
    assert (folder / "runs.csv").read_bytes() == runs
    assert "[" not in err


def test_table_before_any_run_is_an_error(capsys, tmp_path):
    code, out, err = normkit(capsys, "table", "toy", "--out", tmp_path, *STUDIES)
    assert (code, out) == (2, "")
    assert err == (f"normkit: no runs yet: {tmp_path / 'toy' / 'runs.csv'} does not exist "
                   "(run `normkit run toy` first)\n")


def test_a_failing_table_hook_exits_1_after_the_runs_are_saved(capsys, tmp_path):
    (tmp_path / "hookfails.py").write_text(HOOK_FAILS)
    code, out, err = normkit(capsys, "run", "hookfails", "--jobs", 1, "--studies-dir", tmp_path,
                             "--out", tmp_path / "results")
    assert code == 1 and "2 ran now (2 ok, 0 diverged)" in out
    assert err.splitlines()[-1] == ("normkit: the tables or figures of study 'hookfails' "
                                    "failed: KeyError: 'no such column'")
    assert (tmp_path / "results" / "hookfails" / "runs.csv").exists()


def test_unknown_study(capsys):
    code, out, err = normkit(capsys, "run", "nope", *STUDIES)
    assert (code, out) == (2, "")
    assert err == f"normkit: unknown study 'nope' (studies in {FIXTURE}/: toy)\n"


def test_broken_study(capsys, tmp_path):
    (tmp_path / "broken.py").write_text(BROKEN_STUDY)
    code, _, err = normkit(capsys, "run", "broken", "--studies-dir", tmp_path)
    assert code == 2
    assert err.splitlines()[-1] == (f"normkit: study script {tmp_path / 'broken.py'} failed to "
                                    "import: RuntimeError: broken on purpose")


def test_unwritable_output_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = normkit(capsys, "run", "toy", "--out", tmp_path / "file", *STUDIES)
    assert code == 2
    assert err == f"normkit: cannot write to {tmp_path / 'file' / 'toy'}: Not a directory\n"


def test_unreachable_scheduler(capsys, tmp_path):
    pytest.importorskip("distributed")
    with socket.socket() as probe:              # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = normkit(capsys, "run", "toy", "--scheduler", f"tcp://127.0.0.1:{port}",
                           "--connect-timeout", "0.5", "--out", tmp_path / "results", *STUDIES)
    assert code == 2
    assert err.startswith(f"normkit: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}: ")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()     # no folder, .lock or header-only runs.csv


def test_a_lost_scheduler_is_named_in_the_summary(tmp_path):
    """The Dask scheduler (not a worker) dies mid-sweep: the runs not recorded are left for the
    next sweep, and the summary says why."""
    pytest.importorskip("distributed")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOY_SLEEP": "0.3"}
    address_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m"]
    started = []
    try:
        for args in (["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"],
                     ["distributed.cli.dask_worker", "--nthreads", "1"]):
            started.append(subprocess.Popen(
                [*dask, *args, "--no-dashboard", "--scheduler-file", str(address_file)],
                env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 60
            while not address_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        address = json.loads(address_file.read_text())["address"]
        runs = tmp_path / "results" / "toy" / "runs.csv"
        with open(tmp_path / "stdout.txt", "wb") as stdout:
            sweep_process = subprocess.Popen(
                [sys.executable, "-m", "normkit", "run", "toy", "--scheduler", address,
                 "--connect-timeout", "2", "--no-summary", "--out", str(tmp_path / "results"),
                 *STUDIES], env=env, stdout=stdout, stderr=subprocess.DEVNULL)
        started.append(sweep_process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not runs.exists() or
                                               len(runs.read_bytes().splitlines()) < 3):
            time.sleep(0.02)
        os.killpg(started[0].pid, signal.SIGKILL)          # the scheduler
        assert sweep_process.wait(timeout=60) == 1
    finally:
        for process in started[:2]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=30)
    summary = (tmp_path / "stdout.txt").read_text()
    assert "not done (the Dask scheduler was lost or cancelled them; rerun to resume)" in summary
    assert "worker process died" not in summary


def test_scheduler_without_dask_installed(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)    # `import distributed` fails
    code, _, err = normkit(capsys, "run", "toy", "--scheduler", "local", "--out", tmp_path,
                           *STUDIES)
    assert code == 2
    assert err == "normkit: --scheduler needs Dask: pip install 'normkit[dask]'\n"


def test_run_on_a_local_dask_cluster_gives_the_local_pool_results(capsys, tmp_path):
    pytest.importorskip("distributed")
    code, out, _ = normkit(capsys, "run", "toy", "--scheduler", "local", "--jobs", 1,
                           "--no-summary", "--out", tmp_path / "dask", *STUDIES)
    assert code == 0 and "22 ran now (22 ok, 0 diverged)" in out
    normkit(capsys, "run", "toy", "--jobs", 1, "--no-summary", "--out", tmp_path / "pool",
            *STUDIES)
    assert metric_cells(tmp_path / "dask") == metric_cells(tmp_path / "pool")


def metric_cells(results: Path) -> list[list[str]]:
    """Config and metric cells of toy's runs.csv as written, sorted."""
    with open(results / "toy" / "runs.csv", newline="") as f:
        return sorted(row[:6] for row in csv.reader(f))


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: COMMAND"),
    (["run"], "the following arguments are required: STUDY"),
    (["run", "toy", "--jobs", "0"], "argument --jobs: expected a positive integer, got '0'"),
    (["run", "toy", "--connect-timeout", "-1"], "expected a positive number, got '-1'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["list", "--jobs", "2"], "unrecognized arguments: --jobs 2"),
])
def test_usage_errors_exit_2(capsys, argv, words):
    code, out, err = normkit(capsys, *argv)
    assert (code, out) == (2, "")
    assert words in err


def test_version(capsys):
    assert normkit(capsys, "--version") == (0, f"normkit {__version__}\n", "")


def test_bench_without_a_benchmark(capsys, tmp_path):
    code, _, err = normkit(capsys, "bench", "--script", tmp_path / "kernels.py")
    assert (code, err) == (2, f"normkit: no benchmark yet: {tmp_path / 'kernels.py'} does not "
                              "exist\n")


@pytest.mark.parametrize("ending, code", [("", 0), ("sys.exit(3)", 3)])
def test_bench_runs_the_script_with_its_arguments(capsys, tmp_path, ending, code):
    script = tmp_path / "kernels.py"
    script.write_text(f"import sys\nif __name__ == '__main__':\n    print('bench', sys.argv[1:])"
                      f"\n    {ending}\n")
    argv_before = list(sys.argv)
    assert normkit(capsys, "bench", "--script", script, "--size", "8") == (
        code, "bench ['--size', '8']\n", "")
    assert sys.argv == argv_before


def test_python_dash_m_normkit(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "normkit", "list", *STUDIES], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("toy  Toy study")


# ------------------------------------------------------------------------- a damaged runs.csv

@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> bytes:
    """runs.csv of the toy's quick grid: 12 rows, in grid order (one worker)."""
    out = tmp_path_factory.mktemp("quick_runs")
    assert main(["run", "toy", "--quick", "--jobs", "1", "--no-summary", "--out", str(out),
                 *STUDIES]) == 1
    return (out / "toy" / "quick" / "runs.csv").read_bytes()


def damaged(lines: list[bytes], case: str) -> tuple[bytes, int]:
    """runs.csv damaged in one way, and the number of the line at fault."""
    if case == "empty file":
        return b"", 1
    if case == "bad metric value":         # line 2 is an ok run: mode=normal, width=4, seed=0
        cells = lines[1].split(b",")
        return b"".join(lines[:1] + [b",".join(cells[:4] + [b"abc"] + cells[5:])] + lines[2:]), 2
    if case == "short line mid-file":
        return b"".join(lines[:4] + [lines[4][:20] + b"\n"] + lines[5:]), 5
    if case == "garbage line":
        return b"".join(lines[:6] + [b"}}}} not a csv row {{{{\n"] + lines[6:]), 7
    if case == "unknown status":
        return b"".join(lines[:3] + [lines[3].replace(b",ok,", b",fine,")] + lines[4:]), 4
    assert case == "invalid UTF-8"
    return b"".join(lines[:8] + [lines[8].replace(b",", b",\xe9", 1)] + lines[9:]), 9


@pytest.mark.parametrize("command", ["run", "table"])
@pytest.mark.parametrize("case", ["bad metric value", "short line mid-file", "garbage line",
                                  "unknown status", "invalid UTF-8", "empty file"])
def test_a_damaged_runs_csv_is_refused_naming_file_and_line(capsys, tmp_path, quick_runs,
                                                             command, case):
    folder = tmp_path / "toy" / "quick"
    folder.mkdir(parents=True)
    text, number = damaged(quick_runs.splitlines(keepends=True), case)
    (folder / "runs.csv").write_bytes(text)
    jobs = ["--jobs", 1] if command == "run" else []
    code, out, err = normkit(capsys, command, "toy", "--quick", *jobs, "--out", tmp_path,
                             *STUDIES)
    assert (code, out) == (2, "")
    assert err.startswith(f"normkit: {folder / 'runs.csv'}, line {number}: ")
    assert len(err.splitlines()) == 1
    assert (folder / "runs.csv").read_bytes() == text
    assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == ["runs.csv"]


def test_table_leaves_out_a_torn_last_line_with_the_warning_run_gives(capsys, tmp_path,
                                                                      quick_runs):
    folder = tmp_path / "toy" / "quick"
    folder.mkdir(parents=True)
    lines = quick_runs.splitlines(keepends=True)
    torn = b"".join(lines[:-1]) + lines[-1][:30]
    (folder / "runs.csv").write_bytes(torn)
    code, out, err = normkit(capsys, "table", "toy", "--quick", "--out", tmp_path, *STUDIES)
    assert code == 0 and out.startswith("wrote ")
    assert err == (f"{folder / 'runs.csv'}: a torn last line (30 bytes) left by an interrupted "
                   "write; leaving it out (`normkit run` cuts it off)\n")
    assert "11 of 12 runs recorded" in (folder / "table.md").read_text()
    assert (folder / "runs.csv").read_bytes() == torn
    code, _, err = normkit(capsys, "run", "toy", "--quick", "--jobs", 1, "--no-summary",
                           "--out", tmp_path, *STUDIES)
    assert err.splitlines()[0] == (f"{folder / 'runs.csv'}: a torn last line (30 bytes) left "
                                   "by an interrupted write; cutting it off")
    assert (folder / "runs.csv").read_bytes().startswith(b"".join(lines[:-1]))


# ----------------------------------------------------------------------------------- disk full

FULL = "No space left on device; free some space, then run the same command again"


def fill_the_disk(monkeypatch, *, after: int = 0, only=lambda data: True) -> None:
    """Every write of normkit.sweep (probe, header, rows, tables) fails with ENOSPC, as on a
    full disk, once ``after`` writes went through, for the data ``only`` picks; a failing
    write first writes half its data, as a real one can."""
    write_all = sweep._write_all
    done = []

    def write_all_until_full(fd: int, data: bytes) -> None:
        if len(done) >= after and only(bytes(data)):
            os.write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done.append(len(data))
        write_all(fd, data)

    monkeypatch.setattr(sweep, "_write_all", write_all_until_full)


def messages(err: str) -> list[str]:
    """stderr without the per-run log lines."""
    return [line for line in err.splitlines() if not line.startswith("[")]


def test_disk_full_while_appending_a_run(capsys, tmp_path, monkeypatch):
    fill_the_disk(monkeypatch, after=2 + 3)       # the probe, the header, three rows
    code, out, err = normkit(capsys, "run", "toy", "--quick", "--jobs", 1, "--out", tmp_path,
                             *STUDIES)
    folder = tmp_path / "toy" / "quick"
    assert (code, out) == (2, "")
    assert messages(err) == [f"normkit: cannot append a run to {folder / 'runs.csv'}: "
                             f"{FULL.replace(';', ' (the runs recorded before it are intact);')}"]
    lines = (folder / "runs.csv").read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 3 and all(line.endswith("\n") for line in lines)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_rewriting_for_rerun_failed(capsys, tmp_path, monkeypatch, quick_runs):
    folder = tmp_path / "toy" / "quick"
    folder.mkdir(parents=True)
    (folder / "runs.csv").write_bytes(quick_runs)
    fill_the_disk(monkeypatch, only=lambda data: data.startswith(b"mode,width,"))
    code, out, err = normkit(capsys, "run", "toy", "--quick", "--rerun-failed", "--out",
                             tmp_path, *STUDIES)
    assert (code, out) == (2, "")
    assert messages(err) == ["toy: retrying 4 failed runs",
                             f"normkit: cannot write {folder / 'runs.csv'}: "
                             f"{FULL.replace(';', ' (it is unchanged);')}"]
    assert (folder / "runs.csv").read_bytes() == quick_runs
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "runs.csv"]


def test_a_full_disk_is_found_before_any_run_starts(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    folder.mkdir()
    fill_the_disk(monkeypatch)

    def no_run_may_start(*args, **kwargs):
        raise AssertionError("a run started on a full disk")

    monkeypatch.setattr(sweep, "open_executor", no_run_may_start)
    code, out, err = normkit(capsys, "run", "toy", "--out", tmp_path, *STUDIES)
    assert (code, out, err) == (2, "", f"normkit: cannot write to {folder}: {FULL}\n")
    assert list(folder.iterdir()) == []
