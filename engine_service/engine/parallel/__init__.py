"""Parallel engines: one engine service drives several ranks through ``torch.distributed``.

- :mod:`~engine_service.engine.parallel.ranks`: starting, joining, watching and stopping
  the ranks;
- :mod:`~engine_service.engine.parallel.channel`: the per-step broadcast from rank 0;
- :mod:`~engine_service.engine.parallel.worker`: the loop of a rank other than 0.

The layers themselves (column/row-parallel linears, the vocabulary-parallel embedding and
head, expert parallelism) live in :mod:`engine_service.layers`.
"""
