"""Figure builders for the labs: pure functions from numbers to a ``plotly.graph_objects.Figure``.

They never show anything and keep no state, so a notebook can display the figure (static, survives papermill),
wrap it in ``go.FigureWidget(fig)`` for live updates, and the tests can check the trace data directly.

Round records (``round_curves``, ``method_comparison``) are plain dicts, one per federated round, e.g.
``{"round": 3, "accuracy": 0.81, "sub_accuracy": 0.78, "grad_cosine": 0.93, "aligned": True}``;
a missing key is drawn as a gap. Rounds with ``aligned=True`` (the server re-aligned the sub-FM) get a
dotted vertical line and a diamond marker, because that is where FedPFT's gradient discrepancy resets.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .errors import ConfigError

TEMPLATE = "plotly_white"
ALIGN_COLOUR = "rgba(120, 120, 120, 0.6)"
HEATMAP_ALIGN_LINE = dict(color="black", dash="dash", width=2.5)   # must read on both ends of a diverging scale
# Plotly never wraps a title: a long one runs off the figure's edge. 56 characters of the title font fit in the
# 700-px default width of a FigureWidget with the template's left offset, in the widest common sans fonts.
TITLE_CHARS = 56
TOP_MARGIN, TITLE_LINE = 60, 22

# Axis titles a participant can read without knowing our variable names.
KEY_LABELS: Mapping[str, str] = {
    "accuracy": "FM accuracy (adapter plugged in)",
    "sub_accuracy": "sub-FM accuracy",
    "grad_cosine": "cosine(sub-FM gradient, FM gradient)",
    "grad_rel_l2": "||g_sub - g_FM|| / ||g_FM||",
    "update_cosine": "cosine(proxy's update, FM's update)",
    "update_rel_l2": "||Δ_proxy - Δ_FM|| / ||Δ_FM||",
    "bytes_up": "bytes sent by clients",
    "bytes_down": "bytes sent by the server",
    "seconds": "seconds",
    "loss": "loss",
    "hidden_rel_mse": "hidden-state relative MSE (sub-FM vs FM)",
    "kept_neurons": "FFN neurons kept",
}


def label_for(key: str) -> str:
    """Readable axis title for a metric key (falls back to the key itself)."""
    return KEY_LABELS.get(key, key.replace("_", " "))


def wrap_title(text: str, width: int = TITLE_CHARS) -> str:
    """``text`` broken at spaces into lines of at most ``width`` characters (``<br>``); explicit breaks stay."""
    if "<br>" in text:
        return text
    return "<br>".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def set_title(fig: go.Figure, text: str) -> go.Figure:
    """Set a (wrapped) title and make room for its lines; live panels use it for titles that carry numbers."""
    wrapped = wrap_title(text)
    fig.update_layout(title_text=wrapped, margin_t=TOP_MARGIN + TITLE_LINE * wrapped.count("<br>"))
    return fig


def count_axis(fig: go.Figure, last: int | None = None, fixed: bool = False) -> go.Figure:
    """Whole-number ticks on an x axis that counts (rounds, steps): left alone, plotly labels a 2-round run
    0, 0.5, 1, 1.5, 2. About ten ticks up to ``last``.

    ``fixed``: also pin the range to 0..``last`` (a live figure whose length is known at Start), so the axis does
    not rescale with every new point.
    """
    step = max(1, math.ceil(last / 10)) if last else 1
    fig.update_xaxes(tick0=0, dtick=step)
    if fixed and last:
        fig.update_xaxes(range=[-0.25, last + 0.25])
    return fig


def _last_round(rounds: Sequence[Mapping]) -> int:
    return max((r.get("round", i) for i, r in enumerate(rounds)), default=0)


def _layout(fig: go.Figure, title: str, xaxis: str, yaxis: str, **extra) -> go.Figure:
    fig.update_layout(template=TEMPLATE, xaxis_title=xaxis, yaxis_title=yaxis,
                      margin=dict(l=60, r=20, t=TOP_MARGIN, b=50), legend=dict(orientation="h", y=-0.2), **extra)
    return set_title(fig, title)


def _check_counts(counts: np.ndarray, label_names: Sequence[str]) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ConfigError(f"counts must be a 2-D (clients x labels) array, got shape {counts.shape}")
    if len(label_names) != counts.shape[1]:
        raise ConfigError(f"label_names must have {counts.shape[1]} names (one per column of counts), "
                          f"got {len(label_names)}")
    return counts


def client_names(num_clients: int) -> list[str]:
    return [f"client {k}" for k in range(num_clients)]


# ----------------------------------------------------------------------------- lab 01: who holds what

def label_shares(counts: np.ndarray) -> np.ndarray:
    """Each client's label mix: rows of ``counts`` divided by the client's size (empty clients stay 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sizes, out=np.zeros_like(counts), where=sizes > 0)


