"""FedPFT itself, cut at the message boundary: no threads of its own, no files, no engine.

* :mod:`.messages`: what travels. A :class:`~.messages.Broadcast` goes down (round, global adapter in the
  proxy's own layer names, learning rate, seed, whether to record activation statistics, any W_fro package), a
  :class:`~.messages.ClientUpdate` comes back (adapter, example count, statistics), each convertible to flat
  ``name -> tensor`` / ``name -> scalar`` dicts that any engine can ship.
* :mod:`.client`: what a client does with a broadcast (:func:`~.client.client_step`). It needs only its own proxy
  and its own shard, never the server's models or another client's data.
* :mod:`.server`: what the server does per round: build the models, sample, broadcast, FedAvg, evaluate, align,
  account bytes and write the round record.
* :mod:`.progress`: stop and progress inside a round.

The engines move these messages: :mod:`fedpft_lab.federation` (in-process, clients on threads) and
:mod:`fedpft_lab.engines.flower` (a real Flower deployment).
"""
