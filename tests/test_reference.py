"""Stored reference studies (labs/reference/): self-describing, consistent with their runs, reproduced by the code.

If ``test_current_code_reproduces_a_stored_run`` fails after a change to the method, the labs are quoting numbers
the code no longer makes: bump ``fedpft_lab.version.RESULTS_VERSION`` and regenerate every study with the command
stored in its ``compare.json`` (``fedpft-lab compare ... --out labs/reference/NAME``).
"""
import json

import pytest

from fedpft_lab import compare, reference
from fedpft_lab.version import RESULTS_VERSION

STUDIES = sorted(p.name for p in reference.REFERENCE_DIR.glob("*") if (p / "compare.json").is_file())


def test_there_is_a_reference_study():
    assert STUDIES, "labs 05/06 show a stored study; none found under labs/reference/"


@pytest.mark.parametrize("name", STUDIES)
def test_study_describes_itself_and_matches_its_runs(name):
    study = reference.load(name)
    assert study.command.startswith("fedpft-lab compare ")
    assert study.code_version["results"] == RESULTS_VERSION, (
        f"{name} was made by results version {study.code_version['results']}; regenerate it with: {study.command}")
    seeds = study.table["seeds"]
    assert len(seeds) >= 3
    for method, row in study.table["methods"].items():
        assert sorted(study.runs[method]) == sorted(seeds), method
        runs = study.runs[method]
        assert {json.dumps(m["config"]["data"]["task"]) for m in runs.values()} == {
            json.dumps(study.table["base_config"]["data"]["task"])}
    again = compare.summarise(study.runs)
    for method, row in study.table["methods"].items():
        now = again["methods"][method]["final_accuracy"]
        assert now["mean"] == pytest.approx(row["final_accuracy"]["mean"]), method
        assert now["ci"] == pytest.approx(row["final_accuracy"]["ci"]), method


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_current_code_reproduces_a_stored_run(name):
    """Runs are deterministic per seed: replay FedPFT's first two rounds (distillation and an alignment
    included) from the stored configuration and compare every round number by number."""
    study = reference.load(name)
    method = "fedpft" if "fedpft" in study.runs else sorted(study.runs)[0]
    seed = min(study.runs[method])
    stored = study.runs[method][seed]
    replayed = reference.replay(stored, rounds=2)
    assert len(replayed) == 3
    test_examples = stored["examples"]["test"]
    problems = reference.mismatches(stored["rounds"][:3], replayed, test_examples)
    assert not problems, (f"{name}/{method}/seed{seed} no longer reproduces: {problems}. Bump RESULTS_VERSION and "
                          f"regenerate the study: {study.command}")


@pytest.mark.parametrize("name", STUDIES)
def test_the_stored_command_still_asks_for_the_stored_configuration(name):
    """The command a study carries must make its runs with today's CLI, whose defaults can move (the workshop
    preset took length-grouped batches after the study was made with random ones)."""
    import shlex

    from fedpft_lab import cli
    from fedpft_lab.federation import FedConfig, result_config

    study = reference.load(name)
    argv = shlex.split(study.command)[1:]
    a = cli.build_parser(cli._preset_in(argv)).parse_args(argv)
    for method in a.methods:
        stored = FedConfig.from_json({**study.table["base_config"], "method": method})
        assert result_config(cli._fed_config(a, method=method)) == result_config(stored), method