def majority_share(counts: np.ndarray) -> float:
    """Average over clients of the share of their most common label: 1/K for IID, 1.0 for one label each."""
    shares = label_shares(counts)
    return float(shares.max(axis=1).mean()) if len(shares) else 0.0


def client_label_heatmap(counts: np.ndarray, label_names: Sequence[str],
                         title: str = "Label mix of each client") -> go.Figure:
    """Clients x labels heatmap coloured by the share of each client's data (0..1), counts on hover.

    Shares, not counts, so clients of different sizes are comparable and the colour scale means the same
    thing for every alpha: a row with one bright cell is a client that has seen (almost) one label only.
    """
    counts = _check_counts(counts, label_names)
    shares = label_shares(counts)
    fig = go.Figure(go.Heatmap(
        z=shares, x=list(label_names), y=client_names(len(counts)), customdata=counts,
        zmin=0.0, zmax=1.0, colorscale="Blues", colorbar=dict(title="share"),
        hovertemplate="%{y}<br>%{x}: %{customdata} examples (%{z:.0%})<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, "label", "client")


def client_label_bars(counts: np.ndarray, label_names: Sequence[str],
                      title: str = "Examples per client, stacked by label") -> go.Figure:
    """Stacked bars: one bar per client, one colour per label; shows size and skew at once."""
    counts = _check_counts(counts, label_names)
    names = client_names(len(counts))
    fig = go.Figure([go.Bar(x=names, y=counts[:, c], name=str(label)) for c, label in enumerate(label_names)])
    return _layout(fig, title, "client", "examples", barmode="stack")


# ----------------------------------------------------------------------------- lab 07: convex picture

def convex_curves(curves: Mapping[str, np.ndarray], bound: np.ndarray | None = None,
                  title: str = "Gap to the optimum, f(x_k) - f*") -> go.Figure:
    """Log-log gap curves (index k = step, k = 0 dropped), plus the dashed O(1/k) guarantee if given.

    Exact zeros are clipped to 1e-16 so a log axis can show them.
    """
    fig = go.Figure()
    for name, gaps in curves.items():
        gaps = np.asarray(gaps, dtype=np.float64)
        k = np.arange(1, len(gaps))
        fig.add_trace(go.Scatter(x=k, y=np.maximum(gaps[1:], 1e-16), mode="lines", name=name))
    if bound is not None:
        bound = np.asarray(bound, dtype=np.float64)
        fig.add_trace(go.Scatter(x=np.arange(1, len(bound) + 1), y=bound, mode="lines",
                                 name="bound L||x0-x*||^2/(2k)", line=dict(dash="dash", color="black")))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log", exponentformat="power")
    return _layout(fig, title, "step k", "f(x_k) - f*")


# ----------------------------------------------------------------------------- generic, labs 02-06

def loss_curve(losses: Sequence[float], title: str = "Training loss", xlabel: str = "step",
               ylabel: str = "loss", smooth: int = 0) -> go.Figure:
    """Loss per step; ``smooth > 1`` adds a moving average over that many steps (the raw curve stays faint)."""
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.arange(len(losses))
    fig = go.Figure(go.Scatter(x=steps, y=losses, mode="lines", name="loss",
                               opacity=0.4 if smooth > 1 else 1.0))
    if smooth > 1 and len(losses) >= smooth:
        window = np.ones(smooth) / smooth
        fig.add_trace(go.Scatter(x=steps[smooth - 1:], y=np.convolve(losses, window, mode="valid"),
                                 mode="lines", name=f"moving average ({smooth})"))
    return _layout(fig, title, xlabel, ylabel)


def line_plot(x: Sequence[float], curves: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
              log_x: bool = False, log_y: bool = False, hline: float | None = None,
              hline_name: str = "reference") -> go.Figure:
    """Several named curves over a shared x (a parameter sweep), optionally log axes and a dashed reference."""
    fig = go.Figure([go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name)
                     for name, y in curves.items()])
    if hline is not None:
        fig.add_trace(go.Scatter(x=[min(x), max(x)], y=[hline, hline], mode="lines", name=hline_name,
                                 line=dict(dash="dash", color="gray")))
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
    return _layout(fig, title, xlabel, ylabel)


def _column(rounds: Sequence[Mapping], key: str) -> list:
    return [r.get(key) for r in rounds]


def _aligned_rounds(rounds: Sequence[Mapping]) -> list:
    return [r.get("round", i) for i, r in enumerate(rounds) if r.get("aligned")]


def alignment_line(x: float, line: Mapping | None = None) -> dict:
    """A dotted full-height vertical line at round ``x`` (a layout shape; ``fig.add_shape(**alignment_line(x))``).

    Spelled out instead of ``add_vline`` because that helper fails inside a FigureWidget ``batch_update``.
    ``line`` overrides the style (a heatmap needs a bolder one than the faint grey that suits a white plot).
    """
    return dict(type="line", x0=x, x1=x, xref="x", y0=0, y1=1, yref="y domain", layer="above",
                line=dict(line) if line is not None else dict(color=ALIGN_COLOUR, dash="dot", width=1))


def _mark_alignments(fig: go.Figure, rounds: Sequence[Mapping], key: str | None) -> None:
    """Dotted vertical line at every aligned round, plus diamond markers on ``key``'s curve (for the legend)."""
    aligned = _aligned_rounds(rounds)
    for x in aligned:
        fig.add_shape(**alignment_line(x))
    if aligned and key is not None:
        ys = [r.get(key) for i, r in enumerate(rounds) if r.get("aligned")]
        fig.add_trace(go.Scatter(x=aligned, y=ys, mode="markers", name="alignment round",
                                 marker=dict(symbol="diamond", size=10, color="black")))


def round_curves(rounds: Sequence[Mapping], keys: Sequence[str] = ("accuracy", "sub_accuracy"),
                 title: str = "Per-round metrics", ylabel: str | None = None) -> go.Figure:
    """One line per metric key over federated rounds; alignment rounds marked.

    Keys that no record has are skipped (so the same call works for methods without a sub-FM).
    """
    if not rounds:
        raise ConfigError("rounds must contain at least one record")
    x = [r.get("round", i) for i, r in enumerate(rounds)]
    present = [k for k in keys if any(r.get(k) is not None for r in rounds)]
    if not present:
        raise ConfigError(f"none of the keys {list(keys)} appear in the round records")
    fig = go.Figure([go.Scatter(x=x, y=_column(rounds, k), mode="lines+markers", name=label_for(k))
                     for k in present])
    _mark_alignments(fig, rounds, present[0])
    if ylabel is None:
        ylabel = label_for(present[0]) if len(present) == 1 else "value"
    return count_axis(_layout(fig, title, "round", ylabel), _last_round(rounds))


def add_reference_curve(fig: go.Figure, rounds: Sequence[Mapping], key: str = "accuracy",
                        name: str = "reference") -> go.Figure:
    """Add another run's ``key`` over rounds as a dashed grey line (e.g. FedPETuning, the full-FM reference)."""
    fig.add_trace(go.Scatter(x=[r.get("round", i) for i, r in enumerate(rounds)], y=_column(rounds, key),
                             mode="lines", name=name, line=dict(dash="dash", color="gray")))
    return fig


def empty_round_curves(keys: Sequence[str] = ("accuracy", "sub_accuracy"), title: str = "Per-round metrics",
                       ylabel: str | None = None, rounds: int | None = None) -> go.Figure:
    """The figure ``round_curves`` would draw, with no rounds yet: one empty line per key, then the
    alignment-marker trace. A RunPanel fills it live with ``widgets.round_curve_updater(keys)``; ``rounds``
    fixes the x range in advance (see :func:`count_axis`)."""
    if not keys:
        raise ConfigError("keys must name at least one metric")
    fig = go.Figure([go.Scatter(x=[], y=[], mode="lines+markers", name=label_for(k)) for k in keys])
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="alignment round",
                             marker=dict(symbol="diamond", size=10, color="black")))
    if ylabel is None:
        ylabel = label_for(keys[0]) if len(keys) == 1 else "value"
    return count_axis(_layout(fig, title, "round", ylabel), rounds, fixed=True)


