"""A grid of runs: each finished run persisted at once, resumable, in parallel locally or on Dask.

Writing a study
===============
A study is one script ``studies/<name>.py`` that defines a module-level ``STUDY``::

    from dataclasses import dataclass
    from normkit.sweep import Diverged, Study, aggregate

    @dataclass(frozen=True)
    class Config:                       # every field has a default; `seed` is required
        norm: str = "batch"
        batch_size: int = 32
        lr: float = 0.1
        seed: int = 0

    def run(config: Config) -> dict[str, float]:
        ...                             # train with config.seed; return the declared metrics
        return {"loss": loss, "accuracy": accuracy}

    def tables(df):                     # optional: the default is one row per varying config
        return aggregate(df, rows="batch_size", cols="norm", value="accuracy")
                                        # or {"title": DataFrame, ...}: a section each

    STUDY = Study(
        name="small_batch",             # must equal the file name
        config=Config,
        metrics=("loss", "accuracy"),   # the CSV columns; a run may return fewer, never others
        grid_quick={"norm": ["batch", "group"], "batch_size": [2, 32], "seed": range(2)},
        grid_full={"norm": ["batch", "group", "layer"], "batch_size": [2, 4, 8, 16, 32],
                   "seed": range(5)},
        run=run,
        tables=tables,                  # optional
        figures=None,                   # optional: df -> {"name": matplotlib Figure}
        reports=None,                   # optional: df -> {"README.md": text}, written beside
    )

- **Grid**: a dict ``{field: list of values}`` means the cartesian product (fields left out keep
  the dataclass default); a list of such dicts is the union of their products (duplicates run
  once). Config values are plain scalars: int, float, str, bool or None.
- **Divergence**: raise ``Diverged(last_finite_metrics)`` from ``run``, or return the metrics with
  ``"diverged": True``. A returned metric that is NaN or inf also marks the run diverged.
  A diverged run is recorded, not raised; tables count it and leave it out of the means.
- **Failure**: any other exception is recorded as ``failed`` with its message (the traceback goes
  to ``errors.log`` next to ``runs.csv``) and the sweep goes on.
- ``run`` executes in a worker process that imports the study file by its path, with the study's
  directory on ``sys.path`` (so ``from _common import ...`` finds ``studies/_common.py``; files
  starting with ``_`` are helpers, not studies). Import heavy packages (matplotlib) inside the
  hooks, not at the top of the script. Build figures with ``matplotlib.figure.Figure`` (see
  ``line_plot``), not pyplot, so nothing depends on a display. On a Dask cluster the workers
  must have normkit installed and see the study script at the same path (a shared filesystem
  or the same checkout in the same place); only the parent process writes results.

Results
=======
``results/<study>/runs.csv`` (full grid) or ``results/<study>/quick/runs.csv`` (``--quick``):
one header, then one line per finished run: the config fields, the declared metrics, ``status``
(ok, diverged, failed), ``error``, ``seconds``, ``normkit_version``, ``git_rev``, ``started_at``.

- The column set is fixed by the study (config fields + declared metrics), so rows of failed runs
  (no metrics) or runs that return fewer metrics leave empty cells and the file stays one table.
  If a study changes its fields or metrics, the old runs.csv is refused with a clear error
  (move it away to start over) rather than mixed with new rows.
- Only the parent process writes: each row is formatted as one line, written with a single
  ``O_APPEND`` write and ``fsync``-ed before the next; error text is flattened to one line, so a
  record is a physical line. A torn last line (a crash inside a write) is cut off when the file
  is next opened. Rewrites (``--rerun-failed``) go through a temp file and an atomic rename and
  copy the kept lines byte for byte.
- The sweep and the tables read runs.csv through one checking reader (``read_runs_file``): a
  damaged line (not UTF-8, fields missing, an unknown status, a metric that is not a number)
  is refused with the file and line named, never skipped into a wrong table.
- Rows are keyed by the full config (every field, as written in the CSV). A finished run
  (ok/diverged) is never run again; failed runs are retried only with ``rerun_failed``.
  Changing a default or a grid value changes the key, so a stale row is never reused; rows that
  are not in the current grid stay in the file and are left out of the tables.
- A lock file keeps two sweeps from appending to the same runs.csv.
- A write that fails (a full disk) stops the sweep with a SweepError naming the file: a row
  written in part is cut back, a rewrite leaves the old file and no temp file. A probe
  (``PROBE_BYTES``) is written before the first run, so a disk that is still full fails at once.

Tables and figures: ``summarize`` reads runs.csv (``read_runs``) and writes ``table.md``,
``table.csv`` and ``<name>.png`` per figure; mean ± std over seeds of the ok runs, with counts of
diverged and failed runs. A table's CSV is numeric: a table whose cells are :class:`Stat`
(``aggregate`` makes them) is written in long form with ``mean, std, n, diverged, failed``
columns (:func:`numeric_table`). A study's curves (``Study.curves``: metrics ``<prefix><step>``,
one column per epoch or time step in runs.csv, where each run is one line) also go to
``curves.csv`` in long format: run id, varying fields, curve, step, value.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import datetime as dt
import errno
import hashlib
import importlib.util
import io
import itertools
import logging
import math
import numbers
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Study", "Diverged", "SweepError", "SweepReport",
    "expand_grid", "find_studies", "load_study", "results_dir",
    "open_executor", "run_sweep", "read_runs", "read_runs_file", "summarize",
    "aggregate", "summary_table", "markdown_table", "format_mean_std", "line_plot",
    "Stat", "numeric_table", "legends_outside",
]

log = logging.getLogger(__name__)

STATUSES = ("ok", "diverged", "failed")
DONE_STATUSES = ("ok", "diverged")
PROVENANCE_COLUMNS = ("status", "error", "seconds", "normkit_version", "git_rev", "started_at")
RESERVED_NAMES = frozenset(PROVENANCE_COLUMNS) | {"diverged"}
MAX_ERROR_CHARS = 500

GridSpec = Mapping[str, Iterable[Any]] | Sequence[Mapping[str, Iterable[Any]]]


class SweepError(Exception):
    """A sweep cannot start: bad study, unreadable results, unreachable scheduler, ... ."""


class Diverged(Exception):
    """Raised by a study's ``run`` when training diverged; carries the last finite metrics."""

    def __init__(self, metrics: Mapping[str, float] | None = None, message: str = "diverged"):
        super().__init__(message)
        self.metrics = dict(metrics or {})


