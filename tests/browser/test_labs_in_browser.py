"""Every lab in a real browser: JupyterLab + Chromium (Playwright), as a participant would use it.

For each lab: Run All (SMOKE; the default sizes too where they take under a minute), then check what a
participant sees: no error or stderr output, no widget that failed to render, every plotly figure drawn with data
in every trace, titles inside their figure, widget descriptions not cut, exercise checks passing. Then the live
panel: one interaction per kind of control, each changing the figure or the readout; for panels with Start, the
first visible update (timed), completion, and Stop (timed) unlocking the controls.

Timings of the first update after Start and of Stop are written to ``tests/_screenshots/feedback.json``.
"""
from __future__ import annotations

import contextlib
import re
import time

import pytest

pytest.importorskip("pytest_playwright", reason="the browser tests need Playwright: pip install -e '.[dev]'")
pytestmark = pytest.mark.browser

LABS = ["01_clients_and_skew", "02_building_a_sub_fm", "03_layer_level_distillation",
        "04_federated_proxy_finetuning", "05_gradient_discrepancy", "06_baselines_and_ablations",
        "07_why_alignment_matters"]
DEFAULT_SIZE = ["01_clients_and_skew", "02_building_a_sub_fm", "03_layer_level_distillation",
                "07_why_alignment_matters"]                 # their Run All at default sizes takes under a minute
WITHOUT_PANEL = ["08_simulation_to_deployment"]             # Run All and the static checks only
RAW_REPR = re.compile(r"\{\s*['\"\d]|PosixPath\(")                     # a printed dict or path repr


def check_run_all(lab) -> dict:
    """The static checks after Run All; returns the figures for the lab-specific checks."""
    cells = lab.cells()
    problems = []
    for cell in cells:
        for out in cell["outputs"]:
            head = cell["source"][:60].replace("\n", " ")
            if out["output_type"] == "error":
                problems.append(f"cell {cell['index']} ({head}) raised {out['ename']}: {out['evalue']}")
            elif out.get("name") == "stderr":
                problems.append(f"cell {cell['index']} ({head}) wrote to stderr: {''.join(out['text'])[:300]}")
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            if out["output_type"] in ("stream", "execute_result") and RAW_REPR.search(text) \
                    and "text/html" not in out.get("data", {}):
                problems.append(f"cell {cell['index']} ({head}) shows a raw Python repr: {text[:200]}")
    checks = [c for c in cells if "nb.check(" in c["source"]]
    assert checks, "a lab has an exercise check"
    for cell in checks:
        printed = "".join("".join(o.get("text", "")) for o in cell["outputs"])
        if "✓" not in printed:
            problems.append(f"check cell {cell['index']} did not print ✓: {printed[:200]}")
    problems += [f"widget failed to render: {t[:200]}" for t in lab.widget_errors()]
    figures = lab.figures()
    assert figures, "the lab draws plotly figures"
    for fig in figures:
        live = fig["cell"] == lab.panel_index
        if fig["width"] < 100 or fig["height"] < 100:
            problems.append(f"figure {fig['title']!r} is not drawn ({fig['width']}x{fig['height']})")
        if fig["title_overflow"] > 1:
            problems.append(f"title of {fig['title']!r} sticks out of the figure by {fig['title_overflow']:.0f} px")
        empty = [t["name"] or t["type"] for t in fig["traces"] if t["points"] == 0]
        if empty and not live:                               # live figures fill on Start; checked there
            problems.append(f"figure {fig['title']!r}: traces without data: {empty}")
    problems += [f"cut widget label: {t!r}" for t in lab.cut_labels()]
    assert not problems, f"{lab.name}:\n" + "\n".join(problems)
    return figures


@pytest.mark.parametrize("lab_name", LABS)
def test_lab_in_the_browser(lab_name, open_lab, screenshots, feedback_log):
    """SMOKE Run All and the static checks, then the live panel: one interaction per kind of control."""
    lab = open_lab(lab_name, smoke=True)
    seconds = lab.run_all()
    print(f"{lab_name}: Run All (SMOKE) {seconds:.1f} s")
    panel = lab.panel()
    try:
        figures = check_run_all(lab)
        STATIC_CHECKS.get(lab_name, lambda figures: None)(figures)
        for i, figure in enumerate(lab.notebook().locator(".js-plotly-plot").all()):
            lab.screenshot(screenshots, f"figure{i:02d}", figure)
        PANELS[lab_name](lab, panel, feedback_log, lambda what: lab.screenshot(screenshots, what, panel))
    finally:
        with contextlib.suppress(Exception):          # a failed screenshot must not hide the failure itself
            lab.screenshot(screenshots, "panel", panel)


