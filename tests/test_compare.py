"""compare: the table's statistics on hand-made runs, then end to end on the tiny model (provenance, resume)."""
import json
import math
import shutil
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from fedpft_lab.errors import ConfigError

from fedpft_lab import compare as cmp
from fedpft_lab.federation import FedConfig
from fedpft_lab.version import code_version

T2 = 4.3027   # t_{0.975, 2} from a printed table: three seeds


def fake_run(final: float, cosines: list[float], best: float | None = None) -> dict:
    """A metrics dict as federation.run returns it, with the given last-round accuracy and per-round cosines."""
    rounds = [{"round": i, "accuracy": 0.5, "sub_accuracy": 0.4, "grad_cosine": c, "bytes_up": 10,
               "bytes_down": 20, "seconds": 1.0} for i, c in enumerate([0.5, *cosines])]
    rounds[-1]["accuracy"] = final
    return {"final_accuracy": final, "best_accuracy": best if best is not None else final, "rounds": rounds,
            "params": {"fm_transformer": 100, "sub_transformer": 50}, "cost": {"bytes_up": 1e6, "bytes_down": 2e6,
                                                                              "seconds": 3.0}}


RUNS = {
    "fedpft": {0: fake_run(0.80, [0.9, 0.8]), 1: fake_run(0.70, [0.9, 0.9]), 2: fake_run(0.90, [0.7, 0.9])},
    "fedpft-n": {0: fake_run(0.75, [0.6, 0.9]), 1: fake_run(0.70, [0.7, 0.7]), 2: fake_run(0.80, [0.8, 0.6])},
}


def test_summarise_means_intervals_and_paired_differences_by_hand():
    rows = cmp.summarise(RUNS)["methods"]
    acc = rows["fedpft"]["final_accuracy"]
    half = T2 * 0.1 / math.sqrt(3)                                # values 0.8, 0.7, 0.9: sd 0.1
    assert acc["mean"] == pytest.approx(0.8) and acc["ci"] == pytest.approx([0.8 - half, 0.8 + half], abs=1e-4)
    d = rows["fedpft-n"]["vs_fedpft"]["final_accuracy"]           # -0.05, 0, -0.1 seed by seed
    assert d["values"] == pytest.approx([-0.05, 0.0, -0.1]) and d["seeds"] == [0, 1, 2]
    half = T2 * 0.05 / math.sqrt(3)
    assert d["mean"] == pytest.approx(-0.05) and d["ci"] == pytest.approx([-0.05 - half, -0.05 + half], abs=1e-4)
    c = rows["fedpft-n"]["vs_fedpft"]["grad_cosine"]   # mean cosines: N 0.75, 0.7, 0.7; FedPFT 0.85, 0.9, 0.8
    assert c["values"] == pytest.approx([-0.1, -0.2, -0.1])
    assert rows["fedpft"]["vs_fedpft"] is None and rows["fedpft-n"]["grad_cosine_above_fedpft_n"] is None
    # FedPFT vs FedPFT-N round by round: 0.9>0.6, 0.8<0.9, 0.9>0.7, 0.9>0.7, 0.7<0.8, 0.9>0.6 (round 0 not counted)
    assert rows["fedpft"]["grad_cosine_above_fedpft_n"] == {"above": 4, "points": 6, "fraction": pytest.approx(4 / 6)}


def test_one_seed_shows_no_interval_and_no_fake_zero():
    table = cmp.summarise({m: {0: runs[0]} for m, runs in RUNS.items()})
    row = table["methods"]["fedpft-n"]
    assert row["final_accuracy"]["ci"] is None and row["final_accuracy"]["sd"] is None
    assert row["vs_fedpft"]["final_accuracy"]["ci"] is None
    md = cmp.format_table(table)
    assert "n/a" in md and "± 0.0 " not in md


def test_best_round_is_labelled_as_picked_on_the_test_set():
    table = cmp.summarise({"fedpft": {0: fake_run(0.8, [0.9], best=0.85)}})
    row = table["methods"]["fedpft"]
    assert "best_accuracy" not in row and row["best_accuracy_test_picked"]["mean"] == 0.85
    assert "optimistic" in table["notes"]["best_accuracy_test_picked"]
    header = cmp.format_table(table).splitlines()[0]
    assert "last-round acc" in header and "best round (picked on test set, optimistic)" in header


def test_markdown_has_intervals_and_a_paired_table():
    md = cmp.format_table(cmp.summarise(RUNS))
    first, second = md.split("Paired differences from FedPFT")
    assert "| FedPFT | 80.0 ± 10.0 | [55.2, 104.8] |" in first
    assert "| FedPFT-N | -5.0 ± 5.0 | [-17.4, 7.4] |" in second and "| FedPFT | – |" in second
    assert "| 4/6 (67%) |" in second


def test_no_paired_table_without_fedpft_or_fedpft_n():
    assert "Paired" not in cmp.format_table(cmp.summarise({"fedot": RUNS["fedpft"]}))


