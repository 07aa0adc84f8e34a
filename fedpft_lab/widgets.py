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
from ipywidgets.widgets.widget_description import DescriptionWidget

from . import convex, partition, plots
from .errors import ConfigError
from .runner import BackgroundRun, Event, Work


def fit_descriptions(controls: Sequence[w.Widget]) -> None:
    """Show every control's description in full: ipywidgets gives it a fixed width and cuts the rest
    ("weight ter…", "proportio…"); a checkbox also reserves an empty label column and a 300-px box."""
    for control in controls:
        if isinstance(control, w.Checkbox):
            control.indent = False
            control.layout.width = "auto"
        elif isinstance(control, DescriptionWidget):
            control.style.description_width = "initial"


class Panel(w.VBox):
    """A VBox that keeps handles on its controls, figures and readout (for notebooks and tests)."""

    def __init__(self, controls: Mapping[str, w.Widget], figs: Mapping[str, go.FigureWidget],
                 readout: w.HTML, title: str = "") -> None:
        fit_descriptions(list(controls.values()))
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
        fit_descriptions(self.controls)
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
        for control in self.controls:           # controls first: Start is clickable only once they are free
            control.disabled = running
        self.start_button.disabled = running
        self.stop_button.disabled = not running

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
        # Unlock first, then say so: the front end applies widget updates in the order they are sent, so whoever
        # reads "done" (a participant, the browser tests) must find the controls already free.
        self._set_running(False)
        if run.error is not None:
            self.status.value = _error_html(run.error)
        elif run.stopped:
            self.status.value = f"stopped after {len(run.events)} updates ({run.seconds:.1f} s)"
        else:
            self.progress.value = 1.0
            self.status.value = f"done in {run.seconds:.1f} s"


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


# ----------------------------------------------------------------------------- composable RunPanel updaters

def combine_updaters(*updaters: Callable[[Event, list[go.FigureWidget]], None],
                     ) -> Callable[[Event, list[go.FigureWidget]], None]:
    """One ``on_event`` that hands every event to each updater in turn (e.g. curves in figs[0], cost in figs[1])."""
    def update(event: Event, figs: list[go.FigureWidget]) -> None:
        for updater in updaters:
            updater(event, figs)

    return update


def step_curve_updater(key: str = "loss", step_key: str = "step", fig_index: int = 0, trace_index: int = 0,
                       ) -> Callable[[Event, list[go.FigureWidget]], None]:
    """Append ``(event[step_key], event[key])`` to one trace, for events that carry both (a live loss curve)."""
    def update(event: Event, figs: list[go.FigureWidget]) -> None:
        if step_key in event and event.get(key) is not None:
            extend_trace(figs[fig_index].data[trace_index], [event[step_key]], [event[key]])

    return update


def cumulative_cost_updater(fig_index: int = 1) -> Callable[[Event, list[go.FigureWidget]], None]:
    """Draw cumulative MB uploaded (trace 0) and downloaded (trace 1) from round records into figs[fig_index]."""
    def update(event: Event, figs: list[go.FigureWidget]) -> None:
        if "round" not in event:
            return
        fig = figs[fig_index]
        for trace, key in zip(fig.data, ("bytes_up", "bytes_down")):
            total = (trace.y[-1] if trace.y else 0.0) + event.get(key, 0) / 1e6
            extend_trace(trace, [event["round"]], [total])

    return update


def method_curve_updater(names: Sequence[str], key: str = "accuracy", fig_index: int = 0,
                         ) -> Callable[[Event, list[go.FigureWidget]], None]:
    """For several runs streamed one after another: an event ``{"method": name, "round": r, key: v}`` extends
    the trace of ``name`` (trace order = ``names``); ``before_align`` values draw the alignment step first."""
    names = list(names)

    def update(event: Event, figs: list[go.FigureWidget]) -> None:
        if "round" not in event or event.get("method") not in names or event.get(key) is None:
            return
        fig = figs[fig_index]
        trace = fig.data[names.index(event["method"])]
        before = (event.get("before_align") or {}).get(key) if event.get("aligned") else None
        if before is not None:
            extend_trace(trace, [event["round"], event["round"]], [before, event[key]])
            fig.add_shape(**plots.alignment_line(event["round"]))
        else:
            extend_trace(trace, [event["round"]], [event[key]])

    return update


