"""Several methods on identical splits and seeds, summarised like the paper's Tables 1-3.

Per seed the data (split, client sampling, probe batches) is prepared once and shared by every method,
so differences between rows come from the methods alone. That is also why each method is compared with
FedPFT *seed by seed* (paired differences): what the runs of one seed share cancels out.

The headline is the last round's FM accuracy. The best round's accuracy is kept as a secondary number only:
the round is picked on the test set itself, so it is optimistic.
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from . import io
from .federation import METHOD_NAMES, FedConfig, result_config, run
from .stats import mean_ci, paired_diff, share_above
from .version import code_version
from .workspace import prepare

LEVEL = 0.95           # confidence level of every interval
REFERENCE = "fedpft"   # paired differences are "method minus FedPFT on the same seed"
FLOOR = "fedpft-n"     # the gradient-cosine floor: no alignment at all
BEST_LABEL = "best round (picked on test set, optimistic)"
NOTES = {
    "final_accuracy": "FM accuracy (adapter plugged in) after the last round: the headline number",
    "best_accuracy_test_picked": "FM accuracy of the best round, " + BEST_LABEL,
    "grad_cosine": "per seed, the mean over rounds >= 1 of cosine(proxy gradient, FM gradient)",
    "vs_fedpft": "per-seed difference method minus FedPFT (same split, client sample and probe batches)",
    "grad_cosine_above_fedpft_n": "round-points (round >= 1, all seeds) where the gradient cosine is above "
                                  "FedPFT-N's on the same seed and round",
    "ci": f"{LEVEL:.0%} Student-t interval over seeds; null with one seed",
}


def run_methods(base: FedConfig, methods: list[str], seeds: list[int], out_dir: Path | None = None,
                resume: bool = False, progress: bool = True, workers: int | None = None) -> dict[str, dict[int, dict]]:
    """The run loop: every method for every seed, into ``out_dir/<method>/seed<k>/``; ``runs[method][seed]``.

    With ``resume`` a finished run whose configuration matches is read back, a partial one continues.
    """
    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for seed in seeds:
        data_cfg = replace(base.data, seed=seed)
        ws = None  # prepared only if some run of this seed still has work to do
        for method in methods:
            cfg = replace(base, method=method, seed=seed, data=data_cfg)
            sub = out_dir / method / f"seed{seed}" if out_dir is not None else None
            metrics = _finished(sub, cfg) if resume and sub is not None else None
            if metrics is None:
                ws = ws if ws is not None else prepare(data_cfg)
                metrics = run(cfg, ws, out_dir=sub, resume=resume, progress=progress, workers=workers)
            runs[method][seed] = metrics
    return runs


def _finished(sub: Path, cfg: FedConfig) -> dict | None:
    """The metrics of a complete run saved in ``sub`` whose result ``cfg`` would reproduce, else None.

    Compared on :func:`federation.result_config`, as a checkpoint's resume is: a study that changes only the
    distillation budget reruns the methods that distil and reads FedPFT-N's runs back instead of redoing them.
    """
    path = sub / "metrics.json"
    if not path.exists():
        return None
    metrics = io.read_run_file(path, io.load_json)
    done = (len(metrics["rounds"]) == cfg.rounds + 1
            and result_config(FedConfig.from_json(metrics["config"])) == result_config(cfg))
    return metrics if done else None


def provenance(base: FedConfig, seeds: list[int], command: str | None) -> dict:
    """What makes a stored result self-describing: how it was made, by which code, when."""
    return {"command": command, "code_version": code_version(), "base_config": base.to_json(),
            "seeds": list(seeds), "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def compare(base: FedConfig, methods: list[str], seeds: list[int], out_dir: Path | None = None,
            resume: bool = False, progress: bool = True, workers: int | None = None,
            command: str | None = None) -> dict:
    """Run every method for every seed; return (and write to ``out_dir/compare.json`` and ``.md``) the table.

    ``command``: the command line that asked for it (``fedpft-lab ...``), stored with the results.
    """
    runs = run_methods(base, methods, seeds, out_dir, resume, progress, workers)
    table = {**provenance(base, seeds, command), **summarise(runs)}
    if out_dir is not None:
        write_compare(table, out_dir)
    return table


def write_compare(table: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    io.atomic_json(table, out_dir / "compare.json")
    head = f"`{table['command']}`\n\n" if table.get("command") else ""
    io.atomic_write_text(out_dir / "compare.md", head + format_table(table) + "\n")


# --------------------------------------------------------------------------- numbers

def _mean_cosine(m: dict) -> float:
    return statistics.fmean(r["grad_cosine"] for r in m["rounds"][1:])


def _cosine_pairs(a: dict[int, dict], b: dict[int, dict]) -> list[tuple[float, float]]:
    """``(a's cosine, b's cosine)`` for every round >= 1 of every seed both have."""
    pairs = []
    for seed in sorted(set(a) & set(b)):
        b_by_round = {r["round"]: r["grad_cosine"] for r in b[seed]["rounds"]}
        pairs += [(r["grad_cosine"], b_by_round[r["round"]]) for r in a[seed]["rounds"]
                  if r["round"] >= 1 and r["round"] in b_by_round]
    return pairs


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Mean, sd and 95% interval over seeds of the numbers a reader compares, and the paired comparisons.

    ``runs[method][seed]`` are metrics dicts of :func:`federation.run`; every method must have the same seeds.
    """
    ref, floor = runs.get(REFERENCE), runs.get(FLOOR)
    rows = {}
    for method, by_seed in runs.items():
        ms = list(by_seed.values())
        final = {s: m["final_accuracy"] for s, m in by_seed.items()}
        cosine = {s: _mean_cosine(m) for s, m in by_seed.items()}
        vs_ref = None
        if ref is not None and method != REFERENCE:
            vs_ref = {"final_accuracy": paired_diff(final, {s: m["final_accuracy"] for s, m in ref.items()}, LEVEL),
                      "grad_cosine": paired_diff(cosine, {s: _mean_cosine(m) for s, m in ref.items()}, LEVEL)}
        rows[method] = {
            "name": METHOD_NAMES[method],
            "seeds": list(by_seed),
            "final_accuracy": mean_ci(list(final.values()), LEVEL),
            "best_accuracy_test_picked": mean_ci([m["best_accuracy"] for m in ms], LEVEL),
            "final_sub_accuracy": mean_ci([m["rounds"][-1]["sub_accuracy"] for m in ms], LEVEL),
            "grad_cosine": mean_ci(list(cosine.values()), LEVEL),
            "min_grad_cosine": mean_ci([min(r["grad_cosine"] for r in m["rounds"][1:]) for m in ms], LEVEL),
            "grad_cosine_by_round": [statistics.fmean(m["rounds"][i]["grad_cosine"] for m in ms)
                                     for i in range(len(ms[0]["rounds"]))],
            "vs_fedpft": vs_ref,
            "grad_cosine_above_fedpft_n": (share_above(_cosine_pairs(by_seed, floor))
                                           if floor is not None and method != FLOOR else None),
            "fm_transformer": ms[0]["params"]["fm_transformer"],
            "proxy_transformer": ms[0]["params"]["sub_transformer"],
            "comm_mb": mean_ci([(m["cost"]["bytes_up"] + m["cost"]["bytes_down"]) / 1e6 for m in ms], LEVEL),
            "seconds": mean_ci([m["cost"]["seconds"] for m in ms], LEVEL),
        }
    return {"notes": NOTES, "methods": rows}


