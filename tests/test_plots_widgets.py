"""Figure builders return the right trace data; widget panels react to control changes and button clicks.

No browser is involved: we set ``.value`` on controls or call ``button.click()`` and read the FigureWidget data.
"""
from __future__ import annotations

import threading

import numpy as np
import plotly.graph_objects as go
import pytest

from fedpft_lab import convex, plots, widgets
from fedpft_lab.errors import ConfigError

COUNTS = np.array([[8, 2, 0], [0, 5, 5], [1, 1, 1]])
NAMES = ["anger", "joy", "sadness"]


# ----------------------------------------------------------------------------- plots

def test_heatmap_colours_by_share_and_keeps_counts_for_hover():
    fig = plots.client_label_heatmap(COUNTS, NAMES)
    assert isinstance(fig, go.Figure)
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z)[0], [0.8, 0.2, 0.0])
    np.testing.assert_array_equal(np.asarray(heat.customdata), COUNTS)
    assert list(heat.x) == NAMES and list(heat.y) == ["client 0", "client 1", "client 2"]
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert fig.layout.xaxis.title.text == "label" and fig.layout.title.text


def test_bars_stack_one_trace_per_label():
    fig = plots.client_label_bars(COUNTS, NAMES)
    assert [t.name for t in fig.data] == NAMES
    assert fig.layout.barmode == "stack"
    np.testing.assert_array_equal(np.asarray(fig.data[1].y), [2, 5, 1])


def test_shares_and_majority_share():
    np.testing.assert_allclose(plots.label_shares(np.array([[0, 0], [1, 3]])), [[0, 0], [0.25, 0.75]])
    assert plots.majority_share(COUNTS) == pytest.approx((0.8 + 0.5 + 1 / 3) / 3)


@pytest.mark.parametrize("counts,names", [(np.ones(3), NAMES), (COUNTS, ["a", "b"])])
def test_count_plots_reject_bad_shapes(counts, names):
    with pytest.raises(ConfigError):
        plots.client_label_heatmap(counts, names)


def test_convex_curves_are_log_log_with_dashed_bound():
    fig = plots.convex_curves({"a": np.array([1.0, 0.5, 0.0])}, bound=np.array([1.0, 0.5]))
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [1, 2]
    assert fig.data[0].y[1] > 0                              # exact zero clipped for the log axis
    assert fig.data[1].line.dash == "dash"


def test_loss_curve_with_moving_average():
    fig = plots.loss_curve([4, 3, 2, 1], smooth=2, title="local training")
    assert len(fig.data) == 2
    np.testing.assert_allclose(np.asarray(fig.data[1].y), [3.5, 2.5, 1.5])
    assert fig.layout.title.text == "local training"


def test_line_plot_sweep_with_reference():
    fig = plots.line_plot([0.1, 1, 10], {"flgo": [0.9, 0.8, 0.7], "per-class": [0.8, 0.7, 0.7]},
                          "skew", "alpha", "share", log_x=True, hline=0.7, hline_name="IID")
    assert [t.name for t in fig.data] == ["flgo", "per-class", "IID"]
    assert list(fig.data[2].y) == [0.7, 0.7] and fig.data[2].line.dash == "dash"
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type is None


ROUNDS = [
    {"round": 1, "accuracy": 0.5, "sub_accuracy": 0.45, "grad_cosine": 0.9, "aligned": False},
    {"round": 2, "accuracy": 0.6, "sub_accuracy": 0.5, "grad_cosine": 0.7, "aligned": True},
    {"round": 3, "accuracy": 0.7, "grad_cosine": 0.95, "aligned": False},
]


def test_round_curves_one_line_per_key_with_alignment_marks():
    fig = plots.round_curves(ROUNDS, keys=("accuracy", "sub_accuracy", "bytes_up"))
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == [plots.label_for("accuracy"), plots.label_for("sub_accuracy")]
    assert list(lines[1].y) == [0.45, 0.5, None]              # missing values become gaps
    marks = [t for t in fig.data if t.name == "alignment round"]
    assert len(marks) == 1 and list(marks[0].x) == [2] and list(marks[0].y) == [0.6]
    assert [s.x0 for s in fig.layout.shapes] == [2]            # dotted vertical line at the aligned round
    assert fig.layout.xaxis.title.text == "round"


