"""Presets are data, the CLI reads them before it builds its parser, and building that parser imports nothing heavy."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from fedpft_lab import cli, lab_helpers, presets
from fedpft_lab.config import DataConfig, FedConfig, field_defaults
from fedpft_lab.errors import ConfigError

HEAVY = ("torch", "transformers", "datasets", "peft", "pandas", "scipy", "plotly")


def _modules_after(code: str) -> set[str]:
    """Top-level modules loaded by a fresh interpreter after running ``code`` (the test process has them all)."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_building_the_parser_imports_no_heavy_library():
    loaded = _modules_after("from fedpft_lab import cli\ncli.build_parser('paper').parse_args(['run'])")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["sweep", "--help"]])
def test_help_answers_without_importing_torch(args):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fedpft_lab", *args],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "usage: fedpft-lab" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_field_defaults_are_the_defaults_of_an_instance():
    assert field_defaults(FedConfig) == {f.name: getattr(FedConfig(), f.name) for f in dataclasses.fields(FedConfig)}
    assert field_defaults(DataConfig) == dataclasses.asdict(DataConfig())


def test_workshop_is_the_default_and_lab_smoke_are_what_the_labs_run():
    # the default run is FedConfig() with length-grouped client batches (labs/reference/batching-check: same
    # accuracy); the labs keep random batches, with which their stored spreads and cached runs were made
    assert presets.preset_config("workshop") == dataclasses.replace(FedConfig(), group_by_length=True)
    assert {n for n in presets.PRESETS if presets.preset_config(n).group_by_length} == {"workshop", "paper"}
    assert not FedConfig().group_by_length
    assert presets.preset_config("lab") == lab_helpers.lab_config("fedpft")
    assert presets.preset_config("smoke") == lab_helpers.lab_config("fedpft", smoke=True)
    assert presets.preset_config("lab", seed=3) == lab_helpers.lab_config("fedpft", seed=3)  # seed sets both
    assert lab_helpers.LAB_DATA is presets.LAB_DATA and lab_helpers.SMOKE_FED is presets.SMOKE_FED


def test_paper_preset_is_the_papers_federation():
    cfg = presets.preset_config("paper")
    assert (cfg.data.clients, cfg.clients_per_round(), cfg.data.max_train) == (100, 10, None)
    assert (cfg.local_epochs, cfg.batch_size, cfg.align_interval) == (1, 4, 10)
    assert cfg.rounds >= 2 * cfg.align_interval and sum(cfg.aligns_in(r) for r in range(1, cfg.rounds + 1)) >= 3


def test_presets_are_checked():
    with pytest.raises(ConfigError, match="preset must be one of"):
        presets.preset_values("huge")
    with pytest.raises(ConfigError, match="unknown setting 'roundz'"):
        presets.preset_config("lab", roundz=3)


def test_cli_preset_gives_defaults_that_flags_override():
    args = ["run", "--preset", "paper", "--rounds", "3"]
    a = cli.build_parser(cli._preset_in(args)).parse_args(args)
    cfg = cli._fed_config(a)
    assert cfg == dataclasses.replace(presets.preset_config("paper"), rounds=3)
    args = ["compare", "--preset", "smoke", "--max-train", "all", "--device", "cpu"]
    a = cli.build_parser(cli._preset_in(args)).parse_args(args)
    cfg = cli._fed_config(a, method="fedpft")
    smoke = presets.preset_config("smoke")
    # fields without a flag come from the preset too
    assert cfg.distill_batch_size == smoke.distill_batch_size and cfg.data.probe_batches == smoke.data.probe_batches
    assert cfg.data.max_train is None and cfg.data.device == "cpu" and cfg.rounds == smoke.rounds


def test_cli_without_preset_is_the_workshop_run():
    a = cli.build_parser().parse_args(["run"])
    assert cli._fed_config(a) == presets.preset_config("workshop")
    a = cli.build_parser().parse_args(["run", "--no-group-by-length"])
    assert cli._fed_config(a) == FedConfig()


def test_unknown_preset_or_device_is_one_argparse_line(capsys):
    for args in (["run", "--preset", "huge"], ["run", "--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        assert e.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
