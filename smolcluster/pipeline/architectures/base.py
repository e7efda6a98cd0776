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

import itertools
import math

import torch
from torch import nn

from smolcluster.errors import ConfigError


class KVCache:
    """One request's keys and values on one stage, for each of the stage's blocks.

    Layout: per block, one preallocated ``(1, kv_heads, capacity, head_dim)`` buffer for keys and
    one for values; a step writes its new rows in place and attention reads a view of the filled
    part. When a step needs more room the buffer's capacity doubles (one copy of what it holds), up
    to ``limit`` positions (the prompt plus ``max_new_tokens``, which the stage reserved in its
    budget): appending n tokens one at a time copies O(n) elements in all, where growing by
    ``torch.cat`` per token copied the whole cache every token (O(n^2)). Doubling rather than
    allocating ``limit`` up front, since most answers end (EOS) long before ``max_new_tokens``;
    :meth:`nbytes` reports the capacity held, never more than the stage reserved. Why a buffer per
    request rather than one padded batch cache or paged blocks: see :class:`Batch` (a request's
    attention reads its own contiguous keys, exactly as a solo run; freeing it frees its memory).

    A sliding-window block (``keep`` set) holds only the ``keep`` latest keys: they sit in
    ``[lo, hi)`` of the buffer; at the buffer's end they move back to its start, and the capacity
    is kept at least twice what a step needs, so that copy happens once per ~``keep`` tokens.

    ``length`` counts every position seen (the next token's position), also when a sliding
    window keeps fewer keys than that.

    :meth:`truncate` forgets the latest positions (speculative decoding's rejected proposals); a sliding
    window then keeps ``slack`` keys beyond ``keep``, so that cutting up to ``slack`` positions still leaves
    every key the window needs (attention masks by position, so the older extra keys are never seen).
    """

    MIN_CAPACITY = 32  # positions first allocated: a short answer never reallocates

    def __init__(self, n_layers: int, limit: int | None = None, slack: int = 0):
        self.slack = slack
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lo, self.hi = [0] * n_layers, [0] * n_layers  # the held keys: [lo, hi) of the buffer
        self.limit = limit
        self.length = 0

    def append(self, j: int, k: torch.Tensor, v: torch.Tensor, keep: int | None = None):
        """Store block j's new keys/values ``(1, heads, n, head_dim)``; return every key and value the new
        queries attend to (the held ones, then the new), as views of the buffers."""
        n = k.shape[2]
        buf_k, buf_v, lo, hi = self.keys[j], self.values[j], self.lo[j], self.hi[j]
        capacity = 0 if buf_k is None else buf_k.shape[2]
        if hi + n > capacity:
            held = hi - lo
            if lo > 0 and held + n <= capacity // 2:  # a sliding window at the end: move it to the start
                buf_k[:, :, :held] = buf_k[:, :, lo:hi].clone()
                buf_v[:, :, :held] = buf_v[:, :, lo:hi].clone()
            else:  # double (at most to the limit), keeping only what is held
                want = max(held + n, 2 * capacity, self.MIN_CAPACITY)
                if self.limit is not None:
                    want = max(held + n, min(want, self.limit))
                new_k = k.new_empty(k.shape[0], k.shape[1], want, k.shape[3])
                new_v = v.new_empty(v.shape[0], v.shape[1], want, v.shape[3])
                if held:
                    new_k[:, :, :held] = buf_k[:, :, lo:hi]
                    new_v[:, :, :held] = buf_v[:, :, lo:hi]
                buf_k, buf_v = self.keys[j], self.values[j] = new_k, new_v
            lo, hi = 0, held
        # narrow() rather than buf[:, :, a:b]: the same views, without Python's slice indexing, which cost
        # ~4 us per use here (4 per block per token: a decode step's largest Python cost after the matmuls).
        buf_k.narrow(2, hi, n).copy_(k)
        buf_v.narrow(2, hi, n).copy_(v)
        k_all, v_all = buf_k.narrow(2, lo, hi + n - lo), buf_v.narrow(2, lo, hi + n - lo)
        hi += n
        if keep is not None and hi - lo > keep + self.slack:
            lo = hi - keep - self.slack
        self.lo[j], self.hi[j] = lo, hi
        return k_all, v_all

    @property
    def layers(self) -> list[list[torch.Tensor]]:
        """``layers[j] = [k, v]``: block j's held keys and values (views; empty before its first step)."""
        return [[] if k is None else [k[:, :, lo:hi], v[:, :, lo:hi]]
                for k, v, lo, hi in zip(self.keys, self.values, self.lo, self.hi)]

    def held(self, j: int) -> int:
        """Keys block j holds (== length unless a sliding window dropped older ones)."""
        return self.hi[j] - self.lo[j]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (at most ``slack`` of them under a sliding window)."""
        cut = self.length - length
        if cut <= 0:
            return
        for j, buf in enumerate(self.keys):
            if buf is not None:
                if self.hi[j] - cut < self.lo[j]:  # the window's slack is sized so that this never happens
                    raise RuntimeError(f"KV cache: a cut of {cut} positions is more than block {j} holds past its "
                                       f"window ({self.hi[j] - self.lo[j]}); the proposals outran the slack")
                self.hi[j] -= cut
        self.length = length

    def nbytes(self) -> int:
        """Bytes reserved (the buffers' capacity), which is what the stage's memory holds."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


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
        self.starts = [0, *itertools.accumulate(sizes)][:len(sizes)]

    def positions(self, device=None) -> torch.Tensor:
        """Every token's position, (1, total): each request's continue from its cache's length."""
        if len(self.caches) == sum(self.sizes):  # one token each (decodes): one small tensor, not a cat
            return torch.tensor([[c.length for c in self.caches]], device=device)
        return torch.cat([torch.arange(c.length, c.length + n, device=device)
                          for c, n in zip(self.caches, self.sizes)]).unsqueeze(0)

    def segments(self) -> list[tuple[KVCache, int, int, int]]:
        """Per request: (its cache, first row, rows, positions before); the same for every block of a step."""
        return [(c, a, n, c.length) for c, a, n in zip(self.caches, self.starts, self.sizes)]

    def advance(self) -> None:
        for c, n in zip(self.caches, self.sizes):
            c.length += n

    def last_rows(self) -> list[int]:
        """Each request's last row: the one whose logits pick its next token."""
        return [a + n - 1 for a, n in zip(self.starts, self.sizes)]


def as_batch(x: torch.Tensor, cache: KVCache | Batch | None) -> Batch | None:
    """One request's cache is a batch of one, so a stage has one code path."""
    return Batch([cache], [x.shape[1]]) if isinstance(cache, KVCache) else cache


def pin_attributes(stage: nn.Module) -> None:
    """Make a loaded inference stage's submodules and parameters plain instance attributes.

    ``module.weight`` on an ``nn.Module`` is slow: the parameter lives in ``_parameters``, so the normal
    lookup fails first (CPython formats an AttributeError message and discards it) and then
    ``nn.Module.__getattr__`` runs in Python: ~1-1.5 us a lookup, ~20 lookups per GPT-2 block (perf:
    ``PyUnicode_FromFormatV`` and ``slot_tp_getattr_hook`` on every stage's profile). A copy in the
    instance ``__dict__`` is found at once. The same objects, so
    the same values: outputs do not change. Only for a stage that is done loading and never changes again
    (serving): a later ``module.x = ...`` goes through ``nn.Module.__setattr__``, which drops the pinned copy,
    but code that replaces ``_parameters`` entries directly (``module.to()`` with parameter overwriting,
    ``swap_tensors``) would leave a stale one.
    """
    for module in stage.modules():
        for name, value in [*module._parameters.items(), *module._buffers.items(), *module._modules.items()]:
            if value is not None:
                object.__setattr__(module, name, value)


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
