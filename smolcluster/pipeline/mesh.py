"""The links between pipeline nodes, with PUB/SUB's three traps handled.

Each node (a stage ``s0``, ``s1``, ... or the inference head) has one inbox and one
outbox (:mod:`smolcluster.transport.pubsub`). On top of them:

- **Topics route.** A data message goes to topic ``"<dst>/<tag>"`` where the tag is
  the request id (inference) or ``step.microbatch`` (training): it reaches only ``dst``.
  Heartbeats go to ``"all/"``.
- **Slow joiner.** A PUB drops what it publishes before a subscriber's subscription
  has reached it. Every node heartbeats from the start, and each heartbeat lists the
  peers it has heard; a node sends data to a peer only once that peer has heard it
  (:meth:`Mesh.wait_ready`). Subscriptions travel before any message, so a peer that
  heard our heartbeat is subscribed to our data too.
- **High-water-mark drops.** Every data message carries a per-link sequence number
  (0, 1, 2, ... from each sender to each receiver). A gap is an error naming the link,
  never a silent loss. A drop at the *end* of a burst leaves no later message to
  reveal the gap, so each heartbeat also carries the last sequence number its sender
  published to every peer; heartbeats travel the same ordered connection as the data,
  so a heartbeat claiming more than has arrived proves a loss.
- **Liveness.** Heartbeats are sent by a thread, so a node deep in a long forward
  pass still beats. A peer silent for ``liveness_s`` is reported lost
  (:class:`PeerLost`) within that bound; the caller decides what losing it means.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

from smolcluster.errors import PeerError
from smolcluster.pipeline import protocol
from smolcluster.transport.pubsub import Inbox, Outbox


class PeerLost(PeerError):
    """A peer stopped heartbeating for longer than the liveness bound."""

    def __init__(self, peer: str, message: str):
        super().__init__(message)
        self.peer = peer


@dataclass
class Envelope:
    src: str
    kind: str
    fields: dict
    tensors: dict[str, np.ndarray]
    topic: str
    nbytes: int = 0


@dataclass
class Peer:
    name: str
    address: str
    watched: bool = True          # losing it raises PeerLost
    last_seen: float = field(default_factory=time.monotonic)
    heard_from: bool = False      # we received at least one heartbeat from it
    heard_us: bool = False        # its heartbeats say it hears us
    info: dict = field(default_factory=dict)  # the extra fields of its last heartbeat
    incarnation: str = ""
    recv_seq: int = -1            # last data sequence number received from it
    sent_seq: int = -1            # last data sequence number sent to it
    said_bye: bool = False
    lost: bool = False


class Mesh:
    """One node's links: ``send(dst, kind, fields, tensors)``, ``recv(timeout_s)``, peers, heartbeats."""

    def __init__(self, name: str, bind: str, *, heartbeat_s: float = 1.0, liveness_s: float = 10.0,
                 max_bytes: int = 2 << 30, keys_dir: str | None = None, hwm: int | None = None):
        self.name = name
        self.heartbeat_s, self.liveness_s, self.max_bytes = float(heartbeat_s), float(liveness_s), max_bytes
        self.incarnation = uuid.uuid4().hex[:12]
        queue = {"hwm": hwm} if hwm else {}  # messages queued per link before PUB drops (then: a gap error)
        self.inbox = Inbox(bind, [f"{name}/", "all/"], max_bytes, keys_dir, **queue)
        self.address = self.inbox.address
        self.outbox = Outbox(keys_dir, **queue)
        self.peers: dict[str, Peer] = {}
        self.beacon: dict = {}  # extra fields this node's heartbeats carry (the owner updates it)
        self.bytes_sent = self.bytes_received = 0
        self._backlog: deque[Envelope] = deque()  # data that arrived while we waited for a handshake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)
        self._thread.start()

    # -- peers ------------------------------------------------------------------------------
    def add_peer(self, name: str, address: str, watched: bool = True) -> Peer:
        with self.outbox.lock:
            peer = self.peers.get(name)
            if peer is None or peer.address != address:
                peer = Peer(name, address, watched)
                self.peers[name] = peer
            peer.watched = watched
        self.outbox.connect(name, address)
        return peer

    def remove_peer(self, name: str) -> None:
        with self.outbox.lock:
            self.peers.pop(name, None)
        self.outbox.disconnect(name)

    def ready(self, names) -> bool:
        """Every named peer hears us and we hear it: data sent now will not be lost to a slow join."""
        return all(n in self.peers and self.peers[n].heard_us and self.peers[n].heard_from for n in names)

    def _missing(self, names) -> list[str]:
        """The peers of ``names`` not yet linked both ways, with their addresses."""
        return [f"{n} ({self.peers[n].address})" if n in self.peers else n for n in names
                if not (n in self.peers and self.peers[n].heard_us and self.peers[n].heard_from)]

    def wait_ready(self, names, timeout_s: float, what: str = "", notice: tuple[float, str] = (0.0, "")) -> None:
        """Block (receiving heartbeats) until :meth:`ready`; PeerError naming the missing peers after timeout_s.
        ``notice``: (seconds > 0, why): a line names the missing peers, and why they may be slow, once the wait has
        lasted that long (a wait of minutes, e.g. for stages that compile, is not silent)."""
        notice_s, why = notice
        names = list(names)
        start = time.monotonic()
        deadline = start + timeout_s
        next_beat = 0.0
        while not self.ready(names):
            if time.monotonic() >= next_beat:  # beat faster while joining: the handshake takes ~2 beats
                self.send_heartbeat()
                next_beat = time.monotonic() + min(0.1, self.heartbeat_s)
            if notice_s > 0 and time.monotonic() - start > notice_s:
                # (a warning where it says why: infer logs warnings only, and a silent wait of minutes looks hung)
                logger.log("WARNING" if why else "INFO", f"{self.name}: still waiting for "
                           f"{', '.join(self._missing(names))} after {notice_s:.0f}s (up to {timeout_s:.0f}s){why}")
                notice_s = 0.0
            if time.monotonic() > deadline:
                missing = self._missing(names)
                raise PeerError(f"{self.name}: no handshake with {', '.join(missing)} within {timeout_s:.0f}s"
                                f"{what}: start them, or check the hosts/ports in the cluster config")
            env = self._recv(0.05, check_liveness=False)
            if env is not None:  # a peer that finished its side of the handshake first may already send
                self._backlog.append(env)

    # -- sending ----------------------------------------------------------------------------
    def send(self, dst: str, kind: str, fields: dict, tensors: dict[str, np.ndarray] | None = None,
             tag: str = "") -> int:
        """Publish one data message to ``dst``; returns the bytes handed to the socket."""
        with self.outbox.lock:
            peer = self.peers.get(dst)
            if peer is None:
                raise PeerError(f"{self.name}: no link to {dst!r}")
            peer.sent_seq += 1
            frames = protocol.encode(kind, {**fields, "src": self.name, "seq": peer.sent_seq}, tensors)
            self.outbox.send_locked(f"{dst}/{tag}", frames)
        n = sum(len(f) if isinstance(f, (bytes, bytearray)) else f.nbytes for f in frames)
        self.bytes_sent += n
        return n

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_heartbeat()
            except Exception as e:  # the socket was closed under us: the node is shutting down
                if not self._stop.is_set():
                    logger.warning(f"{self.name}: heartbeat failed: {e}")
                return
            self._stop.wait(self.heartbeat_s)

    def send_heartbeat(self) -> None:
        now = time.monotonic()
        with self.outbox.lock:
            if self._stop.is_set():
                return
            heard = [p.name for p in self.peers.values() if p.heard_from and now - p.last_seen < self.liveness_s]
            sent = {p.name: p.sent_seq for p in self.peers.values()}
            # which incarnation of each peer those counts were sent to: a restarted peer must not be
            # charged with messages its previous incarnation received
            to_inc = {p.name: p.incarnation for p in self.peers.values()}
            fields = {"src": self.name, "seq": -1, "inc": self.incarnation, "heard": heard, "sent": sent,
                      "to_inc": to_inc, "info": dict(self.beacon)}
            self.outbox.send_locked("all/", protocol.encode("mp.heartbeat", fields, None))

    # -- receiving --------------------------------------------------------------------------
    def recv(self, timeout_s: float, check_liveness: bool = True) -> Envelope | None:
        """The next data message for this node, or None after ``timeout_s``.

        Heartbeats are consumed here. Raises :class:`PeerLost` when a watched peer has
        been silent for ``liveness_s``, and PeerError on a sequence gap.
        """
        if self._backlog:
            return self._backlog.popleft()
        return self._recv(timeout_s, check_liveness)

    def _recv(self, timeout_s: float, check_liveness: bool) -> Envelope | None:
        deadline = time.monotonic() + timeout_s
        while True:
            # What has already arrived comes first: silence is judged only with the inbox drained, so a
            # node that was busy longer than liveness_s (a long prefill on a Pi) does not blame peers
            # whose heartbeats sat in its queue meanwhile.
            got = self.inbox.recv(0)
            if got is None:
                if check_liveness:
                    self.check_liveness()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                got = self.inbox.recv(int(left * 1000))
                if got is None:
                    if check_liveness:
                        self.check_liveness()
                    return None
            topic, frames = got
            try:
                kind, fields, tensors = protocol.decode(frames, self.max_bytes)
            except Exception as e:  # a malformed message is logged and dropped, never fatal
                logger.error(f"{self.name}: dropped a malformed message on topic {topic!r}: {e}")
                continue
            # len(), not hasattr(f, "nbytes"): a zmq.Frame has no nbytes, and pyzmq's __getattr__ raising for
            # it cost ~12 us a message (py-spy: 3.6% of a gpt2-tiny stage's CPU)
            nbytes = sum(len(f) for f in frames)
            self.bytes_received += nbytes
            src = fields.get("src")
            peer = self.peers.get(src)
            if kind == "mp.heartbeat":
                self._on_heartbeat(peer, src, fields)
            elif peer is None:
                logger.warning(f"{self.name}: dropped {kind!r} from unknown sender {src!r}")
            else:
                peer.last_seen = time.monotonic()
                self._check_seq(peer, int(fields["seq"]))
                if kind == "mp.bye":
                    peer.said_bye = True
                return Envelope(src, kind, fields, tensors, topic, nbytes)
            if time.monotonic() >= deadline:
                return None

    def _on_heartbeat(self, peer: Peer | None, src: str, fields: dict) -> None:
        if peer is None:
            self.on_unknown_heartbeat(src, fields)
            return
        now = time.monotonic()
        unnoticed = False  # a peer that restarted faster than liveness_s: never reported lost
        if peer.incarnation and fields["inc"] != peer.incarnation:
            logger.warning(f"{self.name}: {src} restarted; its link starts afresh")
            unnoticed = peer.watched and not peer.lost and not peer.said_bye
            peer.recv_seq = peer.sent_seq = -1
            peer.said_bye = False
        if peer.lost:
            logger.info(f"{self.name}: {src} is back")
            peer.lost = False
        peer.incarnation = fields["inc"]
        peer.last_seen, peer.heard_from = now, True
        peer.heard_us = self.name in fields["heard"]
        peer.info = fields.get("info") or {}
        if unnoticed:
            self.on_restarted(src, f"{self.name}: {src} at {peer.address} restarted (a new incarnation) before "
                                   f"it was noticed lost: what it held is gone")
        claimed = int(fields["sent"].get(self.name, -1))
        if fields["to_inc"].get(self.name) != self.incarnation:
            claimed = -1  # counted for an earlier incarnation of this node (or before it heard us): not ours
        if claimed > peer.recv_seq:
            # The heartbeat left after those messages on the same ordered connection: they are lost.
            raise PeerError(f"{self.name}: messages {peer.recv_seq + 1}..{claimed} from {src} were lost "
                            "(dropped at a high-water mark or by a reconnect); the link is no longer exact")

    def on_unknown_heartbeat(self, src: str, fields: dict) -> None:
        """A heartbeat from a node we have no link to (a head announcing itself); the owner may override."""

    def on_restarted(self, src: str, message: str) -> None:
        """A watched peer's new incarnation heard before its silence was (a restart within ``liveness_s``): the
        owner may treat it as the loss it was (an inference stage does); by default its link just starts afresh."""

    def _check_seq(self, peer: Peer, seq: int) -> None:
        expected = peer.recv_seq + 1
        if seq != expected:
            raise PeerError(f"{self.name}: message {seq} from {peer.name} arrived but {expected} was next: "
                            f"{seq - expected} message(s) lost on the link (high-water mark drop); "
                            "the pipeline cannot continue exactly")
        peer.recv_seq = seq

    def check_liveness(self) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if not peer.watched or peer.lost or peer.said_bye:
                continue
            silent = now - peer.last_seen
            if silent > self.liveness_s:
                peer.lost = True
                heard = "" if peer.heard_from else " (never heard from)"
                raise PeerLost(peer.name, f"{self.name}: {peer.name} at {peer.address} sent nothing for "
                                          f"{silent:.1f}s{heard}, over cluster.liveness_s={self.liveness_s}; "
                                          "it stopped or the network is down")

    # -- shutdown ---------------------------------------------------------------------------
    def goodbye(self, names, timeout_s: float) -> None:
        """Say bye to ``names`` and wait for theirs, so no one closes with our last messages unsent."""
        names = list(names)
        for n in names:
            self.send(n, "mp.bye", {})
        deadline = time.monotonic() + timeout_s
        while not all(self.peers[n].said_bye for n in names if n in self.peers):
            if time.monotonic() > deadline:
                missing = [n for n in names if n in self.peers and not self.peers[n].said_bye]
                logger.warning(f"{self.name}: no bye from {', '.join(missing)} within {timeout_s:.0f}s")
                break
            env = self.recv(0.05, check_liveness=False)
            if env is not None and env.kind != "mp.bye":
                logger.warning(f"{self.name}: ignored {env.kind!r} from {env.src} while saying goodbye")
        # Our bye left before we waited: give the sockets a moment to flush before linger=0 closes them.
        time.sleep(min(0.2, self.heartbeat_s))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max(1.0, self.heartbeat_s * 2))
        self.outbox.close()
        self.inbox.close()
