"""PUB/SUB sockets for the stage pipeline: one bound *inbox* per node, one *outbox* that connects to many.

Every pipeline node (stage or head) binds a SUB socket, its inbox, at its own
address and subscribes to the topics addressed to it; its PUB socket, the outbox,
connects to the inboxes of the nodes it talks to. A message published with topic
``"s1/..."`` reaches only ``s1`` (PUB filters by topic at the sender over TCP), so
one outbox serves every destination and one inbox gathers everything a node is
sent, fair-queued across senders. Binding the inboxes (not the outboxes) lets a
head that comes and goes announce its own inbox to stages that run all the time.

Frames are opaque here: :mod:`smolcluster.pipeline.mesh` puts the wire format
(:mod:`smolcluster.transport.wire`) on top. Sends never block and never copy the
tensor frames (``copy=False``); receives return zero-copy ``zmq.Frame`` buffers.
The outbox is guarded by a lock so a heartbeat thread can share it with the main
loop (a zmq socket may move between threads behind a full memory barrier).
"""

from __future__ import annotations

import threading
from pathlib import Path

import zmq

from smolcluster.errors import PeerError
from smolcluster.transport.sockets import _configure, _context, _key_domain, _load

# Generous queues: a drop at the high-water mark is detected by sequence numbers, never silent.
_HWM = 100_000
SUBSCRIPTION_MAX_BYTES = 1024


def _server_keys(keys_dir: str | None) -> tuple[bytes, bytes, str] | None:
    """An inbox is a CURVE server: the cluster's server key pair, only authorized/ clients let in
    (returns the key pair and the ZAP domain that judges them)."""
    if not keys_dir:
        return None
    d = Path(keys_dir).expanduser()
    pub, sec = _load(d / "server.key_secret", "the server's secret key")
    return pub, sec, _key_domain(d / "authorized")


def _client_keys(keys_dir: str | None) -> tuple[bytes, bytes, bytes] | None:
    """An outbox is a CURVE client of every inbox: (server public, own public, own secret)."""
    if not keys_dir:
        return None
    d = Path(keys_dir).expanduser()
    server_pub, _ = _load(d / "server.key", "the server's public key")
    pub, sec = _load(d / "client.key_secret", "this node's client secret key")
    return server_pub, pub, sec


class Inbox:
    """The node's bound SUB socket; ``recv`` returns ``(topic, frames)`` or None after ``timeout_ms``."""

    def __init__(self, address: str, topics: list[str], max_bytes: int, keys_dir: str | None = None,
                 hwm: int = _HWM):
        self.sock = _context().socket(zmq.SUB)
        _configure(self.sock, max_bytes, hwm)
        curve = _server_keys(keys_dir)
        if curve is not None:
            self.sock.zap_domain = curve[2].encode()
            self.sock.curve_server = True
            self.sock.curve_publickey, self.sock.curve_secretkey = curve[:2]
        for t in topics:  # the node's own topic first, so it is live whenever "all" is
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        try:
            if address.endswith(":0"):
                port = self.sock.bind_to_random_port(address.rsplit(":", 1)[0])
                address = f"{address.rsplit(':', 1)[0]}:{port}"
            else:
                self.sock.bind(address)
        except zmq.ZMQError as e:
            self.sock.close(0)
            raise PeerError(f"cannot bind the pipeline inbox at {address} ({e}): the port is taken or the "
                            "host is not this machine's; pick another cluster.port") from e
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def recv(self, timeout_ms: int) -> tuple[str, list[zmq.Frame]] | None:
        if not self.poller.poll(max(0, int(timeout_ms))):
            return None
        frames = self.sock.recv_multipart(copy=False)
        return bytes(frames[0].buffer).decode(errors="replace"), frames[1:]

    def close(self) -> None:
        self.sock.close(0)


class Outbox:
    """The node's PUB socket, connected to the inboxes it talks to; thread-safe ``send``."""

    def __init__(self, keys_dir: str | None = None, hwm: int = _HWM):
        self.sock = _context().socket(zmq.PUB)
        _configure(self.sock, 1 << 62, hwm)  # sends are bounded by each receiving inbox
        # what a PUB receives are its subscribers' topics (a few bytes): a larger frame drops the peer
        self.sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_BYTES)
        curve = _client_keys(keys_dir)
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.lock = threading.Lock()
        self.peers: dict[str, str] = {}

    def connect(self, name: str, address: str) -> None:
        with self.lock:
            if self.peers.get(name) == address:
                return
            if name in self.peers:
                self.sock.disconnect(self.peers[name])
            self.sock.connect(address)
            self.peers[name] = address

    def disconnect(self, name: str) -> None:
        with self.lock:
            address = self.peers.pop(name, None)
            if address is not None:
                try:
                    self.sock.disconnect(address)
                except zmq.ZMQError:
                    pass

    def send(self, topic: str, frames: list) -> None:
        with self.lock:
            self.send_locked(topic, frames)

    def send_locked(self, topic: str, frames: list) -> None:
        """Send while the caller already holds :attr:`lock` (to read counters and send atomically)."""
        # PUB never blocks: at the high-water mark it drops, which the receiver's sequence check reports.
        self.sock.send_multipart([topic.encode(), *frames], copy=False)

    def close(self) -> None:
        with self.lock:
            self.sock.close(0)
