"""Building the proxy the clients fine-tune: FedPFT's layer-wise sub-FM and FedOT's layer-drop emulator.

Layer-wise compression (FedPFT, labs/METHOD.md#sub-fm) keeps *every* layer but only the most salient FFN neurons in the
compressed ones, so each FM layer keeps a matching sub-FM layer and the attention modules (where LoRA lives)
are untouched. Layer-drop (Offsite-Tuning / FedOT, labs/METHOD.md#baselines) instead removes whole middle layers.

Both results are ordinary transformers models with the FM's module names, so an adapter moves between
proxy and FM by copying a state dict.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from . import models
from .config import SELECTIONS
from .errors import ConfigError, check_choice, check_range


@dataclass(frozen=True)
class SubFMConfig:
    """How to compress the FM. ``retained_layers=None`` means the first and the last layer (the paper's choice)."""

    keep_ratio: float = 0.25
    retained_layers: tuple[int, ...] | None = None
    selection: str = "saliency"
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("keep_ratio", self.keep_ratio, 0.0, 1.0, lo_open=True)
        check_choice("selection", self.selection, SELECTIONS)
        if self.retained_layers is not None:
            object.__setattr__(self, "retained_layers", tuple(sorted({int(i) for i in self.retained_layers})))

    def retained(self, num_layers: int) -> tuple[int, ...]:
        """The retained layer indices for a model with ``num_layers`` layers (validated against it)."""
        if self.retained_layers is None:
            return tuple(sorted({0, num_layers - 1}))
        for i in self.retained_layers:
            if not 0 <= i < num_layers:
                raise ConfigError(f"retained_layers entries must be in [0, {num_layers - 1}] for this "
                                  f"{num_layers}-layer FM, got {i}")
        return self.retained_layers

    def compressed(self, num_layers: int) -> tuple[int, ...]:
        keep = set(self.retained(num_layers))
        return tuple(i for i in range(num_layers) if i not in keep)


@dataclass
class SubFMInfo:
    """What was kept: per compressed layer, the FM neuron indices (ascending) that the sub-FM holds."""

    num_layers: int
    fm_width: list[int]
    kept: dict[int, list[int]] = field(default_factory=dict)

    @property
    def compressed(self) -> list[int]:
        return sorted(self.kept)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "fm_width": self.fm_width,
                "kept": {str(k): v for k, v in self.kept.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "SubFMInfo":
        return cls(d["num_layers"], d["fm_width"], {int(k): v for k, v in d["kept"].items()})


def neuron_saliency(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Saliency of each FFN neuron: the L2 norm of every weight touching it (labs/METHOD.md#sub-fm).

    ``w1`` is the up-projection weight (m x d, row i feeds neuron i) and ``w2`` the down-projection
    weight (d x m, column i leaves neuron i). Biases are not part of the score.
    """
    return torch.sqrt(w1.pow(2).sum(dim=1) + w2.pow(2).sum(dim=0))


def select_neurons(saliency: torch.Tensor, k: int, selection: str = "saliency",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the ``k`` neurons to keep, in ascending (original) order so the FFN keeps its layout."""
    check_choice("selection", selection, SELECTIONS)
    check_range("k", k, 1, saliency.numel())
    if selection == "saliency":
        idx = torch.topk(saliency, k).indices
    else:
        idx = torch.randperm(saliency.numel(), generator=generator)[:k]
    return torch.sort(idx).values


def _sliced_linear(src: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding ``src.weight[rows][:, cols]`` (and the matching bias): weights copied, not shared."""
    w = src.weight.detach()
    b = src.bias.detach() if src.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def compress_layer_(model: nn.Module, index: int, keep: torch.Tensor) -> None:
    """Replace layer ``index``'s FFN by the sub-FFN on neurons ``keep`` (labs/METHOD.md#sub-fm), in place."""
    a = models.arch(model)
    layer = models.layers(model)[index]
    w1, w2, _ = models.ffn(model, index)
    parent1, name1 = a.fc1.rsplit(".", 1)
    parent2, name2 = a.fc2.rsplit(".", 1)
    setattr(layer.get_submodule(parent1), name1, _sliced_linear(w1, rows=keep))
    setattr(layer.get_submodule(parent2), name2, _sliced_linear(w2, cols=keep))  # b2 is copied whole


def plan_sub_fm(fm: nn.Module, cfg: SubFMConfig) -> SubFMInfo:
    """Decide which neurons each compressed layer keeps, without building anything."""
    n = models.num_layers(fm)
    widths = [models.ffn_width(fm, i) for i in range(n)]
    gen = torch.Generator().manual_seed(cfg.seed)
    info = SubFMInfo(num_layers=n, fm_width=widths)
    for i in cfg.compressed(n):
        w1, w2, _ = models.ffn(fm, i)
        k = max(1, round(cfg.keep_ratio * widths[i]))
        sal = neuron_saliency(w1.weight.detach(), w2.weight.detach())
        info.kept[i] = select_neurons(sal, k, cfg.selection, gen).tolist()
    return info


def apply_plan(fm: nn.Module, info: SubFMInfo) -> nn.Module:
    """A deep copy of ``fm`` with the planned layers compressed. The FM itself is not modified."""
    sub = copy.deepcopy(fm)
    for i, keep in info.kept.items():
        compress_layer_(sub, i, torch.tensor(keep, dtype=torch.long))
    sub.fedpft_info = info
    return sub


def build_sub_fm(fm: nn.Module, cfg: SubFMConfig) -> tuple[nn.Module, SubFMInfo]:
    """Layer-wise compression of the FM into the sub-FM (labs/METHOD.md#sub-fm)."""
    info = plan_sub_fm(fm, cfg)
    return apply_plan(fm, info), info


# --------------------------------------------------------------------------- FedOT layer-drop emulator

def uniform_layers(candidates: list[int], k: int) -> list[int]:
    """``k`` of ``candidates`` spread uniformly, ends included (Offsite-Tuning's emulator rule)."""
    if k <= 0:
        return []
    if k >= len(candidates):
        return list(candidates)
    if k == 1:
        return [candidates[len(candidates) // 2]]
    step = (len(candidates) - 1) / (k - 1)
    return sorted({candidates[round(j * step)] for j in range(k)})


def emulator_layers(fm: nn.Module, adapter_layers: tuple[int, ...] | None = None,
                    target_params: int | None = None, num_emulator: int | None = None) -> list[int]:
    """Which FM layers the layer-drop emulator keeps.

    Bottom and top layers are the trainable *adapter* layers; a uniformly chosen subset of the middle
    layers forms the frozen *emulator*. By default the emulator is sized so the proxy's transformer
    parameters match ``target_params`` (the sub-FM's) as closely as possible.
    """
    n = models.num_layers(fm)
    adapters = sorted(set(adapter_layers)) if adapter_layers is not None else sorted({0, n - 1})
    for i in adapters:
        if not 0 <= i < n:
            raise ConfigError(f"adapter_layers entries must be in [0, {n - 1}], got {i}")
    middle = [i for i in range(n) if i not in adapters]
    if num_emulator is None:
        per_layer = models.transformer_params(fm) / n
        budget = (target_params if target_params is not None else models.transformer_params(fm)) / per_layer
        num_emulator = min(len(middle), max(0, round(budget - len(adapters))))
    check_range("num_emulator", num_emulator, 0, len(middle))
    return sorted(adapters + uniform_layers(middle, num_emulator))


def build_layer_drop(fm: nn.Module, kept_layers: list[int]) -> nn.Module:
    """A deep copy of the FM keeping only ``kept_layers`` (in order); weights copied from the FM."""
    proxy = copy.deepcopy(fm)
    stack = models.layers(proxy)
    new_stack = nn.ModuleList([stack[i] for i in kept_layers])
    parent, name = models.arch(proxy).layers.rsplit(".", 1) if "." in models.arch(proxy).layers else ("", models.arch(proxy).layers)
    owner = models.backbone(proxy).get_submodule(parent) if parent else models.backbone(proxy)
    setattr(owner, name, new_stack)
    proxy.config.num_hidden_layers = len(kept_layers)
    proxy.fedot_layers = list(kept_layers)
    return proxy
