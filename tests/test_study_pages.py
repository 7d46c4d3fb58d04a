"""Generated pages state only numbers computed from their runs: each study's reports hook
renders its pages from synthetic runs.csv-like frames (the full grid's configs, random
metrics), and every number in the text must be one the frame implies.

A number counts as implied when it changes with the runs (the same line rendered from other
metrics or from fewer runs has another number in its place), or is a config value or a column
name of the frame,
or a named constant of the study's modules (a cited paper's number, a setup constant), a small
integer (section numbers, counts) or a year of a citation. A number typed into the prose by
hand is none of these and fails the test.
Also: no page refers to issue trackers or to files outside the repository."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normkit import sweep

STUDIES = Path(__file__).parent.parent / "studies"
NUMBER = re.compile(r"(?<![\d.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
HELPERS = {"small_batch": [], "claims": ["_claims_experiments", "_claims_report",
                                          "_claims_measure"],
           "rnn": ["_rnn_experiments", "_rnn_report"]}


def synthetic_frame(study, seed: int, drop_seed: int | None = None) -> pd.DataFrame:
    """The full grid's configs, each an ok run with random metrics in (0.05, 0.95)."""
    rng = np.random.default_rng(seed)
    configs = [c for c in study.configs(quick=False) if c.seed != drop_seed]
    fields = pd.DataFrame([vars(c) for c in configs])
    metrics = pd.DataFrame(rng.uniform(0.05, 0.95, (len(fields), len(study.metrics))),
                           columns=list(study.metrics))
    frame = pd.concat([fields, metrics], axis=1)
    return frame.assign(status="ok", error="", seconds=rng.uniform(1, 2, len(frame)),
                        normkit_version="0", git_rev="0", started_at="0")


CITATION = re.compile(r"(?:Sec\.|Section|Table|Fig\.|Eq\.)\s*\d+(?:\.\d+)*[a-z]?"
                      r"(?:\s*(?:and|,)\s*\d+(?:\.\d+)*)*")


def _numbers(text: str) -> set[str]:
    return {token.lstrip("+-") for token in NUMBER.findall(text)}


def _formats(value) -> set[str]:
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        return _numbers(str(value))
    if isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value):
        value = float(value)
        out = {f"{value:g}", f"{value:.1f}", f"{value:.2f}", f"{value:.3f}", f"{value:.3g}",
               repr(value)}
        if value == int(value):
            out.add(str(int(value)))
        for scaled in (100 * value, 1000 * value):
            out |= {f"{scaled:g}", f"{scaled:.1f}"}
        return {t.lstrip("+-") for t in out}
    return set()


def _constants(module) -> set[str]:
    """The numbers of the module's upper-case constants (nested containers included)."""
    found: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (list, tuple, set, frozenset, range)):
            for v in value:
                walk(v)
        else:
            found.update(_formats(value))

    for name, value in vars(module).items():
        if name.isupper():
            walk(value)
    return found


def allowed(study, frame: pd.DataFrame) -> set[str]:
    numbers = {str(i) for i in range(11)} | {str(year) for year in range(1990, 2031)}
    for column in study.field_names:
        for value in frame[column].dropna().unique():
            numbers |= _formats(value)
    for metric in study.metrics:                    # runs.csv's column names: grad_t63, ...
        numbers |= {str(int(n)) for n in NUMBER.findall(metric) if n.isdigit()}
    modules = [sys.modules[study.run.__module__]]
    modules += [sys.modules.get(name) or __import__(name) for name in HELPERS[study.name]]
    for module in modules:
        numbers |= _constants(module)
    return numbers


def pages(study, frame: pd.DataFrame) -> dict[str, str]:
    return {name: text for name, text in study.reports(frame).items() if name.endswith(".md")}


@pytest.mark.parametrize("name", ["small_batch", "claims", "rnn"])
def test_generated_pages_state_only_numbers_the_runs_imply(name):
    study = sweep.load_study(STUDIES / f"{name}.py")
    frame = synthetic_frame(study, seed=1)
    rendered = pages(study, frame)
    other = pages(study, synthetic_frame(study, seed=2))
    fewer = pages(study, synthetic_frame(study, seed=3, drop_seed=0))
    assert rendered and "README.md" in rendered
    permitted = allowed(study, frame)
    for page, text in rendered.items():
        unexplained = sorted(constant_numbers(text, [other.get(page, ""), fewer.get(page, "")])
                             - permitted, key=float)
        assert not unexplained, f"{name}/{page}: numbers not computed from the runs: {unexplained}"


def constant_numbers(text: str, others: list[str]) -> set[str]:
    """The numbers of ``text`` that stay in place in every other rendering: for each line, the
    positions whose number is the same in every line of the other pages with the same wording
    (numbers masked). A line whose wording no other page has is data-dependent: skipped."""
    def lines_by_skeleton(page: str) -> dict[str, list[list[str]]]:
        out: dict[str, list[list[str]]] = {}
        for line in page.splitlines():
            out.setdefault(NUMBER.sub("#", line), []).append(NUMBER.findall(line))
        return out

    indexed = [lines_by_skeleton(CITATION.sub("", page)) for page in others]
    constant = set()
    for line in CITATION.sub("", text).splitlines():
        numbers = NUMBER.findall(line)
        matches = [index.get(NUMBER.sub("#", line)) for index in indexed]
        if not numbers or not all(matches):
            continue
        for position, number in enumerate(numbers):
            if all(row[position] == number for rows in matches for row in rows):
                constant.add(number.lstrip("+-"))
    return constant


@pytest.mark.parametrize("name", ["small_batch", "claims", "rnn"])
def test_generated_pages_cite_papers_not_trackers_or_outside_files(name):
    study = sweep.load_study(STUDIES / f"{name}.py")
    for page, text in study.reports(synthetic_frame(study, seed=1)).items():
        for word in ("FACTS.md", "the issue", "issue ", "as far as I recall"):
            assert word not in text, f"{name}/{page} mentions {word!r}"


@pytest.mark.parametrize("name", ["small_batch", "claims", "rnn"])
def test_verdicts_csv_from_five_seeds_has_a_verdict_per_claim(name):
    study = sweep.load_study(STUDIES / f"{name}.py")
    written = study.reports(synthetic_frame(study, seed=1))
    verdicts = pd.read_csv(__import__("io").StringIO(written["verdicts.csv"]))
    assert list(verdicts.columns) == ["study", "claim", "verdict", "n_min", "numbers"]
    assert set(verdicts["study"]) == {name}
    assert set(verdicts["verdict"]) <= {"holds", "does not hold", "mixed", "undetermined"}
    determined = verdicts[verdicts["verdict"] != "undetermined"]
    assert len(determined) and (determined["n_min"] >= 3).all()
