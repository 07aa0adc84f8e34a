"""Student edition of the labs: stubs replace solutions, nothing leaks, the CLI writes a runnable folder.

Running the student notebooks is in tests/test_notebooks.py (marked ``notebooks``); here no kernel starts.
"""
from __future__ import annotations

import ast
import shutil

import nbformat
import pytest

from fedpft_lab import cli, editions
from fedpft_lab.errors import ConfigError
from fedpft_lab.paths import LABS_DIR, lab_notebooks

NOTEBOOKS = lab_notebooks()


def exercise(source: str, stub: str | None = "MY_X = None\n", tags=("solution",)) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)})
    if stub is not None:
        cell.metadata["fedpft_lab"] = {"stub": stub}
    return cell


def lab(*cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A lab"), *cells,
                nbformat.v4.new_code_cell("nb.check(MY_X == 1, 'ok')")]
    return nb


SOLVED = "### BEGIN SOLUTION\nMY_X = 1\n### END SOLUTION"


def test_the_preprocessor_swaps_solution_for_stub_and_keeps_everything_else(tmp_path):
    nb = lab(exercise(SOLVED, stub="# write MY_X\nMY_X = None\n", tags=("solution", "keep-me")))
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    out = nbformat.reads(editions.student_notebook(path), as_version=4)
    cell = out.cells[1]
    assert cell.source == "# write MY_X\nMY_X = None" and cell.outputs == []
    assert cell.metadata.tags == ["exercise", "keep-me"] and "fedpft_lab" not in cell.metadata
    assert [c.source for c in out.cells[::2]] == [c.source for c in nb.cells[::2]]
    nbformat.validate(out)


@pytest.mark.parametrize("cell, why", [
    (exercise(SOLVED, tags=()), "not tagged 'solution'"),
    (exercise(SOLVED, stub=None), "no metadata fedpft_lab.stub"),
    (exercise("MY_X = 1"), "lacks '### BEGIN SOLUTION'"),
    (exercise(SOLVED, stub=SOLVED), "no metadata fedpft_lab.stub"),
], ids=["untagged", "no-stub", "no-markers", "stub-is-the-solution"])
def test_a_notebook_that_would_leak_or_break_is_refused(tmp_path, cell, why):
    path = tmp_path / "01_x.ipynb"
    nbformat.write(lab(cell), path)
    with pytest.raises(ConfigError, match=why):
        editions.student_notebook(path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_lab_ships_a_solution_to_students(path):
    instructor = nbformat.read(path, as_version=4)
    student = nbformat.reads(editions.student_notebook(path), as_version=4)
    assert len(student.cells) == len(instructor.cells)
    text = "".join(c.source for c in student.cells)
    assert editions.BEGIN not in text and editions.END not in text
    swapped = [i for i, c in enumerate(instructor.cells) if editions.is_solution(c)]
    assert swapped and all("exercise" in student.cells[i].metadata.tags for i in swapped)
    for i in swapped:
        ast.parse(student.cells[i].source)
        assert student.cells[i].source == editions.stub_of(instructor.cells[i]).rstrip("\n")


def test_cli_writes_every_lab_and_the_method_notes(tmp_path, capsys):
    assert cli.main(["student-edition", str(tmp_path / "course")]) == 0
    written = sorted(p.name for p in (tmp_path / "course").iterdir())
    assert written == sorted([p.name for p in NOTEBOOKS] + ["METHOD.md"])
    assert f"{len(NOTEBOOKS)} notebooks" in capsys.readouterr().out


def test_cli_refuses_to_overwrite_the_instructor_edition(tmp_path, capsys):
    copy = tmp_path / "labs"
    shutil.copytree(LABS_DIR, copy, ignore=shutil.ignore_patterns("_out", "reference", ".ipynb_checkpoints"))
    before = {p.name: p.read_bytes() for p in copy.glob("*.ipynb")}
    assert cli.main(["student-edition", str(copy), "--labs", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "instructor edition" in err
    assert {p.name: p.read_bytes() for p in copy.glob("*.ipynb")} == before


def test_cli_names_the_folder_when_there_are_no_labs(tmp_path, capsys):
    assert cli.main(["student-edition", str(tmp_path / "out"), "--labs", str(tmp_path)]) == 2
    assert "--labs" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_failed_write_leaves_the_previous_edition_whole(tmp_path, monkeypatch):
    """Re-writing a course folder that fails half-way (disk full, killed) must not leave half a notebook: every file
    is either the previous edition's or the new one, and no temporary file stays behind."""
    import os

    course = tmp_path / "course"
    editions.write_student_edition(course)
    before = {p.name: p.read_bytes() for p in course.iterdir()}
    for p in course.glob("*.ipynb"):
        p.write_text(p.read_text().replace("Lab", "Old lab"))       # an older edition
    older = {p.name: p.read_bytes() for p in course.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="no space"):
        editions.write_student_edition(course)
    assert {p.name: p.read_bytes() for p in course.iterdir()} == older      # untouched, nothing left over
    monkeypatch.undo()
    editions.write_student_edition(course)
    assert {p.name: p.read_bytes() for p in course.iterdir()} == before
