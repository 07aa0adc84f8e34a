"""The Flower ClientApp: one FedPFT client, holding only its proxy and its own shard.

Each message runs in a fresh ``flwr-clientapp`` process, so what a client must remember between rounds (its
proxy's frozen weights as last updated, and its setup) is kept outside it: on the client's own disk when its
SuperNode names a folder (:data:`STORE`; every engine and ``fedpft-lab client`` set one), else in Flower's
``context.state``. Not in ``context.state`` where it can be avoided: Flower 1.42 uploads it to the SuperNode in one
HTTP request with one try and a 30 s timeout when the process ends, and ~80 MB of proxy per client (MiniLM's) did
not make it with 8 clients at once on a loaded 2-core machine (the SuperNode logs ``push-task-output ...
ClientDisconnect``, and the client's next round finds no proxy).

Before anything is imported that could load a model, the process is marked a client process:
:func:`fedpft_lab.models.load_fm` raises there, so the FM's weights cannot reach a client even by mistake.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ... import io, models
from . import records
from .deploy import CLIENT_STORE as STORE   # a folder of this client's own, where its proxy waits for its next round

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client (partition) this node serves: the server maps its sampled clients to nodes with it."""
    return Message(RecordDict({"node": ConfigRecord({"partition-id": _partition(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: rebuild the proxy from the kept weights, run the core client step, reply with the update."""
    os.environ[models.CLIENT_PROCESS] = "1"
    from ... import parallel, workspace
    from ...config import DataConfig
    from ...core.client import client_step
    from ...core.messages import TrainSettings
    from ...core.proxy import ProxySpec, build_proxy, frozen_state

    content = msg.content
    first = records.SETUP in content   # the first round this client takes part in: its setup and proxy arrive
    broadcast = records.read_broadcast(content)
    if broadcast.client != _partition(context):
        raise ValueError(f"a broadcast for client {broadcast.client} reached the node serving {_partition(context)}")
    setup_json, frozen = ((dict(content[records.SETUP]), records.tensors(content[records.FROZEN])) if first
                          else kept(context))
    setup = records.read_setup(setup_json)
    with parallel.single_threaded_ops():   # one thread, as every in-process client: the same sums, bit for bit
        model = build_proxy(ProxySpec.from_json(setup["proxy"]), frozen)
        shard, pad_id = workspace.client_data(DataConfig(**setup["data"]), broadcast.client)
        update = client_step(model, shard, broadcast, TrainSettings.from_json(setup["train"]), pad_id)
    if first or broadcast.package:   # a new proxy, or the W_fro slices are now part of it: keep it
        keep(context, setup_json, frozen_state(model))
    return Message(records.update_content(update), reply_to=msg)


def _stored(context: Context) -> Path | None:
    folder = os.environ.get(STORE)
    return Path(folder) / f"run-{context.run_id}" / f"client-{_partition(context)}.pt" if folder else None


def keep(context: Context, setup: dict[str, str], frozen: dict[str, torch.Tensor]) -> None:
    """Remember this client's setup (JSON strings) and proxy weights until its next round of this run."""
    path = _stored(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_torch_save({"setup": setup, "frozen": frozen}, path)
    else:
        context.state[records.SETUP] = ConfigRecord(setup)
        context.state[records.FROZEN] = records.arrays(frozen)


def kept(context: Context) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """What :func:`keep` remembered; a clear error if nothing (the server sends a proxy with a first round)."""
    path = _stored(context)
    if path is not None and path.exists():
        blob = io.load_torch(path)
        return blob["setup"], blob["frozen"]
    if path is None and records.SETUP in context.state:
        return dict(context.state[records.SETUP]), records.tensors(context.state[records.FROZEN])
    raise RuntimeError(f"client {_partition(context)} holds no proxy for run {context.run_id}: it was not sent one")


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])