# ----------------------------------------------------------------------------- lab 02: sub-FM explorer

def subfm_explorer(fm, saliencies: Mapping[int, np.ndarray], keep_ratio: float = 0.25,
                   retained: Sequence[int] = (), bins: int = 40) -> Panel:
    """Keep-ratio slider and retained-layer picker; parameter counts and saliency histograms redraw instantly.

    Everything here is arithmetic on the FM's shapes and on saliencies computed once, so no model is built;
    the expensive rebuild + gradient discrepancy lives behind a RunPanel button in the lab.
    """
    from . import lab_helpers

    n = len(saliencies)
    controls = {
        "keep_ratio": w.FloatSlider(value=keep_ratio, min=0.05, max=1.0, step=0.05, description="keep ratio",
                                    continuous_update=False, readout_format=".2f"),
        "retained": w.SelectMultiple(options=[(f"layer {i}", i) for i in range(n)], value=tuple(retained),
                                     rows=min(n, 6), description="retained"),
    }
    readout = w.HTML()

    def current() -> tuple[dict, dict[int, np.ndarray]]:
        ratio, keep = controls["keep_ratio"].value, tuple(controls["retained"].value)
        counts = lab_helpers.proxy_param_counts(fm, ratio, keep)
        return counts, lab_helpers.kept_masks(saliencies, ratio, counts["retained"])

    def summary(counts: dict, masks: dict[int, np.ndarray]) -> str:
        shares = [lab_helpers.kept_saliency_share(saliencies[i], masks[i]) for i in counts["compressed"]]
        share = f"{np.mean(shares):.0%}" if shares else "100%"
        return (f"sub-FM keeps {counts['sub_fm'] / counts['fm']:.0%} of the FM's transformer parameters; "
                f"the layer-drop proxy of the same budget keeps layers {counts['layer_drop_layers']} "
                f"({counts['layer_drop'] / counts['fm']:.0%}). Kept neurons hold <b>{share}</b> of the "
                f"compressed layers' squared saliency.")

    def names_counts(counts: dict) -> dict[str, int]:
        return {"FM": counts["fm"], "layer-wise sub-FM": counts["sub_fm"], "layer-drop proxy": counts["layer_drop"]}

    counts, masks = current()
    bars = go.FigureWidget(plots.param_bars(names_counts(counts)))
    hists = go.FigureWidget(plots.saliency_histograms(saliencies, masks, bins=bins))
    readout.value = summary(counts, masks)

    def redraw(_change: object = None) -> None:
        try:
            counts, masks = current()
        except ConfigError as exc:
            readout.value = _error_html(exc)
            return
        fresh = plots.param_bars(names_counts(counts)).data[0]
        with _batch([bars, hists]):
            bars.data[0].update(y=fresh.y, text=fresh.text)
            layers = sorted(saliencies)
            for k, i in enumerate(layers):
                s = np.asarray(saliencies[i])
                hists.data[2 * k].x = s[masks[i]]
                hists.data[2 * k + 1].x = s[~masks[i]]
            for trace, shown in zip(hists.data, plots.saliency_legend([masks[i] for i in layers])):
                trace.showlegend = shown
        readout.value = summary(counts, masks)

    for control in controls.values():
        control.observe(redraw, names="value")
    return Panel(controls, {"params": bars, "saliency": hists}, readout, title="Sub-FM explorer")


# ----------------------------------------------------------------------------- lab panels (RunPanel presets)

def reset_figures(figs: Sequence[go.FigureWidget]) -> None:
    """Empty every trace and remove layout shapes (alignment lines): the ``on_start`` of the lab panels."""
    for fig in figs:
        for trace in fig.data:
            trace.x, trace.y = [], []
        fig.layout.shapes = ()


