"""The proxy's LoRA: where it sits, how FM and proxy are wrapped alike, and how a client rebuilds its proxy.

This module is the one place that LoRA-wraps a model (:func:`wrap_pair` for the server's FM + proxy, and every
notebook or bench measurement of them; :func:`wrap_proxy` for a proxy alone; :func:`build_proxy` on a client).
Both sides of a pair get the same LoRA config and seed, so the proxy starts from the FM's A_0; a layer-drop
proxy gets LoRA in exactly the proxy layers that came from the FM's adapter layers.

A client's proxy is rebuilt from a description and the frozen weights the server sent: never from the FM.
The server describes its proxy (:func:`proxy_spec`: which FM architecture, each compressed FFN's width, the kept
layers of a layer-drop emulator, where LoRA sits) and ships its frozen weights once. A client builds an
architecture of that shape from the FM's *config* alone (random weights, at once overwritten), wraps it with the
same LoRA and loads the shipped weights, strictly.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import adapters, models, subfm


def proxy_lora_layers(adapter_layers: Sequence[int] | None,
                      proxy_layers: Sequence[int] | None) -> list[int] | None:
    """The proxy layers that carry LoRA: those that came from an FM layer in ``adapter_layers``.

    ``adapter_layers=None``: every layer; ``proxy_layers=None``: the proxy has the FM's layer indices (sub-FM).
    """
    if adapter_layers is None or proxy_layers is None:
        return None if adapter_layers is None else list(adapter_layers)
    return [j for j, i in enumerate(proxy_layers) if i in adapter_layers]


def wrap_proxy(proxy: nn.Module, lora: adapters.LoRAConfig, seed: int,
               adapter_layers: Sequence[int] | None = None,
               proxy_layers: Sequence[int] | None = None) -> nn.Module:
    """``proxy`` (in place) with LoRA where the FM's ``adapter_layers`` landed (see :func:`proxy_lora_layers`)."""
    return adapters.add_lora(proxy, lora, proxy_lora_layers(adapter_layers, proxy_layers), seed=seed)


def wrap_pair(fm: nn.Module, proxy: nn.Module, lora: adapters.LoRAConfig, seed: int,
              adapter_layers: Sequence[int] | None = None,
              proxy_layers: Sequence[int] | None = None) -> tuple[nn.Module, nn.Module]:
    """(FM, proxy) with the same LoRA: the FM in ``adapter_layers`` (None: all), the proxy in the layers that came
    from them (``proxy_layers[j]``: the FM layer of proxy layer j; None: the FM's indices).

    The FM is deep-copied, so the workspace's FM stays bare for the next run; ``proxy`` is wrapped in place (pass a
    copy to keep it). The same ``seed`` on both sides: the FM's LoRA init is A_0, and the proxy's equals it.
    """
    fm_peft = adapters.add_lora(copy.deepcopy(fm), lora, adapter_layers, seed=seed)
    return fm_peft, wrap_proxy(proxy, lora, seed, adapter_layers, proxy_layers)


@dataclass(frozen=True)
class ProxySpec:
    fm: str                             # the FM's name: only its config (shapes) is read, never its weights
    num_labels: int
    ffn_widths: dict[int, int]          # compressed proxy layer -> neurons kept
    kept_layers: list[int] | None       # layer-drop emulator: the FM layers kept, in order
    lora_layers: list[int]              # proxy layers that carry LoRA
    lora: adapters.LoRAConfig
    seed: int

    def to_json(self) -> dict:
        out = asdict(self)
        out["ffn_widths"] = {str(k): v for k, v in self.ffn_widths.items()}
        return out

    @classmethod
    def from_json(cls, d: dict) -> "ProxySpec":
        return cls(d["fm"], int(d["num_labels"]), {int(k): int(v) for k, v in d["ffn_widths"].items()},
                   None if d["kept_layers"] is None else [int(i) for i in d["kept_layers"]],
                   [int(i) for i in d["lora_layers"]], adapters.LoRAConfig(**d["lora"]), int(d["seed"]))


def proxy_spec(fm_name: str, proxy: nn.Module, proxy_layers: list[int] | None, lora: adapters.LoRAConfig,
               seed: int) -> ProxySpec:
    """The description of the server's (LoRA-wrapped) ``proxy`` that a client needs to rebuild its shape."""
    base = models.unwrap(proxy)
    fm_width = models.load_fm_config(fm_name, base.config.num_labels).intermediate_size
    widths = {i: models.ffn_width(base, i) for i in range(models.num_layers(base))}
    lora_layers = sorted({adapters.layer_of(n) for n in adapters.adapter_state(proxy)} - {None})
    return ProxySpec(fm_name, base.config.num_labels, {i: w for i, w in widths.items() if w != fm_width},
                     proxy_layers, lora_layers, lora, seed)


def build_proxy(spec: ProxySpec, frozen: dict[str, torch.Tensor]) -> nn.Module:
    """The client's proxy: the shape of ``spec``, LoRA-wrapped, holding exactly the ``frozen`` weights shipped."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    models.quiet_transformers()
    config = models.load_fm_config(spec.fm, spec.num_labels)
    auto = AutoModelForImageClassification if config.model_type == "vit" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        model = auto.from_config(config).eval()   # placeholder weights, all overwritten below
    if spec.kept_layers is not None:
        model = subfm.build_layer_drop(model, spec.kept_layers)
    for i, width in spec.ffn_widths.items():
        subfm.compress_layer_(model, i, torch.arange(width))
    model = adapters.add_lora(model, spec.lora, spec.lora_layers, seed=spec.seed)
    params = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    if set(params) != set(frozen) or any(params[n].shape != frozen[n].shape for n in params):
        raise ValueError("the frozen weights received do not fit the proxy described by the server")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(frozen[n])
    return model.eval()


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen weight of ``model`` by name, on the CPU: what a client keeps between rounds."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if not p.requires_grad}
