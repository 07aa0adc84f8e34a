"""Every lab notebook: structure checks (no kernel) and a SMOKE run with papermill checked against expectations,
for the committed instructor edition (exercises solved) and the generated student edition (exercises unsolved).

Adding ``labs/NN_name.ipynb`` adds it here automatically. Its run must write ``metrics.json`` and it must have
an entry in ``EXPECTATIONS`` below (the test fails with a reminder until it has one): a new lab states what
"it worked" means in numbers.

Expectation values: ``(lo, hi)`` is an inclusive range, a callable is a predicate on the value, anything else
must be equal. ``RELATIONS`` holds checks across several metrics of one lab.
"""
from __future__ import annotations

import ast
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest

from fedpft_lab import editions
from fedpft_lab import notebook as nb
from fedpft_lab.errors import ConfigError

LABS = Path(__file__).resolve().parent.parent / "labs"
NOTEBOOKS = sorted(LABS.glob("[0-9][0-9]_*.ipynb"))
REQUIRED_PARAMETERS = {"SMOKE": bool, "SEED": int, "HEADLESS": bool, "OUT_DIR": str}
SMOKE_PARAMETERS = {"SMOKE": True, "SEED": 0, "HEADLESS": True}
SMOKE_BUDGET_S = 120     # generous guard: SMOKE runs take seconds; minutes means SMOKE sizes were forgotten


def is_fraction(v: object) -> bool:
    return isinstance(v, (int, float)) and 0.0 <= v <= 1.0


