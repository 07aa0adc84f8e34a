"""What the server does: build the models, sample, broadcast, aggregate, evaluate, align, account bytes, record.

A round, as the server sees it (``rnd == 0``: evaluate A_0 only, the reference point of every curve)::

    open_round:  the round record and one Broadcast per sampled client (global adapter in the proxy's layer
                 names, lr, seed, record_stats; an engine that ships weights also gets each client's W_fro package)
    (the engine delivers them and brings back one ClientUpdate per client, in client order)
    close_round: FedAvg weighted by example counts -> plug into the FM and evaluate; every t rounds (FedPFT,
                 FedPFT-D) neuron-level alignment of the server's proxy copy -> the W_fro package of the next round

The server calls the one implementation of each FedPFT step: FM <-> proxy renaming, FedAvg and byte counting
(:mod:`fedpft_lab.adapters`), alignment (:mod:`fedpft_lab.align`), LoRA wrapping (:mod:`.proxy`).
"""
from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .. import adapters, align, discrepancy, models, parallel, subfm
from ..adapters import to_fm_names, to_proxy_names
from ..config import FedConfig
from ..device import side_by_side
from ..discrepancy import gradient_discrepancy
from ..version import code_version
from ..workspace import Workspace, sub_fm
from .messages import Broadcast, ClientUpdate, TrainSettings
from .progress import Progress, StopSignal, Ticker, check_stop
from .proxy import frozen_state as frozen_weights, wrap_pair


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

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Those frozen weights by name, on the CPU: what an engine ships to a client's first round."""
        return frozen_weights(self.server_proxy)

    def ensure_devices(self, n: int) -> list[nn.Module]:
        """At least ``n`` device proxies, new ones copied from the first (frozen weights included)."""
        while len(self.devices) < n:
            self.devices.append(copy.deepcopy(self.devices[0]))
        return self.devices[:n]


