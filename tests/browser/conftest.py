"""Fixtures for the real-browser suite: a private JupyterLab on 127.0.0.1 and Debian's Chromium under Playwright.

* ``chromium`` finds a Chromium binary (``FEDPFT_LAB_CHROMIUM``, else Debian's ``/usr/lib/chromium/chromium`` or
  ``chromium`` on the PATH) and skips the suite with the install command when there is none. Playwright launches
  it through ``executable_path``: ``playwright install`` would download a browser, which a closed room cannot.
* ``jupyter_lab`` starts one JupyterLab server for the session: a random token, a free port on 127.0.0.1, its
  own config, settings, workspace and runtime folders under pytest's tmp dir, a ``python3`` kernelspec for this
  interpreter, and a cache folder that shares the test cache's tokenised data and sub-FMs but holds its own
  federated runs, so a panel's Start always trains (a run finished in an earlier session would only replay).
  Every process it starts (the server and, through it, the kernels) is stopped by PID at teardown, even when a
  test failed.
* Screenshots go to ``tests/_screenshots/`` (git-ignored).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LABS = ROOT / "labs"
SCREENSHOTS = ROOT / "tests" / "_screenshots"
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
SERVER_START_S = 120


def find_chromium() -> str | None:
    """The Chromium binary Playwright should drive, or None."""
    explicit = os.environ.get("FEDPFT_LAB_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for candidate in CHROMIUM_CANDIDATES:
        found = candidate if Path(candidate).is_file() else shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium found: install Debian's (apt-get install chromium) or set FEDPFT_LAB_CHROMIUM "
                    "to a Chromium binary; the browser tests drive it with Playwright")
    return path


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict, chromium: str) -> dict:
    """pytest-playwright's launch options, pointed at the local Chromium (headless unless --headed)."""
    return {**browser_type_launch_args, "executable_path": chromium,
            "args": ["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    """A laptop-wide window, so figure widths are what a participant sees; tall, so a screenshot holds a whole panel."""
    return {**browser_context_args, "viewport": {"width": 1400, "height": 2400}}


# ----------------------------------------------------------------------------- the JupyterLab server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _lab_settings(folder: Path) -> None:
    """User settings: every cell in the DOM (no windowing, so offscreen figures render), no news or update pop-ups."""
    _write_json(folder / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings",
                {"windowingMode": "none"})
    _write_json(folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})


def _cache_with_fresh_runs(folder: Path) -> Path:
    """A cache root that links the test cache's files (tokenised data, sub-FMs) but not its ``runs/``, so every
    federated Start trains. Lock files are not linked: filelock refuses a symlink, and each lock is per process
    anyway. What the session computes stays in this folder; an entry it rebuilds replaces only its link."""
    shared = Path(os.environ["FEDPFT_LAB_CACHE"])
    folder.mkdir(parents=True, exist_ok=True)
    for entry in shared.glob("*.pt") if shared.is_dir() else ():
        if entry.is_file() and not entry.name.startswith("."):
            (folder / entry.name).symlink_to(entry)
    return folder


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM ``proc`` (JupyterLab then shuts its kernels down), then kill it and every descendant by PID."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


@dataclass
class JupyterServer:
    url: str
    token: str
    root: Path
    cache: Path
    log: Path
    proc: subprocess.Popen

    def api(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Stop every kernel (each lab test starts one; they hold a model in memory)."""
        for kernel in self.api("/api/kernels"):
            with contextlib.suppress(Exception):
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])


@pytest.fixture(scope="session")
def jupyter_lab(chromium, tmp_path_factory) -> Iterator[JupyterServer]:
    """One JupyterLab server for the browser session (after ``chromium``, so no server starts without a browser)."""
    from ipykernel.kernelspec import install

    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "labs"
    root.mkdir()
    prefix = home / "prefix"
    install(kernel_name="python3", prefix=str(prefix))      # this interpreter, found first via JUPYTER_PATH
    _lab_settings(home / "settings")
    cache = _cache_with_fresh_runs(home / "cache")
    # Kernels import fedpft_lab from this checkout (not whichever checkout the environment's install points at).
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "FEDPFT_LAB_CACHE": str(cache), "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": pythonpath}
    port, token = free_port(), secrets.token_hex(16)
    log = home / "server.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.workspaces_dir={home / 'workspaces'}", f"--LabApp.user_settings_dir={home / 'settings'}",
           "--ServerApp.allow_root=True", "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = JupyterServer(f"http://127.0.0.1:{port}", token, root, cache, log, proc)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(OSError):
                server.api("/api/status")
                break
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process_tree(proc)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


