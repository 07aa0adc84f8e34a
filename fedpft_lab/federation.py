"""Federated proxy fine-tuning, simulated in one process (labs/METHOD.md#federated-fine-tuning, #baselines).

One round, as the server sees it::

    broadcast (global adapter [+ W_fro package after an alignment]) to the sampled clients
    each client: load it into its local proxy, train LoRA + head for E epochs, send back adapter
                 (+ per-neuron activity sums in alignment rounds) and its example count
    server: FedAvg weighted by example counts -> plug the adapter into the FM and evaluate
            every t rounds (FedPFT, FedPFT-D): neuron-level alignment of its proxy copy -> W_fro package

Clients are simulated on a few "device" models, as many at a time as there are cores, each on one thread
(on a GPU: one device model, clients one after another; see fedpft_lab.device).
Each starts from the server's message alone (global adapter, fresh optimiser, seeded by (seed, round,
client)), so no client sees another's state; tests check that a client's update depends neither on who
trained before it nor on how many clients trained at once.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, align, data, discrepancy, io, models, parallel, subfm
from .config import LR_SCHEDULES, METHOD_NAMES, METHODS, DataConfig, FedConfig  # noqa: F401  (re-exported)
from .device import model_device, resolve_device, side_by_side, to_device
from .discrepancy import gradient_discrepancy
from .distill import DistillConfig
from .errors import ConfigError, check_choice, check_range
from .version import code_version
from .workspace import Workspace, atomic_save, ffn_state, load_ffn_state, prepare, sub_fm

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


# --------------------------------------------------------------------------- the proxy and the two models

@dataclass
class Setup:
    """The server's FM (with LoRA, for plug-in/eval), its proxy copy, and the clients' device proxies.

    ``devices`` holds one proxy per client trained at the same time; they all carry the same frozen weights.
    """

    fm: nn.Module
    server_proxy: nn.Module
    devices: list[nn.Module]
    proxy_layers: list[int] | None       # layer-drop: proxy layer j comes from FM layer proxy_layers[j]
    compressed: list[int]                # sub-FM layers whose FFN was compressed
    init_state: dict[str, torch.Tensor]  # A_0 in FM naming
    distill_loss: list[float]
    fm_params: int
    proxy_params: int
    proxy_is_fm: bool = False            # FedPETuning: proxy == FM, so its accuracy/discrepancy need no evaluation
    fm_trainer: nn.Module | None = None  # a trainable FM copy for the update disparity, made on first use

    def load_global(self, state: dict[str, torch.Tensor], fm: bool = True) -> None:
        """Put the global adapter (FM naming) into the server's proxy and, unless ``fm=False``, the FM; eval mode."""
        if fm:
            adapters.load_adapter_state(self.fm, state)
        adapters.load_adapter_state(self.server_proxy, to_proxy_names(state, self.proxy_layers))
        self.fm.eval(), self.server_proxy.eval()

    def trainable_fm(self) -> nn.Module:
        """The FM copy that replays a client's round for the update disparity (never the evaluated FM)."""
        if self.fm_trainer is None:
            self.fm_trainer = copy.deepcopy(self.fm)
        return self.fm_trainer

    def frozen_bytes(self) -> int:
        """What a client downloads once before its first round: every frozen weight of its proxy."""
        return adapters.nbytes(p for p in self.server_proxy.parameters() if not p.requires_grad)

    def ensure_devices(self, n: int) -> list[nn.Module]:
        """At least ``n`` device proxies, new ones copied from the first (frozen weights included)."""
        while len(self.devices) < n:
            self.devices.append(copy.deepcopy(self.devices[0]))
        return self.devices[:n]


