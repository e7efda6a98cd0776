"""``algo=local``: one process, no network. The reference every distributed algorithm is measured against."""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from tqdm import tqdm

from smolcluster.telemetry.run_files import open_recorder
from smolcluster.train_settings import TrainConfig
from smolcluster.trainer import LossWindow, Trainer


def run(cfg: TrainConfig, run_dir: Path) -> dict:
    trainer = Trainer(cfg, [cfg.train.batch_size])
    if cfg.resume:
        trainer.resume(cfg.resume)
    tr = trainer.train
    recorder = open_recorder(cfg, run_dir, keep_until=trainer.step if cfg.resume else None)
    logger.info(f"algo=local model={trainer.model_name} ({trainer.num_params:,} params) data={cfg.data['name']} "
                f"device={trainer.device} steps={trainer.end_step}/{trainer.total_steps} batch={tr.batch_size}")
    window = LossWindow(tr.log_every)
    if tr.eval_every and trainer.step == 0:
        recorder.log(0, **trainer.evaluate())  # the starting point of the eval curve
    bar = tqdm(total=trainer.end_step, initial=trainer.step, desc="train", unit="step",
               disable=None if tr.progress else True, dynamic_ncols=True)  # None: only on a terminal
    trainer.start_clock(recorder)
    while trainer.step < trainer.end_step:
        loss, n, lr = trainer.step_local()
        window.add(loss)
        trainer.samples += n
        bar.update(1)
        step, row = trainer.step, {}
        if step % tr.log_every == 0 or step == trainer.end_step:
            rate = trainer.rate
            row = {"loss": window.mean(), "lr": lr, "samples": trainer.samples,
                   "samples_per_s": round(rate, 2), "epoch": round(trainer.sharder.epoch_of(step), 4)}
            bar.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{rate:,.0f}")
        trainer.after_step(recorder, run_dir, row)
    bar.close()
    evaluation = trainer.evaluate()
    recorder.log(trainer.step, **evaluation)
    trainer.save(run_dir)
    summary = trainer.summary("local", window.mean(), evaluation, run_dir)
    return recorder.finish(summary)