def _progress_status(record: Mapping, rounds: int, prefix: str = "") -> str:
    acc = record.get("accuracy")
    sub = record.get("sub_accuracy")
    parts = [f"{prefix}round {record['round']}/{rounds}"]
    if acc is not None:
        parts.append(f"FM accuracy {acc:.3f}")
    if sub is not None:
        parts.append(f"proxy accuracy {sub:.3f}")
    return ", ".join(parts)


# Where each stage of a round sits on the progress bar (share of the round), and how the status line names it
# (with the count's unit, if any). A round's clients take most of its time; round 0 distils the sub-FM (unless
# it is cached), builds the models and evaluates A_0. ``setup`` in a later round: a resumed run is ready.
_STAGES: Mapping[str, tuple[float, float, str, str]] = {
    "setup": (0.0, 0.0, "resuming", ""),
    "train": (0.0, 0.6, "clients training", "batches"),
    "evaluate": (0.6, 0.9, "evaluating", "jobs"),
    "align": (0.9, 0.95, "aligning the sub-FM", "steps"),
    "evaluate aligned": (0.95, 1.0, "re-measuring the aligned sub-FM", "jobs"),
}
_ROUND_0: Mapping[str, tuple[float, float, str, str]] = {
    "distill": (0.0, 0.45, "distilling the sub-FM", "steps"),
    "setup": (0.45, 0.5, "models ready", ""),
    "evaluate": (0.5, 1.0, "evaluating the initial adapter", "jobs"),
}


def run_progress(rounds: int, start: float = 0.0, span: float = 1.0, prefix: str = "",
                 ) -> tuple[Callable[[dict], Event], Callable[[dict], Event]]:
    """Two functions that turn one federated run's reports into panel events: ``of_step(info)`` for the
    ``on_progress`` reports inside a round, ``of_round(record)`` for finished rounds (``on_round``).

    The run's share of the bar is ``start .. start + span`` (several runs in one panel), split into ``rounds + 1``
    equal parts (round 0 is the evaluation before FL); so the bar moves with every client batch, not every round.
    """
    def position(rnd: int, within: float) -> float:
        return start + span * (rnd + within) / (rounds + 1)

    def of_step(info: dict) -> Event:
        lo, hi, what, unit = (_ROUND_0 if info["round"] == 0 else _STAGES)[info["stage"]]
        done, total = info["done"], max(1, info["total"])
        count = f" ({done}/{total} {unit})" if unit else ""
        return {"progress": position(info["round"], lo + (hi - lo) * done / total),
                "status": f"{prefix}round {info['round']}/{rounds}: {what}{count}"}

    def of_round(record: dict) -> Event:
        return {**record, "progress": position(record["round"], 1.0),
                "status": _progress_status(record, rounds, prefix)}

    return of_step, of_round


def construction_panel(fm, batches: Sequence[Mapping], explorer: Panel, lora=None, seed: int = 0) -> RunPanel:
    """Lab 02: rebuild both proxies for the explorer's keep ratio and retained layers, then measure each
    against the FM (per-layer gradient cosine and hidden-state gap). Seconds of work, so behind a button."""
    from . import lab_helpers, models

    n = models.num_layers(fm)
    names = ["layer-wise sub-FM", "layer-drop proxy"]
    empty = {name: [None] * n for name in names}
    cos_title = "Adapter-gradient cosine with the FM, per layer"
    cos_fig = plots.grouped_layer_bars(empty, cos_title, "cosine")
    gap_fig = plots.grouped_layer_bars(empty, "Hidden-state gap to the FM (relative MSE), per layer",
                                       "relative MSE")

    class Stopped(Exception):
        pass

    def work(stop, emit):
        def on_progress(text: str, frac: float) -> None:
            if stop.is_set():              # the measurement has no steps of its own: stop between its phases
                raise Stopped
            emit({"status": text, "progress": frac})

        retained = tuple(explorer.controls["retained"].value)
        try:
            report = lab_helpers.compare_constructions(fm, batches, explorer.controls["keep_ratio"].value, retained,
                                                       lora=lora, seed=seed, on_progress=on_progress)
        except Stopped:
            return None
        emit({"report": report})
        return report

    def on_event(event, figs):
        report = event.get("report")
        if report is None:
            return
        for fig, key in zip(figs, ("layer_cosine", "hidden_rel_mse")):
            for trace, values in zip(fig.data, lab_helpers.construction_series(report, key, n).values()):
                trace.y = values
        lw, ld = report["layer-wise"], report["layer-drop"]
        plots.set_title(figs[0], f"Gradient cosine with the FM: layer-wise {lw['grad_cosine']:.3f}, "
                                 f"layer-drop {ld['grad_cosine']:.3f} (keep ratio {report['keep_ratio']:.2f})")

    def on_start(figs):
        for fig in figs:
            for trace in fig.data:
                trace.y = [None] * n
        plots.set_title(figs[0], cos_title)     # not the last run's numbers while this one runs

    return RunPanel(work, on_event, [cos_fig, gap_fig], on_start=on_start,
                    title="Rebuild both proxies and measure them against the FM")


