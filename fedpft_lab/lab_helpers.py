"""Small pure helpers that labs 02-06 share: the lab-scale configuration, parameter arithmetic, saliency views,
proxy-vs-FM discrepancy at the initial adapter, round-record summaries and the paper's reported numbers.

Why a module of its own: the notebooks must stay short lessons, and these pieces are either shared by several
labs (the lab-scale configuration, so labs 04/05/06 hit the same cached runs) or are logic worth a unit test
(parameter counts, kept-neuron masks, alignment jumps, the paper tables).
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from . import adapters, models, presets, subfm
from .core.proxy import wrap_pair
from .discrepancy import gradient_discrepancy
from .errors import ConfigError, check_range
from .federation import METHOD_NAMES, FedConfig
from .workspace import DataConfig

# ----------------------------------------------------------------------------- lab scale

# The lab and SMOKE sizes are presets (fedpft_lab.presets, also ``fedpft-lab run --preset lab|smoke``);
# these names stay here for the labs and tests that read them.
LAB_DATA, LAB_FED, SMOKE_DATA, SMOKE_FED = presets.LAB_DATA, presets.LAB_FED, presets.SMOKE_DATA, presets.SMOKE_FED

_DATA_KEYS = {f.name for f in fields(DataConfig)}


def lab_threads(max_threads: int = 8) -> int:
    """Torch threads for a lab: the cores free right now (cores minus the 1-minute load average), at least one.

    Why not simply all cores: the lab's batches are small, so extra threads help only on idle cores. When other
    work shares the machine, OpenMP threads spin against each other and every step slows down several times over
    (measured on a busy 2-core machine: a SMOKE federated run took 5x the wall and CPU time with 2 threads as
    with 1). Labs call ``torch.set_num_threads(lab_threads())`` right after ``nb.setup``. It governs the
    server's distillation; clients and evaluation run one single-threaded job per core whatever it says
    (:mod:`fedpft_lab.parallel`), since single-threaded jobs never spin-wait for each other.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):          # not available on every platform
        load = 0.0
    return max(1, min(max_threads, cores - math.floor(load + 0.5)))


def lab_config(method: str = "fedpft", smoke: bool = False, seed: int = 0, data: Mapping[str, Any] | None = None,
               **knobs: Any) -> FedConfig:
    """``FedConfig()`` defaults + lab scale + the lab's knobs (+ SMOKE sizes, which win).

    Knobs that belong to the data (``alpha``, ``clients``, ``partition`` ...) may be passed directly or in
    ``data``; everything else must be a FedConfig field. SMOKE overrides sizes and budgets (plus
    ``align_interval = 1``, so its two rounds still contain an alignment), never the knobs that define *what*
    is run (method, keep ratio, alpha, proportion, selection rule ...).
    """
    data_kw = {**LAB_DATA, **(data or {})}
    fed_kw = dict(LAB_FED)
    for key, value in knobs.items():
        (data_kw if key in _DATA_KEYS else fed_kw)[key] = value
    if fed_kw.get("retained_layers") is not None:            # a list from a parameters cell -> hashable tuple
        fed_kw["retained_layers"] = tuple(sorted({int(i) for i in fed_kw["retained_layers"]}))
    if smoke:
        data_kw.update(SMOKE_DATA)
        fed_kw.update(SMOKE_FED)
    data_kw["seed"] = seed
    return replace(FedConfig(), method=method, seed=seed, data=replace(DataConfig(), **data_kw), **fed_kw)


# ----------------------------------------------------------------------------- parameter arithmetic

MI = 2**20   # the paper's "M" (81M, 47M) is 2^20 parameters, not 10^6


def encoder_layer_params(d: int, m: int) -> int:
    """Parameters of one BERT-style layer with FFN width ``m``: Q,K,V,O (with biases), two LayerNorms, the FFN."""
    return 4 * (d * d + d) + 2 * (2 * d) + (d * m + m) + (m * d + d)


