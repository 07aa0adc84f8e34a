"""``fedpft-lab bench``: how fast is the lab on this machine, and is the sub-FM really cheaper to train?

FedPFT's promise is that clients fine-tune a *smaller* proxy. Whether that shows up as wall-clock time
depends on where a training step spends its time: matmuls shrink with the FFN, but dropout, attention,
LoRA side paths and Python overhead do not. So the bench measures, in one process:

1. the machine: cores, threads and the dense fp32 matmul rate (the "peak" a step could reach);
2. client training throughput of the FM and of sub-FMs (keep 1.0 / 0.5 / 0.25) by timing
   :func:`federation.local_train` itself on a fixed shard of real tweets, as many clients side by side as
   a round runs, with the FLOPs of the very same batches counted by ``FlopCounterMode``, hence achieved
   FLOP/s and the fraction of peak;
3. sub-FM / FM step time next to the FLOP and transformer-parameter ratios; clients side by side against
   one after another, and what dropout would cost;
4. layer-level distillation steps/s;
5. the wall time of federated rounds (evaluation-only round 0, training rounds 1-2), setup fresh and cached;
6. peak memory; 7. the wall time of every lab notebook (SMOKE and default) with papermill.

``--only clients-scaling`` measures one more thing on its own: peak memory and time per round of the same
2-round run with 20, 200 and 2000 clients (the same number of them per round), each in a fresh process.
Only the sampled clients of a round hold a model and an optimiser, so both should stay flat.

``--only default-speed`` times the warm default ``fedpft-lab run`` three ways in one bench run, as whole commands
in fresh processes: the code of ``--baseline`` (a git revision, run with its own CLI) and this code with random and
with length-grouped client batches (the default); it adds the padding share and the run's FLOP efficiency.

Every figure depends on what else the machine is doing; the load average is recorded next to them.
The bench measures the CPU (device="cpu"), the machine the lab is built for.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from . import adapters, data, federation, io, models, parallel, subfm
from .config import ENGINES
from .core.proxy import wrap_proxy
from .distill import DistillConfig, distill, embed
from .paths import LABS_DIR, cache_dir, lab_notebooks
from .workspace import DataConfig, Workspace, prepare

KEEP_RATIOS = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of every measurement. ``quick`` shrinks them so the bench itself is a smoke test."""

    data: DataConfig = field(default_factory=lambda: DataConfig(device="cpu"))
    fed: federation.FedConfig | None = None   # None: the workshop default on ``data``
    keep_ratios: tuple[float, ...] = KEEP_RATIOS
    shard_size: int = 160        # examples per timed local_train call (batch size: the FedConfig's)
    repeats: int = 3             # timed local_train calls per model; the fastest is reported
    matmul_seconds: float = 0.5  # per matmul repetition
    matmul_repeats: int = 5
    distill_steps: int = 30
    rounds: int = 3              # training rounds timed after the evaluation-only round 0 (round 2 aligns)
    clients: int | None = None   # clients trained side by side; None: as a run does (one per CPU core)

    def fed_config(self) -> federation.FedConfig:
        return self.fed if self.fed is not None else federation.FedConfig(data=self.data)

    def workers(self) -> int:
        return self.clients or parallel.default_workers()


def bench_config(fm: str = models.DEFAULT_FM, quick: bool = False) -> BenchConfig:
    """The full bench on the workshop default, or a quick one (smaller shards, data and budgets)."""
    if fm in models.TINY_FMS:  # tests: a tiny model on a handful of tweets
        d = DataConfig(fm=fm, clients=4, max_train=160, max_test=64, public_blocks=64, block_size=32,
                       probe_batches=2, probe_batch_size=8, device="cpu")
        fed = federation.FedConfig(data=d, rounds=2, distill_steps=2, align_steps=1, align_batch_size=4)
        return BenchConfig(data=d, fed=fed, shard_size=32, repeats=1, matmul_seconds=0.02, matmul_repeats=1,
                           distill_steps=2)
    if not quick:
        return BenchConfig(data=DataConfig(fm=fm, device="cpu"))
    d = DataConfig(fm=fm, max_train=400, max_test=64, public_blocks=128, device="cpu")
    fed = federation.FedConfig(data=d, distill_steps=5, align_steps=2)
    return BenchConfig(data=d, fed=fed, shard_size=32, repeats=1, matmul_seconds=0.2, matmul_repeats=2,
                       distill_steps=5)


# --------------------------------------------------------------------------- 1. machine

def matmul_rate(m: int, k: int, n: int, seconds: float, repeats: int) -> float:
    """Best sustained fp32 FLOP/s of ``[m, k] @ [k, n]`` over ``repeats`` windows of about ``seconds``."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    flops = 2.0 * m * k * n
    for _ in range(3):  # warm-up: thread pool start, MKL/oneDNN kernel selection
        a @ b
    best = 0.0
    for _ in range(repeats):
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or count == 0:
            a @ b
            count += 1
        best = max(best, flops * count / elapsed)
    return best


def machine_info(cfg: BenchConfig) -> dict:
    """Cores, threads, versions, load, and the matmul rates that the step FLOP/s are compared with."""
    import psutil

    s, r = cfg.matmul_seconds, cfg.matmul_repeats
    large = matmul_rate(1024, 1024, 1024, s, r)
    workload = matmul_rate(16 * 32, 384, 1536, s, r)  # a batch of tweets through MiniLM's FFN up-projection
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy machine shows up as 1 thread beating all of them
    try:
        single = matmul_rate(1024, 1024, 1024, s, r)
    finally:
        torch.set_num_threads(threads)
    return {
        "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "torch_version": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_start": list(os.getloadavg()),
        "matmul_flops": {"1024x1024@1024x1024": large, "512x384@384x1536": workload,
                         "1024x1024@1024x1024 (1 thread)": single},
        "peak_flops": large,
    }


# --------------------------------------------------------------------------- 2-3. client training

def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the fused CPU one that sdpa uses without
# dropout (eval mode); without these two entries attention would silently count as zero FLOPs.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def train_step_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one ``local_train`` step on ``batch`` (eval mode, as clients train without dropout): forward +
    backward (AdamW's elementwise work is negligible next to them). Gradients are discarded, parameters are
    left untouched."""
    was_training = model.training
    model.eval()
    try:
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            F.cross_entropy(model(**inputs).logits, batch["labels"]).backward()
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def step_clock(model: nn.Module) -> Iterator[list[float]]:
    """Timestamps of every forward call of ``model``: consecutive differences are step times of a loop
    that calls the model once per step (``local_train``), batching and optimiser included."""
    stamps: list[float] = []
    handle = model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        yield stamps
    finally:
        handle.remove()