def build_setup(cfg: FedConfig, ws: Workspace, progress: bool = True, stop: threading.Event | None = None,
                on_progress: Progress | None = None) -> Setup:
    """Build FM + proxy for ``cfg.method`` and the initial global adapter A_0 (from the FM's LoRA init).

    ``on_progress`` hears of every distillation step (stage ``distill`` of round 0) when the sub-FM is not cached.
    """
    lora = cfg.lora_config()
    proxy_layers, compressed, loss = None, [], []
    if cfg.proxy_kind == "fm":
        proxy = copy.deepcopy(ws.fm)
    elif cfg.proxy_kind == "sub-fm":
        steps = cfg.distill_steps if cfg.distil_before else 0
        tick = _Ticker(on_progress, 0, "distill", steps)
        built = sub_fm(ws, cfg.sub_config(), replace(cfg.distill_config(), steps=steps), progress=progress, stop=stop,
                       on_step=lambda step, loss: tick())
        proxy, compressed, loss = built.model, built.info.compressed, built.distill_loss
    else:
        target = models.transformer_params(subfm.build_sub_fm(ws.fm, cfg.sub_config())[0])
        proxy_layers = subfm.emulator_layers(ws.fm, cfg.retained_layers, target_params=target)
        proxy = subfm.build_layer_drop(ws.fm, proxy_layers)
    fm_params, proxy_params = models.transformer_params(ws.fm), models.transformer_params(proxy)
    n_fm = models.num_layers(ws.fm)
    if proxy_layers is None:
        adapter_layers = list(range(n_fm))
    elif cfg.method == "fedot-all":        # LoRA in every kept layer, each plugged into the FM layer it came from
        adapter_layers = list(proxy_layers)
    else:                                  # FedOT: LoRA in the bottom/top adapter layers only
        adapter_layers = sorted(cfg.sub_config().retained(n_fm))
    fm = adapters.add_lora(copy.deepcopy(ws.fm), lora, adapter_layers, seed=cfg.seed)
    proxy_ids = ([j for j, i in enumerate(proxy_layers) if i in adapter_layers] if proxy_layers is not None
                 else adapter_layers)
    server_proxy = adapters.add_lora(proxy, lora, proxy_ids, seed=cfg.seed)
    devices = [copy.deepcopy(server_proxy)]
    init_state = adapters.adapter_state(fm)
    return Setup(fm, server_proxy, devices, proxy_layers, compressed, init_state, loss, fm_params, proxy_params,
                 proxy_is_fm=cfg.proxy_kind == "fm")


def to_proxy_names(state: dict[str, torch.Tensor], proxy_layers: list[int] | None) -> dict[str, torch.Tensor]:
    if proxy_layers is None:
        return state
    return adapters.translate(state, {fm_i: j for j, fm_i in enumerate(proxy_layers)})


def to_fm_names(state: dict[str, torch.Tensor], proxy_layers: list[int] | None) -> dict[str, torch.Tensor]:
    if proxy_layers is None:
        return state
    return adapters.translate(state, adapters.layer_key_map(proxy_layers))


# --------------------------------------------------------------------------- stop and progress inside a round

Progress = Callable[[dict], None]
"""``on_progress({"round": r, "stage": ..., "done": k, "total": n})``: called on worker threads, one call at a time,
with ``done`` counting up to ``total`` within the stage. Stages: ``distill`` (round 0, building the sub-FM when it
is not cached), ``setup`` (once, when the models are built, before the first round to run), ``train`` (client
batches), ``evaluate`` (evaluation jobs), ``align`` (alignment steps), ``evaluate aligned`` (the proxy re-measured
after alignment)."""


class RoundStopped(Exception):
    """``stop`` was set inside a round: the round is dropped unrecorded (a resumed run redoes it from the start)."""


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RoundStopped


class _Ticker:
    """Counts finished steps of one stage across worker threads and reports each count once, in order."""

    def __init__(self, on_progress: Progress | None, rnd: int, stage: str, total: int) -> None:
        self.on_progress, self.info, self.done = on_progress, {"round": rnd, "stage": stage, "total": total}, 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        if self.on_progress is None:
            return
        with self.lock:
            self.done += 1
            self.on_progress({**self.info, "done": self.done})


# --------------------------------------------------------------------------- clients

@dataclass
class ClientUpdate:
    """Everything a client sends: its adapter, its example count, and (alignment rounds) activity sums."""

    client: int
    adapter: dict[str, torch.Tensor]
    num_examples: int
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    def nbytes(self) -> int:
        return adapters.nbytes(self.adapter) + sum(adapters.nbytes(s) for s in self.stats.values())


