"""An endless multipart message against every listening port of keyed roles, as real processes on loopback.

libzmq buffers a multipart message until its last frame and ``MAXMSGSIZE`` bounds each frame,
not the message, so a peer that may send frames at all can grow a socket's memory without end.
The fence is CURVE with an allowlist (``cluster.keys``): a peer without an authorized key never
finishes the handshake, so it can send no frame. Each test starts a keyed role (a syncps server,
an allreduce ring rank, two pipeline stages), then on every TCP port the process listens on:

- a raw TCP peer speaks ZMTP 3 with the NULL mechanism and streams 60 KB MORE frames that never
  end, up to ``STREAM_BYTES``: the server must disconnect it long before that;
- a zmq socket with a fresh CURVE key that is not authorized gets its handshake refused (its
  monitor reports ``HANDSHAKE_FAILED_AUTH``; it never reports success).

The role's RSS must stay within ``RSS_BOUND`` of what it was before, and it must keep serving a
real client afterwards (training steps advance; the stages answer a keyed head).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import psutil
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from smolcluster.data.text import TextTokenizer
from smolcluster.inference import InferencePipeline
from smolcluster.launch.local import free_ports
from smolcluster.transport import make_keys
from smolcluster.transport.pubsub import SUBSCRIPTION_MAX_BYTES, Inbox, Outbox
from smolcluster.transport.ring import RingLink
from smolcluster.transport.sockets import ServerEndpoint
from tests.cluster_util import Cluster
from tests.conftest import REPO, wait_until
from tests.test_openai_api import write_tiny_run

STREAM_BYTES = 300 * 2**20   # what the raw peer would send if nobody stopped it
FRAME = 60 * 1024            # under every socket's MAXMSGSIZE: only the message never ends
RSS_BOUND = 64 * 2**20       # what the attacks may add to a role's resident memory
TRAIN = ["train.steps=100000", "cluster.heartbeat_s=0.2", "cluster.liveness_s=5", "cluster.connect_timeout_s=60",
         "cluster.nodes=[{delay_s: 0.02},{delay_s: 0.02}]", "train.log_every=5"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    make_keys(d, clients=2)
    return d


def greeting(mechanism: bytes = b"NULL") -> bytes:
    """ZMTP 3.0's 64-byte greeting (signature, version, mechanism, as-server, filler)."""
    return b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def ready(socket_type: bytes) -> bytes:
    """NULL's READY command naming our socket type."""
    prop = b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    body = b"\x05READY" + prop
    return b"\x04" + bytes([len(body)]) + body


def raw_endless_multipart(port: int, socket_type: bytes, total: int = STREAM_BYTES) -> tuple[int, bool]:
    """Stream one never-ending multipart message to ``port``; (bytes sent, whether the server cut us off)."""
    frame = b"\x03" + struct.pack(">Q", FRAME) + b"\x00" * FRAME  # MORE | LONG, 60 KB of body
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            # a real peer's handshake, in order: frames sent before the server's READY are read as handshake
            # commands and refused (ZMTP_UNEXPECTED_COMMAND), which would make a cut-off of a race
            sock.sendall(greeting())
            if not read_exactly(sock, 64):  # the server's greeting (a keyed one names CURVE, then hangs up)
                return sent, True
            sock.sendall(ready(socket_type))
            head = read_exactly(sock, 2)  # the server's READY: flags, size, body
            if not head or not read_exactly(sock, head[1]):
                return sent, True
            while sent < total:
                sock.sendall(frame)
                sent += len(frame)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return sent, True
    return sent, False


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``, or b"" once the peer hung up."""
    out = b""
    try:
        while len(out) < n:
            part = sock.recv(n - len(out))
            if not part:
                return b""
            out += part
    except ConnectionResetError:
        return b""
    return out


def unauthorized_curve_peer(port: int, server_public: bytes, sock_type: int) -> list[int]:
    """A zmq peer with a fresh CURVE key (not in authorized/) pushing 60 KB MORE frames; the handshake
    events its monitor reports until the first verdict."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10)
    sock.curve_serverkey = server_public
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    verdicts = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED
    mon = sock.get_monitor_socket(verdicts)
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(100):
            try:
                sock.send(b"\x00" * FRAME, zmq.SNDMORE | zmq.NOBLOCK)
            except zmq.Again:
                break  # nothing leaves: the queue to an unconnected peer is full
        assert mon.poll(30_000), f"port {port}: no handshake verdict within 30 s"
        return [recv_monitor_message(mon)["event"]]
    finally:
        sock.disable_monitor()
        mon.close(0)
        sock.close(0)


def listening_ports(pid: int) -> list[int]:
    return sorted({c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN})


def attack(pid: int, keys_dir, raw_type: bytes, curve_type: int) -> dict:
    """Both attacks on every listening port of ``pid``; its RSS before and after, and what each port did."""
    proc = psutil.Process(pid)
    ports = listening_ports(pid)
    assert ports, f"process {pid} listens on no TCP port"
    server_public, _ = zmq.auth.load_certificate(str(keys_dir / "server.key"))
    before = proc.memory_info().rss
    out = {"ports": ports, "before": before}
    for port in ports:
        sent, cut = raw_endless_multipart(port, raw_type)
        assert cut and sent < STREAM_BYTES, f"port {port}: a keyless peer streamed {sent >> 20} MiB and was not cut off"
        events = unauthorized_curve_peer(port, server_public, curve_type)
        assert events == [zmq.EVENT_HANDSHAKE_FAILED_AUTH], f"port {port}: an unauthorized key got {events}"
        out[port] = sent
    out["after"] = proc.memory_info().rss
    assert out["after"] - before < RSS_BOUND, \
        f"RSS grew {(out['after'] - before) >> 20} MiB under the attacks (bound {RSS_BOUND >> 20} MiB): {out}"
    return out