def shard_batches(split: data.EncodedSplit, batch_size: int, seed: int, pad_id: int) -> list[dict]:
    """The batches ``local_train`` sees in its first epoch with this seed (same shuffle, same padding)."""
    return list(data.iterate_batches(split, batch_size, shuffle=True, seed=seed, pad_id=pad_id))


def padding_fraction(batches: list[dict]) -> float:
    """Share of the computed token positions that are padding."""
    real = sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b)
    total = sum(b["attention_mask"].numel() for b in batches if "attention_mask" in b)
    return 1.0 - real / total if total else 0.0


@dataclass
class Timing:
    """One timed ``local_train`` epoch: wall and process-CPU seconds, and the per-step wall times.

    CPU time counts every thread of the process (spin-waiting included); with one thread it is the work
    itself, which other jobs on the machine cannot inflate the way they inflate wall time."""

    wall: float
    cpu: float
    steps: list[float]


def _shape(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple((batch["input_ids"] if "input_ids" in batch else batch["pixel_values"]).shape)


def epoch_flops(model: nn.Module, batches: list[dict]) -> int:
    """Training FLOPs of one pass over ``batches``. FLOPs depend on shapes only, so each shape is counted once."""
    by_shape: dict[tuple, int] = {}
    for b in batches:
        if _shape(b) not in by_shape:
            by_shape[_shape(b)] = train_step_flops(model, b)
    return sum(by_shape[_shape(b)] for b in batches)


def time_clients(copies: list[nn.Module], shard: data.EncodedSplit, pad_id: int, batch_size: int, lr: float,
                 seed: int = 0, dropout: bool = False) -> Timing:
    """One epoch of the real ``federation.local_train`` on ``shard`` by every model in ``copies`` side by
    side, one thread each, as :func:`federation.train_clients` runs a round's clients; step stamps of the first."""
    jobs = [functools.partial(federation.local_train, m, shard, 1, batch_size, lr, 1.0, seed, pad_id, dropout=dropout)
            for m in copies]
    cpu, t0 = time.process_time(), time.perf_counter()
    with step_clock(copies[0]) as stamps:
        parallel.run_jobs(jobs, workers=len(copies))
    end = time.perf_counter()
    return Timing(end - t0, time.process_time() - cpu, np.diff([*stamps, end]).tolist())


def throughput_record(timings: list[Timing], examples: int, batches: list[dict], flops: int,
                      peak_flops: float | None, clients: int = 1) -> dict:
    """Figures of the fastest repetition (the one least disturbed by other work on the machine).

    ``clients`` copies trained ``batches`` at the same time: examples and FLOPs count all of them, step
    times are one client's."""
    best = min(timings, key=lambda t: t.wall)
    out = {"clients_side_by_side": clients, "examples": examples * clients, "batch_size": len(batches[0]["labels"]),
           "steps": len(batches), "seconds": best.wall, "cpu_seconds": best.cpu,
           "seconds_all": [t.wall for t in timings],
           "examples_per_s": examples * clients / best.wall, "step_ms_mean": 1e3 * best.wall / len(batches),
           "step_ms_median": 1e3 * float(np.median(best.steps)), "step_ms_min": 1e3 * min(best.steps),
           "cpu_ms_per_step": 1e3 * best.cpu / (len(batches) * clients),
           "flops_per_step": flops / len(batches), "flops_per_s": flops * clients / best.wall,
           "padding_fraction": padding_fraction(batches)}
    if peak_flops:
        out["fraction_of_peak"] = out["flops_per_s"] / peak_flops
    return out


def client_throughput(model: nn.Module, shard: data.EncodedSplit, pad_id: int, batch_size: int = 8,
                      repeats: int = 3, peak_flops: float | None = None, seed: int = 0, lr: float = 2e-3,
                      clients: int = 1) -> dict:
    """Time ``federation.local_train`` on ``shard`` (one epoch, ``repeats`` times, fastest kept) by ``clients``
    copies of ``model`` side by side, and count the FLOPs of the same batches."""
    return training_throughputs({"model": model}, shard, pad_id, batch_size, repeats, peak_flops, seed, lr,
                                clients)["model"]


def training_throughputs(named: dict[str, nn.Module], shard: data.EncodedSplit, pad_id: int, batch_size: int,
                         repeats: int, peak_flops: float | None, seed: int = 0, lr: float = 2e-3,
                         clients: int = 1) -> dict:
    """:func:`client_throughput` for several models, repetitions interleaved (A B C, A B C, ...) so that a
    burst of load from other processes hits all of them alike instead of skewing their ratio."""
    batches = shard_batches(shard, batch_size, seed, pad_id)
    flops = {name: epoch_flops(m, batches) for name, m in named.items()}
    copies = {name: [m, *(copy.deepcopy(m) for _ in range(clients - 1))] for name, m in named.items()}
    warm = shard.subset(np.arange(min(len(shard), 2 * batch_size)))
    for cs in copies.values():  # allocator, kernel selection, lazily built peft/transformers state
        time_clients(cs, warm, pad_id, batch_size, lr, seed)
    timings: dict[str, list[Timing]] = {name: [] for name in named}
    for _ in range(repeats):
        for name, cs in copies.items():
            timings[name].append(time_clients(cs, shard, pad_id, batch_size, lr, seed))
    return {name: {**throughput_record(timings[name], len(shard), batches, flops[name], peak_flops, clients),
                   "transformer_params": models.transformer_params(m)} for name, m in named.items()}


def lora_proxy(ws: Workspace, keep_ratio: float | None) -> nn.Module:
    """FM (``keep_ratio=None``) or sub-FM with the lab's default LoRA, as a client trains it."""
    base = ws.fm if keep_ratio is None else subfm.build_sub_fm(ws.fm, subfm.SubFMConfig(keep_ratio=keep_ratio))[0]
    return wrap_proxy(copy.deepcopy(base), adapters.LoRAConfig(), seed=0)


def training_bench(ws: Workspace, cfg: BenchConfig, peak_flops: float | None) -> dict:
    """Throughput of the FM and of every sub-FM in ``cfg.keep_ratios`` on the same shard of real tweets,
    trained the way a round trains its clients: ``workers`` of them side by side, one thread each."""
    shard = ws.train.subset(np.arange(min(cfg.shard_size, len(ws.train))))
    fed = cfg.fed_config()
    keeps = {"fm": None, **{f"sub_{k:g}": k for k in cfg.keep_ratios}}
    named = {name: lora_proxy(ws, keep) for name, keep in keeps.items()}
    results = training_throughputs(named, shard, ws.pad_id, fed.batch_size, cfg.repeats, peak_flops, lr=fed.lr,
                                   clients=cfg.workers())
    return {name: {"keep_ratio": keep_ratio, **r} for (name, keep_ratio), r in zip(keeps.items(), results.values())}


def time_sequential(model: nn.Module, shard: data.EncodedSplit, pad_id: int, batch_size: int, lr: float,
                    clients: int, dropout: bool = False) -> float:
    """Wall time of ``clients`` epochs of ``local_train`` one after another, at the current thread setting."""
    t = time.perf_counter()
    for _ in range(clients):
        federation.local_train(model, shard, 1, batch_size, lr, 1.0, 0, pad_id, dropout=dropout)
    return time.perf_counter() - t


def schedule_bench(ws: Workspace, cfg: BenchConfig) -> dict:
    """Three ways to train ``workers`` clients of the sub-FM (keep 0.25), interleaved, fastest of each kept:
    one after another on one thread, one after another on all threads (the lab before it ran clients side
    by side), and side by side on one thread each (what :func:`federation.train_clients` does). Also the
    cost of dropout: a side-by-side round with the official code's dropout on."""
    shard = ws.train.subset(np.arange(min(cfg.shard_size, len(ws.train))))
    fed, workers, threads = cfg.fed_config(), cfg.workers(), torch.get_num_threads()
    model = lora_proxy(ws, 0.25)
    copies = [model, *(copy.deepcopy(model) for _ in range(workers - 1))]
    time_clients(copies, shard.subset(np.arange(min(len(shard), 2 * fed.batch_size))), ws.pad_id, fed.batch_size,
                 fed.lr)
    all_threads = "sequential_1_thread" if threads == 1 else f"sequential_{threads}_threads"
    walls: dict[str, list[float]] = {"sequential_1_thread": [], all_threads: [], "side_by_side": [],
                                     "side_by_side_with_dropout": []}
    for _ in range(max(1, cfg.repeats - 1)):
        with parallel.torch_threads(1):
            walls["sequential_1_thread"].append(time_sequential(model, shard, ws.pad_id, fed.batch_size, fed.lr,
                                                                workers))
        if threads > 1:
            walls[all_threads].append(time_sequential(model, shard, ws.pad_id, fed.batch_size, fed.lr, workers))
        walls["side_by_side"].append(time_clients(copies, shard, ws.pad_id, fed.batch_size, fed.lr).wall)
        walls["side_by_side_with_dropout"].append(
            time_clients(copies, shard, ws.pad_id, fed.batch_size, fed.lr, dropout=True).wall)
    examples = workers * len(shard)
    best = {k: min(v) for k, v in walls.items()}
    return {"clients": workers, "threads": threads, "examples": examples,
            "seconds": best, "examples_per_s": {k: examples / v for k, v in best.items()},
            "side_by_side_speedup_over_sequential": best[all_threads] / best["side_by_side"],
            "dropout_slowdown": best["side_by_side_with_dropout"] / best["side_by_side"],
            "loadavg": list(os.getloadavg())}


def sub_vs_fm(training: dict, keep_ratio: float = 0.25) -> dict:
    """Is the proxy as much cheaper in time as it is in FLOPs and parameters?"""
    fm, sub = training["fm"], training[f"sub_{keep_ratio:g}"]
    return {"keep_ratio": keep_ratio,
            "step_time_ratio": sub["step_ms_mean"] / fm["step_ms_mean"],
            "cpu_time_ratio": sub["cpu_seconds"] / fm["cpu_seconds"],
            "flops_ratio": sub["flops_per_step"] / fm["flops_per_step"],
            "transformer_params_ratio": sub["transformer_params"] / fm["transformer_params"]}


# --------------------------------------------------------------------------- 4. distillation

def teacher_forward_seconds(teacher: nn.Module, inputs: torch.Tensor, last: int, repeats: int = 3) -> float:
    """Fastest no-grad teacher pass up to layer ``last``: the part of a distillation step spent on the FM."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            h = embed(teacher, inputs)
            for layer in models.layers(teacher)[: last + 1]:
                h = layer(h)
            best = min(best, time.perf_counter() - t)
    return best


def distill_bench(ws: Workspace, cfg: DistillConfig, keep_ratio: float = 0.25) -> dict:
    """Layer-level distillation speed between the FM and a fresh sub-FM on the public corpus, and the
    share of a step that is the (frozen, recomputed every step) teacher forward."""
    sub, info = subfm.build_sub_fm(ws.fm, subfm.SubFMConfig(keep_ratio=keep_ratio))
    distill(ws.fm, sub, ws.public, info.compressed, replace(cfg, steps=1), progress=False)  # warm-up
    result = distill(ws.fm, sub, ws.public, info.compressed, cfg, progress=False)
    step = result.seconds / cfg.steps
    last = models.num_layers(ws.fm) - 1 if getattr(cfg, "match_output", False) else max(info.compressed)
    teacher = teacher_forward_seconds(ws.fm, ws.public[: cfg.batch_size], last)
    return {"steps": cfg.steps, "seconds": result.seconds, "steps_per_s": 1 / step, "batch_size": cfg.batch_size,
            "block_size": int(ws.public.shape[-1]), "teacher_forward_share": min(1.0, teacher / step)}


# --------------------------------------------------------------------------- 5. federated rounds

@contextlib.contextmanager
def fresh_cache() -> Iterator[Path]:
    """Point the package's cache at an empty folder, so the distilled sub-FM is built (not loaded)."""
    old = os.environ.get("FEDPFT_LAB_CACHE")
    with tempfile.TemporaryDirectory(prefix="fedpft-bench-") as tmp:
        os.environ["FEDPFT_LAB_CACHE"] = tmp
        try:
            yield Path(tmp)
        finally:
            if old is None:
                os.environ.pop("FEDPFT_LAB_CACHE", None)
            else:
                os.environ["FEDPFT_LAB_CACHE"] = old


def round_record(r: dict) -> dict:
    """The time split of one round record: training (wall; ``client_seconds`` adds up the clients side by side),
    evaluation, alignment, and "other" (aggregation plus the re-evaluation after an alignment)."""
    keys = ("seconds", "train_seconds", "client_seconds", "eval_seconds")
    out = {"round": r["round"], **{k: r.get(k, 0.0) for k in keys}, "align_seconds": r.get("align_seconds", 0.0),
           "aligned": r.get("aligned", False), "clients": len(r.get("clients", []))}
    out["other_seconds"] = out["seconds"] - out["train_seconds"] - out["eval_seconds"] - out["align_seconds"]
    out["eval_share"] = out["eval_seconds"] / out["seconds"] if out["seconds"] else 0.0
    return out


def eval_breakdown(setup: federation.Setup, ws: Workspace, workers: int) -> dict:
    """What a round's evaluation consists of, each part on one thread (its CPU cost): test accuracy of the
    FM and of the proxy, the gradient discrepancy; then all of it side by side as a round runs it."""
    setup.load_global(setup.init_state)
    parts = {"fm_accuracy_seconds": lambda: federation.accuracy(setup.fm, ws.test_batches),
             "proxy_accuracy_seconds": lambda: federation.accuracy(setup.server_proxy, ws.test_batches),
             "discrepancy_seconds": lambda: federation._discrepancy(setup, ws)}
    times = {}
    with parallel.single_threaded_ops():
        for name, part in parts.items():
            t = time.perf_counter()
            part()
            times[name] = time.perf_counter() - t
    t = time.perf_counter()
    federation.evaluate(setup, ws, setup.init_state, workers)
    times["side_by_side_seconds"] = time.perf_counter() - t
    times["workers"] = workers
    return times


def round_bench(ws: Workspace, cfg: federation.FedConfig, rounds: int = 2, workers: int = 1) -> dict:
    """Time setup (fresh distillation, then cached), round 0 (evaluation only) and ``rounds`` training rounds."""
    rounds = min(rounds, cfg.rounds)
    with fresh_cache():
        t0 = time.perf_counter()
        run = federation.iterate(cfg, ws, progress=False, workers=workers)
        metrics = next(run)
        first = time.perf_counter() - t0
        for _ in range(rounds):
            metrics = next(run)
        run.close()
        t = time.perf_counter()
        setup = federation.build_setup(cfg, ws, progress=False)  # the distilled sub-FM is on disk now
        cached = time.perf_counter() - t
    records = [round_record(r) for r in metrics["rounds"]]
    train = [r for r in records if r["round"] > 0]
    return {"method": cfg.method, "distill_steps": cfg.distill_steps, "clients_per_round": cfg.clients_per_round(),
            "setup_fresh_seconds": first - records[0]["seconds"], "setup_cached_seconds": cached,
            "rounds": records, "train_round_seconds_mean": float(np.mean([r["seconds"] for r in train])),
            "eval_share_mean": float(np.mean([r["eval_share"] for r in train])),
            "eval_share_of_time": float(sum(r["eval_seconds"] for r in train) / sum(r["seconds"] for r in train)),
            "eval_breakdown": eval_breakdown(setup, ws, workers)}


# --------------------------------------------------------------------------- 6. memory

def memory_info() -> dict:
    import psutil

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_mb": peak_kb / 1024, "rss_now_mb": psutil.Process().memory_info().rss / 2**20}


# --------------------------------------------------------------------------- memory and time vs number of clients

SCALING_CLIENTS = (20, 200, 2000)


def scaling_config(clients: int, fm: str = models.DEFAULT_FM, per_client: int = 5, per_round: int = 6
                   ) -> federation.FedConfig:
    """A 2-round FedPFT run (one alignment) with ``clients`` clients of ``per_client`` tweets each, ``per_round``
    of them per round: between points only the size of the federation changes, never the work of a round.
    (5 tweets each: 2000 clients need 10,000 of the 10,928 training tweets.)"""
    d = DataConfig(fm=fm, clients=clients, max_train=per_client * clients, max_test=64, public_blocks=64,
                   device="cpu")
    return federation.FedConfig(data=d, sample_fraction=min(1.0, per_round / clients), rounds=2, distill_steps=4,
                                distill_batch_size=8, align_interval=1, align_steps=2, align_batch_size=8)


def scaling_point(clients: int, fm: str = models.DEFAULT_FM) -> dict:
    """Run :func:`scaling_config` in this process; its peak RSS only means something in a fresh process.

    Each round's process CPU time is recorded next to its wall time: other jobs on the machine stretch the wall
    time of a round by whole seconds, but hardly the CPU time this process spends on it."""
    cfg = scaling_config(clients, fm)
    cpu: list[float] = []
    with fresh_cache():  # every point distils and encodes its data alike (no point reuses another's cache)
        metrics: dict = {}
        for metrics in federation.iterate(cfg, progress=False):
            cpu.append(time.process_time())
    train = [r for r in metrics["rounds"] if r["round"] > 0]
    round_cpu = np.diff(cpu).tolist()
    return {"clients": clients, "clients_per_round": cfg.clients_per_round(), "pid": os.getpid(),
            "train_examples": metrics["examples"]["train"], "setup_seconds": metrics["startup"]["setup_seconds"],
            "round_seconds": [r["seconds"] for r in train], "train_seconds": [r["train_seconds"] for r in train],
            "round_cpu_seconds": round_cpu, "round_seconds_mean": float(np.mean([r["seconds"] for r in train])),
            "round_cpu_seconds_mean": float(np.mean(round_cpu)), **memory_info()}


def clients_scaling(fm: str = models.DEFAULT_FM, counts: tuple[int, ...] = SCALING_CLIENTS, log=print) -> dict:
    """:func:`scaling_point` for every count in ``counts``, each in a fresh Python process, and how far apart the
    peak memories and round times are (max / min)."""
    points = []
    for n in counts:
        log(f"clients scaling: {n} clients ...")
        cmd = [sys.executable, "-m", "fedpft_lab.bench", "--scaling-point", str(n), "--fm", fm]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=LABS_DIR.parent)
        if done.returncode != 0:
            raise RuntimeError(f"clients scaling with {n} clients failed: {done.stderr.strip()[-2000:]}")
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
    def spread(key: str) -> float:
        values = [p[key] for p in points]
        return max(values) / min(values)

    return {"fm": fm, "points": points, "peak_rss_ratio": spread("peak_rss_mb"),
            "round_seconds_ratio": spread("round_seconds_mean"), "round_cpu_ratio": spread("round_cpu_seconds_mean"),
            "loadavg": list(os.getloadavg()), "git_commit": git_commit()}