def test_round_curves_rejects_empty_or_unknown():
    with pytest.raises(ConfigError):
        plots.round_curves([])
    with pytest.raises(ConfigError):
        plots.round_curves(ROUNDS, keys=("nope",))


def test_layer_bars_split_compressed_and_retained():
    layers = [{"layer": 0, "compressed": False, "kept_neurons": 1536, "hidden_rel_mse": 0.0},
              {"layer": 1, "compressed": True, "kept_neurons": 384, "hidden_rel_mse": 0.2},
              {"layer": 2, "compressed": True, "kept_neurons": 384, "hidden_rel_mse": 0.3}]
    fig = plots.layer_bars(layers, "hidden_rel_mse")
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["compressed layer"].x) == [1, 2]
    assert list(by_name["compressed layer"].y) == [0.2, 0.3]
    assert list(by_name["retained (full) layer"].x) == [0]


def test_method_comparison_overlays_methods():
    fig = plots.method_comparison({"FedPFT": ROUNDS, "FedOT": ROUNDS[:2]}, key="grad_cosine")
    assert [t.name for t in fig.data] == ["FedPFT", "FedOT"]
    assert list(fig.data[1].y) == [0.9, 0.7]
    with pytest.raises(ConfigError):
        plots.method_comparison({})


# ----------------------------------------------------------------------------- widgets

@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).choice(4, size=2000, p=[0.4, 0.3, 0.2, 0.1])


def test_partition_explorer_redraws_on_alpha_and_clients(labels):
    panel = widgets.partition_explorer(labels, ["a", "b", "c", "d"], num_clients=5, alpha=100.0)
    heat, bars = panel.figs["heatmap"], panel.figs["bars"]
    before = np.asarray(heat.data[0].z).copy()
    assert before.shape == (5, 4)
    panel.controls["alpha"].value = 0.01
    after = np.asarray(heat.data[0].z)
    assert not np.allclose(before, after)
    assert after.max(axis=1).mean() > before.max(axis=1).mean()      # more skew
    panel.controls["clients"].value = 8
    assert np.asarray(heat.data[0].z).shape == (8, 4)
    assert len(bars.data[0].x) == 8
    assert sum(np.asarray(t.y).sum() for t in bars.data) == len(labels)
    assert "majority-label share" in panel.readout.value


def test_partition_explorer_iid_disables_alpha_and_errors_show_in_readout(labels):
    panel = widgets.partition_explorer(labels, ["a", "b", "c", "d"], num_clients=5)
    panel.controls["scheme"].value = "iid"
    assert panel.controls["alpha"].disabled and panel.controls["convention"].disabled
    shares = np.asarray(panel.figs["heatmap"].data[0].z)
    np.testing.assert_allclose(shares, np.tile(shares.mean(axis=0), (5, 1)), atol=0.08)
    panel.controls["scheme"].value = "dirichlet"
    panel.controls["convention"].value = "per-class"
    panel.controls["clients"].value = 100
    panel.controls["alpha"].value = 0.01                                # infeasible: shown, not raised
    assert "ConfigError" in panel.readout.value


def test_convex_explorer_sliders_change_the_proxy_curves():
    panel = widgets.convex_explorer(num_steps=400, delta=1e-3, period=50)
    fig = panel.figs["gaps"]
    truth = np.asarray(fig.data[0].y).copy()
    realigned = np.asarray(fig.data[2].y).copy()
    panel.controls["period"].value = 5
    assert not np.allclose(realigned, np.asarray(fig.data[2].y))
    assert "T=5" in fig.data[2].name
    np.testing.assert_array_equal(truth, np.asarray(fig.data[0].y))   # the true curve does not move
    never = np.asarray(fig.data[1].y).copy()
    panel.controls["delta"].value = 1e-5
    assert np.asarray(fig.data[1].y)[-1] < never[-1]
    assert "re-aligned every 5" in panel.readout.value