EXPECTATIONS: dict[str, dict[str, object]] = {
    "01_clients_and_skew": {
        "task": "tweets",
        "num_clients": 20,
        "num_examples": 2000,               # the SMOKE subsample
        "num_labels": 2,
        "majority_share_iid": (0.6, 0.8),   # ~70% of the tweets are negative
        "majority_share": lambda d: set(d) == {"flgo", "per-class"} and all(
            is_fraction(s) for shares in d.values() for s in shares.values()),
        "round_drift_iid": (0.0, 0.1),
        "round_drift_skewed": (0.05, 1.0),
        "exercise_alpha": (0.01, 10.0),
        "exercise_share": (0.9, 1.0),
        "exercise_ok": True,
    },
    # Labs 02-06 run the real MiniLM at SMOKE sizes (fedpft_lab.lab_helpers.SMOKE_DATA / SMOKE_FED): 2 rounds,
    # alignment after round 1, a 40-tweet test set. Accuracies carry no signal at that size; structure does.
    "02_building_a_sub_fm": {
        "fm_params": 10_646_784,            # MiniLM-L6 transformer layers
        "sub_fm_params": 7_103_232,         # 4 compressed layers keep 384 of 1536 FFN neurons
        "layer_drop_params": lambda n: isinstance(n, int) and 5_000_000 < n < 8_000_000,
        "layer_drop_layers": lambda ls: ls[0] == 0 and ls[-1] == 5 and 3 <= len(ls) <= 5,
        "paper_mebi": lambda d: round(d["fm"]) == 81 and round(d["sub_fm"]) == 47 and round(d["layer_drop"]) == 47,
        "kept_saliency_share": (0.25, 1.0),  # the kept quarter holds at least its share of the weight mass
        "layerwise_grad_cosine": (-1.0, 1.0),
        "layerdrop_grad_cosine": (-1.0, 1.0),
        "layerwise_rel_l2": (0.0, math.inf),
        "layerwise_logit_kl": (0.0, math.inf),
        "layerwise_hidden_gap": lambda g: len(g) == 6 and g[0] == 0.0 and all(x > 0 for x in g[1:]),
        "layerdrop_hidden_gap": lambda g: len(g) == 6 and g.count(None) == 2,
        "exercise_ok": True,
    },
    "03_layer_level_distillation": {
        "distill_steps": 4,
        "loss_first": (0.0, 1.0),
        "gaps_before": lambda g: len(g) == 4,
        "gaps_after": lambda g: len(g) == 4,
        "distilled_grad_cosine": (-1.0, 1.0),
        "detached_same_weights": True,      # the official weight term has no gradient: identical FFNs
        "detached_loss_shift": (0.0, math.inf),
        "exercise_ok": True,
    },
    "04_federated_proxy_finetuning": {
        "method": "fedpft",
        "num_rounds": 2,
        "rounds_recorded": 3,               # round 0 (before FL) + 2 rounds
        "final_accuracy": is_fraction,
        "final_sub_accuracy": is_fraction,
        "reference_final_accuracy": is_fraction,    # FedPETuning, the full-FM reference curve
        "plugin_gaps": lambda g: len(g) == 3 and all(-1 <= x <= 1 for x in g),
        "aligned_rounds": [1],
        "total_mb": (0.1, 1000.0),          # each participant's first download of its proxy included
        "ratio_to_shipping_fm": (0.0, 1.0),
        "exercise_ok": True,
    },
    "05_gradient_discrepancy": {
        "baselines": ["fedpft-b", "fedpft-n"],
        "rounds_recorded": {"fedpft": 3, "fedpft-b": 3, "fedpft-n": 3},
        "aligned_rounds": {"fedpft": [1], "fedpft-b": [], "fedpft-n": []},
        "grad_cosine": lambda d: all(-1 <= c <= 1 for cs in d.values() for c in cs),
        "grad_rel_l2": lambda d: all(x >= 0 for xs in d.values() for x in xs),
        "jumps": lambda d: all(len(v) == 1 for v in d.values()),
        "before_first_alignment_matches_fedpft_b": True,   # FedPFT and FedPFT-B differ only by the alignment
        "task": "tweets",
        "update_cosine": lambda d: set(d) == {"fedpft", "fedpft-b", "fedpft-n"} and all(
            len(v) == 2 and all(-1 <= c <= 1 for c in v) for v in d.values()),
        "reference": lambda r: len(r["seeds"]) >= 3 and r["fedpft_cosine_above_fedpft_n"]["points"] > 0,
        "exercise_ok": True,
    },
    "06_baselines_and_ablations": {
        "methods": ["fedpetuning", "fedot", "fedpft-n", "fedpft-b", "fedpft-d", "fedpft"],
        "task": "tweets",
        "final_accuracy": lambda d: len(d) == 6 and all(is_fraction(a) for a in d.values()),
        "mean_grad_cosine": lambda d: all(-1 <= c <= 1 + 1e-9 for c in d.values()),
        "proxy_params": lambda d: d["fedpft"] == 7_103_232 and d["fedpetuning"] == 10_646_784,
        "fm_params": 10_646_784,
        "paper_gap_closed": lambda d: abs(d["BERT"] - 0.8) < 1e-9 and abs(d["RoBERTa"] - 3.4 / 5.5) < 1e-9,
        "gap_closed": lambda g: g is None or isinstance(g, float),
        # the stored study: every method of the lab, several seeds, paired differences from FedPFT
        "reference": lambda r: len(r["seeds"]) >= 3 and {"fedpft", "fedpft-n", "fedpetuning", "fedot"} <= set(
            r["final_accuracy"]) and r["vs_fedpft"]["fedpft"] is None and r["vs_fedpft"]["fedpft-n"]["ci"] is not None,
        "exercise_ok": True,
    },
    "08_simulation_to_deployment": {
        "clients": 4,
        "rounds": 2,
        "aligned_rounds": [1],
        "identical": True,                  # the engines share the core: equal, not merely close
        "same_clients": True,
        "processes_left": 0,                # every Flower process stopped by its PID
        "processes_stopped": lambda n: isinstance(n, int) and n >= 5,   # a SuperLink, 4 SuperNodes (+ children)
        "fm_refused": True,                 # a client process cannot load the FM
        "max_overhead_percent": (0.0, 5.0), # Flower carries what FedPFT counts, within 5%
        "exercise_ok": True,
    },
    "07_why_alignment_matters": {
        "num_steps": 1000,
        "bound_holds": True,
        "true_slope": (-1.3, -0.7),         # the O(1/k) rate
        "true_final_gap": (0.0, 1e-4),
        "unaligned_final_gap": (1e-3, math.inf),
        "realigned_final_gap": (0.0, 1e-3),
        "floors": lambda d: len(d) >= 3,
        "exercise_period": lambda t: isinstance(t, int) and 1 <= t <= 100,
        "exercise_gap": (0.0, 1e-4),
        "exercise_ok": True,
    },
}


def _flgo_skew_falls_with_alpha(m: dict) -> bool:
    flgo = m["majority_share"]["flgo"]
    shares = [flgo[a] for a in sorted(flgo, key=float)]
    return all(x >= y - 0.02 for x, y in zip(shares, shares[1:])) and shares[0] > 0.9 > shares[-1]