def distill_panel(ws, sub_cfg, distill_cfg, lora=None, seed: int = 0, max_steps: int = 400) -> RunPanel:
    """Lab 03: layer-level distillation with a live loss curve, then the per-layer gap and the plug-in gap.

    Controls: the step budget, the weight-term coefficient and whether that term gets a gradient (the official
    code computes it on detached weights, so it only shifts the logged loss), and whether the last layer's output
    is matched too (the library's default; the official code matches the compressed layers only).
    """
    from dataclasses import replace

    from . import lab_helpers, models, workspace

    controls = {
        "steps": w.IntSlider(value=distill_cfg.steps, min=5, max=max(max_steps, distill_cfg.steps), step=5,
                             description="steps", continuous_update=False),
        "weight_term": w.Dropdown(options=[0.0, 0.01, 0.1, 1.0], value=distill_cfg.weight_term
                                  if distill_cfg.weight_term in (0.0, 0.01, 0.1, 1.0) else 0.0,
                                  description="weight term α"),
        "grad": w.Checkbox(value=distill_cfg.weight_term_grad, description="weight term trains (differentiable)"),
        "match_output": w.Checkbox(value=distill_cfg.match_output, description="also match the last layer's output"),
    }
    compressed = list(sub_cfg.compressed(models.num_layers(ws.fm)))
    gap_title = "Hidden-state gap per compressed layer"
    loss_fig = plots.loss_curve([], title="Layer-level distillation loss (live)")
    gap_fig = plots.grouped_layer_bars({"before": [None] * len(compressed), "after": [None] * len(compressed)},
                                       gap_title, "relative MSE", layers=compressed)

    def work(stop, emit):
        cfg = replace(distill_cfg, steps=controls["steps"].value, weight_term=controls["weight_term"].value,
                      weight_term_grad=controls["grad"].value, match_output=controls["match_output"].value)
        emit({"status": f"distilling for {cfg.steps} steps (a cached result returns at once)"})
        built = workspace.sub_fm(ws, sub_cfg, cfg, progress=False, stop=stop,
                                 on_step=lambda s, loss: emit({"step": s, "loss": loss,
                                                               "progress": 0.85 * (s + 1) / cfg.steps}))
        emit({"losses": built.distill_loss, "gaps_before": built.gaps_before, "gaps_after": built.gaps_after,
              "status": "measuring the plug-in gap (gradient discrepancy at A_0)"})
        if stop.is_set():
            return built
        emit({"discrepancy": lab_helpers.proxy_discrepancy(ws.fm, built.model, ws.probe_batches, lora, seed)})
        return built

    def on_event(event, figs):
        if "step" in event:
            extend_trace(figs[0].data[0], [event["step"]], [event["loss"]])
        if "losses" in event:
            figs[0].data[0].x, figs[0].data[0].y = list(range(len(event["losses"]))), event["losses"]
            for trace, key in zip(figs[1].data, ("gaps_before", "gaps_after")):
                trace.x, trace.y = compressed, event[key]      # both: the reset emptied x as well
        if "discrepancy" in event:
            d = event["discrepancy"]
            plots.set_title(figs[1], f"{gap_title}; plug-in: gradient cosine {d['grad_cosine']:.3f}, "
                                     f"logit KL {d['logit_kl']:.2e}")

    def on_start(figs):
        reset_figures(figs)
        plots.count_axis(figs[0], controls["steps"].value - 1, fixed=True)
        plots.set_title(figs[1], gap_title)     # a stopped run measures no plug-in gap: drop the last one's

    return RunPanel(work, on_event, [loss_fig, gap_fig], controls=list(controls.values()),
                    on_start=on_start, title="Distil the sub-FM")


