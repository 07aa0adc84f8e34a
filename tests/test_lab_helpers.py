"""lab_helpers: lab-scale configs, parameter arithmetic, saliency masks, round summaries and the paper tables."""
from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpft_lab import lab_helpers as H
from fedpft_lab import models, subfm
from fedpft_lab.errors import ConfigError
from fedpft_lab.federation import FedConfig

LABS = Path(__file__).resolve().parent.parent / "labs"


@pytest.fixture(scope="module")
def tiny_fm():
    return models.load_fm("tiny-bert", num_labels=2, seed=0)


# ----------------------------------------------------------------------------- configuration

def test_lab_config_starts_from_fedconfig_defaults_and_applies_knobs():
    cfg = H.lab_config("fedpft-b", seed=3, rounds=7, alpha=0.5, keep_ratio=0.5)
    base = FedConfig()
    assert cfg.method == "fedpft-b" and cfg.seed == 3 and cfg.data.seed == 3
    assert cfg.rounds == 7 and cfg.keep_ratio == 0.5 and cfg.data.alpha == 0.5
    assert cfg.data.max_train == H.LAB_DATA["max_train"] and cfg.distill_steps == H.LAB_FED["distill_steps"]
    assert cfg.lr == base.lr and cfg.lora_rank == base.lora_rank         # untouched defaults follow FedConfig
    assert cfg.data.task == base.data.task and cfg.data.fm == base.data.fm


def test_lab_config_smoke_shrinks_sizes_but_keeps_what_is_run():
    cfg = H.lab_config("fedpft", smoke=True, rounds=9, keep_ratio=0.5, align_rule="apoz")
    assert cfg.rounds == H.SMOKE_FED["rounds"] and cfg.data.max_train == H.SMOKE_DATA["max_train"]
    assert cfg.keep_ratio == 0.5 and cfg.align_rule == "apoz"
    assert any(cfg.aligns_in(r) for r in range(1, cfg.rounds + 1)), "SMOKE must still exercise an alignment"


def test_same_knobs_give_the_same_cached_run_key():
    from fedpft_lab import paths

    a = H.lab_config("fedpft", rounds=H.LAB_FED["rounds"])
    b = H.lab_config("fedpft", data={"alpha": FedConfig().data.alpha})
    assert paths.config_key(a.to_json()) == paths.config_key(b.to_json())


def _parameters(path: Path) -> dict:
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {s.targets[0].id: ast.literal_eval(s.value) for s in tree.body}


@pytest.mark.parametrize("stem", ["04_federated_proxy_finetuning", "05_gradient_discrepancy",
                                  "06_baselines_and_ablations"])
def test_labs_04_to_06_default_knobs_match_the_shared_lab_scale(stem):
    """Labs 04/05/06 reuse each other's cached runs only if their default knobs agree with the lab scale."""
    path = LABS / f"{stem}.ipynb"
    if not path.exists():
        pytest.skip(f"{path.name} is not there yet")
    params = _parameters(path)
    base = H.lab_config()
    shared = {"ROUNDS": base.rounds, "DISTILL_STEPS": base.distill_steps,
              "ALPHA": base.data.alpha, "SAMPLE_FRACTION": base.sample_fraction, "KEEP_RATIO": base.keep_ratio,
              "ALIGN_INTERVAL": base.align_interval, "ALIGN_PROPORTION": base.align_proportion,
              "ALIGN_RULE": base.align_rule}
    for name, value in shared.items():
        if name in params:
            assert params[name] == value, f"{stem}: {name}={params[name]!r} breaks run sharing (expected {value!r})"


# ----------------------------------------------------------------------------- parameters

def test_paper_counts_reproduce_81_and_47_mebi():
    c = H.paper_param_counts()
    assert c == {"fm": 85_054_464, "sub_fm": 49_641_984, "layer_drop": 49_615_104}
    assert round(c["fm"] / H.MI) == 81 and round(c["sub_fm"] / H.MI) == 47 and round(c["layer_drop"] / H.MI) == 47
    assert round(c["fm"] / 1e6) == 85                           # in millions it would not read "81M"
    assert H.params_in_units(2**20) == {"M": 1.048576, "Mi": 1.0}


@pytest.mark.parametrize("ratio,retained", [(0.25, None), (0.5, (0,)), (1.0, None), (0.1, (1, 2))])
def test_proxy_param_counts_match_the_built_models(tiny_fm, ratio, retained):
    c = H.proxy_param_counts(tiny_fm, ratio, retained)
    sub, _ = subfm.build_sub_fm(tiny_fm, subfm.SubFMConfig(keep_ratio=ratio, retained_layers=retained))
    assert c["fm"] == models.transformer_params(tiny_fm)
    assert c["sub_fm"] == models.transformer_params(sub)
    drop = subfm.build_layer_drop(tiny_fm, c["layer_drop_layers"])
    assert c["layer_drop"] == models.transformer_params(drop)
    assert set(c["retained"]) <= set(c["layer_drop_layers"])


