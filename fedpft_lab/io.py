"""Files that survive crashes, damage and a second process: atomic writes, healing reads, cache locks.

Three rules keep a participant's work safe; the caches, checkpoints and metrics the package writes follow them:

* **Write atomically.** Every file is written next to its target and renamed over it, so a crash, a full disk or
  ``kill -9`` leaves either the old file or the new one, never half of one.
* **A damaged cache heals.** A cache is a convenience: when a cached file cannot be read (truncated by an
  interrupted copy, written by another library version) :func:`read_cache` says so in one line, moves it aside
  as ``<name>.damaged-<time>`` (kept, never deleted) and lets the caller rebuild it. Run folders are not caches:
  they hold the participant's own results, so :func:`read_run_file` stops with a clear error instead.
* **Build once.** Two notebooks that need the same sub-FM or the same run take a file lock (:func:`cache_lock`);
  the second waits, then reuses what the first built.

Loading never unpickles arbitrary objects: :func:`load_torch` is the package's one ``torch.load`` and it passes
``weights_only=True`` (tensors, numbers, strings and containers only).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import filelock

from .errors import ConfigError, short

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success flush it to disk and rename it over ``path``.

    The temporary name is unique per call (not per process), so threads and processes writing the same
    target never share one; on any error it is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` that never leaves a half-written file."""
    import torch  # here, not at the top: notebook.py uses this module before torch's threads are configured

    with atomic_open(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_json(obj: Any, path: Path | str, **dump_kwargs: Any) -> None:
    """JSON (indent 1 unless given) written atomically."""
    atomic_write_text(path, json.dumps(obj, **{"indent": 1, **dump_kwargs}))


# ----------------------------------------------------------------------------- safe loaders

def load_torch(path: Path | str) -> Any:
    """The package's one ``torch.load``: weights only, so a crafted file cannot run code."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def load_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _reason(err: BaseException) -> str:
    return short(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def _check(path: Path, load: Callable[[Path], Any], valid: Callable[[Any], bool] | None) -> Any:
    """``load(path)``, raising ValueError when ``valid`` rejects (or fails on) what it read."""
    obj = load(path)
    try:
        ok = valid is None or bool(valid(obj))
    except Exception as err:  # a check that trips over the content is a failed check
        raise ValueError(f"inconsistent content ({_reason(err)})") from err
    if not ok:
        raise ValueError("inconsistent content")
    return obj


# ----------------------------------------------------------------------------- damaged files

def move_aside(path: Path | str, why: str = "damaged") -> Path:
    """Rename ``path`` (file or folder) to ``<name>.<why>-<YYYYmmdd-HHMMSS>`` next to it and return the new path.

    Nothing is deleted: a participant can still look at (or recover) what was there.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target


def read_cache(path: Path | str, load: Callable[[Path], Any], what: str,
               valid: Callable[[Any], bool] | None = None) -> Any | None:
    """The cached object at ``path``, or None when there is none or it is unusable (the caller rebuilds it).

    An unreadable file, or one whose content ``valid`` rejects, is reported in one line and moved aside.
    Whatever the reason (truncation, a foreign format, an old layout), the remedy is the same, so any
    ``Exception`` from ``load`` counts as damage.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return _check(path, load, valid)
    except FileNotFoundError:  # another process moved it aside between exists() and load()
        return None
    except Exception as err:
        try:
            moved = f"moved it to {move_aside(path).name}"
        except FileNotFoundError:
            moved = "another process moved it aside"
        except OSError as move_err:
            moved = f"could not move it aside ({_reason(move_err)})"
        log.warning("damaged cache file %s (%s, %s): %s; rebuilding it", path, what, _reason(err), moved)
        return None


def read_run_file(path: Path | str, load: Callable[[Path], Any],
                  valid: Callable[[Any], bool] | None = None) -> Any:
    """A file of a run folder that ``--resume`` needs, or a one-line ConfigError naming it and the ways on.

    Unlike a cache, a run folder holds the participant's results: nothing is moved or deleted here.
    """
    path = Path(path)
    ways = (f"start fresh with another --out, or pass --restart to move {path.parent} aside "
            "(nothing is deleted) and start over")
    if not path.exists():
        raise ConfigError(f"cannot resume: {path} is missing, so the run cannot be continued; {ways}")
    try:
        return _check(path, load, valid)
    except Exception as err:
        raise ConfigError(f"cannot resume: {path} is unreadable ({_reason(err)}); {ways}") from err


# ----------------------------------------------------------------------------- building once

@dataclass
class CacheLock:
    """What :func:`cache_lock` yields: whether this process had to wait for another one."""

    what: str
    waited: bool = False

    def reused(self) -> None:
        """Call when the cache entry turned out to exist: after a wait, say whose work is reused."""
        if self.waited:
            log.warning("reused %s built by another process", self.what)


@contextlib.contextmanager
def cache_lock(path: Path | str, what: str, enabled: bool = True) -> Iterator[CacheLock]:
    """Hold ``<path>.lock`` while checking and building the cache entry ``path`` (``enabled=False``: no lock).

    Inside, re-read the cache first: a process that waited finds the entry the other one built.
    An OS lock (``filelock``) is released by the OS when its holder dies, so a killed build never blocks
    anyone; another thread of the same process waits like another process does.
    """
    state = CacheLock(what)
    if not enabled:
        yield state
        return
    path = Path(path)
    lock = filelock.FileLock(str(path.with_name(path.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.warning("waiting for another process building %s (%s)...", what, path.name)
        lock.acquire()
        state.waited = True
    try:
        yield state
    finally:
        lock.release()
