"""The Flower engine on a real loopback deployment: SuperLink + one SuperNode process per client, offline,
insecure, telemetry off, no dependency installation. It must compute the in-process engine's numbers exactly:
the same sampled clients, seeds and client order, and every client step single-threaded and deterministic."""
import os
from dataclasses import replace
from types import SimpleNamespace

import psutil
import pytest
import torch

flwr = pytest.importorskip("flwr")

from fedpft_lab import federation as fl  # noqa: E402
from fedpft_lab.engines.flower import deploy  # noqa: E402
from fedpft_lab.workspace import prepare  # noqa: E402

pytestmark = pytest.mark.flower


def _aligned_config(data):
    """A small FedPFT run with two alignments and clients that miss rounds (3 clients, 2 per round)."""
    return fl.FedConfig(method="fedpft", data=replace(data, clients=3), rounds=3, sample_fraction=0.67,
                        distill_steps=0, align_interval=1, align_steps=2, keep_ratio=0.5)


NUMBERS = ("clients", "accuracy", "sub_accuracy", "grad_cosine", "layer_cosine")
BYTES = ("bytes_up", "bytes_down", "bytes_down_weights")


def assert_same_rounds(engine: dict, local: dict, keys=NUMBERS + BYTES) -> None:
    for f, i in zip(engine["rounds"], local["rounds"], strict=True):
        for key in keys:
            assert f[key] == i[key], (f["round"], key)


def test_a_loopback_deployment_computes_the_in_process_numbers(tiny_data_config, tmp_path, request):
    cfg = _aligned_config(tiny_data_config)
    data = cfg.data
    with deploy.local_deployment(data.clients, tmp_path / "flower-logs") as (procs, app, env):
        request.addfinalizer(procs.stop)                         # even if the context manager never exits
        assert len(procs.pids()) == 1 + data.clients              # a SuperLink, one SuperNode per client
        stores = {psutil.Process(pid).environ().get(deploy.CLIENT_STORE) for pid in procs.pids()[1:]}
        assert None not in stores and len(stores) == data.clients  # each client keeps its proxy in its own folder
        flower = deploy.submit(cfg, tmp_path, app, env, timeout=600)
    assert len(procs.stopped) > len(procs.pids()) and not procs.still_running(), "a Flower process outlived it"
    local = fl.run(cfg, prepare(data), progress=False)
    assert [r["aligned"] for r in flower["rounds"]] == [False, True, True, False]
    assert_same_rounds(flower, local)
    for f in flower["rounds"]:
        if f["round"]:  # honest bytes: Flower carried what we report, plus each array's name and numpy header
            for way in ("down", "up"):
                extra = f["flower"][f"bytes_{way}"] - f[f"bytes_{way}"]
                assert 0 <= extra <= 0.05 * f[f"bytes_{way}"] + 256 * f["flower"][f"arrays_{way}"], (f["round"], way)
    first = flower["rounds"][1]   # the frozen proxy dominates a first round: within 5% outright
    assert abs(first["flower"]["bytes_down"] - first["bytes_down"]) <= 0.05 * first["bytes_down"]


def test_the_simulation_engine_computes_the_in_process_numbers_and_leaves_no_ray_process(tiny_data_config,
                                                                                         tmp_path, request):
    """``--engine flower-sim``: the same ServerApp, ClientApp and strategy, clients in Ray actors. Every client
    step runs in a Ray worker where the FM cannot load: a probe around the real ClientApp tries to load it after
    each step and fails the step (and so the run, which needs every answer) if it could."""
    pytest.importorskip("ray")
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedpft_lab import models
    from fedpft_lab.engines.flower import client_app, simulation

    cfg = _aligned_config(tiny_data_config)
    probe = ClientApp()
    probe.query()(client_app.query)

    @probe.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client_app.train(msg, context)
        assert os.getpid() != driver, "a client step ran in the test's own process, not in a Ray worker"
        try:
            models.load_fm(cfg.data.fm)
        except models.ConfigError:
            return reply
        raise AssertionError("a Ray worker running a client step loaded the FM")

    driver, sessions = os.getpid(), []
    request.addfinalizer(lambda: [s.stop() for s in sessions])   # by pid, even if the run failed half-way
    sim = simulation.run_flower_sim(cfg, tmp_path, client_app=probe, session=sessions)
    (ray_session,) = sessions
    assert len(ray_session.stopped) > 2 and not ray_session.still_running(), "a Ray process outlived the run"
    assert models.CLIENT_PROCESS not in os.environ            # the guard lives in the workers, not the server
    local = fl.run(cfg, prepare(cfg.data), progress=False)
    assert sim["engine"] == "flower-sim" and [r["aligned"] for r in sim["rounds"]] == [False, True, True, False]
    assert_same_rounds(sim, local)
    assert all(r["answered"] == r["clients"] for r in sim["rounds"][1:])