@pytest.mark.parametrize("lab_name", WITHOUT_PANEL)
def test_lab_without_a_live_panel_in_the_browser(lab_name, open_lab, screenshots):
    """Lab 08 has no live panel (its Flower run is too slow for sliders): Run All (SMOKE) and the static checks."""
    lab = open_lab(lab_name, smoke=True)
    seconds = lab.run_all()
    print(f"{lab_name}: Run All (SMOKE) {seconds:.1f} s")
    check_run_all(lab)
    for i, figure in enumerate(lab.notebook().locator(".js-plotly-plot").all()):
        lab.screenshot(screenshots, f"figure{i:02d}", figure)


@pytest.mark.parametrize("lab_name", DEFAULT_SIZE)
def test_lab_at_default_size_in_the_browser(lab_name, open_lab):
    """The labs that take under a minute also Run All at their default sizes, as a participant runs them."""
    lab = open_lab(lab_name, smoke=False)
    seconds = lab.run_all()
    print(f"{lab_name}: Run All (default sizes) {seconds:.1f} s")
    check_run_all(lab)


def static_02(figures):
    """The saliency histograms name both kinds in the legend and label their axes."""
    hist = next(f for f in figures if f["title"].startswith("FFN neuron saliency"))
    assert hist["legend"] == ["kept", "dropped"], hist["legend"]
    assert "saliency" in hist["axis_titles"] and "neurons" in hist["axis_titles"], hist["axis_titles"]


def static_rounds(figures):
    """Round axes tick whole rounds (SMOKE runs have 2: plotly would label 0.5 and 1.5)."""
    rounds = [f for f in figures if f["xtitle"] == "round"]
    assert rounds
    for fig in rounds:
        assert all(re.fullmatch(r"\d+", t) for t in fig["xticks"]), (fig["title"], fig["xticks"])


STATIC_CHECKS = {"02_building_a_sub_fm": static_02, "04_federated_proxy_finetuning": static_rounds,
                 "05_gradient_discrepancy": static_rounds, "06_baselines_and_ablations": static_rounds}


# ----------------------------------------------------------------------------- driving the live panels

# The RunPanel around the Start button: the smallest box holding the button and the live figures (lab 02 shows an
# explorer with figures of its own next to it).
_RUN_PANEL_JS = """
    const button = (text) => Array.from(root.querySelectorAll('button')).find((b) => b.textContent.trim() === text);
    const start = button('Start');
    let run = start.parentElement;
    while (!run.querySelector('.js-plotly-plot')) run = run.parentElement;
    const bar = run.querySelector('.progress .progress-bar');
    const status = start.closest('.widget-hbox').nextElementSibling;
"""
# Click Start, then watch the panel with a MutationObserver: first the reset (Start disabled, bar at 0, figures
# empty), then the first visible update: the bar moves or a figure gains a drawn point. Times in ms from the click.
START_JS = """async (root, timeoutMs) => {""" + _RUN_PANEL_JS + """
    const progress = () => parseFloat(bar.style.width) || 0;
    const drawn = (t) => Math.min(t._length || 0, (t.y || []).filter((v) => v !== null && v !== undefined).length);
    const points = () => Array.from(run.querySelectorAll('.js-plotly-plot'))
        .reduce((n, el) => n + (el._fullData || []).reduce((m, t) => m + drawn(t), 0), 0);
    return await new Promise((resolve) => {
        const t0 = performance.now();
        let reset = null;
        const finish = (first) => { observer.disconnect(); clearTimeout(timer);
            resolve({reset_ms: reset, first_ms: first, progress: progress(), points: points()}); };
        const check = () => {
            if (reset === null) {
                if (start.disabled && progress() === 0 && points() === 0) reset = performance.now() - t0;
            } else if (progress() > 0 || points() > 0) {
                finish(performance.now() - t0);
            }
        };
        const observer = new MutationObserver(check);
        observer.observe(root, {subtree: true, attributes: true, childList: true, characterData: true});
        const timer = setTimeout(() => finish(null), timeoutMs);
        start.click();
        check();
    });
}"""
# Click Stop and time until the panel says it stopped, its controls are unlocked and Start is enabled again.
STOP_JS = """async (root, timeoutMs) => {""" + _RUN_PANEL_JS + """
    return await new Promise((resolve) => {
        const t0 = performance.now();
        const finish = (ms) => { observer.disconnect(); clearTimeout(timer); resolve(ms); };
        const locked = () => Array.from(run.querySelectorAll('select, input, .noUi-target'))
            .some((el) => el.disabled === true || el.hasAttribute('disabled'));
        const check = () => {
            if (!start.disabled && !locked() && /stopped/.test(status.innerText)) finish(performance.now() - t0);
        };
        const observer = new MutationObserver(check);
        observer.observe(root, {subtree: true, attributes: true, childList: true, characterData: true});
        const timer = setTimeout(() => finish(null), timeoutMs);
        button('Stop').click();
    });
}"""


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def slider(panel, description: str):
    """The noUiSlider handle of the slider labelled ``description`` (arrow keys move it one step)."""
    box = panel.locator(".widget-slider").filter(
        has=panel.page.locator(".widget-label", has_text=re.compile(f"^{re.escape(description)}$")))
    return box.locator(".noUi-handle"), box.locator(".widget-readout")


