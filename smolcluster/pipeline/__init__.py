"""The stage pipeline shared by ``algo=mp`` training and streaming inference.

- ``partition``: which blocks each stage owns; ``gpt2`` / ``sequential``: the stage modules.
- ``mesh`` (over ``transport.pubsub``): PUB/SUB links with sequence numbers, heartbeats, handshake.
- ``gpipe``: the training schedule on one stage; ``shards``: per-stage checkpoints and their merge.
- ``serve``: an inference stage; ``client``: the head; ``api``: :class:`InferencePipeline`.
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so importing a submodule (a stage process) does not pull in the head's code.
    if name == "InferencePipeline":
        from smolcluster.pipeline.api import InferencePipeline

        return InferencePipeline
    if name in ("Request", "Token", "PipelineClient"):
        from smolcluster.pipeline import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["InferencePipeline", "PipelineClient", "Request", "Token"]
