"""How different are the gradients a client computes on the proxy from those the FM would give?

The measurements: labs/METHOD.md#measurements.

FedPFT's convergence argument rests on this gradient discrepancy staying small: clients descend the
sub-FM's loss, but the adapter is evaluated in the FM. We load the *same* adapter into both models, take
gradients of the task loss with respect to the adapter on the *same* labelled batches (eval mode, no
dropout), and compare them: cosine similarity and relative L2 error, overall, per layer and per module,
plus two cheaper proxies of the gap, the per-layer hidden-state relative MSE and the KL between logits.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters
from .distill import relative_mse


@dataclass
class Discrepancy:
    cosine: float                      # cosine of the mean gradients over all batches
    rel_l2: float                      # ||g_proxy - g_fm|| / ||g_fm|| of the mean gradients
    cosine_batch_mean: float           # the same per batch, averaged: exposes batch noise
    rel_l2_batch_mean: float
    per_layer: list[dict] = field(default_factory=list)      # {layer, cosine, rel_l2} (FM layer index)
    per_module: dict[str, dict] = field(default_factory=dict)  # {"q.lora_A": {cosine, rel_l2}, ..., "head": ...}
    hidden_rel_mse: list[float | None] = field(default_factory=list)  # per FM layer; None = no proxy counterpart
    logit_kl: float = 0.0              # KL(FM || proxy) of the predicted class distributions

    def to_json(self) -> dict:
        return asdict(self)


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor], **kw):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, **kw)


def adapter_gradients(model: nn.Module, batch: Mapping[str, torch.Tensor],
                      keep_outputs: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    """d CE / d adapter for one labelled batch (the model's trainable parameters), eval mode.

    With ``keep_outputs`` the same forward also returns the hidden states, so measuring the hidden-state
    gap costs no second forward pass.
    """
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    out = _forward(model, batch, output_hidden_states=keep_outputs)
    loss = F.cross_entropy(out.logits, batch["labels"])
    grads = torch.autograd.grad(loss, params)
    return {n: g.detach().cpu() for n, g in zip(names, grads)}, out   # compared in float64, on the CPU


def _cos_rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(cosine(a, b), ||a - b|| / ||b||) for flat float64 vectors; b is the reference (the FM)."""
    nb = b.norm()
    if nb == 0 and a.norm() == 0:
        return 1.0, 0.0
    cos = torch.dot(a, b) / (a.norm() * nb).clamp_min(1e-30)
    rel = (a - b).norm() / nb.clamp_min(1e-30)
    return float(cos), float(rel)


def _flat(grads: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([grads[k].reshape(-1).double() for k in keys])


@dataclass
class BatchTerms:
    """What one probe batch contributes to a :class:`Discrepancy` (so batches can be measured in parallel)."""

    g_fm: dict[str, torch.Tensor]      # adapter gradients of the FM, FM naming
    g_px: dict[str, torch.Tensor]      # ... of the proxy, translated to FM naming
    kl_sum: float                      # summed KL(FM || proxy) over the batch's examples
    examples: int
    hidden: dict[int, float]           # FM layer -> hidden-state relative MSE on this batch
    fm_layers: int


def batch_terms(fm: nn.Module, proxy: nn.Module, batch: Mapping[str, torch.Tensor],
                proxy_to_fm: Mapping[int, int] | None = None) -> BatchTerms:
    """Gradients, logit KL and hidden-state gaps of one labelled batch; both models must be in eval mode."""
    g_fm, o_fm = adapter_gradients(fm, batch, keep_outputs=True)
    g_px, o_px = adapter_gradients(proxy, batch, keep_outputs=True)
    if proxy_to_fm:
        g_px = adapters.translate(g_px, proxy_to_fm)
    hidden: dict[int, float] = {}
    with torch.no_grad():
        logp_fm = F.log_softmax(o_fm.logits.cpu().double(), -1)
        logp_px = F.log_softmax(o_px.logits.cpu().double(), -1)
        kl_sum = float((logp_fm.exp() * (logp_fm - logp_px)).sum())
        mask = batch.get("attention_mask")
        for j in range(1, len(o_px.hidden_states)):
            fm_l = proxy_to_fm[j - 1] if proxy_to_fm else j - 1
            hidden[fm_l] = relative_mse(o_fm.hidden_states[fm_l + 1], o_px.hidden_states[j], mask).item()
    return BatchTerms(g_fm, g_px, kl_sum, len(logp_fm), hidden, len(o_fm.hidden_states) - 1)


def combine(terms: Sequence[BatchTerms]) -> Discrepancy:
    """The discrepancy over all probe batches, from their terms in batch order (the mean gradients compared)."""
    mean_fm: dict[str, torch.Tensor] = {}
    mean_px: dict[str, torch.Tensor] = {}
    batch_cos, batch_rel = [], []
    hid_sum: dict[int, float] = defaultdict(float)
    for t in terms:
        keys = sorted(set(t.g_fm) & set(t.g_px))
        c, r = _cos_rel(_flat(t.g_px, keys), _flat(t.g_fm, keys))
        batch_cos.append(c), batch_rel.append(r)
        for k in keys:
            mean_fm[k] = mean_fm.get(k, 0) + t.g_fm[k].double() / len(terms)
            mean_px[k] = mean_px.get(k, 0) + t.g_px[k].double() / len(terms)
        for layer, value in t.hidden.items():
            hid_sum[layer] += value
    keys = sorted(mean_fm)
    cos, rel = _cos_rel(_flat(mean_px, keys), _flat(mean_fm, keys))
    by_layer: dict[int, list[str]] = defaultdict(list)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        if adapters.layer_of(k) is not None:
            by_layer[adapters.layer_of(k)].append(k)
        by_kind[adapters.module_kind(k)].append(k)
    per_layer = [dict(zip(("layer", "cosine", "rel_l2"), (l, *_cos_rel(_flat(mean_px, ks), _flat(mean_fm, ks)))))
                 for l, ks in sorted(by_layer.items())]
    per_module = {kind: dict(zip(("cosine", "rel_l2"), _cos_rel(_flat(mean_px, ks), _flat(mean_fm, ks))))
                  for kind, ks in sorted(by_kind.items())}
    n_fm_layers = terms[-1].fm_layers if terms else 0
    hidden = [hid_sum[l] / len(terms) if l in hid_sum else None for l in range(n_fm_layers)]
    examples = sum(t.examples for t in terms)
    return Discrepancy(cosine=cos, rel_l2=rel,
                       cosine_batch_mean=sum(batch_cos) / max(1, len(batch_cos)),
                       rel_l2_batch_mean=sum(batch_rel) / max(1, len(batch_rel)),
                       per_layer=per_layer, per_module=per_module, hidden_rel_mse=hidden,
                       logit_kl=sum(t.kl_sum for t in terms) / max(1, examples))


def gradient_discrepancy(fm: nn.Module, proxy: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                         state: Mapping[str, torch.Tensor] | None = None,
                         proxy_layers: Sequence[int] | None = None) -> Discrepancy:
    """Compare adapter gradients of ``proxy`` with those of ``fm`` on ``batches``.

    Both models must be peft-wrapped with the same LoRA targets (for a layer-drop proxy, a subset of them).
    ``state`` (in FM naming) is loaded into both first when given. ``proxy_layers[j]`` is the FM layer that
    proxy layer j came from (``None`` = identical layer indices, the sub-FM case); only parameters present
    in both models are compared, i.e. what a layer-drop proxy actually shares.
    """
    if state is not None:
        load_state(fm, proxy, state, proxy_layers)
    modes = fm.training, proxy.training
    fm.eval(), proxy.eval()
    proxy_to_fm = adapters.layer_key_map(proxy_layers)
    try:
        return combine([batch_terms(fm, proxy, b, proxy_to_fm) for b in batches])
    finally:
        fm.train(modes[0]), proxy.train(modes[1])


def update_disparity(start: Mapping[str, torch.Tensor], proxy_state: Mapping[str, torch.Tensor],
                     fm_state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """(cosine, relative L2) of the adapter change a round made on the proxy vs on the FM, both from ``start``
    (labs/METHOD.md#measurements): the quantity FL actually plugs in. The FM's change is the reference."""
    keys = sorted(start)
    d_px = _flat({k: proxy_state[k].double() - start[k].double() for k in keys}, keys)
    d_fm = _flat({k: fm_state[k].double() - start[k].double() for k in keys}, keys)
    return _cos_rel(d_px, d_fm)


def load_state(fm: nn.Module, proxy: nn.Module, state: Mapping[str, torch.Tensor],
               proxy_layers: Sequence[int] | None = None) -> None:
    """Load one adapter state (FM naming) into the FM and, for the layers it has, into the proxy."""
    adapters.load_adapter_state(fm, state)
    adapters.load_adapter_state(proxy, adapters.to_proxy_names(state, proxy_layers))