def local_train(model: nn.Module, split: "data.EncodedSplit", epochs: int, batch_size: int, lr: float,
                max_grad_norm: float, seed: int, pad_id: int,
                recorder: align.ActivationRecorder | None = None, dropout: bool = False,
                stop: threading.Event | None = None, on_batch: Callable[[], None] | None = None,
                group_by_length: bool = False) -> None:
    """E epochs of AdamW on the client's shard (fresh optimiser, constant lr within the round).

    ``stop`` is checked before every batch (raising :class:`RoundStopped`), so Stop takes effect within one
    client step; ``on_batch()`` is called after every step (progress). ``group_by_length``: see
    :func:`data.length_grouped_batches`.

    ``dropout=False`` trains in eval mode: no dropout anywhere, so a client's update is a pure function of its
    inputs. Drawing dropout masks (``bernoulli_``) costs about a fifth of a CPU training step at this size.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train(dropout)
    if dropout:
        torch.manual_seed(seed)  # dropout masks
    device = model_device(model)
    for epoch in range(epochs):
        for batch in data.iterate_batches(split, batch_size, shuffle=True, seed=seed + epoch, pad_id=pad_id,
                                          group_by_length=group_by_length):
            check_stop(stop)
            batch = to_device(batch, device)
            if recorder is not None:
                recorder.set_mask(batch.get("attention_mask"))
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = F.cross_entropy(model(**inputs).logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            if on_batch is not None:
                on_batch()
    model.eval()


def client_update(cfg: FedConfig, setup: Setup, ws: Workspace, client: int, rnd: int,
                  global_state: dict[str, torch.Tensor], record_stats: bool,
                  device: nn.Module | None = None, stop: threading.Event | None = None,
                  on_batch: Callable[[], None] | None = None) -> ClientUpdate:
    """One client's round: load the global adapter into a device proxy, train, return the update."""
    t0 = time.perf_counter()
    model = device if device is not None else setup.devices[0]
    adapters.load_adapter_state(model, to_proxy_names(global_state, setup.proxy_layers))
    shard = ws.train.subset(ws.parts[client])
    recorder = align.ActivationRecorder(model, setup.compressed) if record_stats and setup.compressed else None
    with recorder if recorder is not None else contextlib.nullcontext():
        local_train(model, shard, cfg.local_epochs, cfg.batch_size, cfg.lr_at(rnd), cfg.max_grad_norm,
                    client_seed(cfg, rnd, client), ws.pad_id, recorder, dropout=cfg.dropout, stop=stop,
                    on_batch=on_batch, group_by_length=cfg.group_by_length)
    state = to_fm_names(adapters.adapter_state(model), setup.proxy_layers)
    return ClientUpdate(client, state, len(shard), recorder.stats if recorder else {}, time.perf_counter() - t0)


