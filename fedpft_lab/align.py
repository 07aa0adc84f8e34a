"""Neuron-level alignment during FL: re-align only a proportion p of each compressed FFN.

The method: labs/METHOD.md#neuron-alignment.

1. In an alignment round each participating client records, per FFN neuron of every compressed layer,
   how active it was during local training. Only these per-neuron sums leave the client.
2. The server picks, per layer, the proportion ``p`` of *least* active neurons to update (the most active
   ones stay frozen, preserving what the clients' adapters rely on most).
3. Teacher = FM with the aggregated adapter, student = sub-FM with the same adapter; only the chosen
   neurons' W1 rows, b1 entries and W2 columns, plus b2 and the FFN-output LayerNorm, train.
4. The changed tensors are the "W_fro" package broadcast to clients with the next round's adapter.

Two activity rules: ``"apoz"`` counts exact zeros (the official code; GELU is exactly 0 almost never in
fp32, so it mostly breaks ties at random), ``"mean-abs"`` uses the mean |activation| over non-padded
tokens (the robust default).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import models
from .distill import DistillConfig, DistillResult, distill, ffn_parameters
from .errors import check_choice, check_range

RULES = ("mean-abs", "apoz")
LayerStats = dict[str, torch.Tensor]   # {"abs_sum": [m'], "zeros": [m'], "tokens": scalar}


class ActivationRecorder:
    """Forward hooks that accumulate per-neuron activity of the given layers while a client trains.

    Call :meth:`set_mask` with the batch's attention mask before each forward so padding is not counted.
    Use as a context manager; hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.model, self.layer_ids = model, list(layer_ids)
        self.stats: dict[int, LayerStats] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = mask

    def _hook(self, layer: int):
        def record(_module, _inputs, out: torch.Tensor) -> None:
            a = out.detach()
            if self._mask is not None and a.dim() == 3:
                keep = self._mask.bool()
                a = a[keep]                       # [tokens, m']
            else:
                a = a.reshape(-1, a.shape[-1])
            s = self.stats.setdefault(layer, {"abs_sum": torch.zeros(a.shape[-1], dtype=torch.float64),
                                              "zeros": torch.zeros(a.shape[-1], dtype=torch.float64),
                                              "tokens": torch.zeros((), dtype=torch.float64)})
            s["abs_sum"] += a.abs().sum(0).double()
            s["zeros"] += (a == 0).sum(0).double()
            s["tokens"] += a.shape[0]
        return record

    def __enter__(self) -> "ActivationRecorder":
        a = models.arch(self.model)
        stack = models.layers(self.model)
        self._handles = [stack[i].get_submodule(a.act).register_forward_hook(self._hook(i)) for i in self.layer_ids]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def merge_stats(all_stats: list[Mapping[int, LayerStats]]) -> dict[int, LayerStats]:
    """Sum client statistics (the server-side aggregation: totals, so large clients weigh more)."""
    out: dict[int, LayerStats] = {}
    for stats in all_stats:
        for layer, s in stats.items():
            acc = out.setdefault(layer, {k: torch.zeros_like(v) for k, v in s.items()})
            for k, v in s.items():
                acc[k] += v
    return out


def activity(stats: LayerStats, rule: str) -> torch.Tensor:
    """Per-neuron activity: high = important. APoZ is the zero *fraction*, so activity = 1 - APoZ."""
    check_choice("align_rule", rule, RULES)
    tokens = stats["tokens"].clamp_min(1)
    if rule == "apoz":
        return 1.0 - stats["zeros"] / tokens
    return stats["abs_sum"] / tokens