def format_scaling(r: dict) -> str:
    lines = [f"clients scaling ({r['fm']}, 2 rounds, each point in a fresh process; load average "
             f"{r['loadavg'][0]:.1f} at the end):",
             "  clients   per round   train tweets   setup s   round wall s   round CPU s   peak RSS MB"]
    for p in r["points"]:
        lines.append(f"  {p['clients']:>7}   {p['clients_per_round']:>9}   {p['train_examples']:>12}   "
                     f"{p['setup_seconds']:7.1f}   {p['round_seconds_mean']:12.1f}   {p['round_cpu_seconds_mean']:11.1f}"
                     f"   {p['peak_rss_mb']:11.0f}")
    lines.append(f"  max/min: peak RSS {r['peak_rss_ratio']:.3f}x, time per round {r['round_seconds_ratio']:.3f}x wall, "
                 f"{r['round_cpu_ratio']:.3f}x CPU")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the default run, before and now

# The code the default run is measured against: main when "a faster default run" (issue 13) was filed.
SPEED_BASELINE = "0b700b0"
NOW_DEFAULT = "length-grouped (now, default)"


def speed_paths(baseline: str) -> dict[str, tuple[str | None, list[str]]]:
    """name -> (the git revision whose CLI runs it, None for this checkout; extra ``run`` flags)."""
    return {f"code of {baseline} (before)": (baseline, []),
            "random batches (now)": (None, ["--no-group-by-length"]),
            NOW_DEFAULT: (None, ["--group-by-length"])}