def paper_param_counts(d: int = 768, m: int = 3072, num_layers: int = 12, kept_width: int = 768,
                       retained: Sequence[int] = (0, 11), emulator_layers: int = 7) -> dict[str, int]:
    """The paper's "Transformers Params" column for BERT/RoBERTa-base: FM, sub-FM, FedOT (labs/METHOD.md#sub-fm)."""
    full = encoder_layer_params(d, m)
    small = encoder_layer_params(d, kept_width)
    n_retained = len(set(retained))
    return {"fm": num_layers * full, "sub_fm": n_retained * full + (num_layers - n_retained) * small,
            "layer_drop": emulator_layers * full}


def _layer_param_counts(fm: nn.Module) -> list[int]:
    return [sum(p.numel() for name, p in layer.named_parameters() if "lora_" not in name)
            for layer in models.layers(fm)]


def proxy_param_counts(fm: nn.Module, keep_ratio: float, retained_layers: Sequence[int] | None = None) -> dict:
    """Transformer parameters of the FM, of its layer-wise sub-FM and of the matched layer-drop proxy.

    Computed from the FM's shapes without building anything (instant, for a slider): every dropped FFN neuron
    removes its W1 row, its b1 entry and its W2 column, i.e. 2d + 1 parameters. The layer-drop proxy keeps the
    layers ``subfm.emulator_layers`` picks to match the sub-FM's size, exactly as FedOT does in federation.py.
    """
    cfg = subfm.SubFMConfig(keep_ratio=keep_ratio, retained_layers=retained_layers)
    n = models.num_layers(fm)
    per_layer = _layer_param_counts(fm)
    kept_width = {}
    sub = sum(per_layer)
    for i in cfg.compressed(n):
        w1, _, _ = models.ffn(fm, i)
        m, d = w1.out_features, w1.in_features
        k = max(1, round(keep_ratio * m))
        kept_width[i] = k
        sub -= (m - k) * (2 * d + 1)
    kept_layers = subfm.emulator_layers(fm, cfg.retained_layers, target_params=sub)
    return {"fm": sum(per_layer), "sub_fm": sub, "layer_drop": sum(per_layer[i] for i in kept_layers),
            "layer_drop_layers": kept_layers, "kept_width": kept_width, "retained": list(cfg.retained(n)),
            "compressed": list(cfg.compressed(n))}


def params_in_units(n: int) -> dict[str, float]:
    """``n`` in millions (10^6) and in Mi (2^20): the paper's 81M/47M are Mi."""
    return {"M": n / 1e6, "Mi": n / MI}


# ----------------------------------------------------------------------------- saliency views

def layer_saliencies(fm: nn.Module) -> dict[int, np.ndarray]:
    """Neuron saliency (labs/METHOD.md#sub-fm) of every layer's FFN, retained layers included (what they keep)."""
    out = {}
    for i in range(models.num_layers(fm)):
        w1, w2, _ = models.ffn(fm, i)
        out[i] = subfm.neuron_saliency(w1.weight.detach(), w2.weight.detach()).cpu().numpy().astype(np.float64)
    return out


def kept_mask(saliency: np.ndarray, keep_ratio: float) -> np.ndarray:
    """Boolean mask of the neurons a ``keep_ratio`` layer-wise compression keeps (the top-k by saliency).

    Same k and the same ``torch.topk`` as ``subfm.plan_sub_fm``, so the mask matches what gets built.
    """
    check_range("keep_ratio", keep_ratio, 0.0, 1.0, lo_open=True)
    sal = torch.as_tensor(np.asarray(saliency))
    k = max(1, round(keep_ratio * sal.numel()))
    mask = np.zeros(sal.numel(), dtype=bool)
    mask[subfm.select_neurons(sal, k).numpy()] = True
    return mask


