"""Engines: what moves FedPFT's messages (:mod:`fedpft_lab.core`) between the server and the clients.

* in-process: :mod:`.inprocess`, i.e. :mod:`fedpft_lab.federation` (clients on threads in one process; the
  default, and what the labs use)
* Flower: :mod:`fedpft_lab.engines.flower` (a ClientApp, a ServerApp and a FedAvg strategy on a real Flower
  deployment: one SuperLink, one SuperNode process per client; or on Flower's simulation engine, clients in Ray
  actors)
"""
