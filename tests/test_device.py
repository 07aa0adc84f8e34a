"""Devices: the resolver, the plumbing (tested on the CPU: this suite has no GPU), and CPU runs unchanged by it.

What a GPU-less test can check: ``auto`` picks CUDA, then MPS, then the CPU; a missing device fails early in one
line; on a device other than the CPU a round's clients train one after another on one device proxy and give the
updates they give side by side; everything that travels (adapters, statistics, weight packages) is on the CPU;
and a CPU run computes exactly the numbers the code computed before devices existed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from fedpft_lab import align, device, federation as fl, parallel
from fedpft_lab.config import DataConfig
from fedpft_lab.errors import ConfigError

CPU_NUMBERS = Path(__file__).with_name("cpu_numbers.json")
ROUND_KEYS = ("accuracy", "sub_accuracy", "grad_cosine", "grad_rel_l2", "logit_kl", "layer_cosine", "hidden_rel_mse",
              "update_cosine", "update_rel_l2", "align_loss", "bytes_up", "bytes_down")


def _gpu(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(device, "_mps_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, picked):
    _gpu(monkeypatch, cuda, mps)
    assert device.resolve_device("auto") == torch.device(picked)
    assert device.resolve_device("cpu") == torch.device("cpu")


def test_missing_or_unknown_device_is_one_clear_line(monkeypatch):
    _gpu(monkeypatch, False, False)
    for name in ("cuda", "mps"):
        with pytest.raises(ConfigError, match=f"device '{name}' requested but") as e:
            device.resolve_device(name)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="device must be one of 'auto', 'cpu', 'cuda', 'mps', got 'gpu'"):
        DataConfig(device="gpu")


def test_prepare_fails_on_a_missing_gpu_before_loading_anything(monkeypatch, tiny_data_config):
    from fedpft_lab import data, workspace

    _gpu(monkeypatch, False, False)
    monkeypatch.setattr(data, "load_task", lambda *a, **k: pytest.fail("loaded data before checking the device"))
    with pytest.raises(ConfigError, match="device 'cuda'"):
        workspace.prepare(dataclasses.replace(tiny_data_config, device="cuda"))


def test_result_config_keys_cpu_runs_as_before_and_gpu_runs_apart(monkeypatch, tiny_data_config):
    cfg = fl.FedConfig(data=tiny_data_config)
    assert "device" not in fl.result_config(cfg)["data"]       # CPU cache keys are those of the code before devices
    assert fl.result_config(cfg) == fl.result_config(dataclasses.replace(cfg, data=dataclasses.replace(
        tiny_data_config, device="cpu")))
    _gpu(monkeypatch, True, False)
    assert fl.result_config(cfg)["data"]["device"] == "cuda"


def test_models_and_batches_follow_the_device(tiny_ws):
    assert tiny_ws.device == torch.device("cpu")
    for batch in tiny_ws.test_batches + tiny_ws.probe_batches:
        assert all(v.device == tiny_ws.device for v in batch.values())
    moved = device.to_device(tiny_ws.test_batches[0], torch.device("cpu"))
    assert all(moved[k] is v for k, v in tiny_ws.test_batches[0].items())  # a no-op on the CPU: same tensors


def test_on_a_gpu_clients_take_turns_on_one_device_proxy(monkeypatch, tiny_ws, tiny_data_config):
    """Plumbing of the GPU schedule, run on the CPU: one device proxy, one client after another, same updates."""
    cfg = fl.FedConfig(data=tiny_data_config, distill_steps=0)
    clients = [0, 1, 2, 3]
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    side = fl.train_clients(cfg, setup, tiny_ws, clients, 1, setup.init_state, True, workers=2)
    assert len(setup.devices) == 2
    monkeypatch.setattr(fl, "side_by_side", lambda dev: False)
    gpu_setup = fl.build_setup(cfg, tiny_ws, progress=False)
    turns = fl.train_clients(cfg, gpu_setup, tiny_ws, clients, 1, gpu_setup.init_state, True, workers=4)
    assert len(gpu_setup.devices) == 1
    for a, b in zip(side, turns):
        assert a.adapter.keys() == b.adapter.keys() and all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
        # what a client sends is on the CPU, as on the wire
        assert all(v.device.type == "cpu" for v in a.adapter.values())
        assert all(t.device.type == "cpu" and t.dtype == torch.float64 for s in a.stats.values() for t in s.values())


def test_only_a_rounds_clients_hold_models(tiny_ws, tiny_data_config):
    """Memory flat in the number of clients: device proxies are per worker, never per client."""
    cfg = fl.FedConfig(data=tiny_data_config, distill_steps=0)
    setup = fl.build_setup(cfg, tiny_ws, progress=False)
    for rnd, clients in enumerate(([0, 1, 2], [1, 2, 3], [0, 3]), start=1):
        fl.train_clients(cfg, setup, tiny_ws, clients, rnd, setup.init_state, False, workers=2)
        assert len(setup.devices) == 2


def test_weight_package_travels_on_the_cpu(tiny_ws, tiny_data_config):
    setup = fl.build_setup(fl.FedConfig(data=tiny_data_config, distill_steps=0), tiny_ws, progress=False)
    layer = setup.compressed[0]
    pkg = align.weight_package(setup.server_proxy, {layer: torch.tensor([0, 2])})
    assert pkg and all(v.device.type == "cpu" for v in pkg.values())


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _tiny_run(method: str, tmp: Path) -> dict:
    d = DataConfig(fm="tiny-bert", task="tweets", clients=4, max_train=160, max_test=64, public_blocks=64,
                   block_size=32, probe_batches=2, probe_batch_size=8, seed=0, device="cpu")
    cfg = fl.FedConfig(method=method, data=d, rounds=2, distill_steps=2, align_interval=1, align_steps=2,
                       align_batch_size=4, measure_update=True)
    with parallel.torch_threads(1):   # as stored: distillation and alignment round with the thread count
        metrics = fl.run(cfg, out_dir=tmp, progress=False, workers=2)
    state = torch.load(tmp / "checkpoint.pt", weights_only=False)["global_state"]
    return {"metrics": metrics, "digest": _state_digest(state)}


def platform_identity() -> dict[str, str]:
    """What decides the last bits of a CPU run: torch and the libraries that call it, and the CPU itself.

    torch's version and CPU capability alone were not enough: on 2026-12-03 a machine with the same torch
    (2.13.0+cpu) and capability (AVX512) as the stored run, with transformers 5.23 or 5.24, differed from it in
    the last bits (about 1e-9 relative) while agreeing to float32 rounding."""
    import platform

    import peft
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "transformers": transformers.__version__, "peft": peft.__version__, "cpu_model": model}


@pytest.mark.parametrize("method", ["fedpft", "fedot"])
def test_cpu_run_computes_what_the_code_before_devices_did(method, tmp_path, monkeypatch):
    """``tests/cpu_numbers.json`` holds a tiny run made by the code before devices existed (distillation, an
    alignment and the update disparity included), on one torch thread. On the platform it was made on (every key
    of :func:`platform_identity` the same), every number and the final adapter must be equal bit for bit;
    elsewhere, equal to float32 rounding."""
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(tmp_path / "cache"))   # distil afresh, as the stored run did
    stored = json.loads(CPU_NUMBERS.read_text())
    same_platform = all(stored.get(k) == v for k, v in platform_identity().items())
    want = stored["runs"][method]
    got = _tiny_run(method, tmp_path / "run")
    rounds = [{k: r[k] for k in ROUND_KEYS if k in r} for r in got["metrics"]["rounds"]]
    if same_platform:
        assert rounds == want["rounds"] and got["metrics"]["distill_loss"] == want["distill_loss"]
        assert got["digest"] == want["global_state_sha256"]
    else:
        assert len(rounds) == len(want["rounds"])
        for i, (r, w) in enumerate(zip(rounds, want["rounds"])):
            assert r.keys() == w.keys(), i
            for k, v in w.items():
                got_v, want_v = (r[k], v) if isinstance(v, list) else ([r[k]], [v])
                assert [g is None for g in got_v] == [x is None for x in want_v], (i, k)   # FedOT: no adapter there
                assert [g for g in got_v if g is not None] == pytest.approx(
                    [x for x in want_v if x is not None], rel=1e-4, abs=1e-5), (i, k)


def test_a_run_records_its_device_and_startup(tmp_path, tiny_ws, tiny_data_config):
    cfg = fl.FedConfig(data=tiny_data_config, rounds=1, distill_steps=0)
    metrics = fl.run(cfg, tiny_ws, progress=False)
    s = metrics["startup"]
    assert metrics["device"] == "cpu"
    assert 0 < s["setup_seconds"] <= s["seconds_since_process_start"]


def test_lab_setup_checks_and_reports_the_device(monkeypatch):
    import plotly.io as pio

    from fedpft_lab import notebook as nb

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    threads = torch.get_num_threads()
    _gpu(monkeypatch, False, True)
    try:
        assert nb.setup(seed=0, threads=1, device="cpu").device == "cpu"
        assert nb.setup(seed=0, threads=1).device == "mps"          # auto, on a machine with MPS only
        _gpu(monkeypatch, False, False)
        with pytest.raises(ConfigError, match="device 'cuda' requested"):
            nb.setup(seed=0, threads=1, device="cuda")
    finally:
        torch.set_num_threads(threads)
