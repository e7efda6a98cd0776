"""``algo=local``: one process, no network. The reference every distributed algorithm is measured against."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from smolcluster.telemetry.run_files import open_recorder
from smolcluster.train_settings import TrainConfig
from smolcluster.trainer import RunLoop, Trainer


def run(cfg: TrainConfig, run_dir: Path) -> dict:
    trainer = Trainer(cfg, [cfg.train.batch_size])
    if cfg.resume:
        trainer.resume(cfg.resume)
    recorder = open_recorder(cfg, run_dir, keep_until=trainer.step if cfg.resume else None)
    logger.info(f"algo=local model={trainer.model_name} ({trainer.num_params:,} params) data={cfg.data['name']} "
                f"device={trainer.device} steps={trainer.end_step}/{trainer.total_steps} "
                f"batch={cfg.train.batch_size}")
    loop = RunLoop(trainer, recorder, run_dir,
                   fields=lambda: {"epoch": round(trainer.sharder.epoch_of(trainer.step), 4)})
    loop.start(eval_first=True, progress=True)
    loop.run(trainer.step_local)
    return loop.finish("local")