# --------------------------------------------------------------------------------------- studies

@dataclasses.dataclass(frozen=True)
class Study:
    """A config dataclass, two grids, ``run(config) -> metrics``, optional table/figure hooks."""

    name: str
    config: type
    metrics: tuple[str, ...]
    grid_quick: GridSpec
    grid_full: GridSpec
    run: Callable[[Any], Mapping[str, float]]
    tables: Callable[[Any], Any] | None = None
    figures: Callable[[Any], Mapping[str, Any]] | None = None
    reports: Callable[[Any], Mapping[str, str]] | None = None
    #: Metrics that are curves, ``{column prefix: curve name}``: the columns ``<prefix><step>``
    #: (e.g. ``acc_epoch_01``..``acc_epoch_30``) also go to curves.csv in long format.
    curves: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    source: Path | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*",
                                                              self.name):
            raise ValueError(f"Study name must be letters, digits, '_', '.', '-', "
                             f"got {self.name!r}")
        if not (isinstance(self.config, type) and dataclasses.is_dataclass(self.config)):
            raise TypeError(f"Study config must be a dataclass type, got {self.config!r}")
        names = self.field_names
        if "seed" not in names:
            raise ValueError(f"Study config {self.config.__name__} needs a `seed` field")
        if isinstance(self.metrics, str):
            raise TypeError("Study metrics must be a sequence of names, got one string "
                            f"{self.metrics!r}; write ({self.metrics!r},)")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.metrics:
            raise ValueError("Study metrics must name at least one metric")
        clashes = (set(self.metrics) & set(names)) | (set(self.metrics + names) & RESERVED_NAMES)
        if clashes or len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"Study metric and field names must be distinct and not reserved "
                             f"({sorted(RESERVED_NAMES)}); offending: {sorted(clashes)}")
        if not callable(self.run):
            raise TypeError(f"Study run must be callable, got {self.run!r}")
        for hook in ("tables", "figures", "reports"):
            if getattr(self, hook) is not None and not callable(getattr(self, hook)):
                raise TypeError(f"Study {hook} must be callable or None")
        for prefix, name in self.curves.items():
            if not any(re.fullmatch(re.escape(prefix) + r"\d+", m) for m in self.metrics):
                raise ValueError(f"Study curves: no metric is {prefix!r} followed by a step "
                                 f"number (curve {name!r})")
        self.configs(quick=True)   # validates both grids now, not in the middle of a sweep
        self.configs(quick=False)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.config))

    @property
    def columns(self) -> tuple[str, ...]:
        """The header of runs.csv."""
        return self.field_names + self.metrics + PROVENANCE_COLUMNS

    def grid(self, quick: bool) -> GridSpec:
        return self.grid_quick if quick else self.grid_full

    def configs(self, quick: bool) -> list[Any]:
        """The grid's configs, in grid order, without duplicates."""
        which = "grid_quick" if quick else "grid_full"
        configs: dict[tuple[str, ...], Any] = {}
        for fields in expand_grid(self.grid(quick), self.field_names, what=which):
            try:
                config = self.config(**fields)
            except Exception as exc:
                raise ValueError(f"{which} of study {self.name!r}: {self.config.__name__}"
                                 f"(**{fields}) raised {type(exc).__name__}: {exc}") from exc
            configs.setdefault(config_key(config), config)
        return list(configs.values())


def expand_grid(spec: GridSpec, field_names: Sequence[str], what: str = "grid") -> list[dict]:
    """``{field: values}`` -> the cartesian product as dicts; a list of such dicts -> the union."""
    parts = [spec] if isinstance(spec, Mapping) else spec
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or not parts:
        raise TypeError(f"{what} must be a dict of field -> values or a non-empty list of such "
                        f"dicts, got {spec!r}")
    expanded: list[dict] = []
    for part in parts:
        if not isinstance(part, Mapping):
            raise TypeError(f"{what} must hold dicts of field -> values, got {part!r}")
        unknown = set(part) - set(field_names)
        if unknown:
            raise ValueError(f"{what} names unknown config fields {sorted(unknown)}; "
                             f"fields are {list(field_names)}")
        axes = []
        for name, values in part.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise TypeError(f"{what}[{name!r}] must be a list of values, got {values!r}")
            values = list(values)
            if not values:
                raise ValueError(f"{what}[{name!r}] is empty")
            axes.append(values)
        expanded += [dict(zip(part, combo)) for combo in itertools.product(*axes)]
    return expanded


def _cell(value: Any, what: str = "value") -> str:
    """How a config value or metric is written in runs.csv (floats round-trip exactly)."""
    if value is None:
        return ""
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise ValueError(f"{what} must not contain a line break: {value!r}")
        return value
    numpy = sys.modules.get("numpy")
    if isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    raise TypeError(f"{what} must be int, float, str, bool or None, got {type(value).__name__}")


def config_fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_key(config: Any) -> tuple[str, ...]:
    """The identity of a run: every config field as written in runs.csv."""
    return tuple(_cell(v, f"config field {k!r}") for k, v in config_fields(config).items())


# ------------------------------------------------------------------------------- loading studies

_LOADED: dict[str, Study] = {}
_LOAD_LOCK = threading.Lock()


def find_studies(studies_dir: str | os.PathLike) -> dict[str, Path]:
    """Study scripts in a folder: every ``*.py`` not starting with ``_``, by name."""
    folder = Path(studies_dir)
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def load_study(path: str | os.PathLike) -> Study:
    """Import a study script by file path (once per process) and return its ``STUDY``."""
    path = Path(path).resolve()
    with _LOAD_LOCK:
        if str(path) not in _LOADED:
            _LOADED[str(path)] = _import_study(path)
        return _LOADED[str(path)]


def _import_study(path: Path) -> Study:
    if not path.is_file():
        raise SweepError(f"no study script at {path}")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)   # sibling helpers (studies/_common.py) import by name
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"_normkit_study_{path.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module   # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    study = getattr(module, "STUDY", None)
    if not isinstance(study, Study):
        raise SweepError(f"{path} defines no STUDY = normkit.sweep.Study(...)")
    if study.name != path.stem:
        raise SweepError(f"{path}: STUDY.name is {study.name!r} but the file is {path.name}; "
                         "they must match")
    description = study.description or (module.__doc__ or "").strip().split("\n")[0]
    return dataclasses.replace(study, source=path, description=description)