def kept_masks(saliencies: Mapping[int, np.ndarray], keep_ratio: float,
               retained: Sequence[int]) -> dict[int, np.ndarray]:
    """Per layer: all-True for retained layers, the top-k mask for compressed ones."""
    keep = set(retained)
    return {i: np.ones(len(s), dtype=bool) if i in keep else kept_mask(s, keep_ratio)
            for i, s in saliencies.items()}


def kept_saliency_share(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the layer's total squared saliency (its weight mass) held by the kept neurons."""
    s2 = np.asarray(saliency, dtype=np.float64) ** 2
    return float(s2[np.asarray(mask)].sum() / s2.sum()) if s2.sum() > 0 else 0.0


# ----------------------------------------------------------------------------- proxy vs FM at A_0

def proxy_discrepancy(fm: nn.Module, proxy: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                      lora: adapters.LoRAConfig | None = None, seed: int = 0,
                      proxy_layers: Sequence[int] | None = None,
                      adapter_layers: Sequence[int] | None = None) -> dict:
    """Gradient discrepancy between ``proxy`` and ``fm`` at the initial global adapter A_0, as a flat dict.

    Both models are deep-copied and LoRA-wrapped as the server wraps them (:func:`~.core.proxy.wrap_pair`: LoRA
    seeded with ``seed``; A_0 is the FM's adapter, loaded into the proxy), so neither argument is modified. For a layer-drop
    proxy pass ``proxy_layers`` (proxy layer j came from FM layer proxy_layers[j]) and ``adapter_layers`` (the
    FM layers that carry LoRA, the bottom and top ones in FedOT); only shared parameters are compared.
    """
    fm_peft, proxy_peft = wrap_pair(fm, copy.deepcopy(proxy), lora or adapters.LoRAConfig(), seed, adapter_layers,
                                    proxy_layers)
    d = gradient_discrepancy(fm_peft, proxy_peft, batches, state=adapters.adapter_state(fm_peft),
                             proxy_layers=proxy_layers)
    return {"grad_cosine": d.cosine, "grad_rel_l2": d.rel_l2, "grad_cosine_batch_mean": d.cosine_batch_mean,
            "layer_cosine": {x["layer"]: x["cosine"] for x in d.per_layer},
            "layer_rel_l2": {x["layer"]: x["rel_l2"] for x in d.per_layer},
            "per_module": d.per_module, "hidden_rel_mse": d.hidden_rel_mse, "logit_kl": d.logit_kl}


def compare_constructions(fm: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], keep_ratio: float,
                          retained_layers: Sequence[int] | None = None, lora: adapters.LoRAConfig | None = None,
                          seed: int = 0, on_progress: Callable[[str, float], None] | None = None) -> dict:
    """Build both proxies of (about) the same size and measure each against the FM (lab 02's expensive step).

    * layer-wise (FedPFT): every layer kept, compressed layers keep ``keep_ratio`` of their FFN neurons;
    * layer-drop (FedOT): the retained layers as trainable adapter, plus as many uniformly spaced middle layers
      as fit the sub-FM's parameter budget; LoRA only in the adapter layers, as in federation.py.
    """
    report = lambda text, frac: on_progress(text, frac) if on_progress else None  # noqa: E731
    counts = proxy_param_counts(fm, keep_ratio, retained_layers)
    if not counts["retained"]:
        raise ConfigError("pick at least one retained layer: the layer-drop proxy (FedOT) trains LoRA only in its "
                          "retained adapter layers, so with none there is nothing to compare")
    report("building the layer-wise sub-FM", 0.05)
    sub, _info = subfm.build_sub_fm(fm, subfm.SubFMConfig(keep_ratio=keep_ratio, retained_layers=retained_layers,
                                                          seed=seed))
    report("gradients: FM vs layer-wise sub-FM", 0.15)
    layer_wise = proxy_discrepancy(fm, sub, batches, lora, seed)
    report("building the layer-drop proxy", 0.55)
    drop = subfm.build_layer_drop(fm, counts["layer_drop_layers"])
    report("gradients: FM vs layer-drop proxy", 0.6)
    layer_drop = proxy_discrepancy(fm, drop, batches, lora, seed, proxy_layers=counts["layer_drop_layers"],
                                   adapter_layers=counts["retained"])
    report("done", 1.0)
    layer_wise["params"] = models.transformer_params(sub)
    layer_drop["params"] = models.transformer_params(drop)
    layer_drop["kept_layers"] = counts["layer_drop_layers"]
    return {"keep_ratio": keep_ratio, "retained": counts["retained"], "fm_params": counts["fm"],
            "layer-wise": layer_wise, "layer-drop": layer_drop}