def nudge(panel, description: str, key: str = "ArrowRight", times: int = 1) -> str:
    """Move a slider by ``times`` steps; returns the new readout."""
    handle, readout = slider(panel, description)
    before = readout.inner_text()
    handle.focus()
    for _ in range(times):
        handle.press(key)
    return wait_until(lambda: readout.inner_text() != before and readout.inner_text(), 30, f"slider {description}")


def controls_locked(panel) -> list[bool]:
    """Disabled state of every control of the panel (selects, inputs, sliders; not its Start/Stop buttons)."""
    return panel.evaluate("""(root) => Array.from(root.querySelectorAll('select, input, .noUi-target'))
        .map((el) => el.disabled === true || el.hasAttribute('disabled'))""")


def panel_text(panel) -> str:
    return panel.evaluate("(root) => root.innerText")


def run_status(panel) -> str:
    """The status line of the panel's RunPanel (under its Start/Stop row)."""
    return panel.evaluate("(root) => {" + _RUN_PANEL_JS + " return status.innerText; }")


def by_title(figures: list[dict], words: str) -> dict:
    hits = [f for f in figures if words in f["title"]]
    assert len(hits) == 1, f"expected one figure titled like {words!r}, got {[f['title'] for f in figures]}"
    return hits[0]


def points(fig: dict) -> list[int]:
    return [t["points"] for t in fig["traces"]]


def start_run(lab, panel, feedback_log, what: str, timeout_s: float = 600) -> dict:
    """Click Start; time the first visible update; wait for the run to finish; log the timing."""
    timing = panel.evaluate(START_JS, timeout_s * 1000)
    assert timing["first_ms"] is not None, f"{lab.name} ({what}): nothing moved within {timeout_s:.0f} s of Start"
    feedback_log.append({"lab": lab.lab, "action": "start", "what": what, "first_update_s": timing["first_ms"] / 1e3,
                         "reset_s": (timing["reset_ms"] or 0) / 1e3})
    return timing


def wait_done(lab, panel, timeout_s: float = 900) -> str:
    text = wait_until(lambda: (t := run_status(panel)) and re.search(r"done in|stopped after|Error", t) and t,
                      timeout_s, f"{lab.name}: the run to finish")
    assert "done in" in text, f"{lab.name}: the run did not finish cleanly:\n{text[-600:]}"
    assert not any(controls_locked(panel)), f"{lab.name}: controls still locked after the run"
    return text


def stop_run(lab, panel, feedback_log, what: str, ready: str | None = None, timeout_s: float = 600) -> float:
    """Start, wait until the status shows ``ready`` (e.g. clients training; None: the first update), click Stop
    and time it until the panel says it stopped."""
    start_run(lab, panel, feedback_log, what)
    if ready is not None:
        wait_until(lambda: re.search(ready, run_status(panel)), timeout_s, f"{lab.name}: {ready!r} before Stop")
    ms = panel.evaluate(STOP_JS, 60_000)
    assert ms is not None, f"{lab.name}: Stop did not stop the run within 60 s"
    feedback_log.append({"lab": lab.lab, "action": "stop", "what": what, "stopped_s": ms / 1e3})
    assert not any(controls_locked(panel)), f"{lab.name}: controls still locked after Stop"
    return ms / 1e3