# ----------------------------------------------------------------------------- driving a notebook

def prepare_notebook(server: JupyterServer, lab: str, smoke: bool) -> tuple[str, int | None]:
    """Copy ``labs/<lab>.ipynb`` into the server's root with papermill-style injected parameters (SMOKE, live
    widgets, OUT_DIR in the session's tmp dir). Returns the copy's name and the index of its live-panel cell (None: the lab has none)."""
    import nbformat

    name = f"{lab}{'' if smoke else '_default'}.ipynb"
    notebook = nbformat.read(LABS / f"{lab}.ipynb", as_version=4)
    out_dir = server.root / "_out" / name.removesuffix(".ipynb")
    params = {"SMOKE": smoke, "SEED": 0, "HEADLESS": False, "OUT_DIR": str(out_dir)}
    at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]         # what papermill would add, as papermill does
    notebook.cells.insert(at + 1, injected)
    nbformat.write(notebook, server.root / name)
    panel = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and "if not HEADLESS" in c.source]
    assert len(panel) <= 1, f"{lab}: expected one live-panel cell (`if not HEADLESS: display(...)`), found {panel}"
    return name, panel[0] if panel else None


# JavaScript run in the page. The notebook model (outputs as nbformat JSON) comes from JupyterLab's own objects
# (``expose_app_in_browser``); figures are read from plotly's graph divs, whose ``_fullData`` holds what plotly
# actually drew (``_length``: the number of points of a trace after matching its x and y).
_OPEN_JS = """async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    return panel.sessionContext.session.kernel.name;
}"""
_RUN_ALL_JS = "async () => await window.jupyterapp.commands.execute('notebook:run-all-cells')"
_CELLS_JS = """() => window.jupyterapp.shell.currentWidget.content.widgets.map((cell, i) => ({
    index: i, type: cell.model.type, source: cell.model.sharedModel.getSource(),
    outputs: cell.model.type === 'code' ? cell.model.outputs.toJSON() : []}))"""
FIGURES_JS = """(root) => {
    const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'));
    const len = (a) => (a === undefined || a === null) ? 0 : a.length;
    const hash = (text) => { let h = 0; for (const c of text) h = (h * 31 + c.charCodeAt(0)) | 0; return h; };
    return Array.from(root.querySelectorAll('.js-plotly-plot')).map((el) => {
        const svg = el.querySelector('.main-svg');
        const box = svg ? svg.getBoundingClientRect() : null;
        const title = el.querySelector('.gtitle');
        const tb = title ? title.getBoundingClientRect() : null;
        const full = el._fullData || [];
        return {
            cell: cells.indexOf(el.closest('.jp-Cell')),
            title: (el.layout && el.layout.title && el.layout.title.text) || '',
            width: box ? box.width : 0, height: box ? box.height : 0,
            title_overflow: (tb && box) ? Math.max(box.left - tb.left, tb.right - box.right, box.top - tb.top) : 0,
            xticks: Array.from(el.querySelectorAll('.xtick text')).map((t) => t.textContent),
            xtitle: (el._fullLayout && el._fullLayout.xaxis && el._fullLayout.xaxis.title.text) || '',
            axis_titles: Array.from(el.querySelectorAll(
                '[class^="g-x"][class$="title"], [class^="g-y"][class$="title"]'))
                .map((t) => t.textContent).filter((t) => t),
            legend: Array.from(el.querySelectorAll('.legend .legendtext')).map((t) => t.textContent),
            shapes: ((el.layout && el.layout.shapes) || []).length,
            traces: (el.data || []).map((t, i) => {
                const f = full[i] || {};
                const n = (typeof f._length === 'number') ? f._length
                    : Math.max(len(t.z), Math.min(len(t.x) || Infinity, len(t.y) || Infinity) % Infinity);
                return {name: t.name || '', type: t.type || 'scatter', points: n, x: len(t.x), y: len(t.y),
                        data: hash(JSON.stringify([t.x, t.y, t.z]))};
            }),
        };
    });
}"""
# A description is cut when its text is wider than its box (ipywidgets ends it with an ellipsis).
CUT_LABELS_JS = """(root) => Array.from(root.querySelectorAll(
        '.widget-label, .widget-label-basic, .widget-label-basic span, .widget-checkbox label, button'))
    .filter((el) => el.offsetParent !== null && el.textContent.trim() && el.scrollWidth > el.clientWidth + 1)
    .map((el) => el.textContent.trim())"""
