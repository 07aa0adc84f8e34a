"""A client's proxy rebuilt from a description and the frozen weights the server sent: never from the FM.

The server describes its proxy (:func:`proxy_spec`: which FM architecture, each compressed FFN's width, the kept
layers of a layer-drop emulator, where LoRA sits) and ships its frozen weights once. A client builds an
architecture of that shape from the FM's *config* alone (random weights, at once overwritten), wraps it with the
same LoRA (:func:`fedpft_lab.adapters.add_lora`, the one place that wraps) and loads the shipped weights, strictly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import adapters, models, subfm


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
