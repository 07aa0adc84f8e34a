"""Damaged files, concurrent labs and unsafe files never cost a participant their work.

Every cache kind is damaged the way a full disk or an interrupted copy leaves it (truncated), emptied, or replaced
by a readable file of the wrong shape; the next read must say so in one line, keep the bad file aside and rebuild
exactly what was there. Run folders are the participant's results: --resume must stop with a clear line instead.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedpft_lab import data, federation as fl, io, models, subfm
from fedpft_lab.cli import main
from fedpft_lab.distill import DistillConfig
from fedpft_lab.errors import ConfigError
from fedpft_lab.workspace import ffn_state, sub_fm

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedpft_lab"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty cache for the test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FEDPFT_LAB_CACHE", str(folder))
    return folder


def damage(path: Path, how: str) -> None:
    """Damage a cache file as it happens in practice: cut short, emptied, or readable but not what was cached."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "json-truncated":
        path.write_text(path.read_text()[:40])
    else:  # a valid torch file with the wrong content
        torch.save({"something": torch.zeros(3)}, path)


def assert_healed(caplog, path: Path) -> None:
    """One warning line naming the file, and the damaged file kept next to it."""
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpft_lab.io" and str(path) in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "damaged-" in lines[0], lines
    assert list(path.parent.glob(path.name + ".damaged-*")), "the damaged file must be kept, not deleted"


# ----------------------------------------------------------------------------- io primitives

