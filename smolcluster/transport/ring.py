"""The ring of ``algo=allreduce``: each rank binds one inbox and sends to its successor; collectives on top.

    RingLink.reduce_scatter(flat)   sum a flat buffer across ranks; rank r ends owning chunk (r+1) % N of each bucket
    RingLink.all_gather(flat)       every rank copies each bucket's owned chunk from its owner
    allreduce = reduce_scatter + all_gather: each rank sends 2(N-1)/N of the buffer, whatever N is.

A buffer is cut into buckets (``bucket_bytes``); each bucket into N chunks. In
reduce-scatter hop ``h`` rank r sends its partial sum of chunk (r - h) to r+1 and
adds the one of chunk (r - h - 1) it receives from r-1; after N-1 hops chunk
(r + 1) is complete at r. All-gather passes the complete chunks on the same way.
The predecessor's messages arrive in the order they were sent (one TCP
connection), so every message must be exactly the next one expected: anything else
is a protocol error. All-gather forwards the received frames unchanged, so every
rank ends with the same bytes, also under a lossy codec.

Liveness: every rank beats to every other rank from a background thread
(:class:`~smolcluster.transport.sockets.Heartbeat`); a rank silent for
``liveness_s`` while we wait is a :class:`PeerError` naming it. Every receive is
bounded. CURVE: the inbox is a CURVE server, the outbox a client (``keys_dir``).
"""

from __future__ import annotations

import collections
import time

import msgpack
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

