"""The parameter study: which methods a parameter affects, fail-fast validation, files, resume, the figure."""
import json

import numpy as np
import pytest

from fedpft_lab import compare as cmp
from fedpft_lab import federation, plots, sweep
from fedpft_lab.cli import main
from fedpft_lab.errors import ConfigError
from fedpft_lab.federation import METHODS, FedConfig

TINY = ["--fm", "tiny-bert", "--max-train", "160", "--max-test", "64", "--public-blocks", "64", "--clients", "4",
        "--rounds", "2", "--distill-steps", "3", "--align-steps", "2", "--sample-fraction", "0.5", "--quiet"]


@pytest.fixture
def count_runs(monkeypatch):
    calls = []
    real = cmp.run

    def counting(cfg, *args, **kwargs):
        calls.append((cfg.method, cfg.seed, cfg.align_interval))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(cmp, "run", counting)
    return calls


# --------------------------------------------------------------------------- which methods a parameter affects

def test_affects_table():
    assert [m for m in METHODS if sweep.affects(m, "align_interval")] == ["fedpft", "fedpft-d"]
    assert [m for m in METHODS if sweep.affects(m, "align_proportion")] == ["fedpft", "fedpft-d"]
    assert [m for m in METHODS if not sweep.affects(m, "keep_ratio")] == ["fedpetuning"]
    assert all(sweep.affects(m, "alpha") for m in METHODS)


def test_affects_agrees_with_what_each_method_does():
    for m in METHODS:
        cfg = FedConfig(method=m)
        assert sweep.affects(m, "align_interval") == sweep.affects(m, "align_proportion") == cfg.align_during
        assert sweep.affects(m, "keep_ratio") == (cfg.proxy_kind != "fm")
        assert sweep.affects(m, "distill_steps") == cfg.distil_before


@pytest.mark.parametrize("method, param, a, b", [
    ("fedpft-b", "align_interval", 1, 2), ("fedot", "align_interval", 1, 2),
    ("fedpft-n", "align_proportion", 0.2, 1.0), ("fedpetuning", "keep_ratio", 0.25, 0.75),
    ("fedpft-d", "distill_steps", 2, 4),
])
def test_an_unaffected_method_gives_the_same_numbers(tiny_ws, method, param, a, b):
    base = FedConfig(method=method, data=tiny_ws.cfg, rounds=2, distill_steps=3, align_steps=2, sample_fraction=0.5)
    numbers = [[{k: r[k] for k in ("accuracy", "sub_accuracy", "grad_cosine", "bytes_up", "bytes_down")}
                for r in federation.run(sweep.with_param(base, param, v), tiny_ws, progress=False)["rounds"]]
               for v in (a, b)]
    assert numbers[0] == numbers[1]


# --------------------------------------------------------------------------- bad input fails before any run

