"""Stored reference studies: the many-seed results a participant's live one-seed run is read against.

A study is the output folder of ``fedpft-lab compare`` (or ``sweep``) written straight into
``labs/reference/<name>/``: ``compare.json`` (the table, the exact command, the code version) and one
``metrics.json`` per method and seed with every round. Checkpoints are git-ignored there: runs are
deterministic per seed, so :func:`replay` can rebuild any of them from its stored configuration, and
``tests/test_reference.py`` does exactly that for the first rounds of one run, so a change of the method can
never leave the labs quoting numbers the code no longer produces.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .paths import REPO_ROOT

REFERENCE_DIR = REPO_ROOT / "labs" / "reference"
# What a replay must reproduce, and how closely. Accuracy: to one test example (a different CPU kernel may
# round one logit the other way). Gradient cosine: 1e-3 (the server's distillation and alignment run on all
# torch threads, so their last bits depend on the thread count; measured differences are ~1e-7).
REPLAY_KEYS = {"accuracy": None, "sub_accuracy": None, "grad_cosine": 1e-3, "grad_rel_l2": 1e-3}


@dataclass
class Study:
    name: str
    path: Path
    table: dict                                  # compare.json
    runs: dict[str, dict[int, dict]]             # method -> seed -> metrics.json

    @property
    def command(self) -> str:
        return self.table.get("command", "")

    @property
    def code_version(self) -> dict:
        return self.table.get("code_version", {})


def load(name: str, root: Path | None = None) -> Study:
    """A stored study by folder name (see ``labs/reference/``)."""
    path = (root or REFERENCE_DIR) / name
    table_path = path / "compare.json"
    if not table_path.is_file():
        known = sorted(p.name for p in (root or REFERENCE_DIR).glob("*") if (p / "compare.json").is_file())
        raise ConfigError(f"reference study must be one of {known}, got {name!r}")
    runs: dict[str, dict[int, dict]] = {}
    for metrics in sorted(path.glob("*/seed*/metrics.json")):
        method, seed = metrics.parent.parent.name, int(metrics.parent.name[4:])
        runs.setdefault(method, {})[seed] = json.loads(metrics.read_text())
    return Study(name, path, json.loads(table_path.read_text()), runs)


def replay(metrics: Mapping, rounds: int) -> list[dict]:
    """Rerun the first ``rounds`` rounds (round 0 included) of a stored run from its own configuration."""
    from .federation import FedConfig, iterate

    cfg = FedConfig.from_json(metrics["config"])
    out: list[dict] = []
    for m in iterate(cfg, progress=False):
        out = m["rounds"]
        if len(out) > rounds:
            break
    return out


def mismatches(stored: Iterable[Mapping], replayed: Iterable[Mapping], test_examples: int) -> list[str]:
    """Where a replay differs from the stored rounds by more than :data:`REPLAY_KEYS` allows (empty = same)."""
    problems = []
    for s, r in zip(stored, replayed):
        for key, tol in REPLAY_KEYS.items():
            tol = 1.0 / max(1, test_examples) + 1e-12 if tol is None else tol
            if abs(s[key] - r[key]) > tol:
                problems.append(f"round {s['round']} {key}: stored {s[key]:.6f}, now {r[key]:.6f}")
    return problems


def interval_rows(study: Study, key: str = "final_accuracy", scale: float = 100.0) -> dict[str, dict]:
    """Per method (display name): mean and 95% interval of a row of ``compare.json``, e.g. for
    :func:`plots.interval_bars`. Accuracies come out in % with the default ``scale``."""
    from .federation import METHOD_NAMES

    out = {}
    for method, row in study.table["methods"].items():
        d = row[key]
        low, high = d["ci"] if d.get("ci") else (None, None)
        out[METHOD_NAMES.get(method, method)] = {
            "mean": d["mean"] * scale, "low": None if low is None else low * scale,
            "high": None if high is None else high * scale, "sd": None if d.get("sd") is None else d["sd"] * scale}
    return out


def by_round(study: Study, key: str = "grad_cosine", methods: Iterable[str] | None = None) -> dict[str, dict]:
    """Per method (display name): ``key`` per round as mean and 95% interval over the study's seeds."""
    from .federation import METHOD_NAMES
    from .stats import mean_ci

    out = {}
    for method in methods or study.runs:
        seeds = study.runs[method]
        rounds = min(len(m["rounds"]) for m in seeds.values())
        points = [mean_ci([m["rounds"][i][key] for m in seeds.values()]) for i in range(rounds)]
        out[METHOD_NAMES.get(method, method)] = {
            "mean": [p["mean"] for p in points],
            "low": [p["ci"][0] if p["ci"] else None for p in points],
            "high": [p["ci"][1] if p["ci"] else None for p in points]}
    return out


def table_rows(study: Study, live: Mapping[str, float] | None = None) -> list[dict]:
    """The study as rows a lab can display: each method's last-round accuracy (mean, 95% interval, seeds), its
    paired difference from FedPFT (the number to read when asking "is FedPFT better?"), the share of rounds in
    which its gradient cosine beat FedPFT-N's, and, if given, the participant's own one-seed result. In %."""
    from .federation import METHOD_NAMES

    def pct(d: Mapping | None, signed: bool = False) -> str:
        if d is None:
            return ""
        mean = f"{100 * d['mean']:+.1f}" if signed else f"{100 * d['mean']:.1f}"
        return mean + (f" [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]" if signed and d.get("ci") else
                       f" [{100 * d['ci'][0]:.1f}, {100 * d['ci'][1]:.1f}]" if d.get("ci") else " [n/a]")

    rows = []
    for method, row in study.table["methods"].items():
        above = row.get("grad_cosine_above_fedpft_n")
        rows.append({
            "method": METHOD_NAMES.get(method, method),
            "accuracy % (mean [95% CI])": pct(row["final_accuracy"]),
            "minus FedPFT, paired (pts)": pct((row.get("vs_fedpft") or {}).get("final_accuracy"), signed=True),
            "grad cos > FedPFT-N": f"{above['above']}/{above['points']}" if above else "",
            **({"your run %": round(100 * live[method], 1) if method in live else None} if live else {})})
    return rows