def test_every_listening_socket_bounds_a_frame_with_maxmsgsize(keys):
    """The per-frame bound that libzmq does have: each listening socket type sets it to its max_bytes."""
    base = free_ports("127.0.0.1", 3)
    server = ServerEndpoint(f"tcp://127.0.0.1:{base}", max_bytes=5 << 20, curve_dir=str(keys))
    inbox = Inbox(f"tcp://127.0.0.1:{base + 1}", ["s0/"], 6 << 20, keys_dir=str(keys))
    ring = RingLink(0, [f"tcp://127.0.0.1:{base + 2}"], f"tcp://127.0.0.1:{base + 2}", max_bytes=7 << 20,
                    heartbeat_s=0.2, liveness_s=5, keys_dir=str(keys))
    outbox = Outbox(str(keys))
    try:
        assert server.sock.getsockopt(zmq.MAXMSGSIZE) == 5 << 20
        assert inbox.sock.getsockopt(zmq.MAXMSGSIZE) == 6 << 20
        assert ring.inbox.getsockopt(zmq.MAXMSGSIZE) == 7 << 20
        assert outbox.sock.getsockopt(zmq.MAXMSGSIZE) == SUBSCRIPTION_MAX_BYTES  # a PUB only hears topics
    finally:
        for s in (server, inbox, outbox):
            s.close()
        ring.close()


def test_without_keys_the_raw_peer_streams_on_unchecked(tmp_path):
    """The control (and the hole a keyless run leaves to local processes): a keyless socket takes the
    peer's frames as a valid ZMTP peer's, buffering the unfinished message, and never cuts it off."""
    port = free_ports("127.0.0.1", 1)
    server = ServerEndpoint(f"tcp://127.0.0.1:{port}", max_bytes=5 << 20)
    try:
        sent, cut = raw_endless_multipart(port, b"DEALER", total=32 << 20)
        assert not cut and sent >= 32 << 20
        assert not server.pending()  # the message never ends, so nothing is delivered: it only grows
    finally:
        server.close()


def last_step(c: Cluster) -> int:
    rows = c.metrics()
    return rows[-1]["step"] if rows else -1


def test_a_syncps_server_keeps_its_memory_and_serving_under_endless_multipart(tmp_path, keys):
    with Cluster(tmp_path / "ps", "syncps", *TRAIN, f"cluster.keys={keys}", workers=1) as c:
        server = c.server()
        c.worker(0)
        c.wait_for_step(5)
        attack(server.pid, keys, b"DEALER", zmq.DEALER)
        c.wait_for_step(last_step(c) + 1)  # a new metrics row: the real worker is still served


def test_a_ring_rank_keeps_its_memory_and_serving_under_endless_multipart(tmp_path, keys):
    port = free_ports("127.0.0.1", 2)
    with Cluster(tmp_path / "ring", "allreduce", *TRAIN, f"cluster.keys={keys}", workers=2, port=port) as c:
        rank0 = c.worker(0)
        c.worker(1)
        c.wait_for_step(5)
        attack(rank0.pid, keys, b"DEALER", zmq.DEALER)
        c.wait_for_step(last_step(c) + 1)  # the ring still turns


def test_pipeline_stages_keep_their_memory_and_serve_a_head_under_endless_multipart(tmp_path, keys):
    run_dir = write_tiny_run(tmp_path / "run", n_positions=128)
    port = free_ports("127.0.0.1", 2)
    common = [f"checkpoint={run_dir}", "stages=2", f"cluster.port={port}", "cluster.heartbeat_s=0.2",
              "cluster.liveness_s=5", f"cluster.keys={keys}"]
    logs = [(tmp_path / f"stage{r}.log").open("w") for r in range(2)]
    stages = [subprocess.Popen([sys.executable, "-m", "smolcluster.infer", "role=stage", f"rank={r}", *common],
                               cwd=REPO, stdout=logs[r], stderr=subprocess.STDOUT) for r in range(2)]
    try:
        for r, s in enumerate(stages):
            assert wait_until(lambda s=s: s.poll() is not None or listening_ports(s.pid), timeout_s=120), \
                f"stage {r} did not listen; see {logs[r].name}"
            assert s.poll() is None, f"stage {r} exited {s.returncode}; see {logs[r].name}"
        for s in stages:  # a stage's inbox is a SUB: the peers speak PUB
            attack(s.pid, keys, b"PUB", zmq.PUB)
        # a keyed head (in this process) is served: greedy tokens, as many as asked
        head = InferencePipeline.connect([f"tcp://127.0.0.1:{port + r}" for r in range(2)], heartbeat_s=0.2,
                                         liveness_s=5, keys_dir=str(keys),
                                         tokenizer=TextTokenizer.load(run_dir / "tokenizer.json"))
        try:
            req = head.submit("Hello", max_new_tokens=5, stop_at_eos=False)
            assert req.text() and req.finish_reason == "length"
        finally:
            head.close()
        assert [s.poll() for s in stages] == [None, None]
    finally:
        for s in stages:
            s.kill()
            s.wait(timeout=20)
        for f in logs:
            f.close()