def results_dir(root: str | os.PathLike, study_name: str, quick: bool) -> Path:
    """``<root>/<study>`` for the full grid, ``<root>/<study>/quick`` for the quick one."""
    folder = Path(root) / study_name
    return folder / "quick" if quick else folder


# ------------------------------------------------------------------------------- one run (worker)

def _run_one(study_ref: str | Study, fields: dict[str, Any]) -> dict[str, Any]:
    """Execute one config in a worker; never raises for the study's errors."""
    study = load_study(study_ref) if isinstance(study_ref, str) else study_ref
    _pin_numba_to_one_thread()
    config = study.config(**fields)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    status, metrics, error, trace = _outcome(study, config)
    return {"status": status, "metrics": metrics, "error": error, "traceback": trace,
            "seconds": time.perf_counter() - start, "started_at": started_at}


def _pin_numba_to_one_thread() -> None:
    # Pool workers get NUMBA_NUM_THREADS=1 in their environment; this covers Dask workers that
    # were started elsewhere (it applies to the calling thread only).
    numba = sys.modules.get("numba")
    if hasattr(numba, "set_num_threads") and numba.get_num_threads() != 1:
        numba.set_num_threads(1)


def _outcome(study: Study, config: Any) -> tuple[str, dict, str, str]:
    """(status, metrics, one-line error, traceback) of ``study.run(config)``."""
    try:
        try:
            returned = study.run(config)
        except Diverged as exc:
            return "diverged", _check_metrics(study, exc.metrics), "", ""
        if not isinstance(returned, Mapping):
            raise TypeError(f"run returned {type(returned).__name__}, expected a dict of metrics")
        returned = dict(returned)
        flagged = bool(returned.pop("diverged", False))
        metrics = _check_metrics(study, returned)
    except Exception as exc:
        return "failed", {}, _one_line(f"{type(exc).__name__}: {exc}"), traceback.format_exc()
    finite = all(math.isfinite(v) for v in metrics.values())
    return ("diverged" if flagged or not finite else "ok"), metrics, "", ""


def _check_metrics(study: Study, metrics: Mapping[str, Any]) -> dict[str, int | float]:
    undeclared = set(metrics) - set(study.metrics)
    if undeclared:
        raise ValueError(f"run returned undeclared metrics {sorted(undeclared)}; "
                         f"the study declares {list(study.metrics)}")
    checked = {}
    for name, value in metrics.items():
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            checked[name] = int(value)
        elif isinstance(value, numbers.Real):
            checked[name] = float(value)
        else:
            raise TypeError(f"metric {name!r} must be a real number, got {value!r}")
    return checked


def _one_line(text: str) -> str:
    flat = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[:MAX_ERROR_CHARS - 1] + "…"


# -------------------------------------------------------------------------------------- runs.csv

class RunLog:
    """runs.csv: a fixed header, then one whole, fsync-ed line per finished run (parent only)."""

    def __init__(self, path: Path, study: Study):
        self.path = Path(path)
        self.study = study
        self.columns = study.columns
        self.key_width = len(study.field_names)
        self.lines: list[bytes] = []            # data lines as on disk, with their b"\n"
        self.status: dict[tuple[str, ...], str] = {}

    def open(self) -> None:
        """Create the file or read it back (checked by ``read_runs_file``); cut a torn last
        line."""
        if not self.path.exists():
            self._rewrite([])
            return
        runs = read_runs_file(self.path, self.study, repair=True)
        if runs.torn:
            with open(self.path, "r+b") as f:
                f.truncate(runs.size)
                os.fsync(f.fileno())
        if not runs.size:                       # nothing left but a torn header
            self._rewrite([])
            return
        status = self.columns.index("status")
        for line, cells in zip(runs.lines, runs.rows):
            self.lines.append(line)
            self.status[tuple(cells[:self.key_width])] = cells[status]

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one whole line; if the write fails (disk full), cut what it wrote."""
        line = _format_line([row.get(c) for c in self.columns])
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            raise _write_error(f"cannot append a run to {self.path}", exc,
                               "the runs recorded before it are intact") from None
        self.lines.append(line)
        self.status[tuple(_parse_line(line)[:self.key_width])] = row["status"]

    def drop(self, keys: set[tuple[str, ...]]) -> None:
        """Remove the rows of these configs (temp file + atomic rename; other lines kept as is)."""
        kept = [line for line in self.lines
                if tuple(_parse_line(line)[:self.key_width]) not in keys]
        self._rewrite(kept)
        self.lines = kept
        for key in keys:
            self.status.pop(key, None)

    def _rewrite(self, lines: list[bytes]) -> None:
        _write_atomically(self.path, b"".join([_format_line(self.columns), *lines]))


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole: a temp file, fsync, rename. If that fails (disk
    full), ``path`` is as it was and the temp file is removed."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            raise _write_error(f"cannot write {path}", exc, "it is unchanged") from None
        raise
    _fsync_dir(path.parent)


def _write_error(action: str, exc: OSError, state: str = "") -> SweepError:
    """One line for a failed write: what failed on which file, what was kept, what to do."""
    text = f"{action}: {exc.strerror or exc}" + (f" ({state})" if state else "")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        text += "; free some space, then run the same command again"
    return SweepError(text)


@dataclasses.dataclass
class RunsFile:
    """runs.csv as read and checked by ``read_runs_file``."""

    lines: list[bytes]           # the data lines as on disk, each with its b"\n"
    rows: list[list[str]]        # their cells
    size: int                    # bytes of the header and the whole lines
    torn: int                    # bytes of a torn last line that were left out (0: none)


def read_runs_file(path: Path, study: Study, *, repair: bool = False) -> RunsFile:
    """Read runs.csv and check every line; the one reader of ``normkit run`` and ``table``.

    A damaged line (not UTF-8, a wrong number of fields, an unknown status, a metric or
    ``seconds`` that is not a number, a non-finite metric in an ok row) raises SweepError
    naming the file and the line, so no table is built from it. A last line without its line
    break, left by a write that was cut short, is left out with a warning (``repair``: the
    caller cuts it off the file).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SweepError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise SweepError(f"{path}, line 1: the file is empty, not even a header line; remove "
                         "it to start over")
    size = data.rfind(b"\n") + 1
    if size < len(data):
        action = "cutting it off" if repair else "leaving it out (`normkit run` cuts it off)"
        log.warning("%s: a torn last line (%d bytes) left by an interrupted write; %s",
                    path, len(data) - size, action)
    lines = data[:size].splitlines(keepends=True)
    if not lines:
        return RunsFile([], [], 0, len(data))
    header = _parse_line(lines[0], path, 1)
    if tuple(header) != study.columns:
        raise SweepError(
            f"{path} has columns {header} but the study now writes {list(study.columns)}: "
            "its config fields or metrics changed. Move the old file away to start over.")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = _parse_line(line, path, number)
        problem = _row_problem(study, cells)
        if problem:
            raise SweepError(f"{path}, line {number}: {problem}; fix or remove that line "
                             "(a removed run is redone by the next `normkit run`)")
        rows.append(cells)
    return RunsFile(lines[1:], rows, size, len(data) - size)


