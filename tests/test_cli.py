"""The command line end to end: inspect on the real MiniLM, run/compare on a tiny model, clear errors."""
import json

import pytest

from fedpft_lab.cli import main

TINY = ["--fm", "tiny-bert", "--max-train", "160", "--max-test", "64", "--public-blocks", "64", "--clients", "4",
        "--rounds", "2", "--distill-steps", "3", "--align-interval", "1", "--align-steps", "2",
        "--sample-fraction", "0.5", "--quiet"]


@pytest.mark.slow
def test_inspect_on_real_minilm(tmp_path, capsys):
    assert main(["inspect", "--keep-ratio", "0.25", "--retained-layers", "0 5", "--distill-steps", "0",
                 "--max-train", "200", "--max-test", "64", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "inspect.json").read_text())
    assert r["params"] == {"fm_transformer": 10_646_784, "sub_transformer": 7_103_232}
    assert 0.0 < r["grad_cosine"] < 1.0 and r["grad_rel_l2"] > 0 and r["distill_loss"] == []
    assert [l["layer"] for l in r["layers"]] == list(range(6))
    assert [l["compressed"] for l in r["layers"]] == [False, True, True, True, True, False]
    assert [l["kept_neurons"] for l in r["layers"]] == [1536, 384, 384, 384, 384, 1536]
    assert r["layers"][0]["hidden_rel_mse"] == pytest.approx(0.0, abs=1e-9) and r["layers"][1]["hidden_rel_mse"] > 0
    out = capsys.readouterr().out
    assert "10,646,784" in out and "7,103,232" in out and "cosine" in out


