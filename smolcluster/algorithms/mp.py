"""``algo=mp``: model parallelism, the model split by layers into a pipeline of stages.

``role=launch`` (the default) starts every stage on this machine and merges their
checkpoint shards at the end; on a real cluster each node runs one stage with
``role=stage rank=N`` (same config everywhere, ``cluster.nodes[i].host`` per stage).
The schedule itself (GPipe) is in :mod:`smolcluster.pipeline.gpipe`.
"""

from __future__ import annotations

from pathlib import Path

from smolcluster.errors import ConfigError
from smolcluster.train_settings import TrainConfig


def check(cfg: TrainConfig) -> None:
    stages, mb = cfg.algo.stages, cfg.algo.microbatches
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"algo.stages={stages!r} is invalid: it must be a positive integer (e.g. algo.stages=2)")
    if not isinstance(mb, int) or mb < 1 or cfg.train.batch_size % mb:
        raise ConfigError(f"algo.microbatches={mb!r} must be a positive integer dividing train.batch_size="
                          f"{cfg.train.batch_size}")


def run(cfg: TrainConfig, run_dir: Path) -> dict | None:
    check(cfg)
    if cfg.role == "launch":
        from smolcluster.launch.local import launch_training

        return launch_training(cfg, run_dir)
    if cfg.role == "stage":
        if cfg.rank is None:
            raise ConfigError("role=stage needs its rank: add rank=N (0 <= N < algo.stages)")
        from smolcluster.pipeline.gpipe import StageTrainer

        return StageTrainer(cfg, run_dir, int(cfg.rank)).run()
    raise ConfigError(f"role={cfg.role!r} is invalid for algo=mp: choose launch (every stage here) or stage")