def _row_problem(study: Study, cells: list[str]) -> str:
    """What is wrong with a data line's cells, or "" if nothing."""
    if len(cells) != len(study.columns):
        return f"{len(cells)} fields, expected {len(study.columns)}"
    row = dict(zip(study.columns, cells))
    if row["status"] not in STATUSES:
        return f"status {row['status']!r} is not one of {', '.join(STATUSES)}"
    for name in (*study.metrics, "seconds"):
        try:
            value = _number(row[name])
        except ValueError:
            return f"{name} {row[name]!r} is not a number"
        finite_or_empty = math.isfinite(value) or not row[name]
        if row["status"] == "ok" and name in study.metrics and not finite_or_empty:
            return f"{name} is {row[name]!r} in an ok run (a non-finite metric means diverged)"
    return ""


def _number(cell: str) -> float:
    """A metric or ``seconds`` cell as a float; empty (not returned by the run) -> NaN."""
    return float(cell) if cell else math.nan


def _format_line(values: Sequence[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        "" if v is None else v if isinstance(v, str) else _cell(v) for v in values)
    return buffer.getvalue().encode("utf-8")


def _parse_line(line: bytes, path: Path | None = None, number: int = 0) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SweepError(f"{path}, line {number}: not UTF-8 text (byte {line[exc.start]:#04x} "
                         f"at column {exc.start + 1}); fix or remove that line") from None
    return next(csv.reader([text.rstrip("\n")]), [])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):   # not every platform lets a directory be fsync-ed
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for the sweep; the OS releases it if the process dies."""
    try:
        import fcntl
    except ImportError:            # no flock (Windows): no protection against a second sweep
        yield
        return
    with open(folder / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is writing to {folder} right now") from None
        yield


PROBE_BYTES = 64 * 1024   # room a sweep needs before its first run: rows, errors.log, tables


def _prepare_dir(folder: Path) -> None:
    """Create the results folder and write a probe, so that a read-only folder or a full disk
    is found before a run is spent, not when its result is appended."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, bytes(PROBE_BYTES))
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as exc:
        raise _write_error(f"cannot write to {folder}", exc) from None


# ------------------------------------------------------------------------------------ provenance

def git_revision(folder: str | os.PathLike | None = None) -> str:
    """``git rev-parse --short HEAD``, with ``-dirty`` if tracked files changed; else "unknown"."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(folder or "."), *args],
                              capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _normkit_version() -> str:
    from normkit import __version__
    return __version__


# ---------------------------------------------------------------------------------- executors

def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """Single-threaded numerics in every worker started while this is active."""
    saved = {name: os.environ.get(name) for name in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def open_executor(jobs: int | None = None, scheduler: str | None = None,
                  connect_timeout: float = 10.0) -> Iterator[cf.Executor]:
    """A ``concurrent.futures`` executor: local processes, or a Dask cluster's.

    scheduler: None -> ``ProcessPoolExecutor(jobs)`` (spawned workers); "local" -> a new Dask
    ``LocalCluster`` with ``jobs`` single-threaded workers; an address -> that Dask scheduler
    (``jobs`` is then ignored: the cluster has the workers it has).
    """
    jobs = default_jobs() if jobs is None else jobs
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    with _worker_environment():
        if scheduler is None:
            import multiprocessing
            pool = _LocalPool(jobs, mp_context=multiprocessing.get_context("spawn"),
                              initializer=_die_with_parent, initargs=(os.getpid(),))
            with _shut_down(pool):
                yield pool
            return
        with _dask_client(jobs, scheduler, connect_timeout) as client:
            executor = client.get_executor(pure=False)
            with _shut_down(executor):
                yield executor


class _LocalPool(cf.ProcessPoolExecutor):
    """open_executor's pool: on an error its workers are terminated (``_shut_down``), so its
    futures are not cancelled first: Python 3.11's pool then fails every pending future, which
    raises in its manager thread on a cancelled one."""


PARENT_POLL_SECONDS = 0.5


def _die_with_parent(parent_pid: int) -> None:
    """Pool worker initializer: exit as soon as the sweep's process is gone.

    A parent killed by SIGKILL or the OOM killer cannot stop its workers, and orphans would run
    on for the rest of their training runs. A daemon thread polls ``os.getppid()``: portable, and
    unlike Linux's parent-death signal it does not tie the worker to the parent *thread* that
    happened to spawn it (a pool shared by sweeps run in threads would lose workers).
    """
    if os.getppid() != parent_pid:      # the parent died while this worker was starting
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="normkit-watch-parent").start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:    # reparented (to init or a subreaper) once it dies
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


@contextlib.contextmanager
def _shut_down(executor: cf.Executor) -> Iterator[None]:
    """Shut the executor down; on an exception (Ctrl-C, SIGTERM, a full disk) stop the local
    workers at once instead of waiting for runs that can no longer be recorded."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            if isinstance(executor, _LocalPool):
                _terminate_workers(executor)
            else:
                executor.shutdown(wait=False)
        raise
    executor.shutdown(wait=True)


