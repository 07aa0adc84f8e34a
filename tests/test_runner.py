"""BackgroundRun: start/stop/join, event delivery, error capture, and the blocking twin used headless."""
from __future__ import annotations

import threading

import pytest

from fedpft_lab.errors import ConfigError
from fedpft_lab.runner import BackgroundRun


def counting_work(steps: int, pause: float = 0.0):
    """A toy work function: emits one event per step and honours stop between steps."""
    def work(stop: threading.Event, emit) -> int:
        done = 0
        for step in range(steps):
            if stop.is_set():
                break
            emit({"step": step, "progress": (step + 1) / steps})
            done += 1
            if pause:
                stop.wait(pause)
        return done
    return work


def test_run_blocking_returns_result_and_delivers_events_in_order():
    run = BackgroundRun(counting_work(5))
    seen: list[int] = []
    run.on_event(lambda e: seen.append(e["step"]))
    assert run.run_blocking() == 5
    assert seen == [0, 1, 2, 3, 4]
    assert [e["step"] for e in run.events] == seen
    assert run.error is None and not run.stopped and not run.running


def test_start_runs_in_another_thread_and_join_collects_result():
    caller = threading.get_ident()
    threads: set[int] = set()
    run = BackgroundRun(counting_work(3))
    run.on_event(lambda e: threads.add(threading.get_ident()))
    finished = threading.Event()
    run.on_done(lambda r: finished.set())
    run.start()
    assert run.join(timeout=5)
    assert finished.is_set()
    assert run.result == 3 and run.error is None
    assert threads and caller not in threads


def test_stop_ends_work_between_steps():
    started = threading.Event()

    def work(stop, emit):
        steps = 0
        while not stop.is_set():
            emit({"step": steps})
            started.set()
            steps += 1
            stop.wait(0.01)
        return steps

    run = BackgroundRun(work)
    run.start()
    assert started.wait(5)
    assert run.running
    run.stop()
    assert run.join(timeout=5)
    assert not run.running and run.stopped
    assert run.result == len(run.events) and run.result >= 1


def test_errors_in_background_are_captured_not_lost():
    def work(stop, emit):
        emit({"step": 0})
        raise RuntimeError("boom")

    run = BackgroundRun(work)
    run.start()
    assert run.join(timeout=5)
    assert isinstance(run.error, RuntimeError) and "boom" in str(run.error)
    assert run.result is None and len(run.events) == 1


def test_errors_in_a_callback_are_captured_too():
    run = BackgroundRun(counting_work(3))
    run.on_event(lambda e: 1 / 0)
    run.start()
    run.join(timeout=5)
    assert isinstance(run.error, ZeroDivisionError)


def test_run_blocking_reraises():
    def work(stop, emit):
        raise ValueError("bad step")

    run = BackgroundRun(work)
    with pytest.raises(ValueError, match="bad step"):
        run.run_blocking()
    assert isinstance(run.error, ValueError)


def test_cannot_start_twice_but_can_restart_after_finishing():
    gate = threading.Event()

    def work(stop, emit):
        gate.wait(5)
        return "ok"

    run = BackgroundRun(work)
    run.start()
    with pytest.raises(ConfigError, match="already running"):
        run.start()
    gate.set()
    assert run.join(timeout=5) and run.result == "ok"
    run.start()                      # a fresh run with a fresh stop event
    assert run.join(timeout=5) and run.result == "ok" and not run.stopped


def test_on_done_sees_the_run_as_finished():
    states: list[bool] = []
    run = BackgroundRun(counting_work(2))
    run.on_done(lambda r: states.append(r.running))
    run.start()
    run.join(timeout=5)
    assert states == [False]


def test_bad_inputs_raise_config_error():
    with pytest.raises(ConfigError):
        BackgroundRun("not a function")  # type: ignore[arg-type]

    run = BackgroundRun(lambda stop, emit: emit(3))
    with pytest.raises(ConfigError, match="dict"):
        run.run_blocking()


def test_events_emitted_from_worker_threads_are_handled_one_at_a_time():
    """A round's clients report progress from their own threads; widget callbacks must never overlap."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    def work(stop, emit):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda k: [emit({"client": k, "batch": b}) for b in range(10)], range(4)))

    inside, overlaps = [0], []

    def callback(event):
        inside[0] += 1
        overlaps.append(inside[0] > 1)
        time.sleep(0.001)               # long enough for another thread to arrive meanwhile
        inside[0] -= 1

    run = BackgroundRun(work)
    run.on_event(callback)
    run.run_blocking()
    assert len(run.events) == 40 and not any(overlaps)
