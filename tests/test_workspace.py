"""The shared workspace: what the distilled sub-FM's cache key covers, and where its layer gaps are measured."""
import dataclasses
import json

import pytest
import torch

from fedpft_lab import federation as fl, workspace
from fedpft_lab.distill import DistillConfig
from fedpft_lab.subfm import SubFMConfig


def test_subfm_key_ignores_the_label_count_but_not_the_public_data_or_code(tiny_ws, monkeypatch):
    sub, dist = SubFMConfig(0.5), DistillConfig(steps=3, batch_size=4)
    key = workspace.subfm_key(tiny_ws, sub, dist)
    five = dataclasses.replace(tiny_ws.task, label_names=list("abcde"))
    assert workspace.subfm_key(dataclasses.replace(tiny_ws, task=five), sub, dist) == key   # no 5-minute re-distil
    other_seed = dataclasses.replace(tiny_ws, cfg=dataclasses.replace(tiny_ws.cfg, seed=9))
    assert workspace.subfm_key(other_seed, sub, dist) == key            # same rows, same FFNs
    changed = tiny_ws.public.clone()
    changed[0, 1] += 1                                                    # one token of the corpus differs
    assert workspace.subfm_key(dataclasses.replace(tiny_ws, public=changed), sub, dist) != key
    assert workspace.subfm_key(tiny_ws, dataclasses.replace(sub, keep_ratio=0.25), dist) != key
    assert workspace.subfm_key(tiny_ws, sub, dataclasses.replace(dist, steps=4)) != key
    monkeypatch.setattr(workspace, "RESULTS_VERSION", "another")
    assert workspace.subfm_key(tiny_ws, sub, dist) != key


def test_layer_gaps_are_measured_on_public_rows_distillation_never_saw(tiny_ws, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))
    trained = {tuple(r) for r in tiny_ws.public.tolist()}
    held = {tuple(r) for r in tiny_ws.public_heldout.tolist()}
    assert held and not held & trained
    seen = []
    real = workspace.layer_gaps
    monkeypatch.setattr(workspace, "layer_gaps", lambda t, s, inputs, m: seen.append(inputs) or real(t, s, inputs, m))
    built = workspace.sub_fm(tiny_ws, SubFMConfig(0.5), DistillConfig(steps=2, batch_size=4), progress=False)
    assert len(seen) == 2 and all(torch.equal(x, tiny_ws.public_heldout) for x in seen)
    assert len(built.gaps_after) == len(built.info.compressed)


def test_split_heldout_sizes_and_bad_input():
    rows = torch.arange(100).reshape(50, 2)
    train, held = workspace.split_heldout(rows)
    assert len(held) == 6 and len(train) == 44 and torch.equal(torch.cat([held, train]), rows)
    assert len(workspace.split_heldout(torch.zeros(4000, 2))[1]) == 64
    with pytest.raises(Exception, match="public_blocks must be >= 2"):
        workspace.split_heldout(torch.zeros(1, 2))


def test_run_cache_reuses_a_run_whose_result_cannot_have_changed(tiny_ws, tiny_data_config, monkeypatch, tmp_path):
    """FedPFT-B never aligns: moving the alignment interval must replay its cached run, not redo it."""
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))
    cfg = fl.FedConfig(method="fedpft-b", data=tiny_data_config, rounds=1, sample_fraction=0.5, batch_size=8,
                       distill_steps=2, distill_batch_size=8)
    first = fl.cached_run(cfg, tiny_ws, progress=False)
    monkeypatch.setattr(fl, "run", lambda *a, **k: pytest.fail("a cached run was redone"))
    again = fl.cached_run(dataclasses.replace(cfg, align_interval=5, align_proportion=0.3), tiny_ws, progress=False)
    assert again["rounds"] == json.loads(json.dumps(first["rounds"]))
    with pytest.raises(pytest.fail.Exception):           # ... but a change that matters is never served stale
        fl.cached_run(dataclasses.replace(cfg, lr=cfg.lr / 2), tiny_ws, progress=False)


def test_a_run_that_measured_the_update_disparity_serves_the_same_run_without_it(tiny_ws, tiny_data_config,
                                                                                 monkeypatch, tmp_path):
    """Lab 05 measures the update disparity, lab 06 does not: lab 06 replays lab 05's runs instead of training
    them again, which is right only because the FM replay changes no other number (checked here, bit for bit,
    against a run made without it)."""
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))
    cfg = fl.FedConfig(method="fedpft", data=tiny_data_config, rounds=2, sample_fraction=0.5, batch_size=8,
                       distill_steps=2, distill_batch_size=8, align_interval=1, align_steps=2, align_batch_size=4)
    plain = json.loads(json.dumps(fl.run(cfg, tiny_ws, progress=False)))
    measured = fl.cached_run(dataclasses.replace(cfg, measure_update=True), tiny_ws, progress=False)
    assert all("update_cosine" in r for r in measured["rounds"][1:])
    other = dataclasses.replace(cfg, lr=cfg.lr / 2)
    fl.cached_run(other, tiny_ws, progress=False)
    monkeypatch.setattr(fl, "run", lambda *a, **k: pytest.fail("a run was redone though a fuller one was cached"))
    served = fl.cached_run(cfg, tiny_ws, progress=False)
    assert served["config"] == plain["config"] and fl.FedConfig.from_json(served["config"]) == cfg
    timing = {"seconds", "train_seconds", "client_seconds", "eval_seconds", "align_seconds", "startup"}
    for s, p in zip(served["rounds"], plain["rounds"], strict=True):
        assert not set(fl.UPDATE_FIELDS) & s.keys()
        assert {k: v for k, v in s.items() if k not in timing} == {k: v for k, v in p.items() if k not in timing}
    assert served["final_accuracy"] == plain["final_accuracy"]
    with pytest.raises(pytest.fail.Exception):     # the other way round a run cannot be served: it lacks the numbers
        fl.cached_run(dataclasses.replace(other, measure_update=True), tiny_ws, progress=False)