# --------------------------------------------------------------------------- Markdown

def format_pm(d: dict, scale: float = 100.0, digits: int = 1, sign: str = "") -> str:
    """``mean ± sd`` (``± n/a`` with one seed); ``sign="+"`` writes the mean's sign (for differences)."""
    sd = "n/a" if d["sd"] is None else f"{d['sd'] * scale:.{digits}f}"
    return f"{d['mean'] * scale:{sign}.{digits}f} ± {sd}"


def format_ci(d: dict, scale: float = 100.0, digits: int = 1) -> str:
    """``[lo, hi]`` of the interval, ``n/a`` with one seed."""
    if d["ci"] is None:
        return "n/a"
    lo, hi = d["ci"]
    return f"[{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def format_table(table: dict) -> str:
    """Markdown: the results (accuracy in %, mean ± sd and [95% CI] over seeds, params in M = 10^6), then,
    when FedPFT or FedPFT-N is among the methods, every method's paired difference from FedPFT."""
    rows = table["methods"].values()
    lines = [f"| method | last-round acc (%) | {LEVEL:.0%} CI | {BEST_LABEL} (%) | proxy acc (%) | "
             f"mean grad cos | {LEVEL:.0%} CI | proxy / FM params (M) | comm (MB) | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cos = row["grad_cosine"]
        acc = row["final_accuracy"]
        lines.append(f"| {row['name']} | {format_pm(acc)} | {format_ci(acc)} | "
                     f"{format_pm(row['best_accuracy_test_picked'])} | {format_pm(row['final_sub_accuracy'])} | "
                     f"{format_pm(cos, 1, 4)} | {format_ci(cos, 1, 4)} | "
                     f"{row['proxy_transformer'] / 1e6:.2f} / {row['fm_transformer'] / 1e6:.2f} | "
                     f"{row['comm_mb']['mean']:.1f} | {row['seconds']['mean']:.0f} |")
    if not any(row["vs_fedpft"] or row["grad_cosine_above_fedpft_n"] for row in rows):
        return "\n".join(lines)
    lines += ["", f"Paired differences from FedPFT (method minus FedPFT on the same seed; {LEVEL:.0%} t-interval):",
              "", f"| method | Δ last-round acc (points) | {LEVEL:.0%} CI | Δ mean grad cos | {LEVEL:.0%} CI | "
                  "grad cos above FedPFT-N (round-points) |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        d, above = row["vs_fedpft"], row["grad_cosine_above_fedpft_n"]
        diff = "– | – | – | –"
        if d is not None:
            acc, cos = d["final_accuracy"], d["grad_cosine"]
            diff = (f"{format_pm(acc, sign='+')} | {format_ci(acc)} | "
                    f"{format_pm(cos, 1, 4, '+')} | {format_ci(cos, 1, 4)}")
        share = f"{above['above']}/{above['points']} ({above['fraction']:.0%})" if above and above["points"] else "–"
        lines.append(f"| {row['name']} | {diff} | {share} |")
    return "\n".join(lines)
