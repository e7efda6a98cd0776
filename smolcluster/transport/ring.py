"""The ring of ``algo=allreduce``: each rank binds one inbox and sends to its successor; collectives on top.

    RingLink.reduce_scatter(flat)   sum a flat buffer across members; the member at ring position p ends owning
                                    chunk (p+1) % N of each bucket
    RingLink.all_gather(flat)       every member copies each bucket's owned chunk from its owner
    allreduce = reduce_scatter + all_gather: each rank sends 2(N-1)/N of the buffer, whatever N is.
    RingLink.reform(step, ...)      agree with the other live ranks on a new membership (an epoch): see below

A buffer is cut into buckets (``bucket_bytes``); each bucket into N chunks. In
reduce-scatter hop ``h`` the member at position p sends its partial sum of chunk
(p - h) to the next member and adds the one of chunk (p - h - 1) it receives from
the previous; after N-1 hops chunk (p + 1) is complete at p. All-gather passes the
complete chunks on the same way. A large chunk travels as segments (``SEGMENTS``), each
sent on as soon as it is added, so the link does not idle between hops. The predecessor's messages arrive in the order
they were sent (one TCP connection), so every message of the current epoch must be
exactly the next one expected: anything else is a protocol error. All-gather
forwards the received frames unchanged, so every rank ends with the same bytes,
also under a lossy codec.

Membership (elastic): ``addresses`` are the ring's slots (rank r listens on
``addresses[r]``); the *members* are the slots in the current epoch, in rank order.
Every ring message carries its epoch; one from an older epoch is dropped. A rank
that finds a member silent for ``liveness_s``, or hears that a member left or
restarted, raises :class:`RingBroken`; the caller then calls :meth:`reform`:

1. it tells the members of its epoch that it left (``ring_reform``), so nobody waits
   on it for the liveness window;
2. it sends a report (rank, session, epoch, last completed step) to the
   coordinator, the lowest rank it hears heartbeats from (again whenever that
   changes: a dead coordinator is replaced within the liveness window);
3. the coordinator waits until it holds a report from every slot it hears
   heartbeats from, drops the silent ones, and decides: members = the reporters,
   step = the highest completed step among them, source = the lowest member at that
   step, epoch = the highest reported epoch + 1; it sends that decision to each
   member, and the decision is the agreement (nobody else decides anything).
4. every member at a lower step (mid-step when the ring broke, or a new rank)
   receives the source's weights and optimizer state (``send_state``/``recv_state``)
   and everyone goes on from ``step``: a partial step is discarded everywhere.

New ranks join the same way: a rank starts with epoch -1 and sends its report to
every slot until a decision includes it; running members note the request and
re-form at the next step boundary (the caller decides when). This assumes crash-stop
failures on one network (a partition could elect two coordinators).

Liveness: every rank beats to every slot from a background thread
(:class:`~smolcluster.transport.sockets.Heartbeat`); a member silent for
``liveness_s`` while we wait is lost. Every receive is bounded. CURVE: the inbox is
a CURVE server, the outboxes clients (``keys_dir``).
"""

from __future__ import annotations

import collections
import threading
import time
import uuid

import msgpack
import numpy as np
import torch
import zmq
from loguru import logger

from smolcluster.errors import PeerError
from smolcluster.transport import wire
from smolcluster.transport.compression import get_codec
from smolcluster.transport.sockets import (
    ClientEndpoint,
    Heartbeat,
    _bind,
    _configure,
    _context,
    _curve_server,
)

# not finite=True: a NaN gradient reaches every rank as it would reach algo=local, instead of being dropped and
# leaving the ring waiting on a message that never comes
wire.register_kind("ring", {"rank": int, "epoch": int, "step": int, "op": str, "bucket": int, "hop": int, "seg": int})
# membership: "here I am at this step" (to the coordinator; a new rank to every slot), "I left epoch E",
# the coordinator's decision, the source's weights for a rank that is behind, a refusal
wire.register_kind("ring_report", {"rank": int, "session": str, "epoch": int, "step": int, "fingerprint": str,
                                   "protocol": int})