def _floors_grow_with_period(m: dict) -> bool:
    floors = [m["floors"][t] for t in sorted(m["floors"], key=int)]
    return all(x <= y * 1.05 for x, y in zip(floors, floors[1:])) and floors[-1] < m["unaligned_final_gap"]


RELATIONS: dict[str, list[tuple[str, Callable[[dict], bool]]]] = {
    "02_building_a_sub_fm": [
        ("both proxies fit the same budget", lambda m: abs(m["layer_drop_params"] - m["sub_fm_params"])
         < 0.15 * m["fm_params"]),
        ("at keep ratio 1 the sub-FM is the FM", lambda m: m["sweep_cosine"]["layer-wise sub-FM"]["1.0"] > 0.9999),
        ("the hidden gap grows with depth in the layer-wise sub-FM",
         lambda m: m["layerwise_hidden_gap"][-1] > m["layerwise_hidden_gap"][1]),
    ],
    "03_layer_level_distillation": [
        ("distillation shrinks the mean layer gap on the corpus", lambda m: m["gap_after_mean"] < m["gap_before_mean"]),
        ("the loss falls", lambda m: m["loss_last"] < m["loss_first"]),
    ],
    "04_federated_proxy_finetuning": [
        ("every client downloads its whole proxy before its first round (round 1: all of them are new)",
         lambda m: m["bytes_down_weights_per_round"][1] == m["clients_per_round"][1] * m["proxy_frozen_bytes"] > 0),
        ("the adapter travels on top of the frozen weights every round",
         lambda m: all(d > w for d, w in zip(m["bytes_down_per_round"][1:], m["bytes_down_weights_per_round"][1:]))),
    ],
    "05_gradient_discrepancy": [
        ("FedPFT and FedPFT-B start from the same distilled sub-FM and adapter",
         lambda m: m["grad_cosine"]["fedpft"][0] == m["grad_cosine"]["fedpft-b"][0]),
        ("FedPFT-N starts from another (undistilled) sub-FM",
         lambda m: m["grad_cosine"]["fedpft-n"][0] != m["grad_cosine"]["fedpft-b"][0]),
    ],
    "06_baselines_and_ablations": [
        ("FedPETuning's proxy is the FM", lambda m: abs(m["mean_grad_cosine"]["fedpetuning"] - 1) < 1e-9),
        ("alignment broadcasts cost extra download", lambda m: m["comm_mb"]["fedpft"] > m["comm_mb"]["fedpft-b"]),
        ("FedOT sends less (LoRA in its adapter layers only)", lambda m: m["comm_mb"]["fedot"] < m["comm_mb"]["fedpft-b"]),
        ("compression shrinks what clients hold", lambda m: m["proxy_params"]["fedot"] < m["fm_params"]),
    ],
    "01_clients_and_skew": [
        ("FLGo skew falls as alpha grows", _flgo_skew_falls_with_alpha),
        ("skewed rounds drift further from p than IID rounds",
         lambda m: m["round_drift_skewed"] > 3 * m["round_drift_iid"]),
    ],
    "07_why_alignment_matters": [
        ("re-alignment keeps the gap far below the unaligned proxy",
         lambda m: m["realigned_final_gap"] * 10 < m["unaligned_final_gap"]),
        ("the true gradient is best", lambda m: m["true_final_gap"] <= m["realigned_final_gap"]),
        ("floors grow with the period", _floors_grow_with_period),
    ],
}


def check_value(value: object, expected: object) -> bool:
    if isinstance(expected, tuple):
        lo, hi = expected
        return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if callable(expected):
        return bool(expected(value))
    return value == expected


def problems_with(stem: str, metrics: dict, skip: Callable[[str], bool] = lambda key: False) -> list[str]:
    """Every expectation and relation of lab ``stem`` that ``metrics`` fails (keys for which ``skip`` is true are
    not checked)."""
    problems = [f"{key}: missing" if key not in metrics else f"{key}={metrics[key]!r} not within {expected!r}"
                for key, expected in EXPECTATIONS[stem].items()
                if not skip(key) and (key not in metrics or not check_value(metrics[key], expected))]
    problems += [f"relation failed: {name}" for name, rule in RELATIONS.get(stem, [])
                 if not problems and not rule(metrics)]
    return problems


# ----------------------------------------------------------------------------- structure (no kernel)

def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list:
    return [c for c in notebook.cells if c.cell_type == "code"]