def _terminate_workers(pool: cf.ProcessPoolExecutor) -> None:
    if hasattr(pool, "terminate_workers"):      # Python >= 3.14
        pool.terminate_workers()
        return
    for worker in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            worker.terminate()
    pool.shutdown(wait=True)    # the pool fails its pending futures and joins its threads


@contextlib.contextmanager
def _dask_client(jobs: int, scheduler: str, connect_timeout: float) -> Iterator[Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SweepError("--scheduler needs Dask: pip install 'normkit[dask]'") from None
    if scheduler == "local":
        with LocalCluster(n_workers=jobs, threads_per_worker=1, dashboard_address=None,
                          processes=True) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=connect_timeout)
    except Exception as exc:   # refused, timed out, bad address, or not a Dask scheduler at all
        message = _one_line(f"{type(exc).__name__}: {exc}")
        raise SweepError(f"cannot reach the Dask scheduler at {scheduler}: {message}") from None
    with client:
        yield client


# ------------------------------------------------------------------------------------- the sweep

@dataclasses.dataclass
class SweepReport:
    """What a sweep did; ``exit_code`` is 1 if any run of the grid failed or was left undone."""

    study: str
    directory: Path
    total: int                 # configs in the grid
    skipped: int               # already finished (ok/diverged) or failed without --rerun-failed
    ran: int = 0
    ok: int = 0
    diverged: int = 0
    failed: int = 0            # failed runs of the grid in runs.csv, from this sweep or before
    not_done: int = 0          # lost to a crashed worker pool or a lost scheduler; rerun
    lost_to: str = ""          # why: "a worker process died", "the Dask scheduler ..."

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.not_done else 0

    def summary(self) -> str:
        text = (f"{self.study}: {self.total} runs in the grid, {self.skipped} already recorded, "
                f"{self.ran} ran now ({self.ok} ok, {self.diverged} diverged); "
                f"{self.failed} failed in {self.directory / 'runs.csv'}")
        if self.failed:
            text += " (retry them with --rerun-failed)"
        if self.not_done:
            text += f"; {self.not_done} not done ({self.lost_to}; rerun to resume)"
        return text