WIDGET_ERRORS_JS = """(root) => Array.from(root.querySelectorAll('.jp-OutputArea-output'))
    .map((el) => el.innerText || '')
    .filter((t) => /Error displaying widget|model not found|Loading widget|Failed to load model/i.test(t))"""


class LabPage:
    """One lab notebook open in JupyterLab: run it, read its outputs and figures, drive its live panel."""

    def __init__(self, server: JupyterServer, page, lab: str, smoke: bool) -> None:
        self.server, self.page, self.lab, self.smoke = server, page, lab, smoke
        self.name, self.panel_index = prepare_notebook(server, lab, smoke)

    def open(self, timeout_s: float = 180) -> None:
        self.page.set_default_timeout(timeout_s * 1000)
        self.page.goto(f"{self.server.url}/lab/tree/{self.name}?token={self.server.token}&reset")
        self.page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                    "&& window.jupyterapp.shell.currentWidget.sessionContext")
        kernel = self.page.evaluate(_OPEN_JS)
        assert kernel == "python3", f"{self.name} started kernel {kernel!r}"

    def run_all(self) -> float:
        """Run All and wait until every cell has run (JupyterLab resolves the command then); its seconds."""
        started = time.monotonic()
        ok = self.page.evaluate(_RUN_ALL_JS)
        seconds = time.monotonic() - started
        assert ok, f"{self.name}: Run All reported a failed cell:\n{self.error_text()}"
        return seconds

    def cells(self) -> list[dict]:
        return self.page.evaluate(_CELLS_JS)

    def error_text(self) -> str:
        bad = [o for c in self.cells() for o in c["outputs"]
               if o["output_type"] == "error" or o.get("name") == "stderr"]
        return "\n".join(("".join(o.get("traceback", [])) if o["output_type"] == "error" else o.get("text", ""))
                         for o in bad)[-4000:]

    def notebook(self):
        return self.page.locator(".jp-Notebook")

    def panel(self):
        """The output area of the live-panel cell."""
        assert self.panel_index is not None, f"{self.name} has no live panel"
        return self.page.locator(".jp-Notebook .jp-Cell").nth(self.panel_index).locator(".jp-OutputArea")

    def figures(self, root=None) -> list[dict]:
        return (root if root is not None else self.notebook()).evaluate(FIGURES_JS)

    def cut_labels(self, root=None) -> list[str]:
        return (root if root is not None else self.notebook()).evaluate(CUT_LABELS_JS)

    def widget_errors(self) -> list[str]:
        return self.notebook().evaluate(WIDGET_ERRORS_JS)

    def screenshot(self, folder: Path, what: str, locator=None) -> Path:
        path = folder / f"{self.name.removesuffix('.ipynb')}-{what}.png"
        (locator if locator is not None else self.page).screenshot(path=str(path))
        return path


@pytest.fixture
def open_lab(jupyter_lab, page):
    """``open_lab(lab, smoke)`` -> an opened :class:`LabPage`; its kernel is shut down after the test."""
    def open_(lab: str, smoke: bool = True) -> LabPage:
        lab_page = LabPage(jupyter_lab, page, lab, smoke)
        lab_page.open()
        return lab_page

    try:
        yield open_
    finally:
        jupyter_lab.shutdown_kernels()


# ----------------------------------------------------------------------------- feedback timings

@pytest.fixture(scope="session")
def feedback_log(screenshots) -> Iterator[list[dict]]:
    """Measured Start -> first visible update and Stop -> stopped times, written to feedback.json at the end."""
    log: list[dict] = []
    try:
        yield log
    finally:
        if log:
            (screenshots / "feedback.json").write_text(json.dumps(log, indent=1), encoding="utf-8")