@contextlib.contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """Commit ``rev`` of this repository exported to a temporary folder, so its CLI runs as it was then."""
    import tarfile

    from .errors import ConfigError

    with tempfile.TemporaryDirectory(prefix="fedpft-baseline-") as tmp:
        archive = Path(tmp) / "src.tar"
        done = subprocess.run(["git", "archive", "--format=tar", "--output", str(archive), rev],
                              cwd=LABS_DIR.parent, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"--baseline must be a git revision of this checkout, got {rev!r}: "
                              f"{done.stderr.strip()[:200]}")
        with tarfile.open(archive) as tar:
            tar.extractall(Path(tmp) / "src", filter="data")
        yield Path(tmp) / "src"


def cli_run_flags(tree: Path | None) -> set[str]:
    """The flags ``fedpft-lab run`` accepts in ``tree`` (None: this checkout): an old CLI may lack some."""
    done = subprocess.run([sys.executable, "-m", "fedpft_lab", "run", "--help"], capture_output=True, text=True,
                          cwd=tree or LABS_DIR.parent)
    return {word.strip("[],") for word in done.stdout.split() if word.startswith(("--", "[--"))}


def size_args(preset: str, fm: str, flags: set[str]) -> list[str]:
    """The ``run`` flags that ask a CLI with ``flags`` for ``preset``'s run of ``fm`` on the CPU. A CLI from before
    presets existed ran the workshop sizes by default, so that is the one preset it can be asked for; one from
    before ``--device`` existed ran on the CPU."""
    from .errors import ConfigError

    args = ["--fm", fm] + (["--device", "cpu"] if "--device" in flags else [])
    if "--preset" in flags:
        return args + ["--preset", preset]
    if preset != "workshop":
        raise ConfigError(f"preset must be 'workshop' for a baseline CLI without --preset, got {preset!r}")
    return args


