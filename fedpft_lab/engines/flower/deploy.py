"""A local Flower Deployment Engine: one SuperLink and one SuperNode process per client, on 127.0.0.1.

``fedpft-lab run --engine flower`` starts it, submits the run (``flwr run``), waits for ``metrics.json`` and tears
every process down by its process group, even when something fails. ``fedpft-lab server`` / ``client`` run the
same pieces on machines of a room. Offline and quiet: telemetry and update checks off, no per-run ``uv sync``
(``--disable-runtime-dependency-installation``), a private ``FLWR_HOME``. Every process imports this checkout
of ``fedpft_lab`` (``PYTHONPATH``), so all of them run the same code.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...config import FedConfig
from ...errors import ConfigError

CLIENT_STORE = "FEDPFT_LAB_CLIENT_STORE"   # where a client keeps its proxy between rounds (see client_app)
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",   # Ray 2.55 warns unless told its future default
             "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedpft-flower-app"
version = "1.0.0"

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedpft-lab"

[tool.flwr.app.components]
serverapp = "fedpft_lab.engines.flower.server_app:app"
clientapp = "fedpft_lab.engines.flower.client_app:app"

[tool.flwr.app.config]
config = ""
out-dir = ""
timeout = 3600.0
round-timeout = 3600.0
min-answers = 0
resume = false
"""


def tool(name: str) -> str:
    """A Flower command of this Python environment (next to its interpreter), else from ``PATH``."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise ConfigError(f"--engine flower needs Flower's {name}: pip install 'fedpft-lab[flower]'")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process: quiet, offline, private home, this checkout first on the path."""
    root = str(Path(__file__).resolve().parents[3])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    bin_path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))  # flower-superexec
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home), "PYTHONPATH": path, "PATH": bin_path}


