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
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from loguru import logger
from omegaconf import DictConfig

from smolcluster.algorithms.ps import batch_sizes, codecs, max_bytes
from smolcluster.cluster import worker_settings
from smolcluster.errors import ConfigError
from smolcluster.optim import build_optimizer
from smolcluster.pipeline.launch import Children, child_overrides, free_ports, stage_env
from smolcluster.pipeline.nodes import stage_nodes
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

    def sq_norm(self) -> float:
        return float(sum(v.grad.double().pow(2).sum() for v in self.views)) if self.views else 0.0

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
    nodes = stage_nodes(cluster, n)
    link = RingLink(rank, [nd.address for nd in nodes], nodes[rank].bind, max_bytes=max_bytes(cluster),
                    heartbeat_s=cluster.heartbeat_s, liveness_s=cluster.liveness_s, keys_dir=cluster.get("keys"),
                    bucket_bytes=int(cfg.algo.bucket_mb * 2**20))
    sharded = ShardedOptimizer(trainer, link) if zero else None
    codec, tr, lead = codecs(cfg.algo)[0], trainer.train, rank == 0
    recorder = open_recorder(cfg, run_dir, append=bool(cfg.resume), files=lead)
    window, ring_s, samples = LossWindow(tr.log_every), 0.0, 0
    logger.info(f"allreduce rank {rank}/{n} on {nodes[rank].bind} -> rank {link.succ} at {nodes[link.succ].address}: "
                f"model={cfg.model.name} ({trainer.num_params:,} params) zero={zero} compression={codec}")
    try:
        link.connect(trainer.fingerprint, cluster.connect_timeout_s)
        t0, recorder.t0 = time.perf_counter(), time.time()
        while trainer.step < trainer.end_step:
            link.step = trainer.step
            loss, count = trainer.compute_gradients(trainer.step, rank)
            if settings["delay_s"]:
                time.sleep(settings["delay_s"])  # test knob: make this node artificially slow
            t_ring, sent = time.perf_counter(), link.bytes_sent
            for name, g in trainer.flat.grads.items():
                g.mul_(count / total)  # the ring sums: sum_r (n_r / N) * grad_r = the union batch's mean gradient
                (link.reduce_scatter if zero else link.allreduce)(g, codec, name)
            stats = link.gather_scalars([float(loss) * count / total, sharded.sq_norm() if zero else 0.0])
            ring_s += time.perf_counter() - t_ring
            lr = sharded.step(float(stats[:, 1].sum())) if zero else trainer.apply_gradients()
            if zero:
                t_ring = time.perf_counter()
                for name, p in trainer.flat.params.items():
                    link.all_gather(p, "none", name)  # parameters: no lossy codec (no error feedback for them)
                ring_s += time.perf_counter() - t_ring
            window.add(float(stats[:, 0].sum()))
            samples += total
            if not lead:
                continue
            step, row = trainer.step, {}
            if step % tr.log_every == 0 or step == trainer.end_step:
                rate = samples / max(time.perf_counter() - t0, 1e-9)
                row = {"loss": window.mean(), "lr": lr, "samples": samples, "samples_per_s": round(rate, 2),
                       "bytes_sent": link.bytes_sent, "bytes_sent_step": link.bytes_sent - sent,
                       "allreduce_s": round(ring_s / step, 6)}
                logger.info(f"step {step}/{trainer.end_step} loss {row['loss']:.4f} ({rate:,.0f} samples/s, "
                            f"ring {1000 * ring_s / step:.1f} ms/step)")
            trainer.after_step(recorder, run_dir, row)
        wall = time.perf_counter() - t0
        if not lead:
            return None
        evaluation = trainer.evaluate()
        recorder.log(trainer.step, **evaluation)
        trainer.save(run_dir)
        steps = max(1, trainer.step)
        summary = trainer.summary(
            "allreduce", samples, wall, window.mean(), evaluation, run_dir, ring=n, zero=zero,
            optimizer_state_bytes=sharded.state_bytes() if zero else trainer.optimizer_state_bytes(),
            bytes_sent=link.bytes_sent, bytes_sent_per_step=round(link.bytes_sent / steps),
            allreduce_s_per_step=round(ring_s / steps, 6), rejected_messages=dict(link.rejected))
        return recorder.finish(summary)
    finally:
        link.close()
        if not lead:
            recorder.finish(None)


def launch(cfg: DictConfig, run_dir: Path) -> dict:
    """``role=launch``: every rank as a ``python -m smolcluster.train`` child on this machine."""
    n = int(cfg.cluster.workers)
    port = cfg.cluster.port or free_ports(cfg.cluster.host, n)
    common = [*child_overrides(), f"cluster.port={port}", f"++run_id={cfg.run_id}", f"hydra.run.dir={run_dir}",
              "hydra.output_subdir=null", "train.progress=false"]
    children = Children()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM unwinds like Ctrl-C: stop the children
    logger.info(f"launching algo=allreduce on this machine: a ring of {n} on ports {port}..{port + n - 1}, "
                f"run dir {run_dir}")
    try:
        for rank in range(n):
            children.start(f"worker {rank}", [sys.executable, "-u", "-m", "smolcluster.train", *common,
                                              "role=worker", f"rank={rank}"], stage_env(n))
        children.wait_all()
    finally:
        children.stop()
        signal.signal(signal.SIGTERM, previous)
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


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
