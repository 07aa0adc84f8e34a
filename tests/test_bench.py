"""The bench on a tiny model: every measurement is present and sane. No timing thresholds: speed is the
machine's business, the bench's job is to measure it correctly (same FLOPs for the same batch, a smaller
proxy counted as cheaper, the report and bench.json complete)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import nbformat
import numpy as np
import pytest

from fedpft_lab import bench
from fedpft_lab.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from threads, and one thread keeps it fast when other jobs share the CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg():
    return bench.bench_config("tiny-bert")


@pytest.fixture(scope="module")
def tiny_bench_ws(cfg):
    from fedpft_lab.workspace import prepare

    return prepare(cfg.data)


def test_matmul_rate_and_machine_info(cfg):
    assert bench.matmul_rate(64, 32, 16, seconds=0.01, repeats=1) > 0
    info = bench.machine_info(cfg)
    assert info["logical_cores"] >= 1 and info["torch_threads"] >= 1
    assert info["peak_flops"] == info["matmul_flops"]["1024x1024@1024x1024"] > 0
    assert all(v > 0 for v in info["matmul_flops"].values())


def test_step_flops_are_deterministic_and_smaller_for_the_sub_fm(tiny_bench_ws):
    ws = tiny_bench_ws
    batch = bench.shard_batches(ws.train.subset(np.arange(16)), 8, seed=0, pad_id=ws.pad_id)[0]
    fm, sub = bench.lora_proxy(ws, None), bench.lora_proxy(ws, 0.25)
    first = bench.train_step_flops(fm, batch)
    assert first > 0 and bench.train_step_flops(fm, batch) == first
    assert all(p.grad is None for p in fm.parameters()), "counting must not leave gradients behind"
    assert bench.train_step_flops(sub, batch) < first


def test_attention_flops_are_counted_in_eval_mode_too(tiny_bench_ws):
    """Without dropout sdpa takes the fused CPU kernel, which FlopCounterMode does not know by itself."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ws = tiny_bench_ws
    batch = bench.shard_batches(ws.train.subset(np.arange(8)), 8, seed=0, pad_id=ws.pad_id)[0]
    model = bench.lora_proxy(ws, None).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=bench._CPU_ATTENTION_FLOPS) as with_attn:
        model(**inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as without:
        model(**inputs)
    assert with_attn.get_total_flops() > without.get_total_flops()


@pytest.mark.parametrize("clients", [1, 2])
def test_client_throughput_times_local_train(tiny_bench_ws, clients):
    ws = tiny_bench_ws
    shard = ws.train.subset(np.arange(20))
    r = bench.client_throughput(bench.lora_proxy(ws, 0.5), shard, ws.pad_id, batch_size=8, repeats=1, peak_flops=1e9,
                                clients=clients)
    assert r["steps"] == 3 and r["examples"] == 20 * clients and r["clients_side_by_side"] == clients
    assert r["flops_per_s"] == pytest.approx(clients * r["flops_per_step"] * r["steps"] / r["seconds"])
    assert r["examples_per_s"] > 0 and r["step_ms_mean"] > 0 and r["step_ms_min"] <= r["step_ms_median"]
    assert r["flops_per_step"] > 0 and r["fraction_of_peak"] > 0
    assert 0 <= r["padding_fraction"] < 1


def test_whole_bench_keys_report_and_json(tmp_path, monkeypatch, cfg):
    result = bench.run_bench(cfg, notebooks=False, log=lambda *_: None)
    assert set(result["training"]) == {"fm", "sub_1", "sub_0.5", "sub_0.25"}
    assert all(t["examples_per_s"] > 0 for t in result["training"].values())
    s = result["sub_vs_fm"]
    assert s["flops_ratio"] < 1 and s["transformer_params_ratio"] < 1 and s["step_time_ratio"] > 0
    sched = result["schedule"]
    assert sched["side_by_side_speedup_over_sequential"] > 0 and sched["dropout_slowdown"] > 0
    assert set(sched["examples_per_s"]) >= {"sequential_1_thread", "side_by_side", "side_by_side_with_dropout"}
    assert result["distill"]["steps_per_s"] > 0 and 0 < result["distill"]["teacher_forward_share"] <= 1
    fed = result["federated"]
    assert [r["round"] for r in fed["rounds"]] == [0, 1, 2]
    assert 0 < fed["eval_share_of_time"] < 1 and fed["eval_breakdown"]["side_by_side_seconds"] > 0
    assert fed["rounds"][0]["client_seconds"] == 0 and fed["rounds"][1]["client_seconds"] > 0
    assert all(0 < r["eval_share"] <= 1 for r in fed["rounds"])
    assert fed["setup_fresh_seconds"] > 0 and fed["setup_cached_seconds"] > 0
    assert result["memory"]["peak_rss_mb"] > 0
    assert "sub-FM(keep 0.25) / FM" in bench.format_report(result)

    monkeypatch.setattr(bench, "run_bench", lambda c, notebooks, log=print: result)
    out = bench.main(argparse.Namespace(out=str(tmp_path), skip_notebooks=True, quick=True, fm="tiny-bert"))
    assert json.loads((tmp_path / "bench.json").read_text())["training"].keys() == out["training"].keys()
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_fresh_cache_is_restored(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))
    with bench.fresh_cache() as tmp:
        assert os.environ["FEDPFT_LAB_CACHE"] == str(tmp) != str(tmp_path)
    assert os.environ["FEDPFT_LAB_CACHE"] == str(tmp_path)