def run_sweep(study: Study, directory: str | os.PathLike, executor: cf.Executor | None = None,
              *, quick: bool = False, rerun_failed: bool = False, jobs: int | None = None,
              scheduler: str | None = None, connect_timeout: float = 10.0,
              progress: bool | None = None) -> SweepReport:
    """Run the grid's unfinished configs, appending each result to ``directory/runs.csv``.

    executor: any ``concurrent.futures`` executor; if None, ``open_executor(jobs, scheduler)``
    is opened only when there is something to run. progress: the tqdm bar; None -> only on a
    terminal. Local workers are spawned: a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        _prepare_dir(directory)
        with _exclusive(directory):
            try:
                return _sweep(study, directory, executor, quick, rerun_failed, jobs, scheduler,
                              connect_timeout, progress)
            except BaseException:
                if created:
                    _remove_unused_runs_csv(directory)
                raise
    except BaseException:      # e.g. an unreachable scheduler: leave no empty results behind
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _remove_unused_runs_csv(directory: Path) -> None:
    """Remove runs.csv and .lock of a new folder if no run was recorded in it (lock held)."""
    runs = directory / "runs.csv"
    with contextlib.suppress(OSError):
        if runs.exists() and runs.read_bytes().count(b"\n") > 1:
            return
        for path in (runs, directory / ".lock"):
            path.unlink(missing_ok=True)


def _sweep(study: Study, directory: Path, executor: cf.Executor | None, quick: bool,
           rerun_failed: bool, jobs: int | None, scheduler: str | None, connect_timeout: float,
           progress: bool | None) -> SweepReport:
    """run_sweep, once the folder is locked."""
    configs = study.configs(quick)
    runs = RunLog(directory / "runs.csv", study)
    runs.open()
    keys = [config_key(c) for c in configs]
    if rerun_failed:
        retry = {k for k in keys if runs.status.get(k, "ok") not in DONE_STATUSES}
        if retry:
            log.info("%s: retrying %d failed runs", study.name, len(retry))
            runs.drop(retry)
    todo = [c for c, k in zip(configs, keys) if k not in runs.status]
    report = SweepReport(study.name, directory, total=len(configs),
                         skipped=len(configs) - len(todo))
    if todo:
        shown_fields = _varying_fields(configs) or ["seed"]
        with contextlib.ExitStack() as stack:
            if executor is None:
                executor = stack.enter_context(open_executor(jobs, scheduler,
                                                             connect_timeout))
            _execute(study, todo, runs, executor, report, progress, shown_fields)
    report.failed = sum(runs.status.get(k) not in (None, *DONE_STATUSES) for k in keys)
    if not report.not_done:
        os.utime(runs.path)   # "checked against the current grid now" (for make)
    return report


def _execute(study: Study, todo: list, runs: RunLog, executor: cf.Executor,
             report: SweepReport, progress: bool | None, shown_fields: list[str]) -> None:
    ref = str(study.source) if study.source else study
    provenance = {"normkit_version": _normkit_version(),
                  "git_rev": git_revision(study.source.parent if study.source else None)}
    futures = {executor.submit(_run_one, ref, config_fields(c)): c for c in todo}
    try:
        _collect(study, futures, provenance, runs, report, progress, shown_fields)
    except BaseException:             # Ctrl-C, SIGTERM, a full disk: runs in flight are lost
        if not isinstance(executor, _LocalPool):    # whose workers are terminated instead
            for future in futures:
                future.cancel()
        raise


def _collect(study: Study, futures: dict, provenance: dict, runs: RunLog, report: SweepReport,
             progress: bool | None, shown_fields: list[str]) -> None:
    """Record each run the moment its future completes."""
    from tqdm import tqdm

    bar = tqdm(total=report.total, initial=report.skipped, unit="run", desc=study.name,
               disable=None if progress is None else not progress, file=sys.stderr)
    with bar:
        for future in cf.as_completed(futures):
            config = futures[future]
            if future.cancelled():   # not by this sweep: Dask cancels them when it loses its
                _not_done(study, report, "the Dask scheduler was lost or cancelled them", "")
                continue             # scheduler (or a client cancels them)
            try:
                result = future.result()
            except cf.BrokenExecutor as exc:
                _not_done(study, report, "a worker process died", f" ({exc})")
                continue
            except Exception as exc:   # outside run(): importing the study, Dask KilledWorker
                result = {"status": "failed", "metrics": {}, "traceback": "", "seconds": math.nan,
                          "error": _one_line(f"{type(exc).__name__}: {exc} (outside run: in the "
                                             "worker or the executor)"), "started_at": ""}
            _record(study, config, result, provenance, runs, report)
            bar.update()
            _log_run(report, config, result, shown_fields)


def _not_done(study: Study, report: SweepReport, why: str, detail: str) -> None:
    report.not_done += 1
    if report.not_done == 1:
        report.lost_to = why
        log.error("%s: %s%s; the runs not recorded yet are left for the next sweep",
                  study.name, why, detail)


def _record(study: Study, config: Any, result: dict, provenance: dict, runs: RunLog,
            report: SweepReport) -> None:
    row = {**config_fields(config), **result["metrics"], **provenance,
           "status": result["status"], "error": result["error"],
           "seconds": round(result["seconds"], 4), "started_at": result["started_at"]}
    runs.append(row)
    report.ran += 1
    if result["status"] in ("ok", "diverged"):
        setattr(report, result["status"], getattr(report, result["status"]) + 1)
    if result["traceback"]:
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        errors = runs.path.with_name("errors.log")
        try:
            with open(errors, "a", encoding="utf-8") as f:
                f.write(f"--- {stamp} {study.name} {config!r}\n{result['traceback']}\n")
        except OSError as exc:
            raise _write_error(f"cannot append a traceback to {errors}", exc,
                               f"the run is recorded in {runs.path}") from None


def _log_run(report: SweepReport, config: Any, result: dict, shown: list[str]) -> None:
    fields = " ".join(f"{name}={getattr(config, name)}" for name in shown)
    if result["status"] == "failed":
        detail = result["error"]
    else:
        detail = " ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
    finished = report.skipped + report.ran
    log.info("[%*d/%d] %-8s %6.2fs  %s | %s", len(str(report.total)), finished, report.total,
             result["status"], result["seconds"], fields, detail)


def _varying_fields(configs: list) -> list[str]:
    """The config fields that take more than one value in these configs."""
    if not configs:
        return []
    names = [f.name for f in dataclasses.fields(configs[0])]
    return [n for n in names if len({_cell(getattr(c, n)) for c in configs}) > 1]


# ------------------------------------------------------------------------------------ summaries

def read_runs(study: Study, directory: str | os.PathLike, *,
              quick: bool = False) -> tuple[Any, int]:
    """The grid's rows of runs.csv as a DataFrame (grid order), and how many rows were left out.

    Config columns carry the grid's Python values; metrics and ``seconds`` are floats (empty or
    "nan" -> NaN); the latest row of a config wins. Rows of configs not in the grid are left out.
    """
    import pandas as pd

    path = Path(directory) / "runs.csv"
    if not path.exists():
        raise SweepError(f"no runs yet for study {study.name!r}: {path} does not exist")
    grid = {config_key(c): (i, c) for i, c in enumerate(study.configs(quick))}
    latest: dict[int, list[str]] = {}           # grid position -> cells of its latest row
    left_out = 0
    for cells in read_runs_file(path, study).rows:
        position = grid.get(tuple(cells[:len(study.field_names)]), (-1, None))[0]
        if position < 0:
            left_out += 1
        else:
            latest[position] = cells
    configs = [grid_config for _, grid_config in sorted(grid.values(), key=lambda p: p[0])]
    positions = sorted(latest)
    fields = pd.DataFrame([config_fields(configs[i]) for i in positions],
                          columns=list(study.field_names))
    column = {name: study.columns.index(name) for name in study.columns}
    numbers = {name: [_number(latest[i][column[name]]) for i in positions]
               for name in (*study.metrics, "seconds")}
    texts = {name: pd.Series([latest[i][column[name]] for i in positions], dtype=str)
             for name in PROVENANCE_COLUMNS if name != "seconds"}
    # one concat, not a column at a time: a study may have hundreds of metric columns
    frame = pd.concat([fields, pd.DataFrame({**numbers, **texts}, index=fields.index)], axis=1)
    return frame[list(study.columns)], left_out


def summarize(study: Study, directory: str | os.PathLike, *, quick: bool = False) -> list[Path]:
    """Write table.md, table.csv and the study's figures (``<name>.png``); return their paths.

    A ``tables`` hook returning ``{title: DataFrame}`` gets a section per title in table.md and
    one ``table_<title>.csv`` each (the title with anything but letters, digits, ``_.-`` as ``_``).
    """
    directory = Path(directory)
    frame, left_out = read_runs(study, directory, quick=quick)
    if frame.empty:
        named = {}
    elif study.tables:
        tables = study.tables(frame)
        named = tables if isinstance(tables, Mapping) else {"": tables}
    else:
        named = {"": summary_table(frame, study, quick=quick)}
    written = []
    for name, table in named.items():
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")
        csv_path = directory / (f"table_{slug}.csv" if name else "table.csv")
        long = numeric_table(table)
        text = long.to_csv(index=False) if long is not None else table.to_csv(
            index=not isinstance(table.index, _range_index()))
        _write_atomically(csv_path, text.encode("utf-8"))
        written.append(csv_path)
    if study.curves and not frame.empty:
        curves = curves_table(frame, study, quick=quick)
        _write_atomically(directory / "curves.csv", curves.to_csv(index=False).encode("utf-8"))
        written.append(directory / "curves.csv")
    markdown = _table_document(study, frame, named, left_out, quick)
    md_path = directory / "table.md"
    _write_atomically(md_path, markdown.encode("utf-8"))
    written.insert(0, md_path)
    if not frame.empty:
        written += _write_figures(study, frame, directory)
        written += _write_reports(study, frame, directory)
    return written


def run_id(config_fields_: Mapping[str, Any]) -> str:
    """A run's id in curves.csv: 10 hex digits of a hash of its config fields' values."""
    text = "\x1f".join(f"{k}={v}" for k, v in config_fields_.items())
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def curves_table(frame: Any, study: Study, *, quick: bool = False) -> Any:
    """The study's curves (``Study.curves``) in long format: ``run`` (:func:`run_id`), the
    grid's varying fields and ``seed``, ``status``, ``curve``, ``step``, ``value``; one row
    per recorded value (ok and diverged runs; steps a run did not reach are left out)."""
    import pandas as pd

    varying = _varying_fields(study.configs(quick))
    varying += ["seed"] * ("seed" not in varying)
    ids = [run_id(row) for row in frame[list(study.field_names)].to_dict("records")]
    parts = []
    for prefix, name in study.curves.items():
        columns = [m for m in study.metrics if re.fullmatch(re.escape(prefix) + r"\d+", m)]
        wide = frame[varying + ["status"] + columns].assign(run=ids)
        long = wide.melt(id_vars=["run", *varying, "status"], value_vars=columns,
                         var_name="step", value_name="value").dropna(subset=["value"])
        parts.append(long.assign(curve=name, step=long["step"].str[len(prefix):].astype(int)))
    columns = ["run", *varying, "status", "curve", "step", "value"]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def _write_reports(study: Study, frame: Any, directory: Path) -> list[Path]:
    """The ``reports`` hook's ``{file name: text}`` (e.g. a README.md with the findings), each
    written whole into the results folder."""
    if study.reports is None:
        return []
    written = []
    for name, text in study.reports(frame).items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise SweepError(f"{study.name}: reports must name plain files in the results "
                             f"folder (letters, digits, '_.-'), got {name!r}")
        if not isinstance(text, str):
            raise SweepError(f"{study.name}: report {name!r} must be text, got "
                             f"{type(text).__name__}")
        path = directory / name
        _write_atomically(path, text.encode("utf-8"))
        written.append(path)
    return written


def _range_index() -> type:
    import pandas as pd
    return pd.RangeIndex


def _table_document(study: Study, frame: Any, tables: Mapping[str, Any], left_out: int,
                    quick: bool) -> str:
    counts = frame["status"].value_counts()
    grid_size = len(study.configs(quick))
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    lines = [f"# {study.name} ({'quick' if quick else 'full'} grid)", ""]
    if study.description:
        lines += [study.description, ""]
    lines += [f"{len(frame)} of {grid_size} runs recorded: {status}.  ",
              f"normkit {', '.join(sorted(set(frame['normkit_version']))) or '-'}, "
              f"git {', '.join(sorted(set(frame['git_rev']))) or '-'}.  ",
              "Mean ± std over seeds of the ok runs; diverged and failed runs are counted, "
              "not averaged."]
    fixed = _fixed_fields(study, quick)
    if fixed:
        lines[-1] += "  \nFixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + "."
    if left_out:
        lines += ["", f"({left_out} rows of runs.csv are not in the current grid and are left "
                      "out.)"]
    for name, table in tables.items():
        lines += [""] + ([f"## {name}", ""] if name else []) + [markdown_table(table)]
    return "\n".join(lines) + "\n"


def _fixed_fields(study: Study, quick: bool) -> dict[str, Any]:
    configs = study.configs(quick)
    varying = set(_varying_fields(configs))
    return {k: v for k, v in config_fields(configs[0]).items() if k not in varying | {"seed"}}


def _write_figures(study: Study, frame: Any, directory: Path) -> list[Path]:
    if study.figures is None:
        return []
    try:
        import matplotlib
    except ImportError:
        log.warning("%s: figures skipped: matplotlib is not installed "
                    "(pip install 'normkit[plots]')", study.name)
        return []
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    written = []
    for name, figure in study.figures(frame).items():
        path = directory / f"{name}.png"
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=120, bbox_inches="tight")
        _write_atomically(path, image.getvalue())
        written.append(path)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(figure)
    return written


# ---------------------------------------------------------------------------- table helpers

def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``"0.9123 ± 0.0041"``; just the mean if std is NaN (one seed); "—" if there is no mean."""
    if mean is None or math.isnan(mean):
        return "—"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.2g}"


