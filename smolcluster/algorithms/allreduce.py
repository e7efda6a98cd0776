"""``algo=allreduce``: data parallelism without a server; the workers form a ring and all-reduce gradients.

Every step each rank computes the gradient of its slice of the step's global batch
(``data/sharding.py``), scaled by its share of the samples; the ring sums them
(:class:`~smolcluster.transport.ring.RingLink`: reduce-scatter + all-gather, in
buckets) and every rank steps the same optimizer on the same sum, so the result is
``algo=local``'s on the union of the batches. Each rank sends 2(N-1)/N of the
gradient per step whatever N is; a parameter server's link carries 2N copies.

``algo.zero=1`` (ZeRO stage 1): after the reduce-scatter a rank holds the complete
sum only for the chunks it owns; it keeps optimizer state for those alone (1/N of
it), steps them, and the all-gather then carries the updated parameters instead of
the gradients. Rank 0 writes the run's files; a rank that goes silent stops the run.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
from loguru import logger
from omegaconf import DictConfig

from smolcluster.algorithms.ps import batch_sizes, codecs, max_bytes
from smolcluster.cluster import worker_settings
from smolcluster.errors import ConfigError
from smolcluster.optim import build_optimizer
from smolcluster.pipeline.launch import launch_ranks
from smolcluster.pipeline.nodes import stage_nodes
from smolcluster.security import GradientGuard
from smolcluster.telemetry.run_files import open_recorder
from smolcluster.trainer import LossWindow, Trainer
from smolcluster.transport.ring import RingLink


def check(cfg: DictConfig) -> None:
    a = cfg.algo
    if a.get("zero") not in (0, 1):
        raise ConfigError(f"algo.zero={a.get('zero')!r} is invalid: 0 (every rank steps everything) or 1 (ZeRO-1)")
    mb = a.get("bucket_mb")
    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or mb <= 0:
        raise ConfigError(f"algo.bucket_mb={mb!r} is invalid: it must be a positive number of MB, e.g. 25")
    codecs(a)  # an unknown algo.compression is a one-line error listing the codecs


def owned_sq_norm(trainer: Trainer, link: RingLink) -> float:
    """Squared norm of the parts of the reduced gradient this rank owns (holds complete after reduce-scatter);
    summed over the ranks, the whole gradient's."""
    return sum(float(g[lo:hi].double().pow(2).sum()) for g in trainer.flat.grads.values()
               for lo, hi in link.owned(g.numel(), g.element_size()))


class ShardedOptimizer:
    """ZeRO-1: the optimizer over this rank's owned ranges of the flat buffers (views, so a step writes the
    model's own parameters), and the global-norm clipping that needs every rank's shard."""

    def __init__(self, trainer: Trainer, link: RingLink):
        self.trainer, self.link = trainer, link
        self.views = []
        for name, flat in trainer.flat.params.items():
            for lo, hi in link.owned(flat.numel(), flat.element_size()):
                if hi > lo:
                    view = flat[lo:hi]
                    view.grad = trainer.flat.grads[name][lo:hi]
                    self.views.append(view)
        self.optimizer = build_optimizer(trainer.model, trainer.train, SimpleNamespace(params={
            str(i): v for i, v in enumerate(self.views)}))
        self.max_norm, trainer.train.grad_clip = trainer.train.grad_clip, 0.0  # clipped here, with the global norm
        trainer.grad_norm_every = 0  # per-layer norms would need the whole gradient on one rank

    def step(self, total_sq_norm: float) -> float:
        """Clip by the global norm (as torch's clip_grad_norm_ does), then Trainer.apply_gradients on the shard.
        Outside a step the trainer has no optimizer, so its checkpoints hold the weights only."""
        if self.max_norm > 0:
            coef = min(1.0, self.max_norm / (total_sq_norm ** 0.5 + 1e-6))
            for v in self.views:
                v.grad.mul_(coef)
        self.trainer.optimizer = self.optimizer
        try:
            return self.trainer.apply_gradients()
        finally:
            self.trainer.optimizer = None

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                   for t in st.values() if torch.is_tensor(t))


