"""The Flower ClientApp: one FedPFT client, holding only its proxy and its own shard.

Each message runs in a fresh ``flwr-clientapp`` process, so what a client must remember between rounds (its
proxy's frozen weights as last updated, and its setup) lives in Flower's ``context.state``. Before anything is
imported that could load a model, the process is marked a client process: :func:`fedpft_lab.models.load_fm`
raises there, so the FM's weights cannot reach a client even by mistake.
"""
from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ... import models
from . import records

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

    content, state = msg.content, context.state
    if records.SETUP in content:   # the first round this client takes part in: keep what arrived once
        state[records.SETUP] = content[records.SETUP]
        state[records.FROZEN] = content[records.FROZEN]
    setup = records.read_setup(state[records.SETUP])
    broadcast = records.read_broadcast(content)
    if broadcast.client != _partition(context):
        raise ValueError(f"a broadcast for client {broadcast.client} reached the node serving {_partition(context)}")
    with parallel.single_threaded_ops():   # one thread, as every in-process client: the same sums, bit for bit
        model = build_proxy(ProxySpec.from_json(setup["proxy"]), records.tensors(state[records.FROZEN]))
        shard, pad_id = workspace.client_data(DataConfig(**setup["data"]), broadcast.client)
        update = client_step(model, shard, broadcast, TrainSettings.from_json(setup["train"]), pad_id)
    if broadcast.package:          # the W_fro slices are now part of this client's proxy
        state[records.FROZEN] = records.arrays(frozen_state(model))
    return Message(records.update_content(update), reply_to=msg)


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])