def client_seed(cfg: FedConfig, rnd: int, client: int) -> int:
    """The seed of ``client``'s data order (and dropout) in round ``rnd``: the same whichever model trains."""
    return (cfg.seed * 1_000_003 + rnd * 1009 + client) % 2**31


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

    ``extra`` jobs (the FM replay of the update disparity) share the same workers; their results follow the
    clients' updates in the returned list. With ``cfg.dropout`` everything takes turns: dropout masks come from
    torch's one global random generator. ``stop`` / ``on_progress``: see :func:`local_train` and :data:`Progress`
    (one tick per client batch).
    """
    extra = extra or []
    steps = sum(cfg.local_epochs * -(-len(ws.parts[k]) // cfg.batch_size) for k in clients)
    tick = _Ticker(on_progress, rnd, "train", steps)
    workers = (1 if cfg.dropout or not side_by_side(ws.device)   # on a GPU: one after another, one device proxy
               else max(1, min(workers or parallel.default_workers(), len(clients) + len(extra))))
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

    return parallel.run_jobs([job(k) for k in clients] + extra, workers)


# --------------------------------------------------------------------------- server side

@torch.no_grad()
def count_correct(model: nn.Module, batches: list[dict]) -> tuple[int, int]:
    """(correct predictions, examples) of ``model`` in eval mode on labelled ``batches``."""
    model.eval()
    correct = total = 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pred = model(**inputs).logits.argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += len(pred)
    return correct, total


def accuracy(model: nn.Module, batches: list[dict]) -> float:
    correct, total = count_correct(model, batches)
    return correct / max(1, total)


def sample_clients(cfg: FedConfig) -> list[list[int]]:
    """Pre-sampled client lists, one per round: identical for every method with the same seed and sizes."""
    rng = np.random.default_rng(cfg.seed + 12345)
    k = cfg.clients_per_round()
    return [sorted(rng.choice(cfg.data.clients, size=k, replace=False).tolist()) for _ in range(cfg.rounds)]


def _discrepancy_values(setup: Setup, d: discrepancy.Discrepancy | None) -> dict:
    """The round record's discrepancy fields; ``None`` for FedPETuning, whose proxy is an exact FM copy.

    Per-layer lists are indexed by FM layer (``None`` where the proxy shares no adapter with that layer), so
    FedOT's two adapter layers land in FM columns 0 and L-1 of every plot, not in columns 0 and 1.
    """
    n = models.num_layers(setup.fm)
    if d is None:
        return {"grad_cosine": 1.0, "grad_rel_l2": 0.0, "layer_cosine": [1.0] * n, "layer_rel_l2": [0.0] * n,
                "hidden_rel_mse": [0.0] * n, "logit_kl": 0.0}
    by_layer = {x["layer"]: x for x in d.per_layer}
    return {"grad_cosine": d.cosine, "grad_rel_l2": d.rel_l2,
            "layer_cosine": [by_layer[i]["cosine"] if i in by_layer else None for i in range(n)],
            "layer_rel_l2": [by_layer[i]["rel_l2"] if i in by_layer else None for i in range(n)],
            "hidden_rel_mse": d.hidden_rel_mse, "logit_kl": d.logit_kl}


def _discrepancy(setup: Setup, ws: Workspace) -> dict:
    """Gradient discrepancy of the adapters already loaded in the FM and the server's proxy, in one pass."""
    if setup.proxy_is_fm:
        return _discrepancy_values(setup, None)
    return _discrepancy_values(setup, gradient_discrepancy(setup.fm, setup.server_proxy, ws.probe_batches,
                                                           proxy_layers=setup.proxy_layers))


def evaluate(setup: Setup, ws: Workspace, global_state: dict[str, torch.Tensor], workers: int | None = None,
             fm: bool = True, stop: threading.Event | None = None, on_progress: Progress | None = None,
             rnd: int = 0, stage: str = "evaluate") -> dict:
    """The round's measurements of ``global_state``: plug-in accuracy of the FM (``fm=False`` skips it), the
    proxy's own accuracy and the gradient discrepancy between the two.

    Evaluation costs nearly as many FLOPs as a round of client training (300 test examples through two models
    against 600 training examples through the proxy), so it runs side by side like the clients: one job per
    probe batch of the discrepancy, and the test batches dealt out in small chunks per model. Every job is
    single-threaded and the parts are combined in a fixed order, so the numbers do not depend on ``workers``.
    ``stop`` is checked before each job (:class:`RoundStopped`); ``on_progress`` hears of each finished job.
    """
    setup.load_global(global_state, fm=fm)  # before the jobs start: they share these models read-only
    workers = max(1, workers or parallel.default_workers()) if side_by_side(ws.device) else 1
    to_score: dict[str, nn.Module] = {"accuracy": setup.fm} if fm else {}
    if not setup.proxy_is_fm:
        to_score["sub_accuracy"] = setup.server_proxy
    layer_map = discrepancy.layer_map(setup.proxy_layers)
    jobs: list[Callable[[], object]] = ([] if setup.proxy_is_fm else
                                        [functools.partial(discrepancy.batch_terms, setup.fm, setup.server_proxy,
                                                           batch, layer_map) for batch in ws.probe_batches])
    keys = ["probe"] * len(jobs)
    n_chunks = 1 if workers == 1 else 2 * workers  # small chunks balance the load between the workers
    for key, model in to_score.items():
        for i in range(n_chunks):
            if ws.test_batches[i::n_chunks]:
                jobs.append(functools.partial(count_correct, model, ws.test_batches[i::n_chunks]))
                keys.append(key)
    if stop is not None or on_progress is not None:
        tick = _Ticker(on_progress, rnd, stage, len(jobs))
        jobs = [functools.partial(_checked_job, job, stop, tick) for job in jobs]
    results = parallel.run_jobs(jobs, workers)
    terms = [r for k, r in zip(keys, results) if k == "probe"]
    with parallel.single_threaded_ops():  # its float64 reductions would otherwise round with the thread count
        out = _discrepancy_values(setup, None if setup.proxy_is_fm else discrepancy.combine(terms))
    for key in to_score:
        counts = [r for k, r in zip(keys, results) if k == key]
        out[key] = sum(c for c, _ in counts) / max(1, sum(t for _, t in counts))
    if setup.proxy_is_fm and fm:
        out["sub_accuracy"] = out["accuracy"]
    return out


