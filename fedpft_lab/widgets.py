"""Interactive panels for the labs: ipywidgets controls driving plotly ``FigureWidget``s.

Two kinds of panel:

* **Instant explorers** (``partition_explorer``, ``convex_explorer``): every control change recomputes a cheap
  pure function (< 1 s) and rewrites the FigureWidget traces inside ``fig.batch_update()`` (one message to the
  browser instead of one per property). No threads.
* **RunPanel** for expensive work (a federated run, distillation): Start/Stop buttons, a progress bar, a status
  line and live figures, around a ``BackgroundRun`` (see runner.py). Controls are disabled while it runs.

Every panel is a ``VBox`` that also exposes its parts (``panel.controls``, ``panel.figs``, ``panel.readout``),
so tests can set ``panel.controls["alpha"].value = 0.1`` or call ``panel.start_button.click()`` without a
browser and check the trace data. Callbacks never print: they only set widget traits and figure data.
Notebooks display a panel only when not headless: ``if not HEADLESS: display(panel)``.
"""
from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Mapping, Sequence

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go

from . import convex, partition, plots
from .errors import ConfigError
from .runner import BackgroundRun, Event, Work


class Panel(w.VBox):
    """A VBox that keeps handles on its controls, figures and readout (for notebooks and tests)."""

    def __init__(self, controls: Mapping[str, w.Widget], figs: Mapping[str, go.FigureWidget],
                 readout: w.HTML, title: str = "") -> None:
        header = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        super().__init__(header + [w.HBox(list(controls.values()), layout=w.Layout(flex_flow="row wrap")),
                                   readout, *figs.values()])
        self.controls = dict(controls)
        self.figs = dict(figs)
        self.readout = readout


def _batch(figs: Sequence[go.FigureWidget]) -> contextlib.ExitStack:
    """One ``batch_update`` across several figures, so the browser redraws each figure once."""
    stack = contextlib.ExitStack()
    for fig in figs:
        stack.enter_context(fig.batch_update())
    return stack


def _error_html(exc: BaseException) -> str:
    return f"<span style='color:#b00'><b>{type(exc).__name__}:</b> {html.escape(str(exc))}</span>"


def extend_trace(trace: go.Scatter, xs: Sequence, ys: Sequence) -> None:
    """Append points to a (FigureWidget) trace; works whether its data is empty, a tuple or a NumPy array."""
    old_x = [] if trace.x is None else list(trace.x)
    old_y = [] if trace.y is None else list(trace.y)
    trace.x, trace.y = old_x + list(xs), old_y + list(ys)


def round_curve_updater(keys: Sequence[str] = ("accuracy", "sub_accuracy"),
                        ) -> Callable[[Event, list[go.FigureWidget]], None]:
    """An ``on_event`` for RunPanel that draws round records into ``plots.empty_round_curves(keys)`` (figs[0]).

    An event with ``"round"`` adds a point to every key it carries; ``"aligned": True`` also adds the marker
    and the dotted vertical line, exactly as ``plots.round_curves`` draws a finished run.
    """
    keys = list(keys)

    def update(event: Event, figs: list[go.FigureWidget]) -> None:
        if "round" not in event:
            return
        fig, x = figs[0], event["round"]
        for trace, key in zip(fig.data, keys):
            if event.get(key) is not None:
                extend_trace(trace, [x], [event[key]])
        if event.get("aligned"):
            extend_trace(fig.data[len(keys)], [x], [event.get(keys[0])])
            fig.add_shape(**plots.alignment_line(x))

    return update


# ----------------------------------------------------------------------------- RunPanel

