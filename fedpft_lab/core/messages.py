"""The two messages of a round, as plain data, and their flat wire form.

An engine ships a message as three flat dicts (see :func:`broadcast_to_records` / :func:`update_to_records`):
``arrays`` (``name -> tensor``), an optional second tensor dict, and ``config`` (``name -> int/float/bool``).
Nothing here knows which engine carries them; :mod:`fedpft_lab.engines.flower.records` wraps the dicts in Flower
records, the in-process engine hands the objects over directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import adapters

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """What a client needs to know once, before its first round: how to train, and which layers' FFN activity
    to record when asked (the sub-FM's compressed layers; empty for proxies that never align)."""

    local_epochs: int
    batch_size: int
    max_grad_norm: float
    dropout: bool
    stat_layers: tuple[int, ...] = ()
    group_by_length: bool = False           # FedConfig.group_by_length: which examples share a batch

    def to_json(self) -> dict:
        return {"local_epochs": self.local_epochs, "batch_size": self.batch_size,
                "max_grad_norm": self.max_grad_norm, "dropout": self.dropout, "stat_layers": list(self.stat_layers),
                "group_by_length": self.group_by_length}

    @classmethod
    def from_json(cls, d: dict) -> "TrainSettings":
        return cls(int(d["local_epochs"]), int(d["batch_size"]), float(d["max_grad_norm"]), bool(d["dropout"]),
                   tuple(int(i) for i in d["stat_layers"]), bool(d.get("group_by_length", False)))


@dataclass
class Broadcast:
    """What the server sends one client for one round.

    ``adapter`` is in the proxy's own layer names (the server renames; a client never sees FM names).
    ``package``: W_fro slices the client's proxy lacks (the union of the alignments it missed), or empty.
    """

    round: int
    client: int
    adapter: Tensors
    lr: float
    seed: int
    record_stats: bool
    package: Tensors = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of tensors this broadcast carries: the adapter and the package."""
        return adapters.nbytes(self.adapter) + adapters.nbytes(self.package)


@dataclass
class ClientUpdate:
    """Everything a client sends: its adapter, its example count, and (alignment rounds) activity sums."""

    client: int
    adapter: Tensors
    num_examples: int
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    def nbytes(self) -> int:
        return adapters.nbytes(self.adapter) + sum(adapters.nbytes(s) for s in self.stats.values())


# --------------------------------------------------------------------------- flat wire form

def broadcast_to_records(b: Broadcast) -> tuple[Tensors, Tensors, dict]:
    """(adapter, package, config) of ``b``: two tensor dicts and one dict of scalars."""
    config = {"round": b.round, "client": b.client, "lr": b.lr, "seed": b.seed, "record_stats": b.record_stats}
    return dict(b.adapter), dict(b.package), config


def broadcast_from_records(adapter: Tensors, package: Tensors, config: dict) -> Broadcast:
    return Broadcast(int(config["round"]), int(config["client"]), dict(adapter), float(config["lr"]),
                     int(config["seed"]), bool(config["record_stats"]), dict(package))


def update_to_records(u: ClientUpdate) -> tuple[Tensors, Tensors, dict]:
    """(adapter, stats flattened as ``"{layer}.{key}"``, metrics) of ``u``."""
    stats = {f"{layer}.{k}": v for layer, s in u.stats.items() for k, v in s.items()}
    return dict(u.adapter), stats, {"client": u.client, "num_examples": u.num_examples, "seconds": u.seconds}


def update_from_records(adapter: Tensors, stats: Tensors, metrics: dict) -> ClientUpdate:
    nested: dict[int, dict[str, torch.Tensor]] = {}
    for name, v in stats.items():
        layer, key = name.split(".", 1)
        nested.setdefault(int(layer), {})[key] = v
    return ClientUpdate(int(metrics["client"]), dict(adapter), int(metrics["num_examples"]), nested,
                        float(metrics["seconds"]))