@pytest.mark.parametrize("args, message", [
    (["--param", "lr", "--values", "1"], "param must be one of 'align_interval', 'align_proportion', 'keep_ratio', "
                                         "'alpha', 'distill_steps', got 'lr'"),
    (["--param", "keep_ratio", "--values", "0.25", "1.5"], "keep_ratio must be in (0, 1], got 1.5"),
    (["--param", "align_interval", "--values", "2", "2.5"], "align_interval values must be integers, got '2.5'"),
    (["--param", "align_proportion", "--values", "0.5", "x"], "align_proportion values must be numbers, got 'x'"),
    (["--param", "align_interval", "--values", "2", "0"], "align_interval must be in [1, inf], got 0"),
    (["--param", "keep_ratio", "--values", "0.5", "0.50"], "keep_ratio values must differ, got 0.5 more than once"),
    (["--param", "alpha", "--values", "1", "0"], "alpha must be in (0, inf), got 0.0"),
    (["--param", "alpha", "--values", "1", "--partition", "iid"], "alpha only changes a Dirichlet split"),
])
def test_bad_sweeps_fail_with_one_line_before_any_run(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(cmp, "run", lambda *a, **k: pytest.fail("a run started before validation"))
    monkeypatch.setattr(cmp, "prepare", lambda *a, **k: pytest.fail("data prepared before validation"))
    assert main(["sweep", *args, "--methods", "fedpft", "--seeds", "0", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- end to end on the tiny model

def test_sweep_writes_files_in_value_order_runs_unaffected_once_and_resumes(tmp_path, count_runs):
    argv = ["sweep", "--param", "align_interval", "--values", "2", "1", "--methods", "fedpft", "fedpft-b",
            "--seeds", "0", "1", *TINY, "--out", str(tmp_path)]
    assert main(argv) == 0
    # FedPFT-B does not align, so it ran once per seed; FedPFT once per value and seed
    assert sorted(count_runs) == [("fedpft", 0, 1), ("fedpft", 0, 2), ("fedpft", 1, 1), ("fedpft", 1, 2),
                                  ("fedpft-b", 0, 2), ("fedpft-b", 1, 2)]
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["command"] == "fedpft-lab " + " ".join(argv[:-1]) + " " + str(tmp_path)
    assert result["param"] == "align_interval" and result["values"] == [2, 1] and result["seeds"] == [0, 1]
    assert result["code_version"] and result["created_utc"] and result["affected"] == {"fedpft": True,
                                                                                       "fedpft-b": False}
    assert [r["dir"] for r in result["results"]] == ["align_interval=2", "align_interval=1"]
    for r in result["results"]:
        table = json.loads((tmp_path / r["dir"] / "compare.json").read_text())
        assert table["methods"] == r["methods"] and table["value"] == r["value"]
        assert table["base_config"]["align_interval"] == r["value"]
        assert json.loads((tmp_path / r["dir"] / "fedpft" / "seed0" / "metrics.json").read_text())[
            "config"]["align_interval"] == r["value"]
        assert not (tmp_path / r["dir"] / "fedpft-b").exists()
        assert table["reused"] == {"fedpft-b": "../unaffected/fedpft-b"}
    a, b = (r["methods"] for r in result["results"])
    assert a["fedpft-b"]["final_accuracy"] == b["fedpft-b"]["final_accuracy"]
    # align_interval=1 aligns after round 1 of 2, align_interval=2 never (no alignment after the last round)
    assert a["fedpft"]["grad_cosine_by_round"] != b["fedpft"]["grad_cosine_by_round"]
    md = (tmp_path / "sweep.md").read_text()
    assert md.index("| 2 |") < md.index("| 1 |") and "FedPFT-B: not affected by align_interval" in md
    html = (tmp_path / "sweep.html").read_text()
    assert len(html) > 1_000_000 and "Parameter study: align_interval" in html   # plotly.js inlined: opens offline

    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")}
    assert len(mtimes) == 6
    assert main([*argv, "--resume"]) == 0
    assert len(count_runs) == 6 and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((tmp_path / "sweep.json").read_text())["results"][0]["methods"] == result["results"][0]["methods"]


def test_sweep_figure_has_one_line_per_method_with_interval_bars():
    def stat(mean, ci):
        return {"mean": mean, "ci": ci}

    result = {"param": "keep_ratio", "values": [0.1, 0.25, 0.5], "methods": ["fedpft", "fedpft-n"],
              "results": [{"methods": {"fedpft": {"final_accuracy": stat(0.7, [0.6, 0.8])},
                                       "fedpft-n": {"final_accuracy": stat(0.6, None)}}},
                          {"methods": {"fedpft": {"final_accuracy": stat(0.8, [0.75, 0.85])},
                                       "fedpft-n": {"final_accuracy": stat(0.7, None)}}},
                          {"methods": {"fedpft": {"final_accuracy": stat(0.9, [0.9, 0.9])},
                                       "fedpft-n": {"final_accuracy": stat(0.8, None)}}}]}
    fig = sweep.figure(result)
    assert [t.name for t in fig.data] == ["FedPFT", "FedPFT-N"]
    pft, n = fig.data
    assert list(pft.x) == ["0.1", "0.25", "0.5"] and fig.layout.xaxis.type == "category"
    np.testing.assert_allclose(pft.y, [70, 80, 90])
    assert pft.error_y.visible and not pft.error_y.symmetric
    np.testing.assert_allclose(pft.error_y.array, [10, 5, 0], atol=1e-9)
    np.testing.assert_allclose(pft.error_y.arrayminus, [10, 5, 0], atol=1e-9)
    assert np.isnan(np.asarray(n.error_y.array, dtype=float)).all()      # one seed: no bar, not a zero-width one
    assert "keep_ratio" in fig.layout.title.text and "%" in fig.layout.yaxis.title.text


def test_parameter_study_rejects_mismatched_lengths():
    with pytest.raises(ConfigError, match="2 results for 3 values"):
        plots.parameter_study([1, 2, 3], {"FedPFT": [{"mean": 0.5, "ci": None}] * 2}, "alpha")
