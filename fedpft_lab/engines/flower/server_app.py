"""The Flower ServerApp: the FedPFT server (FM, its proxy copy, evaluation, alignment) behind a Flower Grid.

Run configuration (``flwr run ... --run-config``): ``config``, a JSON file holding the :class:`FedConfig`;
``out-dir``, where ``metrics.json`` and ``checkpoint.pt`` are written after every round; ``timeout``, seconds to
wait for the clients to connect; ``round-timeout``, seconds a round waits for replies; ``min-answers``, the fewest
valid replies a round may go on with (0: every sampled client); ``resume``, continue the run saved in ``out-dir``.

The simulation engine has no run configuration (``run_simulation`` leaves it empty): :func:`make_app` binds the
same settings to a ServerApp of their own instead.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...config import FedConfig
from ...core.server import build_setup
from ...workspace import prepare
from .strategy import FedPFTStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = FedConfig.from_json(json.loads(Path(str(rc["config"])).read_text()))
    serve_run(grid, cfg, Path(str(rc["out-dir"])), timeout=float(rc.get("timeout", 3600)),
              round_timeout=float(rc.get("round-timeout", 3600)), min_answers=int(rc.get("min-answers", 0)),
              resume=bool(rc.get("resume", False)))


def serve_run(grid: Grid, cfg: FedConfig, out: Path, timeout: float = 3600, round_timeout: float = 3600,
              min_answers: int = 0, resume: bool = False, engine: str = "flower",
              on_round: Callable[[dict], None] | None = None) -> None:
    """The server's side of one run: build the FM and its proxy, then let the strategy drive ``grid``."""
    out.mkdir(parents=True, exist_ok=True)
    ws = prepare(cfg.data)
    setup = build_setup(cfg, ws, progress=False)
    strategy = FedPFTStrategy(cfg, ws, setup, out, min_answers=min_answers or None, round_timeout=round_timeout,
                              engine=engine, on_round=on_round)
    if resume:
        strategy.resume()
    strategy.start(grid, timeout=timeout)


def make_app(cfg: FedConfig, out: Path, **settings) -> ServerApp:
    """A ServerApp bound to ``cfg`` and ``out`` (``settings``: those of :func:`serve_run`), for ``run_simulation``."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        serve_run(grid, cfg, out, **settings)

    return bound