def choose_updated(stats: Mapping[int, LayerStats], proportion: float, rule: str = "mean-abs",
                   seed: int = 0) -> dict[int, torch.Tensor]:
    """Per layer, the ascending indices of the ``proportion`` least active neurons (the ones to update).

    Ties (everywhere, for APoZ on GELU) are broken by a seeded random permutation, as the official code does.
    """
    check_range("align_proportion", proportion, 0.0, 1.0, lo_open=True)
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, torch.Tensor] = {}
    for layer, s in sorted(stats.items()):
        act = activity(s, rule)
        m = act.numel()
        k = max(1, round(proportion * m))
        perm = torch.randperm(m, generator=gen)
        order = perm[torch.argsort(act[perm], stable=True)]   # least active first, random among ties
        chosen[layer] = torch.sort(order[:k]).values
    return chosen


def neuron_masks(model: nn.Module, updated: Mapping[int, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """Gradient masks that let only the updated neurons' W1 rows, b1 entries and W2 columns change."""
    masks: dict[nn.Parameter, torch.Tensor] = {}
    for layer, idx in updated.items():
        w1, w2, _ = models.ffn(model, layer)
        row = torch.zeros(w1.out_features, dtype=w1.weight.dtype)
        row[idx] = 1.0
        masks[w1.weight] = row[:, None].expand_as(w1.weight).clone()
        if w1.bias is not None:
            masks[w1.bias] = row.clone()
        masks[w2.weight] = row[None, :].expand_as(w2.weight).clone()
    return masks


def align_neurons(teacher: nn.Module, student: nn.Module, public: torch.Tensor,
                  updated: Mapping[int, torch.Tensor], cfg: DistillConfig, progress: bool = False,
                  on_step: Callable[[int, float], None] | None = None,
                  stop: threading.Event | None = None) -> DistillResult:
    """Neuron-level distillation of ``student`` towards ``teacher`` (both carrying the same adapter).

    Weight decay is forced to 0: with decoupled decay, frozen neurons would otherwise shrink.
    """
    layer_ids = sorted(updated)
    cfg = DistillConfig(**{**cfg.__dict__, "weight_decay": 0.0, "weight_term": 0.0})
    return distill(teacher, student, public, layer_ids, cfg, params=ffn_parameters(student, layer_ids),
                   grad_masks=neuron_masks(student, updated), progress=progress, desc="align",
                   on_step=on_step, stop=stop)


def weight_package(model: nn.Module, updated: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the server broadcasts after an alignment: the changed slices of each compressed FFN."""
    pkg: dict[str, torch.Tensor] = {}
    for layer, idx in sorted(updated.items()):
        w1, w2, norm = models.ffn(model, layer)
        p = f"layer{layer}."
        pkg[p + "idx"] = idx.to(torch.int32)
        pkg[p + "w1_rows"] = w1.weight.detach()[idx].clone()
        if w1.bias is not None:
            pkg[p + "b1"] = w1.bias.detach()[idx].clone()
        pkg[p + "w2_cols"] = w2.weight.detach()[:, idx].clone()
        if w2.bias is not None:
            pkg[p + "b2"] = w2.bias.detach().clone()
        if norm is not None:
            pkg[p + "norm_w"] = norm.weight.detach().clone()
            pkg[p + "norm_b"] = norm.bias.detach().clone()
    return pkg


@torch.no_grad()
def apply_weight_package(model: nn.Module, pkg: Mapping[str, torch.Tensor]) -> None:
    """Client side of the broadcast: write the received slices into the local sub-FM."""
    layers = sorted({int(k.split(".")[0][5:]) for k in pkg})
    for layer in layers:
        p = f"layer{layer}."
        idx = pkg[p + "idx"].long()
        w1, w2, norm = models.ffn(model, layer)
        w1.weight[idx] = pkg[p + "w1_rows"]
        if p + "b1" in pkg:
            w1.bias[idx] = pkg[p + "b1"]
        w2.weight[:, idx] = pkg[p + "w2_cols"]
        if p + "b2" in pkg:
            w2.bias.copy_(pkg[p + "b2"])
        if norm is not None and p + "norm_w" in pkg:
            norm.weight.copy_(pkg[p + "norm_w"])
            norm.bias.copy_(pkg[p + "norm_b"])