def wait_for_port(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Until something listens on ``host:port`` (a loaded machine may take a minute); fails early if ``proc``,
    the process that should listen there, exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run: what a clean-up missed (a zombie waiting for its parent does not count)."""
    import psutil

    def runs(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [pid for pid in pids if runs(pid)]


class Processes:
    """The processes a deployment started (each in a session of its own), stopped with their descendants."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env, self.procs = log_dir, env, []
        self.stopped: list[int] = []   # every pid :meth:`stop` found (started processes and their descendants)
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """``args`` as a process of its own, output in ``<log_dir>/<name>.log``; ``env``: added to the common one."""
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def still_running(self) -> list[int]:
        """The pids :meth:`stop` found that still run (a zombie waiting for its parent does not)."""
        return running(self.stopped)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every started process and every descendant (Flower starts its SuperExec and app processes
        in sessions of their own, so a process group is not enough), then SIGKILL to what remains."""
        import psutil

        found: dict[int, psutil.Process] = {}
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    found[q.pid] = q
            except psutil.NoSuchProcess:
                pass
        self.stopped = sorted(found)
        for q in found.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                q.terminate()
        _, alive = psutil.wait_procs(list(found.values()), timeout=grace)
        for q in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                q.kill()
        psutil.wait_procs(alive, timeout=grace)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)   # reap our own children


def superlink_args(host: str, port: int) -> list[str]:
    return [tool("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]


def supernode_args(superlink: str, port: int, partition: int, num_partitions: int) -> list[str]:
    return [tool("flower-supernode"), "--insecure", "--superlink", superlink, "--port", str(port),
            "--node-config", f"partition-id={partition} num-partitions={num_partitions}"]


def write_app(folder: Path, home: Path, address: str) -> None:
    """The Flower app folder (its pyproject names our ServerApp and ClientApp) and the connection ``loopback``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "{address}"\ninsecure = true\n')


def submit(cfg: FedConfig, out: Path, app: Path, env: dict[str, str], timeout: float,
           round_timeout: float | None = None, min_answers: int = 0, resume: bool = False) -> dict:
    """``flwr run`` the configured run on the SuperLink of ``env``'s home; wait for it; return its metrics.

    ``round_timeout`` / ``min_answers``: a round goes on without the clients that did not answer in time, if at
    least ``min_answers`` did (0: all must). ``resume``: the server continues the run saved in ``out``.
    """
    (out / "flower-logs").mkdir(parents=True, exist_ok=True)
    config = out / "flower-config.json"
    config.write_text(json.dumps(cfg.to_json()))
    run_config = (f"config='{config.resolve()}' out-dir='{out.resolve()}' timeout={float(timeout)} "
                  f"round-timeout={float(round_timeout or timeout)} min-answers={int(min_answers)} "
                  f"resume={str(bool(resume)).lower()}")
    with open(out / "flower-logs" / "flwr-run.log", "wb") as log:
        subprocess.run([tool("flwr"), "run", str(app), "loopback", "--run-config", run_config, "--stream"],
                       env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    if len(metrics.get("rounds", [])) != cfg.rounds + 1:
        raise RuntimeError(f"the Flower run did not finish: see the logs in {out / 'flower-logs'}")
    return metrics


@contextmanager
def local_deployment(num_nodes: int, log_dir: Path) -> Iterator[tuple[Processes, Path, dict[str, str]]]:
    """SuperLink + ``num_nodes`` SuperNodes (partition ids 0..n-1) on 127.0.0.1, free ports, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="fedpft-flower-") as tmp:
        home, app = Path(tmp) / "home", Path(tmp) / "app"
        env = flower_env(home)
        procs = Processes(log_dir, env)
        try:
            port = free_port()
            address = f"127.0.0.1:{port}"
            write_app(app, home, address)
            link = procs.start("superlink", superlink_args("127.0.0.1", port))
            wait_for_port("127.0.0.1", port, link)
            for k in range(num_nodes):   # each client keeps its proxy in a folder of its own (client_app.STORE)
                procs.start(f"supernode-{k}", supernode_args(address, free_port(), k, num_nodes),
                            {CLIENT_STORE: str(Path(tmp) / "clients" / str(k))})
            yield procs, app, env
        finally:
            procs.stop()


def run_flower(cfg: FedConfig, out_dir: str | os.PathLike, timeout: float = 3600, resume: bool = False) -> dict:
    """``cfg`` on a local Flower deployment (one SuperNode per client): the same metrics as the in-process run.
    ``resume``: continue the run saved in ``out_dir`` (its clients get their proxies again)."""
    check_flower_config(cfg)
    out = Path(out_dir)
    with local_deployment(cfg.data.clients, out / "flower-logs") as (_, app, env):
        return submit(cfg, out, app, env, timeout, resume=resume)


def check_flower_config(cfg: FedConfig) -> None:
    if cfg.measure_update:
        raise ConfigError("measure_update replays a client's data on the server's FM, which a real deployment "
                          "cannot do: use --engine inprocess for it")


# --------------------------------------------------------------------------- a room: one server, many laptops

def serve(cfg: FedConfig, out_dir: str | os.PathLike, host: str, port: int, timeout: float = 3600,
          say=print, resume: bool = False) -> dict:
    """The server of a room: a SuperLink on ``host:port`` and the ServerApp for ``cfg``; waits for one client per
    partition (``fedpft-lab client``), runs, and stops the SuperLink. ``resume``: continue the run saved in
    ``out_dir`` (a server restarted after a crash)."""
    check_flower_config(cfg)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="fedpft-flower-") as tmp:
        home, app = Path(tmp) / "home", Path(tmp) / "app"
        env = flower_env(home)
        procs = Processes(out / "flower-logs", env)
        try:
            write_app(app, home, f"127.0.0.1:{port}")
            link = procs.start("superlink", superlink_args(host, port))
            wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, link)
            shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
            say(f"SuperLink listening on {host}:{port}. Each participant runs, with K = 0..{cfg.data.clients - 1}:")
            say(f"  fedpft-lab client --server {shown}:{port} --partition-id K --num-partitions {cfg.data.clients}")
            return submit(cfg, out, app, env, timeout, resume=resume)
        finally:
            procs.stop()


def join(server: str, partition: int, num_partitions: int, port: int | None = None) -> int:
    """A participant: a SuperNode serving shard ``partition`` until the server's run ends (or Ctrl-C)."""
    with tempfile.TemporaryDirectory(prefix="fedpft-flower-") as tmp:
        args = supernode_args(server, port or free_port(), partition, num_partitions)
        env = {**flower_env(Path(tmp) / "home"), CLIENT_STORE: str(Path(tmp) / "client")}
        return subprocess.run(args, env=env, check=False).returncode