class Stat(str):
    """A table cell: the text shown in table.md ("0.91 ± 0.01 (2 div)") carrying the numbers
    behind it, so the table's CSV gets numeric ``mean``, ``std``, ``n`` (ok runs), ``diverged``
    and ``failed`` columns (:func:`numeric_table`) instead of the text."""

    mean: float
    std: float
    n: int
    diverged: int
    failed: int
    digits: int

    def __new__(cls, mean: float, std: float, n: int, diverged: int = 0, failed: int = 0,
                digits: int = 4) -> "Stat":
        diverged, failed = int(diverged), int(failed)
        notes = [f"{diverged} div"] * bool(diverged) + [f"{failed} failed"] * bool(failed)
        text = format_mean_std(mean, std, digits) + (f" ({', '.join(notes)})" if notes else "")
        cell = super().__new__(cls, text)
        cell.mean, cell.std, cell.n = float(mean), float(std), int(n)
        cell.diverged, cell.failed, cell.digits = int(diverged), int(failed), digits
        return cell

    @classmethod
    def of(cls, values: Iterable[float], scale: float = 1.0, digits: int = 4,
           diverged: int = 0, failed: int = 0) -> "Stat":
        """Mean and std (ddof=1; NaN for one value) of the non-NaN ``values`` times ``scale``."""
        kept = [scale * float(v) for v in values if not math.isnan(float(v))]
        n = len(kept)
        mean = math.fsum(kept) / n if n else math.nan
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / (n - 1)) if n > 1 else math.nan
        return cls(mean, std, n, diverged, failed, digits)

    def __getnewargs__(self) -> tuple:         # pickling (a table sent between processes)
        return self.mean, self.std, self.n, self.diverged, self.failed, self.digits


#: Cells that mean "nothing here" in a table: left out of its numeric CSV.
EMPTY_CELLS = frozenset({"", "—", "-"})


def _portable(value: float) -> float:
    """``value`` to 12 significant digits: NumPy's log, exp and friends take CPU-specific SIMD
    paths whose results differ in the last bits, and a table's CSV must be the same on every
    machine that computes it from the same runs.csv."""
    return float(f"{value:.12g}")