class RingRunner:
    """The ring's own thread: every socket operation of a rank runs there, one after another.

    Each step queues one task per gradient bucket, last bucket first (backward produces the last layers'
    gradients first); a task waits until every parameter in its bucket has its gradient, scales the bucket
    by this rank's share of the samples and sends it round the ring. With ``overlap``, gradient hooks mark
    buckets complete during backward (DDP's trick), so communication runs behind the earlier layers'
    compute; without, all buckets are marked complete when backward returns. The order, and so the sums,
    are the same either way."""

    def __init__(self, link: RingLink, trainer: Trainer, overlap: bool):
        self.link, self.grads = link, trainer.flat.grads
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ring")  # (a queue handover: a memory barrier)
        self.order = [(name, b) for name, g in self.grads.items()
                      for b in reversed(range(len(link.buckets(g.numel(), g.element_size()))))]
        self.ready = {key: threading.Event() for key in self.order}
        self.members: dict[tuple, int] = dict.fromkeys(self.order, 0)  # parameters touching each bucket
        self.left: dict[tuple, int] = {}
        self.early = self.total = 0
        self.in_backward = False
        if overlap:
            for p in trainer.model.parameters():
                keys = self._buckets_of(p)
                for key in keys:
                    self.members[key] += 1
                p.register_post_accumulate_grad_hook(lambda _, keys=keys: self._accumulated(keys))

    def _buckets_of(self, p: torch.Tensor) -> list[tuple]:
        name = str(p.dtype).removeprefix("torch.")
        g = self.grads[name]
        lo, hi = p.storage_offset(), p.storage_offset() + p.numel()  # its range in the flat buffer
        return [(name, b) for b, (a, z) in enumerate(self.link.buckets(g.numel(), g.element_size()))
                if a < hi and lo < z]

    def _accumulated(self, keys: list[tuple]) -> None:
        for key in keys:
            self.left[key] -= 1
            if self.left[key] == 0:
                self.ready[key].set()

    def call(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def start(self, step: int, scale: float, op, codec: str) -> list:
        """Queue this step's bucket tasks; call before backward."""
        self.left, self.in_backward = dict(self.members), True
        self.total += len(self.order)
        for event in self.ready.values():
            event.clear()
        self.pool.submit(setattr, self.link, "step", step)
        return [self.pool.submit(self._bucket, key, scale, op, codec) for key in self.order]

    def backward_done(self) -> None:
        """Every bucket is complete (also one whose parameters got no gradient this step)."""
        self.in_backward = False
        for event in self.ready.values():
            event.set()

    def _bucket(self, key: tuple, scale: float, op, codec: str) -> None:
        name, b = key
        self.ready[key].wait()
        self.early += self.in_backward  # this bucket goes round the ring while backward still runs
        lo, hi = self.link.buckets(self.grads[name].numel(), self.grads[name].element_size())[b]
        self.grads[name][lo:hi].mul_(scale)  # the ring sums: sum_r (n_r / N) grad_r = the union batch's mean
        op(self.grads[name], codec, name, only=b)

    def close(self) -> None:
        """After a failure too: tasks still queued are dropped (each would only meet the same lost rank)."""
        self.backward_done()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.link.close()  # (the ring thread has ended: the sockets are ours again)


def run_worker(cfg: DictConfig, run_dir: Path, rank: int) -> dict | None:
    cluster, zero = cfg.cluster, int(cfg.algo.zero)
    n = int(cluster.workers)
    if not 0 <= rank < n:
        raise ConfigError(f"rank={rank} is outside 0..{n - 1} (cluster.workers)")
    settings = worker_settings(cluster, rank, cfg.train)
    sizes = batch_sizes(cfg)
    total = sum(sizes)
    trainer = Trainer(cfg, sizes, device=settings["device"], with_optimizer=not zero)
    if cfg.resume:
        trainer.resume(cfg.resume)
        if zero:
            logger.warning("algo.zero=1 checkpoints hold the weights only: the optimizer state starts afresh")
    if cluster.get("port") is None:
        raise ConfigError("cluster.port is not set: give rank 0's port on every node (cluster.port=5555; rank r "
                          "listens on port + r, or on cluster.nodes[r].port)")
    nodes = stage_nodes(cluster, n)  # rank r's address: the same rule as a pipeline stage's
    link = RingLink(rank, [nd.address for nd in nodes], nodes[rank].bind, max_bytes=max_bytes(cluster),
                    heartbeat_s=cluster.heartbeat_s, liveness_s=cluster.liveness_s, keys_dir=cluster.get("keys"),
                    bucket_bytes=int(cfg.algo.bucket_mb * 2**20))
    ring = RingRunner(link, trainer, overlap=bool(cfg.algo.overlap))
    sharded = ShardedOptimizer(trainer, link) if zero else None
    codec, tr, lead = codecs(cfg.algo)[0], trainer.train, rank == 0
    recorder = open_recorder(cfg, run_dir, files=lead, keep_until=trainer.step if cfg.resume else None)
    window, ring_s = LossWindow(tr.log_every), 0.0
    guard, lr = GradientGuard.from_config(tr), None
    sent_before = trainer.carried.get("bytes_sent", 0)  # rank 0's bytes before a resume: its counters go on

    def run_state() -> dict:  # what the checkpoint's JSON carries for a resume, besides samples and wall time
        return {"bytes_sent": sent_before + link.bytes_sent}

    logger.info(f"allreduce rank {rank}/{n} on {nodes[rank].bind} -> rank {link.succ} at {nodes[link.succ].address}: "
                f"model={cfg.model.name} ({trainer.num_params:,} params) zero={zero} compression={codec} "
                f"overlap={bool(cfg.algo.overlap)}")
    try:
        ring.call(link.connect, trainer.fingerprint, cluster.connect_timeout_s)
        trainer.start_clock(recorder)
        while trainer.step < trainer.end_step:
            sent = link.bytes_sent
            scale = sizes[rank] / total
            if settings["blowup_every"] and trainer.step % settings["blowup_every"] == settings["blowup_every"] - 1:
                scale *= 1e6  # test knob: a buggy node (an fp16 overflow) sends a huge gradient now and then
            tasks = ring.start(trainer.step, scale, link.reduce_scatter if zero else link.allreduce, codec)
            try:
                loss, count = trainer.compute_gradients(trainer.step, rank)
            finally:
                ring.backward_done()
            if settings["delay_s"]:
                time.sleep(settings["delay_s"])  # test knob: make this node artificially slow
            t_ring = time.perf_counter()
            for task in tasks:
                task.result()  # (a PeerError from the ring thread is raised here)
            stats = ring.call(link.gather_scalars, [float(loss) * count / total, owned_sq_norm(trainer, link)])
            ring_s += time.perf_counter() - t_ring  # the part of the ring's time that backward did not hide
            sq_norm = float(stats[:, 1].double().sum())  # the summed gradient's, from every rank's owned chunks
            # the outlier rule on the reduced gradient: every rank holds the same table and the same history,
            # so every rank decides the same and a rejected step is skipped everywhere
            if guard.check(math.sqrt(sq_norm), f"step {trainer.step}'s gradient"):
                lr = sharded.step(sq_norm) if zero else trainer.apply_gradients()
            else:
                trainer.step += 1  # not applied; the schedule moves on as everywhere else
            if zero:
                t_ring = time.perf_counter()
                for name, p in trainer.flat.params.items():
                    ring.call(link.all_gather, p, "none", name)  # parameters: never lossy (no error feedback)
                ring_s += time.perf_counter() - t_ring
            window.add(float(stats[:, 0].sum()))
            trainer.samples += total
            if not lead:
                continue
            step, row = trainer.step, {}
            if step % tr.log_every == 0 or step == trainer.end_step:
                rate = trainer.rate
                row = {"loss": window.mean(), "lr": lr, "samples": trainer.samples, "samples_per_s": round(rate, 2),
                       "bytes_sent": sent_before + link.bytes_sent, "bytes_sent_step": link.bytes_sent - sent,
                       "allreduce_s": round(ring_s / step, 6), "gradients_rejected": guard.rejected}
                logger.info(f"step {step}/{trainer.end_step} loss {row['loss']:.4f} ({rate:,.0f} samples/s, "
                            f"ring {1000 * ring_s / step:.1f} ms/step)")
            trainer.after_step(recorder, run_dir, row, run_state)
        if not lead:
            return None
        evaluation = trainer.evaluate()
        recorder.log(trainer.step, **evaluation)
        trainer.save(run_dir, run_state())
        steps, sent = max(1, trainer.step), sent_before + link.bytes_sent
        summary = trainer.summary(
            "allreduce", window.mean(), evaluation, run_dir, ring=n, zero=zero,
            optimizer_state_bytes=sharded.state_bytes() if zero else trainer.optimizer_state_bytes(),
            bytes_sent=sent, bytes_sent_per_step=round(sent / steps),
            allreduce_s_per_step=round(ring_s / steps, 6), buckets=len(ring.order),
            buckets_during_backward=round(ring.early / max(1, ring.total), 4), rejected_messages=dict(link.rejected),
            gradients_rejected=guard.rejected)
        return recorder.finish(summary)
    except BaseException as e:  # SIGTERM (as KeyboardInterrupt), a lost peer: files closed, W&B records why
        recorder.abort(e)
        raise
    finally:
        ring.close()
        if not lead:
            recorder.finish(None)


def launch(cfg: DictConfig, run_dir: Path) -> dict:
    """``role=launch``: every rank as a ``python -m smolcluster.train`` child on this machine."""
    n = int(cfg.cluster.workers)
    launch_ranks(cfg, run_dir, n, "worker", f"algo=allreduce (a ring of {n})")
    return json.loads((Path(run_dir) / "summary.json").read_text())


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    check(cfg)
    if cfg.role == "launch":
        return launch(cfg, run_dir)
    if cfg.role == "worker":
        if cfg.rank is None:
            raise ConfigError("role=worker needs its rank: add rank=N (0 <= N < cluster.workers)")
        return run_worker(cfg, run_dir, int(cfg.rank))
    raise ConfigError(f"role={cfg.role!r} is invalid for algo=allreduce: choose launch (every rank here) or worker "
                      "(there is no server)")
