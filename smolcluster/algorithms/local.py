"""``algo=local``: one process, no network. The reference every distributed algorithm is measured against."""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from omegaconf import DictConfig
from tqdm import tqdm

from smolcluster.telemetry.run_files import open_recorder
from smolcluster.trainer import LossWindow, Throughput, Trainer


def run(cfg: DictConfig, run_dir: Path) -> dict:
    trainer = Trainer(cfg, [cfg.train.batch_size])
    if cfg.resume:
        trainer.resume(cfg.resume)
    tr = trainer.train
    recorder = open_recorder(cfg, run_dir, append=False)
    logger.info(f"algo=local model={cfg.model.name} ({trainer.num_params:,} params) data={cfg.data.name} "
                f"device={trainer.device} steps={trainer.end_step}/{trainer.total_steps} batch={tr.batch_size}")
    window, speed = LossWindow(tr.log_every), Throughput()
    evaluation: dict = {}
    if tr.eval_every and trainer.step == 0:
        recorder.log(0, **trainer.evaluate())  # the starting point of the eval curve
    bar = tqdm(total=trainer.end_step, initial=trainer.step, desc="train", unit="step",
               disable=not tr.progress, dynamic_ncols=True)
    while trainer.step < trainer.end_step:
        loss, n, lr = trainer.step_local()
        window.add(loss)
        speed.add(n)
        bar.update(1)
        step, row = trainer.step, {}
        if step % tr.log_every == 0 or step == trainer.end_step:
            row = {"loss": window.mean(), "lr": lr, "samples": speed.samples,
                   "samples_per_s": round(speed.rate, 2), "epoch": round(trainer.sharder.epoch_of(step), 4)}
            bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{speed.rate:,.0f}")
        row.update(trainer.pop_grad_norms())
        if trainer.due(tr.eval_every):
            evaluation = trainer.evaluate()
            row.update(evaluation)
        if row:
            recorder.log(step, **row)
        if trainer.due(tr.checkpoint_every):
            trainer.save(run_dir)
    bar.close()
    evaluation = trainer.evaluate()
    recorder.log(trainer.step, **evaluation)
    trainer.save(run_dir)
    summary = trainer.summary("local", speed.samples, speed.elapsed, window.mean(), evaluation, run_dir)
    return recorder.finish(summary)
