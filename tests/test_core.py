"""The core cut at the message boundary: messages survive their wire form exactly, a client rebuilt from what the
server ships (never from the FM) computes exactly the in-process update, and a returning client's W_fro package
brings its proxy to the server's weights."""
import dataclasses

import pytest
import torch

from fedpft_lab import align, models, workspace
from fedpft_lab import federation as fl
from fedpft_lab.core import client, messages, proxy, server
from fedpft_lab.errors import ConfigError


def _cfg(data_cfg, **kw):
    base = dict(data=data_cfg, rounds=2, sample_fraction=0.5, distill_steps=0, align_interval=1, align_steps=2,
                keep_ratio=0.5)
    return fl.FedConfig(**{**base, **kw})


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_messages_survive_their_flat_form_bit_for_bit():
    b = messages.Broadcast(3, 2, {"x.lora_A": torch.randn(4, 2)}, 1e-3, 12345, True,
                           {"layer1.idx": torch.tensor([0, 2], dtype=torch.int32), "layer1.b2": torch.randn(5)})
    assert messages.broadcast_from_records(*messages.broadcast_to_records(b)) == b.__class__(**vars(b))
    u = messages.ClientUpdate(2, {"x.lora_A": torch.randn(4, 2)}, 40,
                              {1: {"abs_sum": torch.rand(5, dtype=torch.float64), "tokens": torch.tensor(9.0).double()}},
                              0.5)
    back = messages.update_from_records(*messages.update_to_records(u))
    assert (back.client, back.num_examples, back.seconds) == (2, 40, 0.5) and _equal(back.adapter, u.adapter)
    assert _equal(back.stats[1], u.stats[1])


def test_a_client_process_cannot_load_the_fm(monkeypatch, tiny_data_config):
    monkeypatch.setenv(models.CLIENT_PROCESS, "1")
    with pytest.raises(ConfigError, match="never loads the FM"):
        models.load_fm("tiny-bert")
    with pytest.raises(ConfigError, match="never loads the FM"):
        workspace.prepare(tiny_data_config)


@pytest.mark.parametrize("method", ["fedpft", "fedot", "fedpetuning"])
def test_a_proxy_rebuilt_from_shipped_weights_trains_exactly_as_the_servers_copy(method, tiny_ws, tiny_data_config,
                                                                                 monkeypatch):
    cfg = _cfg(tiny_data_config, method=method)
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    spec = proxy.proxy_spec(cfg.data.fm, setup.server_proxy, setup.proxy_layers, cfg.lora_config(), cfg.seed)
    frozen = setup.frozen_state()
    assert sum(v.numel() * v.element_size() for v in frozen.values()) == setup.frozen_bytes()
    monkeypatch.setenv(models.CLIENT_PROCESS, "1")          # what the client side may do: no FM anywhere
    rebuilt = proxy.build_proxy(proxy.ProxySpec.from_json(spec.to_json()), frozen)
    shard, pad_id = workspace.client_data(cfg.data, 1)
    assert torch.equal(torch.tensor(shard.labels), torch.tensor(tiny_ws.train.subset(tiny_ws.parts[1]).labels))
    record, broadcasts = server.open_round(cfg, setup, fl.RunState(1, setup.init_state, {}, {}, {}, []), 1, [1])
    remote = client.client_step(rebuilt, shard, broadcasts[0], server.train_settings(cfg, setup), pad_id)
    monkeypatch.delenv(models.CLIENT_PROCESS)
    local = fl.client_update(cfg, setup, tiny_ws, 1, 1, setup.init_state, broadcasts[0].record_stats)
    assert _equal(server.receive(remote, setup).adapter, local.adapter)
    assert remote.stats.keys() == local.stats.keys() and all(_equal(remote.stats[k], local.stats[k]) for k in local.stats)
    assert record["bytes_down_weights"] == setup.frozen_bytes()   # a first-time client pays for the whole proxy


def test_a_returning_client_package_brings_its_proxy_to_the_servers_weights(tiny_ws, tiny_data_config):
    cfg = _cfg(tiny_data_config, method="fedpft")
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    spec = proxy.proxy_spec(cfg.data.fm, setup.server_proxy, setup.proxy_layers, cfg.lora_config(), cfg.seed)
    stale = proxy.build_proxy(spec, setup.frozen_state())      # the client's copy from its first round
    state = fl.RunState(2, setup.init_state, {}, {}, {}, [], synced={0: 0})
    layer = setup.compressed[0]
    for idx in ([0, 1], [1, 3]):                                # two alignments the client missed
        updated = {layer: torch.tensor(idx)}
        with torch.no_grad():
            for p in align.neuron_masks(models.unwrap(setup.server_proxy), updated):
                p.add_(torch.randn_like(p))                     # the masked tensors, changed everywhere...
        state.alignments.append({layer: idx})
    record, [b] = server.open_round(cfg, setup, state, 2, [0], ship_weights=True)
    assert b.package and record["bytes_down_weights"] == fl.adapters.nbytes(b.package)
    align.apply_weight_package(models.unwrap(stale), b.package)
    got, want = proxy.frozen_state(stale), setup.frozen_state()
    ffn = {n for n in want if ".intermediate.dense." in n or ".output.dense." in n}
    for name in want.keys() - ffn:
        assert torch.equal(got[name], want[name]), name
    # ...but the package carries only the missed neurons' slices: W1 rows 0, 1, 3 now match the server
    w1 = next(n for n in want if f"layer.{layer}.intermediate.dense.weight" in n)
    assert torch.equal(got[w1][[0, 1, 3]], want[w1][[0, 1, 3]]) and not torch.equal(got[w1][2], want[w1][2])


def test_client_update_fields_are_still_the_reviewed_ones():
    assert {f.name for f in dataclasses.fields(messages.ClientUpdate)} == {"client", "adapter", "num_examples",
                                                                           "stats", "seconds"}