def layer_bars(layers: Sequence[Mapping], key: str, title: str | None = None) -> go.Figure:
    """Per-layer bar chart of ``key``; compressed and retained (full) layers in two colours."""
    if not layers:
        raise ConfigError("layers must contain at least one record")
    fig = go.Figure()
    for compressed, name in ((True, "compressed layer"), (False, "retained (full) layer")):
        rows = [r for r in layers if bool(r.get("compressed", True)) == compressed]
        if rows:
            fig.add_trace(go.Bar(x=[r["layer"] for r in rows], y=[r.get(key) for r in rows], name=name))
    fig.update_xaxes(dtick=1)
    return _layout(fig, title or f"{label_for(key)} per layer", "layer", label_for(key))


def method_comparison(results: Mapping[str, Sequence[Mapping]], key: str = "accuracy",
                      title: str | None = None) -> go.Figure:
    """Overlay one metric for several methods (e.g. FedPETuning, FedOT, FedPFT) over rounds."""
    if not results:
        raise ConfigError("results must map at least one method name to its round records")
    fig = go.Figure()
    for method, rounds in results.items():
        fig.add_trace(go.Scatter(x=[r.get("round", i) for i, r in enumerate(rounds)],
                                 y=_column(rounds, key), mode="lines+markers", name=method))
    return count_axis(_layout(fig, title or f"{label_for(key)} by method", "round", label_for(key)),
                      max(_last_round(r) for r in results.values()))


