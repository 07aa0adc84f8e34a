"""Run expensive lab work (a federated run, a distillation) behind a button without freezing the notebook.

The work is an ordinary function ``work(stop, emit) -> result``:

* ``stop`` is a ``threading.Event``; the work checks ``stop.is_set()`` between steps (rounds, batches) and
  returns early when it is set. Nothing is killed from outside, so the work always leaves consistent state.
* ``emit(event)`` reports progress as a small dict, e.g. ``{"round": 3, "accuracy": 0.81, "progress": 0.3}``.
  It may be called from several threads (e.g. the worker threads of a round's clients); events are handled
  one at a time.

``BackgroundRun.start()`` runs the work in a daemon thread (the live, interactive path); ``run_blocking()`` runs
the very same function in the calling thread (the headless path papermill and the tests use, because a
background thread would still be running when papermill shuts the kernel down).

Events go to registered callbacks *in the thread that runs the work*. Callbacks should only set widget traits
(``progress.value = ...``, FigureWidget data): printing or ``display`` from a thread lands in the wrong cell
or nowhere with ipykernel >= 6. Every event is also kept in ``run.events`` so the main thread can read them.
Exceptions raised by the work (or a callback) are stored in ``run.error``, never swallowed.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import ConfigError

Event = dict[str, Any]
Emit = Callable[[Event], None]
Work = Callable[[threading.Event, Emit], Any]


class BackgroundRun:
    """One piece of work that can run in a background thread or blocking, report events and be stopped."""

    def __init__(self, work: Work, *, name: str = "fedpft-lab-run") -> None:
        if not callable(work):
            raise ConfigError(f"work must be callable as work(stop, emit), got {work!r}")
        self.work = work
        self.name = name
        self.events: list[Event] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.stopped = False              # True when the run ended because stop() was requested
        self.seconds = 0.0                # wall time of the last run
        self._event_callbacks: list[Callable[[Event], None]] = []
        self._done_callbacks: list[Callable[[BackgroundRun], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._active = False              # True from start() until the work has returned (before on_done)
        self._lock = threading.Lock()
        self._emit_lock = threading.RLock()  # work may emit from several worker threads (clients side by side)

    # --- wiring -------------------------------------------------------------------------------------------
    def on_event(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every emitted event (in the worker thread: update traits only)."""
        self._event_callbacks.append(callback)

    def on_done(self, callback: Callable[[BackgroundRun], None]) -> None:
        """Call ``callback(run)`` once the work has returned, failed or stopped (also in the worker thread)."""
        self._done_callbacks.append(callback)

    # --- state --------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the work is executing (so on_done callbacks already see False)."""
        return self._active

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # --- running ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the work in a daemon thread and return at once (the interactive path)."""
        with self._lock:
            if self.running:
                raise ConfigError("this run is already running; stop it or wait for it before starting again")
            self._reset()
            self._active = True
            self._thread = threading.Thread(target=self._execute, name=self.name, daemon=True)
            self._thread.start()

    def run_blocking(self) -> Any:
        """Run the work in the calling thread and return its result; re-raise its exception (headless path)."""
        with self._lock:
            if self.running:
                raise ConfigError("this run is already running in the background")
            self._reset()
            self._active = True
        self._execute()
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Ask the work to finish after its current step; returns immediately (use join() to wait)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread (done callbacks included); True if it has finished or never started."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # --- internals ----------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._stop = threading.Event()
        self.events = []
        self.result = None
        self.error = None
        self.stopped = False
        self.seconds = 0.0

    def _emit(self, event: Event) -> None:
        if not isinstance(event, dict):
            raise ConfigError(f"emit() takes a dict, got {type(event).__name__}")
        with self._emit_lock:           # one event at a time: callbacks update widgets, which are not thread-safe
            self.events.append(event)
            for callback in list(self._event_callbacks):
                callback(event)

    def _execute(self) -> None:
        started = time.perf_counter()
        try:
            self.result = self.work(self._stop, self._emit)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller, never lost
            self.error = exc
        self.stopped = self._stop.is_set()
        self.seconds = time.perf_counter() - started
        self._active = False
        for callback in list(self._done_callbacks):
            try:
                callback(self)
            except BaseException as exc:  # noqa: BLE001
                if self.error is None:
                    self.error = exc
