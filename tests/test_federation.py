"""The federated loop: FedAvg math, method invariants, privacy of client messages, resume, errors."""
import dataclasses
import json
import threading

import pytest
import torch

from fedpft_lab import adapters, federation as fl, parallel
from fedpft_lab.errors import ConfigError


def _cfg(data_cfg, **kw):
    base = dict(data=data_cfg, rounds=3, sample_fraction=0.5, batch_size=8, distill_steps=4, distill_batch_size=8,
                align_interval=1, align_steps=3, align_batch_size=4, lr=5e-3)
    base.update(kw)
    return fl.FedConfig(**base)


# ----------------------------------------------------------------------------- aggregation

def test_fedavg_of_identical_adapters_is_that_adapter():
    s = {"a": torch.randn(3, 4), "b": torch.randn(2)}
    out = adapters.fedavg([s, s, s], [1, 5, 2])
    assert all(torch.allclose(out[k], s[k], atol=1e-7) for k in s)


def test_fedavg_weights_by_data_size():
    s1, s2 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, -1.0])}
    out = adapters.fedavg([s1, s2], [100, 300])
    assert out["w"].tolist() == pytest.approx([(1 * 100 + 4 * 300) / 400, (2 * 100 - 1 * 300) / 400])


def test_lr_schedule_has_no_off_by_one(tiny_data_config):
    cfg = _cfg(tiny_data_config, rounds=4, lr=1.0)
    assert [cfg.lr_at(r) for r in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]


def test_client_sampling_is_shared_by_methods(tiny_data_config):
    a = fl.sample_clients(_cfg(tiny_data_config, method="fedpft"))
    b = fl.sample_clients(_cfg(tiny_data_config, method="fedot"))
    assert a == b and all(len(r) == 2 and len(set(r)) == 2 for r in a)


# ----------------------------------------------------------------------------- invariants of methods

def test_fedpft_n_with_keep_one_reproduces_fedpetuning(tiny_ws, tiny_data_config):
    a = fl.run(_cfg(tiny_data_config, method="fedpetuning", rounds=2), tiny_ws, progress=False)
    b = fl.run(_cfg(tiny_data_config, method="fedpft-n", rounds=2, keep_ratio=1.0), tiny_ws, progress=False)
    for ra, rb in zip(a["rounds"], b["rounds"]):
        assert ra["accuracy"] == rb["accuracy"] and ra["sub_accuracy"] == rb["sub_accuracy"]
        assert rb["grad_cosine"] == pytest.approx(1.0, abs=1e-6) and rb["grad_rel_l2"] == pytest.approx(0, abs=1e-5)
        # FedPETuning skips measuring its proxy (an exact FM copy); the measured keep-1.0 values back that up
        for key in ("layer_cosine", "layer_rel_l2", "hidden_rel_mse"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5)
        assert ra["logit_kl"] == pytest.approx(rb["logit_kl"], abs=1e-6)
    assert a["params"]["fm_transformer"] == b["params"]["sub_transformer"]


def test_every_method_runs_and_reports(tiny_ws, tiny_data_config):
    for method in fl.METHODS:
        m = fl.run(_cfg(tiny_data_config, method=method, rounds=2), tiny_ws, progress=False)
        assert [r["round"] for r in m["rounds"]] == [0, 1, 2]
        for r in m["rounds"]:
            for key in ("accuracy", "sub_accuracy", "grad_cosine", "grad_rel_l2", "bytes_up", "bytes_down",
                        "aligned", "seconds"):
                assert key in r, (method, key)
        aligned = [r["round"] for r in m["rounds"] if r["aligned"]]
        assert aligned == ([1] if method in ("fedpft", "fedpft-d") else []), method  # never in the last round
        if method in ("fedpft", "fedpft-d"):
            r1 = m["rounds"][1]
            assert "before_align" in r1 and r1["align_loss"]
        # round 1: every sampled client downloads its whole proxy first (counted, not free)
        frozen = fl.build_setup(_cfg(tiny_data_config, method=method), tiny_ws, progress=False).frozen_bytes()
        assert m["rounds"][1]["bytes_down_weights"] == len(m["rounds"][1]["clients"]) * frozen, method
        assert m["rounds"][1]["bytes_down"] > m["rounds"][1]["bytes_down_weights"]
        ratio = m["params"]["sub_transformer"] / m["params"]["fm_transformer"]
        assert ratio == 1.0 if method == "fedpetuning" else ratio < 0.9


