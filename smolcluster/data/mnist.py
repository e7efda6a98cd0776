"""MNIST from the standard IDX files in a directory (gzipped or not)."""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from smolcluster.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # the mirror torchvision uses
_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dimension, images: 3 dimensions


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _download(root: Path, stem: str, mirror: str) -> Path:
    """Fetch ``stem.gz`` from the mirror into root: checked in memory first, so a failed or cut
    download leaves nothing behind (not even the directory: data.root may be a typo)."""
    dest, part = root / (stem + ".gz"), root / f"{stem}.part{os.getpid()}.gz"
    url = mirror.rstrip("/") + "/" + stem + ".gz"
    logger.info(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
        parse_idx(gzip.decompress(data), url)
    except (OSError, EOFError, DataError) as e:
        raise DataError(
            f"MNIST file {stem}.gz not found in {root.resolve()} and the download from {url} failed ({e}): "
            f"copy the four IDX files into {root.resolve()}, point data.root=DIR at a copy, or set "
            "data.mirror=URL to another mirror"
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)  # one .part per process: the workers of a cluster may all download at once
    part.replace(dest)
    return dest


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file; a truncated or corrupted file raises DataError naming it."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path} is not a readable (gzipped) IDX file ({e}); download it again") from e
    return parse_idx(raw, path)


def parse_idx(raw: bytes, where) -> np.ndarray:
    if len(raw) < 8:
        raise DataError(f"{where} is truncated ({len(raw)} bytes); download it again")
    magic = int.from_bytes(raw[:4], "big")
    ndim = _MAGIC.get(magic)
    if ndim is None:
        raise DataError(f"{where} is not an MNIST IDX file (magic number {magic}); check data.root")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{where} is truncated or corrupted: header says {dims} ({expected} bytes) but the file "
            f"has {len(raw)}; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load(root: str | Path, download: bool = False, mirror: str = MIRROR):
    """(train_x, train_y, test_x, test_y); missing files are fetched from ``mirror`` when ``download``."""
    root = Path(root).expanduser()
    arrays = {}
    for key, stem in FILES.items():
        path = _find(root, stem)
        if path is None:
            if not download:
                raise DataError(
                    f"MNIST file {stem}.gz not found in {root.resolve()}: put the four IDX files there, "
                    "set data.root=DIR, or set data.download=true to fetch them"
                )
            path = _download(root, stem, mirror)
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"MNIST {split} set in {root}: {n_img} images but {n_lab} labels; re-download")

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)
        return (x - 0.1307) / 0.3081

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return (images(arrays["train_images"]), labels(arrays["train_labels"]),
            images(arrays["test_images"]), labels(arrays["test_labels"]))