def make_counter_panel(gate: threading.Event | None = None, fail: bool = False):
    fig = go.Figure(go.Scatter(x=[], y=[], name="accuracy"))
    reset_calls: list[int] = []

    def work(stop, emit):
        for step in range(5):
            if stop.is_set():
                return step
            if gate is not None:
                gate.wait(5)
            if fail and step == 2:
                raise RuntimeError("client 3 ran out of memory")
            emit({"round": step, "accuracy": step / 10, "progress": (step + 1) / 5, "status": f"round {step}"})
        return 5

    def on_event(event, figs):
        trace = figs[0].data[0]
        trace.x = tuple(trace.x or ()) + (event["round"],)
        trace.y = tuple(trace.y or ()) + (event["accuracy"],)

    def on_start(figs):
        reset_calls.append(1)
        figs[0].data[0].x, figs[0].data[0].y = (), ()

    import ipywidgets
    knob = ipywidgets.IntSlider(value=3)
    panel = widgets.RunPanel(work, on_event, [fig], controls=[knob], on_start=on_start, title="demo")
    return panel, knob, reset_calls


def test_run_panel_streams_events_into_the_figure():
    panel, knob, reset_calls = make_counter_panel()
    assert isinstance(panel.figs[0], go.FigureWidget)
    panel.start_button.click()
    assert panel.run.join(timeout=10)
    assert list(panel.figs[0].data[0].y) == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert panel.progress.value == 1.0 and "done" in panel.status.value
    assert not panel.start_button.disabled and panel.stop_button.disabled and not knob.disabled
    panel.start_button.click()                                          # a second run starts clean
    assert panel.run.join(timeout=10)
    assert len(panel.figs[0].data[0].y) == 5 and len(reset_calls) == 2


def test_run_panel_locks_controls_while_running_and_stop_works():
    gate = threading.Event()
    panel, knob, _ = make_counter_panel(gate=gate)
    panel.start_button.click()
    assert panel.start_button.disabled and not panel.stop_button.disabled and knob.disabled
    panel.stop_button.click()
    gate.set()
    assert panel.run.join(timeout=10)
    assert panel.run.stopped and "stopped" in panel.status.value
    assert len(panel.figs[0].data[0].y) < 5
    assert not knob.disabled and not panel.start_button.disabled


def test_run_panel_shows_errors_and_unlocks():
    panel, knob, _ = make_counter_panel(fail=True)
    panel.start_button.click()
    assert panel.run.join(timeout=10)
    assert isinstance(panel.run.error, RuntimeError)
    assert "RuntimeError" in panel.status.value and "out of memory" in panel.status.value
    assert not knob.disabled


@pytest.mark.parametrize("ending", ["done", "stopped", "error"])
def test_run_panel_frees_the_controls_before_it_says_the_run_ended(ending):
    """The front end applies widget changes in the order they are sent: a status saying the run ended must come
    after the controls are free (the browser suite once read "done in" while lab 06's controls were still locked)."""
    gate = threading.Event() if ending == "stopped" else None
    panel, knob, _ = make_counter_panel(gate=gate, fail=ending == "error")
    sent: list[str] = []
    knob.observe(lambda change: sent.append(f"knob disabled={change['new']}"), names="disabled")
    panel.start_button.observe(lambda change: sent.append(f"start disabled={change['new']}"), names="disabled")
    panel.status.observe(lambda change: sent.append(f"status {change['new']}"), names="value")
    panel.start_button.click()
    if gate is not None:
        panel.stop_button.click()
        gate.set()
    assert panel.run.join(timeout=10)
    last_status = max(i for i, s in enumerate(sent) if s.startswith("status "))
    assert {"done": "done in", "stopped": "stopped after", "error": "RuntimeError"}[ending] in sent[last_status]
    assert sent.index("knob disabled=False") < last_status and sent.index("start disabled=False") < last_status