def build_setup(cfg: FedConfig, ws: Workspace, progress: bool = True, stop: StopSignal | None = None,
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
        tick = Ticker(on_progress, 0, "distill", steps)
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
    fm, server_proxy = wrap_pair(ws.fm, proxy, lora, cfg.seed, adapter_layers, proxy_layers)
    devices = [copy.deepcopy(server_proxy)]
    init_state = adapters.adapter_state(fm)
    return Setup(fm, server_proxy, devices, proxy_layers, compressed, init_state, loss, fm_params, proxy_params,
                 proxy_is_fm=cfg.proxy_kind == "fm")


# --------------------------------------------------------------------------- stop and progress inside a round


# --------------------------------------------------------------------------- who trains, with what

def client_seed(cfg: FedConfig, rnd: int, client: int) -> int:
    """The seed of ``client``'s data order (and dropout) in round ``rnd``: the same whichever model trains."""
    return (cfg.seed * 1_000_003 + rnd * 1009 + client) % 2**31



def sample_clients(cfg: FedConfig) -> list[list[int]]:
    """Pre-sampled client lists, one per round: identical for every method with the same seed and sizes."""
    rng = np.random.default_rng(cfg.seed + 12345)
    k = cfg.clients_per_round()
    return [sorted(rng.choice(cfg.data.clients, size=k, replace=False).tolist()) for _ in range(cfg.rounds)]



# --------------------------------------------------------------------------- evaluation

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
             fm: bool = True, stop: StopSignal | None = None, on_progress: Progress | None = None,
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
    layer_map = adapters.layer_key_map(setup.proxy_layers)
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
        tick = Ticker(on_progress, rnd, stage, len(jobs))
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


def _checked_job(job: Callable[[], object], stop: StopSignal | None, tick: Callable[[], None]) -> object:
    check_stop(stop)
    result = job()
    tick()
    return result


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
    # How long the session that started the run took to reach round 0; kept by a resume, so a metrics.json
    # rebuilt from the checkpoint is the one the run wrote.
    startup: dict = field(default_factory=dict)


def weights_update(setup: Setup, state: RunState, client: int) -> dict[str, torch.Tensor] | None:
    """The frozen proxy weights ``client`` lacks before training this round (``None``: all of them).

    A client's first round: the whole proxy (``None``; see :meth:`Setup.frozen_state`). Later: the W_fro slices of
    every alignment since its last round, each neuron's slice once, at its latest value (empty if it missed none).
    """
    if client not in state.synced:
        return None
    missed = state.alignments[state.synced[client]:]
    if not missed:
        return {}
    union: dict[int, set[int]] = {}
    for changed in missed:
        for layer, idx in changed.items():
            union.setdefault(int(layer), set()).update(idx)
    slices = {layer: torch.tensor(sorted(idx), dtype=torch.long) for layer, idx in union.items()}
    return align.weight_package(models.unwrap(setup.server_proxy), slices)


def weights_download(setup: Setup, state: RunState, client: int) -> int:
    """Bytes of frozen proxy weights ``client`` must download before training this round (see
    :func:`weights_update`): an exact count of what a real deployment sends; the in-process engine itself simply
    keeps every device proxy at the server's latest weights."""
    missing = weights_update(setup, state, client)
    return setup.frozen_bytes() if missing is None else adapters.nbytes(missing)


# --------------------------------------------------------------------------- one round

def train_settings(cfg: FedConfig, setup: Setup) -> TrainSettings:
    """What every client is told once: how to train, and which layers' activity to record when a broadcast asks."""
    return TrainSettings(cfg.local_epochs, cfg.batch_size, cfg.max_grad_norm, cfg.dropout, tuple(setup.compressed),
                         cfg.group_by_length)


def open_round(cfg: FedConfig, setup: Setup, state: RunState, rnd: int, clients: list[int],
               ship_weights: bool = False) -> tuple[dict, list[Broadcast]]:
    """The round's record (bytes down counted) and one broadcast per sampled client; marks them synced.

    ``ship_weights``: put each returning client's missing W_fro slices into its broadcast (an engine whose
    clients keep their own proxies); a first-time client gets none, its engine sends :meth:`Setup.frozen_state`.
    Without it the engine keeps its client proxies at the server's weights itself (the in-process engine).
    """
    record: dict = {"round": rnd, "clients": clients, "lr": cfg.lr_at(rnd) if rnd else 0.0, "aligned": False,
                    "bytes_up": 0, "bytes_down": 0, "bytes_down_weights": 0, "client_seconds": 0.0,
                    "train_seconds": 0.0}
    if rnd == 0:
        return record, []
    missing = [weights_update(setup, state, k) for k in clients]
    weights = [setup.frozen_bytes() if m is None else adapters.nbytes(m) for m in missing]
    state.synced.update({k: len(state.alignments) for k in clients})
    adapter = to_proxy_names(state.global_state, setup.proxy_layers)
    record["bytes_down_weights"] = sum(weights)
    record["bytes_down"] = len(clients) * adapters.nbytes(adapter) + sum(weights)
    aligning = cfg.aligns_in(rnd)
    broadcasts = [Broadcast(rnd, k, adapter, cfg.lr_at(rnd), client_seed(cfg, rnd, k), aligning,
                            (m or {}) if ship_weights else {}) for k, m in zip(clients, missing)]
    return record, broadcasts


def receive(update: ClientUpdate, setup: Setup) -> ClientUpdate:
    """A client's update with its adapter renamed to the FM's layer names (what the server aggregates)."""
    return replace(update, adapter=to_fm_names(update.adapter, setup.proxy_layers))


def aggregate(state: RunState, record: dict, updates: list[ClientUpdate]) -> None:
    """Bytes up and client time into ``record``; FedAvg of ``updates`` (in client order) into the global adapter."""
    record["bytes_up"] = sum(u.nbytes() for u in updates)
    record["client_seconds"] = sum(u.seconds for u in updates)
    state.global_state = adapters.fedavg([u.adapter for u in updates], [u.num_examples for u in updates])


def close_round(cfg: FedConfig, setup: Setup, ws: Workspace, state: RunState, rnd: int, record: dict,
                updates: list[ClientUpdate], t0: float, workers: int | None = None, stop: StopSignal | None = None,
                on_progress: Progress | None = None) -> dict:
    """Evaluate the round's global adapter (already aggregated, see :func:`aggregate`) and, in an alignment
    round, align the server's proxy on the clients' statistics; the W_fro package waits in ``state.package``.
    ``t0``: when the round began (``perf_counter``)."""
    t_eval = time.perf_counter()
    record.update(evaluate(setup, ws, state.global_state, workers, stop=stop, on_progress=on_progress, rnd=rnd))
    record["eval_seconds"] = time.perf_counter() - t_eval
    if rnd > 0 and cfg.aligns_in(rnd):
        t_align = time.perf_counter()
        stats = align.merge_stats([u.stats for u in updates])
        updated = align.choose_updated(stats, cfg.align_proportion, cfg.align_rule, seed=cfg.seed + rnd)
        tick = Ticker(on_progress, rnd, "align", cfg.align_steps)
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