wire.register_kind("ring_reform", {"rank": int, "epoch": int})
wire.register_kind("ring_epoch", {"rank": int, "epoch": int, "step": int, "source": int, "members": list,
                                  "sessions": list, "behind": list})
wire.register_kind("ring_state", {"rank": int, "epoch": int, "step": int}, optional={"run": str})
wire.register_kind("ring_refused", {"rank": int, "reason": str})


class RingBroken(PeerError):
    """The current epoch's ring cannot go on (a member lost, left or restarted); :meth:`RingLink.reform` mends it."""

    def __init__(self, message: str, lost: set[int] | None = None):
        super().__init__(message)
        self.lost = set(lost or ())


# A hop's chunk travels as SEGMENTS messages when it is at least SEGMENT_MIN_BYTES: a rank sends segment s of the
# next hop as soon as it has added segment s of this one, so the next hop's first segment is already on the wire
# while it waits for this hop's last. Without that the link idles at every hop for the time a rank takes to be
# scheduled, receive, add and send (measured: 4 ranks on 100 Mbit/s, 1 MB buckets, so 256 kB chunks: the ring took
# 0.75 s for 0.65 s of wire time). A smaller chunk goes whole: each message costs CPU, and at 1 Gbit/s the link
# stays busy anyway (4 ranks, the MNIST MLP's 110 kB chunks: 6.7-7.0 ms per all-reduce whole, 8.4-8.7 ms in 2
# segments, 1.8 vs 2.1 ms of CPU per rank; the wire needs 5.3 ms). The chunks and their sums are the same either way.
SEGMENTS, SEGMENT_MIN_BYTES = 2, 256 << 10