def run_command_seconds(args: list[str], tree: Path | None = None, out: Path | None = None) -> dict:
    """Wall and CPU seconds of one ``fedpft-lab run`` in a fresh process (imports included), and its metrics.

    ``tree``: run the CLI of that source tree instead of this checkout's (``python -m`` puts the working folder
    first on the path); it shares this checkout's cache folder, as a user's second run would.
    ``out``: the run's folder, kept (its output in ``command.log``, a Flower run's logs in ``flower-logs/``), so a
    failed run can be looked into; default: a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="fedpft-speed-") as tmp:
        folder = Path(tmp) if out is None else out
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)   # the previous bench's run
            out.mkdir(parents=True)
        device = ["--device", "cpu"] if tree is None else []   # a tree's command says its own (see size_args)
        cmd = [sys.executable, "-m", "fedpft_lab", "run", "--out", str(folder), "--quiet", *device, *args]
        env = {**os.environ, "FEDPFT_LAB_CACHE": str(cache_dir())}
        before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree or LABS_DIR.parent, env=env)
        wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
        if out is not None:
            (out / "command.log").write_text(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            where = f" (its output and logs: {out})" if out is not None else ""
            raise RuntimeError(f"{' '.join(cmd[2:])} failed after {wall:.0f} s{where}: {done.stderr.strip()[-2000:]}")
        metrics = json.loads((folder / "metrics.json").read_text())
    rounds = metrics["rounds"]
    return {"seconds": wall, "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "startup_seconds": (metrics.get("startup") or {}).get("seconds_since_process_start"),
            "train_seconds": sum(r.get("train_seconds", 0.0) for r in rounds),
            "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in rounds),
            "align_seconds": sum(r.get("align_seconds", 0.0) for r in rounds),
            "final_accuracy": metrics["final_accuracy"], "loadavg": list(os.getloadavg())}


def run_batches(cfg: federation.FedConfig, ws: Workspace) -> list[dict]:
    """Every client batch ``cfg``'s run trains on (the same order and padding as :func:`federation.local_train`)."""
    out = []
    for rnd, clients in enumerate(federation.sample_clients(cfg), start=1):
        for k in clients:
            seed = federation.client_seed(cfg, rnd, k)
            for epoch in range(cfg.local_epochs):
                out += data.iterate_batches(ws.train.subset(ws.parts[k]), cfg.batch_size, shuffle=True,
                                            seed=seed + epoch, pad_id=ws.pad_id, group_by_length=cfg.group_by_length)
    return out


