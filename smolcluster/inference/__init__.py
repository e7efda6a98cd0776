"""Serving requests through the stages: the stage loop, the head, sampling, and the Python API.

- ``serve``: an inference stage (per-request KV caches, cancel); ``client``: the head;
- ``sampling``: greedy / temperature / top-k / top-p with per-request seeds;
- ``api``: :class:`InferencePipeline` (submit / iterate tokens / cancel);
- ``from_config``: an ``infer`` / ``chat`` Hydra config -> a pipeline or a stage's config.
"""

from __future__ import annotations


def __getattr__(name: str):
    # Lazy, so importing a submodule (a stage process) does not pull in the head's code.
    if name == "InferencePipeline":
        from smolcluster.inference.api import InferencePipeline

        return InferencePipeline
    if name in ("Request", "Token", "PipelineClient"):
        from smolcluster.inference import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["InferencePipeline", "PipelineClient", "Request", "Token"]
