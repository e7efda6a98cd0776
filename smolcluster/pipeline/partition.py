"""Which layers each stage owns: an even split, or one proportional to per-node weights.

The unit of splitting is a *block*: a transformer block for GPT-2, a Linear layer
(with the activation after it) for an MLP. The first stage also owns the input
side (GPT-2's token and position embeddings), the stage with the head the output
side (GPT-2's final norm and LM head). "Evenly" means equal *parameter memory* per
stage, the embeddings and head counted where they live, because memory is why a
model is split; blocks are indivisible, so the split minimises the largest share.
With weights from ``cluster.nodes[i].weight`` (e.g. proportional to a node's memory
or measured speed; absent weights count as 1) stage i gets a share proportional to
its weight.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolcluster.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    rank: int
    n_stages: int
    blocks: range  # the model's block indices this stage owns

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.n_stages - 1

    @property
    def name(self) -> str:
        return stage_name(self.rank)

    def describe(self, head: bool = False, embeddings: bool = False) -> str:
        blocks = f"blocks {self.blocks.start}-{self.blocks.stop - 1}" if len(self.blocks) > 1 else f"block {self.blocks.start}"
        parts = (["embeddings"] if embeddings else []) + [blocks] + (["head"] if head else [])
        return f"stage {self.rank}/{self.n_stages}: " + " + ".join(parts)


def stage_name(rank: int) -> str:
    return f"s{rank}"


def split_blocks(costs: list[float], weights: list[float], first_extra: float = 0.0,
                 last_extra: float = 0.0) -> list[int]:
    """Block counts per stage (contiguous, at least one each) that minimise the largest
    ``stage cost / stage weight``; a stage's cost is its blocks' plus the first / last extras."""
    n, nb = len(weights), len(costs)
    if n < 1:
        raise ConfigError("a pipeline needs at least one stage: set the number of stages (e.g. stages=2)")
    if n > nb:
        raise ConfigError(f"{n} stages but the model has only {nb} blocks to split: use at most {nb} stages")
    if any(not w > 0 for w in weights):
        raise ConfigError(f"stage weights {weights} must all be positive (cluster.nodes[i].weight)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def load(stage: int, a: int, b: int) -> float:  # blocks a..b-1 on `stage`
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == n - 1 else 0.0)
        return (prefix[b] - prefix[a] + extra) / weights[stage]

    # best[s][b]: the smallest max-load placing blocks 0..b-1 on stages 0..s-1; cut[s][b]: where stage s-1 starts.
    inf = float("inf")
    best = [[inf] * (nb + 1) for _ in range(n + 1)]
    cut = [[0] * (nb + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for b in range(s, nb - (n - s) + 1):
            for a in range(s - 1, b):
                value = max(best[s - 1][a], load(s - 1, a, b))
                if value < best[s][b] - 1e-12:
                    best[s][b], cut[s][b] = value, a
    counts, b = [], nb
    for s in range(n, 0, -1):
        a = cut[s][b]
        counts.append(b - a)
        b = a
    return counts[::-1]


def plan(costs: list[float], n_stages: int, weights: list[float] | None = None,
         first_extra: float = 0.0, last_extra: float = 0.0) -> list[StageSpec]:
    """Split blocks with the given costs (e.g. parameter counts) over ``n_stages`` stages."""
    counts = split_blocks(list(costs), list(weights) if weights else [1.0] * n_stages, first_extra, last_extra)
    specs, start = [], 0
    for rank, c in enumerate(counts):
        specs.append(StageSpec(rank, n_stages, range(start, start + c)))
        start += c
    return specs


def node_weights(cluster, n_stages: int) -> list[float]:
    """``cluster.nodes[i].weight`` for each stage (1.0 where a node names none; ``cluster``: a ClusterSpec)."""
    return [cluster.node(i).weight for i in range(n_stages)] if cluster is not None else [1.0] * n_stages