# ----------------------------------------------------------------------------- lab 02: building a sub-FM

PROXY_COLOURS: Mapping[str, str] = {"FM": "#4c72b0", "layer-wise sub-FM": "#dd8452", "layer-drop proxy": "#55a868"}


def param_bars(counts: Mapping[str, int], title: str = "Transformer parameters a client must hold") -> go.Figure:
    """One bar per model in Mi (2^20, the paper's "M"), labelled with both Mi and M (10^6).

    Two units on purpose: the paper's 81M/47M for BERT-base are Mi; in millions they would read 85M/50M.
    """
    if not counts:
        raise ConfigError("counts must name at least one model")
    names = list(counts)
    values = [counts[n] / 2**20 for n in names]
    text = [f"{counts[n] / 2**20:.2f} Mi<br>{counts[n] / 1e6:.2f} M" for n in names]
    fig = go.Figure(go.Bar(x=names, y=values, text=text, textposition="auto",
                           marker_color=[PROXY_COLOURS.get(n, "#8172b3") for n in names]))
    return _layout(fig, title, "model", "parameters (Mi = 2^20)")


def saliency_legend(kept: Sequence[np.ndarray]) -> list[bool]:
    """``showlegend`` of each trace of :func:`saliency_histograms` (layer order; kept, dropped per layer).

    One legend entry per kind, on the first layer whose trace of that kind has neurons: plotly leaves an empty
    trace out of the legend, so an entry on a retained layer (nothing dropped) would never show.
    """
    flags = [False] * (2 * len(kept))
    for offset, has in ((0, lambda m: m.any()), (1, lambda m: (~m).any())):
        first = next((k for k, m in enumerate(kept) if has(np.asarray(m, dtype=bool))), None)
        if first is not None:
            flags[2 * first + offset] = True
    return flags