def _checked_job(job: Callable[[], object], stop: threading.Event | None, tick: Callable[[], None]) -> object:
    check_stop(stop)
    result = job()
    tick()
    return result


_atomic_json = io.atomic_json  # the old name, still imported by compare and cli


@dataclass
class RunState:
    """What a checkpoint must hold to continue a run exactly where it stopped."""

    next_round: int
    global_state: dict[str, torch.Tensor]
    package: dict[str, torch.Tensor]           # W_fro slices waiting to be broadcast next round
    server_ffn: dict[str, torch.Tensor]
    device_ffn: dict[str, torch.Tensor]
    records: list[dict]
    # W_fro accounting: the neurons each alignment changed (layer -> indices), and for every client that has
    # taken part, how many of those alignments its copy of the proxy already holds.
    alignments: list[dict[int, list[int]]] = field(default_factory=list)
    synced: dict[int, int] = field(default_factory=dict)


def weights_download(setup: Setup, state: RunState, client: int) -> int:
    """Bytes of frozen proxy weights ``client`` must download before training this round.

    A client's first round: the whole proxy. Later: the union of what every alignment since its last round
    changed (a client that missed two alignments gets both changes, each neuron's slice once, at its latest
    value). This is an exact count of what a real deployment must send; the simulation itself simply keeps
    every device proxy at the server's latest weights.
    """
    if client not in state.synced:
        return setup.frozen_bytes()
    missed = state.alignments[state.synced[client]:]
    if not missed:
        return 0
    union: dict[int, set[int]] = {}
    for changed in missed:
        for layer, idx in changed.items():
            union.setdefault(int(layer), set()).update(idx)
    slices = {layer: torch.tensor(sorted(idx), dtype=torch.long) for layer, idx in union.items()}
    return adapters.nbytes(align.weight_package(models.unwrap(setup.server_proxy), slices))


def summary(cfg: FedConfig, setup: Setup, records: list[dict], ws: Workspace | None = None,
            startup: dict | None = None) -> dict:
    """The metrics file. ``final_accuracy`` (the last round's) is the headline; ``best_accuracy`` is the best
    round *picked on the test set*, an optimistic number kept for comparison with papers that may report it.
    ``startup``: how long this session took to reach round 0 (see :func:`iterate`)."""
    accs = [r["accuracy"] for r in records if r["round"] > 0]
    trainable = sum(v.numel() for v in setup.init_state.values())
    return {
        "config": cfg.to_json(),
        "method": cfg.method,
        "code_version": code_version(),
        "examples": ({"train": len(ws.train), "test": len(ws.test), "public": len(ws.public),
                      "probe": sum(len(b["labels"]) for b in ws.probe_batches)} if ws is not None else None),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "params": {"fm_transformer": setup.fm_params, "sub_transformer": setup.proxy_params,
                   "trainable": trainable,
                   # what a client downloads once: its proxy's frozen weights; and what shipping the FM would cost
                   "proxy_frozen_bytes": setup.frozen_bytes(),
                   "fm_frozen_bytes": adapters.nbytes(p for p in setup.fm.parameters() if not p.requires_grad)},
        "cost": {"bytes_up": sum(r["bytes_up"] for r in records), "bytes_down": sum(r["bytes_down"] for r in records),
                 "bytes_down_weights": sum(r.get("bytes_down_weights", 0) for r in records),
                 "client_seconds": sum(r["client_seconds"] for r in records),
                 "seconds": sum(r["seconds"] for r in records)},
        "distill_loss": setup.distill_loss,
        "device": str(ws.device) if ws is not None else None,
        "startup": startup,
        "rounds": records,
    }


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


