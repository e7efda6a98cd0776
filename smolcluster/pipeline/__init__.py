"""The stage runtime shared by ``algo=mp`` training and streaming inference (``smolcluster.inference``).

- ``partition``: which blocks each stage owns; ``gpt2`` / ``sequential``: the stage modules.
- ``mesh`` (over ``transport.pubsub``): PUB/SUB links with sequence numbers, heartbeats, handshake.
- ``gpipe``: the training schedule on one stage; ``shards``: per-stage checkpoints and their merge.
- ``launch``: stages as local child processes; ``weights``: a stage's own tensors from a file.
"""