def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.pt"
    io.atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        io.atomic_torch_save({"a": lambda: None}, path)  # not picklable: fails halfway through writing
    assert torch.equal(io.load_torch(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"], "no temporary file may be left behind"


def test_read_cache_moves_an_unreadable_file_aside(tmp_path, caplog):
    path = tmp_path / "c.pt"
    assert io.read_cache(path, io.load_torch, "thing") is None and not caplog.records  # missing: silent
    io.atomic_torch_save(torch.arange(5), path)
    assert torch.equal(io.read_cache(path, io.load_torch, "thing"), torch.arange(5))
    damage(path, "truncated")
    assert io.read_cache(path, io.load_torch, "thing") is None
    assert_healed(caplog, path)
    assert not path.exists()


def test_read_cache_treats_rejected_content_as_damage(tmp_path, caplog):
    path = tmp_path / "c.json"
    io.atomic_json({"rounds": "not a list"}, path)
    assert io.read_cache(path, io.load_json, "run", lambda m: isinstance(m["rounds"], list)) is None
    assert_healed(caplog, path)


def test_read_run_file_names_the_file_and_both_ways_forward_and_moves_nothing(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError) as err:
        io.read_run_file(path, io.load_torch)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "--out" in msg and "--restart" in msg and len(msg) < 400
    assert path.read_bytes() == b"PK\x03\x04 cut short" and len(list(tmp_path.iterdir())) == 1


def test_cache_lock_makes_a_second_thread_wait_and_say_so(tmp_path, caplog):
    path = tmp_path / "entry.pt"
    order = []
    holding = threading.Event()

    def first():
        with io.cache_lock(path, "the entry"):
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait()
    with io.cache_lock(path, "the entry") as lock:
        order.append("second in")
        lock.reused()
    t.join()
    assert order == ["first done", "second in"] and lock.waited
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for another process building the entry" in m for m in messages)
    assert any("reused the entry built by another process" in m for m in messages)


# ----------------------------------------------------------------------------- every cache kind heals

@pytest.mark.parametrize("how", ["truncated", "empty", "wrong"])
def test_public_corpus_caches_heal(cache, caplog, how):
    tok = models.load_preprocessor("tiny-bert")
    for build, pattern in ((lambda: data.public_corpus_blocks(tok, block_size=16, max_blocks=8), "blocks-*.pt"),
                           (lambda: data.public_corpus_sentences(tok, length=16, max_blocks=8), "sentences-*.pt")):
        first = build()
        (path,) = cache.glob(pattern)
        damage(path, how)
        again = build()
        assert torch.equal(again, first)
        assert_healed(caplog, path)
        assert torch.equal(io.load_torch(path), first), "the rebuilt cache file must be readable again"


@pytest.mark.parametrize("how", ["truncated", "wrong"])
def test_encoded_task_cache_heals(cache, caplog, how):
    tok = models.load_preprocessor("tiny-bert")
    task = data.load_task("tweets", max_train=40, max_test=20)
    train, test = data.encode_task(task, tok)
    (path,) = cache.glob("encoded-*.pt")
    damage(path, how)
    train2, test2 = data.encode_task(task, tok)
    assert train2.input_ids == train.input_ids and (train2.labels == train.labels).all()
    assert test2.input_ids == test.input_ids and (test2.labels == test.labels).all()
    assert_healed(caplog, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "wrong"])
def test_subfm_cache_heals_and_rebuilds_the_same_sub_fm(tiny_ws, cache, caplog, how):
    sub_cfg, distill_cfg = subfm.SubFMConfig(keep_ratio=0.5), DistillConfig(steps=3, batch_size=8)
    first = sub_fm(tiny_ws, sub_cfg, distill_cfg, progress=False)
    (path,) = cache.glob("subfm-*.pt")
    damage(path, how)
    again = sub_fm(tiny_ws, sub_cfg, distill_cfg, progress=False)
    assert not again.cached and again.distill_loss == first.distill_loss
    a, b = ffn_state(first.model, first.info.compressed), ffn_state(again.model, again.info.compressed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_healed(caplog, path)
    assert sub_fm(tiny_ws, sub_cfg, distill_cfg, progress=False).cached  # and the cache works again


def _tiny_cfg(data_cfg, **kw):
    base = dict(data=data_cfg, method="fedpft", rounds=2, sample_fraction=0.5, batch_size=8, distill_steps=3,
                distill_batch_size=8, align_interval=1, align_steps=2, align_batch_size=4, lr=5e-3)
    return fl.FedConfig(**{**base, **kw})


def _numbers(metrics: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in metrics["rounds"]]


def test_run_cache_heals_damaged_metrics_and_checkpoint(tiny_ws, tiny_data_config, cache, caplog):
    cfg = _tiny_cfg(tiny_data_config)
    first = fl.cached_run(cfg, tiny_ws, progress=False)
    (out,) = [p for p in (cache / "runs").iterdir() if p.is_dir()]
    # metrics.json cut short: rebuilt from the intact checkpoint, every number (timings too) as before
    damage(out / "metrics.json", "json-truncated")
    assert fl.cached_run(cfg, tiny_ws, progress=False) == first
    assert_healed(caplog, out / "metrics.json")
    assert io.load_json(out / "metrics.json") == first
    # both files damaged: the run is redone from round 0 and ends with the same numbers
    caplog.clear()
    damage(out / "metrics.json", "json-truncated")
    damage(out / "checkpoint.pt", "truncated")
    again = fl.cached_run(cfg, tiny_ws, progress=False)
    assert _numbers(again) == _numbers(first)
    assert_healed(caplog, out / "metrics.json")
    assert_healed(caplog, out / "checkpoint.pt")


def test_run_cache_with_a_damaged_checkpoint_of_a_partial_run_redoes_it(tiny_ws, tiny_data_config, cache, caplog):
    cfg = _tiny_cfg(tiny_data_config, method="fedpft-n")
    stop = threading.Event()
    fl.cached_run(cfg, tiny_ws, progress=False, stop=stop, on_round=lambda r: r["round"] == 1 and stop.set())
    (out,) = [p for p in (cache / "runs").iterdir() if p.is_dir()]
    assert len(io.load_json(out / "metrics.json")["rounds"]) == 2  # stopped after round 1 of 2
    damage(out / "checkpoint.pt", "truncated")
    healed = fl.cached_run(cfg, tiny_ws, progress=False)
    assert_healed(caplog, out / "checkpoint.pt")
    assert list(out.glob("metrics.json.orphaned-*"))  # metrics without a checkpoint are kept aside, not lost
    assert _numbers(healed) == _numbers(fl.run(cfg, tiny_ws, progress=False))


# ----------------------------------------------------------------------------- run folders: a clear choice

def test_resume_of_a_finished_run_returns_its_metrics(tiny_ws, tiny_data_config, tmp_path):
    cfg = _tiny_cfg(tiny_data_config, method="fedpft-n")
    first = fl.run(cfg, tiny_ws, out_dir=tmp_path, progress=False)
    assert fl.run(cfg, tiny_ws, out_dir=tmp_path, resume=True, progress=False) == first


@pytest.mark.parametrize("name, how", [("checkpoint.pt", "truncated"), ("checkpoint.pt", "wrong"),
                                       ("metrics.json", "json-truncated"), ("checkpoint.pt", "missing")])
def test_resume_of_a_damaged_run_folder_stops_before_any_work(tiny_ws, tiny_data_config, tmp_path, name, how):
    cfg = _tiny_cfg(tiny_data_config, method="fedpft-n", rounds=1)
    fl.run(cfg, tiny_ws, out_dir=tmp_path, progress=False)
    if how == "missing":
        (tmp_path / name).unlink()
    else:
        damage(tmp_path / name, how)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError) as err:
        fl.run(cfg, tiny_ws, out_dir=tmp_path, resume=True, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / name) in msg and "--out" in msg and "--restart" in msg, msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "nothing may be moved or overwritten"


def test_cli_resume_names_the_damaged_file_and_restart_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--method", "fedpft-n", "--fm", "tiny-bert", "--max-train", "160", "--max-test", "64",
            "--public-blocks", "64", "--clients", "4", "--rounds", "1", "--distill-steps", "3",
            "--sample-fraction", "0.5", "--quiet", "--out", str(out)]
    assert main(args) == 0
    damage(out / "checkpoint.pt", "truncated")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "checkpoint.pt") in err and "--restart" in err, err
    assert main([*args, "--restart"]) == 0
    (kept,) = tmp_path.glob("run.replaced-*")
    assert str(kept) in capsys.readouterr().err  # says where the old run went
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    assert len(io.load_json(out / "metrics.json")["rounds"]) == 2
    assert main([*args, "--resume"]) == 0  # the fresh run resumes fine