def test_fedot_all_trains_every_kept_layer_and_plugs_each_into_its_fm_layer(tiny_ws, tiny_data_config):
    setup = fl.build_setup(_cfg(tiny_data_config, method="fedot-all"), tiny_ws, progress=False)
    layers = {adapters.layer_of(k) for k in setup.init_state} - {None}
    assert layers == set(setup.proxy_layers) and len(layers) > 2
    proxy_state = adapters.adapter_state(setup.server_proxy)   # proxy naming: layers 0..len-1
    assert {adapters.layer_of(k) for k in proxy_state} - {None} == set(range(len(setup.proxy_layers)))
    back = fl.to_fm_names(proxy_state, setup.proxy_layers)
    assert set(back) == set(setup.init_state)


def test_per_layer_metrics_are_indexed_by_fm_layer(tiny_ws, tiny_data_config):
    """FedOT's adapter layers are FM layers 0 and 3: their values must sit in columns 0 and 3, not 0 and 1."""
    m = fl.run(_cfg(tiny_data_config, method="fedot", rounds=1), tiny_ws, progress=False)
    for r in m["rounds"]:
        assert len(r["layer_cosine"]) == 4 and len(r["layer_rel_l2"]) == 4
        assert [v is not None for v in r["layer_cosine"]] == [True, False, False, True]


def test_plug_in_is_strict(tiny_ws, tiny_data_config):
    setup = fl.build_setup(_cfg(tiny_data_config, method="fedpft-n"), tiny_ws, progress=False)
    state = dict(setup.init_state)
    renamed = {k.replace("lora_A", "lora_a"): v for k, v in state.items()}
    with pytest.raises(KeyError, match="keys not in the model"):
        setup.load_global(renamed)
    partial = {k: v for k, v in state.items() if "layer.1." not in k}
    with pytest.raises(KeyError, match="missing from the state"):
        setup.load_global(partial)       # a silently skipped layer would keep a stale adapter
    setup.load_global(state)


def test_result_config_keys_only_what_changes_a_method(tiny_data_config):
    base = _cfg(tiny_data_config)
    for method in fl.METHODS:
        cfg = dataclasses.replace(base, method=method)
        moved = dataclasses.replace(cfg, align_interval=7, align_steps=99)
        assert (fl.result_config(cfg) == fl.result_config(moved)) == (method not in ("fedpft", "fedpft-d")), method
        distil = dataclasses.replace(cfg, distill_steps=17)
        assert (fl.result_config(cfg) == fl.result_config(distil)) == (method not in ("fedpft", "fedpft-b")), method
        for changed in (dataclasses.replace(cfg, seed=5), dataclasses.replace(cfg, lr=0.1),
                        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, alpha=0.3))):
            assert fl.result_config(cfg) != fl.result_config(changed), method
    pet = dataclasses.replace(base, method="fedpetuning")
    assert fl.result_config(pet) == fl.result_config(dataclasses.replace(pet, keep_ratio=0.5))


def test_grouped_batches_key_runs_only_when_on_and_change_the_update(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft-n")
    stored = cfg.to_json()
    del stored["group_by_length"]                     # a configuration saved before the field existed
    assert fl.FedConfig.from_json(stored) == cfg and not cfg.group_by_length   # replays with random batches
    assert "group_by_length" not in fl.result_config(cfg)   # so its cached runs keep their keys
    on = dataclasses.replace(cfg, group_by_length=True)
    assert fl.result_config(on) != fl.result_config(cfg) and fl.result_config(on)["group_by_length"] is True
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    updates = [fl.client_update(c, setup, tiny_ws, 1, 1, setup.init_state, False).adapter for c in (cfg, on, on)]
    assert all(torch.equal(updates[1][k], updates[2][k]) for k in updates[1])          # deterministic
    assert not all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0])      # other batches