wire.register_kind("ring_hello", {"rank": int, "world": int, "fingerprint": str, "protocol": int})
# not finite=True: a NaN gradient reaches every rank as it would reach algo=local, instead of being dropped and
# leaving the ring waiting on a message that never comes
wire.register_kind("ring", {"rank": int, "step": int, "op": str, "bucket": int, "hop": int})


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
        self.rank, self.world = rank, len(addresses)
        self.pred, self.succ = (rank - 1) % self.world, (rank + 1) % self.world
        self.max_bytes, self.liveness_s, self.bucket_bytes = max_bytes, liveness_s, bucket_bytes
        self.bytes_sent = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.step = 0  # stamped on every ring message: a message from another step is a protocol error
        self._residual: dict[str, torch.Tensor] = {}  # error feedback, per (buffer, bucket, hop)
        self._early: collections.deque = collections.deque()  # ring messages that came in during connect()
        self.inbox = _context().socket(zmq.ROUTER)
        _configure(self.inbox, max_bytes, 100_000)
        _curve_server(self.inbox, keys_dir)
        _bind(self.inbox, bind)
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.out = ClientEndpoint(addresses[self.succ], max_bytes=max_bytes, curve_dir=keys_dir, hwm=100_000)
        self.beats = [Heartbeat(a, rank=rank, interval_s=heartbeat_s, max_bytes=max_bytes, curve_dir=keys_dir,
                                role="ring").start() for r, a in enumerate(addresses) if r != rank]
        self.last_seen = {r: None for r in range(self.world) if r != rank}  # None: not heard from yet

    # -- receiving ----------------------------------------------------------------------------
    def _recv_one(self, timeout_s: float):
        """(message, raw frames) of the next valid message, or None after ``timeout_s``; heartbeats are consumed."""
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

    def _check_liveness(self) -> None:
        now = time.monotonic()
        lost = sorted(r for r, t in self.last_seen.items() if t is not None and now - t > self.liveness_s)
        if lost:
            raise PeerError(f"ring rank {self.rank}: rank {', '.join(map(str, lost))} lost: silent for more than "
                            f"cluster.liveness_s={self.liveness_s}s; stopping the run")

    def recv(self, kind: str, **expect):
        """The predecessor's next message, which must be ``kind`` with these fields; a silent rank is a PeerError."""
        while True:
            got = self._early.popleft() if self._early else self._recv_one(min(self.liveness_s / 4, 0.5))
            if got is None:
                self._check_liveness()  # judged only with the inbox drained: queued beats count
                continue
            msg, frames = got
            if msg.kind == "ring_hello":
                continue  # a repeat from a rank that started late; the first one was checked
            if msg.kind != kind or msg.fields["rank"] != self.pred or any(msg.fields.get(k) != v for k, v in expect.items()):
                raise PeerError(f"ring rank {self.rank}: expected {kind} {expect} from rank {self.pred}, got "
                                f"{msg.kind} {msg.fields} (are all ranks running the same config?)")
            return msg, frames

    # -- joining ------------------------------------------------------------------------------
    def connect(self, fingerprint: str, timeout_s: float) -> None:
        """Say hello to the successor and wait until every rank has been heard from and the predecessor's
        model and protocol match ours (each rank checks its predecessor, so the ring checks everyone)."""
        self.out.send("ring_hello", {"rank": self.rank, "world": self.world, "fingerprint": fingerprint,
                                     "protocol": wire.PROTOCOL_VERSION})
        deadline = time.monotonic() + timeout_s
        hello = None
        while hello is None or any(t is None for t in self.last_seen.values()):
            if time.monotonic() > deadline:
                missing = [r for r, t in self.last_seen.items() if t is None] or [self.pred]
                raise PeerError(f"ring rank {self.rank}: rank {', '.join(map(str, missing))} not heard from within "
                                f"cluster.connect_timeout_s={timeout_s}s: start every rank (role=worker rank=N) "
                                "and check cluster.nodes hosts/ports")
            got = self._recv_one(0.2)
            if got is not None and got[0].kind == "ring_hello" and got[0].fields["rank"] == self.pred:
                hello = got[0].fields
            elif got is not None:
                self._early.append(got)  # the predecessor is ready before us: its first chunk is for recv()
        if hello["world"] != self.world or hello["protocol"] != wire.PROTOCOL_VERSION:
            raise PeerError(f"ring rank {self.rank}: rank {self.pred} runs a ring of {hello['world']} with protocol "
                            f"{hello['protocol']}, we run {self.world} with {wire.PROTOCOL_VERSION}")
        if hello["fingerprint"] != fingerprint:
            raise PeerError(f"ring rank {self.rank}: rank {self.pred}'s model fingerprint {hello['fingerprint']} != "
                            f"ours {fingerprint}: every rank must use the same model config")

    # -- collectives ----------------------------------------------------------------------------
    def buckets(self, n: int, itemsize: int, bucket_bytes: int | None = None) -> list[tuple[int, int]]:
        per = max(self.world, (bucket_bytes or self.bucket_bytes) // itemsize)
        return [(lo, min(n, lo + per)) for lo in range(0, n, per)]

    def owned(self, n: int, itemsize: int) -> list[tuple[int, int]]:
        """The ranges of a flat buffer of ``n`` elements that this rank holds complete after reduce_scatter."""
        out = []
        for lo, hi in self.buckets(n, itemsize):
            a, b = chunk_bounds(hi - lo, self.world)[self.succ]
            out.append((lo + a, lo + b))
        return out

    def _send(self, op: str, bucket: int, hop: int, x: torch.Tensor, codec: str, key: str) -> torch.Tensor | None:
        """Send ``x``. With a lossy codec, ``x`` plus what this hop's encoding lost last time (error feedback:
        delayed, not lost); returns exactly what the successor will decode."""
        fields = {"rank": self.rank, "step": self.step, "op": op, "bucket": bucket, "hop": hop}
        if not get_codec(codec).lossy:
            self._send_frames(wire.encode("ring", fields, {"x": x}))
            return None
        if key in self._residual:
            x = x + self._residual[key]
        frames = wire.encode("ring", fields, {"x": x}, codec)
        got = wire.decode(frames, max_bytes=self.max_bytes).tensor("x")  # the receiver's decode, bit for bit
        self._residual[key] = x - got
        self._send_frames(frames)
        return got

    def _send_frames(self, frames: list) -> None:
        try:
            self.out.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise PeerError(f"ring rank {self.rank}: could not send to rank {self.succ}: it is gone or stuck") from None
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

    def reduce_scatter(self, flat: torch.Tensor, codec: str = "none", name: str = "grad",
                       bucket_bytes: int | None = None, only: int | None = None) -> None:
        """In place: after it, ``flat[owned()]`` holds the sum over ranks (the rest holds partial sums)."""
        if self.world == 1:
            return
        for b, part in self._parts(flat, bucket_bytes, only):
            chunks = chunk_bounds(part.numel(), self.world)
            for hop in range(self.world - 1):
                a, z = chunks[(self.rank - hop) % self.world]
                # zero-copy: this chunk is not written again before the successor has consumed it
                self._send("rs", b, hop, part[a:z], codec, f"{name}/{b}/{hop}")
                msg, _ = self.recv("ring", step=self.step, op="rs", bucket=b, hop=hop)
                a, z = chunks[(self.rank - hop - 1) % self.world]
                self._take(msg, part[a:z], add=True)

    def all_gather(self, flat: torch.Tensor, codec: str = "none", name: str = "grad",
                   bucket_bytes: int | None = None, only: int | None = None) -> None:
        """In place: every rank's ``flat[owned()]`` is copied to the others. Under a lossy codec the owner keeps
        exactly what the others decode (so every replica is the same), error feedback keeping the difference."""
        if self.world == 1:
            return
        for b, part in self._parts(flat, bucket_bytes, only):
            chunks = chunk_bounds(part.numel(), self.world)
            a, z = chunks[self.succ]
            # a copy: zmq sends after we return, and the next step writes this buffer
            got = self._send("ag", b, 0, part[a:z].clone(), codec, f"{name}/{b}/ag")
            if got is not None:
                part[a:z].copy_(got)
            for hop in range(self.world - 1):
                msg, frames = self.recv("ring", step=self.step, op="ag", bucket=b, hop=hop)
                a, z = chunks[(self.rank - hop) % self.world]
                self._take(msg, part[a:z], add=False)
                if hop < self.world - 2:  # pass it on as received; the last hop's chunk belongs to our successor
                    self._forward(frames, hop + 1)

    def allreduce(self, flat: torch.Tensor, codec: str = "none", name: str = "grad", only: int | None = None) -> None:
        self.reduce_scatter(flat, codec, name, only=only)
        self.all_gather(flat, codec, name, only=only)

    def gather_scalars(self, values: list[float]) -> torch.Tensor:
        """Every rank's ``values`` as a (world, k) tensor: an allreduce in one bucket where each rank fills only
        its own row (= its chunk), so each sum is one value plus zeros: exact and the same everywhere."""
        k = len(values)
        t = torch.zeros(self.world * k, dtype=torch.float32)
        t[self.rank * k : (self.rank + 1) * k] = torch.tensor(values, dtype=torch.float32)
        self.reduce_scatter(t, "none", "scalars", bucket_bytes=t.numel() * 4)
        self.all_gather(t, "none", "scalars", bucket_bytes=t.numel() * 4)
        return t.view(self.world, k)

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
        self.out.close(linger_s=linger_s)
        self.inbox.close(linger=0)
