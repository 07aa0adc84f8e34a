"""Flower's simulation engine: the same ServerApp, ClientApp and strategy, the clients in Ray actors.

``fedpft-lab run --engine flower-sim`` runs the ServerApp on a thread of this process (it holds the FM) and each
client's message in a Ray actor, a worker process of a private, local Ray instance: one actor per core, loopback
only, no dashboard, no usage statistics, its files (and the clients' proxies between rounds) in a temporary
folder that goes with it. Flower's
``run_simulation`` leaves the run configuration empty, so the settings are bound to the ServerApp
(:func:`~.server_app.make_app`). Ray is an optional extra: ``pip install 'fedpft-lab[flower-sim]'``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...config import FedConfig
from ...errors import ConfigError
from .deploy import CLIENT_STORE, QUIET_ENV, check_flower_config, flower_env, running

# What the Flower and Ray code of this process reads at import time: set before either is imported.
DRIVER_ENV = ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED",
              "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")


def check_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--engine flower-sim needs Ray: pip install 'fedpft-lab[flower-sim]' "
                          "(or use --engine flower, which needs no Ray)")


class RaySession:
    """A private local Ray instance; :meth:`stop` shuts it down and ends whatever of it is left, by pid."""

    def __init__(self, temp_dir: Path, num_cpus: int) -> None:
        import psutil
        import ray

        env = flower_env(temp_dir / "home")   # this checkout first on the workers' path, quiet and offline
        ray.init(address="local", num_cpus=num_cpus, num_gpus=0, include_dashboard=False,
                 _node_ip_address="127.0.0.1", _temp_dir=str(temp_dir / "ray"), logging_level="WARNING",
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {**{k: env[k] for k in (*QUIET_ENV, "PYTHONPATH")},
                                           CLIENT_STORE: str(temp_dir / "clients")}})  # proxies on disk
        self.found = {p.pid: p for p in psutil.Process().children(recursive=True)}   # GCS, raylet, agents
        self.stopped: list[int] = []

    def note_workers(self) -> None:
        """Remember the processes Ray started since (its workers), so that :meth:`stop` can end them too."""
        import psutil

        self.found.update({p.pid: p for p in psutil.Process().children(recursive=True)})

    def stop(self, grace: float = 10.0) -> None:
        import psutil
        import ray

        self.note_workers()
        with contextlib.suppress(Exception):
            ray.shutdown()
        self.stopped = sorted(self.found)
        _, alive = psutil.wait_procs(list(self.found.values()), timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=grace)

    def still_running(self) -> list[int]:
        """The pids :meth:`stop` found that still run (a zombie waiting for its parent does not)."""
        return running(self.stopped)


@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[RaySession]:
    """A :class:`RaySession` with ``num_cpus`` (default: every core), stopped on exit, its folder removed."""
    for key in DRIVER_ENV:
        os.environ.setdefault(key, QUIET_ENV[key])
    # a short folder: Ray's socket paths must stay under the 107 characters a Unix socket name allows
    with tempfile.TemporaryDirectory(prefix="fedpft-ray-", dir="/tmp" if os.path.isdir("/tmp") else None,
                                     ignore_cleanup_errors=True) as tmp:
        session = None
        try:
            session = RaySession(Path(tmp), num_cpus or os.cpu_count() or 1)
            yield session
        finally:
            if session is not None:
                session.stop()


def run_flower_sim(cfg: FedConfig, out_dir: str | os.PathLike, resume: bool = False, client_app=None,
                   session: list | None = None) -> dict:
    """``cfg`` on Flower's simulation engine: the same metrics as the in-process run.

    ``client_app``: another ClientApp (a test's probe around the real one). ``session``: a list that receives the
    :class:`RaySession`, to check afterwards that none of its processes outlived the run.
    """
    check_flower_config(cfg)
    check_ray()
    out = Path(out_dir)
    with ray_session() as ray:
        if session is not None:
            session.append(ray)
        from flwr.simulation import run_simulation

        from .client_app import app
        from .server_app import make_app

        server = make_app(cfg, out, resume=resume, engine="flower-sim",
                          on_round=lambda record: ray.note_workers())
        run_simulation(server, client_app or app, cfg.data.clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    if len(metrics.get("rounds", [])) != cfg.rounds + 1:
        raise RuntimeError("the Flower simulation did not finish: see the log above")
    return metrics
