"""Stop and progress inside a round: how a long step learns it should end, and how it reports how far it got."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

Progress = Callable[[dict], None]
"""``on_progress({"round": r, "stage": ..., "done": k, "total": n})``: called on worker threads, one call at a time,
with ``done`` counting up to ``total`` within the stage. Stages: ``distill`` (round 0, building the sub-FM when it
is not cached), ``setup`` (once, when the models are built, before the first round to run), ``train`` (client
batches), ``evaluate`` (evaluation jobs), ``align`` (alignment steps), ``evaluate aligned`` (the proxy re-measured
after alignment)."""


class StopSignal(Protocol):
    """Anything with ``is_set()`` (a ``threading.Event`` in the labs)."""

    def is_set(self) -> bool: ...


class RoundStopped(Exception):
    """``stop`` was set inside a round: the round is dropped unrecorded (a resumed run redoes it from the start)."""


def check_stop(stop: StopSignal | None) -> None:
    if stop is not None and stop.is_set():
        raise RoundStopped


class Ticker:
    """Counts finished steps of one stage across worker threads and reports each count once, in order."""

    def __init__(self, on_progress: Progress | None, rnd: int, stage: str, total: int) -> None:
        self.on_progress, self.info, self.done = on_progress, {"round": rnd, "stage": stage, "total": total}, 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        if self.on_progress is None:
            return
        with self.lock:
            self.done += 1
            self.on_progress({**self.info, "done": self.done})