def test_round_curve_updater_fills_the_empty_figure_live():
    fig = plots.empty_round_curves(("accuracy", "grad_cosine"))
    assert [t.name for t in fig.data] == [plots.label_for("accuracy"), plots.label_for("grad_cosine"),
                                         "alignment round"]

    def work(stop, emit):
        for record in ROUNDS:
            emit(record)
        emit({"status": "evaluating"})                                  # events without a round are fine

    panel = widgets.RunPanel(work, widgets.round_curve_updater(("accuracy", "grad_cosine")), [fig])
    panel.start_button.click()
    assert panel.run.join(timeout=10) and panel.run.error is None
    live = panel.figs[0]
    assert list(live.data[0].x) == [1, 2, 3] and list(live.data[0].y) == [0.5, 0.6, 0.7]
    assert list(live.data[1].y) == [0.9, 0.7, 0.95]
    assert list(live.data[2].x) == [2] and [s.x0 for s in live.layout.shapes] == [2]


def test_extend_trace_handles_arrays_and_empty():
    fig = go.FigureWidget(plots.loss_curve([]))
    widgets.extend_trace(fig.data[0], [0, 1], [3.0, 2.0])
    widgets.extend_trace(fig.data[0], [2], [1.0])
    assert list(fig.data[0].y) == [3.0, 2.0, 1.0]


def test_convex_curves_match_the_library():
    problem = convex.make_problem(dim=8, seed=1)
    gaps = convex.gradient_descent_gaps(problem, 50)
    fig = plots.convex_curves({"true": gaps}, bound=convex.gd_bound(problem, 50))
    assert np.all(np.asarray(fig.data[0].y) <= np.asarray(fig.data[1].y) + 1e-12)


# ----------------------------------------------------------------------------- labs 02-06 figures and panels

def test_param_bars_show_mebi_with_both_units_in_the_text():
    fig = plots.param_bars({"FM": 2**20, "layer-wise sub-FM": 2**19})
    assert list(fig.data[0].y) == [1.0, 0.5]
    assert "1.00 Mi" in fig.data[0].text[0] and "1.05 M" in fig.data[0].text[0]
    with pytest.raises(ConfigError):
        plots.param_bars({})


def test_saliency_histograms_two_traces_per_layer_with_shared_bins():
    sal = {0: np.arange(10.0), 1: np.arange(10.0) * 2}
    kept = {0: np.ones(10, bool), 1: np.arange(10) >= 7}
    fig = plots.saliency_histograms(sal, kept, bins=5)
    assert [t.name for t in fig.data] == ["kept", "dropped"] * 2
    assert len(fig.data[0].x) == 10 and len(fig.data[1].x) == 0
    assert list(fig.data[2].x) == [14.0, 16.0, 18.0] and len(fig.data[3].x) == 7
    assert fig.data[2].xbins.size == fig.data[3].xbins.size and fig.layout.barmode == "stack"


def test_saliency_histograms_label_axes_and_legend_both_kinds():
    """Layer 0 is retained (nothing dropped): its empty 'dropped' trace never shows in plotly's legend, so the
    'dropped' entry belongs to the first layer that drops neurons."""
    sal = {i: np.arange(10.0) + i for i in range(4)}
    kept = {0: np.ones(10, bool), 1: np.arange(10) >= 7, 2: np.arange(10) >= 5, 3: np.ones(10, bool)}
    fig = plots.saliency_histograms(sal, kept, bins=5)
    shown = [(t.name, t.x is not None and len(t.x) > 0) for t in fig.data if t.showlegend]
    assert shown == [("kept", True), ("dropped", True)]
    assert fig.layout.xaxis4.title.text == "saliency" and fig.layout.yaxis.title.text == "neurons"  # bottom, left
    assert not fig.layout.xaxis.title.text                                   # not between the rows
    assert plots.saliency_legend([np.ones(3, bool)]) == [True, False]          # keep ratio 1: nothing dropped


