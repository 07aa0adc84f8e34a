"""Shared setup for the lab notebooks, and the conventions every lab follows.

Why conventions: the same notebook must work live in JupyterLab (sliders, buttons, live figures) *and*
headless under papermill in CI (no browser, no clicks, a fresh kernel that shuts down when the last cell ends).

Notebook layout (``labs/NN_name.ipynb``, kernelspec name ``python3``, committed without outputs)
----------------------------------------------------------------------------------------------
1. Markdown: the lesson in a few paragraphs — what we do and why it matters for FedPFT.
2. Code cell tagged ``parameters`` with literals only (papermill injects overrides *after* it)::

       SMOKE = False     # True: tiny sizes so CI runs the lab in seconds
       SEED = 0
       HEADLESS = False  # True under papermill: no widgets are displayed, nothing waits for a click
       OUT_DIR = "_out/NN"  # where metrics.json goes, relative to the notebook (labs/_out is git-ignored)
       ROUNDS = 20       # ... the lab's main knobs, as literals

3. Setup cell::

       from fedpft_lab import notebook as nb
       ctx = nb.setup(seed=SEED, smoke=SMOKE, headless=HEADLESS)

4. Derived sizes in their own cell, never in the parameters cell: ``N_ROUNDS = 2 if SMOKE else ROUNDS``.
5. The default results, computed with *blocking* library calls and shown as static ``go.Figure``s
   (this is what papermill executes and what a saved notebook keeps).
6. The live panel in its own cell, so a widget never blocks a headless run::

       panel = widgets.partition_explorer(labels, names)      # or widgets.RunPanel(work, on_event, figs)
       if not HEADLESS:
           display(panel)

   Expensive work behind a button uses ``runner.BackgroundRun`` via ``widgets.RunPanel``; the static path calls
   the same ``work`` with ``BackgroundRun(work).run_blocking()`` or the library function directly. For a
   federated run (``federation.run`` reports one record per round through ``on_round``)::

       def work(stop, emit):                     # called afresh on every Start: read the sliders here
           cfg = federation.FedConfig(rounds=rounds_slider.value, seed=SEED)
           report = lambda record: emit({**record, "progress": record["round"] / cfg.rounds})
           return federation.run(cfg, progress=False, stop=stop, on_round=report)

       run = runner.BackgroundRun(work)
       run.run_blocking()                        # static path: the same work, in this thread
       plots.round_curves(run.events, keys=("accuracy", "sub_accuracy"))

       keys = ("accuracy", "sub_accuracy")
       panel = widgets.RunPanel(work, widgets.round_curve_updater(keys), [plots.empty_round_curves(keys)],
                                controls=[rounds_slider])
       if not HEADLESS:
           display(panel)

7. At least one exercise: a Markdown task, a code cell the participant edits, and a check cell. The committed
   lab is the *instructor edition*: the exercise cell holds a working solution between ``### BEGIN SOLUTION`` /
   ``### END SOLUTION``, is tagged ``solution`` and carries the participant's starting code in its metadata,
   ``{"fedpft_lab": {"stub": "MY_ALPHA = None  # ..."}}``. ``fedpft-lab student-edition OUT_DIR`` writes the
   *student edition*, where that stub replaces the solution (:mod:`fedpft_lab.editions`). The check cell
   therefore first asks whether the exercise was done at all, so an unsolved one never stops Run All::

       exercise_ok = False
       if nb.solved(globals(), "MY_ALPHA", hint="set MY_ALPHA to ..."):   # else prints "… not solved yet"
           exercise_ok = ...
           nb.check(exercise_ok, "what was right", hint="what to fix")   # raises when the answer is wrong

   and ``exercise_ok`` goes into the metrics.
8. Last cell: ``nb.write_metrics(OUT_DIR, {...}, ctx)`` — the numbers the lab is about, plus ``seconds``.
   ``tests/test_notebooks.py`` runs every lab with SMOKE=True, HEADLESS=True and checks metrics.json against
   the per-lab expectations listed there (a new lab must add its entry).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from .errors import ConfigError, check_range
from .paths import set_offline_env

# Embeds plotly.js once per notebook ("notebook") next to the JSON that JupyterLab's plotly extension renders
# ("plotly_mimetype"), so figures show live in JupyterLab and in a saved/exported executed notebook, offline.
# "notebook_connected" would load plotly.js from a CDN, which a closed room cannot reach.
DEFAULT_RENDERER = "plotly_mimetype+notebook"

HEADLESS_ENV = {
    "TQDM_DISABLE": "1",                     # tqdm reads TQDM_* once, at import: set before torch/datasets load
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@dataclass
class LabContext:
    """What a lab needs after setup: its seed and mode, and a clock for the ``seconds`` metric."""

    seed: int
    smoke: bool
    headless: bool
    started: float = field(default_factory=time.time)            # wall-clock start (epoch seconds)
    timings: dict[str, float] = field(default_factory=dict)       # filled by ``with ctx.timer(name):``
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed(self) -> float:
        """Seconds since setup."""
        return time.perf_counter() - self._t0

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Time a block: ``with ctx.timer("partition"): ...`` stores seconds in ``ctx.timings[name]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - t0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's global generator and torch, so a lab reruns identically."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_threads() -> int:
    """Torch threads: all cores up to 8 (more rarely helps the small models of the labs)."""
    return max(1, min(os.cpu_count() or 1, 8))


def quiet_progress_bars() -> None:
    """Turn progress bars off for an executed notebook: widget bars never render there and text bars
    store one line per update. Must run before tqdm is imported (the setup cell is the first code)."""
    for key, value in HEADLESS_ENV.items():
        os.environ[key] = value
    with contextlib.suppress(Exception):  # already-imported HF libraries read their env at import
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()


def setup(seed: int = 0, smoke: bool = False, headless: bool = False, threads: int | None = None,
          renderer: str = DEFAULT_RENDERER) -> LabContext:
    """First code cell of every lab: offline flags, quiet bars when headless, seeds, threads, plotly renderer."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    check_range("seed", seed, 0)
    set_offline_env()
    if headless:
        quiet_progress_bars()
    import plotly.io as pio
    import torch

    seed_everything(seed)
    threads = threads if threads is not None else default_threads()
    check_range("threads", threads, 1)
    torch.set_num_threads(threads)
    pio.renderers.default = renderer
    return LabContext(seed=seed, smoke=bool(smoke), headless=bool(headless))