# --------------------------------------------------------------------------- end to end on the tiny model

@pytest.fixture
def tiny_base(tiny_data_config):
    return FedConfig(method="fedpft", data=tiny_data_config, rounds=2, distill_steps=3, align_interval=1,
                     align_steps=2, sample_fraction=0.5)


@pytest.fixture
def count_runs(monkeypatch):
    calls = []
    real = cmp.run

    def counting(cfg, *args, **kwargs):
        calls.append((cfg.method, cfg.seed))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(cmp, "run", counting)
    return calls


def test_compare_json_is_self_describing_and_resume_reruns_nothing(tmp_path, tiny_base, count_runs, monkeypatch):
    command = "fedpft-lab compare --methods fedpft fedpft-n --seeds 0 1"
    table = cmp.compare(tiny_base, ["fedpft", "fedpft-n"], [0, 1], out_dir=tmp_path, progress=False,
                        command=command)
    assert sorted(count_runs) == [("fedpft", 0), ("fedpft", 1), ("fedpft-n", 0), ("fedpft-n", 1)]
    stored = json.loads((tmp_path / "compare.json").read_text())
    assert stored == json.loads(json.dumps(table))
    assert stored["command"] == command and stored["code_version"] == code_version()
    assert stored["seeds"] == [0, 1] and FedConfig.from_json(stored["base_config"]) == tiny_base
    assert datetime.fromisoformat(stored["created_utc"]).utcoffset() == timezone.utc.utcoffset(None)
    row = stored["methods"]["fedpft-n"]
    assert len(row["final_accuracy"]["ci"]) == 2 and row["vs_fedpft"]["final_accuracy"]["seeds"] == [0, 1]
    runs = {m: {s: json.loads((tmp_path / m / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)}
            for m in ("fedpft", "fedpft-n")}
    assert row["vs_fedpft"]["final_accuracy"]["values"] == pytest.approx(
        [runs["fedpft-n"][s]["final_accuracy"] - runs["fedpft"][s]["final_accuracy"] for s in (0, 1)])
    md = (tmp_path / "compare.md").read_text()
    assert md.startswith(f"`{command}`") and "Paired differences from FedPFT" in md

    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("metrics.json")}
    monkeypatch.setattr(cmp, "prepare", lambda *a, **k: pytest.fail("resume of finished runs prepared data"))
    again = cmp.compare(tiny_base, ["fedpft", "fedpft-n"], [0, 1], out_dir=tmp_path, resume=True, progress=False)
    assert len(count_runs) == 4 and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert again["methods"]["fedpft"]["final_accuracy"] == table["methods"]["fedpft"]["final_accuracy"]


def test_resume_reruns_only_the_methods_a_changed_field_can_move(tmp_path, tiny_base, count_runs):
    """FedPFT-N never distils before FL: a study with another distillation budget reads its runs back."""
    cmp.compare(tiny_base, ["fedpft", "fedpft-n"], [0], out_dir=tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a" / "fedpft-n", tmp_path / "b" / "fedpft-n")
    kept = (tmp_path / "b" / "fedpft-n" / "seed0" / "metrics.json").read_bytes()
    cmp.compare(replace(tiny_base, distill_steps=4), ["fedpft", "fedpft-n"], [0], out_dir=tmp_path / "b",
                resume=True, progress=False)
    assert count_runs == [("fedpft", 0), ("fedpft-n", 0), ("fedpft", 0)]
    assert (tmp_path / "b" / "fedpft-n" / "seed0" / "metrics.json").read_bytes() == kept
    assert json.loads((tmp_path / "b" / "fedpft" / "seed0" / "metrics.json").read_text())["config"]["distill_steps"] == 4


def test_resume_never_overwrites_a_run_made_with_another_config(tmp_path, tiny_base, count_runs):
    """A finished run of another configuration in the folder is the participant's result: --resume stops with
    one line instead of silently redoing (and overwriting) it, and leaves the files as they were."""
    cmp.compare(tiny_base, ["fedpft-n"], [0], out_dir=tmp_path, progress=False)
    cmp.compare(replace(tiny_base, rounds=1), ["fedpft-n"], [0], out_dir=tmp_path / "other", progress=False)
    for name in ("checkpoint.pt", "metrics.json"):                    # a stale, finished run of another config
        (tmp_path / "fedpft-n" / "seed0" / name).write_bytes((tmp_path / "other" / "fedpft-n" / "seed0" / name).read_bytes())
    before = (tmp_path / "fedpft-n" / "seed0" / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="different configuration"):
        cmp.compare(tiny_base, ["fedpft-n"], [0], out_dir=tmp_path, resume=True, progress=False)
    assert len(count_runs) == 3          # the third call stopped while reading the folder, before any training
    assert (tmp_path / "fedpft-n" / "seed0" / "metrics.json").read_bytes() == before