def cached_run(cfg: FedConfig, ws: Workspace | None = None, progress: bool = True,
               stop: threading.Event | None = None, on_round: Callable[[dict], None] | None = None,
               workers: int | None = None, on_progress: Progress | None = None) -> dict:
    """:func:`run` with its results kept under the cache, keyed by the configuration.

    The labs call this so a run finished in one notebook (or an interrupted one) is reused, not redone:
    a complete run returns at once, a partial one resumes.
    """
    from . import paths

    # Only what can change this method's result (FedPFT-B's key has no alignment fields), plus the code's results
    # version and the library-level choices FedConfig does not name (e.g. which layers distillation matches).
    key = paths.config_key({"config": result_config(cfg), "code": code_version()["results"], "schema": METRICS_SCHEMA,
                            "distill": asdict(cfg.distill_config()) if cfg.distil_before else None,
                            "align": asdict(cfg.align_config(1)) if cfg.align_during else None})
    out = paths.cache_dir() / "runs" / f"{cfg.method}-{key}"
    done = out / "metrics.json"
    what = f"the cached {METHOD_NAMES[cfg.method]} run"
    with io.cache_lock(out, what) as lock:  # two notebooks asking for the same run: one runs it, the other waits
        metrics = io.read_cache(done, io.load_json, what, _is_metrics)
        if metrics is not None and len(metrics["rounds"]) == cfg.rounds + 1:
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
    blob = _read_checkpoint(out, cfg) if resume and out is not None else None  # before any long work
    setup = build_setup(cfg, ws, progress=progress, stop=stop, on_progress=on_progress)
    state = RunState(0, dict(setup.init_state), {}, {}, {}, [])
    if blob is not None:
        state = _load_checkpoint(blob, setup)
    _Ticker(on_progress, state.next_round, "setup", 1)()    # models built: the first sign of life of a run
    schedule = sample_clients(cfg)
    startup = startup_times(t_enter)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.rounds, initial=max(0, state.next_round - 1), desc=METHOD_NAMES[cfg.method],
               disable=not progress)
    try:
        if state.next_round > cfg.rounds:  # resumed a finished run: report it (and restore its metrics.json)
            metrics = summary(cfg, setup, state.records, ws, startup)
            if out is not None:
                _atomic_json(metrics, out / "metrics.json")
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
            metrics = summary(cfg, setup, state.records, ws, startup)
            if out is not None:
                _save(out, cfg, setup, state, metrics)
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
    record: dict = {"round": rnd, "clients": clients, "lr": cfg.lr_at(rnd) if rnd else 0.0, "aligned": False,
                    "bytes_up": 0, "bytes_down": 0, "bytes_down_weights": 0, "client_seconds": 0.0,
                    "train_seconds": 0.0}
    if rnd > 0:
        if state.package:  # the latest W_fro rides along with this round's broadcast (see weights_download)
            for device in setup.devices:
                align.apply_weight_package(models.unwrap(device), state.package)
            state.package = {}
        weights = [weights_download(setup, state, k) for k in clients]
        state.synced.update({k: len(state.alignments) for k in clients})
        aligning = cfg.aligns_in(rnd)
        measure = cfg.measure_update and not setup.proxy_is_fm
        start = state.global_state
        extra = [functools.partial(fm_update, cfg, setup, ws, clients[0], rnd, start, stop)] if measure else []
        t_train = time.perf_counter()
        results = train_clients(cfg, setup, ws, clients, rnd, start, aligning, workers, extra=extra, stop=stop,
                                on_progress=on_progress)
        updates: list[ClientUpdate] = results[:len(clients)]
        record["train_seconds"] = time.perf_counter() - t_train  # wall time; client_seconds adds up every client's
        adapter_down = adapters.nbytes(to_proxy_names(start, setup.proxy_layers))
        record["bytes_down_weights"] = sum(weights)
        record["bytes_down"] = len(clients) * adapter_down + sum(weights)
        record["bytes_up"] = sum(u.nbytes() for u in updates)
        record["client_seconds"] = sum(u.seconds for u in updates)
        if measure:
            cos, rel = discrepancy.update_disparity(start, updates[0].adapter, results[-1])
            record.update(update_client=clients[0], update_cosine=cos, update_rel_l2=rel)
        state.global_state = adapters.fedavg([u.adapter for u in updates], [u.num_examples for u in updates])
    t_eval = time.perf_counter()
    record.update(evaluate(setup, ws, state.global_state, workers, stop=stop, on_progress=on_progress, rnd=rnd))
    record["eval_seconds"] = time.perf_counter() - t_eval
    if rnd > 0 and cfg.aligns_in(rnd):
        t_align = time.perf_counter()
        stats = align.merge_stats([u.stats for u in updates])
        updated = align.choose_updated(stats, cfg.align_proportion, cfg.align_rule, seed=cfg.seed + rnd)
        tick = _Ticker(on_progress, rnd, "align", cfg.align_steps)
        result = align.align_neurons(setup.fm, setup.server_proxy, ws.public, updated, cfg.align_config(rnd),
                                     on_step=lambda step, loss: tick(), stop=stop)
        check_stop(stop)
        state.package = align.weight_package(models.unwrap(setup.server_proxy), updated)
        state.alignments.append({int(layer): idx.tolist() for layer, idx in updated.items()})
        record["aligned"] = True
        record["align_loss"] = result.losses
        record["align_seconds"] = time.perf_counter() - t_align
        before = {k: record[k] for k in ("grad_cosine", "grad_rel_l2", "layer_cosine", "sub_accuracy")}
        record["before_align"] = before
        record.update(evaluate(setup, ws, state.global_state, workers, fm=False, stop=stop, on_progress=on_progress,
                               rnd=rnd, stage="evaluate aligned"))
    record["seconds"] = time.perf_counter() - t0
    return record