def solved(scope: Mapping[str, Any], *names: str, hint: str = "") -> bool:
    """Has the participant done the exercise? True when every name in ``names`` is bound in ``scope`` (pass
    ``globals()``) to something other than None.

    Otherwise print "… not solved yet" with the hint and return False, without raising: the student edition
    ships the exercise unsolved, and Run All (or a headless run) must still reach the live panel and the metrics.
    """
    missing = [name for name in names if scope.get(name) is None]
    if not missing:
        return True
    print(f"… not solved yet: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not defined "
          f"(or still None).{' Hint: ' + hint if hint else ''}")
    return False


def check(passed: bool, message: str, hint: str = "") -> None:
    """Exercise check: print "✓ message" or fail with the hint (so papermill marks the lab as broken)."""
    if not passed:
        raise AssertionError(f"✗ {hint or message}")
    print(f"✓ {message}")


def _plain(value: Any) -> Any:
    """NumPy scalars/arrays and paths as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_metrics(out_dir: str | os.PathLike, metrics: Mapping[str, Any], ctx: LabContext | None = None,
                  filename: str = "metrics.json") -> Path:
    """Write ``metrics`` (+ ``seconds``, ``seed``, ``smoke`` from ``ctx``) to ``out_dir/metrics.json``.

    Atomic (temporary file + ``os.replace``), so a test never reads a half-written file. Values must be
    finite numbers, strings, bools, lists or dicts of those; NaN is refused because JSON has no NaN.
    """
    record = dict(metrics)
    if ctx is not None:
        record.setdefault("seconds", round(ctx.elapsed(), 3))
        record.setdefault("seed", ctx.seed)
        record.setdefault("smoke", ctx.smoke)
    if "seconds" not in record:
        raise ConfigError("metrics need a 'seconds' entry: pass ctx (from nb.setup) or add it yourself")
    try:
        text = json.dumps(record, indent=2, allow_nan=False, default=_plain)
    except (TypeError, ValueError) as exc:
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        raise ConfigError(f"metrics must be finite JSON values ({exc}); check {bad or 'the values'}") from exc
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    io.atomic_write_text(target, text + "\n")
    return target