@pytest.mark.slow
def test_inspect_keep_ratio_one_is_the_fm(tmp_path):
    assert main(["inspect", "--keep-ratio", "1.0", "--max-train", "200", "--max-test", "64", "--quiet",
                 "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "inspect.json").read_text())
    assert r["grad_cosine"] == pytest.approx(1.0, abs=1e-6) and r["grad_rel_l2"] == pytest.approx(0.0, abs=1e-5)
    assert r["params"]["fm_transformer"] == r["params"]["sub_transformer"]


def test_inspect_distils_on_tiny(tmp_path):
    assert main(["inspect", "--fm", "tiny-bert", "--max-train", "100", "--max-test", "32", "--public-blocks", "32",
                 "--distill-steps", "3", "--quiet", "--out", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "inspect.json").read_text())["distill_loss"]) == 3


def test_run_writes_metrics_and_resume_is_a_no_op_when_done(tmp_path):
    assert main(["run", "--method", "fedpft", *TINY, "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m) >= {"config", "final_accuracy", "best_accuracy", "params", "rounds"}
    assert set(m["params"]) == {"fm_transformer", "sub_transformer", "trainable", "proxy_frozen_bytes", "fm_frozen_bytes"}
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2] and m["rounds"][1]["aligned"]
    assert main(["run", "--method", "fedpft", *TINY, "--out", str(tmp_path), "--resume"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["rounds"] == m["rounds"]
    assert m["config"]["dropout"] is False


def test_run_with_dropout_and_one_worker(tmp_path):
    assert main(["run", "--method", "fedpft-n", *TINY, "--dropout", "--workers", "1", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["dropout"] is True and len(m["rounds"]) == 3


def test_compare_writes_a_table(tmp_path, capsys):
    args = [a for a in TINY if a != "--quiet"]
    argv = ["compare", "--methods", "fedpetuning", "fedpft-n", "--seeds", "0", "1", *args, "--out", str(tmp_path)]
    assert main(argv) == 0
    stored = json.loads((tmp_path / "compare.json").read_text())
    table = stored["methods"]
    assert set(table) == {"fedpetuning", "fedpft-n"} and table["fedpft-n"]["seeds"] == [0, 1]
    assert len(table["fedpetuning"]["final_accuracy"]["values"]) == 2
    assert len(table["fedpetuning"]["final_accuracy"]["ci"]) == 2
    assert stored["command"] == "fedpft-lab " + " ".join(argv) and stored["seeds"] == [0, 1]
    out = capsys.readouterr().out
    assert "| FedPETuning |" in out and "95% CI" in out and "picked on test set, optimistic" in out


def test_run_table_labels_the_best_round_as_optimistic(capsys):
    from fedpft_lab.cli import print_run_table

    rnd = {"round": 1, "accuracy": 0.8, "sub_accuracy": 0.7, "grad_cosine": 0.9, "grad_rel_l2": 0.4, "aligned": False,
           "bytes_up": 1, "bytes_down": 2, "seconds": 1.0}
    print_run_table({"method": "fedpft", "rounds": [rnd], "final_accuracy": 0.8, "best_accuracy": 0.85,
                     "params": {"fm_transformer": 10, "sub_transformer": 5, "trainable": 3},
                     "cost": {"bytes_up": 1, "bytes_down": 2}})
    out = capsys.readouterr().out
    assert "last-round accuracy 0.8000" in out and "best round 0.8500: picked on the test set, optimistic" in out


@pytest.mark.parametrize("args, message", [
    (["run", "--keep-ratio", "1.5"], r"keep_ratio must be in (0, 1], got 1.5"),
    (["run", "--alpha", "0"], "alpha must be in (0, inf), got 0"),
    (["run", "--clients", "500"], "num_clients must be in [1, 160]"),
    (["run", "--task", "imdb"], "task must be one of"),
    (["inspect", "--retained-layers", "0 9"], "retained_layers entries must be in [0, 3]"),
    (["run", "--sample-fraction", "2"], "sample_fraction must be in (0, 1]"),
    (["run", "--workers", "0"], "workers must be in [1, inf], got 0"),
    (["run", "--engine", "flower", "--measure-update"], "use --engine inprocess for it"),
    (["run", "--engine", "flower-sim", "--measure-update"], "use --engine inprocess for it"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, capsys, args, message):
    base = ["--fm", "tiny-bert", "--max-train", "160", "--max-test", "32", "--public-blocks", "32", "--quiet"]
    assert main([*args, *base, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_flower_sim_without_ray_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert main(["run", "--engine", "flower-sim", "--fm", "tiny-bert", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs Ray: pip install 'fedpft-lab[flower-sim]'" in err and "Traceback" not in err


@pytest.mark.parametrize("engine", ["flower", "flower-sim"])
def test_resuming_another_configuration_on_flower_is_one_line_before_any_work(tmp_path, capsys, engine):
    base = ["--fm", "tiny-bert", "--max-train", "160", "--max-test", "32", "--public-blocks", "32", "--rounds", "1",
            "--clients", "2", "--distill-steps", "0", "--quiet", "--out", str(tmp_path)]
    assert main(["run", *base]) == 0
    assert main(["run", "--engine", engine, "--resume", "--lr", "0.5", *base]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different configuration" in err and "Traceback" not in err


def test_a_client_outside_the_partitions_is_one_clear_line(capsys):
    assert main(["client", "--server", "127.0.0.1:9092", "--partition-id", "4", "--num-partitions", "4"]) == 2
    err = capsys.readouterr().err
    assert "--partition-id must be in [0, 3], got 4" in err and "Traceback" not in err


def test_csv_with_missing_column(tmp_path, capsys):
    bad = tmp_path / "mine.csv"
    bad.write_text("sentence,label\nhello,pos\nbye,neg\n")
    assert main(["inspect", "--fm", "tiny-bert", "--data", str(bad), "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "text" in err and "mine.csv" in err


@pytest.mark.notebooks
def test_warm_runs_the_chosen_labs_headless_and_reports_each(capsys):
    """Room preparation: each lab runs to the end under papermill and gets one line with its time."""
    assert main(["warm", "--only", "7", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "07_why_alignment_matters.ipynb" in out and " ok" in out
    assert "1 of 1 labs ran" in out and "caches are warm" in out


def test_warm_rejects_an_unknown_lab_number(capsys):
    assert main(["warm", "--only", "42"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only 42" in err[0] and "allowed" in err[0]