def chunk_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Split ``n`` elements into ``world`` nearly equal contiguous chunks (the first ones one longer)."""
    base, extra = divmod(n, world)
    out, lo = [], 0
    for i in range(world):
        hi = lo + base + (i < extra)
        out.append((lo, hi))
        lo = hi
    return out


class RingLink:
    def __init__(self, rank: int, addresses: list[str], bind: str, *, max_bytes: int, heartbeat_s: float,
                 liveness_s: float, keys_dir: str | None = None, bucket_bytes: int = 25 << 20):
        self.rank, self.addresses, self.slots = rank, list(addresses), len(addresses)
        self.max_bytes, self.liveness_s, self.bucket_bytes, self.keys_dir = max_bytes, liveness_s, bucket_bytes, keys_dir
        self.session = uuid.uuid4().hex[:12]  # this process: a restarted rank has another
        self.heartbeat_s, self._born = heartbeat_s, time.monotonic()
        self.leaving = threading.Event()  # set by the caller's thread: stop waiting, this epoch is being left
        # set by the owner when its process stops (SIGTERM, an error, the end): every wait here ends at once,
        # so the ring thread is free to join (a rank still forming its ring would otherwise wait out
        # cluster.connect_timeout_s, and outlive a launcher that stopped it)
        self.stopped = threading.Event()
        self.epoch = -1  # not in a ring yet
        self.sessions: dict[int, str] = {}  # member -> its process's session, from the decision
        self.joiners: dict[int, dict] = {}  # slot -> report of a rank asking to join (the caller re-forms at a step boundary)
        self.bytes_sent = 0
        self.wait_s = 0.0  # time blocked on the predecessor's ring messages (the link, or a slower peer)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.stale = 0  # ring messages of an older epoch, dropped
        self.step = 0  # stamped on every ring message: a message from another step is a protocol error
        self._residual: dict[str, torch.Tensor] = {}  # error feedback, per (buffer, bucket, hop)
        self._early: collections.deque = collections.deque()  # ring messages of our epoch that came in early
        self._ahead: list = []  # ring / ring_state messages of an epoch being decided
        self.inbox = _context().socket(zmq.ROUTER)
        _configure(self.inbox, max_bytes, 100_000)
        _curve_server(self.inbox, keys_dir)
        _bind(self.inbox, bind)
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self._outs: dict[int, ClientEndpoint] = {}  # slot -> our DEALER to it (the successor's carries the ring)
        self.beats = [Heartbeat(a, rank=rank, interval_s=heartbeat_s, max_bytes=max_bytes, curve_dir=keys_dir,
                                role="ring").start() for r, a in enumerate(addresses) if r != rank]
        self.last_seen = {r: None for r in range(self.slots) if r != rank}  # None: not heard from yet
        self._set_members(list(range(self.slots)))

    def _set_members(self, members: list[int]) -> None:
        self.members, self.world = list(members), len(members)
        self.pos = self.members.index(self.rank)  # our place on the ring: chunks are cut by position
        self.pred = self.members[(self.pos - 1) % self.world]
        self.succ = self.members[(self.pos + 1) % self.world]

    def _to(self, r: int) -> ClientEndpoint:
        if r not in self._outs:
            self._outs[r] = ClientEndpoint(self.addresses[r], max_bytes=self.max_bytes, curve_dir=self.keys_dir,
                                           hwm=100_000)
        return self._outs[r]

    def _tell(self, r: int, kind: str, fields: dict) -> None:
        """A membership message to slot ``r``; never blocks (a dead slot's queue is bounded and dropped on close)."""
        try:
            self._to(r).sock.send_multipart(wire.encode(kind, fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    # -- receiving ----------------------------------------------------------------------------
    def _recv_one(self, timeout_s: float):
        """(message, raw frames) of the next valid message, or None after ``timeout_s``; heartbeats are consumed.
        Every wait on the ring polls through here in slices of at most 0.5 s, so :attr:`stopped` ends it."""
        if self.stopped.is_set():
            raise PeerError(f"ring rank {self.rank}: stopped")
        deadline = time.monotonic() + timeout_s
        while self.poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            frames = self.inbox.recv_multipart(copy=False)[1:]  # drop the ROUTER's peer identity
            try:
                msg = wire.decode(frames, max_bytes=self.max_bytes)
            except wire.WireError as e:
                self.rejected[e.reason] += 1
                logger.error(f"ring rank {self.rank}: rejected a message: {e}")
                continue
            sender = msg.fields.get("rank")
            if sender not in self.last_seen:
                self.rejected["bad_rank"] += 1
                logger.error(f"ring rank {self.rank}: rejected a {msg.kind} message from rank {sender!r}")
                continue
            self.last_seen[sender] = time.monotonic()
            if msg.kind != "heartbeat":
                return msg, frames
        return None

    def alive(self) -> set[int]:
        """The slots heard from within ``liveness_s`` (and this rank)."""
        now = time.monotonic()
        return {self.rank} | {r for r, t in self.last_seen.items() if t is not None and now - t <= self.liveness_s}

    def _broken(self, message: str, lost: set[int] | None = None) -> RingBroken:
        """This epoch is over for us: every later send or receive fails fast until :meth:`reform`."""
        self.leaving.set()
        return RingBroken(message, lost)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        lost = sorted(r for r in self.members if r != self.rank and now - (self.last_seen[r] or now) > self.liveness_s)
        if lost:
            raise self._broken(f"ring rank {self.rank}: rank {', '.join(map(str, lost))} lost: silent for more "
                               f"than cluster.liveness_s={self.liveness_s}s", set(lost))

    def _control(self, msg: wire.Message) -> None:
        """A membership message that came in while the ring runs: note a join, or raise RingBroken."""
        f, kind = msg.fields, msg.kind
        r = f["rank"]
        if kind == "ring_report":
            if self.sessions.get(r) == f["session"]:
                return  # a report of ours or of a joiner's that crossed the decision
            if r not in self.joiners:
                logger.info(f"ring rank {self.rank}: rank {r} asks to join (at the next step boundary)")
            self.joiners[r] = f
            if r in self.sessions:
                raise self._broken(f"ring rank {self.rank}: rank {r} restarted", {r})
        elif kind == "ring_reform" and f["epoch"] == self.epoch and r in self.sessions:
            raise self._broken(f"ring rank {self.rank}: rank {r} left the ring's epoch {self.epoch}")
        elif kind == "ring_refused":
            raise PeerError(f["reason"])
        elif kind in ("ring_epoch", "ring_state") and f["epoch"] > self.epoch:
            raise self._broken(f"ring rank {self.rank}: rank {r} is in a newer epoch ({f['epoch']}) than ours")
        # anything else is from an older epoch: already dealt with

    def recv(self, kind: str, **expect):
        """The predecessor's next message, which must be ``kind`` with these fields; a lost member, or a member
        leaving, is a RingBroken."""
        while True:
            if self.leaving.is_set():
                raise RingBroken(f"ring rank {self.rank}: leaving the ring's epoch {self.epoch}")
            if self._early:
                got = self._early.popleft()
            else:
                t0 = time.perf_counter()
                got = self._recv_one(min(self.liveness_s / 4, 0.5))
                self.wait_s += time.perf_counter() - t0
            if got is None:
                self._check_liveness()  # judged only with the inbox drained: queued beats count
                continue
            msg, frames = got
            if msg.kind != "ring":
                self._control(msg)
                continue
            if msg.fields["epoch"] < self.epoch:
                self.stale += 1  # sent before the ring re-formed
                continue
            if msg.fields["epoch"] > self.epoch:
                raise self._broken(f"ring rank {self.rank}: a ring of epoch {msg.fields['epoch']} runs without us")
            if msg.kind != kind or msg.fields["rank"] != self.pred or any(msg.fields.get(k) != v for k, v in expect.items()):
                raise PeerError(f"ring rank {self.rank}: expected {kind} {expect} from rank {self.pred}, got "
                                f"{msg.kind} {msg.fields} (are all ranks running the same config?)")
            return msg, frames

    # -- membership ---------------------------------------------------------------------------
    def reform(self, step: int, fingerprint: str, timeout_s: float, min_members: int = 1) -> dict:
        """Agree with every live rank on the next epoch (see the module docstring); ``step`` is the last step this
        rank completed. Returns the decision: ``epoch``, ``step`` (everyone goes on from it), ``source``, ``members``
        and ``behind`` (the members that must :meth:`recv_state` from the source). Also the first forming of the
        ring: every rank starts here, and the coordinator waits for ``min_members`` ranks."""
        self.leaving.clear()  # (on the ring's thread: every task queued before this one has run)
        if self.epoch >= 0:
            for r in self.members:
                if r != self.rank:
                    self._tell(r, "ring_reform", {"rank": self.rank, "epoch": self.epoch})
        mine = {"rank": self.rank, "session": self.session, "epoch": self.epoch, "step": step,
                "fingerprint": fingerprint, "protocol": wire.PROTOCOL_VERSION}
        reports, refused = {**self.joiners, self.rank: mine}, set()
        told, told_at, deadline = None, 0.0, time.monotonic() + timeout_s
        while True:
            alive = self.alive() - refused
            coord = min(alive)
            # a rank that has just started first listens a few beats long, so it knows every live slot before
            # it would coordinate (else two ranks starting apart could each form a ring of their own)
            settled = self.epoch >= 0 or time.monotonic() - self._born > 3 * self.heartbeat_s
            if coord == self.rank and settled and alive <= reports.keys() and len(alive) >= min_members:
                return self._decide({r: reports[r] for r in sorted(alive)})
            now = time.monotonic()
            if coord != self.rank and (told != coord or now - told_at > 1.0):
                # a new rank does not know who coordinates: it asks every slot (a running member notes a join)
                for r in [coord] if self.epoch >= 0 else [r for r in range(self.slots) if r != self.rank]:
                    self._tell(r, "ring_report", mine)
                told, told_at = coord, now
            if now > deadline:
                raise PeerError(f"ring rank {self.rank}: no ring formed within {timeout_s}s (heard from ranks "
                                f"{sorted(alive)}, reports from {sorted(reports)}, want {min_members}): start every "
                                "rank (role=worker rank=N) and check cluster.nodes hosts/ports")
            got = self._recv_one(0.1)
            if got is None:
                continue
            msg, f = got[0], got[0].fields
            if msg.kind == "ring_report":
                if f["fingerprint"] != fingerprint or f["protocol"] != wire.PROTOCOL_VERSION:
                    reason = (f"ring rank {f['rank']}: refused by rank {self.rank}: model fingerprint "
                              f"{f['fingerprint']} / protocol {f['protocol']} != ours {fingerprint} / "
                              f"{wire.PROTOCOL_VERSION}: every rank must use the same model config")
                    logger.error(reason)
                    self._tell(f["rank"], "ring_refused", {"rank": self.rank, "reason": reason})
                    refused.add(f["rank"])
                else:
                    reports[f["rank"]] = f
            elif msg.kind == "ring_epoch" and f["epoch"] > self.epoch:
                if self.session not in f["sessions"] or f["members"][f["sessions"].index(self.session)] != self.rank:
                    raise PeerError(f"ring rank {self.rank}: left out of epoch {f['epoch']} by rank {f['rank']} "
                                    "(it did not hear from us in time)")
                self._adopt(f)
                return f
            elif msg.kind == "ring_refused":
                raise PeerError(f["reason"])
            elif msg.kind in ("ring", "ring_state") and f["epoch"] > self.epoch:
                self._ahead.append(got)  # from a rank that entered the new epoch before us
            # else: older epochs' ring messages and reform notices: this reform covers them

    def _decide(self, reports: dict[int, dict]) -> dict:
        """The coordinator's decision over the live ranks' reports; sent to every member."""
        members = sorted(reports)
        step = max(rep["step"] for rep in reports.values())
        decision = {"rank": self.rank, "epoch": max(rep["epoch"] for rep in reports.values()) + 1, "step": step,
                    "source": min(r for r in members if reports[r]["step"] == step), "members": members,
                    "sessions": [reports[r]["session"] for r in members],
                    "behind": [r for r in members if reports[r]["step"] != step]}
        for r in members:
            if r != self.rank:
                self._tell(r, "ring_epoch", decision)
        self._adopt(decision)
        return decision

    def _adopt(self, d: dict) -> None:
        self.epoch = d["epoch"]
        self._set_members(d["members"])
        self.sessions = dict(zip(d["members"], d["sessions"]))
        self.joiners = {r: f for r, f in self.joiners.items() if r not in self.sessions}
        self._residual.clear()  # error feedback belongs to the old ring's chunks
        now = time.monotonic()
        for r in self.members:
            if r != self.rank and self.last_seen[r] is None:
                self.last_seen[r] = now  # the coordinator heard it; our clock for it starts now
        ahead, self._ahead = self._ahead, []
        ours = [g for g in ahead if g[0].fields["epoch"] == self.epoch]
        self._early = collections.deque(g for g in ours if g[0].kind == "ring")
        self._states = [g for g in ours if g[0].kind == "ring_state"]

    def send_state(self, to: int, step: int, tensors: dict[str, torch.Tensor], run: str = "{}") -> None:
        """The weights and optimizer state of ``step`` to a member that is behind (uncompressed)."""
        frames = wire.encode("ring_state", {"rank": self.rank, "epoch": self.epoch, "step": step, "run": run},
                             {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        size = sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames)
        if size > self.max_bytes:
            raise PeerError(f"ring rank {self.rank}: the training state ({size >> 20} MB) is over "
                            "cluster.max_message_mb: raise it so a rank can join")
        try:
            self._to(to).sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise RingBroken(f"ring rank {self.rank}: could not send the state to rank {to}", lost={to}) from None
        self.bytes_sent += size

    def recv_state(self, source: int) -> wire.Message:
        """The source's ``ring_state`` for this epoch (ring messages of this epoch that come first are kept)."""
        while True:
            got = self._states.pop(0) if self._states else self._recv_one(min(self.liveness_s / 4, 0.5))
            if got is None:
                self._check_liveness()
                continue
            msg = got[0]
            if msg.kind == "ring_state" and msg.fields["epoch"] == self.epoch and msg.fields["rank"] == source:
                return msg
            if msg.kind == "ring" and msg.fields["epoch"] == self.epoch:
                self._early.append(got)
            elif msg.kind == "ring" and msg.fields["epoch"] < self.epoch:
                self.stale += 1
            elif msg.kind != "ring":
                self._control(msg)

    # -- collectives ----------------------------------------------------------------------------
    def buckets(self, n: int, itemsize: int, bucket_bytes: int | None = None) -> list[tuple[int, int]]:
        per = max(self.world, (bucket_bytes or self.bucket_bytes) // itemsize)
        return [(lo, min(n, lo + per)) for lo in range(0, n, per)]

    def owned(self, n: int, itemsize: int) -> list[tuple[int, int]]:
        """The ranges of a flat buffer of ``n`` elements that this rank holds complete after reduce_scatter."""
        out = []
        for lo, hi in self.buckets(n, itemsize):
            a, b = chunk_bounds(hi - lo, self.world)[(self.pos + 1) % self.world]
            out.append((lo + a, lo + b))
        return out

    def _send(self, op: str, bucket: int, hop: int, seg: int, x: torch.Tensor, codec: str,
              key: str | None, row: torch.Tensor | None = None) -> torch.Tensor | None:
        """Send ``x`` (and ``row``, per-rank values that ride along: float64 bits as int64, never through a codec).
        With a lossy codec, ``x`` plus what this hop's encoding lost last time (error feedback: delayed, not
        lost); returns exactly what the successor will decode."""
        fields = self._fields(op, bucket, hop, seg)
        tensors = {"x": x} if row is None else {"x": x, "row": row}
        if not get_codec(codec).lossy:
            self._send_frames(wire.encode("ring", fields, tensors))
            return None
        if key is None:  # already fed back (:meth:`_feed_back`): x is what goes out
            self._send_frames(wire.encode("ring", fields, tensors, codec))
            return None
        if key in self._residual:
            x = tensors["x"] = x + self._residual[key]
        frames = wire.encode("ring", fields, tensors, codec)
        got = wire.decode(frames, max_bytes=self.max_bytes).tensor("x")  # the receiver's decode, bit for bit
        self._residual[key] = x - got
        self._send_frames(frames)
        return got

    def _fields(self, op: str, bucket: int, hop: int, seg: int) -> dict:
        return {"rank": self.rank, "epoch": self.epoch, "step": self.step, "op": op, "bucket": bucket, "hop": hop,
                "seg": seg}

    def _feed_back(self, x: torch.Tensor, codec: str, key: str, op: str, bucket: int, hop: int,
                   seg: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Under a lossy codec: (``x`` plus what this hop's encoding lost last time, what the receiver will
        decode of it), the residual updated; then ``_send(..., key=None)`` sends the first without feeding back
        again (the codec is deterministic: the same bytes)."""
        if key in self._residual:
            x = x + self._residual[key]
        frames = wire.encode("ring", self._fields(op, bucket, hop, seg), {"x": x}, codec)
        got = wire.decode(frames, max_bytes=self.max_bytes).tensor("x")
        self._residual[key] = x - got
        return x, got

    def residuals(self) -> dict[str, torch.Tensor]:
        """The error-feedback residuals (per buffer name, bucket, hop, segment), for a checkpoint."""
        return dict(self._residual)

    def load_residuals(self, residuals: dict[str, torch.Tensor]) -> None:
        """Carry a checkpoint's residuals on (after the first :meth:`reform`, which clears them; same members)."""
        self._residual.update(residuals)

    def _send_frames(self, frames: list) -> None:
        if self.leaving.is_set():
            raise RingBroken(f"ring rank {self.rank}: leaving the ring's epoch {self.epoch}")
        try:
            self._to(self.succ).sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise self._broken(f"ring rank {self.rank}: could not send to rank {self.succ}: it is gone or stuck",
                               {self.succ}) from None
        self.bytes_sent += sum(len(f) if isinstance(f, (bytes, zmq.Frame)) else memoryview(f).nbytes for f in frames)

    def _parts(self, flat: torch.Tensor, bucket_bytes: int | None, only: int | None):
        """(index, CPU view of the bucket) for every bucket (or bucket ``only``); a bucket copied off an
        accelerator is written back when the caller moves on."""
        for b, (lo, hi) in enumerate(self.buckets(flat.numel(), flat.element_size(), bucket_bytes)):
            if only is None or b == only:
                part = flat.detach()[lo:hi]
                cpu = part.cpu() if part.device.type != "cpu" else part
                yield b, cpu
                if cpu is not part:
                    part.copy_(cpu)

    def _segments(self, part: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per chunk of a bucket, its segments' ranges (the same on every rank: they depend on sizes only)."""
        segs = SEGMENTS if part.numel() * part.element_size() // self.world >= SEGMENT_MIN_BYTES else 1
        return [[(a + lo, a + hi) for lo, hi in chunk_bounds(z - a, segs)]
                for a, z in chunk_bounds(part.numel(), self.world)]

    def reduce_scatter(self, flat: torch.Tensor, codec: str = "none", name: str = "grad",
                       bucket_bytes: int | None = None, only: int | None = None) -> None:
        """In place: after it, ``flat[owned()]`` holds the sum over ranks (the rest holds partial sums)."""
        if self.world == 1:
            return
        for b, part in self._parts(flat, bucket_bytes, only):
            chunks = self._segments(part)
            # hop h sends chunk pos-h and adds chunk pos-h-1 from the predecessor, which hop h+1 sends on;
            # zero-copy: a chunk is not written again before the successor has consumed it
            for s, (a, z) in enumerate(chunks[self.pos]):
                self._send("rs", b, 0, s, part[a:z], codec, f"{name}/{b}/0/{s}")
            for hop in range(self.world - 1):
                for s, (a, z) in enumerate(chunks[(self.pos - hop - 1) % self.world]):
                    msg, _ = self.recv("ring", step=self.step, op="rs", bucket=b, hop=hop, seg=s)
                    self._take(msg, part[a:z], add=True)
                    if hop < self.world - 2:
                        self._send("rs", b, hop + 1, s, part[a:z], codec, f"{name}/{b}/{hop + 1}/{s}")

    def all_gather(self, flat: torch.Tensor, codec: str = "none", name: str = "grad",
                   bucket_bytes: int | None = None, only: int | None = None, row=None) -> torch.Tensor | None:
        """In place: every rank's ``flat[owned()]`` is copied to the others. Under a lossy codec the owner keeps
        exactly what the others decode (so every replica is the same), error feedback keeping the difference.

        ``row``: a callable returning this rank's per-step values (floats), called once this rank's owned
        chunks are complete (before the last bucket's all-gather starts); each rank's row rides on the first
        segment of its owned chunk's messages, which pass every other rank unchanged, so this returns every
        member's row as a (world, k) float64 table in ring order, the same on every rank, at no extra hop."""
        if self.world == 1:
            return torch.tensor([row()], dtype=torch.float64) if row else None
        table = None
        parts = list(self._parts(flat, bucket_bytes, only))
        lossy = get_codec(codec).lossy
        for i, (b, part) in enumerate(parts):
            chunks = self._segments(part)
            owned = chunks[(self.pos + 1) % self.world]
            mine = None
            if row is not None and i == len(parts) - 1:
                # under a lossy codec the owned chunk becomes what the others decode first, so the row (the
                # owner's figures of its chunks, which the others check) describes the bytes every rank holds
                fed = [self._feed_back(part[a:z].clone(), codec, f"{name}/{b}/ag/{s}", "ag", b, 0, s)
                       for s, (a, z) in enumerate(owned)] if lossy else []
                for (a, z), (_, got) in zip(owned, fed):
                    part[a:z].copy_(got)
                mine = torch.tensor(row(), dtype=torch.float64).view(torch.int64)  # the bits: exact
                table = torch.empty(self.world, mine.numel(), dtype=torch.int64)
                table[self.pos] = mine
                for s, (x, _) in enumerate(fed):
                    self._send("ag", b, 0, s, x, codec, None, mine if s == 0 else None)
            for s, (a, z) in enumerate(owned if not (mine is not None and lossy) else []):
                # a copy: zmq sends after we return, and the next step writes this buffer
                got = self._send("ag", b, 0, s, part[a:z].clone(), codec, f"{name}/{b}/ag/{s}",
                                 mine if s == 0 else None)
                if got is not None:
                    part[a:z].copy_(got)
            for hop in range(self.world - 1):
                for s, (a, z) in enumerate(chunks[(self.pos - hop) % self.world]):
                    msg, frames = self.recv("ring", step=self.step, op="ag", bucket=b, hop=hop, seg=s)
                    self._take(msg, part[a:z], add=False)
                    if mine is not None and s == 0:  # the row of chunk (pos - hop)'s owner, at pos - hop - 1
                        got = msg.tensors.get("row")
                        if got is None or got.shape != (table.shape[1],) or got.dtype != np.int64:
                            raise PeerError(f"ring rank {self.rank}: rank {self.pred}'s message carries no row of "
                                            f"{table.shape[1]} values (are all ranks running the same version?)")
                        table[(self.pos - hop - 1) % self.world] = torch.from_numpy(got)
                    if hop < self.world - 2:  # pass it on as received; the last hop's chunk is our successor's
                        self._forward(frames, hop + 1)
        return None if table is None else table.view(torch.float64)

    def allreduce(self, flat: torch.Tensor, codec: str = "none", name: str = "grad", only: int | None = None,
                  row=None) -> torch.Tensor | None:
        """Sum ``flat`` across members in place; with ``row``, also every member's row (see :meth:`all_gather`)."""
        self.reduce_scatter(flat, codec, name, only=only)
        return self.all_gather(flat, codec, name, only=only, row=row)

    def gather_scalars(self, values: list[float]) -> torch.Tensor:
        """Every member's ``values`` as a (world, k) float64 tensor, in ring order (``members``): one all-gather
        (N-1 hops) of a buffer whose chunks are the rows, each rank starting as the owner of its own.
        (``algo.zero=1`` needs this round: its stats are due before the all-gather of the parameters; otherwise
        the row rides the gradient's last bucket, :meth:`allreduce`'s ``row``.)"""
        k = len(values)
        t = torch.zeros(self.world, k, dtype=torch.float64)
        t[(self.pos + 1) % self.world] = torch.tensor(values, dtype=torch.float64)  # chunk pos+1 is ours
        self.all_gather(t.view(torch.int64).view(-1), "none", "scalars", bucket_bytes=t.numel() * 8)  # the bits
        return t.roll(-1, dims=0)  # row i held chunk i+1

    def _take(self, msg: wire.Message, into: torch.Tensor, add: bool) -> None:
        got = msg.tensor("x")
        if got.numel() != into.numel():
            raise PeerError(f"ring rank {self.rank}: rank {self.pred} sent {got.numel()} values for a chunk of "
                            f"{into.numel()} (are all ranks running the same model and algo.bucket_mb?)")
        if add:
            into.add_(got.view_as(into))
        else:
            into.copy_(got.view_as(into))

    def _forward(self, frames: list, hop: int) -> None:
        """Send a received ring message on with our rank and the next hop; the tensor frame is not re-encoded."""
        header = msgpack.unpackb(frames[0].buffer, raw=False)  # already validated by wire.decode
        header.update(rank=self.rank, hop=hop)
        self._send_frames([msgpack.packb(header, use_bin_type=True), *frames[1:]])

    def close(self, linger_s: float = 5.0) -> None:
        """Stop beating; what is still queued for the successor gets ``linger_s`` to leave."""
        for hb in self.beats:
            hb.stop()
        for r, out in self._outs.items():
            out.close(linger_s=linger_s if r == self.succ else 0.0)
        self.inbox.close(linger=0)
