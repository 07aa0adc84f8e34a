"""Several methods on identical splits and seeds, summarised like the paper's Tables 1-3.

Per seed the data (split, client sampling, probe batches) is prepared once and shared by every method,
so differences between rows come from the methods alone.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from . import io
from .federation import METHOD_NAMES, FedConfig, _atomic_json, run
from .workspace import prepare


def compare(base: FedConfig, methods: list[str], seeds: list[int], out_dir: Path | None = None,
            resume: bool = False, progress: bool = True, workers: int | None = None) -> dict:
    """Run every method for every seed; return (and write to ``out_dir/compare.json``) the table."""
    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for seed in seeds:
        data_cfg = replace(base.data, seed=seed)
        ws = prepare(data_cfg)
        for method in methods:
            cfg = replace(base, method=method, seed=seed, data=data_cfg)
            sub = out_dir / method / f"seed{seed}" if out_dir is not None else None
            done = sub is not None and resume and (sub / "metrics.json").exists()
            if done:
                metrics = io.read_run_file(sub / "metrics.json", io.load_json)
                done = len(metrics["rounds"]) == cfg.rounds + 1 and metrics["config"] == cfg.to_json()
            if not done:
                metrics = run(cfg, ws, out_dir=sub, resume=resume, progress=progress, workers=workers)
            runs[method][seed] = metrics
    table = summarise(runs)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_json(table, out_dir / "compare.json")
        (out_dir / "compare.md").write_text(format_table(table) + "\n")
    return table


def _mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Mean and spread over seeds of the numbers a reader compares."""
    rows = {}
    for method, by_seed in runs.items():
        ms = list(by_seed.values())
        rows[method] = {
            "name": METHOD_NAMES[method],
            "seeds": list(by_seed),
            "final_accuracy": _mean_sd([m["final_accuracy"] for m in ms]),
            "best_accuracy": _mean_sd([m["best_accuracy"] for m in ms]),
            "final_sub_accuracy": _mean_sd([m["rounds"][-1]["sub_accuracy"] for m in ms]),
            "grad_cosine": _mean_sd([statistics.fmean(r["grad_cosine"] for r in m["rounds"][1:]) for m in ms]),
            "min_grad_cosine": _mean_sd([min(r["grad_cosine"] for r in m["rounds"][1:]) for m in ms]),
            "grad_cosine_by_round": [statistics.fmean(m["rounds"][i]["grad_cosine"] for m in ms)
                                     for i in range(len(ms[0]["rounds"]))],
            "fm_transformer": ms[0]["params"]["fm_transformer"],
            "proxy_transformer": ms[0]["params"]["sub_transformer"],
            "comm_mb": _mean_sd([(m["cost"]["bytes_up"] + m["cost"]["bytes_down"]) / 1e6 for m in ms]),
            "seconds": _mean_sd([m["cost"]["seconds"] for m in ms]),
        }
    return {"methods": rows}


def format_table(table: dict) -> str:
    """A Markdown table: accuracy in %, mean ± sd over seeds, params in M (10^6)."""
    lines = ["| method | final acc (%) | best acc (%) | proxy acc (%) | mean grad cos | proxy params (M) | comm (MB) | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table["methods"].values():
        f = lambda d, s=100: f"{d['mean'] * s:.1f} ± {d['sd'] * s:.1f}"  # noqa: E731
        lines.append(f"| {row['name']} | {f(row['final_accuracy'])} | {f(row['best_accuracy'])} | "
                     f"{f(row['final_sub_accuracy'])} | {row['grad_cosine']['mean']:.4f} | "
                     f"{row['proxy_transformer'] / 1e6:.2f} / {row['fm_transformer'] / 1e6:.2f} | "
                     f"{row['comm_mb']['mean']:.1f} | {row['seconds']['mean']:.0f} |")
    return "\n".join(lines)