# --------------------------------------------------------------------------- persistence

def _save(out: Path, cfg: FedConfig, setup: Setup, state: RunState, metrics: dict) -> None:
    atomic_save({"config": json.dumps(cfg.to_json(), sort_keys=True), "next_round": state.next_round,
                 "global_state": state.global_state, "package": state.package,
                 "server_ffn": ffn_state(models.unwrap(setup.server_proxy), setup.compressed),
                 "device_ffn": ffn_state(models.unwrap(setup.devices[0]), setup.compressed),
                 "records": json.dumps(state.records), "alignments": json.dumps(state.alignments),
                 "synced": json.dumps(state.synced)}, out / "checkpoint.pt")
    _atomic_json(metrics, out / "metrics.json")


CHECKPOINT_KEYS = {"config", "next_round", "global_state", "package", "server_ffn", "device_ffn", "records"}


def _is_checkpoint(blob: dict) -> bool:
    return CHECKPOINT_KEYS <= blob.keys() and isinstance(json.loads(blob["records"]), list)


def _is_metrics(metrics: dict) -> bool:
    return isinstance(metrics["rounds"], list)


def _read_checkpoint(out: Path, cfg: FedConfig) -> dict | None:
    """The checkpoint ``--resume`` continues from (None: the folder holds no run yet).

    A checkpoint or metrics.json that cannot be read stops the run with one line naming the file: they are
    the participant's results, so they are neither deleted nor overwritten.
    """
    if not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists():
        return None
    if (out / "metrics.json").exists():
        io.read_run_file(out / "metrics.json", io.load_json, _is_metrics)
    blob = io.read_run_file(out / "checkpoint.pt", io.load_torch, _is_checkpoint)
    if result_config(FedConfig.from_json(json.loads(blob["config"]))) != result_config(cfg):
        raise ConfigError(f"--resume: {out} holds a run with a different configuration; use another --out "
                          "or the same arguments")   # fields that cannot change this method's result may differ
    return blob


def _load_checkpoint(blob: dict, setup: Setup) -> RunState:
    load_ffn_state(models.unwrap(setup.server_proxy), blob["server_ffn"])
    for device in setup.devices:
        load_ffn_state(models.unwrap(device), blob["device_ffn"])
    if "synced" not in blob:
        raise ConfigError(f"--resume: {out / 'checkpoint.pt'} was written by an older version of the lab; "
                          "start afresh with another --out")
    alignments = [{int(k): v for k, v in a.items()} for a in json.loads(blob["alignments"])]
    synced = {int(k): v for k, v in json.loads(blob["synced"]).items()}
    return RunState(blob["next_round"], blob["global_state"], blob["package"], blob["server_ffn"],
                    blob["device_ffn"], json.loads(blob["records"]), alignments, synced)
