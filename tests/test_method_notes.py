"""labs/METHOD.md is the method reference participants have: every pointer to it must land on a section, and
nothing may cite a document participants cannot open."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "labs" / "METHOD.md"
SOURCES = sorted((ROOT / "fedpft_lab").glob("*.py")) + sorted((ROOT / "labs").glob("[0-9][0-9]_*.ipynb"))
# Labs whose lesson text is being rewritten elsewhere and still cite the old spec; drop an entry once its
# citations point at METHOD.md (the report of the change lists each one and its section).
PENDING: set[str] = set()
POINTER = re.compile(r"METHOD\.md#([A-Za-z0-9_-]+)")
STALE = re.compile(r"FEDPFT_SPEC|\bspec\b[^\n]{0,12}§|\(§\d")


def text_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    return path.read_text(encoding="utf-8")


def anchors() -> set[str]:
    return set(re.findall(r'<a id="([^"]+)"></a>', NOTES.read_text(encoding="utf-8")))


def test_every_section_has_its_anchor_and_the_contents_list_resolves():
    notes = NOTES.read_text(encoding="utf-8")
    assert {"sub-fm", "layer-distillation", "federated-fine-tuning", "neuron-alignment", "baselines",
            "measurements", "departures", "paper-numbers"} <= anchors()
    assert set(re.findall(r"\]\(#([^)]+)\)", notes)) <= anchors()


@pytest.mark.parametrize("path", SOURCES + [ROOT / "README.md", ROOT / "labs" / "INSTRUCTOR.md"], ids=lambda p: p.name)
def test_pointers_land_on_a_section_and_no_private_spec_is_cited(path):
    text = text_of(path)
    missing = set(POINTER.findall(text)) - anchors()
    assert not missing, f"{path.name} points to METHOD.md sections that do not exist: {sorted(missing)}"
    if path.name not in PENDING:
        stale = [m.group(0) for m in STALE.finditer(text)]
        assert not stale, f"{path.name} cites a document participants do not have: {stale}; point to labs/METHOD.md"


# ----------------------------------------------------------------------------- the instructor guide

GUIDE = ROOT / "labs" / "INSTRUCTOR.md"


def test_instructor_guide_has_a_section_and_a_time_for_every_lab():
    guide = GUIDE.read_text(encoding="utf-8")
    assert "@@" not in guide, "a placeholder was left in the guide"
    for nb in sorted((ROOT / "labs").glob("[0-9][0-9]_*.ipynb")):
        number = nb.name[:2]
        assert re.search(rf"^### {number} ", guide, re.M), f"labs/INSTRUCTOR.md has no section for {nb.name}"
        assert re.search(rf"^\| {number} ", guide, re.M), f"labs/INSTRUCTOR.md has no measured time for {nb.name}"


@pytest.mark.parametrize("name", ["wiki-topics-12-rounds", "wiki-topics"])
def test_instructor_guide_quotes_the_reference_study_as_stored(name):
    """Each study's means in the guide are the stored ones (regenerate a study: update the guide)."""
    import json

    study = json.loads((ROOT / "labs" / "reference" / name / "compare.json").read_text())
    guide = GUIDE.read_text(encoding="utf-8")
    for method, row in study["methods"].items():
        label, mean = row["name"], f"{100 * row['final_accuracy']['mean']:.1f}"
        assert re.search(rf"{re.escape(label)} {re.escape(mean)}\b", guide), f"guide lacks '{label} {mean}' ({name})"