def _count_axes(figs: Sequence[go.FigureWidget], last: int) -> None:
    for fig in figs:
        plots.count_axis(fig, last, fixed=True)


def fed_run_panel(cfg, ws) -> RunPanel:
    """Lab 04: one federated run with live FM / proxy accuracy and cumulative communication.

    Controls: rounds, sample fraction, Dirichlet alpha, keep ratio. Runs go through ``federation.cached_run``,
    so a configuration already run (here or in another lab) replays instantly.
    """
    from dataclasses import replace

    from . import federation, workspace

    controls = {
        "rounds": w.IntSlider(value=cfg.rounds, min=1, max=max(20, cfg.rounds), description="rounds",
                              continuous_update=False),
        "sample_fraction": w.FloatSlider(value=cfg.sample_fraction, min=0.1, max=1.0, step=0.05,
                                         description="sampled", continuous_update=False),
        "alpha": w.FloatLogSlider(value=cfg.data.alpha, base=10, min=-1, max=2, step=0.1, description="alpha",
                                  readout_format=".3g", continuous_update=False),
        "keep_ratio": w.FloatSlider(value=cfg.keep_ratio, min=0.05, max=1.0, step=0.05, description="keep ratio",
                                    continuous_update=False),
    }
    keys = ("accuracy", "sub_accuracy")
    curves = plots.empty_round_curves(keys, title="Accuracy per round (live)", ylabel="accuracy", rounds=cfg.rounds)
    cost = plots.count_axis(plots.line_plot([0], {"uploaded by clients": [0.0], "downloaded by clients": [0.0]},
                                            "Cumulative communication (live)", "round", "MB"), cfg.rounds, fixed=True)

    def work(stop, emit):
        data = replace(cfg.data, alpha=controls["alpha"].value)
        run_cfg = replace(cfg, rounds=controls["rounds"].value, sample_fraction=controls["sample_fraction"].value,
                          keep_ratio=controls["keep_ratio"].value, data=data)
        of_step, of_round = run_progress(run_cfg.rounds)
        emit({"status": "preparing the clients' data …"})
        run_ws = ws if data == ws.cfg else workspace.prepare(data, fm=ws.fm)
        emit({"status": "building the proxy (distillation is cached after the first time) …"})
        return federation.cached_run(run_cfg, run_ws, progress=False, stop=stop,
                                     on_round=lambda r: emit(of_round(r)), on_progress=lambda i: emit(of_step(i)))

    def on_start(figs):
        reset_figures(figs)
        _count_axes(figs, controls["rounds"].value)

    update = combine_updaters(round_curve_updater(keys), cumulative_cost_updater(fig_index=1))
    return RunPanel(work, update, [curves, cost], controls=list(controls.values()), on_start=on_start,
                    title="Run FedPFT")