def test_update_disparity_replays_the_first_client_on_the_fm(tiny_ws, tiny_data_config):
    from fedpft_lab import discrepancy

    cfg = _cfg(tiny_data_config, method="fedpft-n", rounds=2, measure_update=True)
    m = fl.run(cfg, tiny_ws, progress=False)
    for r in m["rounds"][1:]:
        assert r["update_client"] == r["clients"][0]
        assert -1.0 <= r["update_cosine"] <= 1.0 and r["update_rel_l2"] >= 0
    # independent recomputation of round 1 from the same start
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    k = m["rounds"][1]["clients"][0]
    with parallel.single_threaded_ops():       # as the run's jobs do, so the arithmetic is the same
        px = fl.client_update(cfg, setup, tiny_ws, k, 1, setup.init_state, False).adapter
        fm = fl.fm_update(cfg, setup, tiny_ws, k, 1, setup.init_state)
    keys = sorted(setup.init_state)
    d_px = torch.cat([(px[q] - setup.init_state[q]).double().flatten() for q in keys])
    d_fm = torch.cat([(fm[q] - setup.init_state[q]).double().flatten() for q in keys])
    cos = float(d_px @ d_fm / (d_px.norm() * d_fm.norm()))
    assert m["rounds"][1]["update_cosine"] == pytest.approx(cos, abs=1e-9)
    assert discrepancy.update_disparity(setup.init_state, setup.init_state | {}, fm)[1] == pytest.approx(1.0)
    # keep ratio 1: the proxy is the FM, so both replays are the same computation
    same = fl.run(dataclasses.replace(cfg, keep_ratio=1.0, rounds=1), tiny_ws, progress=False)
    assert same["rounds"][1]["update_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_fedot_trains_only_adapter_layers(tiny_ws, tiny_data_config):
    setup = fl.build_setup(_cfg(tiny_data_config, method="fedot"), tiny_ws, progress=False)
    assert setup.proxy_layers[0] == 0 and setup.proxy_layers[-1] == 3 and len(setup.proxy_layers) < 4
    layers = {adapters.layer_of(k) for k in setup.init_state} - {None}
    assert layers == {0, 3}


# ----------------------------------------------------------------------------- what leaves a client

def test_client_message_holds_only_adapter_and_per_neuron_sums(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft")
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    upd = fl.client_update(cfg, setup, tiny_ws, client=1, rnd=1, global_state=setup.init_state, record_stats=True)
    assert set(upd.adapter) == set(setup.init_state)
    assert all(upd.adapter[k].shape == v.shape for k, v in setup.init_state.items())
    assert upd.num_examples == len(tiny_ws.parts[1])
    assert set(upd.stats) == set(setup.compressed) and setup.compressed
    for layer, s in upd.stats.items():
        assert set(s) == {"abs_sum", "zeros", "tokens"}
        assert s["tokens"].dim() == 0 and s["abs_sum"].dim() == 1 and s["abs_sum"].shape == s["zeros"].shape
    allowed = {f.name for f in dataclasses.fields(fl.ClientUpdate)}
    assert allowed == {"client", "adapter", "num_examples", "stats", "seconds"}, "new fields need a privacy review"


def test_client_update_does_not_depend_on_previous_clients(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft-n")
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    alone = fl.client_update(cfg, setup, tiny_ws, 2, 1, setup.init_state, False).adapter
    fl.client_update(cfg, setup, tiny_ws, 0, 1, setup.init_state, False)  # another client trains first
    after = fl.client_update(cfg, setup, tiny_ws, 2, 1, setup.init_state, False).adapter
    assert all(torch.equal(alone[k], after[k]) for k in alone)


# ----------------------------------------------------------------------------- W_fro accounting

def test_weights_download_counts_first_proxy_and_every_missed_alignment(tiny_ws, tiny_data_config):
    from fedpft_lab import align, models

    setup = fl.build_setup(_cfg(tiny_data_config, method="fedpft"), tiny_ws, progress=False)
    proxy = models.unwrap(setup.server_proxy)
    layer = setup.compressed[0]
    a1, a2 = {layer: [0, 1, 2]}, {layer: [2, 3]}
    state = fl.RunState(1, setup.init_state, {}, {}, {}, [], alignments=[a1, a2], synced={0: 0, 1: 1, 2: 2})
    size = lambda upd: fl.adapters.nbytes(align.weight_package(  # noqa: E731
        proxy, {l: torch.tensor(ix) for l, ix in upd.items()}))
    frozen = sum(p.numel() * p.element_size() for p in setup.server_proxy.parameters() if not p.requires_grad)
    assert fl.weights_download(setup, state, 3) == frozen == setup.frozen_bytes()    # never took part
    assert fl.weights_download(setup, state, 2) == 0                                  # up to date
    assert fl.weights_download(setup, state, 1) == size(a2)                          # missed one
    both = fl.weights_download(setup, state, 0)                                      # missed two: gets both
    assert both == size({layer: [0, 1, 2, 3]}) and size(a1) < both < size(a1) + size(a2)  # neuron 2 sent once


def test_a_client_pays_for_alignments_it_missed(tiny_ws, tiny_data_config):
    """Recount a run's downloads from its own records: new clients get the proxy, returning clients after an
    alignment get a package, returning clients with nothing new get only the adapter."""
    cfg = _cfg(tiny_data_config, method="fedpft", rounds=4, align_interval=1)
    m = fl.run(cfg, tiny_ws, progress=False)
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    adapter = fl.adapters.nbytes(setup.init_state)
    seen: dict[int, int] = {}
    aligned = stale_events = 0
    for r in m["rounds"][1:]:
        new = [k for k in r["clients"] if k not in seen]
        stale = [k for k in r["clients"] if k in seen and seen[k] < aligned]
        assert r["bytes_down"] == len(r["clients"]) * adapter + r["bytes_down_weights"]
        assert r["bytes_down_weights"] >= len(new) * setup.frozen_bytes()
        assert (r["bytes_down_weights"] > len(new) * setup.frozen_bytes()) == bool(stale)
        seen.update({k: aligned for k in r["clients"]})
        aligned += r["aligned"]
        stale_events += bool(stale)
    assert stale_events, "the schedule should bring a client back after an alignment"
    assert m["cost"]["bytes_down_weights"] == sum(r["bytes_down_weights"] for r in m["rounds"])


# ----------------------------------------------------------------------------- persistence

def test_resume_ends_where_an_uninterrupted_run_does(tiny_ws, tiny_data_config, tmp_path):
    cfg = _cfg(tiny_data_config, method="fedpft", rounds=3)
    full = fl.run(cfg, tiny_ws, out_dir=tmp_path / "full", progress=False)
    stop = threading.Event()
    it = fl.iterate(cfg, tiny_ws, out_dir=tmp_path / "cut", progress=False, stop=stop)
    for metrics in it:
        if metrics["rounds"][-1]["round"] == 1:  # interrupt after an alignment round
            stop.set()
    kept = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [r["round"] for r in kept["rounds"]] == [0, 1]
    resumed = fl.run(cfg, tiny_ws, out_dir=tmp_path / "cut", resume=True, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(resumed["rounds"]) == strip(full["rounds"])
    with pytest.raises(ConfigError, match="different configuration"):
        fl.run(dataclasses.replace(cfg, lr=1e-2), tiny_ws, out_dir=tmp_path / "cut", resume=True, progress=False)


@pytest.mark.parametrize("stage", ["train", "evaluate", "align"])
def test_stop_inside_a_round_drops_it_and_resume_redoes_it(tiny_ws, tiny_data_config, tmp_path, stage):
    """Stop between client steps (or evaluation jobs, or alignment steps) of round 2: nothing of round 2 is
    yielded or saved, no step runs after the one that saw Stop, and a resume ends exactly as an uninterrupted run."""
    cfg = _cfg(tiny_data_config, method="fedpft", rounds=3)
    full = fl.run(cfg, tiny_ws, out_dir=tmp_path / "full", progress=False, workers=1)
    stop, after_stop = threading.Event(), []

    def on_progress(info):
        if stop.is_set():
            after_stop.append(info)
        elif info["round"] == 2 and info["stage"] == stage and info["done"] == 1:
            stop.set()

    yielded = [m["rounds"][-1]["round"] for m in fl.iterate(cfg, tiny_ws, out_dir=tmp_path / "cut", progress=False,
                                                            stop=stop, workers=1, on_progress=on_progress)]
    assert stop.is_set() and yielded == [0, 1] and after_stop == []
    kept = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert [r["round"] for r in kept["rounds"]] == [0, 1]
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["next_round"] == 2
    resumed = fl.run(cfg, tiny_ws, out_dir=tmp_path / "cut", resume=True, progress=False, workers=1)
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(resumed["rounds"]) == strip(full["rounds"])


def test_local_train_checks_stop_before_every_batch(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, batch_size=4)
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    shard = tiny_ws.train.subset(tiny_ws.parts[0])
    stop, steps = threading.Event(), []

    def on_batch():
        steps.append(1)
        if len(steps) == 3:
            stop.set()

    with pytest.raises(fl.RoundStopped):
        fl.local_train(setup.devices[0], shard, 2, 4, 1e-3, 1.0, 0, tiny_ws.pad_id, stop=stop, on_batch=on_batch)
    assert len(steps) == 3 < 2 * len(shard) // 4


def test_progress_counts_every_client_batch_and_job_in_order(tiny_ws, tiny_data_config, tmp_path, monkeypatch):
    """Clients train side by side on worker threads; each stage's reports still count 1, 2, ..., total."""
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path))         # the sub-FM is distilled, not loaded
    cfg = _cfg(tiny_data_config, method="fedpft", rounds=2, batch_size=4)
    reports = []
    fl.run(cfg, tiny_ws, progress=False, workers=2, on_progress=lambda info: reports.append(dict(info)))
    stages = {}
    for info in reports:
        stages.setdefault((info["round"], info["stage"]), []).append((info["done"], info["total"]))
    for (rnd, stage), counts in stages.items():
        total = counts[0][1]
        assert counts == [(k, total) for k in range(1, total + 1)], (rnd, stage)
    clients = fl.sample_clients(cfg)
    for rnd in (1, 2):
        batches = sum(-(-len(tiny_ws.parts[k]) // cfg.batch_size) for k in clients[rnd - 1])
        assert stages[(rnd, "train")][-1] == (batches, batches)
    assert [k for k in stages if k[0] == 0] == [(0, "distill"), (0, "setup"), (0, "evaluate")]  # before FL
    assert stages[(0, "distill")][-1] == (cfg.distill_steps, cfg.distill_steps)
    assert stages[(1, "align")][-1] == (cfg.align_steps, cfg.align_steps)         # aligns after round 1 (t=1)
    assert (1, "evaluate aligned") in stages and (2, "align") not in stages       # never after the last round


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, match", [
    (dict(method="fedprox"), "method must be one of"),
    (dict(sample_fraction=0.0), r"sample_fraction must be in \(0, 1\]"),
    (dict(keep_ratio=2.0), r"keep_ratio must be in \(0, 1\]"),
    (dict(align_proportion=1.5), r"align_proportion must be in \(0, 1\]"),
    (dict(rounds=0), r"rounds must be in \[1, inf\]"),
    (dict(align_rule="zeros"), "align_rule must be one of"),
])
def test_bad_config(tiny_data_config, kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tiny_data_config, **kw)


def test_evaluation_batch_size_does_not_change_predictions(minilm, tokenizer):
    """The default eval batch went 128 -> 32 for speed; on the real FM every prediction must stay the same."""
    from fedpft_lab import data
    from fedpft_lab.workspace import _length_sorted_batches

    task = data.load_task("tweets", seed=0, max_train=8, max_test=160, balanced=True)
    _, test = data.encode_task(task, tokenizer)

    def predictions(batch_size: int) -> dict[tuple, int]:
        out = {}
        with torch.no_grad():
            for b in _length_sorted_batches(test, batch_size, tokenizer.pad_token_id):
                pred = minilm(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                for ids, mask, p in zip(b["input_ids"], b["attention_mask"], pred):
                    out[tuple(ids[mask.bool()].tolist())] = int(p)
        return out

    big, small = predictions(128), predictions(32)
    assert len(big) > 100 and big == small
