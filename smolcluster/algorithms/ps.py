"""Parameter-server machinery shared by ``syncps`` and ``edp``.

The server side (:class:`ServerBase`) owns the model, optimizer and schedule (a
:class:`~smolcluster.trainer.Trainer`), the ROUTER endpoint, worker membership
(registration, heartbeats, loss), evaluation, checkpoints and run files. A policy
subclass decides *when* gradients are applied: SyncPS behind a per-step barrier,
EDP on arrival, weighed by staleness.

The worker side is one loop (:class:`Worker`): compute a gradient, push it through
its :class:`WorkerLink` (registration, weights in, gradients out), take the server's next
word. A policy says which batch comes next and whether to wait for fresh weights: SyncPS
waits after every step, EDP only every ``algo.pull_every`` steps.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from smolcluster.algorithms.guard import GradientGuard, grad_norm
from smolcluster.algorithms.launcher import codecs
from smolcluster.errors import ConfigError, PeerError
from smolcluster.security import is_loopback
from smolcluster.telemetry.run_files import exit_code_of, open_recorder
from smolcluster.train_settings import ClusterSpec, TrainConfig
from smolcluster.trainer import RunLoop, Trainer
from smolcluster.transport import (
    ClientEndpoint,
    Heartbeat,
    Message,
    ServerEndpoint,
    client_key_name,
    client_ranks,
    wire,
)

PROTOCOL = wire.PROTOCOL_VERSION


def server_address(cluster: ClusterSpec) -> str:
    if not cluster.port:
        raise PeerError("cluster.port is not set: give the server's port (cluster.port=5555) on every node")
    return f"tcp://{cluster.host}:{cluster.port}"


def to_numpy(flat: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy views of flat buffers (a copy only when they live on an accelerator)."""
    return {name: t.detach().cpu().numpy() for name, t in flat.items()}


def rank_keys(cluster: ClusterSpec) -> dict[str, int] | None:
    """With keys, ``{client public key: the rank it may register as}`` (``authorized/clientN.key``: rank N);
    None when any authorized client may take any rank: no keys, or one client key shared by every worker, which
    only a loopback server accepts (off loopback a shared key would let one worker claim every rank)."""
    if not cluster.keys:
        return None
    ranks = client_ranks(cluster.keys)
    if set(ranks.values()) != {0} or cluster.workers == 1:
        return ranks
    if is_loopback(cluster.bind):
        return None
    raise ConfigError(f"cluster.keys={cluster.keys} has one client key for {cluster.workers} workers, and the server "
                      f"listens on {cluster.bind}: make one per worker (python -m smolcluster.keys --dir DIR "
                      f"--workers {cluster.workers}) so a worker's key cannot claim another's rank")