# ----------------------------------------------------------------------------- saliency

def test_kept_mask_matches_the_planned_sub_fm(tiny_fm):
    sal = H.layer_saliencies(tiny_fm)
    assert sorted(sal) == list(range(models.num_layers(tiny_fm)))
    info = subfm.plan_sub_fm(tiny_fm, subfm.SubFMConfig(keep_ratio=0.25))
    for layer, kept in info.kept.items():
        assert np.flatnonzero(H.kept_mask(sal[layer], 0.25)).tolist() == kept
    masks = H.kept_masks(sal, 0.25, retained=(0, 3))
    assert masks[0].all() and masks[3].all() and masks[1].sum() == round(0.25 * len(sal[1]))


def test_kept_share_is_a_fraction_and_top_neurons_hold_more_than_their_count():
    s = np.array([4.0, 3.0, 2.0, 1.0])
    mask = H.kept_mask(s, 0.5)
    assert mask.tolist() == [True, True, False, False]
    assert H.kept_saliency_share(s, mask) == pytest.approx(25 / 30)
    with pytest.raises(ConfigError):
        H.kept_mask(s, 0.0)


# ----------------------------------------------------------------------------- proxy discrepancy

@pytest.fixture(scope="module")
def tiny_batches():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 1000, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])} for _ in range(2)]


def test_identical_proxy_has_no_discrepancy_and_inputs_are_untouched(tiny_fm, tiny_batches):
    before = copy.deepcopy(tiny_fm.state_dict())
    d = H.proxy_discrepancy(tiny_fm, tiny_fm, tiny_batches)
    assert d["grad_cosine"] == pytest.approx(1.0) and d["grad_rel_l2"] == pytest.approx(0.0, abs=1e-9)
    assert d["logit_kl"] == pytest.approx(0.0, abs=1e-9)
    assert not hasattr(tiny_fm, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in tiny_fm.state_dict().items())


def test_compare_constructions_reports_both_proxies(tiny_fm, tiny_batches):
    events = []
    r = H.compare_constructions(tiny_fm, tiny_batches, keep_ratio=0.25, on_progress=lambda t, f: events.append(f))
    assert events[-1] == 1.0 and events == sorted(events)
    lw, ld = r["layer-wise"], r["layer-drop"]
    assert set(lw["layer_cosine"]) == set(range(4))                  # LoRA in every layer of the sub-FM
    assert set(ld["layer_cosine"]) == set(r["retained"])              # FedOT: adapter layers only
    assert all(v is not None for v in lw["hidden_rel_mse"])
    dropped = [i for i in range(4) if i not in ld["kept_layers"]]
    assert all(ld["hidden_rel_mse"][i] is None for i in dropped)
    assert -1.0 <= lw["grad_cosine"] <= 1.0 and lw["params"] < r["fm_params"]
    assert lw["hidden_rel_mse"][0] == pytest.approx(0.0, abs=1e-6)   # layer 0 is retained: identical


# ----------------------------------------------------------------------------- round records

ROUNDS = [
    {"round": 0, "accuracy": 0.5, "sub_accuracy": 0.6, "bytes_up": 0, "bytes_down": 0, "clients": [],
     "grad_cosine": 0.99, "layer_cosine": [0.9, 0.8]},
    {"round": 1, "accuracy": 0.7, "sub_accuracy": 0.65, "bytes_up": 2_000_000, "bytes_down": 1_000_000,
     "clients": [0, 2], "grad_cosine": 0.9, "layer_cosine": [0.8, None]},
    {"round": 2, "accuracy": 0.8, "sub_accuracy": 0.7, "bytes_up": 2_000_000, "bytes_down": 3_000_000,
     "clients": [1, 2], "grad_cosine": 0.95, "aligned": True, "layer_cosine": [0.85, 0.7],
     "before_align": {"grad_cosine": 0.85, "grad_rel_l2": 0.5}},
]


def test_plugin_gaps_and_cumulative_mb():
    assert H.plugin_gaps(ROUNDS) == pytest.approx([-0.1, 0.05, 0.1])
    mb = H.cumulative_mb(ROUNDS)
    assert mb["uploaded by clients"] == [0.0, 2.0, 4.0] and mb["downloaded by clients"] == [0.0, 1.0, 4.0]


def test_comm_summary_counts_distinct_participants():
    metrics = {"rounds": ROUNDS, "cost": {"bytes_up": 4_000_000, "bytes_down": 4_000_000},
               "params": {"fm_frozen_bytes": 4_000_000}}
    s = H.comm_summary(metrics)
    assert s["participants"] == 3 and s["total_mb"] == 8.0 and s["fm_mb"] == 4.0
    assert s["ratio_to_shipping_fm"] == pytest.approx(8 / 12)