PROXY_LABELS = {"layer-wise": "layer-wise sub-FM", "layer-drop": "layer-drop proxy"}


def construction_series(report: Mapping, key: str = "layer_cosine", num_layers: int | None = None,
                        ) -> dict[str, list[float | None]]:
    """Per-layer values of both constructions, indexed by FM layer (None where a proxy has no value there),
    ready for ``plots.grouped_layer_bars``."""
    n = num_layers if num_layers is not None else len(report["layer-wise"]["hidden_rel_mse"])
    out = {}
    for name, label in PROXY_LABELS.items():
        values = report[name][key]
        out[label] = ([values.get(i) for i in range(n)] if isinstance(values, Mapping)
                      else [values[i] if i < len(values) else None for i in range(n)])
    return out


def same_ffn(a: nn.Module, b: nn.Module, layer_ids: Sequence[int]) -> bool:
    """True if the FFN tensors of ``layer_ids`` are bit-identical in both models (e.g. two distillations)."""
    from .workspace import ffn_state

    sa, sb = ffn_state(a, list(layer_ids)), ffn_state(b, list(layer_ids))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def per_module_table(report: Mapping, key: str = "cosine", skip: Sequence[str] = ("lora_A",)) -> dict[str, dict]:
    """``{proxy label: {module kind: value}}`` from a construction report, leaving out ``skip`` kinds.

    At A_0 every LoRA B is zero, so the gradient with respect to every LoRA A is exactly zero in both models
    (reported as cosine 1, error 0): skipping ``lora_A`` keeps that non-information out of the table.
    """
    return {label: {kind: v[key] for kind, v in report[name]["per_module"].items()
                    if not any(s in kind for s in skip)}
            for name, label in PROXY_LABELS.items()}


# ----------------------------------------------------------------------------- round records

def plugin_gaps(rounds: Sequence[Mapping]) -> list[float]:
    """Per round: FM accuracy with the adapter plugged in minus the proxy's own accuracy (the plug-in gap)."""
    return [r["accuracy"] - r["sub_accuracy"] for r in rounds]


def cumulative_mb(rounds: Sequence[Mapping]) -> dict[str, list[float]]:
    """Cumulative megabytes (10^6 bytes) sent up by clients and down by the server after each round."""
    up = np.cumsum([r.get("bytes_up", 0) for r in rounds]) / 1e6
    down = np.cumsum([r.get("bytes_down", 0) for r in rounds]) / 1e6
    return {"uploaded by clients": up.tolist(), "downloaded by clients": down.tolist()}


def comm_summary(metrics: Mapping) -> dict[str, float]:
    """Communication of a run next to the alternative FedPFT avoids: shipping the FM itself (all its frozen weights,
    fp32, embeddings included) once to every client that took part. The run's own total already counts each
    participant's one-time download of its proxy, so the two are like for like."""
    rounds = metrics["rounds"]
    total = metrics["cost"]["bytes_up"] + metrics["cost"]["bytes_down"]
    participants = {c for r in rounds for c in r.get("clients", [])}
    fm = metrics["params"]["fm_frozen_bytes"]
    return {"total_mb": total / 1e6, "participants": len(participants),
            "fm_mb": fm / 1e6, "ship_fm_mb": len(participants) * fm / 1e6,
            "ratio_to_shipping_fm": total / max(1, len(participants) * fm)}


