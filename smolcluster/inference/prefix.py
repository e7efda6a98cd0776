"""The prefix cache: stages keep the KV of recently served tokens, so a request that starts with them (a chat's
next turn re-sends the whole conversation) prefills only the rest.

Blocks. A request's tokens are cut into blocks of ``serve.prefix_block`` tokens; block i's key is a hash of block
i-1's key and block i's ids (vLLM's automatic prefix caching), the chain rooted in everything else that changes
the KV: the weights, their format, and the request's LoRA adapter. Equal keys are then equal prefixes with equal
KV, and a lookup walks down a prompt's keys. Only whole blocks are kept, and a prompt's last token is always fed
(its logits pick the first new token).

Who decides. Stages past 0 see hidden states, not token ids, so stage 0 decides everything: which blocks to
store (each as it becomes whole in a request's cache, the answer's too, so a chat's next turn reuses both),
which to evict (least recently used), and how many tokens a new request reuses. Its decisions travel as ``ops``
on the steps it sends (``mp.hidden``'s ``prefix``), which every stage sees in the same order, so each stage's
blocks mirror stage 0's; a new request's intro names the keys it reuses. A stage that lacks one (it could not
store it: the request was cancelled there first) fails that request, naming why, and tells stage 0 to forget
the key (``mp.forget``), so a retry prefills in full: output is never silently wrong.

Memory. A block is a copy: a request copies its prefix into its own KVCache, so evicting a block never touches
a running request. Blocks count in the KV budget: stage 0 evicts the least recently used before a request has
to wait for room, or to make room for a new block. Families with a sliding window are served without it (their
caches drop old keys).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import torch

from smolcluster.errors import PeerError
from smolcluster.pipeline.architectures import KVCache


def root_key(identity: dict, adapter: str) -> str:
    """The chain's root: what besides the token ids makes a stage's KV what it is."""
    return hashlib.blake2b(json.dumps([identity, adapter], sort_keys=True).encode(), digest_size=16).hexdigest()


def chain(parent: str, ids) -> str:
    """Block key: a hash of the previous block's key and this block's token ids (int64 bytes)."""
    data = parent.encode() + torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _nbytes(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class PrefixCache:
    """One stage's blocks: key -> per block of the stage's layers, its (keys, values) for ``block`` positions.

    Kept in an OrderedDict, least recently used first. Stage 0 calls :meth:`store`, :meth:`evict` and
    queues the same as ``ops`` for the others, which replay them with :meth:`apply`.
    """

    def __init__(self, block: int):
        self.block = block
        self.blocks: OrderedDict[str, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.nbytes = 0
        self.hits = self.saved = 0  # requests that reused a prefix here, and the tokens they did not prefill
        self.ops: list[list] = []   # stage 0: decisions not yet sent (they leave with the next step)

    def __contains__(self, key: str) -> bool:
        return key in self.blocks

    def tokens(self) -> int:
        return len(self.blocks) * self.block

    def match(self, keys: list[str]) -> int:
        """How many of ``keys`` (a prompt's chain) are held, from the first on."""
        n = 0
        while n < len(keys) and keys[n] in self.blocks:
            n += 1
        return n

    def touch(self, keys: list[str]) -> None:
        """Mark a chain used; its first block last, so a chain is evicted from its end (a shorter prefix stays)."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def store(self, key: str, cache: KVCache, index: int) -> None:
        """Copy positions ``[index * block, (index + 1) * block)`` of a request's cache (the same on every stage)."""
        a = index * self.block
        kv = [(k[:, :, a:a + self.block].clone(), v[:, :, a:a + self.block].clone()) for k, v in cache.layers]
        self.evict(key)  # (a key stored again replaces its block, counted once)
        self.blocks[key] = kv
        self.nbytes += _nbytes(kv)

    def evict(self, key: str) -> None:
        kv = self.blocks.pop(key, None)
        if kv is not None:
            self.nbytes -= _nbytes(kv)

    def clear(self) -> None:
        """Drop every block and every op not yet sent (a stage was lost); the counters go on (they feed
        Prometheus counters, which never go down)."""
        self.blocks.clear()
        self.nbytes = 0
        self.ops.clear()

    def load(self, keys: list[str], cache: KVCache) -> None:
        """Fill a new request's empty cache with the blocks ``keys`` (its prompt's first, in order)."""
        for j in range(len(cache.keys)):
            cache.append(j, torch.cat([self.blocks[key][j][0] for key in keys], dim=2),
                         torch.cat([self.blocks[key][j][1] for key in keys], dim=2))
        cache.length = len(keys) * self.block
        self.touch(keys)
        self.hits += 1
        self.saved += cache.length

    def apply(self, ops: list, caches: dict[str, KVCache]) -> list[str]:
        """Replay stage 0's decisions: ``["e", key]`` evicts, ``["s", key, req, index]`` stores a block of that
        request's cache. The keys it could not store (their request is gone here). Every op is checked before any
        is applied: a malformed one (a peer of another version) is refused, naming it, and the cache is unchanged."""
        for op in ops:
            self.check(op, caches)
        lost = []
        for op in ops:
            if op[0] == "e":
                self.evict(op[1])
            elif op[2] in caches:
                self.store(op[1], caches[op[2]], op[3])
            else:
                lost.append(op[1])
        return lost

    def check(self, op, caches: dict[str, KVCache]) -> None:
        """One op as :meth:`apply` takes it: the wire checks a message's own fields, not what nests in them, and
        a store past its request's cache would keep a short block that a later request loads as a whole one."""
        ok = isinstance(op, (list, tuple)) and len(op) >= 2 and isinstance(op[1], str)
        if ok and op[0] == "s":
            ok = (len(op) == 4 and isinstance(op[2], str) and isinstance(op[3], int) and not isinstance(op[3], bool)
                  and op[3] >= 0 and (op[2] not in caches or (op[3] + 1) * self.block <= caches[op[2]].length))
        elif ok:
            ok = op[0] == "e" and len(op) == 2
        if not ok:
            raise PeerError(f"prefix-cache op {op!r} is malformed: an op is [\"e\", key] or [\"s\", key, request, "
                            f"block index] within that request's cache (blocks of {self.block}); every stage must run "
                            "the same smolcluster version")
