"""The stage runtime shared by ``algo=mp`` training and streaming inference (``smolcluster.inference``).

- ``partition``: which blocks each stage owns; ``architectures`` (the decoder families) / ``sequential``
  (the MLP): the stage modules.
- ``mesh`` (over ``transport.pubsub``): PUB/SUB links with sequence numbers, heartbeats, handshake;
  ``protocol``: the pipeline's message kinds.
- ``weights``: a model found and a stage's own tensors read from its files; ``quantize``: a stage's
  precision / int8 / int4 format (also LoRA training's int8 base).
- ``gpipe``: the training schedule on one stage; ``shards`` / ``merge``: per-stage checkpoints and their merge.
- ``launch``: stages (and the allreduce / diloco ring's ranks) as local child processes; ``nodes``: where
  each stage or rank lives (address, device, threads), also read by the launchers.

Inference-only parts live in ``smolcluster.inference`` (the stage server, ``placement`` for ``partition=auto``).
"""
