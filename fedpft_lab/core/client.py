"""What a client does with a broadcast: plug in the global adapter, train on its own shard, report back.

:func:`client_step` needs only the client's proxy (frozen weights + LoRA) and its own shard: never the server's
models, never another client's data. Each step starts from the broadcast alone (global adapter, fresh
optimiser, seeded data order), so an update is a pure function of (proxy weights, shard, broadcast), whichever
engine, thread or process computes it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import adapters, align, data, models
from ..device import model_device, to_device
from .messages import Broadcast, ClientUpdate, TrainSettings
from .progress import StopSignal, check_stop


def local_train(model: nn.Module, split: "data.EncodedSplit", epochs: int, batch_size: int, lr: float,
                max_grad_norm: float, seed: int, pad_id: int,
                recorder: align.ActivationRecorder | None = None, dropout: bool = False,
                stop: StopSignal | None = None, on_batch: Callable[[], None] | None = None,
                group_by_length: bool = False) -> None:
    """E epochs of AdamW on the client's shard (fresh optimiser, constant lr within the round).

    ``stop`` is checked before every batch (raising :class:`~.progress.RoundStopped`), so Stop takes effect
    within one client step; ``on_batch()`` is called after every step (progress).

    ``dropout=False`` trains in eval mode: no dropout anywhere, so a client's update is a pure function of its
    inputs. Drawing dropout masks (``bernoulli_``) costs about a fifth of a CPU training step at this size.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train(dropout)
    if dropout:
        torch.manual_seed(seed)  # dropout masks
    device = model_device(model)
    for epoch in range(epochs):
        for batch in data.iterate_batches(split, batch_size, shuffle=True, seed=seed + epoch, pad_id=pad_id,
                                          group_by_length=group_by_length):
            check_stop(stop)
            batch = to_device(batch, device)
            if recorder is not None:
                recorder.set_mask(batch.get("attention_mask"))
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = F.cross_entropy(model(**inputs).logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            if on_batch is not None:
                on_batch()
    model.eval()


def client_step(model: nn.Module, shard: "data.EncodedSplit", broadcast: Broadcast, settings: TrainSettings,
                pad_id: int, stop: StopSignal | None = None,
                on_batch: Callable[[], None] | None = None) -> ClientUpdate:
    """One client's round on its proxy ``model``: apply any W_fro package, load the global adapter, train,
    and return the update (adapter in the proxy's names, on the CPU as on the wire)."""
    t0 = time.perf_counter()
    if broadcast.package:
        align.apply_weight_package(models.unwrap(model), broadcast.package)
    adapters.load_adapter_state(model, broadcast.adapter)
    layers = list(settings.stat_layers)
    recorder = align.ActivationRecorder(model, layers) if broadcast.record_stats and layers else None
    with recorder if recorder is not None else contextlib.nullcontext():
        local_train(model, shard, settings.local_epochs, settings.batch_size, broadcast.lr, settings.max_grad_norm,
                    broadcast.seed, pad_id, recorder, dropout=settings.dropout, stop=stop, on_batch=on_batch,
                    group_by_length=settings.group_by_length)
    return ClientUpdate(broadcast.client, adapters.adapter_state(model), len(shard),
                        recorder.stats if recorder else {}, time.perf_counter() - t0)