def test_round_axes_tick_whole_rounds():
    """Left alone, plotly labels a 2-round axis 0, 0.5, 1, 1.5, 2."""
    two = ROUNDS[:3]
    for fig in (plots.round_curves(two), plots.method_comparison({"a": two}), plots.discrepancy_curves({"a": two}),
                plots.layer_heatmap(np.ones((3, 2)), [0, 1, 2], "t"), plots.empty_round_curves(rounds=2),
                plots.empty_method_curves(["a"], rounds=2)):
        assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tick0 == 0
    live = plots.empty_round_curves(rounds=40)
    assert live.layout.xaxis.dtick == 4 and list(live.layout.xaxis.range) == [-0.25, 40.25]   # about 10 ticks


def test_long_titles_wrap_and_make_room():
    title = "Gradient cosine with the FM: layer-wise 0.993, layer-drop 0.873 (keep ratio 0.25)"
    fig = plots.grouped_layer_bars({"a": [1.0]}, title, "cosine")
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) == 2 and all(len(line) <= plots.TITLE_CHARS for line in lines)
    assert " ".join(lines) == title and fig.layout.margin.t == plots.TOP_MARGIN + plots.TITLE_LINE
    plots.set_title(fig, "short")
    assert fig.layout.title.text == "short" and fig.layout.margin.t == plots.TOP_MARGIN


def test_heatmap_alignment_lines_are_bold_and_opaque():
    """Faint grey dots vanish on a diverging colour scale."""
    fig = plots.layer_heatmap(np.ones((3, 2)), [0, 1, 2], "t", aligned=[1])
    line = fig.layout.shapes[0].line
    assert line.width >= 2 and line.color == "black"


def test_grouped_layer_bars_leave_missing_layers_empty():
    fig = plots.grouped_layer_bars({"layer-wise sub-FM": [0.0, 0.2, 0.3], "layer-drop proxy": [0.0, None, 0.5]},
                                   "gap", "relative MSE")
    assert [t.name for t in fig.data] == ["layer-wise sub-FM", "layer-drop proxy"]
    assert list(fig.data[1].y) == [0.0, None, 0.5] and fig.layout.barmode == "group"


ALIGNED = [
    {"round": 0, "grad_cosine": 0.99},
    {"round": 1, "grad_cosine": 0.9},
    {"round": 2, "grad_cosine": 0.95, "aligned": True, "before_align": {"grad_cosine": 0.8}},
    {"round": 3, "grad_cosine": 0.9},
]


def test_alignment_path_draws_the_step_at_aligned_rounds():
    xs, ys = plots.alignment_path(ALIGNED)
    assert xs == [0, 1, 2, 2, 3] and ys == [0.99, 0.9, 0.8, 0.95, 0.9]


def test_discrepancy_curves_mark_before_and_after():
    fig = plots.discrepancy_curves({"FedPFT": ALIGNED, "FedPFT-B": ALIGNED[:2]})
    names = [t.name for t in fig.data]
    assert names == ["FedPFT", "FedPFT: before alignment", "FedPFT: after alignment", "FedPFT-B"]
    assert list(fig.data[1].y) == [0.8] and list(fig.data[2].y) == [0.95]
    assert [s.x0 for s in fig.layout.shapes] == [2]


def test_layer_heatmap_is_layers_by_rounds_with_gaps():
    m = np.array([[0.9, 0.8], [0.7, np.nan], [0.6, 0.5]])
    fig = plots.layer_heatmap(m, [0, 1, 2], "per-layer cosine", aligned=[1])
    z = fig.data[0].z
    assert len(z) == 2 and list(z[0]) == [0.9, 0.7, 0.6] and z[1][1] is None
    assert [s.x0 for s in fig.layout.shapes] == [1]
    with pytest.raises(ConfigError):
        plots.layer_heatmap(m, [0, 1], "bad")


