"""Named run sizes: each preset is data (overrides of DataConfig and FedConfig defaults), never a code path.

``workshop``  FedConfig() with length-grouped client batches: the default run, about a minute on a 2-core laptop.
``lab``       what the lab notebooks run (labs 04-06 share these sizes, so they hit the same cached runs).
``smoke``     the lab sizes cut to seconds per run, for CI; one alignment still happens.
``paper``     the paper's federation (labs/METHOD.md#federated-fine-tuning): 100 clients, 10% of them per round, one local epoch with
              batch 4, alignment every t = 10 rounds, on the full offline training split of the tweets.

``fedpft-lab run --preset paper --rounds 10`` takes the preset's values as defaults; explicit flags still win.
This module imports nothing heavy, so the CLI can read presets before building its parser.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import DataConfig, FedConfig, field_defaults
from .errors import ConfigError, check_choice

# Client batches of similar length (data.length_grouped_batches): 27% of the default run's training tokens were
# padding with random batches, 2.6% grouped; same accuracy (labs/reference/batching-check). The workshop and
# paper runs use them. FedConfig() keeps random batches, the paper's and the official code's, and so do the labs:
# their stored spreads (labs/INSTRUCTOR.md) and cached runs were made with random batches.
GROUPED: Mapping[str, Any] = {"group_by_length": True}

# Sizes every lab run uses (on top of FedConfig()'s defaults): small enough that one federated run of the real
# MiniLM takes about a minute on a 2-core laptop, big enough that curves have a shape. Labs 04, 05 and 06 build
# their configurations from these, so with default knobs they ask for identical runs and share the cache.
# Clients keep the workshop's 100 tweets each; there are fewer of them, fewer test tweets and a smaller
# distillation budget.
LAB_DATA: Mapping[str, Any] = {"max_train": 800, "max_test": 128, "clients": 8, "eval_batch_size": 32}
LAB_FED: Mapping[str, Any] = {"rounds": 5, "sample_fraction": 0.25, "distill_steps": 60, "distill_batch_size": 16,
                               "align_steps": 10,  # 2 of the 8 clients per round: one per core of a 2-core laptop
                               "group_by_length": False}

# SMOKE (CI) sizes, applied on top of the lab's: seconds per run; one alignment event still happens (round 1 of 2).
SMOKE_DATA: Mapping[str, Any] = {"max_train": 120, "max_test": 40, "clients": 4, "public_blocks": 32,
                                 "probe_batches": 1, "probe_batch_size": 8, "eval_batch_size": 40}
SMOKE_FED: Mapping[str, Any] = {"rounds": 2, "distill_steps": 4, "distill_batch_size": 4, "align_steps": 2,
                                "align_batch_size": 4, "align_interval": 1}

# The paper's federation. The full balanced training split is 10,928 tweets, about 109 per client. 40 rounds:
# the paper tests t = 20, so it runs R >= 20 rounds, probably more (labs/METHOD.md#unknowns); with t = 10: three
# alignments (10, 20, 30), each client sees its data 40 x 10% = 4 times on average, and the linear schedule has
# decayed the client learning rate to 1/40 of its start by the last round. The test set stays at the default 300
# tweets: it is evaluated every round.
PAPER_DATA: Mapping[str, Any] = {"clients": 100, "max_train": None}
PAPER_FED: Mapping[str, Any] = {"sample_fraction": 0.1, "local_epochs": 1, "batch_size": 4, "rounds": 40,
                                "align_interval": 10}

# name -> (DataConfig overrides, FedConfig overrides)
PRESETS: dict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = {
    "workshop": ({}, GROUPED),
    "lab": (LAB_DATA, LAB_FED),
    "smoke": ({**LAB_DATA, **SMOKE_DATA}, {**LAB_FED, **SMOKE_FED}),
    "paper": (PAPER_DATA, {**PAPER_FED, **GROUPED}),
}
DEFAULT_PRESET = "workshop"


def preset_values(name: str = DEFAULT_PRESET) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every DataConfig field, every FedConfig field but ``data``) with ``name``'s values, without building either
    (building a FedConfig imports torch; the CLI needs these values for its ``--help``)."""
    check_choice("preset", name, PRESETS)
    data, fed = PRESETS[name]
    fed_fields = {k: v for k, v in field_defaults(FedConfig).items() if k != "data"}
    return {**field_defaults(DataConfig), **data}, {**fed_fields, **fed}


def preset_config(name: str = DEFAULT_PRESET, **knobs: Any) -> FedConfig:
    """The FedConfig of preset ``name``, with ``knobs`` (FedConfig or DataConfig field names) on top;
    ``seed`` is both and sets both."""
    data, fed = preset_values(name)
    for key, value in knobs.items():
        if key not in data and key not in fed:
            raise ConfigError(f"unknown setting {key!r}: not a field of FedConfig or DataConfig")
        for fields in (data, fed):
            if key in fields:
                fields[key] = value
    return FedConfig(**fed, data=DataConfig(**data))