def test_round_record_splits_time():
    r = bench.round_record({"round": 2, "clients": [1, 3], "seconds": 10.0, "train_seconds": 6.0,
                            "client_seconds": 11.0, "eval_seconds": 2.0, "align_seconds": 1.0, "aligned": True})
    assert r["other_seconds"] == pytest.approx(1.0) and r["eval_share"] == pytest.approx(0.2) and r["clients"] == 2


@pytest.mark.notebooks
def test_notebook_times_runs_papermill(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('SMOKE = False\nHEADLESS = False\nOUT_DIR = "."')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, os\njson.dump({'seconds': 0.5, 'smoke': SMOKE}, open(os.path.join(OUT_DIR, 'metrics.json'), 'w'))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    good = tmp_path / "01_good.ipynb"
    nbformat.write(nb, good)
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('broken lab')"))
    bad = tmp_path / "02_bad.ipynb"
    nbformat.write(nb, bad)
    assert bench.lab_notebooks(tmp_path) == [good, bad]
    results = bench.notebook_times([good, bad], smoke_settings=(True,))
    assert [(r["notebook"], r["ok"]) for r in results] == [("01_good.ipynb", True), ("02_bad.ipynb", False)]
    assert results[0]["lab_seconds"] == 0.5 and results[0]["seconds"] > 0 and "broken lab" in results[1]["error"]


def test_scaling_points_differ_only_in_the_number_of_clients():
    cfgs = [bench.scaling_config(n, "tiny-bert") for n in bench.SCALING_CLIENTS]
    assert {c.clients_per_round() for c in cfgs} == {6}                      # the same work per round
    assert {c.data.max_train // c.data.clients for c in cfgs} == {5}         # clients of the same size
    assert max(c.data.max_train for c in cfgs) <= 10_928                     # the tweets' training split
    same = {json.dumps(dataclasses.asdict(dataclasses.replace(
        c, sample_fraction=1.0, data=dataclasses.replace(c.data, clients=1, max_train=1))), sort_keys=True)
        for c in cfgs}
    assert len(same) == 1
    assert all(c.data.device == "cpu" for c in cfgs)


def test_clients_scaling_runs_each_point_in_a_fresh_process():
    r = bench.clients_scaling("tiny-bert", counts=(6, 12), log=lambda _: None)
    points = r["points"]
    assert [p["clients"] for p in points] == [6, 12] and [p["clients_per_round"] for p in points] == [6, 6]
    assert [p["train_examples"] for p in points] == [30, 60]
    assert len({p["pid"] for p in points} | {os.getpid()}) == 3
    assert all(p["peak_rss_mb"] > 0 and len(p["round_seconds"]) == 2 for p in points)
    assert r["peak_rss_ratio"] >= 1 and r["round_seconds_ratio"] >= 1
    assert "clients scaling" in bench.format_scaling(r)


def test_default_speed_times_the_baseline_code_and_both_batchings_as_whole_commands(tmp_path, monkeypatch):
    """Three paths run as fresh ``fedpft-lab run`` commands: a git revision's own CLI (here HEAD, exported), and
    this checkout with random and with length-grouped batches; grouping pads less and computes fewer FLOPs; the
    figures land in bench.json next to whatever the full bench wrote there."""
    from fedpft_lab.presets import preset_config
    from fedpft_lab.workspace import prepare

    r = bench.default_speed("tiny-bert", preset="smoke", baseline="HEAD", log=lambda _: None)
    before, old, now = r["paths"].values()
    assert before["git_revision"] == "HEAD" and old["git_revision"] is None is now["git_revision"]
    assert "--preset smoke" in before["command"] and "--device cpu" in before["command"]  # HEAD's CLI knows both
    assert "--no-group-by-length" in old["command"] and "--group-by-length" in now["command"]
    assert now["padding_fraction"] < old["padding_fraction"] == before["padding_fraction"]
    assert all(p["seconds"] > p["runs"][0]["startup_seconds"] > 0 and p["cpu_seconds"] > 0 for p in (old, now))
    assert r["speedup"] == pytest.approx(before["seconds"] / now["seconds"])
    assert r["grouping_speedup"] == pytest.approx(old["seconds"] / now["seconds"])
    # the smoke preset keeps random batches: HEAD's run and this checkout's random one are the same run
    assert r["same_accuracy_per_path"][bench.NOW_DEFAULT] and before["runs"][0]["final_accuracy"] == \
        old["runs"][0]["final_accuracy"]
    assert r["fraction_of_peak"] == pytest.approx(r["run_flops"] / now["seconds"] / r["peak_flops"])
    cfg = preset_config("smoke", fm="tiny-bert", device="cpu")
    ws = prepare(cfg.data)
    assert bench.run_flops(cfg, ws) > r["run_flops"] > 0   # random batches compute more than the grouped default
    assert "speed-up against HEAD" in bench.format_speed(r)

    (tmp_path / "bench.json").write_text(json.dumps({"training": {"fm": {}}}))
    monkeypatch.setattr(bench, "default_speed", lambda fm, repeats, baseline: r)
    bench.main(argparse.Namespace(out=str(tmp_path), skip_notebooks=True, quick=False, fm="tiny-bert",
                                  only="default-speed", repeats=1))
    assert json.loads((tmp_path / "bench.json").read_text()).keys() == {"training", "default_speed"}


def test_precision_bench_times_both_precisions_and_compares_their_predictions(tmp_path, monkeypatch, tiny_bench_ws):
    import torch

    r = bench.precision_bench("tiny-bert", repeats=1, shard_size=8, log=lambda _: None)
    assert set(r["models"]) == {"sub-FM 0.25", "FM"} and isinstance(r["native_bf16"], bool)
    for m in r["models"].values():
        assert set(m["seconds"]) == {"train", "eval"}
        for job, by_precision in m["seconds"].items():
            assert set(by_precision) == set(bench.PRECISIONS) and min(by_precision.values()) > 0
            assert m["bf16_speedup"][job] == pytest.approx(by_precision["fp32"] / by_precision["bf16-autocast"])
        assert 0.0 <= m["same_prediction"] <= 1.0 and m["max_logit_diff"] > 0   # bf16 rounds: never bit-equal
    assert "same prediction" in bench.format_precision(r)

    # autocast really lowers the precision of the matmuls, and an fp32 pass inside it stays fp32
    fm = bench.lora_proxy(tiny_bench_ws, None)
    batches = tiny_bench_ws.test_batches[:1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(bench.logits_of(fm, batches, "fp32"), bench.logits_of(fm, batches, "fp32"))
    assert not torch.equal(bench.logits_of(fm, batches, "fp32"), bench.logits_of(fm, batches, "bf16-autocast"))

    monkeypatch.setattr(bench, "precision_bench", lambda fm, repeats: {**r, "repeats": repeats})
    bench.main(argparse.Namespace(out=str(tmp_path), skip_notebooks=True, quick=False, fm="tiny-bert",
                                  only="precision", repeats=1))
    assert json.loads((tmp_path / "bench.json").read_text())["precision"]["repeats"] == 3   # at least 3 passes


def test_a_baseline_cli_is_asked_only_for_what_it_knows():
    """A CLI from before presets ran the workshop sizes by default (and only on the CPU, before --device)."""
    old = {"--fm", "--rounds", "--out", "--quiet"}
    assert bench.size_args("workshop", "minilm", old) == ["--fm", "minilm"]
    with pytest.raises(ConfigError, match="preset must be 'workshop' for a baseline CLI without --preset"):
        bench.size_args("smoke", "minilm", old)
    assert bench.size_args("smoke", "tiny-bert", old | {"--preset", "--device"}) == \
        ["--fm", "tiny-bert", "--device", "cpu", "--preset", "smoke"]
    assert {"--preset", "--device", "--group-by-length"} <= bench.cli_run_flags(None)   # this checkout's CLI


def test_an_unknown_baseline_revision_is_one_clear_error():
    with pytest.raises(ConfigError, match="--baseline must be a git revision of this checkout, got 'no-such-rev'"):
        with bench.source_tree("no-such-rev"):
            pass


def test_engine_overhead_runs_the_same_run_on_every_engine(monkeypatch, tmp_path):
    """The bench entry compares whole commands per engine and reports ratios to in-process (commands faked:
    tests/test_flower.py runs the real engines); each run gets a folder of its own under the bench's output."""
    seen, folders = [], []

    def fake(args, out=None):
        seen.append(args)
        folders.append(out)
        engine = args[args.index("--engine") + 1]
        return {"seconds": {"inprocess": 10.0, "flower-sim": 20.0, "flower": 35.0}[engine],
                "cpu_seconds": {"inprocess": 18.0, "flower-sim": 27.0, "flower": 45.0}[engine],
                "final_accuracy": 0.75}
    monkeypatch.setattr(bench, "run_command_seconds", fake)
    r = bench.engine_overhead("tiny-bert", preset="smoke", log=lambda _: None, out=tmp_path)
    assert [a[a.index("--engine") + 1] for a in seen] == ["inprocess", "flower-sim", "flower"]
    assert folders == [tmp_path / "engines" / e for e in ("inprocess", "flower-sim", "flower")]
    assert all(["--preset", "smoke", "--fm", "tiny-bert"] == a[:4] for a in seen)
    assert r["wall_ratio"] == {"inprocess": 1.0, "flower-sim": 2.0, "flower": 3.5}
    assert r["cpu_ratio"]["flower"] == pytest.approx(2.5)
    assert r["same_final_accuracy"] and "3.50x" in bench.format_engines(r)


def test_a_failed_bench_run_keeps_its_output_and_says_where(tmp_path):
    """A run that fails (here at once, on a bad flag) leaves its command and output in its folder, named in the
    error, instead of in a temporary folder that is gone when one wants to read it."""
    folder = tmp_path / "engines" / "flower"
    with pytest.raises(RuntimeError, match=f"its output and logs: {folder}"):
        bench.run_command_seconds(["--fm", "tiny-bert", "--keep-ratio", "1.5"], out=folder)
    log = (folder / "command.log").read_text()
    assert "--keep-ratio 1.5" in log.splitlines()[0] and "keep_ratio must be in (0, 1]" in log