# ----------------------------------------------------------------------------- two processes, one build

WORKER = """
import sys, time
from pathlib import Path
import torch
from fedpft_lab import subfm
from fedpft_lab.distill import DistillConfig
from fedpft_lab.workspace import DataConfig, ffn_state, prepare, sub_fm

barrier, me, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ws = prepare(DataConfig(fm="tiny-bert", clients=2, max_train=40, max_test=16, public_blocks=32, block_size=16,
                        probe_batches=1, probe_batch_size=4))
(barrier / me).touch()
while len(list(barrier.iterdir())) < 2:  # start the sub-FM at the same moment as the other process
    time.sleep(0.01)
built = sub_fm(ws, subfm.SubFMConfig(keep_ratio=0.5), DistillConfig(steps=20, batch_size=8), progress=False,
               on_step=lambda step, loss: time.sleep(0.05))  # a distillation long enough to overlap
torch.save(ffn_state(built.model, built.info.compressed), out)
print("reused" if built.cached else "built")
"""


def test_two_processes_on_a_cold_cache_distil_once(tmp_path):
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "FEDPFT_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(barrier), str(i), str(tmp_path / f"{i}.pt")],
                                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    said = sorted(out.strip().splitlines()[-1] for out, _ in results)
    assert said == ["built", "reused"], results
    reuser_err = next(err for out, err in results if out.strip().endswith("reused"))
    assert "waiting for another process building the distilled sub-FM" in reuser_err
    assert "reused the distilled sub-FM built by another process" in reuser_err
    assert len(list(cache.glob("subfm-*.pt"))) == 1 and not list(cache.glob("*.damaged-*"))
    a, b = (io.load_torch(tmp_path / f"{i}.pt") for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- nothing unsafe is loaded

def _calls(attr: str, module: str):
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
                yield path.name, node


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    loads = list(_calls("load", "torch"))
    assert loads, "the package loads its caches somewhere"
    for name, node in loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{name}:{node.lineno}: torch.load without weights_only=True"
    for fn in ("load", "loads", "Unpickler"):
        assert not list(_calls(fn, "pickle")), f"pickle.{fn} in the package"
    for path in PACKAGE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text and "weights_only=False" not in text, path.name
    for nb in (ROOT / "labs").glob("*.ipynb"):
        text = nb.read_text(encoding="utf-8")
        assert "torch.load(" not in text and "pickle.load" not in text, nb.name


@pytest.fixture
def pickle_only_model(tmp_path) -> Path:
    """A local model folder as many tutorials leave it: config.json + pytorch_model.bin, no safetensors."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path / "my-bert"
    model = AutoModelForSequenceClassification.from_config(models.tiny_config("tiny-bert"))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_local_pickle_weights_are_refused_with_a_clear_message(pickle_only_model, monkeypatch):
    monkeypatch.delenv(models.PICKLE_OPT_IN, raising=False)
    with pytest.raises(ConfigError) as err:
        models.load_fm(str(pickle_only_model))
    msg = str(err.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "safetensors" in msg and "--allow-unsafe-weights" in msg


def test_local_pickle_weights_load_after_an_explicit_opt_in(pickle_only_model, monkeypatch):
    monkeypatch.delenv(models.PICKLE_OPT_IN, raising=False)
    state = torch.load(pickle_only_model / "pytorch_model.bin", weights_only=True)
    for fm in (models.load_fm(str(pickle_only_model), allow_pickle=True),):
        emb = fm.bert.embeddings.word_embeddings.weight
        assert torch.equal(emb, state["bert.embeddings.word_embeddings.weight"])
    monkeypatch.setenv(models.PICKLE_OPT_IN, "1")
    models.load_fm(str(pickle_only_model))  # the environment variable is the same opt-in (set by the CLI flag)


def test_local_safetensors_folder_loads_without_opt_in(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.delenv(models.PICKLE_OPT_IN, raising=False)
    folder = tmp_path / "safe-bert"
    AutoModelForSequenceClassification.from_config(models.tiny_config("tiny-bert")).save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"a stray pickle next to safetensors is never loaded")
    assert models.num_layers(models.load_fm(str(folder))) == 4