def numeric_table(table: Any) -> Any | None:
    """The long, numeric form of a table with :class:`Stat` cells, for its CSV: one row per
    cell, the row labels, the column label(s) (named by the table's column index, else
    ``column``), then ``mean, std`` (to 12 significant digits, :func:`_portable`), ``n,
    diverged, failed`` and ``note`` (a cell that is text, such as "n/a", or a plain number such
    as a published reference, which goes into ``mean``). Empty cells ("—") are left out. None
    if the table has no Stat cell."""
    import pandas as pd

    flat = table if (isinstance(table.index, pd.RangeIndex) and table.index.name is None) \
        else table.reset_index()
    stat_columns = [c for c in flat.columns
                    if any(isinstance(v, Stat) for v in flat[c].tolist())]
    if not stat_columns:
        return None
    label_columns = [c for c in flat.columns if c not in stat_columns]
    names = list(table.columns.names)
    if any(n is None for n in names) or len(set(names)) != len(names) \
            or set(names) & {str(c) for c in label_columns}:
        names = ["column"]
    records = []
    for _, row in flat.iterrows():
        labels = {" · ".join(map(str, c)) if isinstance(c, tuple) else str(c): row[c]
                  for c in label_columns}
        for column in stat_columns:
            cell = row[column]
            if len(names) > 1:
                where = dict(zip(names, column))
            else:
                where = {names[0]: " · ".join(map(str, column)) if isinstance(column, tuple)
                         else column}
            entry = dict(mean=math.nan, std=math.nan, n=math.nan, diverged=math.nan,
                         failed=math.nan, note="")
            if isinstance(cell, Stat):
                entry.update(mean=_portable(cell.mean), std=_portable(cell.std), n=cell.n,
                             diverged=cell.diverged, failed=cell.failed)
            elif isinstance(cell, numbers.Real) and not isinstance(cell, bool):
                if math.isnan(float(cell)):
                    continue
                entry["mean"] = float(cell)
            elif cell is None or str(cell).strip() in EMPTY_CELLS:
                continue
            else:
                try:
                    entry["mean"] = float(str(cell).rstrip("%").strip())
                except ValueError:
                    entry["note"] = str(cell)
            records.append({**labels, **where, **entry})
    long = pd.DataFrame(records)
    for column in ("n", "diverged", "failed"):
        if column in long:
            long[column] = long[column].astype("Int64")
    return long


def _group_stats(frame: Any, by: list[str], metrics: Sequence[str]) -> Any:
    """Per group: mean and std (ddof=1) of each metric over ok runs; counts of each status."""
    ok = frame["status"] == "ok"
    values = frame[list(metrics)].where(ok, other=math.nan)
    parts = {"ok": ok, "diverged": frame["status"] == "diverged",
             "failed": frame["status"] == "failed"}
    work = values.assign(**{f"_{k}": v for k, v in parts.items()}, **{c: frame[c] for c in by})
    grouped = work.groupby(by, sort=False, dropna=False) if by else work.groupby(
        lambda _: "all", sort=False)
    stats = grouped[list(metrics)].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    counts = grouped[[f"_{k}" for k in parts]].sum().astype(int)
    counts.columns = list(parts)
    return stats.join(counts)


def summary_table(frame: Any, study: Study, *, quick: bool = False) -> Any:
    """The default table: one row per combination of the grid's varying non-seed fields."""
    by = [n for n in _varying_fields(study.configs(quick)) if n != "seed"]
    stats = _group_stats(frame, by, study.metrics)
    return stats.reset_index() if by else stats.reset_index(drop=True)


def aggregate(frame: Any, rows: str | Sequence[str], cols: str | Sequence[str], value: str,
              digits: int = 4) -> Any:
    """Pivot of ``value``: mean ± std over the ok runs of each (rows, cols) cell, as strings.

    A cell with diverged or failed runs says how many, e.g. ``"0.91 ± 0.01 (2 div)"``.
    """
    rows = [rows] if isinstance(rows, str) else list(rows)
    cols = [cols] if isinstance(cols, str) else list(cols)
    stats = _group_stats(frame, rows + cols, [value])

    def cell(r: Any) -> Stat:
        return Stat(r[f"{value}_mean"], r[f"{value}_std"], r["ok"], r["diverged"],
                    r["failed"], digits)

    cells = stats.apply(cell, axis=1)
    table = cells.unstack(cols) if cols else cells.to_frame(value)
    return table.fillna("—")


def markdown_table(table: Any) -> str:
    """A DataFrame as a GitHub markdown table (a named or multi-level index becomes columns)."""
    import pandas as pd

    if not isinstance(table.index, pd.RangeIndex) or table.index.name is not None:
        table = table.reset_index()
    header = [" · ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in table.columns]
    body = [[_markdown_cell(v) for v in row] for row in table.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(t) for t in table.dtypes]
    rule = ["---:" if n else "---" for n in numeric]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, rule, *body])


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        text = "—" if math.isnan(value) else f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def line_plot(frame: Any, x: str, y: str, hue: str | None = None, *, logx: bool = False,
              title: str | None = None) -> Any:
    """A matplotlib Figure: mean of ``y`` over the ok runs against ``x``, ± std band, per ``hue``.

    Built without pyplot (no display needed); return it from a study's ``figures`` hook.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5))
    axes = figure.add_subplot()
    groups = frame.groupby(hue, sort=False) if hue else [(None, frame)]
    for label, part in groups:
        stats = _group_stats(part, [x], [y]).sort_index()
        mean, std = stats[f"{y}_mean"], stats[f"{y}_std"].fillna(0.0)
        axes.plot(stats.index, mean, marker="o", label=None if hue is None else str(label))
        axes.fill_between(stats.index, mean - std, mean + std, alpha=0.2)
    if logx:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    if hue:
        axes.legend(title=hue)
    if title:
        axes.set_title(title)
    legends_outside(figure)
    figure.tight_layout()
    return figure


def legends_outside(figure: Any, fontsize: float = 7) -> None:
    """Move every axes' legend out of the data, to just under the axes (its x label), in
    columns; call it after drawing, before ``tight_layout``."""
    for axes in figure.axes:
        legend = axes.get_legend()
        if legend is None:
            continue
        handles = list(legend.legend_handles)
        labels = [text.get_text() for text in legend.get_texts()]
        title = legend.get_title().get_text() or None
        legend.remove()
        if not labels:
            continue
        axes.legend(handles, labels, title=title, fontsize=fontsize, title_fontsize=fontsize,
                    loc="upper center", bbox_to_anchor=(0.5, -0.27), frameon=False,
                    ncol=max(1, min(3, (len(labels) + 3) // 4)))