def run_flops(cfg: federation.FedConfig, ws: Workspace) -> int:
    """Every FLOP of ``cfg``'s run from round 0 to the end (client training, evaluation, the gradient probe,
    alignment), counted by torch's FlopCounterMode on one worker (the counter sees one thread; the numbers of a run
    do not depend on the workers). The sub-FM is cached, as in a warm run, so distillation is not counted."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        federation.run(cfg, ws, progress=False, workers=1)
    return int(counter.get_total_flops())


def default_speed(fm: str = models.DEFAULT_FM, repeats: int = 1, preset: str = "workshop",
                  baseline: str = SPEED_BASELINE, log=print) -> dict:
    """The warm default ``fedpft-lab run`` three ways, as whole commands in fresh processes: the code of
    ``baseline`` (a git revision, exported and run as it was: its start-up and its random client batches), this
    code with random client batches, and this code with length-grouped ones (the default). Each path runs once
    untimed first (so every cache it uses is warm), then ``repeats`` timed times, the order reversed every
    repeat so that load from other work hits all alike. Also the padding share of the client batches, the FLOPs
    of the default run and its FLOP efficiency: all FLOPs / wall time / this machine's matmul peak.
    (``preset`` and ``fm``: other sizes, e.g. a seconds-long check with ``smoke`` and ``tiny-bert``.)"""
    from .presets import preset_config

    log("default speed: matmul peak ...")
    with parallel.torch_threads(parallel.default_workers()):   # the run keeps every core busy, one thread each
        peak = machine_info(BenchConfig(matmul_seconds=0.5, matmul_repeats=3))["peak_flops"]
    new = replace(preset_config(preset, fm=fm, device="cpu"), group_by_length=True)
    configs = {"random": replace(new, group_by_length=False), "grouped": new}
    ws = prepare(new.data)
    padding = {name: padding_fraction(run_batches(cfg, ws)) for name, cfg in configs.items()}
    paths = speed_paths(baseline)
    with source_tree(baseline) as old_tree:
        trees = {name: old_tree if rev else None for name, (rev, _) in paths.items()}
        commands = {name: (size_args(preset, fm, cli_run_flags(trees[name])) if trees[name] else
                           ["--preset", preset, "--fm", fm]) + extra for name, (_, extra) in paths.items()}
        for name in paths:                                      # warm every cache the path uses; not timed
            log(f"default speed: warming {name} ...")
            run_command_seconds(commands[name], trees[name])
        times: dict[str, list[dict]] = {name: [] for name in paths}
        for i in range(repeats):
            for name in (list(paths) if i % 2 == 0 else list(reversed(paths))):
                log(f"default speed: {name} ({i + 1}/{repeats}) ...")
                times[name].append(run_command_seconds(commands[name], trees[name]))
    log("default speed: counting the FLOPs of the default run ...")
    flops = run_flops(new, ws)
    out = {name: {"command": f"fedpft-lab run {' '.join(commands[name])}", "git_revision": paths[name][0],
                  "padding_fraction": padding["grouped" if name == NOW_DEFAULT else "random"],
                  "runs": runs, "seconds": min(r["seconds"] for r in runs),
                  "cpu_seconds": min(r["cpu_seconds"] for r in runs)} for name, runs in times.items()}
    before, random_now, now = (out[name] for name in paths)
    return {"fm": fm, "preset": preset, "repeats": repeats, "baseline": baseline, "peak_flops": peak, "paths": out,
            "speedup": before["seconds"] / now["seconds"], "cpu_speedup": before["cpu_seconds"] / now["cpu_seconds"],
            "grouping_speedup": random_now["seconds"] / now["seconds"],
            "same_accuracy_per_path": {n: sorted({r["final_accuracy"] for r in p["runs"]}) for n, p in out.items()},
            "run_flops": flops, "flops_per_s": flops / now["seconds"],      # the default run's efficiency
            "fraction_of_peak": flops / now["seconds"] / peak, "loadavg": list(os.getloadavg()),
            "git_commit": git_commit()}


def format_speed(r: dict) -> str:
    lines = [f"default run ({r['fm']}, {r['preset']} preset, warm caches; whole commands, fastest of {r['repeats']}; "
             f"load average {r['loadavg'][0]:.1f} at the end):",
             "  path                              wall s   CPU s   start-up s   train s   eval s   align s   padding   acc"]
    for name, p in r["paths"].items():
        best = min(p["runs"], key=lambda x: x["seconds"])
        startup = "-" if best["startup_seconds"] is None else f"{best['startup_seconds']:.1f}"
        lines.append(f"  {name:<32} {p['seconds']:7.1f}  {p['cpu_seconds']:6.1f}   {startup:>10}"
                     f"   {best['train_seconds']:7.1f}  {best['eval_seconds']:6.1f}   {best['align_seconds']:7.1f}"
                     f"   {p['padding_fraction']:6.1%}   {best['final_accuracy']:.3f}")
    lines.append(f"  speed-up against {r['baseline']}: {r['speedup']:.2f}x wall, {r['cpu_speedup']:.2f}x CPU time "
                 f"(length-grouped batches alone: {r['grouping_speedup']:.2f}x wall)")
    lines.append(f"  the default run: {r['run_flops'] / 1e12:.2f} TFLOP in {r['paths'][NOW_DEFAULT]['seconds']:.1f} s"
                 f" = {_g(r['flops_per_s'])}FLOP/s, {r['fraction_of_peak']:.1%} of the matmul peak ({_g(r['peak_flops'])}FLOP/s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- precision: why the lab computes in fp32

PRECISIONS = ("fp32", "bf16-autocast")


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")


@torch.no_grad()
def logits_of(model: nn.Module, batches: list[dict], precision: str) -> torch.Tensor:
    """The model's logits on every test batch, in fp32 or under CPU bf16 autocast (returned as fp32)."""
    model.eval()
    with _autocast(precision):
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.float() for b in batches])


def train_epoch(model: nn.Module, shard: data.EncodedSplit, pad_id: int, precision: str) -> None:
    """One epoch of the real client training (batch 4, the lab's lr), in fp32 or under CPU bf16 autocast."""
    with _autocast(precision):
        federation.local_train(model, shard, 1, 4, 2e-3, 1.0, 0, pad_id)


