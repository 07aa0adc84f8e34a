"""fedpft-lab report: one offline HTML page per run or comparison folder, on real tiny runs."""
from __future__ import annotations

import html
import json
import re
import statistics

import pytest
from plotly.offline import get_plotlyjs

from fedpft_lab import cli
from fedpft_lab import compare as cmp
from fedpft_lab.federation import METHOD_NAMES, FedConfig
from fedpft_lab.report import write_report
from fedpft_lab.version import RESULTS_VERSION

COMMAND = "fedpft-lab compare --methods fedpft fedpft-n --seeds 0 1 --fm tiny-bert"
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=", re.I)


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory, tiny_data_config):
    """A real two-method, two-seed comparison of the tiny model, as `fedpft-lab compare --out` writes it."""
    out = tmp_path_factory.mktemp("compare")
    base = FedConfig(method="fedpft", data=tiny_data_config, rounds=2, distill_steps=3, align_interval=1,
                     align_steps=2, sample_fraction=0.5)
    cmp.compare(base, ["fedpft", "fedpft-n"], [0, 1], out_dir=out, progress=False, command=COMMAND)
    return out


def plotly_js_copies(page: str) -> int:
    """How many times the plotly.js bundle itself is in the page (its start and its end, both must match)."""
    bundle = get_plotlyjs()
    return min(page.count(bundle[:400]), page.count(bundle[-400:]))


def assert_self_contained(page: str, figures: int) -> None:
    assert plotly_js_copies(page) == 1, "plotly.js must be embedded exactly once"
    assert page.count("Plotly.newPlot(") == figures
    assert not SCRIPT_SRC.search(page), "no <script src=...>: the page must work offline"
    assert page.lstrip().startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_run_report_has_curves_numbers_config_and_code_version(compare_dir, tmp_path):
    run_dir = compare_dir / "fedpft" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    path = write_report(run_dir, tmp_path / "run.html")
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page, figures=2)                      # accuracy and gradient cosine
    assert f"{100 * metrics['final_accuracy']:.1f}" in page
    for r in metrics["rounds"]:                                 # the per-round table, independently formatted
        assert f"<td>{r['grad_cosine']:.4f}</td>" in page
    assert RESULTS_VERSION in page and html.escape('"distill_steps": 3') in page


def test_compare_report_via_cli_has_intervals_paired_differences_and_command(compare_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert cli.main(["report", str(compare_dir), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page, figures=3)                      # interval bars, accuracy band, cosine band
    assert html.escape(COMMAND) in page and RESULTS_VERSION in page
    runs = {m: [json.loads((compare_dir / m / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
            for m in ("fedpft", "fedpft-n")}
    for method, ms in runs.items():                             # mean ± sd over seeds, recomputed here
        accs = [100 * m["final_accuracy"] for m in ms]
        assert f"<td>{statistics.fmean(accs):.1f} ± {statistics.stdev(accs):.1f}</td>" in page
        assert METHOD_NAMES[method] in page
    diffs = [100 * (n["final_accuracy"] - f["final_accuracy"]) for n, f in zip(runs["fedpft-n"], runs["fedpft"])]
    assert f"<td>{statistics.fmean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}</td>" in page
    table = json.loads((compare_dir / "compare.json").read_text())
    lo, hi = table["methods"]["fedpft"]["final_accuracy"]["ci"]
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in page and "95% CI" in page


def test_default_output_is_inside_the_folder(compare_dir):
    path = write_report(compare_dir)
    assert path == compare_dir / "report.html" and path.is_file()


def test_a_folder_without_results_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "sweep.json").write_text("{}")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.json" in err and "compare.json" in err and "value folders" in err
    assert not (tmp_path / "report.html").exists()
