"""Core messages <-> Flower records: the flat forms of :mod:`fedpft_lab.core.messages` in Flower's containers.

Tensors travel in ``ArrayRecord`` s, scalars in ``ConfigRecord`` (down) or ``MetricRecord`` (up); the one-off
setup of a client (data configuration, proxy description, training settings) travels as JSON strings.
"""
from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ...core.messages import (Broadcast, ClientUpdate, broadcast_from_records, broadcast_to_records,
                              update_from_records, update_to_records)

ADAPTER, PACKAGE, CONFIG = "arrays", "package", "config"       # a broadcast
FROZEN, SETUP = "frozen", "setup"                               # a client's first broadcast adds these
STATS, METRICS = "stats", "metrics"                             # an update


def arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in tensors.items()})


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def broadcast_content(b: Broadcast, frozen: dict[str, torch.Tensor] | None = None,
                      setup: dict | None = None) -> RecordDict:
    """The content of ``b``'s message; a client's first also carries its proxy's frozen weights and its setup."""
    adapter, package, config = broadcast_to_records(b)
    content = RecordDict({ADAPTER: arrays(adapter), CONFIG: ConfigRecord(config)})
    if package:
        content[PACKAGE] = arrays(package)
    if frozen is not None:
        content[FROZEN] = arrays(frozen)
    if setup is not None:
        content[SETUP] = ConfigRecord({k: json.dumps(v) for k, v in setup.items()})
    return content


def read_broadcast(content: RecordDict) -> Broadcast:
    package = tensors(content[PACKAGE]) if PACKAGE in content else {}
    return broadcast_from_records(tensors(content[ADAPTER]), package, dict(content[CONFIG]))


def read_setup(record: ConfigRecord) -> dict:
    return {k: json.loads(v) for k, v in record.items()}


def update_content(u: ClientUpdate) -> RecordDict:
    adapter, stats, metrics = update_to_records(u)
    content = RecordDict({ADAPTER: arrays(adapter), METRICS: MetricRecord(metrics)})
    if stats:
        content[STATS] = arrays(stats)
    return content


def read_update(content: RecordDict) -> ClientUpdate:
    stats = tensors(content[STATS]) if STATS in content else {}
    return update_from_records(tensors(content[ADAPTER]), stats, dict(content[METRICS]))


def carried_bytes(content: RecordDict) -> int:
    """Bytes a message's ``ArrayRecord`` s carry, as Flower counts them: data, plus each array's name and header."""
    return sum(r.count_bytes() for r in content.array_records.values())


def carried_arrays(content: RecordDict) -> int:
    return sum(len(r) for r in content.array_records.values())
