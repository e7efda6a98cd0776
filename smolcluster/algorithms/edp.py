"""``algo=edp``: Elastic Distributed Parallelism — an asynchronous, staleness-aware parameter server.

Nobody waits. Each worker pushes gradients tagged with the weight version they were
computed on and keeps training; the server applies each one on arrival, its step
scaled by :func:`staleness_scale`, and drops those older than ``algo.max_staleness``.
Workers pull fresh weights every ``algo.pull_every`` steps, may join at any time
(starting from the current weights) and may leave or die without anyone stalling.
So a Raspberry Pi never holds back a Mac mini: it just contributes less, and later.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from smolcluster.algorithms.guard import grad_norm
from smolcluster.algorithms.ps import ServerBase, Worker, WorkerInfo, run_role
from smolcluster.errors import ConfigError
from smolcluster.train_settings import TrainConfig
from smolcluster.transport import Message
from smolcluster.transport.compression import ErrorFeedback

RULES = ("inverse", "constant", "dc")


def staleness_scale(staleness: int, rule: str) -> float:
    """The EDP staleness rule: how much of a normal step a gradient this stale gets."""
    return 1.0 if rule == "constant" else 1.0 / (1.0 + staleness)


class EdpServer(ServerBase):
    algo = "edp"
    loss_window = None  # a row's loss: the workers' over the last train.log_every updates

    def quorum(self, cfg: TrainConfig) -> int:
        return cfg.algo.min_workers  # training starts once this many registered

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        if cfg.algo.staleness_rule not in RULES:
            raise ConfigError(f"algo.staleness_rule={cfg.algo.staleness_rule!r} is invalid: choose one of {', '.join(RULES)}")
        super().__init__(cfg, run_dir)
        if not cfg.train.steps:  # an update uses one worker's batch, a SyncPS step all of them: same sample budget
            self.trainer.total_steps *= cfg.cluster.workers
            self.trainer.end_step = min(self.trainer.total_steps, cfg.train.stop_after or self.trainer.total_steps)
        self.rule, self.max_staleness = cfg.algo.staleness_rule, cfg.algo.max_staleness
        self.applied, self.dropped = self.trainer.carried.get("applied", 0), self.trainer.carried.get("dropped", 0)
        self.started = False  # True once algo.min_workers have registered
        self.window_stale: dict[int, list[int]] = {}  # per rank, since the last logged step
        # Weights each recent version was sent with, for delay compensation (dc) only.
        self.history: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def run_state(self) -> dict:
        return {**super().run_state(), "applied": self.applied, "dropped": self.dropped}

    def send_weights(self, worker: WorkerInfo, kind: str = "weights") -> None:
        if self.rule == "dc" and self.trainer.step not in self.history:
            self.history[self.trainer.step] = {n: torch.from_numpy(a) for n, a in self.weights().items()}
            while len(self.history) > self.max_staleness + 1:
                self.history.popitem(last=False)
        super().send_weights(worker, kind)

    def on_grad(self, worker: WorkerInfo, msg: Message, grads: dict[str, torch.Tensor]) -> None:
        f = msg.fields
        s = self.trainer.step - f["version"]
        worker.last_loss = f["loss"]
        rate = f.get("samples_per_s")  # the worker's own word, shown as such: a number, never negative
        worker.samples_per_s = rate if rate is None or rate >= 0 else None
        if not self.started or self.trainer.step >= self.trainer.end_step:
            # before algo.min_workers have registered (the wait polls the socket, so early workers'
            # gradients arrive), or after the last update: not applied, not a staleness drop
            worker.skipped += 1
            return
        worker.stale.append(s)
        if s > self.max_staleness or s < 0:
            worker.skipped += 1
            self.dropped += 1
            self.guard.observe(grad_norm(grads.values()), str(worker.rank), f["version"])  # (observe says why)
            logger.debug(f"dropped worker {worker.rank}'s gradient: staleness {s} outside 0..algo.max_staleness={self.max_staleness}")
            return
        scale = self.accept_gradient(worker, msg, grads)
        if not scale:
            return
        flat, n = self.trainer.flat, self.assigned[worker.rank]  # the weight it was assigned, not what it says
        for name, g in flat.grads.items():
            g.copy_(grads[name])
            if scale != 1.0:  # clipped to the norm guard's bound
                g.mul_(scale)
            old = self.history.get(f["version"]) if self.rule == "dc" else None
            if old is not None and s > 0:  # DC-ASGD: g + lambda * g * g * (w_now - w_then)
                g.add_(g * g * (flat.params[name] - old[name].to(g.device)), alpha=self.cfg.algo.dc_lambda)
        self.last_lr = self.trainer.apply_gradients(staleness_scale(s, self.rule))
        worker.applied += 1
        worker.samples += n
        self.applied += 1
        self.window_stale.setdefault(worker.rank, []).append(s)
        self.after_step(f["loss"], n)

    def policy_fields(self) -> dict:
        """Staleness and counts on every ``train.log_every``-th update's row (not on the last one's, off that)."""
        return self.window_metrics() if self.trainer.step % self.tr.log_every == 0 else {}

    def window_metrics(self) -> dict:
        """A logged step's row: staleness over the window since the last one and counts so far, overall and per
        rank (who is slow, who is stale: what one wants to see when running EDP on unlike machines)."""
        every = [s for stale in self.window_stale.values() for s in stale]
        row = {"staleness_mean": float(np.mean(every)), "staleness_max": int(max(every)),
               "applied": self.applied, "dropped": self.dropped, **self.guard_counts(),
               "bytes_per_update": round(self.bytes_received / max(1, self.applied + self.dropped))}
        for rank, stale in sorted(self.window_stale.items()):
            row[f"staleness/{rank}"] = float(np.mean(stale))
        for rank, w in sorted(self.workers.items()):
            row[f"applied/{rank}"] = w.applied
            if w.samples_per_s is not None:
                row[f"samples_per_s/{rank}"] = round(w.samples_per_s, 2)
        self.window_stale.clear()
        return row

    def run(self) -> dict:
        self.wait_for_workers(self.quorum(self.cfg))
        self.started = True
        self.start_clock()
        while self.trainer.step < self.trainer.end_step:
            self.poll(0.1)
            self.check_liveness()
            if not self.live():
                logger.warning("no live workers; waiting for one to join")
                self.wait_for_workers(1)
        return self.finish(applied=self.applied, dropped=self.dropped, **self.guard_counts())


class EdpWorker(Worker):
    """Goes through its own shard step after step; asks for fresh weights every ``algo.pull_every`` steps (and
    takes any that arrived meanwhile), never waits otherwise. Lossy gradient codecs get error feedback."""

    algo = "edp"

    def __init__(self, cfg: TrainConfig, run_dir: Path | None, rank: int):
        super().__init__(cfg, run_dir, rank)
        self.feedback = ErrorFeedback(self.link.codec) if self.link.codec != "none" else None
        self.pull_every = max(1, cfg.algo.pull_every)

    def first_step(self, welcome: Message) -> int:
        return welcome.fields["step"] // max(1, self.cfg.cluster.workers)  # about where the cluster is in its shard

    def next_step(self, step: int, weights: Message | None) -> int:
        return step + 1

    def after_push(self, step: int) -> float:
        if (step + 1) % self.pull_every:
            return 0.0
        self.link.client.send("pull", {"rank": self.rank})  # fresh weights, please (and wait for them)
        return self.cfg.cluster.liveness_s

    def push(self, step: int, loss: float, samples: int) -> None:
        if self.feedback is not None:
            self.feedback.compensate(self.trainer.flat.grads)  # add last residual, keep the new one
        self.link.push(step, loss, samples, samples_per_s=self.link.rate(samples))


def run(cfg: TrainConfig, run_dir: Path) -> dict | None:
    return run_role(cfg, run_dir, EdpServer, EdpWorker)
