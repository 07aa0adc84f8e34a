"""One error type and a few checks, so bad input fails early with a message a participant can act on.

Every check names the parameter and the allowed range, e.g. ``keep_ratio must be in (0, 1], got 1.5``,
instead of letting a shape error surface from deep inside torch.
"""
from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A user-facing configuration or input error."""


def short(text: object, limit: int = 80) -> str:
    """``text`` on one line, cut to ``limit`` characters, so an error quoting a value or a column stays readable."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ConfigError unless ``lo (<|<=) value (<|<=) hi``."""
    bad = value is None or (isinstance(value, float) and value != value)
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value >= hi if hi_open else value > hi
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{name} must be in {left}{lo_s}, {hi_s}{right}, got {short(repr(value))}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be one of {allowed}, got {short(repr(value))}")
