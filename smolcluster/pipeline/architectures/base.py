"""The one interface every family's stage speaks, and what the pipeline needs to know about a family.

A *stage* (an ``nn.Module``) holds a contiguous run of a decoder's blocks, plus the token
embedding when it is the first stage and the final norm + LM head when it holds the head:

- ``embed(ids, past_len)``: token ids -> hidden states (positions start at ``past_len``);
- ``run_blocks(x, cache)``: its blocks, appending to the request's :class:`KVCache` when given;
- ``logits(x, last_only)``: final norm + LM head;
- ``forward(x, cache)``: what the stage has, in model order (training).

Its parameters carry the full model's ``named_parameters()`` names, so a stage loads exactly
its own tensors from a Hugging Face file and stage checkpoints merge back by name.

An :class:`Architecture` reads a Hugging Face ``config.json`` dict and says which tensors a
stage holds (``param_shapes``), builds the stage module, and splits blocks over stages by
parameter memory (``plan``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smolcluster.errors import ConfigError


class KVCache:
    """One request's keys and values on one stage: ``layers[j] = [k, v]`` for the stage's j-th block.

    ``length`` counts every position seen (the next token's position), also when a sliding
    window keeps fewer keys than that.
    """

    def __init__(self, n_layers: int):
        self.layers: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)


class Architecture:
    """A decoder family as the pipeline sees it, read from a Hugging Face ``config.json`` dict."""

    model_type: str = ""
    vocab_size: int
    context: int        # positions the model has (prompt + generated)
    n_layer: int
    tied: bool          # the LM head is the token embedding
    embed_name: str     # the token embedding's parameter name
    head_name: str      # the LM head's weight name (== embed_name when tied)

    def param_shapes(self, embed: bool, head: bool, blocks: range) -> list[tuple[str, tuple]]:
        """(name, shape) of a stage's parameters, in the order the full model lists them."""
        raise NotImplementedError

    def stage(self, embed: bool, head: bool, blocks: range) -> nn.Module:
        """The stage module, its parameters uninitialised (build it under ``torch.device("meta")``)."""
        raise NotImplementedError

    def numel(self, embed: bool, head: bool, blocks: range) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes(embed, head, blocks))

    def plan(self, n_stages: int, weights: list[float] | None = None, head_first: bool = False):
        """Stage specs: blocks balanced by parameter memory, embedding and head counted where they sit.

        ``head_first`` puts the final norm + LM head on stage 0 beside the embedding (inference's
        ring: a tied embedding is then held once); otherwise they sit on the last stage, which
        holds its own copy of a tied embedding.
        """
        from smolcluster.pipeline.partition import plan

        none = range(0)
        block = self.numel(False, False, range(1))
        first = self.numel(True, head_first, none)
        last = 0 if head_first else self.numel(False, True, none)
        return plan([block] * self.n_layer, n_stages, weights, first, last)

    def describe(self) -> dict:
        """What a stage's beacon says of its model (every stage of a pipeline must agree)."""
        return {"model_type": self.model_type, "vocab_size": self.vocab_size, "n_positions": self.context,
                "n_layer": self.n_layer}


def refuse(model_type: str, key: str, value, want) -> None:
    raise ConfigError(f"the pipeline's {model_type} stages implement {key}={want!r}, this model has {value!r}")
