"""The adapter that clients train and the server aggregates: LoRA on attention (via peft) plus the task head.

An *adapter state* is a plain ``{parameter name: tensor}`` dict of everything trainable. FM and sub-FM
have identical attention modules and module names, so the same state loads into either: that is the
"plug-in" of FedPFT. For a layer-drop proxy the layer indices differ: :func:`to_proxy_names` and
:func:`to_fm_names` translate, and they are the package's only FM <-> proxy renaming.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .errors import check_range

AdapterState = dict[str, torch.Tensor]
_LAYER_RE = re.compile(r"\.(?:layer|layers)\.(\d+)\.")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on query/key/value/attention-output of the chosen layers; the head is trained in full."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_range("lora_rank", self.rank, 1, 1024)
        check_range("lora_alpha", self.alpha, 0.0, None, lo_open=True)
        check_range("lora_dropout", self.dropout, 0.0, 1.0, hi_open=True)


def target_regex(model: nn.Module, layer_ids: Iterable[int] | None = None) -> str:
    """A peft ``target_modules`` regex matching q, k, v and the attention output of ``layer_ids``."""
    a = models.arch(model)
    ids = range(models.num_layers(model)) if layer_ids is None else layer_ids
    layer_alt = "|".join(str(i) for i in sorted(set(ids)))
    mod_alt = "|".join(re.escape(m) for m in (a.q, a.k, a.v, a.o))
    return rf"(.*\.)?{re.escape(a.layers)}\.({layer_alt})\.({mod_alt})"


def add_lora(model: nn.Module, cfg: LoRAConfig, layer_ids: Iterable[int] | None = None, seed: int = 0) -> nn.Module:
    """Wrap ``model`` with peft LoRA (in place) and return the peft model; everything else is frozen.

    ``seed`` fixes the LoRA A initialisation so the same global adapter can be rebuilt anywhere.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                        target_modules=target_regex(model, layer_ids), modules_to_save=["classifier"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def adapter_state(model: nn.Module) -> AdapterState:
    """A detached copy of every trainable tensor (LoRA A/B and the head), on the CPU: what goes on the wire."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``model``: the plug-in.

    Strict both ways, because a silent partial load is the worst failure a plug-in can have: a state key the
    model lacks would be dropped, and a trainable parameter the state lacks would keep a *stale* adapter from an
    earlier round, and the accuracy measured would belong to neither. Names must match exactly (see
    :func:`to_proxy_names` for layer-drop proxies).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(state) - set(params))
    stale = sorted(set(params) - set(state))
    if unknown or stale:
        def show(keys: list[str]) -> str:
            return f"{keys[:2]}{f' and {len(keys) - 2} more' if len(keys) > 2 else ''}"
        raise KeyError(f"adapter state does not match the model's adapter: "
                       f"{len(unknown)} keys not in the model {show(unknown)}, "
                       f"{len(stale)} trainable parameters missing from the state {show(stale)}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def layer_of(name: str) -> int | None:
    """The transformer layer index in a parameter name, or None (head, embeddings)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


_PROJ_SHORT = {"query": "q", "q_proj": "q", "key": "k", "k_proj": "k", "value": "v", "v_proj": "v",
               "dense": "o", "o_proj": "o"}


def module_kind(name: str) -> str:
    """A short label for grouping: ``q.lora_A``, ``o.lora_B`` (attention output), ``head``."""
    if ".lora_" not in name:
        return "head"
    before, after = name.split(".lora_", 1)
    proj = _PROJ_SHORT.get(before.rsplit(".", 1)[-1], before.rsplit(".", 1)[-1])
    return f"{proj}.lora_{after.split('.', 1)[0]}"


def remap_layers(name: str, mapping: Mapping[int, int]) -> str:
    """Rename the layer index in ``name`` through ``mapping`` (for layer-drop proxies)."""
    i = layer_of(name)
    if i is None:
        return name
    return _LAYER_RE.sub(lambda m: m.group(0).replace(f".{i}.", f".{mapping[i]}."), name, count=1)


def layer_key_map(kept_layers: Sequence[int] | None) -> dict[int, int] | None:
    """Proxy layer j -> FM layer kept_layers[j]; None when the proxy has the FM's layer indices (sub-FM)."""
    return None if kept_layers is None else {j: fm_i for j, fm_i in enumerate(kept_layers)}


def translate(state: Mapping[str, torch.Tensor], mapping: Mapping[int, int]) -> AdapterState:
    """``state`` with every layer index renamed through ``mapping`` (each key's layer must be in it)."""
    return {remap_layers(k, mapping): v for k, v in state.items()}


def to_proxy_names(state: Mapping[str, torch.Tensor], proxy_layers: Sequence[int] | None) -> AdapterState:
    """The part of an FM-named adapter ``state`` that the proxy holds, in the proxy's layer names.

    ``proxy_layers[j]`` is the FM layer that proxy layer j came from (None: the same indices, ``state`` as it
    is). FM layers the proxy dropped are left out: a layer-drop proxy shares only part of the FM's adapter.
    """
    if proxy_layers is None:
        return state
    fm_to_proxy = {fm_i: j for j, fm_i in enumerate(proxy_layers)}
    return translate({k: v for k, v in state.items() if layer_of(k) is None or layer_of(k) in fm_to_proxy},
                     fm_to_proxy)


def to_fm_names(state: Mapping[str, torch.Tensor], proxy_layers: Sequence[int] | None) -> AdapterState:
    """A proxy-named adapter ``state`` in the FM's layer names (see :func:`to_proxy_names`)."""
    return state if proxy_layers is None else translate(state, layer_key_map(proxy_layers))


def fedavg(states: list[Mapping[str, torch.Tensor]], weights: list[float]) -> AdapterState:
    """Weighted average of adapter states, weights = client data sizes (normalised here).

    LoRA A and B are averaged separately, as in FedAvg of any parameters; note mean(B)·mean(A) is not
    mean(B·A), one of the quirks of federated LoRA.
    """
    if not states:
        raise ValueError("fedavg needs at least one client state")
    total = float(sum(weights))
    check_range("sum of client weights", total, 0.0, None, lo_open=True)
    out: AdapterState = {}
    for k in states[0]:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += s[k].double() * (w / total)
        out[k] = acc.to(states[0][k].dtype)
    return out


def nbytes(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes on the wire for a set of tensors (raw, uncompressed)."""
    vals = tensors.values() if isinstance(tensors, Mapping) else tensors
    return int(sum(t.numel() * t.element_size() for t in vals))
