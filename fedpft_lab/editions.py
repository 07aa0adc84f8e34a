"""Student and instructor editions of the labs.

The committed labs are the *instructor edition*: every exercise cell holds a working solution, so running a lab
shows what a solved exercise looks like and the notebook tests check that the solution passes. A participant needs
the *student edition*, where the same cell holds only a starting point. ``fedpft-lab student-edition OUT_DIR``
writes it; nothing is edited by hand and nothing is kept twice.

The convention (checked here, and for every lab by ``tests/test_notebooks.py``):

* the cell a participant writes is tagged ``solution`` and holds the solution between ``### BEGIN SOLUTION``
  and ``### END SOLUTION`` (nbgrader's markers, so instructors recognise them);
* its metadata ``{"fedpft_lab": {"stub": "..."}}`` holds the student's starting code: comments saying what to
  write, with the exercise's names bound to None or left undefined;
* the check cell after it starts with ``nb.solved(globals(), "NAME", hint=...)`` (:func:`notebook.solved`),
  which prints "not solved yet" and the hint for a stub instead of raising, so Run All still reaches the panel.

The conversion is nbconvert's own machinery: :class:`StudentEdition` is an nbconvert ``Preprocessor`` that swaps
each tagged cell's source for its stub, run with nbconvert's ``ClearOutputPreprocessor`` by a
``NotebookExporter``. The same preprocessor works from nbconvert's command line::

    jupyter nbconvert labs/*.ipynb --to notebook --output-dir OUT \\
        --NotebookExporter.preprocessors='["fedpft_lab.editions.StudentEdition"]'
"""
from __future__ import annotations

from pathlib import Path

from nbconvert.exporters import NotebookExporter
from nbconvert.preprocessors import ClearOutputPreprocessor, Preprocessor
from nbformat import NotebookNode

from . import io
from .errors import ConfigError
from .paths import LABS_DIR, lab_notebooks

SOLUTION_TAG = "solution"   # the instructor edition's exercise cell
EXERCISE_TAG = "exercise"   # the same cell in the student edition
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
NAMESPACE = "fedpft_lab"    # cell metadata namespace; the stub is metadata[NAMESPACE]["stub"]


def stub_of(cell: NotebookNode) -> str | None:
    """The student's starting code stored with an exercise cell, or None."""
    stub = cell.get("metadata", {}).get(NAMESPACE, {}).get("stub")
    return "".join(stub) if isinstance(stub, list) else stub


def is_solution(cell: NotebookNode) -> bool:
    return SOLUTION_TAG in cell.get("metadata", {}).get("tags", [])


def edition_problems(nb: NotebookNode) -> list[str]:
    """What would make the student edition leak a solution or break (empty: fine).

    A solution marker in an untagged cell would ship to students unchanged; a tagged cell without a stub, or
    without the markers, means the instructor forgot half of the convention.
    """
    problems = []
    for i, cell in enumerate(nb.cells):
        marked = BEGIN in cell.source or END in cell.source
        if marked and not is_solution(cell):
            problems.append(f"cell {i} holds {BEGIN!r} but is not tagged {SOLUTION_TAG!r}")
        if is_solution(cell):
            if cell.cell_type != "code":
                problems.append(f"cell {i} is tagged {SOLUTION_TAG!r} but is not a code cell")
            if not (BEGIN in cell.source and END in cell.source):
                problems.append(f"cell {i} is tagged {SOLUTION_TAG!r} but lacks {BEGIN!r} ... {END!r}")
            stub = stub_of(cell)
            if not stub or BEGIN in stub:
                problems.append(f"cell {i} is tagged {SOLUTION_TAG!r} but has no metadata {NAMESPACE}.stub "
                                "(the student's starting code)")
    return problems


class StudentEdition(Preprocessor):
    """nbconvert preprocessor: each ``solution`` cell's source becomes its stub, tagged ``exercise`` instead.

    Refuses (one line, naming the cell) a notebook that :func:`edition_problems` finds fault with, so a
    solution can never reach the student edition by accident.
    """

    def preprocess(self, nb: NotebookNode, resources: dict) -> tuple[NotebookNode, dict]:
        problems = edition_problems(nb)
        if problems:
            name = (resources or {}).get("metadata", {}).get("name", "notebook")
            raise ConfigError(f"{name}: {problems[0]}")
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell: NotebookNode, resources: dict, index: int) -> tuple[NotebookNode, dict]:
        if is_solution(cell):
            cell.source = stub_of(cell).rstrip("\n")
            cell.metadata.tags = [EXERCISE_TAG if t == SOLUTION_TAG else t for t in cell.metadata.tags]
            cell.metadata[NAMESPACE].pop("stub")
            if not cell.metadata[NAMESPACE]:
                del cell.metadata[NAMESPACE]
        return cell, resources


def student_notebook(path: Path) -> str:
    """The student edition of one lab, as notebook JSON (outputs cleared)."""
    exporter = NotebookExporter()
    exporter.register_preprocessor(ClearOutputPreprocessor(), enabled=True)
    exporter.register_preprocessor(StudentEdition(), enabled=True)
    body, _ = exporter.from_filename(str(path))
    return body if body.endswith("\n") else body + "\n"


INSTRUCTOR_ONLY = {"INSTRUCTOR.md"}   # notes in the labs folder that never go to participants


def write_student_edition(out_dir: str | Path, labs: str | Path = LABS_DIR) -> list[Path]:
    """Write the student edition of every lab in ``labs`` to ``out_dir``, with the Markdown notes the labs link
    to (``METHOD.md``). The notebooks import the installed ``fedpft_lab``, so they run from ``out_dir``."""
    labs, out = Path(labs), Path(out_dir)
    notebooks = lab_notebooks(labs)
    if not notebooks:
        raise ConfigError(f"no lab notebooks (NN_name.ipynb) in {labs}; pass --labs with the folder of the labs")
    if out.resolve() == labs.resolve():
        raise ConfigError(f"OUT_DIR must not be the labs folder {labs}: it would overwrite the instructor edition")
    texts = {path.name: student_notebook(path) for path in notebooks}   # all checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for note in sorted(labs.glob("*.md")):
        if note.name not in INSTRUCTOR_ONLY:     # the guide holds the exercises' answers
            texts[note.name] = note.read_text(encoding="utf-8")
    for name, text in texts.items():       # atomically: a crash never leaves a participant half a notebook
        io.atomic_write_text(out / name, text)
        written.append(out / name)
    return written
