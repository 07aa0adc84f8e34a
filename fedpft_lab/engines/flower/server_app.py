"""The Flower ServerApp: the FedPFT server (FM, its proxy copy, evaluation, alignment) behind a Flower Grid.

Run configuration (``flwr run ... --run-config``): ``config``, a JSON file holding the :class:`FedConfig`;
``out-dir``, where ``metrics.json`` is written after every round; ``timeout``, seconds to wait for the clients to
connect; ``round-timeout``, seconds a round waits for replies; ``min-answers``, the fewest valid replies a round
may go on with (0: every sampled client).
"""
from __future__ import annotations

import json
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
    cfg = FedConfig.from_json(json.loads(Path(str(context.run_config["config"])).read_text()))
    out = Path(str(context.run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    ws = prepare(cfg.data)
    setup = build_setup(cfg, ws, progress=False)
    rc = context.run_config
    strategy = FedPFTStrategy(cfg, ws, setup, out, min_answers=int(rc.get("min-answers", 0)) or None,
                              round_timeout=float(rc.get("round-timeout", 3600)))
    strategy.start(grid, timeout=float(rc.get("timeout", 3600)))