def precision_bench(fm: str = models.DEFAULT_FM, repeats: int = 3, shard_size: int = 100, log=print) -> dict:
    """One client's epoch (the real ``local_train``, batch 4) and one pass over the test set, in fp32 and under
    CPU bf16 autocast, on one thread, for the sub-FM (keep 0.25) and the FM with the lab's LoRA; fastest of
    ``repeats``, the two precisions interleaved. Also how often the two precisions predict the same class on the
    test set after those epochs of training, and the largest logit difference. bf16 matmuls are several times faster than fp32
    on CPUs with AMX, but the lab's matrices are small, and autocast casts every weight again at every call."""
    ws = prepare(DataConfig(fm=fm, device="cpu"))
    shard = ws.train.subset(np.arange(min(shard_size, len(ws.train))))
    out: dict = {"fm": fm, "repeats": repeats, "threads": 1, "shard": len(shard), "test": len(ws.test),
                 "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "models": {}}
    with parallel.torch_threads(1):
        for name, keep in (("sub-FM 0.25", 0.25), ("FM", None)):
            log(f"precision: {name} ...")
            model = lora_proxy(ws, keep)
            jobs = {"train": lambda p: train_epoch(model, shard, ws.pad_id, p),
                    "eval": lambda p: logits_of(model, ws.test_batches, p)}
            seconds: dict[str, dict[str, list[float]]] = {job: {p: [] for p in PRECISIONS} for job in jobs}
            for i in range(repeats + 1):                       # the first pass warms kernels and is not kept
                for p in PRECISIONS:
                    for job, call in jobs.items():
                        t = time.perf_counter()
                        call(p)
                        if i:
                            seconds[job][p].append(time.perf_counter() - t)
            full, low = (logits_of(model, ws.test_batches, p) for p in PRECISIONS)
            best = {job: {p: min(ts) for p, ts in by_p.items()} for job, by_p in seconds.items()}
            out["models"][name] = {"seconds": best, "seconds_all": seconds,
                                   "bf16_speedup": {job: b["fp32"] / b["bf16-autocast"] for job, b in best.items()},
                                   "same_prediction": float((full.argmax(-1) == low.argmax(-1)).float().mean()),
                                   "max_logit_diff": float((full - low).abs().max())}
    out["loadavg"] = list(os.getloadavg())
    out["git_commit"] = git_commit()
    return out


def format_precision(r: dict) -> str:
    lines = [f"precision ({r['fm']}, one thread, fastest of {r['repeats']}; native bf16: {r['native_bf16']}; "
             f"load average {r['loadavg'][0]:.1f}):",
             f"  model          client epoch ({r['shard']} ex.) fp32 / bf16 s   test pass ({r['test']} ex.) fp32 / bf16 s"
             "   same prediction   max logit diff"]
    for name, m in r["models"].items():
        t, e = m["seconds"]["train"], m["seconds"]["eval"]
        lines.append(f"  {name:<14} {t['fp32']:6.2f} / {t['bf16-autocast']:5.2f} ({m['bf16_speedup']['train']:.2f}x)"
                     f"{'':14}{e['fp32']:6.2f} / {e['bf16-autocast']:5.2f} ({m['bf16_speedup']['eval']:.2f}x)"
                     f"{'':8}{m['same_prediction']:7.1%}   {m['max_logit_diff']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- engines: one run, two engines



def engine_overhead(fm: str = models.DEFAULT_FM, preset: str = "workshop", log=print,
                    out: Path | None = None) -> dict:
    """The warm default ``fedpft-lab run`` on each engine, as whole commands in fresh processes one after the other:
    wall and CPU time (of this process's children: the Flower and Ray processes included), each as a ratio to the
    in-process engine, and whether all ended on the same accuracy (they must: one core, three engines).
    ``out``: each engine's run is kept in ``out/engines/<engine>/`` (its output and, for Flower, every process's
    log), so a failed run can be looked into."""
    runs = {}
    for engine in ENGINES:
        folder = out / "engines" / engine if out is not None else None
        log(f"engines: fedpft-lab run --engine {engine} --preset {preset} ..." + (f" (in {folder})" if folder else ""))
        runs[engine] = run_command_seconds(["--preset", preset, "--fm", fm, "--engine", engine], out=folder)
    base = runs["inprocess"]
    return {"fm": fm, "preset": preset, "runs": runs,
            "wall_ratio": {e: r["seconds"] / base["seconds"] for e, r in runs.items()},
            "cpu_ratio": {e: r["cpu_seconds"] / base["cpu_seconds"] for e, r in runs.items()},
            "same_final_accuracy": len({r["final_accuracy"] for r in runs.values()}) == 1,
            "loadavg": list(os.getloadavg()), "git_commit": git_commit()}


def format_engines(r: dict) -> str:
    lines = [f"engines ({r['fm']}, {r['preset']} preset, warm caches, whole commands; load average "
             f"{r['loadavg'][0]:.1f} at the end):", "  engine       wall s   CPU s   x in-process (wall, CPU)   accuracy"]
    for e, run in r["runs"].items():
        lines.append(f"  {e:<11} {run['seconds']:7.1f} {run['cpu_seconds']:7.1f}   {r['wall_ratio'][e]:6.2f}x  "
                     f"{r['cpu_ratio'][e]:6.2f}x              {run['final_accuracy']:.4f}")
    lines.append(f"  same final accuracy on every engine: {r['same_final_accuracy']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 7. notebooks

@contextlib.contextmanager
def python3_kernel() -> Iterator[None]:
    """A ``python3`` kernelspec for *this* interpreter, first on JUPYTER_PATH, in a temporary folder."""
    from ipykernel.kernelspec import install

    old = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="fedpft-kernel-") as tmp:
        install(kernel_name="python3", prefix=tmp)
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(Path(tmp) / "share" / "jupyter"), old]))
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def notebook_times(notebooks: list[Path], smoke_settings: tuple[bool, ...] = (True, False)) -> list[dict]:
    """Wall time of each notebook under papermill, headless, for each SMOKE setting; failures are recorded."""
    import papermill as pm

    results = []
    with python3_kernel():
        for smoke in smoke_settings:
            for path in notebooks:
                with tempfile.TemporaryDirectory(prefix="fedpft-nb-") as tmp:
                    params = {"SMOKE": smoke, "HEADLESS": True, "OUT_DIR": tmp}
                    t = time.perf_counter()
                    error = None
                    try:
                        pm.execute_notebook(str(path), str(Path(tmp) / path.name), parameters=params,
                                            kernel_name="python3", cwd=str(path.parent), progress_bar=False)
                    except Exception as e:  # a failing lab must not lose the other measurements
                        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                    seconds = time.perf_counter() - t
                    metrics = Path(tmp) / "metrics.json"
                    lab_seconds = json.loads(metrics.read_text()).get("seconds") if metrics.exists() else None
                results.append({"notebook": path.name, "smoke": smoke, "seconds": seconds,
                                "lab_seconds": lab_seconds, "ok": error is None, "error": error})
    return results


# --------------------------------------------------------------------------- the whole bench