def test_alignment_jumps_and_layer_matrix():
    assert H.alignment_jumps(ROUNDS) == [{"round": 2, "before": 0.85, "after": 0.95,
                                          "jump": pytest.approx(0.1)}]
    assert H.alignment_jumps(ROUNDS, "grad_rel_l2") == []               # no after value in the record
    m = H.layer_matrix(ROUNDS)
    assert m.shape == (3, 2) and np.isnan(m[1, 1]) and m[2, 1] == 0.7


def test_method_costs_and_drop_vs_reference():
    metric = {"params": {"sub_transformer": 2**20}, "cost": {"bytes_up": 1e6, "bytes_down": 2e6,
                                                             "client_seconds": 3.0, "seconds": 9.0}}
    costs = H.method_costs({"fedot": metric})
    assert costs == {"FedOT": {"proxy params (Mi)": 1.0, "communication (MB)": 3.0, "client seconds": 3.0,
                               "run seconds": 9.0}}
    assert H.drop_vs_reference({"fedpetuning": 0.8, "fedpft": 0.75}) == pytest.approx(
        {"fedpetuning": 0.0, "fedpft": -0.05})
    with pytest.raises(ConfigError):
        H.drop_vs_reference({"fedpft": 0.7})


# ----------------------------------------------------------------------------- the paper

def test_paper_tables_hold_the_spec_numbers():
    assert H.PAPER_ABLATION_QNLI["fedpft"] == (87.5, 88.7) and H.PAPER_ABLATION_QNLI["fedpft-n"] == (83.0, 78.9)
    for m in ("fedpetuning", "fedot", "fedpft"):                       # the ablation agrees with Table 1's QNLI
        assert H.PAPER_ABLATION_QNLI[m] == (H.PAPER_TABLE1_IID["BERT"][m]["QNLI"],
                                            H.PAPER_TABLE1_IID["RoBERTa"][m]["QNLI"])
    rows = H.paper_table1_rows("SST-2")
    assert [r["method"] for r in rows] == ["FedPETuning", "FedOT", "FedPFT"] and rows[1]["BERT"] == 90.4
    t2 = H.paper_table2_rows("QNLI")
    assert t2[2]["RoBERTa Dir-10"] == 88.1 and t2[0]["BERT Dir-1"] == 87.3


def test_ours_vs_paper_puts_drops_side_by_side():
    rows = H.ours_vs_paper({"fedpetuning": 0.80, "fedpft": 0.78, "fedot": 0.70})
    by = {r["method"]: r for r in rows}
    assert set(by) == {"FedPETuning", "FedOT", "FedPFT"}
    assert by["FedPFT"]["ours vs FedPETuning (pts)"] == pytest.approx(-2.0)
    assert by["FedPFT"]["paper BERT vs FedPETuning (pts)"] == pytest.approx(-0.9)
    assert H.ours_vs_paper({"fedpft": 0.7})[0]["ours vs FedPETuning (pts)"] is None


def test_construction_series_index_by_fm_layer(tiny_fm, tiny_batches):
    r = H.compare_constructions(tiny_fm, tiny_batches, keep_ratio=0.5)
    cos = H.construction_series(r, "layer_cosine", 4)
    assert list(cos) == ["layer-wise sub-FM", "layer-drop proxy"]
    assert all(v is not None for v in cos["layer-wise sub-FM"])
    assert [v is None for v in cos["layer-drop proxy"]] == [i not in r["retained"] for i in range(4)]
    gaps = H.construction_series(r, "hidden_rel_mse")
    assert len(gaps["layer-drop proxy"]) == 4


def test_compare_constructions_needs_a_retained_layer(tiny_fm, tiny_batches):
    with pytest.raises(ConfigError, match="retained"):
        H.compare_constructions(tiny_fm, tiny_batches, keep_ratio=0.5, retained_layers=())


def test_lab_config_accepts_a_retained_list_and_same_ffn_compares_tensors(tiny_fm):
    assert H.lab_config(retained_layers=[5, 0, 0]).retained_layers == (0, 5)
    a, _ = subfm.build_sub_fm(tiny_fm, subfm.SubFMConfig(keep_ratio=0.5))
    b = copy.deepcopy(a)
    assert H.same_ffn(a, b, [1, 2])
    with torch.no_grad():
        models.ffn(b, 2)[0].weight[0, 0] += 1e-6
    assert H.same_ffn(a, b, [1]) and not H.same_ffn(a, b, [1, 2])