def alignment_jumps(rounds: Sequence[Mapping], key: str = "grad_cosine") -> list[dict]:
    """At every alignment round: the value of ``key`` just before and just after the neuron-level alignment."""
    return [{"round": r["round"], "before": r["before_align"][key], "after": r[key],
             "jump": r[key] - r["before_align"][key]}
            for r in rounds
            if r.get("aligned") and key in (r.get("before_align") or {}) and r.get(key) is not None]


def layer_matrix(rounds: Sequence[Mapping], key: str = "layer_cosine") -> np.ndarray:
    """rounds x layers array of a per-layer metric (NaN where a round has no value), for heatmaps."""
    width = max((len(r.get(key) or []) for r in rounds), default=0)
    out = np.full((len(rounds), width), np.nan)
    for i, r in enumerate(rounds):
        for j, v in enumerate(r.get(key) or []):
            out[i, j] = np.nan if v is None else v
    return out


def method_costs(metrics: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """Per method: proxy transformer params (Mi), MB communicated, client seconds and server seconds."""
    out = {}
    for method, m in metrics.items():
        out[METHOD_NAMES.get(method, method)] = {
            "proxy params (Mi)": m["params"]["sub_transformer"] / MI,
            "communication (MB)": (m["cost"]["bytes_up"] + m["cost"]["bytes_down"]) / 1e6,
            "client seconds": m["cost"]["client_seconds"],
            "run seconds": m["cost"]["seconds"]}
    return out


def drop_vs_reference(accuracies: Mapping[str, float], reference: str = "fedpetuning") -> dict[str, float]:
    """Each method's accuracy minus the reference method's (points, same unit as the input)."""
    if reference not in accuracies:
        raise ConfigError(f"the reference method {reference!r} is missing from {sorted(accuracies)}")
    return {m: a - accuracies[reference] for m, a in accuracies.items()}


def gap_closed(accuracies: Mapping[str, float], method: str = "fedpft", low: str = "fedot",
               high: str = "fedpetuning") -> float | None:
    """How much of the gap between ``low`` (FedOT) and ``high`` (FedPETuning) ``method`` closes: 0 = no better
    than FedOT, 1 = as good as tuning the full FM. A scale-free reading that can be compared across papers;
    None when the two references tie (nothing to close)."""
    span = accuracies[high] - accuracies[low]
    return None if abs(span) < 1e-12 else (accuracies[method] - accuracies[low]) / span


# ----------------------------------------------------------------------------- the paper's numbers

PAPER_SOURCE = ("Peng et al., FedPFT, IJCAI 2024 (arXiv 2404.11536): Tables 1-3 as reproduced in the official "
                "repository's README images; listed in labs/METHOD.md#paper-numbers. Accuracy in %, GLUE dev sets, "
                "100 clients, 10% sampled per round.")

# Table 1 (IID): model -> method -> task -> accuracy. MNLI is matched / mismatched.
PAPER_TABLE1_IID: Mapping[str, Mapping[str, Mapping[str, float]]] = {
    "BERT": {"fedpetuning": {"SST-2": 91.6, "QNLI": 88.4, "MNLI-m": 80.7, "MNLI-mm": 81.6, "QQP": 87.8},
             "fedot": {"SST-2": 90.4, "QNLI": 83.9, "MNLI-m": 74.9, "MNLI-mm": 74.9, "QQP": 81.6},
             "fedpft": {"SST-2": 91.6, "QNLI": 87.5, "MNLI-m": 78.6, "MNLI-mm": 79.0, "QQP": 86.3}},
    "RoBERTa": {"fedpetuning": {"SST-2": 93.6, "QNLI": 90.8, "MNLI-m": 86.1, "MNLI-mm": 85.5, "QQP": 88.3},
                "fedot": {"SST-2": 92.8, "QNLI": 85.3, "MNLI-m": 80.6, "MNLI-mm": 81.4, "QQP": 84.6},
                "fedpft": {"SST-2": 93.1, "QNLI": 88.7, "MNLI-m": 83.4, "MNLI-mm": 83.2, "QQP": 87.1}},
}
PAPER_TRANSFORMER_PARAMS: Mapping[str, str] = {"fedpetuning": "81M", "fedot": "47M", "fedpft": "47M"}

# Table 2 (Dirichlet label skew, FLGo convention): model -> method -> task -> (Dir-1.0, Dir-5.0, Dir-10.0).
PAPER_TABLE2_DIRICHLET: Mapping[str, Mapping[str, Mapping[str, tuple[float, float, float]]]] = {
    "BERT": {"fedpetuning": {"SST-2": (90.6, 90.9, 91.1), "QNLI": (87.3, 87.9, 88.1)},
             "fedot": {"SST-2": (89.1, 89.9, 90.1), "QNLI": (82.4, 82.9, 83.1)},
             "fedpft": {"SST-2": (89.7, 91.1, 91.6), "QNLI": (86.1, 86.9, 87.2)}},
    "RoBERTa": {"fedpetuning": {"SST-2": (93.0, 93.3, 93.5), "QNLI": (90.2, 90.6, 90.8)},
                "fedot": {"SST-2": (91.7, 92.1, 92.8), "QNLI": (84.1, 84.6, 85.1)},
                "fedpft": {"SST-2": (92.1, 92.7, 93.1), "QNLI": (87.2, 87.6, 88.1)}},
}
DIRICHLET_ALPHAS = (1.0, 5.0, 10.0)

# Ablation (QNLI, IID): method -> (BERT, RoBERTa). FedPETuning is Table 1's QNLI column (the upper reference).
PAPER_ABLATION_QNLI: Mapping[str, tuple[float, float]] = {
    "fedpetuning": (88.4, 90.8), "fedot": (83.9, 85.3), "fedpft-n": (83.0, 78.9), "fedpft-b": (86.9, 86.7),
    "fedpft-d": (84.3, 85.5), "fedpft": (87.5, 88.7)}


def paper_table1_rows(task: str = "QNLI") -> list[dict]:
    """Table 1 rows for one task, as records (method, BERT, RoBERTa, transformer params)."""
    return [{"method": METHOD_NAMES[m], "BERT": PAPER_TABLE1_IID["BERT"][m][task],
             "RoBERTa": PAPER_TABLE1_IID["RoBERTa"][m][task], "transformer params": PAPER_TRANSFORMER_PARAMS[m]}
            for m in PAPER_TABLE1_IID["BERT"]]


def paper_table2_rows(task: str = "QNLI") -> list[dict]:
    """Table 2 rows for one task: one column per model and Dirichlet alpha."""
    rows = []
    for m in PAPER_TABLE2_DIRICHLET["BERT"]:
        row: dict[str, Any] = {"method": METHOD_NAMES[m]}
        for model in ("BERT", "RoBERTa"):
            for alpha, acc in zip(DIRICHLET_ALPHAS, PAPER_TABLE2_DIRICHLET[model][m][task]):
                row[f"{model} Dir-{alpha:g}"] = acc
        rows.append(row)
    return rows


def ours_vs_paper(final_accuracy: Mapping[str, float]) -> list[dict]:
    """Our final accuracies (fractions) next to the paper's QNLI ablation, as points and as drop vs FedPETuning.

    Absolute numbers are not comparable (other model, task and scale); the drop relative to the full-FM reference
    is the closest like-for-like reading.
    """
    ours_pts = {m: 100 * a for m, a in final_accuracy.items()}
    ours_drop = drop_vs_reference(ours_pts) if "fedpetuning" in ours_pts else {}
    bert = drop_vs_reference({m: v[0] for m, v in PAPER_ABLATION_QNLI.items()})
    roberta = drop_vs_reference({m: v[1] for m, v in PAPER_ABLATION_QNLI.items()})
    rows = []
    for m in PAPER_ABLATION_QNLI:
        if m not in ours_pts:
            continue
        rows.append({"method": METHOD_NAMES[m], "ours (%)": round(ours_pts[m], 1),
                     "ours vs FedPETuning (pts)": round(ours_drop[m], 1) if m in ours_drop else None,
                     "paper BERT QNLI (%)": PAPER_ABLATION_QNLI[m][0],
                     "paper BERT vs FedPETuning (pts)": round(bert[m], 1),
                     "paper RoBERTa QNLI (%)": PAPER_ABLATION_QNLI[m][1],
                     "paper RoBERTa vs FedPETuning (pts)": round(roberta[m], 1)})
    return rows


# ----------------------------------------------------------------------------- lab 08: two engines, one core

ENGINE_KEYS = ("accuracy", "sub_accuracy", "grad_cosine")


def engine_gaps(a: Sequence[Mapping], b: Sequence[Mapping], keys: Sequence[str] = ENGINE_KEYS) -> dict[str, float]:
    """The largest absolute difference between two runs' round records, per metric (0.0: identical curves).

    Rounds must match one to one: a run that stopped early is a different run, not a small difference.
    """
    if [r["round"] for r in a] != [r["round"] for r in b]:
        raise ConfigError(f"the two runs have different rounds: {[r['round'] for r in a]} vs {[r['round'] for r in b]}")
    gaps = {}
    for key in keys:
        pairs = [(x.get(key), y.get(key)) for x, y in zip(a, b)]
        if any((u is None) != (v is None) for u, v in pairs):
            gaps[key] = math.inf      # one engine measured it and the other did not
        else:
            gaps[key] = max((abs(u - v) for u, v in pairs if u is not None), default=0.0)
    return gaps


def message_sizes(rounds: Sequence[Mapping]) -> list[dict]:
    """Per training round (MB, 10^6 bytes): what FedPFT counts it sends down and up, and what Flower's records
    actually carried (``record["flower"]``, measured by the strategy), plus the carried/counted overhead in %."""
    rows = []
    for r in rounds:
        if r["round"] == 0 or "flower" not in r:
            continue
        f = r["flower"]
        counted, carried = r["bytes_down"] + r["bytes_up"], f["bytes_down"] + f["bytes_up"]
        rows.append({"round": r["round"], "clients": len(r["clients"]),
                     "down MB (counted)": r["bytes_down"] / 1e6, "down MB (carried)": f["bytes_down"] / 1e6,
                     "up MB (counted)": r["bytes_up"] / 1e6, "up MB (carried)": f["bytes_up"] / 1e6,
                     "overhead %": 100 * (carried / counted - 1) if counted else None})
    return rows


def holdings(metrics: Mapping) -> dict[str, dict[str, float]]:
    """What each kind of process holds, in MB of fp32 weights: the server the FM and its proxy copy, a client only
    its proxy; both the adapter (LoRA + head)."""
    p = metrics["params"]
    adapter = 4 * p["trainable"] / 1e6
    return {"server (ServerApp)": {"FM weights": p["fm_frozen_bytes"] / 1e6, "proxy weights": p["proxy_frozen_bytes"] / 1e6,
                                   "adapter": adapter},
            "client (ClientApp)": {"FM weights": 0.0, "proxy weights": p["proxy_frozen_bytes"] / 1e6,
                                   "adapter": adapter}}


def fm_refused_in_client(fm: str = models.DEFAULT_FM, timeout: float = 300) -> str:
    """Try to load the FM in a fresh process marked as a federated client, as the ClientApp marks its own, and
    return the one-line error it gets (the guard in :func:`fedpft_lab.models.load_fm`)."""
    import subprocess
    import sys

    code = f"from fedpft_lab import models; models.load_fm({fm!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, models.CLIENT_PROCESS: "1"})
    if done.returncode == 0:
        raise RuntimeError("a client process loaded the FM: the guard in models.load_fm is gone")
    return done.stderr.strip().splitlines()[-1]
