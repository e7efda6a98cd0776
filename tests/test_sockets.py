"""Endpoints over real loopback sockets."""

import time

import msgpack
import numpy as np
import pytest
import zmq

from smolcluster.transport import ClientEndpoint, Heartbeat, Liveness, ServerEndpoint, make_keys, wire

MB = 1 << 20


@pytest.fixture
def server():
    s = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=64 * MB)
    yield s
    s.close()


def test_router_dealer_roundtrip_with_a_large_tensor(server):
    client = ClientEndpoint(server.address, max_bytes=64 * MB)
    g = np.random.default_rng(0).normal(size=4_000_000).astype(np.float32)
    sent = client.send("grad", {"rank": 0, "step": 1, "version": 1, "samples": 8, "loss": 1.5}, {"float32": g})
    peer, msg = server.recv(5000)
    assert sent == msg.nbytes and np.array_equal(msg.tensors["float32"], g)
    server.send(peer, "weights", {"step": 2, "version": 2}, {"float32": g * 2})
    back = client.recv(5000)
    assert back.kind == "weights" and np.array_equal(back.tensors["float32"], g * 2)
    client.close()


def test_recv_times_out_in_bounded_time(server):
    t0 = time.monotonic()
    assert server.recv(200) is None
    assert 0.15 < time.monotonic() - t0 < 2.0


def test_hostile_frames_are_counted_answered_and_the_server_keeps_serving(server):
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.address)
    good = {"v": 1, "kind": "grad", "rank": 0, "step": 0, "version": 0, "samples": 1, "loss": 0.1,
            "tensors": [{"name": "g", "dtype": "float32", "shape": [2], "codec": "none"}]}
    hostile = [
        [b"\x93garbage"],
        [msgpack.packb({**good, "kind": "nope"}), b"\0" * 8],
        [msgpack.packb(good), b"\0" * 7],
        [msgpack.packb(good)],
        [msgpack.packb({**good, "tensors": [{"name": "g", "dtype": "float128", "shape": [2], "codec": "none"}]}), b"\0" * 8],
        [msgpack.packb(good), np.array([np.nan, 1], np.float32).tobytes()],
    ]
    for frames in hostile:
        raw.send_multipart(frames)
    assert server.recv(1000) is None  # nothing valid arrived
    assert sum(server.rejected.values()) == len(hostile)
    assert server.rejected["truncated"] == 1 and server.rejected["non_finite"] == 1
    replies = []
    while raw.poll(1000):
        replies.append(wire.decode(raw.recv_multipart(), max_bytes=MB))
    assert [m.kind for m in replies] == ["error"] * len(hostile)
    assert {m.fields["reason"] for m in replies} >= {"bad_header", "unknown_kind", "shape_mismatch", "dtype"}
    raw.send_multipart([msgpack.packb(good), np.array([1, 2], np.float32).tobytes()])
    peer, msg = server.recv(2000)
    assert msg.kind == "grad" and msg.tensors["g"].tolist() == [1.0, 2.0]
    raw.close()


def test_oversize_messages_never_reach_the_application():
    s = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=1 * MB)
    c = ClientEndpoint(s.address, max_bytes=64 * MB)
    c.send("weights", {"step": 0, "version": 0}, {"w": np.zeros(MB, np.float32)})  # 4 MB > 1 MB limit
    assert s.recv(1000) is None  # zmq's MAXMSGSIZE drops the connection before decode
    c.close()
    c = ClientEndpoint(s.address, max_bytes=64 * MB)
    c.send("heartbeat", {"rank": 3})
    _, msg = s.recv(3000)
    assert msg.fields["rank"] == 3  # and the server still serves others
    c.close()
    s.close()


def test_heartbeat_thread_beats_and_liveness_notices_silence(server):
    hb = Heartbeat(server.address, rank=7, interval_s=0.05, max_bytes=MB).start()
    beats = []
    deadline = time.monotonic() + 3
    while len(beats) < 5 and time.monotonic() < deadline:
        got = server.recv(500)
        if got:
            beats.append(got[1].fields["rank"])
    hb.stop()
    assert beats == [7] * 5
    live = Liveness(timeout_s=1.0)
    live.beat("a", now=10.0)
    live.beat("b", now=10.8)
    assert live.lost(now=11.5) == ["a"] and live.lost(now=11.6) == []


def test_curve_lets_only_authorised_clients_through(tmp_path):
    make_keys(tmp_path / "keys")
    make_keys(tmp_path / "other")  # a stranger's key pair, not in our authorized/
    (tmp_path / "other" / "server.key").write_bytes((tmp_path / "keys" / "server.key").read_bytes())
    s = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MB, curve_dir=str(tmp_path / "keys"))
    try:
        stranger = ClientEndpoint(s.address, max_bytes=MB, curve_dir=str(tmp_path / "other"))
        plain = ClientEndpoint(s.address, max_bytes=MB)
        stranger.send("heartbeat", {"rank": 1})
        plain.send("heartbeat", {"rank": 2})
        assert s.recv(1500) is None
        friend = ClientEndpoint(s.address, max_bytes=MB, curve_dir=str(tmp_path / "keys"))
        friend.send("heartbeat", {"rank": 3})
        got = s.recv(3000)
        assert got is not None and got[1].fields["rank"] == 3
        assert s.recv(500) is None  # the others never got through
        for c in (stranger, plain, friend):
            c.close()
    finally:
        s.close()


def test_binding_a_used_port_is_a_clear_error(server):
    from smolcluster.errors import PeerError

    with pytest.raises(PeerError, match="cluster.port"):
        ServerEndpoint(server.address, max_bytes=MB)