def check_live_figures(lab, panel, expect_empty: tuple[str, ...] = ()) -> list[dict]:
    """After a finished run: every live trace drawn (except ``expect_empty``), titles inside, whole-round ticks."""
    figures = lab.figures(panel)
    problems = []
    for fig in figures:
        empty = [t["name"] for t in fig["traces"] if t["points"] == 0 and t["name"] not in expect_empty]
        if empty:
            problems.append(f"live figure {fig['title']!r}: traces without data: {empty}")
        if fig["title_overflow"] > 1:
            problems.append(f"title of {fig['title']!r} sticks out of the figure by {fig['title_overflow']:.0f} px")
        if fig["xtitle"] == "round" and any(not re.fullmatch(r"−?\d+", t) for t in fig["xticks"]):
            problems.append(f"live figure {fig['title']!r} has ticks between rounds: {fig['xticks']}")
    problems += [f"cut widget label: {t!r}" for t in lab.cut_labels(panel)]
    assert not problems, f"{lab.name}:\n" + "\n".join(problems)
    return figures


# ----------------------------------------------------------------------------- one check per lab panel

def panel_01(lab, panel, feedback_log, shoot):
    """Partition explorer: a slider, a dropdown and a number box each redraw the heatmap and the readout."""
    def heatmap():
        return by_title(lab.figures(panel), "Label mix")["traces"][0]

    rows, text = heatmap()["points"], panel_text(panel)
    assert nudge(panel, "clients") == str(rows + 1)
    wait_until(lambda: heatmap()["points"] == rows + 1 and panel_text(panel) != text, 60,
               "the heatmap to gain a client row")
    data, text = heatmap()["data"], panel_text(panel)
    panel.get_by_label("scheme", exact=True).select_option("iid")
    wait_until(lambda: heatmap()["data"] != data and panel_text(panel) != text, 60, "a redraw for the IID scheme")
    data = heatmap()["data"]
    seed = panel.get_by_label("seed", exact=True)
    seed.fill("7")
    seed.press("Enter")
    wait_until(lambda: heatmap()["data"] != data, 60, "the heatmap to change with the seed")


def panel_07(lab, panel, feedback_log, shoot):
    """Convex explorer: each slider redraws the proxy curves and the readout."""
    def readout():
        return panel_text(panel)

    before = readout()
    nudge(panel, "period T")
    wait_until(lambda: readout() != before, 60, "the readout to change with T")
    before = readout()
    nudge(panel, "delta")
    wait_until(lambda: readout() != before, 60, "the readout to change with delta")


def panel_02(lab, panel, feedback_log, shoot):
    """Explorer: keep-ratio slider and retained-layer list redraw instantly; rebuild panel: Start and Stop."""
    def params():
        return by_title(lab.figures(panel), "parameters a client")["traces"][0]

    text = panel_text(panel)
    nudge(panel, "keep ratio")
    wait_until(lambda: panel_text(panel) != text, 60, "the explorer to redraw with the keep ratio")
    text = panel_text(panel)
    panel.get_by_label("retained", exact=True).select_option(["layer 0", "layer 2", "layer 5"])
    wait_until(lambda: panel_text(panel) != text, 60, "the explorer to redraw with the retained layers")
    saliency = by_title(lab.figures(panel), "saliency")
    assert saliency["legend"] == ["kept", "dropped"], saliency["legend"]
    start_run(lab, panel, feedback_log, "rebuild both proxies")
    wait_done(lab, panel)
    shoot("panel-done")
    figures = check_live_figures(lab, panel)
    cosine = by_title(figures, "Gradient cosine with the FM:")
    assert "layer-wise" in cosine["title"] and "<br>" in cosine["title"]          # the long title wraps
    stop_run(lab, panel, feedback_log, "rebuild both proxies")


