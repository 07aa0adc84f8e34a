"""The in-process engine: every client on a thread of this process (the default; what the labs use).

It lives in :mod:`fedpft_lab.federation`, its historical home that labs, widgets and tests import; this module
names it next to the other engines.
"""
from ..federation import cached_run, iterate, run, train_clients  # noqa: F401
