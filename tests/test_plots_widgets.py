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
