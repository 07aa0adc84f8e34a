"""Spread over seeds: mean, standard deviation and a Student-t confidence interval, plain and paired.

With a handful of seeds a mean alone says little: two methods 1 point apart may swap places on the next seed.
The t interval is the textbook answer for few samples. Methods compared on the *same* seed share the split,
the sampled clients and the probe batches, so the per-seed difference cancels what they share and its
interval is usually much narrower than either method's own: that is the number to read when asking whether
one method beats another. With one seed there is no spread to estimate: ``sd`` and ``ci`` are None, never 0.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

from scipy import stats as _scipy_stats


def t_quantile(level: float, df: int) -> float:
    """Two-sided Student-t critical value, e.g. 2.776 for ``level=0.95, df=4``."""
    return float(_scipy_stats.t.ppf((1.0 + level) / 2.0, df))


def mean_ci(xs: Sequence[float], level: float = 0.95) -> dict:
    """``{"n", "mean", "sd", "ci": [lo, hi], "values"}`` of ``xs``; ``sd`` and ``ci`` are None when n < 2."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    n, mean = len(xs), statistics.fmean(xs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci": None, "values": xs}
    sd = statistics.stdev(xs)
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half], "values": xs}


def paired_diff(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> dict:
    """:func:`mean_ci` of ``a[k] - b[k]`` over the shared keys (seeds), plus the keys it paired."""
    if set(a) != set(b):
        raise ValueError(f"paired_diff needs the same seeds on both sides, got {sorted(a)} and {sorted(b)}")
    keys = sorted(a)
    return {**mean_ci([a[k] - b[k] for k in keys], level), "seeds": keys}


def share_above(pairs: Iterable[tuple[float, float]]) -> dict:
    """How many ``(x, y)`` pairs have ``x > y`` strictly: ``{"above", "points", "fraction"}``."""
    pairs = list(pairs)
    above = sum(x > y for x, y in pairs)
    return {"above": above, "points": len(pairs), "fraction": above / len(pairs) if pairs else None}