def test_metric_bars_one_panel_per_metric():
    fig = plots.metric_bars({"FedPFT": {"MB": 1.0, "s": 2.0}, "FedOT": {"MB": 0.5, "s": 1.0}})
    assert len(fig.data) == 2 and list(fig.data[0].x) == ["FedPFT", "FedOT"] and list(fig.data[1].y) == [2.0, 1.0]


def test_method_and_cost_updaters_stream_several_runs():
    names = ["FedPFT", "FedPFT-B"]
    curves = plots.empty_method_curves(names, "grad_cosine")
    cost = go.Figure([go.Scatter(x=[], y=[]), go.Scatter(x=[], y=[])])

    def work(stop, emit):
        for name in names:
            for r in ALIGNED:
                emit({**r, "method": name, "bytes_up": 1e6, "bytes_down": 2e6})
        emit({"step": 0, "loss": 1.0})

    update = widgets.combine_updaters(widgets.method_curve_updater(names, "grad_cosine"),
                                      widgets.cumulative_cost_updater(fig_index=1))
    panel = widgets.RunPanel(work, update, [curves, cost])
    panel.start_button.click()
    assert panel.run.join(timeout=10) and panel.run.error is None
    live, live_cost = panel.figs
    assert list(live.data[0].x) == [0, 1, 2, 2, 3] and list(live.data[0].y) == [0.99, 0.9, 0.8, 0.95, 0.9]
    assert len(live.data[1].y) == 5 and len(live.layout.shapes) == 2
    assert list(live_cost.data[0].y) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert live_cost.data[1].y[-1] == 16.0


def test_step_curve_updater_draws_a_live_loss_curve():
    fig = go.FigureWidget(plots.loss_curve([]))
    update = widgets.step_curve_updater()
    for step, loss in enumerate([3.0, 2.0, 1.5]):
        update({"step": step, "loss": loss}, [fig])
    update({"status": "evaluating"}, [fig])
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[0].y) == [3.0, 2.0, 1.5]


def test_subfm_explorer_recounts_and_redraws_instantly():
    from fedpft_lab import lab_helpers, models

    fm = models.load_fm("tiny-bert", num_labels=2, seed=0)
    sal = lab_helpers.layer_saliencies(fm)
    panel = widgets.subfm_explorer(fm, sal, keep_ratio=0.25, retained=(0, 3))
    bars, hists = panel.figs["params"], panel.figs["saliency"]
    sub_before = bars.data[0].y[1]
    assert len(hists.data) == 2 * len(sal) and len(hists.data[2].x) == 16     # 25% of 64 neurons kept
    panel.controls["keep_ratio"].value = 0.5
    assert bars.data[0].y[1] > sub_before and len(hists.data[2].x) == 32
    assert bars.data[0].y[0] == pytest.approx(models.transformer_params(fm) / 2**20)
    panel.controls["retained"].value = (1,)
    assert len(hists.data[2].x) == 64 and len(hists.data[0].x) == 32          # layer 1 full, layer 0 compressed
    assert "layer-drop proxy" in panel.readout.value


# ----------------------------------------------------------------------------- lab panels on the tiny model

@pytest.fixture(scope="module")
def tiny_lab(tiny_ws):
    from fedpft_lab import federation

    cfg = federation.FedConfig(data=tiny_ws.cfg, rounds=2, distill_steps=2, distill_batch_size=4, align_steps=1,
                               align_batch_size=4, align_interval=1, lora_rank=2)
    return cfg, tiny_ws


