"""Which replica a request goes to, when the chat serves ``replicas=R`` pipelines behind one head.

    router = Router(block=32)
    keys = router.keys(prompt_ids, adapter)
    r = router.pick(keys, loads=[3, 1], live=[True, True], served=[9, 9])   # 1: least loaded (or the prefix's holder)
    router.remember(keys, r)

Each replica's stages keep their own prefix cache (:mod:`smolcluster.inference.prefix`), so a conversation's next
turn is cheap only on the replica that served the turns before. The head keys a prompt as the stages do: whole
blocks of ``block`` tokens, each block's key chained on the one before and rooted in the adapter, and remembers in
a bounded LRU map which replica last held each key. The chain is head-side only (no weights or format in its
root): it never has to equal a stage's keys, only to name the same prefixes.
"""

from __future__ import annotations

from collections import OrderedDict

from smolcluster.inference.prefix import chain, root_key

# A replica holding a prompt's prefix is preferred while it has at most this many more requests (active + waiting)
# than the least loaded live replica. A hit skips prefilling the whole history, worth waiting behind a few
# decoding requests (continuous batching runs them together anyway); past that, the idle replica's full prefill
# is the faster answer and the load spreads again.
STICKY_SLACK = 4


class Router:
    def __init__(self, block: int, capacity: int = 65536):
        """``block``: the stages' ``serve.prefix_block``; ``capacity``: block keys remembered (LRU)."""
        self.block, self.capacity = block, capacity
        self.holder: OrderedDict[str, int] = OrderedDict()  # block key -> the replica that last held it

    def keys(self, ids: list[int], adapter: str = "") -> list[str]:
        """The chain of a prompt's whole blocks (a prompt shorter than a block has none)."""
        out, parent = [], root_key({}, adapter)
        for i in range(len(ids) // self.block):
            parent = chain(parent, ids[i * self.block:(i + 1) * self.block])
            out.append(parent)
        return out

    def holding(self, keys: list[str], live: list[bool]) -> tuple[int | None, int]:
        """(the live replica holding the longest prefix of ``keys``, how many blocks), or (None, 0)."""
        for depth in range(len(keys), 0, -1):
            r = self.holder.get(keys[depth - 1])
            if r is not None and live[r]:
                return r, depth
        return None, 0

    def pick(self, keys: list[str], loads: list[int], live: list[bool], served: list[int]) -> int | None:
        """The replica for a request: the live one holding its longest cached prefix unless that one has more than
        ``STICKY_SLACK`` requests beyond the least loaded; else the least loaded live one, ties to the one that has
        served fewest (so a quiet server still spreads new conversations, and their caches, evenly). None when no
        replica is live."""
        up = [r for r in range(len(loads)) if live[r]]
        if not up:
            return None
        least = min(up, key=lambda r: (loads[r], served[r], r))
        held, _ = self.holding(keys, live)
        if held is not None and loads[held] <= loads[least] + STICKY_SLACK:
            return held
        return least

    def remember(self, keys: list[str], replica: int) -> None:
        """``replica`` now holds these blocks (its stages cache what they serve); the oldest keys beyond
        ``capacity`` are forgotten."""
        for key in keys:
            self.holder[key] = replica
            self.holder.move_to_end(key)
        while len(self.holder) > self.capacity:
            self.holder.popitem(last=False)

    def forget(self, replica: int) -> None:
        """A replica was rebuilt: its stages start with empty caches."""
        for key in [k for k, r in self.holder.items() if r == replica]:
            del self.holder[key]