def discrepancy_panel(cfg, ws, baselines: Sequence[str] = ("fedpft-b", "fedpft-n")) -> RunPanel:
    """Lab 05: FedPFT and a baseline without in-FL alignment, streaming gradient cosine and relative L2.

    Controls: the pre-FL distillation steps, alignment interval t, updated proportion p and selection rule.
    """
    from dataclasses import replace

    from . import align, federation

    controls = {
        "rounds": w.IntSlider(value=cfg.rounds, min=2, max=max(20, cfg.rounds), description="rounds",
                              continuous_update=False),
        "distill_steps": w.IntSlider(value=cfg.distill_steps, min=0, max=max(300, cfg.distill_steps), step=10,
                                     description="pre-FL steps", continuous_update=False),
        "align_interval": w.IntSlider(value=cfg.align_interval, min=1, max=10, description="interval t",
                                      continuous_update=False),
        "align_proportion": w.FloatSlider(value=cfg.align_proportion, min=0.1, max=1.0, step=0.1,
                                          description="proportion p", continuous_update=False),
        "align_rule": w.Dropdown(options=list(align.RULES), value=cfg.align_rule, description="rule"),
        "baseline": w.Dropdown(options=[(federation.METHOD_NAMES[m], m) for m in baselines], value=baselines[0],
                               description="compare with"),
    }
    runs = ["fedpft", "baseline"]
    figs = [plots.empty_method_curves(runs, "grad_cosine", title="Gradient cosine, sub-FM vs FM (live)",
                                      rounds=cfg.rounds),
            plots.empty_method_curves(runs, "grad_rel_l2", title="Relative L2 error, sub-FM vs FM (live)",
                                      rounds=cfg.rounds)]

    def work(stop, emit):
        knobs = {k: controls[k].value for k in ("rounds", "distill_steps", "align_interval", "align_proportion",
                                                "align_rule")}
        for i, (run, method) in enumerate((("fedpft", "fedpft"), ("baseline", controls["baseline"].value))):
            if stop.is_set():
                break
            run_cfg = replace(cfg, method=method, **knobs)
            name = federation.METHOD_NAMES[method]
            of_step, of_round = run_progress(run_cfg.rounds, start=i / 2, span=1 / 2, prefix=f"{name}: ")
            emit({"status": f"{name}: building the proxy …"})
            federation.cached_run(run_cfg, ws, progress=False, stop=stop,
                                  on_round=lambda r, run=run, of_round=of_round: emit({**of_round(r), "method": run}),
                                  on_progress=lambda info, of_step=of_step: emit(of_step(info)))

    def on_start(live):
        reset_figures(live)
        _count_axes(live, controls["rounds"].value)
        for fig in live:
            fig.data[0].name = "FedPFT"
            fig.data[1].name = federation.METHOD_NAMES[controls["baseline"].value]

    update = combine_updaters(method_curve_updater(runs, "grad_cosine", 0), method_curve_updater(runs, "grad_rel_l2", 1))
    return RunPanel(work, update, figs, controls=list(controls.values()), on_start=on_start,
                    title="Gradient discrepancy with and without alignment")


def methods_panel(cfg, ws, methods: Sequence[str] | None = None) -> RunPanel:
    """Lab 06: run a chosen set of methods on the same split one after another, accuracy curves live."""
    from dataclasses import replace

    from . import federation

    all_methods = list(federation.METHODS)
    chosen = list(methods) if methods is not None else all_methods
    controls = {
        "methods": w.SelectMultiple(options=[(federation.METHOD_NAMES[m], m) for m in all_methods],
                                    value=tuple(chosen), rows=len(all_methods), description="methods"),
        "rounds": w.IntSlider(value=cfg.rounds, min=1, max=max(20, cfg.rounds), description="rounds",
                              continuous_update=False),
    }
    fig = plots.empty_method_curves([federation.METHOD_NAMES[m] for m in all_methods], "accuracy",
                                    title="FM accuracy (adapter plugged in) by method (live)", rounds=cfg.rounds)

    def work(stop, emit):
        picked = [m for m in all_methods if m in controls["methods"].value]
        rounds = controls["rounds"].value
        for i, method in enumerate(picked):
            if stop.is_set():
                break
            name = federation.METHOD_NAMES[method]
            of_step, of_round = run_progress(rounds, start=i / len(picked), span=1 / len(picked),
                                             prefix=f"{name}: ")
            emit({"status": f"{name}: building the proxy …"})
            federation.cached_run(replace(cfg, method=method, rounds=rounds), ws, progress=False, stop=stop,
                                  on_round=lambda r, name=name, of_round=of_round: emit(
                                      {**of_round(r), "method": name}),
                                  on_progress=lambda info, of_step=of_step: emit(of_step(info)))

    def on_start(figs):
        reset_figures(figs)
        _count_axes(figs, controls["rounds"].value)

    update = method_curve_updater([federation.METHOD_NAMES[m] for m in all_methods], "accuracy")
    return RunPanel(work, update, [fig], controls=list(controls.values()), on_start=on_start,
                    title="Run methods side by side")