def test_construction_panel_fills_both_figures(tiny_lab):
    from fedpft_lab import lab_helpers

    cfg, ws = tiny_lab
    explorer = widgets.subfm_explorer(ws.fm, lab_helpers.layer_saliencies(ws.fm), 0.5, (0, 3))
    panel = widgets.construction_panel(ws.fm, ws.probe_batches, explorer, cfg.lora_config(), seed=0)
    panel.start_button.click()
    assert panel.run.join(timeout=120) and panel.run.error is None
    cos, gap = panel.figs
    assert all(v is not None for v in cos.data[0].y)                   # layer-wise: every layer
    assert [v is not None for v in cos.data[1].y] == [True, False, False, True]
    assert "layer-wise" in cos.layout.title.text and panel.progress.value == 1.0
    explorer.controls["retained"].value = ()                            # FedOT needs adapter layers
    panel.start_button.click()
    assert panel.run.join(timeout=60) and "ConfigError" in panel.status.value


def test_distill_panel_streams_the_loss_and_draws_gaps(tiny_lab):
    cfg, ws = tiny_lab
    panel = widgets.distill_panel(ws, cfg.sub_config(), cfg.distill_config(), cfg.lora_config(), seed=0)
    panel.controls[0].value = 5
    panel.start_button.click()
    assert panel.run.join(timeout=120) and panel.run.error is None
    loss, gaps = panel.figs
    assert len(loss.data[0].y) == 5
    compressed = list(cfg.sub_config().compressed(4))
    for trace in gaps.data:                 # bars need both: the reset at Start empties x as well as y
        assert list(trace.x) == compressed and len(trace.y) == len(compressed) and None not in trace.y
    assert "logit KL" in gaps.layout.title.text
    first = list(loss.data[0].y)
    assert panel.controls[3].value is False                             # default: the official code's matched layers
    panel.controls[3].value = True                                      # ... plus the last layer's output
    panel.start_button.click()
    assert panel.run.join(timeout=120) and panel.run.error is None
    assert len(loss.data[0].y) == 5 and list(loss.data[0].y) != first


def test_distill_panel_stopped_run_draws_its_gaps_without_the_old_plug_in_title(tiny_lab, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))     # an uncached distillation, so there is a step to stop
    cfg, ws = tiny_lab
    panel = widgets.distill_panel(ws, cfg.sub_config(), cfg.distill_config(), cfg.lora_config(), seed=0)
    panel.controls[0].value = 5
    panel.start_button.click()
    assert panel.run.join(timeout=120) and "plug-in" in panel.figs[1].layout.title.text
    panel.controls[0].value = 400
    panel.run.on_event(lambda event: panel.stop() if event.get("step") == 1 else None)
    panel.start_button.click()
    assert panel.run.join(timeout=120) and panel.run.stopped and panel.run.error is None
    loss, gaps = panel.figs
    assert 2 <= len(loss.data[0].y) < 400
    assert "plug-in" not in gaps.layout.title.text                      # this run measured no plug-in gap
    assert all(len(t.x) == len(t.y) == len(cfg.sub_config().compressed(4)) for t in gaps.data)
    assert not any(c.disabled for c in panel.controls) and not panel.start_button.disabled


def test_panel_descriptions_are_shown_in_full(tiny_lab):
    """ipywidgets cuts a description at a fixed width ('weight ter…'); the panels give each its own width."""
    cfg, ws = tiny_lab
    for panel in (widgets.distill_panel(ws, cfg.sub_config(), cfg.distill_config()), widgets.discrepancy_panel(cfg, ws),
                  widgets.partition_explorer(np.arange(40) % 2, ["a", "b"], num_clients=4)):
        controls = panel.controls.values() if isinstance(panel.controls, dict) else panel.controls
        for control in controls:
            if isinstance(control, widgets.w.Checkbox):
                assert control.indent is False and control.layout.width == "auto"
            else:
                assert control.style.description_width == "initial", control.description


