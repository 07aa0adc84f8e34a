"""The in-process engine: federated proxy fine-tuning simulated in one process (labs/METHOD.md#federated-fine-tuning,
#baselines).

FedPFT itself lives in :mod:`fedpft_lab.core` (what a client does with a broadcast, what the server does per
round); this module moves its messages inside one Python process and adds what a lesson needs around them:
the round loop as a generator, checkpoint/resume, the run cache, stop and progress. The second engine,
:mod:`fedpft_lab.engines.flower`, moves the same messages between real processes.

Clients are simulated on a few "device" models, as many at a time as there are cores, each on one thread
(on a GPU: one device model, clients one after another; see fedpft_lab.device).
Each starts from the server's message alone (global adapter, fresh optimiser, seeded by (seed, round,
client)), so no client sees another's state; tests check that a client's update depends neither on who
trained before it nor on how many clients trained at once.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from . import adapters, align, discrepancy, io, models, parallel
from .config import LR_SCHEDULES, METHOD_NAMES, METHODS, DataConfig, FedConfig  # noqa: F401  (re-exported)
from .core.client import client_step, local_train
from .core.messages import Broadcast, ClientUpdate, TrainSettings  # noqa: F401  (re-exported)
from .core.progress import Progress, RoundStopped, Ticker as _Ticker, check_stop  # noqa: F401  (re-exported)
from .core.server import (  # noqa: F401  (re-exported: labs, widgets and tests import them from here)
    RunState, Setup, _discrepancy, _discrepancy_values, accuracy, aggregate, build_setup, client_seed, close_round,
    count_correct, evaluate, open_round, receive, sample_clients, summary, to_fm_names, to_proxy_names,
    train_settings, weights_download, weights_update)
from .device import resolve_device, side_by_side
from .errors import ConfigError, check_range
from .version import code_version
from .workspace import Workspace, ffn_state, load_ffn_state, prepare

# The layout of metrics.json: bump when it gains or loses a field, so the run cache never serves a file that a lab
# would read a missing field from. (RESULTS_VERSION is for the numbers; this is for the shape.)
METRICS_SCHEMA = 3   # 3: "device" and "startup"


def with_method(cfg: FedConfig, method: str) -> FedConfig:
    return replace(cfg, method=method)


_ALIGN_FIELDS = ("align_interval", "align_proportion", "align_steps", "align_batch_size", "align_lr", "align_rule")
_DISTILL_FIELDS = ("distill_steps", "distill_batch_size", "distill_lr")
_PUBLIC_FIELDS = ("public", "public_blocks", "block_size")


def result_config(cfg: FedConfig) -> dict:
    """The fields of ``cfg`` that can change ``cfg.method``'s result, as JSON: the one place that knows which.

    A run cache keyed by every field would redo FedPFT-B's hour when only the alignment interval changed
    (FedPFT-B never aligns); one keyed by too few would serve a stale run. So: alignment fields only for methods
    that align, distillation fields only for those that distil before FL, public data only for those that use
    it, proxy-shape fields only for methods with a proxy, LoRA dropout only with dropout on.
    """
    out = cfg.to_json()
    data = out["data"]
    drop: list[str] = []
    if not cfg.align_during:
        drop += _ALIGN_FIELDS
    if not cfg.distil_before:
        drop += _DISTILL_FIELDS
    if not (cfg.align_during or cfg.distil_before):
        for k in _PUBLIC_FIELDS:
            data.pop(k)
    if cfg.proxy_kind == "fm":
        drop += ["keep_ratio", "retained_layers", "selection"]
    if cfg.proxy_kind == "layer-drop":
        drop += ["selection"]        # the emulator's size follows the sub-FM's parameter count, not its neurons
    if not cfg.dropout:
        drop += ["lora_dropout"]
    if not cfg.group_by_length:
        drop += ["group_by_length"]  # random batches: the key of the runs made before the field existed
    for k in drop:
        out.pop(k)
    # Every CPU computes the same numbers whichever name chose it; a GPU's are its own (cached apart).
    device = resolve_device(cfg.data.device).type
    if device == "cpu":
        data.pop("device")
    else:
        data["device"] = device
    return out




# --------------------------------------------------------------------------- clients, on threads

def client_update(cfg: FedConfig, setup: Setup, ws: Workspace, client: int, rnd: int,
                  global_state: dict[str, torch.Tensor], record_stats: bool,
                  device: nn.Module | None = None, stop: threading.Event | None = None,
                  on_batch: Callable[[], None] | None = None) -> ClientUpdate:
    """One client's round on a device proxy (:func:`fedpft_lab.core.client.client_step`), adapter in FM names."""
    broadcast = Broadcast(rnd, client, to_proxy_names(global_state, setup.proxy_layers), cfg.lr_at(rnd),
                          client_seed(cfg, rnd, client), record_stats)
    model = device if device is not None else setup.devices[0]
    update = client_step(model, ws.train.subset(ws.parts[client]), broadcast, train_settings(cfg, setup), ws.pad_id,
                         stop=stop, on_batch=on_batch)
    return receive(update, setup)


