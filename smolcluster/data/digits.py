"""scikit-learn's 1,797 real 8x8 handwritten digits: the embedded default data set."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch


def digits_file() -> Path:
    """scikit-learn's own copy of the images (``sklearn/datasets/data/digits.csv.gz``), found without importing
    scikit-learn: ``sklearn.datasets`` pulls scipy and pandas in, about 1.7 s in every process of a digits run
    (server, each worker), for a 1,797-row CSV that ``load_digits`` reads with ``np.loadtxt`` as we do."""
    spec = importlib.util.find_spec("sklearn")  # a top-level spec: locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("data=digits needs scikit-learn (it ships the images): pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def load(test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with gzip.open(digits_file(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",")  # 64 pixel columns, then the label
    x = torch.tensor(rows[:, :-1], dtype=torch.float32) / 16.0  # pixel values are 0..16
    x = (x - 0.3) / 0.4
    y = torch.tensor(rows[:, -1].astype(np.int64), dtype=torch.long)
    # A fixed split, independent of the run seed, so every run is evaluated on the same images.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