def test_fed_run_panel_moves_within_round_0_and_stops_between_client_steps(tiny_lab, tmp_path, monkeypatch):
    """The bar moves before round 0 is known (evaluation jobs) and with every client batch; Stop inside round 2
    ends the run there: round 2 is neither drawn nor saved, and the controls unlock."""
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))     # a fresh run, not a replay of an earlier test's
    cfg, ws = tiny_lab
    fed = widgets.fed_run_panel(cfg, ws)
    stopped_at = []

    def stop_in_round_2(event):
        if not stopped_at and "round 2/2: clients training" in event.get("status", ""):
            stopped_at.append(len(fed.run.events))
            fed.stop()

    fed.run.on_event(stop_in_round_2)
    fed.start_button.click()
    assert fed.run.join(timeout=300) and fed.run.error is None and fed.run.stopped
    events = fed.run.events
    first_round = next(i for i, e in enumerate(events) if "accuracy" in e)
    assert any("progress" in e for e in events[:first_round])          # the bar moved while round 0 was evaluated
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress) and 0 < progress[0] and progress[-1] < 1
    assert len([e for e in events[stopped_at[0]:] if "clients training" in e.get("status", "")]) <= 2
    curves = fed.figs[0]
    assert list(curves.data[0].x) == [0, 1] and list(curves.layout.xaxis.range) == [-0.25, 2.25]
    assert not any(c.disabled for c in fed.controls) and "stopped" in fed.status.value
    fed.start_button.click()                                           # Start again: resumes, redoes round 2
    assert fed.run.join(timeout=300) and fed.run.error is None and not fed.run.stopped
    assert list(fed.figs[0].data[0].x) == [0, 1, 2] and fed.progress.value == 1.0


def test_fed_run_discrepancy_and_methods_panels_stream_rounds(tiny_lab):
    cfg, ws = tiny_lab
    fed = widgets.fed_run_panel(cfg, ws)
    fed.start_button.click()
    assert fed.run.join(timeout=300) and fed.run.error is None
    curves, cost = fed.figs
    assert list(curves.data[0].x) == [0, 1, 2] and len(cost.data[0].y) == 3 and cost.data[1].y[-1] > 0

    disc = widgets.discrepancy_panel(cfg, ws)
    disc.start_button.click()
    assert disc.run.join(timeout=300) and disc.run.error is None
    cos = disc.figs[0]
    assert [t.name for t in cos.data] == ["FedPFT", "FedPFT-B"]
    assert len(cos.data[0].x) == 4 and len(cos.data[1].x) == 3           # FedPFT aligned once: one extra point
    assert len(cos.layout.shapes) == 1

    methods = widgets.methods_panel(cfg, ws, ["fedot", "fedpft-n"])
    methods.start_button.click()
    assert methods.run.join(timeout=300) and methods.run.error is None
    filled = [t.name for t in methods.figs[0].data if t.y]
    assert filled == ["FedOT", "FedPFT-N"]


def test_add_reference_curve_is_a_dashed_extra_line():
    fig = plots.add_reference_curve(plots.round_curves(ROUNDS), ROUNDS[:2], "accuracy", "FedPETuning")
    ref = fig.data[-1]
    assert ref.name == "FedPETuning" and ref.line.dash == "dash" and list(ref.y) == [0.5, 0.6]


def test_band_curves_draw_a_mean_line_inside_its_band_per_run():
    series = {"FedPFT": {"mean": [0.5, 0.7, 0.8], "low": [0.4, None, 0.7], "high": [0.6, None, 0.9]},
              "FedPFT-N": {"mean": [0.5, 0.6, 0.6], "low": [0.5, 0.5, 0.5], "high": [0.5, 0.7, 0.7]}}
    fig = plots.band_curves(series, "Accuracy over seeds", "accuracy")
    band, line = fig.data[0], fig.data[1]
    assert band.fill == "toself" and not band.showlegend and line.name == "FedPFT"
    assert list(band.x) == [0, 1, 2, 2, 1, 0]
    assert list(band.y) == [0.6, 0.7, 0.9, 0.7, 0.7, 0.4]      # a missing interval collapses onto the mean
    assert list(line.y) == [0.5, 0.7, 0.8] and [t.name for t in fig.data[1::2]] == ["FedPFT", "FedPFT-N"]
    assert fig.layout.xaxis.title.text == "round" and fig.layout.xaxis.dtick == 1