def saliency_histograms(saliencies: Mapping[int, np.ndarray], kept: Mapping[int, np.ndarray], bins: int = 40,
                        title: str = "FFN neuron saliency per layer (kept vs dropped)") -> go.Figure:
    """One small histogram per layer: kept neurons in colour, dropped ones in grey, stacked.

    Trace order is fixed (layer 0 kept, layer 0 dropped, layer 1 kept, ...), and every layer uses the same bin
    edges for both traces, so a live panel can rewrite ``x`` of traces 2i and 2i+1 when the keep ratio changes
    (and ``showlegend`` from :func:`saliency_legend`).
    """
    from plotly.subplots import make_subplots

    layers_ = sorted(saliencies)
    if not layers_:
        raise ConfigError("saliencies must hold at least one layer")
    cols = min(3, len(layers_))
    rows = -(-len(layers_) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {i}" for i in layers_],
                        horizontal_spacing=0.08, vertical_spacing=0.16)
    legend = saliency_legend([kept[i] for i in layers_])
    for n, i in enumerate(layers_):
        s = np.asarray(saliencies[i], dtype=np.float64)
        mask = np.asarray(kept[i], dtype=bool)
        lo, hi = float(s.min()), float(s.max())
        xbins = dict(start=lo, end=hi + 1e-9, size=max((hi - lo) / bins, 1e-9))
        r, c = n // cols + 1, n % cols + 1
        fig.add_trace(go.Histogram(x=s[mask], xbins=xbins, name="kept", marker_color="#dd8452",
                                   legendgroup="kept", showlegend=legend[2 * n]), row=r, col=c)
        fig.add_trace(go.Histogram(x=s[~mask], xbins=xbins, name="dropped", marker_color="#bbbbbb",
                                   legendgroup="dropped", showlegend=legend[2 * n + 1]), row=r, col=c)
    fig.update_layout(barmode="stack", height=280 * rows)
    _layout(fig, title, "", "")
    fig.update_xaxes(title_text="saliency", row=rows)
    return fig.update_yaxes(title_text="neurons", col=1)


def grouped_layer_bars(series: Mapping[str, Sequence[float | None]], title: str, ylabel: str,
                       layers: Sequence[int] | None = None) -> go.Figure:
    """Bars per layer, one colour per named series (e.g. layer-wise vs layer-drop, before vs after).

    ``None`` values are left out, so a layer a proxy does not have shows no bar instead of a fake zero.
    """
    if not series:
        raise ConfigError("series must name at least one curve")
    width = max(len(v) for v in series.values())
    xs = list(layers) if layers is not None else list(range(width))
    fig = go.Figure([go.Bar(x=xs, y=list(values), name=name,
                            marker_color=PROXY_COLOURS.get(name))
                     for name, values in series.items()])
    fig.update_xaxes(dtick=1)
    return _layout(fig, title, "layer", ylabel, barmode="group")


# ----------------------------------------------------------------------------- lab 05: discrepancy over rounds

def alignment_path(rounds: Sequence[Mapping], key: str = "grad_cosine") -> tuple[list, list]:
    """x, y of a per-round metric with the alignment drawn as a vertical step.

    At an aligned round the record holds the value *after* alignment and ``before_align`` the value before it,
    so the path visits (r, before) then (r, after): the saw-tooth of the paper's Figure 1b.
    """
    xs: list = []
    ys: list = []
    for i, r in enumerate(rounds):
        x = r.get("round", i)
        before = (r.get("before_align") or {}).get(key) if r.get("aligned") else None
        if before is not None:
            xs.append(x)
            ys.append(before)
        xs.append(x)
        ys.append(r.get(key))
    return xs, ys