@dataclass
class WorkerInfo:
    rank: int
    peer: bytes
    node: str
    device: str
    batch_size: int
    last_seen: float = field(default_factory=time.monotonic)
    alive: bool = True
    joined_step: int = 0
    lost_step: int | None = None
    applied: int = 0          # gradients applied
    skipped: int = 0          # gradients skipped (straggler) or dropped (too stale)
    samples: int = 0
    last_loss: float | None = None
    bytes_received: int = 0
    samples_per_s: float | None = None  # the worker's own throughput, from its last gradient (EDP)
    rejoins: int = 0          # registrations after the first (a restarted or reconnected worker)
    rejected: int = 0         # gradients rejected by the norm guard (non-finite, > train.max_grad_norm), never applied
    clipped: int = 0          # gradients clipped to the norm guard's robust bound (train.max_grad_norm_ratio)
    bad_samples: int = 0      # gradients rejected for a sample count outside 1..its assigned batch, never applied
    stale: list[int] = field(default_factory=list)
    session: str | None = None  # the registering process's token: its heartbeats carry it
    key: str | None = None      # its CURVE public key (z85), with cluster.keys

    def state(self) -> dict:
        """Its history, for the checkpoint's JSON (a resumed server carries it on)."""
        out = {k: getattr(self, k) for k in ("node", "device", "batch_size", "joined_step", "lost_step", "applied",
                                             "skipped", "samples", "last_loss", "bytes_received", "rejoins")}
        out["staleness_hist"] = np.bincount(np.asarray(self.stale, dtype=np.int64)).tolist() if self.stale else []
        return out

    @classmethod
    def restore(cls, rank: int, state: dict) -> WorkerInfo:
        """A worker known from the checkpoint: not alive until it registers with this server (and its
        registration then continues this history)."""
        hist = state.get("staleness_hist") or []
        w = cls(rank, b"", state["node"], state["device"], state["batch_size"], alive=False,
                stale=np.repeat(np.arange(len(hist)), hist).tolist())
        for k in ("joined_step", "lost_step", "applied", "skipped", "samples", "last_loss", "bytes_received", "rejoins"):
            setattr(w, k, state.get(k, getattr(w, k)))
        return w

    def report(self) -> dict:
        out = {k: getattr(self, k) for k in ("node", "device", "batch_size", "joined_step", "lost_step", "applied",
                                             "skipped", "samples", "last_loss", "bytes_received", "samples_per_s",
                                             "rejoins", "rejected", "clipped", "bad_samples")}
        out["alive"] = self.alive
        if self.stale:
            s = np.asarray(self.stale)
            out["staleness_mean"] = float(s.mean())
            out["staleness_max"] = int(s.max())
            out["staleness_hist"] = np.bincount(s).tolist()
        return out


