"""Using a laptop's few cores well: independent jobs side by side, each on one thread.

A client's training step on MiniLM multiplies small matrices (a few hundred tokens by 384), too small to
split well over cores: two torch threads make one client about 1.5x faster. Two clients on two cores, one
thread each, train about 1.9x as fast as one. The same holds for evaluating the FM and the sub-FM. Python
threads suffice because torch releases the GIL inside its ops.

Running every job on exactly one thread has a second benefit: client updates and evaluations do not depend
on how many jobs run at once or on the machine's core count, because a matrix product computed on one thread
always sums in the same order. (The server's distillation and alignment run alone, on all of torch's threads;
across thread counts they agree to about 1e-8.)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def default_workers() -> int:
    """One job per CPU core this process may use.

    Not torch's thread count: the labs lower that on a busy machine, because multi-threaded ops spin-wait
    for each other when cores are shared. Single-threaded jobs never wait for each other, so they may use
    every core; the operating system shares the cores fairly when other work runs too.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch ops on ``n`` threads inside the block (torch's thread setting is process-wide), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def single_threaded_ops() -> contextlib.AbstractContextManager[None]:
    return torch_threads(1)


def run_jobs(jobs: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
    """Call every job, up to ``workers`` at a time, each on one thread; results in the order of ``jobs``.

    Jobs must not share mutable state (each trains its own model copy, or only reads a shared one).
    An exception in a job is raised here once the running jobs have finished.
    """
    workers = max(1, min(workers or default_workers(), len(jobs)))
    with single_threaded_ops():
        if workers == 1:
            return [job() for job in jobs]

        def call(job: Callable[[], T]) -> T:
            torch.set_num_threads(1)  # a new thread may not have picked up the process-wide setting yet
            return job()

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedpft-job") as pool:
            return list(pool.map(call, jobs))
