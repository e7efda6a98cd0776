"""``algo=diloco``: DiLoCo and Streaming DiLoCo on the ring: many local steps, one outer sync a round.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105): every rank takes ``algo.inner_steps`` (H) steps of the inner
optimizer (``train.optimizer``; its state stays on the rank) on its own shard of each step's global batch
(``data/sharding.py``, as ``algo=allreduce``). Then the ranks sum the pseudo-gradient, the round's start weights
minus the rank's weights, each weighted by its share of the samples, over the ring
(:meth:`RingLink.allreduce`, bucketed as allreduce's), and every rank applies the same outer step to the start
weights: SGD with Nesterov momentum (``algo.outer_lr``, ``algo.outer_momentum``). The result is every rank's
weights for the next round. A rank sends 2(N-1)/N of the model once a round instead of once a step.

Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512), ``algo.fragments=F``: the flat parameters are cut into
F contiguous fragments; fragment p syncs after the steps s with s % H == ((p+1)H/F) % H, so the syncs are spread
over the round and the link carries 1/F of the model at a time. With ``algo.overlap_steps`` (tau) a fragment's
all-reduce runs on the ring thread during the next tau inner steps, and its outer step is merged then:
local = alpha * local + (1 - alpha) * global (``algo.merge_alpha``; 0 = replace, plain DiLoCo's).
``algo.warmup_sync_steps=W``: the first W steps are allreduce's (the gradient summed every step), and the rounds
count from step W.

``algo.round_s=T`` (unlike machines): rounds by time instead of by H. In its first round a rank takes inner steps
until T seconds have passed; the rate it measured sets its next round's number of steps (rate x T), so a fast
rank takes more steps and nobody waits for the slowest. Each pseudo-gradient is weighted by the samples the rank
trained on in the round; the run ends once the ranks together trained on ``train.steps`` x the global batch. The
lr schedule follows the ring's samples (every rank anneals together) and an evaluation waits for its round's end.

``algo.codec``: the pseudo-gradient's chunks on the ring (none, fp16, bf16, int8, int4), with the ring's error
feedback (per buffer, bucket and hop): a rank's residual is carried to the next round and into its checkpoint.

Checkpoints: the lead writes ``checkpoint.safetensors`` (its weights and inner optimizer) as allreduce does; every
rank also writes ``diloco-rankR.safetensors`` (:func:`save_rank_state`), so a resumed run goes on as one run.
Elastic (plain DiLoCo: ``fragments=1``, ``overlap_steps=0``, ``round_s=null``): the ring re-forms as allreduce's
(:meth:`~smolcluster.algorithms.membership.Agreement.reform`). A lost rank breaks the next sync; the survivors re-form and sync that round again,
each weighted by its share of the round's samples over theirs, and split the next steps' batches among
themselves. A new rank asks to join; the next sync's table tells every member, so all re-form at that round's end
and the newcomer takes a peer's weights, inner optimizer state and outer state (weights, Nesterov momentum). With
fragments or overlap a lost rank stops the run (resume from the last checkpoint); with round_s too, and a round_s
run cannot be resumed (the ranks are at different steps: its checkpoints are weights files, rank 0's own mid-round).
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file

from smolcluster import checkpoint
from smolcluster.algorithms.allreduce import (
    bucket_bytes,
    hand_over_files,
    shares,
    state_tensors,
    weights_sha,
)
from smolcluster.algorithms.launcher import check_diloco as check
from smolcluster.algorithms.launcher import launch_ring
from smolcluster.algorithms.membership import Agreement, Decision, Membership, check_quorum
from smolcluster.data.sharding import Sharder
from smolcluster.errors import ConfigError, PeerError
from smolcluster.launch.nodes import stage_nodes
from smolcluster.optim import sgd
from smolcluster.telemetry.run_files import open_recorder
from smolcluster.train_settings import TrainConfig
from smolcluster.trainer import RunLoop, Trainer
from smolcluster.transport.ring import RingBroken, RingLink, chunk_bounds


class Outer:
    """The outer optimizer: per fragment, the global weights (float32 copies of the fragment's ranges of the
    flat parameters, concatenated) and SGD with Nesterov momentum on them (optim.sgd: torch's arithmetic)."""

    def __init__(self, flat: dict[str, torch.Tensor], fragments: int, lr: float, momentum: float):
        self.flat = flat
        self.ranges = [{name: chunk_bounds(t.numel(), fragments)[p] for name, t in flat.items()}
                       for p in range(fragments)]
        self.weights = [self.local(p).clone() for p in range(fragments)]
        self.sgd = sgd(self.weights, lr=lr, momentum=momentum, nesterov=momentum > 0)

    def reset(self) -> None:
        """The global weights := this rank's (after warmup, when every rank's are the same)."""
        with torch.no_grad():
            for p, w in enumerate(self.weights):
                w.copy_(self.local(p))

    def local(self, p: int) -> torch.Tensor:
        """Fragment p of this rank's weights, as one float32 vector."""
        return torch.cat([self.flat[n].detach()[lo:hi].float().cpu() for n, (lo, hi) in self.ranges[p].items()])

    def pseudo_gradient(self, p: int, weight: float) -> torch.Tensor:
        """(global - local) * this rank's share of the samples: the ring's sum is the weighted mean."""
        return (self.weights[p] - self.local(p)).mul_(weight)

    def step(self, p: int, summed: torch.Tensor, alpha: float) -> None:
        """Apply the outer step to fragment p's global weights and merge them into this rank's weights."""
        w = self.weights[p]
        w.grad = summed
        self.sgd.step()  # (the other fragments have no grad: SGD skips them)
        w.grad = None
        at = 0
        with torch.no_grad():
            for name, (lo, hi) in self.ranges[p].items():
                local, new = self.flat[name][lo:hi], w[at : at + hi - lo]
                at += hi - lo
                if alpha:
                    local.mul_(alpha).add_(new.to(local), alpha=1 - alpha)
                else:
                    local.copy_(new)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for p, w in enumerate(self.weights):
            out[f"outer/{p}"] = w.detach()
            buf = self.sgd.state.get(w, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum/{p}"] = buf
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for p, w in enumerate(self.weights):
                w.copy_(tensors[f"outer/{p}"])
                if f"momentum/{p}" in tensors:
                    self.sgd.state[w]["momentum_buffer"] = tensors[f"momentum/{p}"].clone()


def rank_state_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / f"diloco-rank{rank}.safetensors"


def save_rank_state(path: Path, trainer: Trainer, outer: Outer, residuals: dict, pending: list, meta: dict) -> None:
    """What only this rank knows: its weights and inner optimizer state, the outer state, its error-feedback
    residuals and the reduced pseudo-gradients not merged yet (``pending``: (fragment, step, merge_at, sum,
    table)). Atomic, as checkpoints are."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_tensors(trainer).items()}
    tensors.update({k: v.contiguous() for k, v in outer.tensors().items()})
    tensors.update({f"ef/{k}": v.detach().cpu().contiguous() for k, v in residuals.items()})
    for j, (_, _, _, summed, table) in enumerate(pending):
        tensors[f"pending/{j}"], tensors[f"pending_table/{j}"] = summed.contiguous(), table.contiguous()
    meta = {**meta, "pending": [list(item[:3]) for item in pending]}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"diloco": json.dumps(meta)})
    tmp.replace(path)


def load_tensors(trainer: Trainer, outer: Outer, t: dict[str, torch.Tensor]) -> None:
    """A rank's weights, inner optimizer state and outer state (weights, momentum) from ``t`` (:func:`state_tensors`
    and :meth:`Outer.tensors`' keys): from its own file on resume, from a peer's on joining."""
    flats = list(trainer.flat.params.values())
    with torch.no_grad():
        for name, flat in trainer.flat.params.items():
            flat.copy_(t[f"param/{name}"].to(flat))
        for flat in flats:
            trainer.optimizer.state.pop(flat, None)
        for key, v in t.items():
            if key.startswith("optim/"):
                i, name = key.split("/", 2)[1:]
                trainer.optimizer.state[flats[int(i)]][name] = v.to(trainer.device)
    outer.load(t)


def load_rank_state(path: Path, trainer: Trainer, outer: Outer) -> tuple[dict, dict, list]:
    """Restore :func:`save_rank_state`'s file into ``trainer`` and ``outer``; returns (meta, residuals, pending)."""
    if not path.is_file():
        raise ConfigError(f"resume: no {path.name} in {path.parent} (each rank's DiLoCo state): resume a run "
                          "directory that an algo=diloco run with the same cluster.workers checkpointed")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["diloco"])
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    if meta["step"] != trainer.step:
        raise ConfigError(f"resume: {path.name} is of step {meta['step']}, checkpoint.safetensors of step "
                          f"{trainer.step}: the run directory holds checkpoints of two runs")
    load_tensors(trainer, outer, t)
    residuals = {k.removeprefix("ef/"): v for k, v in t.items() if k.startswith("ef/")}
    pending = [(p, s, m, t[f"pending/{j}"], t[f"pending_table/{j}"]) for j, (p, s, m) in enumerate(meta["pending"])]
    return meta, residuals, pending


class Worker:
    """One rank: inner steps, fragment syncs on the ring thread, outer steps, the run's files."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int):
        a, cluster = cfg.algo, cfg.cluster
        self.cfg, self.run_dir, self.rank, self.n = cfg, run_dir, rank, cluster.workers
        if not 0 <= rank < self.n:
            raise ConfigError(f"rank={rank} is outside 0..{self.n - 1} (cluster.workers)")
        if cluster.port is None:
            raise ConfigError("cluster.port is not set: give rank 0's port on every node (cluster.port=5555; rank r "
                              "listens on port + r, or on cluster.nodes[r].port)")
        self.sizes = cfg.batch_sizes()
        self.total = sum(self.sizes)
        node = cluster.worker(rank, cfg.train.batch_size)
        self.trainer = t = Trainer(cfg, self.sizes, device=node.device)
        if cfg.resume:
            t.resume(cfg.resume)
        self.H, self.F, self.tau, self.alpha = a.inner_steps, a.fragments, a.overlap_steps, a.merge_alpha
        self.codec, self.warmup = a.codec, a.warmup_sync_steps
        self.offsets = [(p + 1) * self.H // self.F % self.H for p in range(self.F)]
        self.outer = Outer(t.flat.params, self.F, a.outer_lr, a.outer_momentum)
        nodes = stage_nodes(cluster, self.n)
        self.link = RingLink(rank, [nd.address for nd in nodes], nodes[rank].bind, max_bytes=cluster.max_bytes,
                             heartbeat_s=cluster.heartbeat_s, liveness_s=cluster.liveness_s,
                             keys_dir=cluster.keys, bucket_bytes=bucket_bytes(a.bucket_mb, t.flat.params))
        self.agreement = Agreement(self.link)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ring")  # every socket operation, one after another
        self.pending: list = []  # (fragment, sync step, merge step, future of (sum, table)), oldest first
        self.since: list = []  # inner losses since the last sync
        self.loop = RunLoop(t, None, run_dir, fields=self.row_fields, run_state=self.run_state,
                            note=lambda row: f"{self.outer_steps} outer steps, {self.sent() / 1e6:.1f} MB sent")
        # the run's counters go on from a resumed checkpoint's (the lead's)
        self.outer_steps, self.sent_before = int(t.carried.get("outer_steps", 0)), int(t.carried.get("bytes_sent", 0))
        self.ring_s = 0.0  # time spent waiting for a sync's sum: the part the inner steps did not hide
        # what top shows of this rank's rounds (a round ends with its last fragment's outer step): how many, the
        # inner steps and bytes sent of the last one, this rank's own inner samples/s
        self.rounds = int(t.carried.get("rounds", 0))
        self.last_round: dict = {}
        self.mark = SimpleNamespace(step=t.step, sent=0, t0=time.perf_counter(), steps=0)
        self.recorder, self.lead = None, rank == 0
        self.round_s, self.budget = a.round_s, None  # round_s: this round's steps (None: until T passes)
        self.round = SimpleNamespace(t0=time.perf_counter(), steps=0, samples=0)
        # round_s: the samples the ring trains per inner step of this rank (the first round guesses every rank is as
        # fast as this one; then the last round's); it places this rank's steps on the run's lr schedule
        self.ring_per_step = float(self.total)
        # round_s: rank 0's own steps end mid-round, where its weights are its own, not the ring's, so an evaluation
        # waits for the end of the round in which its step comes (as at fixed H with eval_every a multiple of H);
        # warmup's steps are allreduce's (every rank's weights the same), evaluated at their step as allreduce does:
        # the trainer's eval_every is zeroed at the first step after warmup (see inner_step)
        self.eval_every = cfg.train.eval_every
        self.delay_s = node.faults.delay_s  # test knob: an artificially slow node
        # elastic: the ring re-forms without a lost rank and takes in new ones between rounds (plain DiLoCo: with
        # fragments or overlap a fragment is always in flight, with round_s the ranks are at different steps)
        self.elastic = a.elastic and self.F == 1 and not self.tau and not self.round_s
        self.min_workers = a.min_workers or self.n
        self.history, self.split = Membership(self.n), list(self.sizes)  # split: each member's share of a step
        self.owed = False  # this rank's last sync broke: the ring owes it
        self.reform_due = False  # a rank asked to join (every member read it in the same table), or the ring broke

    # -- the ring ------------------------------------------------------------------------------
    def form(self, first: bool) -> None:
        """Agree on the ring with every live rank (the first time too); a rank that is behind (a joiner, or one
        whose last round's sync broke while a peer's completed) catches up; the data is re-split over the
        members; a sync the ring owes (it broke during it) is done again by the new ring.

        The agreement compares steps; a rank reports ``2 * step + 1``, or ``2 * step`` while it owes the sync
        of ``step`` (its all-reduce broke), so a rank that completed a round's outer step is ahead of one that
        did not at the same step, and the decision says whether the new ring owes that sync."""
        t, c = self.trainer, self.cfg.cluster
        old_split = self.split
        d = self.pool.submit(self.agreement.reform, 2 * t.step + (not self.owed), t.fingerprint, c.connect_timeout_s,
                             self.min_workers if first else 1).result()
        check_quorum(self.rank, self.history.members(), d.members)
        if d.behind and (first and self.cfg.resume or not self.elastic):
            raise PeerError(f"diloco rank {self.rank}: ranks {d.behind} are behind the ring's step: every rank "
                            "must start from the same step (resume all of them from the same run directory; "
                            "ranks join a running ring only with algo.fragments=1, overlap_steps=0, round_s=null)")
        self.catch_up(d)
        self.owed = d.step % 2 == 0
        if first and self.cfg.resume:
            self.resume_own_state()
        event = self.history.change(t.step, d.epoch, self.history.members(), d.members)
        self.split = shares(self.sizes, self.link.members)
        t.sharder = Sharder(len(t.data.train_x), self.split, self.cfg.seed)
        self.take_lead(first)
        if self.lead and (not first or d.behind):
            self.recorder.event(t.step, "membership", weights_sha=weights_sha(t),
                                **{k: v for k, v in event.items() if k != "step"})
        logger.info(f"diloco rank {self.rank}: ring epoch {d.epoch} of ranks {self.link.members} from step {t.step} "
                    f"(joined {event['joined']}, left {event['left']}); batch share {self.split[self.rank]}; H={self.H} "
                    f"fragments={self.F} overlap_steps={self.tau} codec={self.codec}")
        if self.owed:
            self.sync_owed(d, old_split)
        self.reform_due = False

    def catch_up(self, d: Decision) -> None:
        """The source sends its state to the ranks behind; such a rank takes the weights, the inner optimizer's
        state, the outer weights and Nesterov momentum, the step and the run's counters."""
        t = self.trainer
        got = self.pool.submit(self.agreement.catch_up, d, lambda: ({**state_tensors(t), **self.outer.tensors()}, {
            "samples": t.samples, "outer_steps": self.outer_steps, "rounds": self.rounds,
            "history": self.history.to_json(), "wall_s": t.elapsed})).result()
        if got is None:
            return
        msg, run = got
        load_tensors(t, self.outer, {k: msg.tensor(k, copy=True) for k in msg.tensors})
        t.step, t.samples = d.step // 2, run["samples"]
        self.outer_steps, self.rounds = run["outer_steps"], run["rounds"]
        self.history.load(run["history"])
        t.wall_before, t.t0 = run["wall_s"], time.perf_counter()
        self.mark = SimpleNamespace(step=t.step, sent=self.sent(), t0=time.perf_counter(), steps=0)
        logger.info(f"diloco rank {self.rank}: took the weights, inner optimizer and outer state (momentum "
                    f"included) of step {t.step} from rank {d.source}")

    def resume_own_state(self) -> None:
        """This rank's own state from the resumed run directory (:func:`load_rank_state`); the residuals after
        the first agreement, which clears them."""
        path = rank_state_path(checkpoint.resolve(self.cfg.resume).parent, self.rank)
        _, residuals, pending = load_rank_state(path, self.trainer, self.outer)
        self.link.load_residuals(residuals)
        self.pending = [(p, s, m, _done((summed, table))) for p, s, m, summed, table in pending]

    def sync_owed(self, d: Decision, old_split: list[int]) -> None:
        """The sync the last ring broke in, done again by the new one: the members that trained this round weigh
        in by their shares of it, a rank behind not."""
        mine = 0.0 if self.rank in d.behind else old_split[self.rank] / sum(
            old_split[m] for m in d.members if m not in d.behind)
        self.sync(0, weight=mine)
        self.recorder.log(self.trainer.step, **self.merge(self.pending.pop(0)))
        self.owed = False

    def take_lead(self, first: bool) -> None:
        """The lowest member writes the run's files (a new lead appends to what the last one wrote)."""
        t = self.trainer
        self.lead = self.rank == self.link.members[0]
        if self.recorder is None:
            self.recorder = open_recorder(self.cfg, self.run_dir, files=self.lead, append=t.step > 0 and not self.cfg.resume,
                                          keep_until=t.step if self.cfg.resume else None)
            t.start_clock(self.recorder)
            self.round.t0 = time.perf_counter()  # (round_s: the first round's clock starts with training)
            self.mark = SimpleNamespace(step=t.step, sent=self.sent(), t0=time.perf_counter(), steps=0)
        else:
            self.recorder = hand_over_files(self.recorder, self.lead, self.run_dir, t, t.step)

    def _reduce(self, step: int, buf: torch.Tensor, name: str, row: list[float]):
        """On the ring thread. The row gains whether a rank asks to join (the ring thread notes that)."""
        self.link.step = step  # stamped on the messages: every rank syncs the same fragment at the same step
        return buf, self.link.allreduce(buf, self.codec, name, row=lambda: [*row, float(bool(self.agreement.joiners))])

    def _gather(self, stamp: int, row: list[float]) -> torch.Tensor:
        self.link.step = stamp
        return self.link.gather_scalars(row)

    def timed_round(self) -> dict:
        """``algo.round_s``: count this step into the round; once the round is over, sync, weighting the
        pseudo-gradient by this rank's samples, and apply the outer step at once."""
        r = self.round
        r.steps, r.samples = r.steps + 1, r.samples + self.sizes[self.rank]
        elapsed = time.perf_counter() - r.t0
        if (elapsed < self.round_s) if self.budget is None else (r.steps < self.budget):
            return {}
        self.budget = max(1, round(r.steps / elapsed * self.round_s))  # this round's rate sets the next's steps
        stamp = self.outer_steps  # the ranks are at different steps: the round number tells the messages apart
        loss = float(torch.stack(self.since).float().mean())
        self.since = []
        table = self.pool.submit(self._gather, stamp, [r.samples, r.steps, loss]).result()
        samples = float(table[:, 0].sum())
        buf = self.outer.pseudo_gradient(0, r.samples / samples)
        self.pending.append((0, stamp, 0, self.pool.submit(self._reduce, stamp, buf, "fragment0",
                                                           [loss * r.samples / samples])))
        row = self.merge(self.pending.pop(0))
        self.trainer.samples += int(samples)
        self.ring_per_step = samples / r.steps
        row.update({f"round_steps/rank{m}": int(n) for m, n in zip(self.link.members, table[:, 1].tolist())})
        step, e = self.trainer.step, self.eval_every
        if self.lead and e and step // e > (step - r.steps) // e and not self.finished():  # (the end evaluates)
            row.update(self.trainer.evaluate())
        self.round = SimpleNamespace(t0=time.perf_counter(), steps=0, samples=0)
        return row

    def finished(self) -> bool:
        t = self.trainer
        if self.round_s:  # every rank read the same table: all stop after the same round
            return t.samples >= t.total_steps * self.total
        return t.step >= t.end_step and not self.reform_due  # (a sync the ring owes is done first)

    def _reduce_gradients(self, step: int) -> None:
        """Warmup: allreduce's step (the union batch's mean gradient on every rank), uncompressed."""
        self.link.step = step
        for name, g in self.trainer.flat.grads.items():
            self.link.allreduce(g.mul_(self.split[self.rank] / self.total), "none", f"grad/{name}")

    def sync(self, p: int, weight: float | None = None) -> None:
        """Start fragment p's all-reduce of its pseudo-gradient (the ring thread works on it meanwhile), weighted
        by this rank's share of the samples (``weight``: another)."""
        s = self.trainer.step
        weight = self.split[self.rank] / self.total if weight is None else weight
        buf = self.outer.pseudo_gradient(p, weight)
        loss = float(torch.stack(self.since).float().mean()) if self.since else 0.0
        self.since = []
        row = [loss * weight]
        self.pending.append((p, s, s + self.tau, self.pool.submit(self._reduce, s, buf, f"fragment{p}", row)))

    def merge(self, item) -> dict:
        """Wait for a fragment's sum and apply the outer step: the same on every rank."""
        p, s, _, future = item
        t0 = time.perf_counter()
        try:
            summed, table = future.result()  # (a PeerError from the ring thread is raised here)
        except RingBroken:
            self.owed = True  # (on the ring's every live rank: none applied this outer step)
            raise
        self.ring_s += time.perf_counter() - t0  # the part of the sync the inner steps did not hide
        self.reform_due = self.reform_due or self.elastic and bool(table[:, -1].sum())
        self.outer.step(p, summed, self.alpha)
        self.outer_steps += 1
        row = {"outer_step": self.outer_steps, "fragment": p, "synced_at": s,
               "outer_loss": round(float(table[:, 0].sum()), 6), "bytes_sent": self.sent()}
        if p == self.F - 1:
            self.end_round()
            row.update(self.last_round)
        return row

    def end_round(self) -> None:
        """A round is over (its last fragment merged): its inner steps and bytes sent on this rank."""
        t, m = self.trainer, self.mark
        self.rounds += 1
        self.last_round = {"rounds": self.rounds, "round_inner_steps": t.step - m.step,
                           "round_bytes_sent": self.sent() - m.sent}
        m.step, m.sent = t.step, self.sent()

    def sent(self) -> int:
        return self.sent_before + self.link.bytes_sent

    def run_state(self) -> dict:  # the checkpoint JSON's counters, besides samples and wall time
        return {"bytes_sent": self.sent(), "outer_steps": self.outer_steps, "rounds": self.rounds}

    def save(self) -> None:
        """Every rank's own state (the lead's checkpoint.safetensors is written by the caller)."""
        done = [(p, s, m, *future.result()) for p, s, m, future in self.pending]  # sums wait, merged later
        meta = {"step": self.trainer.step, "rank": self.rank}
        save_rank_state(rank_state_path(self.run_dir, self.rank), self.trainer, self.outer,
                        self.pool.submit(self.link.residuals).result(), done, meta)

    # -- the run ---------------------------------------------------------------------------------
    def inner_step(self) -> tuple[float, dict]:
        """One inner step (counted at once: a sync after it may break the ring) and the syncs and outer steps due
        after it: (lr, the outer steps' row)."""
        t = self.trainer
        loss, _ = t.compute_gradients(t.step, self.rank)
        if self.delay_s:
            time.sleep(self.delay_s)
        if t.step < self.warmup:
            self.pool.submit(self._reduce_gradients, t.step).result()
        elif self.round_s:  # the schedule follows the ring's samples, not this rank's steps (see timed_round)
            t.lr_step = (t.samples + self.round.steps * self.ring_per_step) / self.total
        lr = t.apply_gradients()
        self.since.append(loss)
        self.mark.steps += 1
        row = {}
        # (round_s: samples counted at each sync, from every rank's count)
        self.loop.count(loss, self.total if t.step <= self.warmup or not self.round_s else 0)
        if t.step == self.warmup:
            self.outer.reset()  # the first round starts from the weights every rank now has
            self.round.t0 = time.perf_counter()
            self.mark.step, self.mark.sent = t.step, self.sent()
        if self.round_s and t.step > self.warmup:
            if t.train.eval_every:  # (from here the evaluations are timed_round's, at round ends)
                t.train = dataclasses.replace(t.train, eval_every=0)
            row.update(self.timed_round())
        for p, off in enumerate(self.offsets):
            if not self.round_s and t.step > self.warmup and (t.step - self.warmup) % self.H == off:
                self.sync(p)
        while self.pending and self.pending[0][2] <= t.step:
            row.update(self.merge(self.pending.pop(0)))
        return lr, row

    def row_fields(self) -> dict:
        """This rank's part of a log row: bytes sent, outer steps, its own inner samples/s, its last round."""
        own = self.mark.steps * self.sizes[self.rank] / max(1e-9, time.perf_counter() - self.mark.t0)
        return dict(bytes_sent=self.sent(), outer_steps=self.outer_steps, inner_samples_per_s=round(own, 2),
                    **self.last_round)

    def run(self) -> dict | None:
        t = self.trainer
        try:
            self.form(first=True)
            while not self.finished():
                try:
                    if self.reform_due:
                        logger.info(f"diloco rank {self.rank}: re-forming the ring at step {t.step}")
                        self.form(first=False)
                        continue
                    took = self.inner_step()
                except RingBroken as e:
                    if not self.elastic:
                        raise PeerError(f"{e}; stopping the run (algo.fragments > 1, overlap_steps > 0, round_s or "
                                        "algo.elastic=false: a lost rank stops the run; resume it)") from None
                    logger.warning(f"{e}: re-forming the ring")
                    self.reform_due = True
                    continue
                self.loop.recorder, self.loop.lead = self.recorder, self.lead  # (both move when the ring re-forms)
                self.loop.after_step(*took)
                if t.due(t.train.checkpoint_every):
                    self.save()
            if t.step >= t.total_steps or self.round_s:  # the run's end: merge what is still on the ring
                while self.pending:
                    self.recorder.log(t.step, **self.merge(self.pending.pop(0)))
            self.save()
            return self.finish() if self.lead else None
        except BaseException as e:  # SIGTERM (as KeyboardInterrupt), a lost peer: files closed, W&B records why
            if self.recorder is not None:
                self.recorder.abort(e)
            raise
        finally:
            self.link.stopped.set()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.link.close()
            if self.recorder is not None and not self.lead:
                self.recorder.finish(None)

    def finish(self) -> dict:
        steps = max(1, self.trainer.step)
        self.loop.recorder = self.recorder
        return self.loop.finish("diloco", ring=self.link.world, inner_steps=self.H, round_s=self.round_s,
                                fragments=self.F, overlap_steps=self.tau, codec=self.codec,
                                outer_steps=self.outer_steps, rounds=self.rounds, bytes_sent=self.sent(),
                                bytes_sent_per_step=round(self.sent() / steps),
                                sync_s_not_hidden_per_step=round(self.ring_s / steps, 6),
                                membership=self.history.events)


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def run(cfg: TrainConfig, run_dir: Path) -> dict | None:
    check(cfg)
    if cfg.role == "launch":
        return launch_ring(cfg, run_dir)
    if cfg.role == "worker":
        if cfg.rank is None:
            raise ConfigError("role=worker needs its rank: add rank=N (0 <= N < cluster.workers)")
        return Worker(cfg, run_dir, int(cfg.rank)).run()
    raise ConfigError(f"role={cfg.role!r} is invalid for algo=diloco: choose launch (every rank here) or worker "
                      "(there is no server)")