class RunPanel(w.VBox):
    """Start/Stop + progress + status + live figures around ``work(stop, emit)``.

    * ``work`` is called afresh on every Start, so it can read the current values of ``controls``.
    * Events with ``"progress"`` (0..1) move the bar; events with ``"status"`` (text) update the status line;
      every event is then handed to ``on_event(event, figs)`` inside one batch update of all figures.
    * ``on_start(figs)`` (optional) clears or resets the figures before a run (main thread).
    """

    def __init__(self, work: Work, on_event: Callable[[Event, list[go.FigureWidget]], None],
                 figs: Sequence[go.Figure], controls: Sequence[w.Widget] = (),
                 on_start: Callable[[list[go.FigureWidget]], None] | None = None, title: str = "") -> None:
        if not callable(on_event):
            raise ConfigError("on_event must be callable as on_event(event, figs)")
        self.figs = [f if isinstance(f, go.FigureWidget) else go.FigureWidget(f) for f in figs]
        self.controls = list(controls)
        self.on_start = on_start
        self.on_event_update = on_event
        self.start_button = w.Button(description="Start", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress")
        self.status = w.HTML("ready")
        self.run = BackgroundRun(work)
        self.run.on_event(self._handle_event)
        self.run.on_done(self._handle_done)
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        header = [w.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        row = w.HBox([self.start_button, self.stop_button, self.progress])
        super().__init__(header + [w.HBox(self.controls, layout=w.Layout(flex_flow="row wrap")),
                                   row, self.status, *self.figs])

    def _set_running(self, running: bool) -> None:
        self.start_button.disabled = running
        self.stop_button.disabled = not running
        for control in self.controls:
            control.disabled = running

    def start(self) -> None:
        """What the Start button does: reset figures, lock controls, launch the work in a thread."""
        if self.run.running:
            return
        self._set_running(True)
        self.progress.value = 0.0
        self.status.value = "running…"
        try:
            if self.on_start is not None:
                with _batch(self.figs):
                    self.on_start(self.figs)
            self.run.start()
        except Exception as exc:  # noqa: BLE001 - shown to the participant, controls unlocked
            self._set_running(False)
            self.status.value = _error_html(exc)

    def stop(self) -> None:
        """What the Stop button does: ask the work to finish after its current step."""
        if self.run.running:
            self.run.stop()
            self.status.value = "stopping after the current step…"

    def _handle_event(self, event: Event) -> None:
        if "progress" in event:
            self.progress.value = float(min(max(event["progress"], 0.0), 1.0))
        if "status" in event:
            self.status.value = html.escape(str(event["status"]))
        with _batch(self.figs):
            self.on_event_update(event, self.figs)

    def _handle_done(self, run: BackgroundRun) -> None:
        if run.error is not None:
            self.status.value = _error_html(run.error)
        elif run.stopped:
            self.status.value = f"stopped after {len(run.events)} updates ({run.seconds:.1f} s)"
        else:
            self.progress.value = 1.0
            self.status.value = f"done in {run.seconds:.1f} s"
        self._set_running(False)


# ----------------------------------------------------------------------------- lab 01: partition explorer

def _partition_summary(counts: np.ndarray, iid_share: float) -> str:
    sizes = counts.sum(axis=1)
    return (f"mean majority-label share <b>{plots.majority_share(counts):.2f}</b> "
            f"(IID: about {iid_share:.2f}, 1.00: one label per client); client sizes {sizes.min()}–{sizes.max()}")


def partition_explorer(labels: Sequence[int] | np.ndarray, label_names: Sequence[str], num_clients: int = 10,
                       alpha: float = 1.0, scheme: str = "dirichlet", convention: str = "flgo",
                       seed: int = 0) -> Panel:
    """Sliders for clients and alpha, dropdowns for scheme and alpha convention, and a seed box.

    Every change re-partitions ``labels`` and redraws a clients x labels heatmap and per-client stacked bars.
    """
    labels = np.asarray(labels)
    num_labels = len(label_names)
    iid_share = float(np.bincount(labels, minlength=num_labels).max() / len(labels))   # the global majority
    controls = {
        "clients": w.IntSlider(value=num_clients, min=2, max=max(100, num_clients), description="clients",
                               continuous_update=False),
        "alpha": w.FloatLogSlider(value=alpha, base=10, min=-2, max=2, step=0.1, description="alpha",
                                  readout_format=".3g", continuous_update=False),
        "scheme": w.Dropdown(options=list(partition.SCHEMES), value=scheme, description="scheme"),
        "convention": w.Dropdown(options=list(partition.CONVENTIONS), value=convention,
                                 description="convention"),
        "seed": w.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed"),
    }
    readout = w.HTML()

    def current_counts() -> np.ndarray:
        parts = partition.partition(labels, controls["clients"].value, scheme=controls["scheme"].value,
                                    alpha=controls["alpha"].value, seed=controls["seed"].value,
                                    convention=controls["convention"].value)
        return partition.label_count_matrix(parts, labels, num_labels)

    counts = current_counts()
    heatmap = go.FigureWidget(plots.client_label_heatmap(counts, label_names))
    bars = go.FigureWidget(plots.client_label_bars(counts, label_names))
    readout.value = _partition_summary(counts, iid_share)

    def sync_enabled() -> None:
        # alpha and the convention only mean something for the Dirichlet scheme
        iid = controls["scheme"].value == "iid"
        controls["alpha"].disabled = controls["convention"].disabled = iid

    def redraw(_change: object = None) -> None:
        sync_enabled()
        try:
            counts = current_counts()
        except ConfigError as exc:
            readout.value = _error_html(exc)
            return
        names = plots.client_names(len(counts))
        with _batch([heatmap, bars]):
            heatmap.data[0].update(z=plots.label_shares(counts), y=names, customdata=counts)
            for c, trace in enumerate(bars.data):
                trace.update(x=names, y=counts[:, c])
        readout.value = _partition_summary(counts, iid_share)

    sync_enabled()
    for control in controls.values():
        control.observe(redraw, names="value")
    return Panel(controls, {"heatmap": heatmap, "bars": bars}, readout, title="Partition explorer")


# ----------------------------------------------------------------------------- lab 07: convex explorer

def convex_explorer(problem: convex.LeastSquares | None = None, num_steps: int = 3000, delta: float = 1e-4,
                    period: int = 50) -> Panel:
    """Sliders for the bias growth ``delta`` and the re-alignment period ``T``; curves recompute instantly."""
    problem = problem if problem is not None else convex.make_problem()
    controls = {
        "delta": w.FloatLogSlider(value=delta, base=10, min=-6, max=-2, step=0.25, description="delta",
                                  readout_format=".1e", continuous_update=False),
        "period": w.IntSlider(value=period, min=1, max=500, description="period T", continuous_update=False),
    }
    readout = w.HTML()
    true_gaps = convex.gradient_descent_gaps(problem, num_steps)

    def proxy_curves() -> tuple[np.ndarray, np.ndarray]:
        d, t = controls["delta"].value, controls["period"].value
        return (convex.gradient_descent_gaps(problem, num_steps, d, None),
                convex.gradient_descent_gaps(problem, num_steps, d, t))

    never, every = proxy_curves()
    fig = go.FigureWidget(plots.convex_curves(
        {"true gradient": true_gaps, "proxy, never re-aligned": never,
         f"proxy, re-aligned every T={period}": every},
        bound=convex.gd_bound(problem, num_steps)))

    def readout_html(never: np.ndarray, every: np.ndarray) -> str:
        return (f"final gap: true {convex.final_gap(true_gaps):.2e} · never re-aligned "
                f"{convex.final_gap(never):.2e} · re-aligned every {controls['period'].value} steps "
                f"<b>{convex.final_gap(every):.2e}</b>")

    readout.value = readout_html(never, every)

    def redraw(_change: object = None) -> None:
        never, every = proxy_curves()
        with fig.batch_update():
            fig.data[1].y = np.maximum(never[1:], 1e-16)
            fig.data[2].y = np.maximum(every[1:], 1e-16)
            fig.data[2].name = f"proxy, re-aligned every T={controls['period'].value}"
        readout.value = readout_html(never, every)

    for control in controls.values():
        control.observe(redraw, names="value")
    return Panel(controls, {"gaps": fig}, readout, title="Biased gradient descent explorer")
