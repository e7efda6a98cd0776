"""ROUTER/DEALER endpoints with timeouts, heartbeats, size limits and optional CURVE.

Every socket: ``linger=0`` (closing never blocks; ``close(linger_s=...)`` gives last
messages a bounded time to leave), ``MAXMSGSIZE`` (zmq drops oversize
messages before we see them), bounded high-water marks, ZMTP heartbeats (a dead TCP
peer is noticed by zmq itself) and automatic reconnect. Every receive takes a timeout;
every send that could block has one. Malformed messages are logged, counted in
``rejected`` and, where a reply is expected, answered with an ``error`` message; they
never raise out of ``recv``.

    ServerEndpoint  ROUTER, binds     recv -> (peer, Message); send(peer, kind, ...)
    ClientEndpoint  DEALER, connects  send(kind, ...); recv -> Message
    Heartbeat       a thread with its own DEALER, beating to a server while the caller computes
    bound_socket    a listening socket configured as the endpoints' are (the ring's inbox: ``ring.py``)

The pipeline's PUB/SUB links live in ``pubsub.py``: one PUB/SUB stack, not two.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from loguru import logger

from smolcluster.errors import ConfigError, PeerError
from smolcluster.transport import wire

_SEND_TIMEOUT_MS = 30_000
_auth_lock = threading.Lock()
_authenticator_thread = None
_linger_until = 0.0  # when the last linger given to close() ends (let_lingering_leave waits for no later)


def _context() -> zmq.Context:
    return zmq.Context.instance()


# ZMTP heartbeats: a PING every second keeps NAT/firewall state alive and lets zmq drop a
# half-open TCP connection. But libzmq counts only *complete* messages as traffic
# (zeromq/libzmq#2709): the PONG to our PING waits behind a large message the peer is
# sending us, and a timeout shorter than that transfer cuts the connection mid-message,
# again and again (the message never arrives). So the timeout outlasts the largest
# message this socket accepts at the slowest link we plan for. Losing a *peer* is noticed
# sooner by the application's own heartbeats (Heartbeat/Liveness, a separate connection).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_FLOOR_MS = 10_000
MIN_LINK_BYTES_PER_S = 1_000_000  # 8 Mbit/s: a weak Wi-Fi link to a Raspberry Pi


def let_lingering_leave() -> None:
    """Before a process ends without the interpreter's teardown (``os._exit``, which stops zmq's I/O thread at
    once): let sockets closed with a linger send what they still queue. Terminating the context returns as soon
    as they have, and waits no longer than the last linger given (past it, with a socket still open, it would
    block for good, so it runs on a daemon thread)."""
    left = _linger_until - time.monotonic()
    if left > 0:
        if _authenticator_thread is not None:  # CURVE's ZAP handler: its sockets would hold term for the whole linger
            _authenticator_thread.stop()
        term = threading.Thread(target=_context().term, daemon=True, name="zmq-term")
        term.start()
        term.join(left)


def heartbeat_timeout_ms(max_bytes: int) -> int:
    """ZMTP heartbeat timeout for a socket taking messages up to ``max_bytes`` (at most 1 h)."""
    return int(min(3_600_000, max(HEARTBEAT_FLOOR_MS, max_bytes * 1000 / MIN_LINK_BYTES_PER_S)))


def _configure(sock: zmq.Socket, max_bytes: int, hwm: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)  # per frame; wire.decode checks the total
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    timeout = heartbeat_timeout_ms(max_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(timeout, 6_553_500))  # the TTL travels in deciseconds (u16)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"cluster.keys: {path} is missing ({what}); make keys with "
                          "python -m smolcluster.keys --dir DIR")
    return zmq.auth.load_certificate(str(path))


class _KeyCheck:
    """pyzmq's credentials-provider protocol: ``callback(domain, z85_key) -> bool``, one per ZAP domain.

    Why callbacks and not ``configure_curve(location=CURVE_ALLOW_ANY)``: pyzmq's allow-any is one flag
    for the whole process, so one socket that admits any key made every keyed socket of the process
    admit strangers. A callback is judged per domain, and an error in it refuses the key.
    """

    def __init__(self, allowed: Callable[[str], bool], what: str):
        self.allowed, self.what = allowed, what

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return bool(self.allowed(key.decode("ascii")))
        except Exception as e:  # a broken check refuses; it never admits
            logger.error(f"{self.what}: the key check failed ({e!r}); refused the client")
            return False


def _authenticator():
    global _authenticator_thread
    with _auth_lock:
        if _authenticator_thread is None:
            from zmq.auth.thread import ThreadAuthenticator

            _authenticator_thread = ThreadAuthenticator(_context())
            _authenticator_thread.start()
        return _authenticator_thread


def authorized_keys(authorized: Path) -> frozenset[str]:
    """The z85 public keys in a directory of ``*.key`` files (``authorized/``)."""
    if not authorized.is_dir():
        raise ConfigError(f"cluster.keys: {authorized} is missing (the client keys this server lets in); "
                          "make keys with python -m smolcluster.keys --dir DIR")
    return frozenset(k.decode("ascii") for k in zmq.auth.load_certificates(str(authorized)))


def _key_domain(authorized: Path | None = None, authorize: Callable[[str], bool] | None = None) -> str:
    """Register a ZAP domain whose clients are judged by ``authorize(z85_key)``, or by the keys in
    ``authorized/`` (read now: a key added later needs a restart). Returns the domain to set on a
    socket; a socket without one is refused every key (pyzmq: "Unknown domain")."""
    if authorize is None:
        keys = authorized_keys(authorized)
        domain, authorize, what = f"smolcluster:{authorized.resolve()}", keys.__contains__, str(authorized)
    else:
        domain, what = f"smolcluster:check:{id(authorize):x}", getattr(authorize, "__qualname__", "authorize")
    _authenticator().configure_curve_callback(domain=domain, credentials_provider=_KeyCheck(authorize, what))
    return domain


def _curve_server(sock: zmq.Socket, curve_dir: str | None,
                  authorize: Callable[[str], bool] | None = None) -> None:
    """Make a binding socket a CURVE server. Clients are judged by ``authorize(z85_key)`` when given,
    else only the keys in ``curve_dir/authorized/`` get in."""
    if not curve_dir:
        return
    d = Path(curve_dir).expanduser()
    pub, sec = _load(d / "server.key_secret", "the server's secret key")
    sock.zap_domain = _key_domain(d / "authorized", authorize).encode()
    sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, pub, sec


def _curve_client(sock: zmq.Socket, curve_dir: str | None, client_key: str = "client") -> None:
    """Make a connecting socket a CURVE client: this node's key pair and the server's public key.
    ``client_key``: the pair to use (a worker's own, ``clientN``), else ``client`` (see :func:`client_key_name`)."""
    if not curve_dir:
        return
    d = Path(curve_dir).expanduser()
    server_pub, _ = _load(d / "server.key", "the server's public key")
    if not (d / f"{client_key}.key_secret").is_file():
        client_key = "client"
    pub, sec = _load(d / f"{client_key}.key_secret", "this node's client secret key")
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_pub, pub, sec


def _bind(sock: zmq.Socket, bind: str) -> None:
    try:
        sock.bind(bind)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise PeerError(f"cannot listen on {bind} ({e}): is another server using the port? "
                        "Pick another cluster.port") from e


def bound_socket(kind: int, bind: str, *, max_bytes: int, hwm: int, curve_dir: str | None = None,
                 authorize: Callable[[str], bool] | None = None) -> zmq.Socket:
    """A listening socket of ``kind`` (zmq.ROUTER, ...) with every socket's bounds and heartbeats, a CURVE server
    when keyed (:func:`_curve_server`), bound to ``bind`` (a taken port: one clear error)."""
    sock = _context().socket(kind)
    _configure(sock, max_bytes, hwm)
    _curve_server(sock, curve_dir, authorize)
    _bind(sock, bind)
    return sock


def client_key_name(rank: int) -> str:
    """The client pair that rank ``rank`` holds: ``client`` for rank 0, ``clientN`` for rank N. The server lets
    rank N register only with the public key ``authorized/clientN.key``."""
    return "client" if rank == 0 else f"client{rank}"


def client_ranks(curve_dir: str | Path) -> dict[str, int]:
    """``{z85 public key: rank}`` from ``authorized/client.key`` (rank 0) and ``authorized/clientN.key``."""
    out = {}
    for path in sorted((Path(curve_dir).expanduser() / "authorized").glob("client*.key")):
        suffix = path.stem.removeprefix("client")
        if suffix == "" or suffix.isdigit():
            out[zmq.auth.load_certificate(str(path))[0].decode()] = int(suffix or 0)
    return out


def make_keys(directory: str | Path, clients: int = 1) -> dict[str, Path]:
    """Write a server key pair and ``clients`` client key pairs (``client``, ``client1``, ...: one per worker
    rank); the clients' public keys also go to authorized/.

    Replaces any keys already there, and empties ``authorized/`` first so an old client key cannot linger.
    Secret files are 0600 and the directories 0700 from the start: each file is written in a fresh private
    directory and renamed into place (a rename replaces a planted symlink, never writes through it).
    Layout: see ``python -m smolcluster.keys --help``.
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (d / "authorized").is_symlink():
        raise ConfigError(f"{d / 'authorized'} is a symlink: refusing to write keys through it (remove it)")
    (d / "authorized").mkdir(mode=0o700, exist_ok=True)
    for sub in (d, d / "authorized"):
        sub.chmod(0o700)
    for old in [*(d / "authorized").glob("*.key"), *d.glob("client*.key"), *d.glob("client*.key_secret")]:
        old.unlink()
    made = {}
    with tempfile.TemporaryDirectory(dir=d) as tmp:  # 0700: no one else can open a file in it meanwhile
        for name in ["server", *(client_key_name(r) for r in range(clients))]:
            pub, sec = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
            sec.chmod(0o600)
            if name != "server":
                shutil.copyfile(pub, Path(tmp) / "authorized.key")
                os.replace(Path(tmp) / "authorized.key", d / "authorized" / pub.name)
            os.replace(pub, d / pub.name)
            os.replace(sec, d / sec.name)
            made[f"{name}_secret"] = d / sec.name
    made["server_public"] = d / "server.key"
    return made


class _Endpoint:
    def __init__(self, sock: zmq.Socket, max_bytes: int):
        self.sock, self.max_bytes = sock, max_bytes
        self.rejected: collections.Counter[str] = collections.Counter()
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def _wait(self, timeout_ms: int) -> bool:
        return bool(self.poller.poll(max(0, timeout_ms)))

    def pending(self) -> bool:
        """Whether a message is waiting to be received (never blocks)."""
        return self._wait(0)

    def _recv_frames(self, timeout_ms: int):
        """Yield each arriving multipart message until ``timeout_ms`` has passed in all."""
        deadline = time.monotonic() + timeout_ms / 1000
        while self._wait(int((deadline - time.monotonic()) * 1000)):
            yield self.sock.recv_multipart(copy=False)

    def close(self, linger_s: float = 0.0) -> None:
        """Close now; with ``linger_s``, messages still queued get at most that long to leave."""
        global _linger_until
        if not self.sock.closed:
            self.sock.close(linger=int(linger_s * 1000))
            _linger_until = max(_linger_until, time.monotonic() + linger_s)

    @property
    def address(self) -> str:
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def port(self) -> int:
        """The real TCP port, also after binding ``tcp://HOST:*``."""
        if not self.address.startswith("tcp://"):
            raise ValueError(f"{self.address} is not a tcp address: it has no port")
        return int(self.address.rsplit(":", 1)[1])


class ServerEndpoint(_Endpoint):
    """ROUTER, bound. ``recv`` returns ``(peer, Message)`` or None after ``timeout_ms``.

    Keyed (``curve_dir``): only clients that ``authorize(z85_key)`` admits, else those whose public key
    is in ``curve_dir/authorized/``, finish the handshake; ``Message.sender_key`` is the sender's key."""

    def __init__(self, bind: str, *, max_bytes: int, curve_dir: str | None = None, hwm: int = 1000,
                 authorize: Callable[[str], bool] | None = None):
        sock = bound_socket(zmq.ROUTER, bind, max_bytes=max_bytes, hwm=hwm, curve_dir=curve_dir, authorize=authorize)
        # a message to a vanished peer raises (and is logged below) instead of vanishing silently
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        super().__init__(sock, max_bytes)
        self.curve = bool(curve_dir)

    def recv(self, timeout_ms: int) -> tuple[bytes, wire.Message] | None:
        """The next valid message, or None after ``timeout_ms``. Never raises on bad input:
        a malformed message is logged, counted in ``rejected`` and answered with ``error``."""
        for frames in self._recv_frames(timeout_ms):
            peer = frames[0].bytes
            try:
                msg = wire.decode(frames[1:], max_bytes=self.max_bytes)
                if self.curve:  # ZAP's User-Id for an authenticated CURVE client: its public key (z85)
                    msg.sender_key = frames[-1].get("User-Id")
                return peer, msg
            except wire.WireError as e:
                self.rejected[e.reason] += 1
                logger.error(f"rejected a message from peer {peer.hex()[:8]}: {e}")
                self.send(peer, "error", {"reason": e.reason, "detail": e.detail[:200]})
        return None

    def send(self, peer: bytes, kind: str, fields=None, tensors=None, codec="none") -> int:
        """Queue a message for ``peer``; never blocks. Returns the bytes queued: 0 when the
        message was dropped (peer gone, or its queue full), which is logged."""
        frames = wire.encode(kind, fields, tensors, codec)
        try:
            self.sock.send_multipart([peer, *frames], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning(f"dropped a {kind} message to {peer.hex()[:8]}: its queue is full")
            return 0
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer disconnected
            logger.warning(f"dropped a {kind} message to {peer.hex()[:8]}: {e}")
            return 0
        return sum(memoryview(f).nbytes for f in frames)


class ClientEndpoint(_Endpoint):
    """DEALER, connecting (and reconnecting) to a server."""

    def __init__(self, connect: str, *, max_bytes: int, identity: bytes | None = None,
                 curve_dir: str | None = None, hwm: int = 1000, client_key: str = "client"):
        sock = _context().socket(zmq.DEALER)
        _configure(sock, max_bytes, hwm)
        sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        _curve_client(sock, curve_dir, client_key)
        sock.connect(connect)
        self.target = connect
        super().__init__(sock, max_bytes)

    def send(self, kind: str, fields=None, tensors=None, codec="none") -> int:
        frames = wire.encode(kind, fields, tensors, codec)
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            raise PeerError(f"could not send to {self.target} for {_SEND_TIMEOUT_MS // 1000}s: "
                            "the server is gone or not keeping up") from None
        return sum(memoryview(f).nbytes for f in frames)

    def recv(self, timeout_ms: int) -> wire.Message | None:
        """The next valid message, or None after ``timeout_ms``; bad ones are logged, counted, dropped."""
        for frames in self._recv_frames(timeout_ms):
            try:
                return wire.decode(frames, max_bytes=self.max_bytes)
            except wire.WireError as e:
                self.rejected[e.reason] += 1
                logger.error(f"rejected a message from {self.target}: {e}")
        return None


class Heartbeat:
    """Beats from a background thread on its own DEALER socket (zmq sockets are not thread-safe),
    so a worker stays alive to the server while its main thread computes a long step."""

    def __init__(self, address: str, *, rank: int, interval_s: float, max_bytes: int,
                 curve_dir: str | None = None, role: str = "worker", session: str | None = None,
                 client_key: str = "client"):
        self.address, self.rank, self.interval_s, self.role = address, rank, interval_s, role
        # the registration this process made: the server credits beats only to that registration, so a
        # restarted process (or a stranger) beating as the same rank cannot keep a dead one alive
        self.session = session
        self.max_bytes, self.curve_dir, self.client_key = max_bytes, curve_dir, client_key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)
        self.beats = 0

    def start(self) -> Heartbeat:
        # Made here, so a bad key directory raises in the caller; from now on only the thread
        # touches the socket (Thread.start() is the memory barrier zmq asks for on a hand-over).
        self._client = ClientEndpoint(self.address, max_bytes=self.max_bytes, curve_dir=self.curve_dir, hwm=10,
                                      client_key=self.client_key)
        self._client.sock.setsockopt(zmq.SNDTIMEO, 0)
        self._thread.start()
        return self

    def _run(self) -> None:
        client = self._client
        try:
            while not self._stop.is_set():
                try:
                    beat = {"rank": self.rank, "role": self.role}
                    if self.session:
                        beat["session"] = self.session
                    client.send("heartbeat", beat)
                    self.beats += 1
                except PeerError:
                    pass  # not connected yet, or queue full: the next beat tries again
                self._stop.wait(self.interval_s)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop beating and close the socket (waits at most one interval + 5 s)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
