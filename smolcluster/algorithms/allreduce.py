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
the gradients.

Elastic: a lost rank breaks the ring's epoch; the survivors agree on a new one
(:meth:`~smolcluster.algorithms.membership.Agreement.reform`: the lowest live rank decides the members and the step, the
highest completed one), members that are behind take the weights and optimizer
state of that step from the source, and the step's global batch is split over the
members (:func:`shares`), so the run stays ``local``'s. A new rank joins the same
way at a step boundary. ZeRO-1 is not elastic: a lost rank stops the run.

``algo.max_staleness=K``: a rank computes step t once the reduced gradient of step
t-K-1 is applied (step t's is summed in the background meanwhile), so it runs at
most K steps ahead of the slowest; every rank applies the same reduced gradients in
the same order. The lowest member writes the run's files.

A step's phases (:class:`RingWorker`): form the ring (when it breaks or a rank joins), compute this rank's gradient,
reduce it on the ring (the ring's thread, during backward), apply the sum, log the step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
from loguru import logger

from smolcluster.algorithms.guard import GradientGuard
from smolcluster.algorithms.launcher import check_allreduce as check
from smolcluster.algorithms.launcher import codecs, launch_ring
from smolcluster.algorithms.membership import Agreement, Decision, Membership, check_quorum
from smolcluster.data.sharding import Sharder
from smolcluster.errors import ConfigError, PeerError
from smolcluster.launch.nodes import stage_nodes
from smolcluster.optim import build_optimizer
from smolcluster.telemetry.run_files import RunRecorder, open_recorder
from smolcluster.train_settings import TrainConfig
from smolcluster.trainer import RunLoop, Trainer
from smolcluster.transport.ring import RingBroken, RingLink, chunk_bounds


def bucket_bytes(bucket_mb, grads: dict[str, torch.Tensor]) -> int:
    """``algo.bucket_mb`` in bytes; ``auto``: the gradient in about 8 buckets, between 1 MB and DDP's 25 MB. A
    bucket goes round the ring once backward has filled it, so a model in one bucket (gpt2-tiny's 5.4 MB under
    25 MB) sends nothing until backward ends; 1 MB buckets let the link work during backward (``bench scaling``
    on 100 Mbit/s links). Smaller ones would cost more per-message latency (2(N-1) hops per bucket) than they
    hide."""
    if bucket_mb != "auto":
        return int(bucket_mb * 2**20)
    total = sum(g.numel() * g.element_size() for g in grads.values())
    return min(25 << 20, max(1 << 20, total // 8))


def owners_sq_norms(link: RingLink, bufs: dict[str, torch.Tensor]) -> list[float]:
    """Per ring position, the squared norm of the chunks that member owns, computed here from the reduced gradient
    this rank holds (its own chunks and what the all-gather delivered): the expression each member's stats row
    uses for its own, so an honest report matches it bit for bit on like devices."""
    out = []
    for p in range(link.world):
        sq = 0
        for g in bufs.values():
            for lo, hi in link.buckets(g.numel(), g.element_size()):
                a, b = chunk_bounds(hi - lo, link.world)[(p + 1) % link.world]
                sq += float(g[lo + a:lo + b].double().pow(2).sum())
        out.append(sq)
    return out


def forged_norms(computed: list[float], reported: list[float]) -> list[int]:
    """The ring positions whose reported chunk norm disagrees with the one computed from their chunks beyond
    float rounding across devices (1e-6 relative: a lie that small moves nothing)."""
    return [p for p, (got, said) in enumerate(zip(computed, reported))
            if not abs(got - said) <= 1e-6 * max(got, said, 1e-30)]


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
        # clipped here, with the global norm: the trainer's own clip off in its copy of train.*
        self.max_norm, trainer.train = trainer.train.grad_clip, dataclasses.replace(trainer.train, grad_clip=0.0)
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
    are the same either way. Under ``max_staleness`` the tasks work on a copy of the step's gradient
    (``bufs``), so the next steps' backward can run while it is on the ring."""

    def __init__(self, link: RingLink, trainer: Trainer, overlap: bool):
        self.link, self.grads = link, trainer.flat.grads
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ring")  # (a queue handover: a memory barrier)
        self.order = [(name, b) for name, g in self.grads.items()
                      for b in reversed(range(len(link.buckets(g.numel(), g.element_size()))))]
        self.ready = {key: threading.Event() for key in self.order}
        self.members: dict[tuple, int] = dict.fromkeys(self.order, 0)  # parameters touching each bucket
        self.left: dict[tuple, int] = {}
        self.early = self.total = 0
        self.busy_s = 0.0  # the ring thread's time on a step's collectives, from a bucket's gradient being ready
        self.in_backward = False
        if overlap:
            for p in trainer.flat.tensors:
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

    def work(self, fn, *args):
        """Queue a collective of the step (counted in ``busy_s``, as the buckets are)."""
        return self.pool.submit(self._timed, fn, *args)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_s += time.perf_counter() - t0

    def start(self, step: int, scale: float, op, codec: str, bufs: dict | None = None, row=None) -> list:
        """Queue this step's bucket tasks; call before backward (or after it, with ``bufs``). ``row`` (a callable
        giving this rank's stats once its sums are complete) rides on the last bucket's all-gather: the last
        task returns every member's row (:meth:`RingLink.all_gather`)."""
        self.left, self.in_backward = dict(self.members), True
        self.total += len(self.order)
        for event in self.ready.values():
            event.clear()
        self.pool.submit(setattr, self.link, "step", step)
        return [self.pool.submit(self._bucket, key, scale, op, codec, bufs or self.grads,
                                 row if key == self.order[-1] else None) for key in self.order]

    def backward_done(self) -> None:
        """Every bucket is complete (also one whose parameters got no gradient this step)."""
        self.in_backward = False
        for event in self.ready.values():
            event.set()

    def _bucket(self, key: tuple, scale: float, op, codec: str, grads: dict, row=None):
        name, b = key
        self.ready[key].wait()
        if self.link.leaving.is_set():
            raise RingBroken(f"ring rank {self.link.rank}: leaving the ring's epoch {self.link.epoch}")
        self.early += self.in_backward  # this bucket goes round the ring while backward still runs
        t0 = time.perf_counter()
        lo, hi = self.link.buckets(grads[name].numel(), grads[name].element_size())[b]
        grads[name][lo:hi].mul_(scale)  # the ring sums: sum_r (n_r / N) grad_r = the union batch's mean
        try:
            return op(grads[name], codec, name, only=b, **({"row": row} if row else {}))
        finally:
            self.busy_s += time.perf_counter() - t0

    def drain(self, pending) -> None:
        """After a RingBroken: make every queued task fail fast and wait for them, so the thread is free."""
        self.link.leaving.set()
        self.backward_done()
        for fut in pending:
            try:
                fut.result()
            except Exception:  # noqa: S110 - each meets the same broken epoch; the first error is being handled
                pass

    def close(self) -> None:
        """After a failure too: tasks still queued are dropped (each would only meet the same lost rank), and the
        running one stops waiting (``link.stopped``: a rank forming its ring when SIGTERM came exits at once)."""
        self.link.stopped.set()
        self.link.leaving.set()
        self.backward_done()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.link.close()  # (the ring thread has ended: the sockets are ours again)


def shares(sizes: list[int], members: list[int]) -> list[int]:
    """Each slot's part of a step's global batch when ``members`` are the ring. The global batch stays
    ``sum(sizes)`` whoever is in the ring (so step s trains on the same samples as ``algo=local``); the
    members split it in proportion to their configured batch sizes (all present: exactly those)."""
    total, have = sum(sizes), sum(sizes[r] for r in members)
    out = [0] * len(sizes)
    for r in members:
        out[r] = total * sizes[r] // have
    for r in members[: total - sum(out)]:
        out[r] += 1
    return out


def state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """What a rank that is behind needs besides the counters: the flat parameters and the optimizer's state."""
    out = {f"param/{name}": flat for name, flat in trainer.flat.params.items()}
    for i, flat in enumerate(trainer.flat.params.values()):
        for key, value in trainer.optimizer.state.get(flat, {}).items():
            if torch.is_tensor(value):
                out[f"optim/{i}/{key}"] = value
    return out


def weights_sha(trainer: Trainer) -> str:
    """A short digest of the weights: every member's is the same after a step (the log and events show it)."""
    h = hashlib.sha256()
    for flat in trainer.flat.params.values():
        h.update(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_state(trainer: Trainer, msg) -> None:
    flats = list(trainer.flat.params.values())
    for flat in flats:
        trainer.optimizer.state.pop(flat, None)
    with torch.no_grad():
        for key in msg.tensors:
            kind, rest = key.split("/", 1)
            t = msg.tensor(key, copy=True)
            if kind == "param":
                trainer.flat.params[rest].copy_(t.to(trainer.device))
            else:
                i, name = rest.split("/", 1)
                trainer.optimizer.state[flats[int(i)]][name] = t.to(trainer.device)


def hand_over_files(recorder: RunRecorder, lead: bool, run_dir: Path, trainer: Trainer, step: int) -> RunRecorder:
    """After a ring re-formed: a rank that now leads (the lowest member) appends to the metrics.jsonl the last lead
    wrote, dropping rows of steps after ``step`` (the last lead's partial step, trained again); one that no
    longer leads stops writing it."""
    if lead and recorder._file is None:
        recorder = RunRecorder(run_dir, sinks=recorder.sinks, keep_until=step)
        recorder.t0 = time.time() - trainer.elapsed
    elif not lead and recorder._file is not None:
        recorder._file.close()
        recorder._file = None
    return recorder


class RingWorker:
    """One rank of the ring, in phases: :meth:`form` the ring with the live ranks (again when a rank is lost or
    asks to join), :meth:`compute` its slice of each step's gradient while the ring thread sums the buckets,
    :meth:`reduce` (wait for the sum and the members' stats), :meth:`apply` it (every member the same ones, in the
    same order), :meth:`log_step`; the lowest member writes the run's files."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int):
        cluster, algo = cfg.cluster, cfg.algo
        self.cfg, self.run_dir, self.rank = cfg, run_dir, rank
        self.zero, self.n = algo.zero, cluster.workers
        if not 0 <= rank < self.n:
            raise ConfigError(f"rank={rank} is outside 0..{self.n - 1} (cluster.workers)")
        self.K = algo.max_staleness
        # ZeRO-1: a lost rank takes its optimizer shard along
        self.elastic = algo.elastic and not self.zero
        self.min_workers = algo.min_workers or self.n
        self.settings = cluster.worker(rank, cfg.train.batch_size)
        self.sizes = cfg.batch_sizes()
        self.total = sum(self.sizes)
        self.trainer = trainer = Trainer(cfg, self.sizes, device=self.settings.device, with_optimizer=not self.zero)
        if cfg.resume:
            trainer.resume(cfg.resume)
            if self.zero:
                logger.warning("algo.zero=1 checkpoints hold the weights only: the optimizer state starts afresh")
        if cluster.port is None:
            raise ConfigError("cluster.port is not set: give rank 0's port on every node (cluster.port=5555; rank r "
                              "listens on port + r, or on cluster.nodes[r].port)")
        self.nodes = stage_nodes(cluster, self.n)  # rank r's address: the same rule as a pipeline stage's
        self.link = RingLink(rank, [nd.address for nd in self.nodes], self.nodes[rank].bind,
                             max_bytes=cluster.max_bytes, heartbeat_s=cluster.heartbeat_s,
                             liveness_s=cluster.liveness_s, keys_dir=cluster.keys,
                             bucket_bytes=bucket_bytes(algo.bucket_mb, trainer.flat.grads))
        self.agreement = Agreement(self.link)
        self.overlap = algo.overlap and self.K == 0
        self.ring = RingRunner(self.link, trainer, overlap=self.overlap)
        self.codec, self.tr = codecs(algo.codec)[0], trainer.train
        self.ring_s = 0.0
        self.mine: collections.deque = collections.deque(maxlen=max(1, self.tr.log_every))  # this rank's staleness
        # where a step's time goes in this process (summary.json's seconds_per_step)
        self.timed = {"compute": 0.0, "optimizer": 0.0, "steps": 0}
        self.guard, self.lr, self.sharded = GradientGuard.from_config(self.tr), None, None
        self.history = Membership(self.n)
        self.sent_before = trainer.carried.get("bytes_sent", 0)  # the lead's bytes before a resume: counters go on
        self.recorder: RunRecorder | None = None
        self.lead, self.share = False, self.sizes[rank]
        self.sent_last = 0  # link.bytes_sent after the last applied step
        self.inflight: collections.deque = collections.deque()  # steps whose gradients are on the ring, oldest first
        self.staleness: list[int] = []  # each member's, of the last applied step
        self.loop = RunLoop(trainer, None, run_dir, fields=self.row_fields, run_state=self.run_state,
                            note=lambda row: f"ring {1000 * self.ring_s / self.trainer.step:.1f} ms/step, "
                                             f"{self.link.world} ranks")

    def run_state(self) -> dict:  # what the checkpoint's JSON carries for a resume, besides samples and wall time
        return {"bytes_sent": self.sent_before + self.link.bytes_sent}

    def take_lead(self, step: int) -> None:
        """The lowest member writes the run's files (a new lead appends to what the last one wrote)."""
        self.lead = self.rank == self.link.members[0]
        if self.recorder is None:
            cfg, trainer = self.cfg, self.trainer
            fresh = step == 0 or cfg.resume
            self.recorder = open_recorder(cfg, self.run_dir, files=self.lead, append=not fresh,
                                          keep_until=trainer.step if cfg.resume else None)
            trainer.start_clock(self.recorder)
        else:
            self.recorder = hand_over_files(self.recorder, self.lead, self.run_dir, self.trainer, step)

    def form(self, first: bool) -> None:
        """Agree on the ring with every live rank (the first time too), catch up if behind, re-shard the data."""
        trainer, link, rank, history = self.trainer, self.link, self.rank, self.history
        d = self.ring.call(self.agreement.reform, trainer.step, trainer.fingerprint,
                           self.cfg.cluster.connect_timeout_s, self.min_workers if first else 1)
        check_quorum(rank, history.members(), d.members)
        self.catch_up(d)
        event = history.change(trainer.step, d.epoch, history.members(), d.members)
        sha = weights_sha(trainer)
        split = shares(self.sizes, link.members)
        trainer.sharder = Sharder(len(trainer.data.train_x), split, self.cfg.seed)
        self.share = split[rank]
        if self.zero:
            self.sharded = ShardedOptimizer(trainer, link)
        self.take_lead(trainer.step)
        if self.lead and (not first or d.behind):
            self.recorder.event(trainer.step, "membership", weights_sha=sha,
                                **{k: v for k, v in event.items() if k != "step"})
        logger.info(f"allreduce rank {rank}: ring epoch {d.epoch} of ranks {link.members} from step "
                    f"{trainer.step} (joined {event['joined']}, left {event['left']}); batch share {self.share}; "
                    f"weights sha256 {sha}")

    def catch_up(self, d: Decision) -> None:
        """The source sends the weights, optimizer state and run counters of the decision's step to the members
        behind; such a member takes them."""
        trainer = self.trainer
        got = self.ring.call(self.agreement.catch_up, d, lambda: (state_tensors(trainer), {
            "samples": trainer.samples, "guard": self.guard.state(), "history": self.history.to_json(),
            "wall_s": trainer.elapsed}))
        if got is None:
            return
        msg, run = got
        load_state(trainer, msg)
        trainer.step, trainer.samples = msg.fields["step"], run["samples"]
        self.guard.load(run["guard"])
        self.history.load(run["history"])
        trainer.wall_before, trainer.t0 = run["wall_s"], time.perf_counter()
        logger.info(f"allreduce rank {self.rank}: took the weights and optimizer state of step {trainer.step} "
                    f"from rank {d.source}")

    def stats_row(self, got: SimpleNamespace, staleness: int) -> list[float]:
        """On the ring thread, once this rank's owned chunks of the step's sum are complete: its row of the table
        every member decides from (its loss share, the squared norm of its owned chunks, its staleness, whether
        a rank asks to join)."""
        got.known.wait()  # backward has returned (compute sets it, also when it fails)
        if got.loss is None:
            raise PeerError(f"allreduce rank {self.rank}: the step's gradient computation failed")
        owned = self.link.owned
        sq = sum(float(g[lo:hi].double().pow(2).sum()) for g in got.bufs.values()
                 for lo, hi in owned(g.numel(), g.element_size()))
        if got.lie:  # test knob: a lying rank blows up the chunks it owns (not yet sent) but reports their old norm
            for g in got.bufs.values():
                for lo, hi in owned(g.numel(), g.element_size()):
                    g[lo:hi].mul_(1e6)
        return [float(got.loss) * got.count / self.total, sq, float(staleness),
                float(self.elastic and bool(self.agreement.joiners))]

    def compute(self, t: int) -> None:
        """Step ``t``'s gradient of this rank's slice, put on the ring (bucket by bucket as backward fills them,
        or a copy when steps overlap: ``max_staleness``)."""
        trainer, link, ring, faults = self.trainer, self.link, self.ring, self.settings.faults
        scale = self.share / self.total
        if faults.blowup_every and t % faults.blowup_every == faults.blowup_every - 1:
            scale *= 1e6  # test knob: a buggy node (an fp16 overflow) sends a huge gradient now and then
        op = link.reduce_scatter if self.zero else link.allreduce
        staleness = t - trainer.step  # updates this gradient's weights lack
        lie = faults.lie_norm_every and t % faults.lie_norm_every == faults.lie_norm_every - 1
        got = SimpleNamespace(known=threading.Event(), loss=None, count=0, bufs=trainer.flat.grads, lie=lie)
        # the stats table rides on the gradient's last bucket (no round of its own); ZeRO-1 needs it before the
        # parameters' all-gather, so there it is a round of its own after the reduce-scatter
        row = None if self.zero else functools.partial(self.stats_row, got, staleness)
        if self.K == 0:  # the ring works on the gradient buffer itself, bucket by bucket as backward fills it
            tasks = ring.start(t, scale, op, self.codec, row=row)
            t0 = time.perf_counter()
            try:
                got.loss, got.count = trainer.compute_gradients(t, self.rank)
            finally:
                got.known.set()
                ring.backward_done()
            self.timed["compute"] += time.perf_counter() - t0
        else:  # a copy: the next step's backward overwrites the buffer while this one is on the ring
            t0 = time.perf_counter()
            try:
                got.loss, got.count = trainer.compute_gradients(t, self.rank)
            finally:
                got.known.set()
            self.timed["compute"] += time.perf_counter() - t0
            got.bufs = {k: g.clone() for k, g in trainer.flat.grads.items()}
            tasks = ring.start(t, scale, op, self.codec, got.bufs, row=row)
            ring.backward_done()
        if faults.delay_s:
            time.sleep(faults.delay_s)  # test knob: make this node artificially slow
        stats = ring.work(lambda: link.gather_scalars(self.stats_row(got, staleness))) if self.zero else tasks[-1]
        self.inflight.append(SimpleNamespace(step=t, tasks=tasks, bufs=got.bufs, staleness=staleness, stats=stats))

    def reduce(self, item) -> torch.Tensor:
        """Wait for step ``item``'s sum on the ring (the part backward did not hide) and the members' stats table
        (a (members, 4) tensor: :meth:`stats_row`); the sum is then in the gradient buffer."""
        t_ring = time.perf_counter()
        for task in item.tasks:
            task.result()  # (a PeerError from the ring thread is raised here)
        stats = item.stats.result()
        self.ring_s += time.perf_counter() - t_ring  # the part of the ring's time that backward did not hide
        if item.bufs is not self.trainer.flat.grads:
            for name, g in item.bufs.items():
                self.trainer.flat.grads[name].copy_(g)
        return stats

    def apply(self, item, stats: torch.Tensor) -> bool:
        """Apply a step's reduced gradient (every member applies the same ones in the same order; ZeRO-1: then
        the updated parameters' all-gather) and log the step; True when a rank asked to join and the ring
        re-forms now (every member read the same table, so all do)."""
        trainer, ring = self.trainer, self.ring
        t_opt = time.perf_counter()
        self.step_if_sound(item, stats)
        self.timed["optimizer"] += time.perf_counter() - t_opt
        self.timed["steps"] += 1
        if self.zero:
            t_ring = time.perf_counter()
            for name, p in trainer.flat.params.items():
                ring.work(self.link.all_gather, p, "none", name).result()  # parameters: never lossy (no error feedback)
            self.ring_s += time.perf_counter() - t_ring
        self.staleness = [int(v) for v in stats[:, 2].tolist()]
        self.history.stepped(self.link.members, self.staleness)
        self.mine.append(item.staleness)
        self.log_step(float(stats[:, 0].sum()))
        self.sent_last = self.link.bytes_sent
        return bool(stats[:, 3].sum())

    def step_if_sound(self, item, stats: torch.Tensor) -> None:
        """The guard on the reduced gradient, then the optimizer step: every rank holds the same table and the
        same history, so every rank decides the same, and a rejected step is skipped (a clipped one scaled)
        everywhere."""
        trainer, link = self.trainer, self.link
        sq_norm = float(stats[:, 1].double().sum())  # the summed gradient's, from every member's owned chunks
        # Each member reports its owned chunks' norm; every rank checks those reports against the chunks it
        # received (all ranks hold the same bytes, so all find the same liars). ZeRO-1 holds only its own chunks
        # reduced, and a rank there owns its shard of the weights outright: nothing to check against.
        forged = []
        if not self.zero:
            computed = owners_sq_norms(link, item.bufs)
            if math.isfinite(sum(computed)):
                forged = forged_norms(computed, stats[:, 1].tolist())
            else:  # whatever the reports say: the guard rejects it as not finite
                sq_norm = math.inf
        scale = 0.0
        if forged:
            self.guard.rejected += 1
            logger.warning(f"step {trainer.step}'s gradient rejected: rank(s) {[link.members[p] for p in forged]} "
                           "reported a norm of their chunks that the chunks received here do not have")
        else:
            scale = self.guard.check(math.sqrt(sq_norm), f"step {trainer.step}'s gradient")
        if scale:
            if scale != 1.0:  # clipped to the guard's bound
                for g in trainer.flat.grads.values():
                    g.mul_(scale)
            self.lr = self.sharded.step(sq_norm * scale * scale) if self.zero else trainer.apply_gradients()
        else:
            trainer.step += 1  # not applied; the schedule moves on as everywhere else

    def log_step(self, loss: float) -> None:
        """The run loop counts the applied step: a metrics row every ``log_every`` steps (the lead's with the run's
        loss), the lead's evaluations and checkpoints."""
        self.loop.recorder, self.loop.lead = self.recorder, self.lead  # (both move when the ring re-forms)
        self.loop.record(loss, self.total, self.lr)

    def row_fields(self) -> dict:
        """This rank's part of a log row (its bytes, timings, staleness), the lead's the guard's and ring's too."""
        link, step, mine = self.link, self.trainer.step, self.mine
        row = {"bytes_sent": self.sent_before + link.bytes_sent, "bytes_sent_step": link.bytes_sent - self.sent_last,
               "allreduce_s": round(self.ring_s / max(1, step), 6),
               "staleness_mean": round(sum(mine) / len(mine), 4), "staleness_max": max(mine),
               "peers_alive": link.world - 1}
        if self.lead:
            row.update(gradients_rejected=self.guard.rejected, gradients_clipped=self.guard.clipped, ring=link.world)
            if self.K:
                row.update({f"staleness/rank{r}": k for r, k in zip(link.members, self.staleness)})
        return row

    def seconds_per_step(self) -> dict:
        """This process's steps: forward+backward, the ring's collectives (the gradient buckets from each being
        ready, hidden behind backward or not, the stats table riding on the last; ZeRO's stats and parameters),
        the part of that spent waiting for the predecessor's chunks (the link), the part the step waited for (not
        hidden), the optimizer."""
        k, timed = max(1, self.timed["steps"]), self.timed
        return {"compute": round(timed["compute"] / k, 4), "ring": round(self.ring.busy_s / k, 4),
                "ring_waiting": round(self.link.wait_s / k, 4), "ring_not_hidden": round(self.ring_s / k, 4),
                "optimizer": round(timed["optimizer"] / k, 4)}

    def train_steps(self) -> None:
        """Up to the run's end: compute step t (its buckets reduced on the ring meanwhile) up to K steps ahead of
        the last applied, reduce + apply + log the oldest steps as they fall due, form the ring again on a lost
        rank or a joiner."""
        trainer, inflight = self.trainer, self.inflight
        t = trainer.step  # the next step whose gradient to compute (up to K ahead of the last applied)
        while trainer.step < trainer.end_step:
            try:
                if not self.apply_due(t):
                    if t < trainer.end_step:
                        self.compute(t)
                        t += 1
                    continue
                logger.info(f"allreduce rank {self.rank}: a rank asks to join: re-forming the ring at step "
                            f"{trainer.step}")
            except RingBroken as e:
                if not self.elastic:
                    raise PeerError(f"{e}; stopping the run (algo.zero=1 or algo.elastic=false)") from None
                logger.warning(f"{e}: re-forming the ring from the last completed step")
            # every member gets here at the same step boundary (a join) or soon after the break (a loss)
            self.ring.drain([f for item in inflight for f in (*item.tasks, item.stats)])
            inflight.clear()
            self.form(first=False)
            t = trainer.step

    def apply_due(self, t: int) -> bool:
        """Reduce, apply and log the oldest step on the ring while one is due (K steps behind step ``t``, the
        run's end, or already summed); True when a rank asks to join (the ring re-forms now)."""
        inflight = self.inflight
        while inflight and (t - inflight[0].step > self.K or t >= self.trainer.end_step
                            or inflight[0].stats.done()):
            item = inflight[0]  # (still in flight if a phase raises: drain() waits for its tasks)
            join = self.apply(item, self.reduce(item))
            inflight.popleft()
            if join:
                return True
        return False

    def summary(self) -> dict:
        """The lead's end: evaluate, checkpoint, summary.json."""
        trainer, link, ring = self.trainer, self.link, self.ring
        steps, sent = max(1, trainer.step), self.sent_before + link.bytes_sent
        self.loop.recorder = self.recorder
        return self.loop.finish(
            "allreduce", ring=link.world, zero=self.zero,
            max_staleness=self.K,
            optimizer_state_bytes=self.sharded.state_bytes() if self.zero else trainer.optimizer_state_bytes(),
            bytes_sent=sent, bytes_sent_per_step=round(sent / steps),
            allreduce_s_per_step=round(self.ring_s / steps, 6), buckets=len(ring.order),
            seconds_per_step=self.seconds_per_step(), bucket_bytes=link.bucket_bytes,
            buckets_during_backward=round(ring.early / max(1, ring.total), 4), rejected_messages=dict(link.rejected),
            gradients_rejected=self.guard.rejected, gradients_clipped=self.guard.clipped, stale_messages=link.stale,
            membership=self.history.events, workers=self.history.summary())

    def run(self) -> dict | None:
        logger.info(f"allreduce rank {self.rank}/{self.n} on {self.nodes[self.rank].bind}: model={self.trainer.model_name} "
                    f"({self.trainer.num_params:,} params) zero={self.zero} compression={self.codec} "
                    f"overlap={self.overlap} max_staleness={self.K} elastic={self.elastic}")
        try:
            self.form(first=True)
            self.train_steps()
            return self.summary() if self.lead else None
        except BaseException as e:  # SIGTERM (as KeyboardInterrupt), a lost peer: files closed, W&B records why
            if self.recorder is not None:  # (None: stopped before the ring first formed)
                self.recorder.abort(e)
            raise
        finally:
            self.ring.close()
            if self.recorder is not None and not self.lead:
                self.recorder.finish(None)


def run(cfg: TrainConfig, run_dir: Path) -> dict | None:
    check(cfg)
    if cfg.role == "launch":
        return launch_ring(cfg, run_dir)
    if cfg.role == "worker":
        if cfg.rank is None:
            raise ConfigError("role=worker needs its rank: add rank=N (0 <= N < cluster.workers)")
        return RingWorker(cfg, run_dir, int(cfg.rank)).run()
    raise ConfigError(f"role={cfg.role!r} is invalid for algo=allreduce: choose launch (every rank here) or worker "
                      "(there is no server)")
