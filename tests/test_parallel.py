"""Clients and evaluation side by side: the same numbers for any number of workers; errors surface; threads restored."""
import dataclasses
import threading

import pytest
import torch

from fedpft_lab import federation as fl, parallel
from fedpft_lab.errors import ConfigError


def _cfg(data_cfg, **kw):
    base = dict(data=data_cfg, rounds=2, sample_fraction=0.75, batch_size=8, distill_steps=4, distill_batch_size=8,
                align_interval=1, align_steps=3, align_batch_size=4, lr=5e-3)
    base.update(kw)
    return fl.FedConfig(**base)


def _strip(records):
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


# ----------------------------------------------------------------------------- run_jobs

def test_run_jobs_keeps_order_and_uses_one_thread_per_job():
    seen_threads = []
    lock = threading.Lock()

    def job(i):
        def call():
            with lock:
                seen_threads.append(torch.get_num_threads())
            return i * i
        return call

    before = torch.get_num_threads()
    assert parallel.run_jobs([job(i) for i in range(7)], workers=3) == [i * i for i in range(7)]
    assert set(seen_threads) == {1}
    assert torch.get_num_threads() == before


def test_run_jobs_raises_a_job_error_and_restores_threads():
    before = torch.get_num_threads()

    def bad():
        raise ValueError("client 3 failed")

    with pytest.raises(ValueError, match="client 3 failed"):
        parallel.run_jobs([lambda: 1, bad, lambda: 2], workers=2)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- federation

def test_a_run_does_not_depend_on_how_many_clients_train_at_once(tiny_ws, tiny_data_config):
    """3 sampled clients per round, with an alignment (client statistics merged) in round 1."""
    cfg = _cfg(tiny_data_config, method="fedpft")
    assert cfg.clients_per_round() == 3
    one = fl.run(cfg, tiny_ws, progress=False, workers=1)
    three = fl.run(cfg, tiny_ws, progress=False, workers=3)
    assert one["rounds"][1]["aligned"]
    assert _strip(one["rounds"]) == _strip(three["rounds"])


def test_parallel_clients_send_the_same_updates_as_sequential_ones(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft-n")
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    clients = [0, 1, 2, 3]
    seq = fl.train_clients(cfg, setup, tiny_ws, clients, 1, setup.init_state, True, workers=1)
    par = fl.train_clients(cfg, setup, tiny_ws, clients, 1, setup.init_state, True, workers=2)
    assert len(setup.devices) == 2
    assert [u.client for u in par] == clients
    for a, b in zip(seq, par):
        assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
        assert a.stats.keys() == b.stats.keys()
        for layer in a.stats:
            assert all(torch.equal(a.stats[layer][k], b.stats[layer][k]) for k in a.stats[layer])


def test_with_dropout_clients_take_turns_and_stay_reproducible(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft-n", dropout=True)
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    a = fl.train_clients(cfg, setup, tiny_ws, [0, 1, 2], 1, setup.init_state, False, workers=3)
    b = fl.train_clients(cfg, setup, tiny_ws, [0, 1, 2], 1, setup.init_state, False, workers=3)
    assert len(setup.devices) == 1  # one shared random generator, so no second device was made
    assert all(torch.equal(x.adapter[k], y.adapter[k]) for x, y in zip(a, b) for k in x.adapter)
    no_dropout = fl.train_clients(dataclasses.replace(cfg, dropout=False), setup, tiny_ws, [0], 1,
                                  setup.init_state, False)
    assert any(not torch.equal(a[0].adapter[k], no_dropout[0].adapter[k]) for k in a[0].adapter)


def test_without_dropout_training_ignores_the_global_random_state(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft-n")
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    torch.manual_seed(1)
    a = fl.client_update(cfg, setup, tiny_ws, 0, 1, setup.init_state, False).adapter
    torch.manual_seed(2)
    b = fl.client_update(cfg, setup, tiny_ws, 0, 1, setup.init_state, False).adapter
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_side_by_side_evaluation_matches_a_plain_pass(tiny_ws, tiny_data_config):
    """Chunked, multi-worker evaluation equals a one-thread pass over all batches (more batches than workers),
    bit for bit, for several adapters: float64 reductions included, whatever the caller's thread setting."""
    from fedpft_lab.workspace import _length_sorted_batches

    ws = dataclasses.replace(tiny_ws, test_batches=_length_sorted_batches(tiny_ws.test, 6, tiny_ws.pad_id))
    cfg = _cfg(tiny_data_config, method="fedpft-n")
    setup = fl.build_setup(cfg, ws, progress=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in setup.init_state.items()}
        got = fl.evaluate(setup, ws, state, workers=3)
        with parallel.single_threaded_ops():
            assert got["accuracy"] == fl.accuracy(setup.fm, ws.test_batches)
            assert got["sub_accuracy"] == fl.accuracy(setup.server_proxy, ws.test_batches)
            assert got == fl.evaluate(setup, ws, state, workers=1)
            assert {k: got[k] for k in ("grad_cosine", "logit_kl")} == {
                k: v for k, v in fl._discrepancy(setup, ws).items() if k in ("grad_cosine", "logit_kl")}
    assert got["sub_accuracy"] != got["accuracy"] or got["grad_cosine"] < 1.0


def test_bad_workers_is_a_clear_error(tiny_ws, tiny_data_config):
    with pytest.raises(ConfigError, match=r"workers must be in \[1, inf\]"):
        fl.run(_cfg(tiny_data_config), tiny_ws, progress=False, workers=0)
