"""scikit-learn's 1,797 real 8x8 handwritten digits: the embedded default data set."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits


def load(test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    # A fixed split, independent of the run seed, so every run is evaluated on the same images.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