def panel_03(lab, panel, feedback_log, shoot):
    """Distillation: slider, dropdown, checkbox; Start draws the loss live and the gap bars; Stop."""
    nudge(panel, "steps")                                        # 5 -> 10 steps (SMOKE distils 4: not cached)
    panel.get_by_label("weight term α", exact=True).select_option("0.01")
    panel.get_by_role("checkbox", name="also match the last layer's output").check()
    start_run(lab, panel, feedback_log, "distil 10 steps")
    wait_done(lab, panel)
    shoot("panel-done")
    figures = check_live_figures(lab, panel)
    loss, gaps = by_title(figures, "distillation loss"), by_title(figures, "Hidden-state gap")
    assert points(loss) == [10]
    assert points(gaps) == [4, 4] and "plug-in" in gaps["title"]   # compressed layers 1-4, before and after
    handle, _ = slider(panel, "steps")
    handle.focus()
    handle.press("End")                                          # 400 steps: time to stop it
    stop_run(lab, panel, feedback_log, "distil 400 steps", ready=r"distilling")
    figures = lab.figures(panel)
    gaps = by_title(figures, "Hidden-state gap")
    assert "plug-in" not in gaps["title"], "a stopped run must not keep the previous run's plug-in gap"
    assert points(gaps) == [4, 4], "a stopped run draws the gaps of what it distilled"
    assert 0 < points(by_title(figures, "distillation loss"))[0] < 400


def panel_04(lab, panel, feedback_log, shoot):
    """One federated run: a slider changes the run (3 rounds drawn on whole-round ticks); Stop mid-round."""
    assert nudge(panel, "rounds") == "3"
    start_run(lab, panel, feedback_log, "FedPFT, 3 rounds (fresh run)")
    wait_done(lab, panel)
    shoot("panel-done")
    figures = check_live_figures(lab, panel)
    assert points(by_title(figures, "Accuracy per round"))[:2] == [4, 4]
    assert points(by_title(figures, "Cumulative communication")) == [4, 4]
    nudge(panel, "sampled")                                      # another configuration: a fresh run to stop
    stop_run(lab, panel, feedback_log, "FedPFT, 3 rounds (fresh run)", ready=r"round [123]/3: clients training")
    assert points(by_title(lab.figures(panel), "Accuracy per round"))[0] < 4


def panel_05(lab, panel, feedback_log, shoot):
    """FedPFT vs a baseline: the dropdown picks the baseline; a slider makes a fresh run to Stop mid-round."""
    panel.get_by_label("compare with", exact=True).select_option("FedPFT-N")
    start_run(lab, panel, feedback_log, "FedPFT + FedPFT-N (cached replays)")
    wait_done(lab, panel)
    shoot("panel-done")
    figures = check_live_figures(lab, panel)
    cosine = by_title(figures, "Gradient cosine")
    assert [t["name"] for t in cosine["traces"]] == ["FedPFT", "FedPFT-N"]
    nudge(panel, "rounds")
    stop_run(lab, panel, feedback_log, "FedPFT, 3 rounds (fresh run)", ready=r"round [123]/3: clients training")


def panel_06(lab, panel, feedback_log, shoot):
    """Methods side by side: the list picks methods, the slider the rounds; only picked methods are drawn."""
    panel.get_by_label("methods", exact=True).select_option(["FedOT", "FedPFT-N"])
    nudge(panel, "rounds")
    start_run(lab, panel, feedback_log, "FedOT + FedPFT-N, 3 rounds (fresh runs)")
    wait_done(lab, panel)
    shoot("panel-done")
    names = ["FedPFT", "FedPETuning", "FedOT-all", "FedPFT-B", "FedPFT-D"]
    fig = check_live_figures(lab, panel, expect_empty=tuple(names))[0]
    drawn = {t["name"]: t["points"] for t in fig["traces"] if t["points"]}
    assert drawn == {"FedOT": 4, "FedPFT-N": 4}, drawn
    panel.get_by_label("methods", exact=True).select_option(["FedPFT-D"])
    stop_run(lab, panel, feedback_log, "FedPFT-D, 3 rounds (fresh run)", ready=r"round [123]/3: clients training")


PANELS = {"01_clients_and_skew": panel_01, "02_building_a_sub_fm": panel_02, "03_layer_level_distillation": panel_03,
          "04_federated_proxy_finetuning": panel_04, "05_gradient_discrepancy": panel_05,
          "06_baselines_and_ablations": panel_06, "07_why_alignment_matters": panel_07}


def test_every_lab_is_in_the_browser_suite():
    from pathlib import Path

    labs = {p.stem for p in (Path(__file__).resolve().parents[2] / "labs").glob("[0-9][0-9]_*.ipynb")}
    assert labs == set(LABS) | set(WITHOUT_PANEL), "add the new lab to LABS (with its panel check) or WITHOUT_PANEL"
