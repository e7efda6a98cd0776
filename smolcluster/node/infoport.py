"""The agent's info port (control port + 1): public facts and the pairing exchange, bounded by construction.

Plain TCP, one JSON object per line, at most ``MAX_LINE`` bytes a line, ``MAX_TURNS`` requests and
``DEADLINE_S`` seconds per connection, ``MAX_CONNECTIONS`` connections at once (more are closed
on accept). Nothing a peer sends can grow the agent's memory past those bounds, which a ZeroMQ
socket cannot promise: libzmq buffers a multipart message until its last frame, and its
MAXMSGSIZE bounds a frame, not a message. Hand-written over :mod:`socketserver` because no
library serves "one bounded JSON line, one answer" with these limits; the control channel
(keys, roles) stays CURVE-encrypted ZeroMQ, open to paired keys only.

    node_hello {}                          -> node_info {name, version, protocol, facts..., key, port}
    pair_status {key}                      -> pair_state {state: paired|pending|unknown}
    pair_commit {key, commit, name}        -> pair_nonce {key, nonce}     (then, on the same connection:)
    pair_reveal {nonce}                    -> pair_state {state: pending|paired}
    anything else, or a refused request    -> refuse {reason}
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable

MAX_LINE = 4096
MAX_TURNS = 3
DEADLINE_S = 5.0
MAX_CONNECTIONS = 8


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # a socket timeout bounds each recv, not the connection (one byte per timeout would hold it open):
        # a timer cuts the connection at the deadline whatever the peer does
        cut = threading.Timer(DEADLINE_S, self._cut)
        cut.daemon = True
        cut.start()
        try:
            self._turns(time.monotonic() + DEADLINE_S)
        finally:
            cut.cancel()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _turns(self, deadline: float) -> None:
        session: dict = {"source": self.client_address[0]}
        for _ in range(MAX_TURNS):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.connection.settimeout(left)
            try:
                line = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return
            if not line.endswith(b"\n"):  # closed, or a line over MAX_LINE: nothing more is read
                return
            try:
                msg = json.loads(line)
                reply = self.server.answer(msg, session) if isinstance(msg, dict) else None
            except ValueError:
                reply = None
            reply = reply or {"kind": "refuse", "reason": "not a request this port answers"}
            try:
                self.wfile.write(json.dumps(reply).encode() + b"\n")
            except OSError:
                return
            if reply["kind"] == "refuse":
                return


class InfoPort(socketserver.ThreadingTCPServer):
    """Serves ``answer(request, session) -> reply`` on a thread of its own (``session``: per connection)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, answer: Callable[[dict, dict], dict | None]):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), _Handler)
        self.answer = answer
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                                       name="info-port")
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # at the cap: closed at once, nothing read
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def exchange(host: str, port: int, requests: list, timeout_s: float = 5.0) -> list[dict]:
    """Send each request (a dict, or a callable of the previous reply) on one connection; the replies, in order.
    Stops at a ``refuse``. OSError / ValueError when the agent is not there or answers nonsense."""
    replies: list[dict] = []
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        f = s.makefile("rwb")
        for req in requests:
            req = req(replies[-1]) if callable(req) else req
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            line = f.readline(1 << 16)
            if not line.endswith(b"\n"):
                raise ValueError("no answer")
            reply = json.loads(line)
            if not isinstance(reply, dict) or "kind" not in reply:
                raise ValueError("not an answer")
            replies.append(reply)
            if reply["kind"] == "refuse":
                break
    return replies