class ServerBase:
    algo = "ps"
    loss_window = 1  # the steps a row's loss averages: SyncPS logs its step's (EDP: train.log_every updates)

    def quorum(self, cfg: TrainConfig) -> int:
        """How many workers the server waits for: every one (edp: ``algo.min_workers``)."""
        return cfg.cluster.workers

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.cluster = cfg.cluster
        self.trainer = Trainer(cfg, cfg.batch_sizes())
        if cfg.resume:
            self.trainer.resume(cfg.resume)
        self.tr = self.trainer.train
        self.flat = self.trainer.flat
        self.weights_codec = codecs(cfg.algo.codec, cfg.algo.weights_compression)[1]  # also checks the gradient codec's name before anyone connects
        port = self.cluster.port or "*"  # 0 / null: let the OS pick, then tell everyone through server.json
        self.endpoint = ServerEndpoint(f"tcp://{self.cluster.bind}:{port}",
                                       max_bytes=self.cluster.max_bytes, curve_dir=self.cluster.keys)
        (self.run_dir / "server.json").write_text(json.dumps({"address": self.endpoint.address,
                                                              "port": self.endpoint.port, "algo": self.algo}))
        self.workers: dict[int, WorkerInfo] = {}
        self.assigned = cfg.batch_sizes()  # each rank's batch: its gradient's weight, whatever it reports
        self.key_ranks = rank_keys(self.cluster)
        # the bound waits until every worker the server waits for has sent a gradient
        self.guard = GradientGuard.from_config(cfg.train, self.quorum(cfg))
        self.recorder = open_recorder(cfg, self.run_dir, keep_until=self.trainer.step if cfg.resume else None)
        self.ema = {n: t.detach().clone() for n, t in self.flat.params.items()} if cfg.algo.ema else None
        carried = self.trainer.carried  # a resumed run goes on counting where its checkpoint stopped
        self.bytes_sent, self.bytes_received = carried.get("bytes_sent", 0), carried.get("bytes_received", 0)
        for rank, state in carried.get("workers", {}).items():
            self.workers[int(rank)] = WorkerInfo.restore(int(rank), state)
        self._weights: tuple[int, dict[str, np.ndarray]] | None = None
        self.last_lr: float | None = None
        self.loop = RunLoop(self.trainer, self.recorder, self.run_dir, fields=self.row_fields,
                            note=lambda row: f"{row['peers_alive']} workers", run_state=self.run_state,
                            window=self.loss_window)
        logger.info(f"{self.algo} server on {self.endpoint.address}: model={self.trainer.model_name} "
                    f"({self.trainer.num_params:,} params) steps={self.trainer.step}->{self.trainer.end_step} "
                    f"waiting for {self.cluster.workers} workers")

    def start_clock(self) -> None:
        """Throughput and metrics.jsonl times count training, not waiting for workers to start."""
        self.loop.start()

    def run_state(self) -> dict:
        """What a checkpoint records for a resume to carry on (besides the trainer's samples and wall time):
        traffic and each worker's history. Policies add their own counters."""
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "workers": {str(r): w.state() for r, w in sorted(self.workers.items())}}

    # -- membership -------------------------------------------------------------------------
    def live(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.alive]

    def worker_for(self, peer: bytes) -> WorkerInfo | None:
        for w in self.workers.values():
            if w.peer == peer and w.alive:
                return w
        return None

    def refuse(self, peer: bytes, why: str, reason: str, retry: bool = False) -> None:
        """Turn a registration away; counted per ``why`` in the summary's rejected_messages like any bad message.
        ``retry``: the worker may try again later (its rank is taken by a live connection)."""
        self.endpoint.rejected[f"refused_{why}"] += 1
        logger.warning(f"refused a worker: {reason}")
        self.endpoint.send(peer, "refuse", {"reason": reason, **({"retry": True} if retry else {})})

    def on_register(self, peer: bytes, msg: Message) -> None:
        f = msg.fields
        rank = f["rank"]
        if f["protocol"] != PROTOCOL:
            return self.refuse(peer, "protocol", f"protocol version {f['protocol']} != server's {PROTOCOL}: run the same smolcluster version on every node")
        if f["algo"] != self.algo:
            return self.refuse(peer, "algo", f"worker runs algo={f['algo']} but the server runs algo={self.algo}")
        if f["fingerprint"] != self.trainer.fingerprint:
            return self.refuse(peer, "fingerprint", f"model fingerprint {f['fingerprint']} != server's {self.trainer.fingerprint}: "
                                     "every node must use the same model config")
        if not 0 <= rank < self.cluster.workers:
            return self.refuse(peer, "rank", f"rank {rank} is outside 0..{self.cluster.workers - 1} (cluster.workers)")
        if self.key_ranks is not None and self.key_ranks.get(msg.sender_key) != rank:
            held = self.key_ranks.get(msg.sender_key)
            return self.refuse(peer, "rank_key", f"rank {rank} registers only with the client key "
                               f"authorized/{client_key_name(rank)}.key; this key "
                               + (f"is rank {held}'s" if held is not None else "is no clientN.key"))
        if f["batch_size"] != self.assigned[rank]:
            return self.refuse(peer, "batch", f"worker {rank} says batch {f['batch_size']} but the server assigns it "
                               f"{self.assigned[rank]}: every node must use the same cluster config")
        old, session = self.workers.get(rank), f.get("session")
        if old is not None and old.alive and old.peer != peer:
            # A live rank is not taken over by a stranger: only the same process reconnecting (its session)
            # or, with keys, the same client key (a restarted worker) may. Anyone else waits until the old
            # connection is declared lost (a restarted keyless worker retries until then).
            same = (session is not None and session == old.session) or (
                msg.sender_key is not None and msg.sender_key == old.key)
            if not same:
                return self.refuse(peer, "takeover", f"worker {rank} is connected and alive: a new connection "
                                   "takes its rank only once the old one is lost", retry=True)
            logger.warning(f"worker {rank} re-registered from a new connection; the old one is dropped")
        self.workers[rank] = WorkerInfo(rank, peer, f["node"], f["device"], self.assigned[rank], joined_step=self.trainer.step,
                                        session=session, key=msg.sender_key)
        if old is not None:  # keep its history across reconnects (lost_step: when it was last lost)
            for k in ("applied", "skipped", "samples", "bytes_received", "stale", "lost_step", "rejected", "clipped",
                      "bad_samples"):
                setattr(self.workers[rank], k, getattr(old, k))
            self.workers[rank].rejoins = old.rejoins + 1
        logger.info(f"worker {rank} joined from node {f['node']} ({f['device']}, batch {f['batch_size']}) at step {self.trainer.step}")
        self.send_weights(self.workers[rank], kind="welcome")

    def check_liveness(self) -> None:
        if self.endpoint.pending():
            # judge silence only with the inbox drained: after a long eval or checkpoint save, the
            # heartbeats that arrived meanwhile are still queued and the loop handles them first
            return
        now = time.monotonic()
        for w in self.live():
            if now - w.last_seen > self.cluster.liveness_s:
                w.alive, w.lost_step = False, self.trainer.step
                logger.warning(f"worker {w.rank} ({w.node}) lost: silent for {now - w.last_seen:.1f}s "
                               f"(cluster.liveness_s={self.cluster.liveness_s}); continuing without it")
                self.on_lost(w)

    def on_lost(self, worker: WorkerInfo) -> None:
        """Policy hook: a worker stopped answering."""

    # -- weights out, gradients in ----------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        """A snapshot of the weights for this version: zmq sends asynchronously (copy=False), so the
        buffer it reads must not be the one the next optimizer step writes."""
        if self._weights is None or self._weights[0] != self.trainer.step:
            self._weights = (self.trainer.step, {n: a.copy() for n, a in to_numpy(self.flat.params).items()})
        return self._weights[1]

    def send_weights(self, worker: WorkerInfo, kind: str = "weights") -> None:
        fields = {"step": self.trainer.step, "version": self.trainer.step}
        if kind == "welcome":
            fields["rank"] = worker.rank
        self.bytes_sent += self.endpoint.send(worker.peer, kind, fields, self.weights(), codec=self.weights_codec)

    def gradient_arrays(self, worker: WorkerInfo, msg: Message) -> dict[str, torch.Tensor] | None:
        """The gradient tensors of a ``grad`` message, or None (answered with an error) if they do not fit the model."""
        out = {}
        for name, flat in self.flat.grads.items():
            arr = msg.tensors.get(name)
            if arr is None or arr.size != flat.numel():
                got = {k: v.size for k, v in msg.tensors.items()}
                self.endpoint.rejected["grad_shape"] += 1
                self.endpoint.send(worker.peer, "error", {"reason": "grad_shape",
                                   "detail": f"expected {name} with {flat.numel()} values, got {got}"})
                logger.error(f"rejected a gradient from worker {worker.rank}: tensors {got} do not fit the model")
                return None
            out[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(-1))
        return out

    def accept_gradient(self, worker: WorkerInfo, msg: Message, grads: dict[str, torch.Tensor]) -> float:
        """How much of a worker's gradient to apply: 1.0, less when clipped to the norm guard's bound, 0.0 when
        rejected (counted): a sample count outside 1..its assigned batch, or the guard's rule (security.py).
        The weight it gets is its assigned batch (``self.assigned``), never the count it reports."""
        n = msg.fields["samples"]
        if not 0 < n <= self.assigned[worker.rank]:
            worker.bad_samples += 1
            self.endpoint.rejected["bad_samples"] += 1
            if worker.bad_samples == 1:  # once per worker: a forger does not flood the log
                logger.warning(f"rejected worker {worker.rank}'s gradient: it reports {n} samples, outside "
                               f"1..{self.assigned[worker.rank]} (its assigned batch); its further ones are counted")
            return 0.0
        scale = self.guard.check(grad_norm(grads.values()), f"worker {worker.rank}'s gradient", source=str(worker.rank),
                                 version=msg.fields["version"])
        if scale == 0.0:
            worker.rejected += 1
        elif scale < 1.0:
            worker.clipped += 1
        return scale

    def guard_counts(self) -> dict:
        """The norm guard's figures for metrics rows and the summary."""
        bound = self.guard.bound()
        return {"gradients_rejected": self.guard.rejected, "gradients_clipped": self.guard.clipped,
                "bad_samples": self.endpoint.rejected["bad_samples"],
                **({"grad_norm_bound": round(bound, 6)} if bound is not None else {})}

    def poll(self, timeout_s: float) -> None:
        """Handle at most one message (or time out); every message refreshes its sender's liveness."""
        got = self.endpoint.recv(int(timeout_s * 1000))
        if got is None:
            return
        peer, msg = got
        if msg.kind == "register":
            return self.on_register(peer, msg)
        worker = self.worker_for(peer)
        if worker is None:
            if msg.kind == "ping":  # a worker of an earlier server (this one restarted): it re-registers
                self.endpoint.send(peer, "error", {"reason": "unregistered", "detail": "this server does not know you"})
                return
            if msg.kind == "heartbeat":
                w = self.workers.get(msg.fields["rank"])
                if w is not None and w.alive and msg.fields.get("session") == w.session:
                    w.last_seen = time.monotonic()
                return
            if msg.kind != "bye":
                self.endpoint.rejected["unregistered"] += 1
                self.endpoint.send(peer, "error", {"reason": "unregistered", "detail": "send register first"})
            return
        worker.last_seen = time.monotonic()
        if msg.kind == "grad":
            worker.bytes_received += msg.nbytes
            self.bytes_received += msg.nbytes
            grads = self.gradient_arrays(worker, msg)
            if grads is not None:
                self.on_grad(worker, msg, grads)
        elif msg.kind == "pull":
            self.send_weights(worker)
        elif msg.kind == "bye":
            worker.alive, worker.lost_step = False, self.trainer.step
            logger.info(f"worker {worker.rank} left at step {self.trainer.step}")
            self.on_lost(worker)
        elif msg.kind not in ("heartbeat", "ping"):
            self.endpoint.rejected["unexpected_kind"] += 1
            self.endpoint.send(peer, "error", {"reason": "unexpected_kind", "detail": f"server does not take {msg.kind!r}"})

    def on_grad(self, worker: WorkerInfo, msg: Message, grads: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # -- after each optimizer step ----------------------------------------------------------
    def after_step(self, loss: float, samples: int) -> None:
        """An update was applied: the EMA follows it, the run loop counts it."""
        if self.ema is not None:
            decay = float(self.cfg.algo.ema)
            for name, t in self.flat.params.items():
                self.ema[name].lerp_(t.detach(), 1 - decay)
        self.loop.record(loss, samples, self.last_lr)

    def row_fields(self) -> dict:
        """A log row's server fields: traffic, live workers, the policy's own, each worker's last loss."""
        row = {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "peers_alive": len(self.live()),
               **self.policy_fields()}
        row.update({f"loss/{w.rank}": w.last_loss for w in self.workers.values() if w.last_loss is not None})
        return row

    def policy_fields(self) -> dict:
        """A log row's fields of the policy (SyncPS: stragglers and the norm guard; EDP: staleness)."""
        return {}

    def wait_for_workers(self, count: int) -> None:
        deadline = time.monotonic() + self.cluster.connect_timeout_s
        while len(self.live()) < count:
            if time.monotonic() > deadline:
                raise PeerError(
                    f"only {len(self.live())} of {count} workers registered within cluster.connect_timeout_s="
                    f"{self.cluster.connect_timeout_s}s at {self.endpoint.address}: start the workers "
                    "(role=worker rank=N) or lower cluster.workers")
            self.poll(0.2)

    # -- the end ----------------------------------------------------------------------------
    def finish(self, **extra) -> dict:
        for w in self.live():
            self.endpoint.send(w.peer, "stop", {"reason": "training finished"})
        evaluation = self.trainer.evaluate()
        if self.ema is not None:
            saved = {n: t.clone() for n, t in self.flat.params.items()}
            self.flat.load_params(self.ema)
            evaluation.update({f"ema_{k}": v for k, v in self.trainer.evaluate().items()})
            self.flat.load_params(saved)
        try:
            return self.loop.finish(
                self.algo, evaluation=evaluation, final_loss=self.final_loss(),
                workers={str(r): w.report() for r, w in sorted(self.workers.items())},
                workers_lost=sorted(r for r, w in self.workers.items() if not w.alive),
                rejected_messages=dict(self.endpoint.rejected), bytes_sent=self.bytes_sent,
                bytes_received=self.bytes_received, **extra)
        finally:
            self.endpoint.close(linger_s=2.0)  # a stop not yet sent gets 2 s to leave (else its worker retries for long)

    def final_loss(self) -> float | None:
        losses = [w.last_loss for w in self.workers.values() if w.last_loss is not None]
        return float(np.mean(losses)) if losses else None


class WorkerLink:
    """A worker's connection to the server: register (with retries), weights in, gradients out."""

    def __init__(self, cfg: TrainConfig, rank: int, trainer: Trainer, algo: str, run_dir: Path | None = None):
        self.cfg, self.rank, self.trainer, self.algo = cfg, rank, trainer, algo
        self.cluster = cfg.cluster
        self.node = self.cluster.worker(rank, cfg.train.batch_size)
        self.address = server_address(self.cluster)
        self.codec = codecs(cfg.algo.codec)[0]
        self.client: ClientEndpoint | None = None
        self.heartbeat: Heartbeat | None = None
        self.bytes_sent = self.bytes_received = 0
        self.version = -1
        # This node's own metrics (no metrics.jsonl: the server writes the run's): Prometheus, W&B, hardware.
        self.recorder = open_recorder(cfg, run_dir, files=False) if run_dir is not None else None
        self.samples, self.t0 = 0, time.perf_counter()
        self.session = secrets.token_hex(8)  # this process's registration: reconnecting keeps it, a restart does not
        self._last: tuple[int, float] | None = None  # (step, loss) of the last step done
        self._logged_step: int | None = None

    def _connect(self) -> None:
        self.close()
        key = client_key_name(self.rank)  # DIR/clientN.key_secret when this node has it, else client.key_secret
        self.client = ClientEndpoint(self.address, max_bytes=self.cluster.max_bytes, curve_dir=self.cluster.keys,
                                     client_key=key)
        self.heartbeat = Heartbeat(self.address, rank=self.rank, interval_s=self.cluster.heartbeat_s,
                                   max_bytes=self.cluster.max_bytes, curve_dir=self.cluster.keys,
                                   session=self.session, client_key=key)
        self.heartbeat.start()

    def register(self) -> Message:
        """Register until the server welcomes us; a refusal or cluster.connect_timeout_s is a PeerError."""
        deadline = time.monotonic() + self.cluster.connect_timeout_s
        while time.monotonic() < deadline:
            self._connect()
            self.client.send("register", {
                "rank": self.rank, "node": self.node.name, "device": str(self.trainer.device),
                "batch_size": self.node.batch_size, "protocol": PROTOCOL,
                "fingerprint": self.trainer.fingerprint, "algo": self.algo, "session": self.session})
            msg = self.client.recv(2000)
            if msg is None:
                continue
            if msg.kind == "refuse" and msg.fields.get("retry"):
                # our rank is still held by a live connection (our previous process, not yet declared lost)
                logger.warning(f"worker {self.rank}: {msg.fields['reason']}; retrying")
                time.sleep(min(1.0, self.cluster.liveness_s / 4))
                continue
            if msg.kind == "refuse":
                raise PeerError(f"the server at {self.address} refused worker {self.rank}: {msg.fields['reason']}")
            if msg.kind == "welcome":
                self.load(msg)
                logger.info(f"worker {self.rank} registered with {self.address} at step {msg.fields['step']}")
                return msg
        raise PeerError(f"could not reach the server at {self.address} for cluster.connect_timeout_s="
                        f"{self.cluster.connect_timeout_s}s: is it running, and is the port open?")

    def load(self, msg: Message) -> None:
        self.bytes_received += msg.nbytes
        with torch.no_grad():
            for name, flat in self.trainer.flat.params.items():
                flat.copy_(torch.from_numpy(np.asarray(msg.tensors[name]).reshape(-1)))
        self.version = msg.fields["version"]

    def push(self, step: int, loss: float, samples: int, **fields) -> None:
        grads = to_numpy(self.trainer.flat.grads)
        self.bytes_sent += self.client.send("grad", {"rank": self.rank, "step": step, "version": self.version,
                                                     "samples": samples, "loss": loss, **fields},
                                            grads, codec=self.codec)

    def report(self, step: int, loss, samples: int) -> None:
        """Count this step; every ``train.log_every`` steps hand the worker's figures to its sinks."""
        self.samples += samples
        self._last = (step, float(loss))
        if step % self.trainer.train.log_every == 0:
            self._log_row()

    def rate(self, pending: int = 0) -> float:
        """This worker's samples/s since it started (``pending``: samples of a step not yet reported)."""
        return (self.samples + pending) / max(time.perf_counter() - self.t0, 1e-9)

    def _log_row(self) -> None:
        if self.recorder is not None and self._last is not None and self._last[0] != self._logged_step:
            step, loss = self._last
            self.recorder.log(step, loss=loss, samples=self.samples, samples_per_s=round(self.rate(), 2),
                              bytes_sent=self.bytes_sent, bytes_received=self.bytes_received)
            self._logged_step = step

    def finish(self, exit_code: int = 0) -> None:
        """Close the link and this worker's sinks (``exit_code``: non-zero when stopped early; W&B records it)."""
        self.close()
        self._log_row()  # the last figures, also for a worker that did fewer than log_every steps
        if self.recorder is not None:
            self.recorder.finish(None, exit_code=exit_code)
            self.recorder = None

    def ping(self) -> None:
        """Ask the server whether it knows us: a restarted one answers ``unregistered`` (the live one, nothing),
        so a worker finds a new server within its ping interval instead of after its longest wait."""
        try:
            self.client.send("ping", {"rank": self.rank})
        except PeerError:
            pass  # no server to hear it yet: the next ping tries again

    def recv(self, timeout_s: float) -> Message | None:
        return self.client.recv(int(timeout_s * 1000))

    def close(self, bye: bool = False) -> None:
        if self.client is not None and bye:
            self.client.send("bye", {"rank": self.rank})
            time.sleep(0.05)
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.client is not None:
            self.client.close()
            self.client = None


def next_message(link: WorkerLink, wait_s: float) -> Message | None:
    """The server's next word for us, skipping errors (logged) and weights that a newer version in the queue
    replaces: a straggler then computes on the current step, not on every step it missed, one by one.

    None after ``wait_s`` of silence (``wait_s=0``: nothing is queued). Silent for ``cluster.liveness_s / 2``,
    the worker pings: the server may be busy (it ignores the ping) or may have been restarted (it answers
    ``unregistered``, which is returned: the caller re-registers)."""
    msg, deadline = None, time.monotonic() + wait_s
    ping_s = link.cluster.liveness_s / 2
    while True:
        got = link.recv(0 if msg is not None else min(ping_s, max(0.0, deadline - time.monotonic())))
        if got is None:
            if msg is not None or time.monotonic() >= deadline:
                return msg
            link.ping()
            continue
        if got.kind == "error":
            if got.fields["reason"] == "unregistered":
                return got
            logger.error(f"server rejected our message: {got.fields['reason']}: {got.fields['detail']}")
            continue
        if msg is not None:
            link.bytes_received += msg.nbytes  # received, then superseded
        msg = got
        if msg.kind != "weights":
            return msg


class Worker:
    """A parameter-server worker: gradient of a batch, push, then the server's next word (new weights, stop).

    A policy subclass says which batch comes next (:meth:`first_step`, :meth:`next_step`) and how long to wait
    for the server after a push (:meth:`after_push`). A worker that hears nothing for that long, or that a restarted
    server does not know, registers again."""

    algo = "ps"

    def __init__(self, cfg: TrainConfig, run_dir: Path | None, rank: int):
        self.cfg, self.rank = cfg, rank
        device = cfg.cluster.worker(rank, cfg.train.batch_size).device  # per-node device from the cluster file
        self.trainer = Trainer(cfg, cfg.batch_sizes(), with_optimizer=False, device=device)
        self.link = WorkerLink(cfg, rank, self.trainer, self.algo, run_dir)
        self.delay = self.link.node.faults.delay_s  # test knob: make this node artificially slow

    # -- the policy -------------------------------------------------------------------------
    def first_step(self, welcome: Message) -> int:
        """The step whose batch to compute first after (re-)registering."""
        return welcome.fields["step"]

    def next_step(self, step: int, weights: Message | None) -> int:
        """The step whose batch comes after ``step``'s, given the weights just loaded (None: no new ones)."""
        return weights.fields["step"] if weights is not None else step + 1

    def after_push(self, step: int) -> float:
        """After pushing ``step``'s gradient: how long to wait for the server's word (0: only look at what came)."""
        return self.cfg.algo.straggler_timeout + self.cfg.cluster.liveness_s

    def push(self, step: int, loss: float, samples: int) -> None:
        self.link.push(step, loss, samples)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        link, trainer = self.link, self.trainer
        step = self.first_step(link.register())
        try:
            while True:
                loss, n = trainer.compute_gradients(step, self.rank)
                if self.delay:
                    time.sleep(self.delay)
                self.push(step, float(loss), n)
                link.report(step + 1, loss, n)
                wait_s = self.after_push(step)
                msg = next_message(link, wait_s)
                if msg is None and not wait_s:
                    step = self.next_step(step, None)
                elif msg is None or msg.kind == "error":  # silent too long, or a restarted server (unregistered)
                    why = f"no weights for {wait_s:.0f}s" if msg is None else "the server does not know us (restarted?)"
                    logger.warning(f"worker {self.rank}: {why}; re-registering with {link.address}")
                    step = self.first_step(link.register())
                elif msg.kind == "stop":
                    logger.info(f"worker {self.rank} done: {msg.fields['reason']} ({link.bytes_sent:,} bytes sent)")
                    return
                elif msg.kind in ("weights", "welcome"):
                    link.load(msg)
                    step = self.next_step(step, msg)
                else:
                    raise PeerError(f"unexpected {msg.kind!r} from the server")
        except BaseException as e:  # SIGTERM (as KeyboardInterrupt), a lost server: the W&B run records why
            link.finish(exit_code_of(e))
            raise
        finally:
            link.finish()


def run_role(cfg: TrainConfig, run_dir: Path, server_cls, worker_cls) -> dict | None:
    """Dispatch on ``role``: launch the whole cluster locally, or be its server or one worker."""
    role = cfg.role
    if role == "launch":
        from smolcluster.launch.local import launch_star

        return launch_star(cfg, run_dir)
    if role == "server":
        server = server_cls(cfg, run_dir)
        return server.run()
    if role == "worker":
        if cfg.rank is None:
            raise ConfigError("role=worker needs its rank: add rank=N (0 <= N < cluster.workers)")
        worker_cls(cfg, run_dir, int(cfg.rank)).run()
        return None
    raise ConfigError(f"role={role!r} is invalid: choose launch (start everything here), server or worker")