def fm_update(cfg: FedConfig, setup: Setup, ws: Workspace, client: int, rnd: int,
              global_state: dict[str, torch.Tensor], stop: threading.Event | None = None) -> dict[str, torch.Tensor]:
    """``client``'s round replayed on the FM itself: same start, data order, lr and steps (the update disparity,
    labs/METHOD.md#measurements).

    Its difference from the proxy's update is what plugging the proxy-trained adapter into the FM gets wrong.
    """
    model = setup.trainable_fm()
    adapters.load_adapter_state(model, global_state)
    local_train(model, ws.train.subset(ws.parts[client]), cfg.local_epochs, cfg.batch_size, cfg.lr_at(rnd),
                cfg.max_grad_norm, client_seed(cfg, rnd, client), ws.pad_id, dropout=cfg.dropout, stop=stop,
                group_by_length=cfg.group_by_length)
    return adapters.adapter_state(model)


def train_clients(cfg: FedConfig, setup: Setup, ws: Workspace, clients: list[int], rnd: int,
                  global_state: dict[str, torch.Tensor], record_stats: bool,
                  workers: int | None = None, extra: list[Callable[[], object]] | None = None,
                  stop: threading.Event | None = None, on_progress: Progress | None = None) -> list:
    """Every sampled client's round, up to ``workers`` clients at a time, each on one thread with its own
    device proxy (see :mod:`fedpft_lab.parallel`); the updates do not depend on ``workers``.

    ``extra`` jobs (the FM replay of the update disparity) are measurements on the side: each gets a thread of
    its own next to the clients' workers, so it costs a round its share of the CPU, not a whole job's wait (two
    clients and one replay on two cores: 1.5 job-times instead of 2). Their results follow the clients' updates
    in the returned list. With ``cfg.dropout`` everything takes turns: dropout masks come from torch's one global
    random generator. ``stop`` / ``on_progress``: see :func:`local_train` and :data:`Progress`
    (one tick per client batch).
    """
    extra = extra or []
    steps = sum(cfg.local_epochs * -(-len(ws.parts[k]) // cfg.batch_size) for k in clients)
    tick = _Ticker(on_progress, rnd, "train", steps)
    workers = (1 if cfg.dropout or not side_by_side(ws.device)   # on a GPU: one after another, one device proxy
               else max(1, min(workers or parallel.default_workers(), len(clients))))
    free: queue.SimpleQueue[nn.Module] = queue.SimpleQueue()
    for device in setup.ensure_devices(min(workers, len(clients))):
        free.put(device)

    def job(client: int) -> Callable[[], ClientUpdate]:
        def train() -> ClientUpdate:
            device = free.get()
            try:
                return client_update(cfg, setup, ws, client, rnd, global_state, record_stats, device, stop, tick)
            finally:
                free.put(device)
        return train

    # Extra jobs first, each on its own thread (see above); every job is seeded on its own (client_seed), so
    # neither the order nor the thread count changes a number.
    threads = workers + (len(extra) if workers > 1 else 0)
    results = parallel.run_jobs(extra + [job(k) for k in clients], threads)
    return results[len(extra):] + results[:len(extra)]


# --------------------------------------------------------------------------- the round loop

def run(cfg: FedConfig, ws: Workspace | None = None, out_dir: str | os.PathLike | None = None,
        resume: bool = False, progress: bool = True, stop: threading.Event | None = None,
        on_round: Callable[[dict], None] | None = None, workers: int | None = None,
        on_progress: Progress | None = None) -> dict:
    """Run ``cfg`` to the end (or until ``stop`` is set) and return the metrics dict (see :func:`summary`).

    ``workers``: clients trained at the same time (default: one per CPU core); results do not depend on it.
    ``on_round`` hears of every round of the result, in order: a resumed run first reports those it had kept.
    ``on_progress``: progress inside each round (see :data:`Progress`), for a live progress bar.
    """
    result: dict = {}
    reported = 0
    for result in iterate(cfg, ws, out_dir, resume, progress, stop, workers, on_progress):
        for record in result["rounds"][reported:] if on_round is not None else ():
            on_round(record)
        reported = len(result["rounds"])
    return result


def run_cache_dir(cfg: FedConfig) -> Path:
    """Where :func:`cached_run` keeps ``cfg``'s run: keyed by what can change this method's result (FedPFT-B's key
    has no alignment fields), the code's results version and the library-level choices FedConfig does not name
    (e.g. which layers distillation matches)."""
    from . import paths

    key = paths.config_key({"config": result_config(cfg), "code": code_version()["results"], "schema": METRICS_SCHEMA,
                            "distill": asdict(cfg.distill_config()) if cfg.distil_before else None,
                            "align": asdict(cfg.align_config(1)) if cfg.align_during else None})
    return paths.cache_dir() / "runs" / f"{cfg.method}-{key}"


UPDATE_FIELDS = ("update_client", "update_cosine", "update_rel_l2")


def without_update_disparity(metrics: dict) -> dict:
    """A run that measured the update disparity, as the same run without it would have recorded it.

    The FM replay is a side job: it reads the round's start and a client's data, and writes nothing the clients
    or the server use, so every other number is the same (tests/test_workspace.py checks it bit for bit).
    """
    out = {**metrics, "config": {**metrics["config"], "measure_update": False}}
    out["rounds"] = [{k: v for k, v in r.items() if k not in UPDATE_FIELDS} for r in metrics["rounds"]]
    return out


def cached_run(cfg: FedConfig, ws: Workspace | None = None, progress: bool = True,
               stop: threading.Event | None = None, on_round: Callable[[dict], None] | None = None,
               workers: int | None = None, on_progress: Progress | None = None) -> dict:
    """:func:`run` with its results kept under the cache, keyed by the configuration.

    The labs call this so a run finished in one notebook (or an interrupted one) is reused, not redone:
    a complete run returns at once, a partial one resumes. A run asked for without the update disparity is also
    served by the same run finished with it (lab 05 measures it; lab 06 then replays those runs).
    """
    out = run_cache_dir(cfg)
    done = out / "metrics.json"
    what = f"the cached {METHOD_NAMES[cfg.method]} run"

    def complete(path: Path) -> dict | None:
        metrics = io.read_cache(path, io.load_json, what, _is_metrics)
        return metrics if metrics is not None and len(metrics["rounds"]) == cfg.rounds + 1 else None

    with io.cache_lock(out, what) as lock:  # two notebooks asking for the same run: one runs it, the other waits
        metrics = complete(done)
        if metrics is None and not cfg.measure_update:
            fuller = complete(run_cache_dir(replace(cfg, measure_update=True)) / "metrics.json")
            metrics = without_update_disparity(fuller) if fuller is not None else None
        if metrics is not None:
            lock.reused()
            if on_round is not None:
                for r in metrics["rounds"]:
                    on_round(r)
            return metrics
        if io.read_cache(out / "checkpoint.pt", io.load_torch, what, _is_checkpoint) is None and done.exists():
            io.move_aside(done, "orphaned")  # metrics without their checkpoint cannot be continued: redo the run
        return run(cfg, ws, out_dir=out, resume=True, progress=progress, stop=stop, on_round=on_round,
                   workers=workers, on_progress=on_progress)


def iterate(cfg: FedConfig, ws: Workspace | None = None, out_dir: str | os.PathLike | None = None,
            resume: bool = False, progress: bool = True, stop: threading.Event | None = None,
            workers: int | None = None, on_progress: Progress | None = None) -> Iterator[dict]:
    """The round loop as a generator: yields the metrics dict after every round (round 0 = before FL).

    With ``out_dir``, ``metrics.json`` and ``checkpoint.pt`` are rewritten atomically after every round, so an
    interrupted run keeps everything it finished and ``resume=True`` continues it bit for bit. ``stop`` is
    checked between client steps: the round it interrupts is dropped (neither yielded nor saved).
    """
    t_enter = time.perf_counter()
    if workers is not None:
        check_range("workers", workers, 1, None)
    ws = ws if ws is not None else prepare(cfg.data)
    if ws.cfg != cfg.data:
        raise ConfigError("the workspace was prepared for a different data configuration than cfg.data")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    blob = read_checkpoint(out, cfg) if resume and out is not None else None  # before any long work
    setup = build_setup(cfg, ws, progress=progress, stop=stop, on_progress=on_progress)
    state = RunState(0, dict(setup.init_state), {}, {}, {}, [])
    if blob is not None:
        state = load_checkpoint(blob, setup)
    _Ticker(on_progress, state.next_round, "setup", 1)()    # models built: the first sign of life of a run
    schedule = sample_clients(cfg)
    if not state.startup:
        state.startup = startup_times(t_enter)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.rounds, initial=max(0, state.next_round - 1), desc=METHOD_NAMES[cfg.method],
               disable=not progress)
    try:
        if state.next_round > cfg.rounds:  # resumed a finished run: report it (and restore its metrics.json)
            metrics = summary(cfg, setup, state.records, ws, state.startup)
            if out is not None:
                io.atomic_json(metrics, out / "metrics.json")
            yield metrics
        while state.next_round <= cfg.rounds:
            if stop is not None and stop.is_set():
                break
            rnd = state.next_round
            try:
                record = _round(cfg, setup, ws, state, rnd, schedule[rnd - 1] if rnd > 0 else [], workers, stop,
                                on_progress)
            except RoundStopped:   # the half-done round's in-memory state dies with this generator
                break
            state.records.append(record)
            state.next_round += 1
            metrics = summary(cfg, setup, state.records, ws, state.startup)
            if out is not None:
                save_run(out, cfg, setup, state, metrics)
            if rnd > 0:
                bar.update(1)
                bar.set_postfix(acc=f"{record['accuracy']:.3f}", sub=f"{record['sub_accuracy']:.3f}")
            yield metrics
    finally:
        bar.close()


def startup_times(t_enter: float) -> dict:
    """Seconds from entering :func:`iterate` (``t_enter``, a ``perf_counter`` stamp) to round 0: data, models
    and proxy; and from the start of the process, which for ``fedpft-lab run`` adds the imports."""
    import psutil

    return {"setup_seconds": time.perf_counter() - t_enter,
            "seconds_since_process_start": time.time() - psutil.Process().create_time()}


def _round(cfg: FedConfig, setup: Setup, ws: Workspace, state: RunState, rnd: int, clients: list[int],
           workers: int | None = None, stop: threading.Event | None = None,
           on_progress: Progress | None = None) -> dict:
    """One communication round (``rnd == 0``: evaluate A_0 only, the reference point of every curve)."""
    t0 = time.perf_counter()
    if rnd > 0 and state.package:  # the latest W_fro rides along with this round's broadcast (see weights_download)
        for device in setup.devices:
            align.apply_weight_package(models.unwrap(device), state.package)
        state.package = {}
    record, broadcasts = open_round(cfg, setup, state, rnd, clients)
    updates: list[ClientUpdate] = []
    if rnd > 0:
        measure = cfg.measure_update and not setup.proxy_is_fm
        start = state.global_state
        extra = [functools.partial(fm_update, cfg, setup, ws, clients[0], rnd, start, stop)] if measure else []
        t_train = time.perf_counter()
        results = train_clients(cfg, setup, ws, clients, rnd, start, broadcasts[0].record_stats, workers,
                                extra=extra, stop=stop, on_progress=on_progress)
        updates = results[:len(clients)]
        record["train_seconds"] = time.perf_counter() - t_train  # wall time; client_seconds adds up every client's
        if measure:
            cos, rel = discrepancy.update_disparity(start, updates[0].adapter, results[-1])
            record.update(update_client=clients[0], update_cosine=cos, update_rel_l2=rel)
        aggregate(state, record, updates)
    return close_round(cfg, setup, ws, state, rnd, record, updates, t0, workers, stop, on_progress)


def save_run(out: Path, cfg: FedConfig, setup: Setup, state: RunState, metrics: dict) -> None:
    """A run folder's two files, checkpoint first: what ``--resume`` reads back on every engine."""
    io.atomic_torch_save({"config": json.dumps(cfg.to_json(), sort_keys=True), "next_round": state.next_round,
                          "global_state": state.global_state, "package": state.package,
                          "server_ffn": ffn_state(models.unwrap(setup.server_proxy), setup.compressed),
                          "device_ffn": ffn_state(models.unwrap(setup.devices[0]), setup.compressed),
                          "records": json.dumps(state.records), "alignments": json.dumps(state.alignments),
                          "synced": json.dumps(state.synced), "startup": json.dumps(state.startup)},
                         out / "checkpoint.pt")
    io.atomic_json(metrics, out / "metrics.json")


CHECKPOINT_KEYS = {"config", "next_round", "global_state", "package", "server_ffn", "device_ffn", "records"}


def _is_checkpoint(blob: dict) -> bool:
    return CHECKPOINT_KEYS <= blob.keys() and isinstance(json.loads(blob["records"]), list)


def _is_metrics(metrics: dict) -> bool:
    return isinstance(metrics["rounds"], list)


def read_checkpoint(out: Path, cfg: FedConfig) -> dict | None:
    """The checkpoint ``--resume`` continues from (None: the folder holds no run yet).

    A checkpoint or metrics.json that cannot be read stops the run with one line naming the file: they are
    the participant's results, so they are neither deleted nor overwritten.
    """
    if not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists():
        return None
    if (out / "metrics.json").exists():
        io.read_run_file(out / "metrics.json", io.load_json, _is_metrics)
    blob = io.read_run_file(out / "checkpoint.pt", io.load_torch, _is_checkpoint)
    if "synced" not in blob:
        raise ConfigError(f"--resume: {out / 'checkpoint.pt'} was written by an older version of the lab; "
                          "start afresh with another --out")
    if result_config(FedConfig.from_json(json.loads(blob["config"]))) != result_config(cfg):
        raise ConfigError(f"--resume: {out} holds a run with a different configuration; use another --out "
                          "or the same arguments")   # fields that cannot change this method's result may differ
    return blob


def load_checkpoint(blob: dict, setup: Setup) -> RunState:
    load_ffn_state(models.unwrap(setup.server_proxy), blob["server_ffn"])
    for device in setup.devices:
        load_ffn_state(models.unwrap(device), blob["device_ffn"])
    alignments = [{int(k): v for k, v in a.items()} for a in json.loads(blob["alignments"])]
    synced = {int(k): v for k, v in json.loads(blob["synced"]).items()}
    return RunState(blob["next_round"], blob["global_state"], blob["package"], blob["server_ffn"],
                    blob["device_ffn"], json.loads(blob["records"]), alignments, synced,
                    json.loads(blob.get("startup", "{}")))

