"""The README's studies block, written from the results files (``normkit readme``).

The block between ``<!-- studies:begin -->`` and ``<!-- studies:end -->`` has one section per
study in ``studies/``: where its results are, how many runs they hold and their statuses, the git
revisions and normkit versions that made them, the sweep's wall time, the study's
``headline.md`` and its verdicts. Every number is computed from ``runs.csv`` and
``verdicts.csv``; nothing is typed by hand, so ``normkit readme --check`` can tell when the
README no longer says what the results say.
"""
from __future__ import annotations

import csv
import datetime as dt
import math
import os
from collections import Counter
from pathlib import Path

from normkit.sweep import STATUSES, find_studies, markdown_table

__all__ = ["BEGIN", "END", "ReadmeError", "study_order", "study_section", "study_sections",
           "studies_block", "current_block", "replace_block", "first_difference",
           "format_duration", "wall_seconds"]

BEGIN, END = "<!-- studies:begin -->", "<!-- studies:end -->"
FIRST_STUDIES = ("small_batch", "rnn", "claims")


class ReadmeError(Exception):
    """A README without the markers, or a results file that cannot be read."""


def study_order(names: list[str]) -> list[str]:
    """small_batch, rnn, claims first (those present), then the others sorted."""
    return ([n for n in FIRST_STUDIES if n in names]
            + sorted(n for n in names if n not in FIRST_STUDIES))


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ReadmeError(f"cannot read {path}: {exc}") from None


def _distinct(rows: list[dict[str, str]], column: str) -> list[str]:
    """The column's values in the order they first appear."""
    return list(dict.fromkeys(row.get(column) or "unknown" for row in rows))


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min 5 s``, ``2 h 3 min``."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def wall_seconds(rows: list[dict[str, str]], path: Path) -> float | None:
    """From the earliest ``started_at`` to the latest ``started_at + seconds``; None if no run
    recorded a start (a run lost with its worker has an empty ``started_at``)."""
    first = last = None
    for number, row in enumerate(rows, start=2):
        stamp = row.get("started_at") or ""
        if not stamp:
            continue
        try:
            start = dt.datetime.fromisoformat(stamp)
            seconds = float(row.get("seconds") or "nan")
        except ValueError:
            raise ReadmeError(f"{path}, line {number}: started_at {stamp!r} or seconds "
                              f"{row.get('seconds')!r} is not readable") from None
        if start.tzinfo is None:
            raise ReadmeError(f"{path}, line {number}: started_at {stamp!r} has no time zone")
        end = start + dt.timedelta(seconds=0.0 if math.isnan(seconds) else seconds)
        first = start if first is None or start < first else first
        last = end if last is None or end > last else last
    return None if first is None else (last - first).total_seconds()


def _runs_line(directory: Path, readme_dir: Path) -> str:
    path = directory / "runs.csv"
    rows = _read_csv(path)
    link = Path(os.path.relpath(directory / "README.md", readme_dir)).as_posix()
    counts = Counter(row.get("status") or "unknown" for row in rows)
    ordered = [s for s in STATUSES if counts[s]] + sorted(s for s in counts if s not in STATUSES)
    statuses = ", ".join(f"{counts[s]} {s}" for s in ordered)
    revisions = ", ".join(_distinct(rows, "git_rev"))
    versions = ", ".join(_distinct(rows, "normkit_version"))
    wall = wall_seconds(rows, path)
    took = ("no run recorded its start" if wall is None else
            f"{format_duration(wall)} from the first run's start to the last run's end")
    runs = f"{len(rows)} run" + ("" if len(rows) == 1 else "s")
    return (f"[{link}]({link}): {runs} ({statuses or 'none'}) at git {revisions or '-'}, "
            f"normkit {versions or '-'}; {took}.")


def _verdicts_table(path: Path) -> list[str]:
    rows = _read_csv(path)
    if not rows:
        return []
    import pandas as pd
    table = pd.DataFrame(rows, columns=["claim", "verdict", "n_min"])
    table["n_min"] = pd.to_numeric(table["n_min"], errors="coerce").astype("Int64")
    return markdown_table(table).splitlines()


def study_section(study: str, out: str | os.PathLike, readme_dir: str | os.PathLike) -> str:
    """The block's text for one study, from ``out/<study>/``."""
    directory = Path(out) / study
    if not (directory / "runs.csv").is_file():
        return (f"- `{study}`: the full-grid results are not in the repo yet; `make studies` "
                f"writes them.")
    parts = [f"### {study}", _runs_line(directory, Path(readme_dir))]
    headline = directory / "headline.md"
    if headline.is_file():
        parts.append(headline.read_text(encoding="utf-8").strip())
    table = _verdicts_table(directory / "verdicts.csv") if (directory / "verdicts.csv").is_file() \
        else []
    if table:
        parts.append("\n".join(table))
    return "\n\n".join(parts)


def study_sections(studies_dir: str | os.PathLike, out: str | os.PathLike,
                   readme_dir: str | os.PathLike) -> dict[str, str]:
    """Each study's section, in the block's order."""
    names = study_order(list(find_studies(studies_dir)))
    return {name: study_section(name, out, readme_dir) for name in names}


def studies_block(sections: dict[str, str]) -> str:
    """The text between the markers (without them)."""
    if not sections:
        return "\nNo studies in `studies/` yet.\n"
    body, previous_item = "", False
    for section in sections.values():
        item = section.startswith("- ")
        body += ("\n" if item and previous_item else "\n\n") + section
        previous_item = item
    return body + "\n\n"


def _split(text: str, path: Path) -> tuple[str, str, str]:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ReadmeError(f"{path} has no studies block: put the lines {BEGIN} and {END} "
                          "where the studies should be listed")
    return text[:begin + len(BEGIN)], text[begin + len(BEGIN):end], text[end:]


def replace_block(text: str, block: str, path: Path) -> str:
    head, _, tail = _split(text, path)
    return head + block + tail


def current_block(text: str, path: Path) -> str:
    return _split(text, path)[1]


def _normalized(text: str) -> str:
    """Without the blank lines around it and trailing spaces, which editors strip."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _starts(study: str) -> tuple[str, str]:
    """How a study's section starts: its heading, or its one line when there are no results."""
    return f"### {study}\n", f"- `{study}`:"


def first_difference(current: str, sections: dict[str, str]) -> str | None:
    """None if the block is what the sections make; else what differs, in a few words: the first
    study whose text in the block (up to where the next study's starts) is not its section."""
    if _normalized(current) == _normalized(studies_block(sections)):
        return None
    found = {}
    for name in sections:
        positions = [current.find(start) for start in _starts(name)]
        found[name] = min((p for p in positions if p >= 0), default=-1)
    ends = sorted(p for p in found.values() if p >= 0) + [len(current)]
    for name, section in sections.items():
        start = found[name]
        if start < 0:
            return f"study {name!r}"
        end = next(p for p in ends if p > start)
        if _normalized(current[start:end]) != _normalized(section):
            return f"study {name!r}"
    return "the order of the studies or the text around them"
