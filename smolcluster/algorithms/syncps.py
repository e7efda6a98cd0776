"""``algo=syncps``: synchronous parameter server.

Every step is a barrier: the server waits for the gradient of every live worker
for that step (:meth:`SyncServer.barrier`), averages them weighted by each worker's
assigned batch (never the count it reports; see ``ServerBase.accept_gradient``),
steps the optimizer once and sends the new weights to everyone. A worker later
than ``algo.straggler_timeout`` is skipped for that step; one that misses its
heartbeats leaves the barrier; one that comes back re-registers and continues
on the current weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from loguru import logger

from smolcluster.algorithms.ps import ServerBase, Worker, WorkerInfo, run_role
from smolcluster.train_settings import TrainConfig
from smolcluster.transport import Message


class SyncServer(ServerBase):
    algo = "syncps"

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        super().__init__(cfg, run_dir)
        # rank -> (gradient, its weight: the assigned batch, its loss, how much of it to apply: < 1 when clipped)
        self.pending: dict[int, tuple[dict[str, torch.Tensor], int, float, float]] = {}
        self.rejected: set[int] = set()  # ranks whose gradient for this step was rejected: answered, not applied
        self.straggler_skips = self.trainer.carried.get("straggler_skips", 0)

    def run_state(self) -> dict:
        return {**super().run_state(), "straggler_skips": self.straggler_skips}

    def on_grad(self, worker: WorkerInfo, msg: Message, grads: dict[str, torch.Tensor]) -> None:
        f = msg.fields
        if f["step"] != self.trainer.step:  # a straggler's gradient for a step already taken
            # not counted again: run() counted the step as skipped when the barrier moved on without it
            logger.debug(f"discarded worker {worker.rank}'s gradient for past step {f['step']}")
            return
        scale = self.accept_gradient(worker, msg, grads)
        if not scale:
            self.rejected.add(worker.rank)
            return
        # grads are views of the received frame; they are consumed in barrier() before the next recv
        self.pending[worker.rank] = (grads, self.assigned[worker.rank], f["loss"], scale)
        worker.last_loss = f["loss"]

    def barrier(self) -> list[int]:
        """Wait until every live worker's gradient for this step is in, or the straggler timeout passes."""
        deadline = time.monotonic() + self.cfg.algo.straggler_timeout
        while True:
            waiting = [w.rank for w in self.live() if w.rank not in self.pending and w.rank not in self.rejected]
            if not waiting and (self.pending or self.rejected):
                return []
            if time.monotonic() > deadline and self.pending:
                return waiting
            if not self.live():
                self.wait_for_workers(1)  # everyone is gone: wait (bounded) for someone to come back
                for w in self.live():
                    self.send_weights(w)
                deadline = time.monotonic() + self.cfg.algo.straggler_timeout
            self.poll(0.05)
            self.check_liveness()

    def average(self) -> tuple[int, float]:
        """flat.grads = sum(batch_r * scale_r * grad_r) / sum(batch_r) (scale_r < 1: clipped by the norm guard)."""
        total = sum(n for _, n, _, _ in self.pending.values())
        for name, g in self.trainer.flat.grads.items():
            for i, (grads, n, _, scale) in enumerate(self.pending.values()):
                w = n / total if scale == 1.0 else n / total * scale
                if i == 0:  # the first one written, not added to a zeroed buffer: one pass fewer a step
                    torch.mul(grads[name].to(g.device), w, out=g)
                else:
                    g.add_(grads[name].to(g.device), alpha=w)
        loss = sum(loss * n for _, n, loss, _ in self.pending.values()) / total
        return total, loss

    def run(self) -> dict:
        self.wait_for_workers(self.cluster.workers)
        self.start_clock()
        trainer = self.trainer
        while trainer.step < trainer.end_step:
            late = self.barrier()
            for rank in late:
                self.workers[rank].skipped += 1
                self.straggler_skips += 1
                logger.warning(f"step {trainer.step}: worker {rank} is a straggler (> algo.straggler_timeout="
                               f"{self.cfg.algo.straggler_timeout}s); skipped for this step")
            self.rejected.clear()
            if not self.pending:  # every gradient of this step was an outlier: the step passes, nothing applied
                logger.warning(f"step {trainer.step}: every gradient was rejected; the step is skipped")
                trainer.step += 1
                self.send_all_weights()
                continue
            samples, loss = self.average()
            for rank in self.pending:
                self.workers[rank].applied += 1
                self.workers[rank].samples += self.pending[rank][1]
            self.pending.clear()
            self.last_lr = trainer.apply_gradients()
            self.after_step(loss, samples)
            self.send_all_weights()
        return self.finish(**self.policy_fields())

    def policy_fields(self) -> dict:
        return {"straggler_skips": self.straggler_skips, **self.guard_counts()}

    def send_all_weights(self) -> None:
        if self.trainer.step < self.trainer.end_step:
            for w in self.live():
                self.send_weights(w)


class SyncWorker(Worker):
    """Computes the batch of the step the server's weights are at, then waits for the next weights
    (the shared loop's defaults: :class:`~smolcluster.algorithms.ps.Worker`)."""

    algo = "syncps"


def run(cfg: TrainConfig, run_dir: Path) -> dict | None:
    return run_role(cfg, run_dir, SyncServer, SyncWorker)