def test_per_module_table_skips_the_zero_lora_a_gradients():
    report = {name: {"per_module": {"head": {"cosine": 0.9, "rel_l2": 0.1}, "q.lora_A": {"cosine": 1.0, "rel_l2": 0.0},
                                    "q.lora_B": {"cosine": 0.5, "rel_l2": 0.8}}}
              for name in ("layer-wise", "layer-drop")}
    table = H.per_module_table(report)
    assert table == {"layer-wise sub-FM": {"head": 0.9, "q.lora_B": 0.5}, "layer-drop proxy": {"head": 0.9, "q.lora_B": 0.5}}
    assert H.per_module_table(report, "rel_l2", skip=())["layer-drop proxy"]["q.lora_A"] == 0.0


@pytest.mark.parametrize("cores,load,expected", [(2, 0.1, 2), (2, 0.6, 1), (2, 4.5, 1), (16, 3.2, 8), (1, 0.0, 1)])
def test_lab_threads_uses_only_free_cores(monkeypatch, cores, load, expected):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert H.lab_threads() == expected


def test_gap_closed_is_scale_free_and_matches_the_paper():
    bert = {m: v[0] for m, v in H.PAPER_ABLATION_QNLI.items()}
    assert H.gap_closed(bert) == pytest.approx((87.5 - 83.9) / (88.4 - 83.9))
    assert H.gap_closed({m: a / 100 for m, a in bert.items()}) == pytest.approx(H.gap_closed(bert))
    assert H.gap_closed({"fedpft": 0.7, "fedot": 0.7, "fedpetuning": 0.7}) is None


# ----------------------------------------------------------------------------- lab 08: two engines

def _rounds(acc, sub, cos):
    return [{"round": i, "accuracy": a, "sub_accuracy": s, "grad_cosine": c} for i, (a, s, c) in enumerate(zip(acc, sub, cos))]


def test_engine_gaps_are_zero_for_equal_runs_and_the_largest_difference_otherwise():
    a = _rounds([0.5, 0.6, 0.7], [0.5, 0.55, 0.6], [0.9, 0.8, 0.85])
    assert H.engine_gaps(a, [dict(r) for r in a]) == {"accuracy": 0.0, "sub_accuracy": 0.0, "grad_cosine": 0.0}
    b = _rounds([0.5, 0.6, 0.75], [0.5, 0.45, 0.6], [0.9, 0.8, 0.85])
    gaps = H.engine_gaps(a, b)
    assert gaps["accuracy"] == pytest.approx(0.05) and gaps["sub_accuracy"] == pytest.approx(0.10)
    assert gaps["grad_cosine"] == 0.0
    b[1]["grad_cosine"] = None                     # measured by one engine only: not "close", infinitely far
    assert H.engine_gaps(a, b)["grad_cosine"] == float("inf")
    with pytest.raises(ConfigError, match="different rounds"):
        H.engine_gaps(a, b[:2])


def test_message_sizes_compare_counted_and_carried_bytes_per_training_round():
    rounds = [{"round": 0, "clients": [], "bytes_down": 0, "bytes_up": 0},
              {"round": 1, "clients": [0, 2], "bytes_down": 2_000_000, "bytes_up": 1_000_000,
               "flower": {"bytes_down": 2_010_000, "bytes_up": 1_020_000}}]
    (row,) = H.message_sizes(rounds)
    assert row["round"] == 1 and row["clients"] == 2
    assert row["down MB (counted)"] == 2.0 and row["down MB (carried)"] == pytest.approx(2.01)
    assert row["overhead %"] == pytest.approx(100 * (3_030_000 / 3_000_000 - 1))


def test_holdings_give_the_fm_to_the_server_only():
    held = H.holdings({"params": {"fm_frozen_bytes": 90e6, "proxy_frozen_bytes": 76e6, "trainable": 1000}})
    server, client = held["server (ServerApp)"], held["client (ClientApp)"]
    assert server["FM weights"] == 90.0 and client["FM weights"] == 0.0
    assert server["proxy weights"] == client["proxy weights"] == 76.0 and client["adapter"] == pytest.approx(0.004)


def test_a_process_marked_as_a_client_cannot_load_the_fm():
    line = H.fm_refused_in_client("tiny-bert")
    assert "never loads the FM" in line and "\n" not in line


def test_labs_04_and_05_both_measure_the_update_disparity_so_their_fedpft_run_is_one():
    """Lab 05 plots the update disparity; lab 04 measures it too, so that lab 05 (and lab 06, which a measured run
    also serves) replays lab 04's FedPFT run instead of training it again (labs/INSTRUCTOR.md#time-per-lab)."""
    for stem in ("04_federated_proxy_finetuning", "05_gradient_discrepancy"):
        nb = json.loads((LABS / f"{stem}.ipynb").read_text())
        code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert "measure_update=True" in code, f"{stem} no longer measures the update disparity: labs 05/06 slow down"