def discrepancy_curves(results: Mapping[str, Sequence[Mapping]], key: str = "grad_cosine",
                       title: str | None = None) -> go.Figure:
    """Per-round ``key`` for several runs, alignment steps drawn vertically, before/after points marked."""
    if not results:
        raise ConfigError("results must map at least one run name to its round records")
    fig = go.Figure()
    for name, rounds in results.items():
        xs, ys = alignment_path(rounds, key)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name))
        events = [r for r in rounds if r.get("aligned") and key in (r.get("before_align") or {})]
        if events:
            fig.add_trace(go.Scatter(x=[r["round"] for r in events], y=[r["before_align"][key] for r in events],
                                     mode="markers", name=f"{name}: before alignment",
                                     marker=dict(symbol="circle-open", size=11, color="black")))
            fig.add_trace(go.Scatter(x=[r["round"] for r in events], y=[r[key] for r in events],
                                     mode="markers", name=f"{name}: after alignment",
                                     marker=dict(symbol="diamond", size=10, color="black")))
            for r in events:
                fig.add_shape(**alignment_line(r["round"]))
    return count_axis(_layout(fig, title or f"{label_for(key)} over rounds", "round", label_for(key)),
                      max(_last_round(r) for r in results.values()))


def layer_heatmap(matrix: np.ndarray, rounds: Sequence[int], title: str, zlabel: str = "cosine",
                  zmin: float | None = None, zmax: float | None = None, aligned: Sequence[int] = ()) -> go.Figure:
    """rounds x layers heatmap (x = round, y = layer) with dotted lines at alignment rounds."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != len(rounds):
        raise ConfigError(f"matrix must be (rounds x layers) with {len(rounds)} rows, got shape {matrix.shape}")
    z = [[None if np.isnan(v) else float(v) for v in row] for row in matrix.T]
    fig = go.Figure(go.Heatmap(z=z, x=list(rounds), y=list(range(matrix.shape[1])), zmin=zmin, zmax=zmax,
                               colorscale="RdBu", colorbar=dict(title=zlabel),
                               hovertemplate="round %{x}, layer %{y}: %{z:.3f}<extra></extra>"))
    for x in aligned:
        fig.add_shape(**alignment_line(x, HEATMAP_ALIGN_LINE))
    fig.update_yaxes(dtick=1)
    return count_axis(_layout(fig, title, "round", "layer"), max(rounds, default=0))


def empty_method_curves(names: Sequence[str], key: str = "accuracy", title: str | None = None,
                        rounds: int | None = None) -> go.Figure:
    """One empty line per run name, for ``widgets.method_curve_updater`` (trace order = ``names``)."""
    if not names:
        raise ConfigError("names must list at least one run")
    fig = go.Figure([go.Scatter(x=[], y=[], mode="lines+markers", name=n) for n in names])
    return count_axis(_layout(fig, title or f"{label_for(key)} by method", "round", label_for(key)), rounds,
                      fixed=True)


# ----------------------------------------------------------------------------- lab 06: cost per method

def metric_bars(values: Mapping[str, Mapping[str, float]], title: str = "Cost per method") -> go.Figure:
    """One panel per metric (columns), one bar per method in each: ``values[method][metric]``."""
    from plotly.subplots import make_subplots

    if not values:
        raise ConfigError("values must hold at least one method")
    methods = list(values)
    metrics = list(next(iter(values.values())))
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.08)
    for c, metric in enumerate(metrics, start=1):
        ys = [values[m].get(metric) for m in methods]
        fig.add_trace(go.Bar(x=methods, y=ys, name=metric, showlegend=False,
                             text=[f"{y:.3g}" if y is not None else "" for y in ys], textposition="auto"),
                      row=1, col=c)
    fig.update_layout(height=380)
    return _layout(fig, title, "", "")


def interval_bars(rows: Mapping[str, Mapping[str, float]], title: str, yaxis: str,
                  live: Mapping[str, float] | None = None, live_name: str = "your run (one seed)") -> go.Figure:
    """One bar per method at its mean over seeds, with its 95% interval as an error bar (``rows[name]`` holds
    ``mean``, ``low``, ``high``; a missing interval draws no bar end), plus optional single-run markers."""
    names = list(rows)
    means = [rows[n]["mean"] for n in names]
    plus = [None if rows[n].get("high") is None else rows[n]["high"] - rows[n]["mean"] for n in names]
    minus = [None if rows[n].get("low") is None else rows[n]["mean"] - rows[n]["low"] for n in names]
    fig = go.Figure(go.Bar(x=names, y=means, name="mean over seeds, 95% interval",
                           error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus, thickness=1.5)))
    if live:
        fig.add_trace(go.Scatter(x=[n for n in names if n in live], y=[live[n] for n in names if n in live],
                                 mode="markers", marker=dict(symbol="diamond", size=11, color="black"), name=live_name))
    return _layout(fig, title, "", yaxis)


def band_curves(series: Mapping[str, Mapping[str, Sequence[float | None]]], title: str, yaxis: str,
                x: Sequence[float] | None = None) -> go.Figure:
    """Mean curves with a shaded 95% band each (``series[name]`` holds ``mean``, ``low``, ``high`` per point),
    e.g. the gradient cosine of every method over rounds across the seeds of a reference study."""
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    for i, (name, s) in enumerate(series.items()):
        xs = list(x) if x is not None else list(range(len(s["mean"])))
        colour = palette[i % len(palette)]
        r, g, b = (int(colour[j:j + 2], 16) for j in (1, 3, 5))
        low = [v if v is not None else m for v, m in zip(s["low"], s["mean"])]
        high = [v if v is not None else m for v, m in zip(s["high"], s["mean"])]
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=high + low[::-1], fill="toself", line=dict(width=0),
                                 fillcolor=f"rgba({r},{g},{b},0.15)", hoverinfo="skip", showlegend=False,
                                 name=f"{name} 95%"))
        fig.add_trace(go.Scatter(x=xs, y=list(s["mean"]), mode="lines+markers", name=name, line=dict(color=colour)))
    _layout(fig, title, "round", yaxis)
    fig.update_xaxes(dtick=1)     # rounds are whole numbers
    return fig


# ----------------------------------------------------------------------------- CLI sweep: the parameter study

def parameter_study(values: Sequence, series: Mapping[str, Sequence[Mapping]], param: str,
                    ylabel: str = "last-round FM accuracy (%)") -> go.Figure:
    """One line per method over the swept values, with confidence-interval error bars (the paper's Figure 4).

    ``series[name][i]`` is ``{"mean": ..., "ci": [lo, hi] or None}`` for ``values[i]``, as fractions; drawn in %.
    The x axis is categorical (evenly spaced, in the given order), as the paper draws t = 5, 10, 20.
    A missing interval (one seed) draws no bar rather than a zero-width one.
    """
    if not values or not series:
        raise ConfigError("parameter_study needs at least one value and one method")
    x = [str(v) for v in values]
    fig = go.Figure()
    for name, points in series.items():
        if len(points) != len(values):
            raise ConfigError(f"{name}: {len(points)} results for {len(values)} values")
        mean = [100 * s["mean"] for s in points]
        up = [100 * s["ci"][1] - m if s["ci"] is not None else float("nan") for s, m in zip(points, mean)]
        down = [m - 100 * s["ci"][0] if s["ci"] is not None else float("nan") for s, m in zip(points, mean)]
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=name,
                                 error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, visible=True)))
    fig.update_xaxes(type="category")
    return _layout(fig, f"Parameter study: {param}", param, ylabel)
