"""FedPFT on Flower (``flwr`` 1.42, Message API): the second engine over the same core.

* :mod:`.records`: core messages <-> Flower ``RecordDict`` (no FedPFT logic, just packing).
* :mod:`.strategy`: :class:`~.strategy.FedPFTStrategy`, Flower's ``FedAvg`` driving the core server's round.
* :mod:`.server_app` / :mod:`.client_app`: the ``ServerApp`` (holds the FM) and the ``ClientApp`` (holds only its
  proxy and its shard; loading the FM raises there).
* :mod:`.deploy`: a local Deployment Engine on 127.0.0.1 (SuperLink + one SuperNode per client), started and
  torn down by ``fedpft-lab run --engine flower``, and the ``server`` / ``client`` commands for a room.
* :mod:`.simulation`: Flower's simulation engine (``--engine flower-sim``): the same apps, the clients in Ray
  actors of a private local Ray instance.

Import this package only where ``flwr`` is installed (``pip install fedpft-lab[flower]``; Ray for the simulation
engine: ``fedpft-lab[flower-sim]``).
"""
