"""Which code made a result: the package version and the *results version*.

``RESULTS_VERSION`` names the numerics of the library: bump it in any change that alters what a run computes
(a distilled sub-FM, a round's accuracies, a gradient cosine), never for refactors that keep every number.
Caches (sub-FMs, cached lab runs) are keyed by it, so a bump never serves a stale result, and stored reference
results carry it, so the labs can say which code made them. Forgetting a bump is caught by the reference test
(``tests/test_reference.py``): it reruns the first rounds of a stored run and compares them number by number.
"""
from __future__ import annotations

from . import __version__

RESULTS_VERSION = "2026.12.2"


def code_version() -> dict[str, str]:
    """What results written now should carry, so a reader can tell which code produced them."""
    return {"package": __version__, "results": RESULTS_VERSION}
