"""The ring of ``algo=allreduce`` and ``algo=diloco``: each rank binds one inbox and sends to its successor.

    RingLink.reduce_scatter(flat)   sum a flat buffer across members; the member at ring position p ends owning
                                    chunk (p+1) % N of each bucket
    RingLink.all_gather(flat)       every member copies each bucket's owned chunk from its owner
    allreduce = reduce_scatter + all_gather: each rank sends 2(N-1)/N of the buffer, whatever N is.
    RingLink.send_state/recv_state  a member's training state to a member that is behind
    RingLink.enter(epoch, members)  go on as the ring of an epoch the members agreed on (see below)

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

Epochs: ``addresses`` are the ring's slots (rank r listens on ``addresses[r]``); the
*members* are the slots in the current epoch, in rank order. Every ring message carries
its epoch; one from an older epoch is dropped, one from a newer one means a ring runs
without us (:class:`RingBroken`), as does a member silent for ``liveness_s``. Which
ranks form an epoch, and from which step, is agreed above the transport
(:mod:`smolcluster.algorithms.membership`), on control messages this link carries
for it: :meth:`RingLink.tell` sends one (never blocking), :meth:`RingLink.next_control`
receives one while no collective runs, and :attr:`RingLink.on_control` is handed each
one that arrives while a collective waits (it may raise :class:`RingBroken`). Ring
messages of an epoch not entered yet are kept for it.

Liveness: every rank beats to every slot from a background thread
(:class:`~smolcluster.transport.sockets.Heartbeat`); a member silent for
``liveness_s`` while we wait is lost. Every receive is bounded. CURVE: the inbox is
a CURVE server, the outboxes clients (``keys_dir``).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import msgpack
import numpy as np
import torch
import zmq
from loguru import logger

from smolcluster.errors import PeerError
from smolcluster.transport import wire
from smolcluster.transport.compression import get_codec
from smolcluster.transport.sockets import ClientEndpoint, Heartbeat, bound_socket

# not finite=True: a NaN gradient reaches every rank as it would reach algo=local, instead of being dropped and
# leaving the ring waiting on a message that never comes
wire.register_kind("ring", {"rank": int, "epoch": int, "step": int, "op": str, "bucket": int, "hop": int, "seg": int})
# the source's weights for a rank that is behind (the membership's own messages: algorithms/membership.py)
wire.register_kind("ring_state", {"rank": int, "epoch": int, "step": int}, optional={"run": str})


class RingBroken(PeerError):
    """The current epoch's ring cannot go on (a member lost, left or restarted); the members agree on a new one
    (:meth:`smolcluster.algorithms.membership.Agreement.reform`) and :meth:`RingLink.enter` it."""

    def __init__(self, message: str, lost: set[int] | None = None):
        super().__init__(message)
        self.lost = set(lost or ())


# A hop's chunk travels as SEGMENTS messages when it is at least SEGMENT_MIN_BYTES: a rank sends segment s of the
# next hop as soon as it has added segment s of this one, so the next hop's first segment is already on the wire
# while it waits for this hop's last. Without that a slow link idles at every hop for the time a rank takes to be
# scheduled, receive, add and send. A smaller chunk goes whole: each message costs CPU, and on a fast link the
# link stays busy anyway. The chunks and their sums are the same either way. (`python -m smolcluster.bench scaling`
# measures the ring on 100 Mbit/s and 1 Gbit/s links.)
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
    """One rank's end of the ring: its inbox, its links to the other slots, its epoch's members and collectives."""

    def __init__(self, rank: int, addresses: list[str], bind: str, *, max_bytes: int, heartbeat_s: float,
                 liveness_s: float, keys_dir: str | None = None, bucket_bytes: int = 25 << 20):
        self.rank, self.addresses, self.slots = rank, list(addresses), len(addresses)
        self.max_bytes, self.liveness_s, self.bucket_bytes, self.keys_dir = max_bytes, liveness_s, bucket_bytes, keys_dir
        self.heartbeat_s = heartbeat_s
        self.leaving = threading.Event()  # set by the caller's thread: stop waiting, this epoch is being left
        # set by the owner when its process stops (SIGTERM, an error, the end): every wait here ends at once,
        # so the ring thread is free to join (a rank still forming its ring would otherwise wait out
        # cluster.connect_timeout_s, and outlive a launcher that stopped it)
        self.stopped = threading.Event()
        self.epoch = -1  # not in a ring yet
        # the owner's handler of a control message that comes in while a collective waits (None: dropped)
        self.on_control: Callable[[wire.Message], None] | None = None
        self.bytes_sent = 0
        self.wait_s = 0.0  # time blocked on the predecessor's ring messages (the link, or a slower peer)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.stale = 0  # ring messages of an older epoch, dropped
        self.step = 0  # stamped on every ring message: a message from another step is a protocol error
        self._residual: dict[str, torch.Tensor] = {}  # error feedback, per (buffer, bucket, hop)
        self._early: collections.deque = collections.deque()  # ring messages of our epoch that came in early
        self._ahead: list = []  # ring / ring_state messages of an epoch not entered yet
        self._states: list = []  # ring_state messages of our epoch that came in before recv_state
        self.inbox = bound_socket(zmq.ROUTER, bind, max_bytes=max_bytes, hwm=100_000, curve_dir=keys_dir)
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

    def tell(self, r: int, kind: str, fields: dict) -> None:
        """A control message to slot ``r``; never blocks (a dead slot's queue is bounded and dropped on close)."""
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

    def broken(self, message: str, lost: set[int] | None = None) -> RingBroken:
        """This epoch is over for us: every later send or receive fails fast until the next :meth:`enter`."""
        self.leaving.set()
        return RingBroken(message, lost)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        lost = sorted(r for r in self.members if r != self.rank and now - (self.last_seen[r] or now) > self.liveness_s)
        if lost:
            raise self.broken(f"ring rank {self.rank}: rank {', '.join(map(str, lost))} lost: silent for more "
                               f"than cluster.liveness_s={self.liveness_s}s", set(lost))

    def _control(self, msg: wire.Message) -> None:
        """A message other than the ring's while a collective or :meth:`recv_state` waits: the state of a newer
        epoch means a ring runs without us; a control message is the owner's (:attr:`on_control`)."""
        if msg.kind == "ring_state":
            if msg.fields["epoch"] > self.epoch:
                raise self.broken(f"ring rank {self.rank}: rank {msg.fields['rank']} is in a newer epoch "
                                  f"({msg.fields['epoch']}) than ours")
            return  # of an older epoch, or not for us: already dealt with
        if self.on_control is not None:
            self.on_control(msg)

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
                raise self.broken(f"ring rank {self.rank}: a ring of epoch {msg.fields['epoch']} runs without us")
            if msg.kind != kind or msg.fields["rank"] != self.pred or any(msg.fields.get(k) != v for k, v in expect.items()):
                raise PeerError(f"ring rank {self.rank}: expected {kind} {expect} from rank {self.pred}, got "
                                f"{msg.kind} {msg.fields} (are all ranks running the same config?)")
            return msg, frames

    # -- epochs -------------------------------------------------------------------------------------
    def next_control(self, timeout_s: float) -> wire.Message | None:
        """While the members agree on an epoch: the next control message, or None after ``timeout_s`` or after a
        ring message (one of an epoch not entered yet is kept for it; an older one is dropped)."""
        got = self._recv_one(timeout_s)
        if got is None:
            return None
        if got[0].kind not in ("ring", "ring_state"):
            return got[0]
        if got[0].fields["epoch"] > self.epoch:
            self._ahead.append(got)  # from a rank that entered the new epoch before us
        return None

    def enter(self, epoch: int, members: list[int]) -> None:
        """Go on as the ring of ``epoch`` with ``members``: its messages that came early are kept, the error
        feedback of the old ring's chunks is dropped, and a member not heard from yet is given ``liveness_s``."""
        self.epoch = epoch
        self._set_members(members)
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
        """Carry a checkpoint's residuals on (after the first :meth:`enter`, which clears them; same members)."""
        self._residual.update(residuals)

    def _send_frames(self, frames: list) -> None:
        if self.leaving.is_set():
            raise RingBroken(f"ring rank {self.rank}: leaving the ring's epoch {self.epoch}")
        try:
            self._to(self.succ).sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise self.broken(f"ring rank {self.rank}: could not send to rank {self.succ}: it is gone or stuck",
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
