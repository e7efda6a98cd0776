"""Deterministic batches, sharded by rank: every process derives the same global batch.

A *global batch* is ``sum(batch_sizes)`` samples drawn from a permutation seeded by
``(seed, epoch)``; worker ``r`` takes its own contiguous slice of it. So the union of
the workers' batches at step ``s`` is exactly the batch ``algo=local`` sees at step
``s`` with ``batch_size = sum(batch_sizes)``: the basis of the equivalence tests, and
of exact resume (the batch depends only on the step number).
"""

from __future__ import annotations

import torch

from smolcluster.errors import ConfigError


class Sharder:
    def __init__(self, num_samples: int, batch_sizes: list[int], seed: int):
        self.num_samples = num_samples
        self.batch_sizes = list(batch_sizes)
        self.global_batch = sum(self.batch_sizes)
        self.offsets = [sum(self.batch_sizes[:r]) for r in range(len(self.batch_sizes))]
        self.seed = seed
        if self.global_batch > num_samples:
            raise ConfigError(
                f"the global batch ({self.global_batch} = train.batch_size x workers) is larger than the "
                f"training set ({num_samples} samples): lower train.batch_size"
            )
        self.steps_per_epoch = num_samples // self.global_batch
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.num_samples, generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self._permutation(epoch)[i * self.global_batch : (i + 1) * self.global_batch]

    def indices(self, step: int, rank: int) -> torch.Tensor:
        start = self.offsets[rank]
        return self.global_indices(step)[start : start + self.batch_sizes[rank]]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
