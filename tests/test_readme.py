"""`normkit readme`: the README's studies block is written from the results files, and checked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from normkit.cli import main
from normkit.readme import BEGIN, END, format_duration

ROOT = Path(__file__).resolve().parents[1]


def test_repo_readme_block_matches_the_repo_results(capsys):
    code = main(["readme", "--check", "--readme", str(ROOT / "README.md"),
                 "--out", str(ROOT / "results"), "--studies-dir", str(ROOT / "studies")])
    assert code == 0, capsys.readouterr().err
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1


RUNS = """\
batch_size,seed,test_error,status,error,seconds,normkit_version,git_rev,started_at
1,0,0.1,ok,,30.5,0.1.0,abc1234,2026-12-01T10:00:00+00:00
2,0,0.2,ok,,100,0.1.0,abc1234,2026-12-01T10:00:10+00:00
4,0,,diverged,"loss is nan, at epoch 2",12.25,0.1.0,def5678,2026-12-01T11:59:00+01:00
8,0,,failed,worker died,,0.1.0,def5678,
"""
HEADLINE = """\
| norm | 2 | 32 |
| --- | --- | --- |
| batch | 8.6 | 6.4 |
"""
VERDICTS = """\
study,claim,verdict,n_min,numbers
small_batch,BN degrades below batch 8,holds,5,a = 1; b = 2
small_batch,GN is flat,undetermined (n=2),2,c = 3
"""


@pytest.fixture
def project(tmp_path):
    """A studies folder (small_batch, rnn, zeta), results for small_batch only, a README."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("zeta", "rnn", "small_batch", "_helper"):
        (studies / f"{name}.py").write_text("")
    results = tmp_path / "results" / "small_batch"
    results.mkdir(parents=True)
    (results / "runs.csv").write_text(RUNS)
    (results / "headline.md").write_text(HEADLINE)
    (results / "verdicts.csv").write_text(VERDICTS)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{BEGIN}\nold text\n{END}\n\nafter\n")
    return tmp_path


def _readme(project: Path, *extra: str) -> int:
    return main(["readme", "--readme", str(project / "README.md"),
                 "--out", str(project / "results"), "--studies-dir", str(project / "studies"),
                 *extra])


def _block(project: Path) -> str:
    text = (project / "README.md").read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)]


def test_block_states_the_numbers_computed_from_the_files(project):
    assert _readme(project) == 0
    text = (project / "README.md").read_text()
    assert text.startswith("# title\n\nbefore\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    block = _block(project)
    assert "old text" not in block and "_helper" not in block

    # The wall time by hand: first start 10:00:00 UTC; the last end is the diverged run's,
    # 11:59:00+01:00 = 10:59:00 UTC plus 12.25 s (the second run ends at 10:01:50). The failed
    # run has no start and counts for nothing.
    wall = 59 * 60 + 12.25
    assert format_duration(wall) == "59 min 12 s"
    line = ("[results/small_batch/README.md](results/small_batch/README.md): 4 runs "
            "(2 ok, 1 diverged, 1 failed) at git abc1234, def5678, normkit 0.1.0; "
            "59 min 12 s from the first run's start to the last run's end.")
    assert line in block.splitlines()
    assert "### small_batch" in block
    assert HEADLINE.strip() in block
    assert "| BN degrades below batch 8 | holds | 5 |" in block
    assert "| GN is flat | undetermined (n=2) | 2 |" in block
    assert "a = 1" not in block                                   # the numbers column is not shown
    assert "- `rnn`: the full-grid results are not in the repo yet; `make studies` writes them." \
        in block
    assert block.index("### small_batch") < block.index("`rnn`") < block.index("`zeta`")


def test_check_fails_on_an_edited_block_and_passes_after_regenerating(project, capsys):
    assert _readme(project, "--check") == 1                      # still "old text"
    assert _readme(project) == 0
    assert _readme(project, "--check") == 0
    capsys.readouterr()

    readme = project / "README.md"
    readme.write_text(readme.read_text().replace("| holds | 5 |", "| does not hold | 5 |"))
    assert _readme(project, "--check") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'small_batch'" in err[0] and "run `normkit readme`" in err[0]

    assert _readme(project) == 0
    assert _readme(project, "--check") == 0
    assert "| BN degrades below batch 8 | holds | 5 |" in _block(project)


@pytest.mark.parametrize("edit, study", [
    (("| GN is flat | undetermined (n=2) | 2 |\n",
      "| GN is flat | undetermined (n=2) | 2 |\n| a row typed by hand | holds | 5 |\n"),
     "small_batch"),
    (("writes them.\n- `zeta`", "writes them, soon.\n- `zeta`"), "rnn"),
    (("- `zeta`: the full-grid", "- `zeta`: the full grid"), "zeta"),
])
def test_check_names_the_study_whose_text_differs(project, capsys, edit, study):
    assert _readme(project) == 0
    readme = project / "README.md"
    text = readme.read_text()
    assert edit[0] in text
    readme.write_text(text.replace(edit[0], edit[1]))
    capsys.readouterr()
    assert _readme(project, "--check") == 1
    assert f"for study {study!r}: run `normkit readme`" in capsys.readouterr().err


def test_check_ignores_trailing_spaces_an_editor_strips_or_adds(project):
    assert _readme(project) == 0
    readme = project / "README.md"
    readme.write_text(readme.read_text().replace("| holds | 5 |\n", "| holds | 5 |   \n"))
    assert _readme(project, "--check") == 0


def test_new_results_make_the_check_fail(project, capsys):
    assert _readme(project) == 0
    rnn = project / "results" / "rnn"
    rnn.mkdir()
    (rnn / "runs.csv").write_text(RUNS.splitlines()[0] + "\n"
                                  + "1,0,0.5,ok,,60,0.2.0,fedcba9,2026-12-02T08:00:00+00:00\n")
    assert _readme(project, "--check") == 1
    assert "'rnn'" in capsys.readouterr().err
    assert _readme(project) == 0
    assert ("1 run (1 ok) at git fedcba9, normkit 0.2.0; 1 min 0 s from the first run's "
            "start to the last run's end.") in _block(project)


def test_readme_without_markers_is_a_usage_error(project, capsys):
    (project / "README.md").write_text("# no block\n")
    assert _readme(project, "--check") == 2
    assert BEGIN in capsys.readouterr().err
    assert (project / "README.md").read_text() == "# no block\n"


def _python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"),
                      re.S)


def _run(code: str, name: str, namespace: dict) -> None:
    if "import torch" in code:
        pytest.importorskip("torch")
    exec(compile(code, name, "exec"), namespace)


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of the README runs: in order in one namespace (as a reader follows
    along), and on its own unless it says it uses the model built above it."""
    examples = _python_examples()
    assert len(examples) >= 8
    monkeypatch.chdir(tmp_path)                # nothing the examples write lands in the repo
    namespace: dict = {}
    for number, code in enumerate(examples):
        _run(code, f"README.md python block {number}", namespace)
    for number, code in enumerate(examples):
        if "the Sequential above" not in code:
            _run(code, f"README.md python block {number}, alone", {})
