"""FedPFT as a Flower strategy: Flower's ``FedAvg`` with the core server deciding what goes out and comes in.

Flower moves the messages (``Grid.send_and_receive``); every FedPFT decision is the core's, so this engine and
the in-process one compute the same numbers:

* ``configure_train``: the round's sampled clients come from :func:`~fedpft_lab.core.server.sample_clients` (not
  Flower's random node sampling), each gets its own message: the global adapter in the proxy's names, lr, seed,
  whether to record statistics, the W_fro slices it misses; in its first round also the proxy's frozen weights.
* ``aggregate_train``: replies are checked (a malformed one is rejected with a logged reason), sorted by client
  and averaged by the core's FedAvg (float64 accumulation, the in-process order), not Flower's own average.
* ``start``: round 0's evaluation, then per round configure -> send and receive -> aggregate -> the core's
  evaluation and alignment; ``metrics.json`` and ``checkpoint.pt`` (the in-process engine's files, written by its
  own functions) are rewritten after every round, so :meth:`resume` continues a stopped server where it stopped.

A round's record is the in-process engine's, plus ``flower``: the bytes and arrays Flower's ``ArrayRecord`` s
actually carried down and up (tensor data plus each array's name and header), next to ``bytes_down``/``bytes_up``;
and after a restart, ``proxy_resent``: the clients that got their whole proxy again because what they held
belonged to the stopped run (their ``bytes_down_weights`` say what that cost).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from ... import align, models
from ...config import FedConfig
from ...core import server
from ...core.messages import ClientUpdate
from ...core.proxy import proxy_spec
from ...federation import load_checkpoint, read_checkpoint, save_run  # a run folder's files, one format for every engine
from ...workspace import Workspace
from . import records

log = logging.getLogger("fedpft_lab.flower")


class FedPFTStrategy(FedAvg):
    """FedAvg over FedPFT's messages; ``self.metrics`` holds the metrics dict after :meth:`start`."""

    def __init__(self, cfg: FedConfig, ws: Workspace, setup: server.Setup, out_dir: Path | None = None,
                 on_round: Callable[[dict], None] | None = None, min_answers: int | None = None,
                 round_timeout: float = 3600, engine: str = "flower") -> None:
        super().__init__(fraction_train=cfg.sample_fraction, fraction_evaluate=0.0,
                         min_train_nodes=cfg.clients_per_round(), min_available_nodes=cfg.data.clients)
        self.cfg, self.ws, self.setup, self.out_dir, self.on_round = cfg, ws, setup, out_dir, on_round
        self.engine = engine                     # "flower" (a deployment) or "flower-sim" (Ray), for metrics.json
        # a round goes on with the clients that answered within round_timeout, if at least min_answers did
        # (default: every sampled client, the in-process engine's behaviour)
        self.min_answers = min(min_answers or cfg.clients_per_round(), cfg.clients_per_round())
        self.round_timeout = round_timeout
        self.max_reply_bytes = 2 * (setup.frozen_bytes() + 4096)  # far above any honest adapter + statistics
        self.state = server.RunState(0, dict(setup.init_state), {}, {}, {}, [])
        self.schedule = server.sample_clients(cfg)
        self.nodes: dict[int, int] = {}          # client (partition id) -> Flower node id
        self.client_setup = {"data": asdict(cfg.data),
                             "proxy": proxy_spec(cfg.data.fm, setup.server_proxy, setup.proxy_layers,
                                                 cfg.lora_config(), cfg.seed).to_json(),
                             "train": server.train_settings(cfg, setup).to_json()}
        self.metrics: dict = {}
        self._record: dict = {}
        self.resent: set[int] = set()            # clients whose proxy died with a stopped run (see resume)

    def resume(self) -> None:
        """Continue the run saved in ``out_dir`` (nothing saved: start afresh, as the in-process ``--resume``).

        The clients of a restarted server start without state (Flower keeps a client's ``context.state`` per run),
        so each gets its whole proxy again, at the server's current weights, in its next round.
        """
        blob = read_checkpoint(self.out_dir, self.cfg) if self.out_dir is not None else None
        if blob is None:
            return
        self.state = load_checkpoint(blob, self.setup)
        self.resent, self.state.synced = set(self.state.synced), {}

    # -- who is who ----------------------------------------------------------------------------------------
    def connect(self, grid: Grid, timeout: float) -> None:
        """Wait for one node per client and ask each which client (partition) it serves."""
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < self.cfg.data.clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {self.cfg.data.clients} clients "
                                   f"connected within {timeout:.0f} s")
            time.sleep(0.5)
        asks = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in grid.get_node_ids()]
        for reply in grid.send_and_receive(asks, timeout=timeout):
            if not reply.has_error():
                self.nodes[int(reply.content["node"]["partition-id"])] = reply.metadata.src_node_id
        absent = sorted(set(range(self.cfg.data.clients)) - set(self.nodes))
        if absent:
            raise RuntimeError(f"no node serves client(s) {absent}: start one SuperNode per partition id")

    # -- one round -------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per sampled client (``arrays``/``config`` are Flower's; the core makes the content)."""
        return [Message(content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node, content in self.round_contents(server_round)]

    def round_contents(self, server_round: int) -> list[tuple[int, RecordDict]]:
        """(node id, message content) for each client sampled in ``server_round``; opens the round's record."""
        clients = self.schedule[server_round - 1]
        if self.state.package:   # the server's device copy follows the clients, as the in-process engine's
            align.apply_weight_package(models.unwrap(self.setup.devices[0]), self.state.package)  # (checkpoint)
            self.state.package = {}
        new = {k for k in clients if k not in self.state.synced}
        if new & self.resent:
            self._resent_now, self.resent = sorted(new & self.resent), self.resent - new
        else:
            self._resent_now = []
        self._record, broadcasts = server.open_round(self.cfg, self.setup, self.state, server_round, clients,
                                                     ship_weights=True)
        frozen = self.setup.frozen_state() if new else None
        out = []
        for b in broadcasts:
            first = b.client in new
            out.append((self.nodes[b.client], records.broadcast_content(b, frozen if first else None,
                                                                        self.client_setup if first else None)))
        if self._resent_now:
            self._record["proxy_resent"] = self._resent_now
        self._record["flower"] = {"bytes_down": sum(records.carried_bytes(c) for _, c in out),
                                  "arrays_down": sum(records.carried_arrays(c) for _, c in out)}
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check, sort by client and FedAvg the replies through the core (Flower's own average is not used)."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        expected = {self.nodes[k]: k for k in self._record["clients"]}
        updates: list[ClientUpdate] = []
        for msg in valid:
            try:
                size = records.carried_bytes(msg.content)
                if size > self.max_reply_bytes:
                    raise ValueError(f"it carries {size:,} bytes, more than the {self.max_reply_bytes:,} allowed")
                update = records.read_update(msg.content)
                self._check(update, expected.get(msg.metadata.src_node_id))
            except Exception as e:  # noqa: BLE001  (any malformed reply is dropped, never crashes the server)
                log.warning("round %d: rejected the reply of node %d: %s", server_round, msg.metadata.src_node_id, e)
                continue
            updates.append(update)
        updates.sort(key=lambda u: u.client)
        answered = [u.client for u in updates]
        self._record["answered"] = answered
        self._record["missing"] = sorted(set(self._record["clients"]) - set(answered))
        for k in self._record["missing"]:   # its proxy may not hold this round's weights: next time it gets all
            self.state.synced.pop(k, None)
        if self._record["missing"]:
            log.warning("round %d: no valid update from client(s) %s", server_round, self._record["missing"])
        if len(answered) < self.min_answers:
            raise RuntimeError(f"round {server_round}: {len(answered)} client(s) answered, fewer than the "
                               f"{self.min_answers} required")
        self._record["flower"].update(bytes_up=sum(records.carried_bytes(m.content) for m in valid),
                                      arrays_up=sum(records.carried_arrays(m.content) for m in valid))
        self._updates = [server.receive(u, self.setup) for u in updates]
        server.aggregate(self.state, self._record, self._updates)
        return records.arrays(self.state.global_state), MetricRecord({"bytes_up": self._record["bytes_up"]})

    def _check(self, update: ClientUpdate, client: int | None) -> None:
        """A reply must come from a sampled client's node and hold an adapter of the proxy's exact shape."""
        if client is None or update.client != client:
            raise ValueError(f"it claims client {update.client}, but its node serves {client}")
        want = server.to_proxy_names(self.setup.init_state, self.setup.proxy_layers)
        if set(update.adapter) != set(want) or any(update.adapter[k].shape != v.shape for k, v in want.items()):
            raise ValueError("its adapter does not match the proxy's (names or shapes)")
        if not all(torch.isfinite(v).all() for v in update.adapter.values()):
            raise ValueError("its adapter holds NaN or infinite values")
        if update.num_examples <= 0:
            raise ValueError(f"it reports {update.num_examples} examples")
        for layer, stats in update.stats.items():
            if layer not in self.setup.compressed or set(stats) != {"abs_sum", "zeros", "tokens"}:
                raise ValueError(f"its statistics of layer {layer} are not the per-neuron sums asked for")

    # -- the run ---------------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Round 0 (A_0 evaluated), then ``cfg.rounds`` rounds through ``grid``, from the round :meth:`resume`
        reached; the metrics in ``self.metrics``."""
        self.connect(grid, timeout)
        arrays = initial_arrays or records.arrays(self.state.global_state)
        last = num_rounds or self.cfg.rounds
        if self.state.next_round > last:      # resumed a finished run: report it (and restore its files)
            self._write()
        for rnd in range(self.state.next_round, last + 1):
            t0 = time.perf_counter()
            self._updates = []
            if rnd == 0:
                self._record, _ = server.open_round(self.cfg, self.setup, self.state, 0, [])
            else:
                messages = self.configure_train(rnd, arrays, train_config or ConfigRecord(), grid)
                t_train = time.perf_counter()
                replies = grid.send_and_receive(messages, timeout=min(timeout, self.round_timeout))
                self._record["train_seconds"] = time.perf_counter() - t_train
                arrays, _ = self.aggregate_train(rnd, replies)
            record = server.close_round(self.cfg, self.setup, self.ws, self.state, rnd, self._record, self._updates,
                                        t0)
            self.state.records.append(record)
            self.state.next_round = rnd + 1
            self._write()
            if self.on_round is not None:
                self.on_round(record)
        result = Result()
        result.arrays = arrays
        return result

    def _write(self) -> None:
        """The metrics so far into ``self.metrics`` and, with ``out_dir``, the in-process engine's two files."""
        self.metrics = server.summary(self.cfg, self.setup, self.state.records, self.ws)
        self.metrics["engine"] = self.engine
        if self.out_dir is not None:
            save_run(self.out_dir, self.cfg, self.setup, self.state, self.metrics)