def test_a_client_keeps_its_proxy_on_its_own_disk_not_in_flowers_context(tmp_path, monkeypatch):
    """A SuperNode's clients keep their ~80 MB proxy in their own folder: Flower 1.42 uploads ``context.state`` in
    one 30 s request that a loaded machine did not finish (the next round found no proxy). A new run (a
    restarted server) finds nothing and says so; without a folder, ``context.state`` still holds it."""
    from flwr.app import Context, RecordDict

    from fedpft_lab.engines.flower import client_app, records

    def context(run: int) -> Context:
        return Context(run_id=run, node_id=1, node_config={"partition-id": 2, "num-partitions": 3},
                       state=RecordDict(), run_config={})

    setup, frozen = {"proxy": "{}"}, {"w": torch.arange(6.0).reshape(2, 3)}
    monkeypatch.setenv(client_app.STORE, str(tmp_path))
    first = context(7)
    client_app.keep(first, setup, frozen)
    assert len(first.state) == 0 and (tmp_path / "run-7" / "client-2.pt").exists()
    back_setup, back = client_app.kept(context(7))                # the next round's process: a fresh context
    assert back_setup == setup and torch.equal(back["w"], frozen["w"])
    with pytest.raises(RuntimeError, match="client 2 holds no proxy for run 8"):
        client_app.kept(context(8))
    monkeypatch.delenv(client_app.STORE)
    client_app.keep(first, setup, frozen)
    assert records.FROZEN in first.state and torch.equal(client_app.kept(first)[1]["w"], frozen["w"])


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


def test_a_server_restarted_with_resume_ends_where_an_uninterrupted_run_ends(tiny_data_config, tmp_path, request):
    """The server side of a loopback deployment is killed once round 1 is saved; a new deployment started with
    ``resume`` continues from the checkpoint: the same per-round numbers as an uninterrupted in-process run. Its
    clients start without state, so the first round after the restart sends their proxies again, and says so. The
    checkpoint is the in-process engine's own: that engine resumes it to the same numbers, bytes included."""
    import json
    import shutil
    import threading
    import time

    import psutil

    cfg = _aligned_config(tiny_data_config)
    out, failed = tmp_path / "run", []
    with deploy.local_deployment(cfg.data.clients, tmp_path / "logs-1") as (first, app, env):
        request.addfinalizer(first.stop)
        run = threading.Thread(target=lambda: _record_failure(failed, deploy.submit, cfg, out, app, env, 600))
        run.start()
        deadline = time.monotonic() + 600

        def saved() -> int:
            return len(json.loads((out / "metrics.json").read_text())["rounds"]) if (out / "metrics.json").exists() \
                else 0
        while saved() < 2:
            assert time.monotonic() < deadline and run.is_alive(), f"round 1 never finished: {failed}"
            time.sleep(0.05)
        link = psutil.Process(first.pids()[0])             # the SuperLink, the ServerApp under it: the server side
        for p in [link, *link.children(recursive=True)]:
            p.kill()
        run.join(timeout=600)
    assert not first.still_running(), "a Flower process of the stopped server outlived it"
    stopped = json.loads((out / "metrics.json").read_text())["rounds"]
    assert failed and 2 <= len(stopped) <= cfg.rounds, "the server was not stopped mid-run"
    shutil.copytree(out, tmp_path / "copy")
    with deploy.local_deployment(cfg.data.clients, tmp_path / "logs-2") as (second, app, env):
        request.addfinalizer(second.stop)
        resumed = deploy.submit(cfg, out, app, env, timeout=600, resume=True)
    assert not second.still_running(), "a Flower process of the restarted server outlived it"
    local = fl.run(cfg, prepare(cfg.data), progress=False)
    assert_same_rounds(resumed, local, NUMBERS)
    k = len(stopped)                                         # the first round of the restarted server
    assert_same_rounds({"rounds": resumed["rounds"][:k]}, {"rounds": local["rounds"][:k]}, BYTES)
    had_proxy = {c for r in local["rounds"][:k] for c in r["clients"]}
    again = sorted(had_proxy & set(local["rounds"][k]["clients"]))
    assert again and resumed["rounds"][k]["proxy_resent"] == again
    assert resumed["rounds"][k]["bytes_down_weights"] > local["rounds"][k]["bytes_down_weights"]
    assert "proxy_resent" not in resumed["rounds"][k - 1]
    continued = fl.run(cfg, prepare(cfg.data), out_dir=tmp_path / "copy", resume=True, progress=False)
    assert_same_rounds(continued, local)


def _record_failure(failed: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (the killed server's run fails; the test checks that it did)
        failed.append(e)
