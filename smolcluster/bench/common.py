"""What the in-process ``algo=local`` benchmarks share: their data arguments and their config."""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from smolcluster.paths import CONFIG_DIR


def add_local_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--root", default=str(Path("../shared/data/mnist")), help="MNIST IDX directory")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64)


def local_config(args: argparse.Namespace, *extra: str) -> DictConfig:
    """The composed config of an ``algo=local`` run on ``args``' data, steps and batch size."""
    overrides = [f"data={args.data}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                 "train.progress=false", "algo=local", *extra]
    if args.data == "mnist":
        overrides.append(f"data.root={args.root}")
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose("config", overrides=overrides)
