"""The one interface every family's stage speaks, and what the pipeline needs to know about a family.

A *stage* (an ``nn.Module``) holds a contiguous run of a decoder's blocks, plus the token
embedding when it is the first stage and the final norm + LM head when it holds the head:

- ``embed(ids, past_len)``: token ids -> hidden states (positions start at ``past_len``);
- ``run_blocks(x, cache)``: its blocks, appending to the request's :class:`KVCache` when given,
  or to each request's cache when given a :class:`Batch` (several requests in one forward);
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


class Batch:
    """Several requests' new tokens in one forward: concatenated along the sequence, no padding.

    Why ragged rather than a padded cache with an attention mask, or paged blocks? Greedy output
    must equal a request's solo run token for token. Here each request keeps its own
    :class:`KVCache` (freed by dropping it, at once) and its attention is the very call a solo run
    makes (its own keys, its own ``sdpa``, its own causal or window mask), so padding can never leak
    in; only the dense layers (projections, MLP, LM head) run over all rows at once, which is where
    decoding's cost is (reading the weights). Those matmuls over several rows may round the last bit
    differently from a one-row product (BLAS picks another kernel), so a row's logits can differ
    from its solo run by ~1e-6 relative: greedy output is identical unless two logits tie that
    closely. The attention loop over requests costs one small kernel per request and layer, cheap
    next to the matmuls at the contexts a CPU cluster serves; paged blocks would share memory better
    on a GPU at long contexts but need a gather kernel PyTorch does not ship.

    ``caches[i]`` takes ``sizes[i]`` tokens (a decode step's 1, or a chunk of a prompt).
    """

    def __init__(self, caches: list[KVCache], sizes: list[int]):
        self.caches, self.sizes = caches, sizes
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def positions(self, device=None) -> torch.Tensor:
        """Every token's position, (1, total): each request's continue from its cache's length."""
        return torch.cat([torch.arange(c.length, c.length + n, device=device)
                          for c, n in zip(self.caches, self.sizes)]).unsqueeze(0)

    def segments(self, j: int) -> list[tuple[list[torch.Tensor], int, int, int]]:
        """For the stage's j-th block: (that request's [k, v], first row, rows, positions before)."""
        return [(c.layers[j], a, n, c.length) for c, a, n in zip(self.caches, self.starts, self.sizes)]

    def advance(self) -> None:
        for c, n in zip(self.caches, self.sizes):
            c.length += n

    def last_rows(self) -> list[int]:
        """Each request's last row: the one whose logits pick its next token."""
        return [a + n - 1 for a, n in zip(self.starts, self.sizes)]


def as_batch(x: torch.Tensor, cache: KVCache | Batch | None) -> Batch | None:
    """One request's cache is a batch of one, so a stage has one code path."""
    return Batch([cache], [x.shape[1]]) if isinstance(cache, KVCache) else cache


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

    def kv_bytes_per_token(self, n_blocks: int, element_size: int) -> int:
        """KV-cache bytes one position costs on a stage of ``n_blocks`` blocks (keys and values)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a stage's beacon says of its model (every stage of a pipeline must agree)."""
        return {"model_type": self.model_type, "vocab_size": self.vocab_size, "n_positions": self.context,
                "n_layer": self.n_layer}


def refuse(model_type: str, key: str, value, want) -> None:
    raise ConfigError(f"the pipeline's {model_type} stages implement {key}={want!r}, this model has {value!r}")
