"""The Flower engine on a real loopback deployment: SuperLink + one SuperNode process per client, offline,
insecure, telemetry off, no dependency installation. It must compute the in-process engine's numbers exactly:
the same sampled clients, seeds and client order, and every client step single-threaded and deterministic."""
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

flwr = pytest.importorskip("flwr")

from fedpft_lab import federation as fl  # noqa: E402
from fedpft_lab.engines.flower import deploy  # noqa: E402
from fedpft_lab.workspace import prepare  # noqa: E402

pytestmark = pytest.mark.flower


def test_a_loopback_deployment_computes_the_in_process_numbers(tiny_data_config, tmp_path, request):
    data = replace(tiny_data_config, clients=3)
    cfg = fl.FedConfig(method="fedpft", data=data, rounds=3, sample_fraction=0.67, distill_steps=0,
                       align_interval=1, align_steps=2, keep_ratio=0.5)
    with deploy.local_deployment(data.clients, tmp_path / "flower-logs") as (procs, app, env):
        request.addfinalizer(procs.stop)                         # even if the context manager never exits
        assert len(procs.pids()) == 1 + data.clients              # a SuperLink, one SuperNode per client
        flower = deploy.submit(cfg, tmp_path, app, env, timeout=600)
    assert len(procs.stopped) > len(procs.pids()) and not procs.still_running(), "a Flower process outlived it"
    local = fl.run(cfg, prepare(data), progress=False)
    assert [r["aligned"] for r in flower["rounds"]] == [False, True, True, False]
    for f, i in zip(flower["rounds"], local["rounds"], strict=True):
        for key in ("clients", "accuracy", "sub_accuracy", "grad_cosine", "layer_cosine", "bytes_up", "bytes_down",
                    "bytes_down_weights"):
            assert f[key] == i[key], (f["round"], key)
        if f["round"]:  # honest bytes: Flower carried what we report, plus each array's name and numpy header
            for way in ("down", "up"):
                extra = f["flower"][f"bytes_{way}"] - f[f"bytes_{way}"]
                assert 0 <= extra <= 0.05 * f[f"bytes_{way}"] + 256 * f["flower"][f"arrays_{way}"], (f["round"], way)
    first = flower["rounds"][1]   # the frozen proxy dominates a first round: within 5% outright
    assert abs(first["flower"]["bytes_down"] - first["bytes_down"]) <= 0.05 * first["bytes_down"]


# ----------------------------------------------------------------------------- the server's side of faults

def _reply(node: int, content):
    """What the strategy reads of a Flower reply (a real Message needs a running SuperLink)."""
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False)


def test_malformed_and_oversized_replies_are_rejected_with_a_reason(tiny_ws, tiny_data_config, caplog):
    from fedpft_lab.core.messages import ClientUpdate
    from fedpft_lab.engines.flower import records
    from fedpft_lab.engines.flower.strategy import FedPFTStrategy

    cfg = fl.FedConfig(method="fedpft", data=tiny_data_config, rounds=2, sample_fraction=1.0, distill_steps=0,
                       keep_ratio=0.5)
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    strategy = FedPFTStrategy(cfg, tiny_ws, setup, min_answers=1)
    strategy.nodes = {k: 100 + k for k in range(tiny_data_config.clients)}
    sent = strategy.round_contents(1)
    assert [node for node, _ in sent] == [100, 101, 102, 103]
    adapter = fl.to_proxy_names(setup.init_state, setup.proxy_layers)
    good = ClientUpdate(0, {k: v + 1 for k, v in adapter.items()}, 10)
    wrong_shape = ClientUpdate(1, {k: v[..., :1] for k, v in adapter.items()}, 10)
    huge = ClientUpdate(2, adapter, 10, {setup.compressed[0]: {"abs_sum": torch.zeros(10**7), "zeros": torch.zeros(1),
                                                                "tokens": torch.zeros(())}})
    impostor = ClientUpdate(0, adapter, 10)          # client 3's node claims to be client 0
    replies = [_reply(103, records.update_content(impostor)), _reply(102, records.update_content(huge)),
               _reply(101, records.update_content(wrong_shape)), _reply(100, records.update_content(good))]
    with caplog.at_level("WARNING", logger="fedpft_lab.flower"):
        strategy.aggregate_train(1, replies)
    reasons = "\n".join(r.getMessage() for r in caplog.records)
    assert "node 101" in reasons and "does not match the proxy" in reasons
    assert "node 102" in reasons and "more than the" in reasons
    assert "node 103" in reasons and "claims client 0" in reasons
    record = strategy._record
    assert record["answered"] == [0] and record["missing"] == [1, 2, 3]
    # FedAvg of the one valid update is that update; the missing clients get the whole proxy next time
    assert all(torch.equal(strategy.state.global_state[k], v + 1) for k, v in setup.init_state.items())
    assert set(strategy.state.synced) == {0}
    strict = FedPFTStrategy(cfg, tiny_ws, setup)     # default: every sampled client must answer
    strict.nodes = strategy.nodes
    strict.round_contents(1)
    with pytest.raises(RuntimeError, match="1 client\\(s\\) answered, fewer than the 4 required"):
        strict.aggregate_train(1, [_reply(100, records.update_content(good))])