def calls(source: str) -> set[str]:
    """Names of every function or method called in a cell (``nb.setup(...)`` -> ``setup``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_labs_exist():
    assert NOTEBOOKS, f"no labs found in {LABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_metadata_and_no_outputs(path):
    notebook = read(path)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", \
        "kernelspec name must be 'python3' (papermill and fresh venvs resolve that one)"
    for cell in code_cells(notebook):
        assert not cell.outputs and cell.execution_count is None, \
            f"commit labs without outputs (cell starting {cell.source[:40]!r}); clear them before committing"
    assert notebook.cells[0].cell_type == "markdown", "a lab starts with its lesson in Markdown"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_is_literals_only(path):
    tagged = [c for c in code_cells(read(path)) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"need exactly one cell tagged 'parameters', found {len(tagged)}"
    found = {}
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            f"parameters cell may only hold `NAME = literal` lines, got: {ast.unparse(stmt)}"
        try:
            found[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        except ValueError:
            pytest.fail(f"{ast.unparse(stmt)}: compute derived values in a later cell, not in parameters")
    for name, kind in REQUIRED_PARAMETERS.items():
        assert name in found, f"parameters cell must define {name}"
        assert type(found[name]) is kind, f"{name} must be a {kind.__name__} literal"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_exercise_and_metrics_cells(path):
    cells = code_cells(read(path))
    for cell in cells:
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        ast.parse(source)                                  # every code cell is valid Python
        assert "interact_manual" not in source, "interact_manual never runs headless; use a RunPanel"
    params = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    assert "setup" in calls(cells[params + 1].source), "the cell after parameters must call nb.setup(...)"
    assert any("check" in calls(c.source) for c in cells), "a lab needs an exercise ending in nb.check(...)"
    assert "write_metrics" in calls(cells[-1].source), "the last cell must call nb.write_metrics(OUT_DIR, ...)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_follow_the_edition_convention(path):
    """Each exercise cell is tagged, carries a stub that parses, and is followed by a check that first asks
    nb.solved(...); otherwise the student edition would leak the solution or stop at a NameError."""
    notebook = read(path)
    assert not editions.edition_problems(notebook), editions.edition_problems(notebook)
    exercises = [i for i, c in enumerate(notebook.cells) if editions.is_solution(c)]
    assert exercises, f"tag the exercise cell {editions.SOLUTION_TAG!r} and give it a stub (see fedpft_lab/editions.py)"
    for i in exercises:
        ast.parse(editions.stub_of(notebook.cells[i]))
        check = next(c for c in notebook.cells[i + 1:] if c.cell_type == "code")
        assert {"solved", "check"} <= calls(check.source), "the check cell must call nb.solved(...) then nb.check(...)"
    assert "exercise_ok" in notebook.cells[-1].source, "write exercise_ok into the metrics"


# ----------------------------------------------------------------------------- execution (papermill)

@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """A 'python3' kernelspec for *this* interpreter, found first via JUPYTER_PATH.

    Written to a temporary folder, so neither the user's home nor the venv is touched, and a stray system
    'python3' kernel (another interpreter without fedpft_lab) cannot shadow it.
    """
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name="python3", prefix=str(prefix))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield "python3"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_and_meets_expectations(path, tmp_path, python3_kernel):
    import papermill as pm

    pm.execute_notebook(str(path), str(tmp_path / path.name), kernel_name=python3_kernel, cwd=str(LABS),
                        parameters={**SMOKE_PARAMETERS, "OUT_DIR": str(tmp_path)}, progress_bar=False,
                        execution_timeout=600)
    metrics_file = tmp_path / "metrics.json"
    assert metrics_file.is_file(), f"{path.name} did not write metrics.json into OUT_DIR"
    metrics = json.loads(metrics_file.read_text())
    assert isinstance(metrics.get("seconds"), (int, float)), "metrics.json needs 'seconds'"
    assert metrics["seconds"] < SMOKE_BUDGET_S, f"SMOKE run took {metrics['seconds']:.0f} s"
    assert path.stem in EXPECTATIONS, (
        f"{path.stem} ran and wrote {sorted(metrics)}; add EXPECTATIONS[{path.stem!r}] in "
        f"tests/test_notebooks.py stating which values mean the lab worked")
    problems = problems_with(path.stem, metrics)
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.fixture(scope="session")
def student_labs(tmp_path_factory) -> Path:
    """The student edition, written by the CLI command a course would use."""
    from fedpft_lab import cli

    out = tmp_path_factory.mktemp("student")
    assert cli.main(["student-edition", str(out)]) == 0
    return out


def stream_text(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in code_cells(notebook) for o in c.outputs if o.output_type == "stream")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_edition_runs_to_the_end_unsolved(path, tmp_path, student_labs, python3_kernel):
    """Run All on the student edition, from its own folder: the exercise reports "not solved yet" instead of
    raising, the lab still reaches its last cell, and every number except the exercise's meets the expectations."""
    import papermill as pm

    out_dir = tmp_path / "out"
    executed = pm.execute_notebook(str(student_labs / path.name), str(tmp_path / path.name),
                                   kernel_name=python3_kernel, cwd=str(student_labs), progress_bar=False,
                                   parameters={**SMOKE_PARAMETERS, "OUT_DIR": str(out_dir)}, execution_timeout=600)
    assert "not solved yet" in stream_text(executed), f"{path.name}: the check cell did not say 'not solved yet'"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["exercise_ok"] is False
    problems = problems_with(path.stem, metrics, skip=lambda key: key.startswith("exercise"))
    assert not problems, f"student edition of {path.name}: " + "; ".join(problems)