def git_commit() -> str | None:
    """The checkout's commit, so two bench.json files can be matched to the code they measured."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=LABS_DIR.parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_bench(cfg: BenchConfig, notebooks: bool = True, log=print) -> dict:
    """All measurements in one process, in the order of the module docstring."""
    t0 = time.perf_counter()
    result: dict = {"config": asdict(cfg), "git_commit": git_commit()}
    log("machine: matmul rates ...")
    result["machine"] = machine_info(cfg)
    peak = result["machine"]["peak_flops"]
    t = time.perf_counter()
    ws = prepare(cfg.data)
    result["prepare_seconds"] = time.perf_counter() - t
    log("client training throughput ...")
    result["training"] = training_bench(ws, cfg, peak)
    if 0.25 in cfg.keep_ratios:
        result["sub_vs_fm"] = sub_vs_fm(result["training"], 0.25)
    result["schedule"] = schedule_bench(ws, cfg)
    log("layer-level distillation ...")
    result["distill"] = distill_bench(ws, replace(cfg.fed_config().distill_config(), steps=cfg.distill_steps))
    log("federated rounds ...")
    result["federated"] = round_bench(ws, cfg.fed_config(), cfg.rounds, cfg.workers())
    result["memory"] = memory_info()
    if notebooks:
        log(f"notebooks: {len(lab_notebooks())} labs ...")
        result["notebooks"] = notebook_times(lab_notebooks())
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - t0
    return result


def _g(x: float) -> str:
    return f"{x / 1e9:.1f} G"


def format_report(r: dict) -> str:
    """The bench as a few readable tables."""
    m, t0 = r["machine"], next(iter(r["training"].values()))
    lines = [f"machine: {m['logical_cores']} logical / {m['physical_cores']} physical cores, torch {m['torch_version']} "
             f"({m['torch_threads']} threads, {m['torch_interop_threads']} interop), load average "
             f"{m['loadavg_start'][0]:.1f} at start, {m.get('loadavg_end', [float('nan')])[0]:.1f} at end",
             "  fp32 matmul: " + ", ".join(f"{k} {_g(v)}FLOP/s" for k, v in m["matmul_flops"].items())
             + f"  (peak {_g(m['peak_flops'])}FLOP/s)",
             "", f"client training (federation.local_train, {t0['clients_side_by_side']} client(s) side by side "
                 f"on one thread each, {t0['examples'] // t0['clients_side_by_side']} real tweets each, batch "
                 f"{t0['batch_size']}, LoRA r=8 + head, no dropout):",
             "  model      ex/s   step ms (mean/median)   CPU ms   GFLOP/step   GFLOP/s   of peak   padding   "
             "transformer params"]
    for name, t in r["training"].items():
        lines.append(f"  {name:<8} {t['examples_per_s']:6.1f}   {t['step_ms_mean']:7.1f} / {t['step_ms_median']:<7.1f}"
                     f"       {t['cpu_ms_per_step']:6.0f}   {t['flops_per_step'] / 1e9:7.2f}   {t['flops_per_s'] / 1e9:7.1f}   "
                     f"{t.get('fraction_of_peak', float('nan')):6.1%}   {t['padding_fraction']:6.1%}   "
                     f"{t['transformer_params']:,}")
    if "sub_vs_fm" in r:
        s = r["sub_vs_fm"]
        lines.append(f"  sub-FM(keep {s['keep_ratio']}) / FM: step time {s['step_time_ratio']:.2f}x "
                     f"(CPU time {s['cpu_time_ratio']:.2f}x), "
                     f"FLOPs {s['flops_ratio']:.2f}x, transformer params {s['transformer_params_ratio']:.2f}x")
    sc = r["schedule"]
    lines.append(f"  {sc['clients']} sub-FM clients (keep 0.25), examples/s: "
                 + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in sc["examples_per_s"].items())
                 + f"; side by side is {sc['side_by_side_speedup_over_sequential']:.2f}x sequential on "
                 f"{sc['threads']} thread(s), dropout would cost {sc['dropout_slowdown']:.2f}x "
                 f"(load average {sc['loadavg'][0]:.1f})")
    d = r["distill"]
    lines += ["", f"layer-level distillation: {d['steps_per_s']:.2f} steps/s "
                  f"(batch {d['batch_size']} x {d['block_size']} tokens, {d['steps']} steps); the teacher forward "
                  f"is {d['teacher_forward_share']:.0%} of a step"]
    f = r["federated"]
    lines += ["", f"federated rounds ({f['method']}, {f['clients_per_round']} clients/round): setup fresh "
                  f"{f['setup_fresh_seconds']:.1f} s (distil {f['distill_steps']} steps), cached "
                  f"{f['setup_cached_seconds']:.1f} s",
              "  round   total s   train s   eval s   align s   other s   eval share   (sum of client s)"]
    for x in f["rounds"]:
        lines.append(f"  {x['round']:>5}   {x['seconds']:7.1f}   {x['train_seconds']:7.1f}   {x['eval_seconds']:6.1f}"
                     f"   {x['align_seconds']:7.1f}   {x['other_seconds']:7.1f}   {x['eval_share']:9.1%}"
                     f"   ({x['client_seconds']:.1f})")
    e = f["eval_breakdown"]
    lines.append(f"  evaluation share of the training rounds' time: {f['eval_share_of_time']:.1%}")
    lines.append(f"  evaluation, one thread each: FM accuracy {e['fm_accuracy_seconds']:.2f} s + proxy accuracy "
                 f"{e['proxy_accuracy_seconds']:.2f} s + gradient discrepancy {e['discrepancy_seconds']:.2f} s; "
                 f"side by side on {e['workers']} worker(s): {e['side_by_side_seconds']:.2f} s")
    mem = r["memory"]
    lines += ["", f"memory: peak RSS {mem['peak_rss_mb']:.0f} MB (now {mem['rss_now_mb']:.0f} MB)"]
    if r.get("notebooks") is not None:
        lines += ["", "notebooks (papermill, headless):"]
        for n in r["notebooks"]:
            status = "ok" if n["ok"] else f"FAILED {n['error']}"
            lines.append(f"  {n['notebook']:<40} SMOKE={str(n['smoke']):<5}  {n['seconds']:7.1f} s  {status}")
    lines.append(f"\nbench wall time {r['seconds']:.0f} s")
    return "\n".join(lines)


def write_json(obj: dict, path: Path) -> None:
    """Atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_json(obj, path, default=str)


def _merge_into_bench(out: Path, key: str, result: dict, report: str) -> dict:
    """One ``--only`` entry written into ``out/bench.json`` next to the full bench's figures, if any; printed."""
    path = out / "bench.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    write_json({**merged, key: result}, path)
    print(report)
    print(f"results: {path}")
    return result


def main(args: argparse.Namespace) -> dict:
    """Entry point of ``fedpft-lab bench`` (args: out, skip_notebooks, quick; optionally fm, threads, only)."""
    models.quiet_transformers()
    threads = getattr(args, "threads", None)
    if threads:  # also for the notebook kernels, which inherit the environment
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if getattr(args, "scaling_point", None):   # one point of clients-scaling, in its own process
        point = scaling_point(args.scaling_point, getattr(args, "fm", models.DEFAULT_FM))
        print(json.dumps(point))
        return point
    if getattr(args, "only", None) == "default-speed":
        result = default_speed(getattr(args, "fm", models.DEFAULT_FM), getattr(args, "repeats", 1) or 1,
                               baseline=getattr(args, "baseline", None) or SPEED_BASELINE)
        return _merge_into_bench(Path(args.out), "default_speed", result, format_speed(result))
    if getattr(args, "only", None) == "precision":
        result = precision_bench(getattr(args, "fm", models.DEFAULT_FM), max(3, getattr(args, "repeats", 3) or 3))
        return _merge_into_bench(Path(args.out), "precision", result, format_precision(result))
    if getattr(args, "only", None) == "engines":
        result = engine_overhead(getattr(args, "fm", models.DEFAULT_FM), getattr(args, "preset", "workshop"),
                                 out=Path(args.out))
        return _merge_into_bench(Path(args.out), "engines", result, format_engines(result))
    if getattr(args, "only", None) == "clients-scaling":
        result = clients_scaling(getattr(args, "fm", models.DEFAULT_FM))
        path = Path(args.out) / "clients_scaling.json"
        write_json(result, path)
        print(format_scaling(result))
        print(f"results: {path}")
        return result
    cfg = bench_config(getattr(args, "fm", models.DEFAULT_FM), quick=args.quick)
    result = run_bench(cfg, notebooks=not args.skip_notebooks)
    path = Path(args.out) / "bench.json"
    write_json(result, path)
    print(format_report(result))
    print(f"results: {path}")
    return result


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_bench_arguments   # the same flags as `fedpft-lab bench`

    p = argparse.ArgumentParser(prog="python -m fedpft_lab.bench", description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    return p


if __name__ == "__main__":
    from .paths import set_offline_env

    set_offline_env()
    main(build_parser().parse_args())
    sys.exit(0)