def test_a_killed_supernode_leaves_a_round_to_the_clients_that_answered(tiny_data_config, tmp_path, request):
    import json
    import threading
    import time

    import psutil

    data = replace(tiny_data_config, clients=3)
    cfg = fl.FedConfig(method="fedpft-n", data=data, rounds=2, sample_fraction=1.0, distill_steps=0, keep_ratio=0.5)
    result: dict = {}
    with deploy.local_deployment(data.clients, tmp_path / "flower-logs") as (procs, app, env):
        request.addfinalizer(procs.stop)
        run = threading.Thread(target=lambda: result.update(deploy.submit(cfg, tmp_path, app, env, timeout=600,
                                                                          round_timeout=30, min_answers=2)))
        run.start()
        metrics, deadline = tmp_path / "metrics.json", time.monotonic() + 600
        while not (metrics.exists() and json.loads(metrics.read_text())["rounds"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = psutil.Process(procs.pids()[-1])        # the SuperNode serving client 2, and its app processes
        for p in [victim, *victim.children(recursive=True)]:
            p.kill()
        run.join(timeout=600)
    assert len(result["rounds"]) == 3, "the run did not finish without client 2"
    last = result["rounds"][-1]
    assert last["clients"] == [0, 1, 2] and last["answered"] == [0, 1] and last["missing"] == [2]
    assert last["bytes_up"] == 2 * result["rounds"][1]["bytes_up"] // len(result["rounds"][1]["answered"])


def test_a_room_server_and_three_client_commands(tiny_data_config, tmp_path, request):
    """``fedpft-lab server`` prints what participants run; three ``fedpft-lab client`` processes join; it runs."""
    import sys
    import threading

    data = replace(tiny_data_config, clients=3)
    cfg = fl.FedConfig(method="fedpft-n", data=data, rounds=1, sample_fraction=1.0, distill_steps=0, keep_ratio=0.5)
    port, said, result = deploy.free_port(), [], {}
    server = threading.Thread(target=lambda: result.update(
        deploy.serve(cfg, tmp_path / "server", "127.0.0.1", port, timeout=600, say=said.append)))
    clients = deploy.Processes(tmp_path / "client-logs", deploy.flower_env(tmp_path / "home"))
    request.addfinalizer(clients.stop)
    server.start()
    deploy.wait_for_port("127.0.0.1", port)
    for k in range(3):
        clients.start(f"client-{k}", [sys.executable, "-m", "fedpft_lab", "client", "--server", f"127.0.0.1:{port}",
                                      "--partition-id", str(k), "--num-partitions", "3"])
    server.join(timeout=600)
    clients.stop()
    assert any(f"fedpft-lab client --server 127.0.0.1:{port} --partition-id K --num-partitions 3" in s for s in said)
    assert [r["round"] for r in result["rounds"]] == [0, 1] and result["rounds"][1]["answered"] == [0, 1, 2]
    assert not clients.still_running()
