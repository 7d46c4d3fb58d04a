"""The ``normkit`` command: list, run and summarize studies; run the kernel benchmark.

    normkit list                          the studies in ./studies and the size of their grids
    normkit run STUDY [--quick] [--jobs N] [--scheduler ADDR|local] [--out DIR] [--rerun-failed]
    normkit table STUDY [--quick]         rewrite the tables and figures from runs.csv
    normkit bench [ARGS...]               runs benchmarks/kernels.py ARGS...
    normkit readme [--check]              rewrite (or check) README.md's studies block

Exit codes: 0 ok; 1 some runs failed (or were left undone because a worker or the Dask scheduler
died, or a study's table/figure hook failed), or ``readme --check`` found the block out of date;
2 the command could not start or go on (usage, unknown or broken study, unreachable scheduler,
unwritable folder or full disk, a damaged runs.csv or one of another shape); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). After 130 and 143 the finished runs are kept: the same
command resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from normkit import __version__
from normkit.readme import (ReadmeError, current_block, first_difference, replace_block,
                            studies_block, study_sections)
from normkit.sweep import (Study, SweepError, find_studies, load_study, results_dir, run_sweep,
                           summarize)

__all__ = ["main", "build_parser"]


class CommandError(Exception):
    """Printed as one ``normkit: ...`` line; exit code 2."""


class Terminated(BaseException):
    """SIGTERM (``kill PID``, ``timeout``), raised in the main thread the way Ctrl-C raises
    KeyboardInterrupt, so the sweep stops its workers and keeps its finished runs."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normkit", description="Run normkit's studies and benchmarks.",
        epilog="Exit codes: 0 ok, 1 some runs failed or were left undone (readme --check: "
               "the block is out of date), 2 usage, setup or "
               "data error (a damaged runs.csv, a full disk), 130 interrupted, 143 terminated "
               "(SIGTERM).")
    parser.add_argument("--version", action="version", version=f"normkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    studies = argparse.ArgumentParser(add_help=False)
    studies.add_argument("--studies-dir", type=Path, default=Path("studies"), metavar="DIR",
                         help="where the study scripts are (default: ./studies)")
    results = argparse.ArgumentParser(add_help=False)
    results.add_argument("study", metavar="STUDY", help="a study name, as in `normkit list`")
    results.add_argument("--quick", action="store_true",
                         help="the study's quick grid; results go to OUT/STUDY/quick/")
    results.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                         help="results folder (default: ./results); a study writes to DIR/STUDY/")

    commands.add_parser("list", parents=[studies], help="the studies and their grids")

    run = commands.add_parser("run", parents=[results, studies],
                              help="run a study's grid (resuming), then write its tables")
    run.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                     help="local worker processes (default: the core count); with "
                          "--scheduler local, the number of Dask workers")
    run.add_argument("--scheduler", metavar="ADDR",
                     help="run on this Dask scheduler (tcp://host:8786), or `local` to start "
                          "a LocalCluster; needs the `dask` extra")
    run.add_argument("--connect-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                     help="how long to try reaching the scheduler (default: 10)")
    run.add_argument("--rerun-failed", action="store_true",
                     help="run again the configs recorded as failed")
    run.add_argument("--no-summary", action="store_true",
                     help="only run; do not write tables and figures")

    commands.add_parser("table", parents=[results, studies],
                        help="write a study's tables and figures from its runs.csv")

    bench = commands.add_parser("bench", help="the kernel benchmark (benchmarks/kernels.py)",
                                description="Run the benchmark script; other arguments are "
                                            "passed on to it.")
    bench.add_argument("--script", type=Path, default=Path("benchmarks/kernels.py"),
                       help="the benchmark script (default: benchmarks/kernels.py)")

    readme = commands.add_parser(
        "readme", parents=[studies], help="rewrite README.md's studies block from the results",
        description="Rewrite the block between <!-- studies:begin --> and <!-- studies:end --> "
                    "from each study's runs.csv, headline.md and verdicts.csv.")
    readme.add_argument("--readme", type=Path, default=Path("README.md"), metavar="PATH",
                        help="the README to rewrite (default: ./README.md)")
    readme.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                        help="results folder (default: ./results)")
    readme.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the block differs from the results")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, passed_on = parser.parse_known_args(argv)
        if passed_on and args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    except SystemExit as exit_:     # --help, --version, or a usage error (code 2)
        return int(exit_.code or 0)
    args.passed_on = passed_on
    command = {"list": _list, "run": _run, "table": _table, "bench": _bench,
               "readme": _readme}[args.command]
    with _console_logging(), _sigterm_raises():
        try:
            return command(args)
        except (CommandError, SweepError, ReadmeError) as exc:
            print(f"normkit: {exc}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, Terminated) as exc:
            how, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted",
                                                                                 130)
            print(f"normkit: {how}; finished runs are kept in runs.csv: run the same command "
                  "again to resume", file=sys.stderr)
            return code


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread (signals can only be handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """One line per message on stderr, written around the tqdm bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("normkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


# ------------------------------------------------------------------------------------ commands

def _list(args: argparse.Namespace) -> int:
    scripts = find_studies(args.studies_dir)
    if not scripts:
        print(f"no studies in {args.studies_dir}/ (studies/README.md says how to add one)")
        return 0
    status = 0
    for name, path in scripts.items():
        try:
            study = _load(path)
        except CommandError as exc:
            print(f"{name}  ERROR: {exc}")
            status = 2
            continue
        print(f"{name}  {study.description}".rstrip())
        for label, quick in (("quick", True), ("full", False)):
            size = len(study.configs(quick))
            print(f"  {label:<5} {size:>4} runs  {_describe_grid(study, quick)}")
    return status


def _describe_grid(study: Study, quick: bool) -> str:
    spec = study.grid(quick)
    parts = [spec] if not isinstance(spec, Sequence) else spec
    return " + ".join(" x ".join(f"{name}={_values(values)}" for name, values in part.items())
                      for part in parts) or "(defaults only)"


def _values(values: object) -> str:
    values = list(values)
    shown = [str(v) for v in values[:6]] + ["..."] * (len(values) > 6)
    return "[" + ", ".join(shown) + "]"


def _run(args: argparse.Namespace) -> int:
    study = _find_study(args)
    directory = results_dir(args.out, study.name, args.quick)
    report = run_sweep(study, directory, quick=args.quick, rerun_failed=args.rerun_failed,
                       jobs=args.jobs, scheduler=args.scheduler,
                       connect_timeout=args.connect_timeout)
    print(report.summary())
    status = report.exit_code
    if not args.no_summary:
        status = max(status, _summarize(study, directory, args.quick))
    return status


def _table(args: argparse.Namespace) -> int:
    study = _find_study(args)
    directory = results_dir(args.out, study.name, args.quick)
    if not (directory / "runs.csv").exists():
        quick = " --quick" if args.quick else ""
        raise CommandError(f"no runs yet: {directory / 'runs.csv'} does not exist "
                           f"(run `normkit run {study.name}{quick}` first)")
    return _summarize(study, directory, args.quick)


def _summarize(study: Study, directory: Path, quick: bool) -> int:
    try:
        written = summarize(study, directory, quick=quick)
    except SweepError:
        raise
    except Exception as exc:      # a bug in the study's tables/figures hook
        traceback.print_exc()
        print(f"normkit: the tables or figures of study {study.name!r} failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if not args.script.is_file():
        raise CommandError(f"no benchmark yet: {args.script} does not exist")
    saved_argv = sys.argv
    sys.argv = [str(args.script), *args.passed_on]
    try:
        runpy.run_path(str(args.script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def _readme(args: argparse.Namespace) -> int:
    try:
        text = args.readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {args.readme}: {exc.strerror or exc}") from None
    sections = study_sections(args.studies_dir, args.out, args.readme.parent)
    if args.check:
        differs = first_difference(current_block(text, args.readme), sections)
        if differs:
            print(f"normkit: {args.readme}'s studies block differs from the results for "
                  f"{differs}: run `normkit readme`", file=sys.stderr)
            return 1
        return 0
    updated = replace_block(text, studies_block(sections), args.readme)
    if updated != text:
        try:
            args.readme.write_text(updated, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot write {args.readme}: {exc.strerror or exc}") from None
    print(f"{args.readme}: studies block {'rewritten' if updated != text else 'up to date'}")
    return 0


# ------------------------------------------------------------------------------------- helpers

def _find_study(args: argparse.Namespace) -> Study:
    scripts = find_studies(args.studies_dir)
    if args.study not in scripts:
        known = ", ".join(scripts) or "none"
        raise CommandError(f"unknown study {args.study!r} (studies in {args.studies_dir}/: "
                           f"{known})")
    return _load(scripts[args.study])


def _load(path: Path) -> Study:
    try:
        return load_study(path)
    except SweepError as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:
        traceback.print_exc()
        raise CommandError(f"study script {path} failed to import: "
                           f"{type(exc).__name__}: {exc}") from None