# ----------------------------------------------------------------------------- notebook helpers

def test_write_metrics_is_atomic_json_with_seconds(tmp_path):
    ctx = nb.LabContext(seed=3, smoke=True, headless=True)
    import numpy as np

    path = nb.write_metrics(tmp_path / "out", {"acc": np.float32(0.5), "curve": np.arange(3)}, ctx)
    data = json.loads(path.read_text())
    assert data["acc"] == 0.5 and data["curve"] == [0, 1, 2]
    assert data["seed"] == 3 and data["smoke"] is True and data["seconds"] >= 0
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]      # no temporary file left behind


def test_write_metrics_refuses_nan_and_missing_seconds(tmp_path):
    with pytest.raises(ConfigError, match="seconds"):
        nb.write_metrics(tmp_path, {"acc": 0.5})
    with pytest.raises(ConfigError, match="finite"):
        nb.write_metrics(tmp_path, {"acc": float("nan"), "seconds": 1.0})
    assert not list(tmp_path.iterdir())


def test_check_prints_tick_or_raises_with_hint(capsys):
    nb.check(True, "well done")
    assert capsys.readouterr().out == "✓ well done\n"
    with pytest.raises(AssertionError, match="try a smaller alpha"):
        nb.check(False, "well done", hint="try a smaller alpha")


def test_solved_reports_missing_or_none_names_without_raising(capsys):
    scope = {"MY_ALPHA": 0.3, "my_ratio": None}
    assert nb.solved(scope, "MY_ALPHA") is True and capsys.readouterr().out == ""
    assert nb.solved(scope, "MY_ALPHA", "my_ratio", "my_total_mb", hint="count each client once") is False
    out = capsys.readouterr().out
    assert out.startswith("… not solved yet: my_ratio, my_total_mb are not defined")
    assert out.rstrip().endswith("Hint: count each client once") and out.count("\n") == 1


def test_timer_records_named_sections():
    ctx = nb.LabContext(seed=0, smoke=False, headless=False)
    with ctx.timer("partition"):
        pass
    assert ctx.timings["partition"] >= 0 and ctx.elapsed() >= ctx.timings["partition"]


def test_setup_seeds_and_configures(monkeypatch):
    import random

    import numpy as np
    import plotly.io as pio
    import torch

    for key in nb.HEADLESS_ENV:
        monkeypatch.setenv(key, "0")                  # restored after the test
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    threads = torch.get_num_threads()
    try:
        ctx = nb.setup(seed=7, smoke=True, headless=True, threads=1)
        first = (random.random(), np.random.rand(), torch.rand(1).item())
        nb.setup(seed=7, smoke=True, headless=True, threads=1)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
        assert ctx.seed == 7 and ctx.smoke and ctx.headless
        assert pio.renderers.default == nb.DEFAULT_RENDERER and torch.get_num_threads() == 1
        import os
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_setup_rejects_bad_seeds(seed):
    with pytest.raises(ConfigError):
        nb.setup(seed=seed)


def test_python_used_by_the_kernel_is_this_one(python3_kernel):
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(python3_kernel)
    assert spec.argv[0] == sys.executable
