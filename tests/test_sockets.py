"""Endpoints over real loopback sockets."""

import time

import msgpack
import numpy as np
import pytest
import zmq

from smolcluster.errors import ConfigError, PeerError
from smolcluster.keys import main as keys_main
from smolcluster.transport import (
    ClientEndpoint,
    Heartbeat,
    ServerEndpoint,
    make_keys,
    wire,
)

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
    # zero copy on receipt: the array is a view of zmq's frame memory, not a copy of it
    received = msg.tensors["float32"]
    root = received
    while isinstance(root, np.ndarray):
        root = root.base
    assert not received.flags.owndata and isinstance(root.obj, zmq.Frame) and root.nbytes == g.nbytes
    server.send(peer, "weights", {"step": 2, "version": 2}, {"float32": g * 2})
    back = client.recv(5000)
    assert back.kind == "weights" and np.array_equal(back.tensors["float32"], g * 2)
    client.close()


def test_recv_times_out_in_bounded_time(server):
    t0 = time.monotonic()
    assert server.recv(200) is None
    assert time.monotonic() - t0 > 0.15  # it did wait (not an instant None); a hang fails on pytest's timeout


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


def test_heartbeat_thread_beats_from_the_background(server):
    hb = Heartbeat(server.address, rank=7, interval_s=0.05, max_bytes=MB).start()
    beats = []
    deadline = time.monotonic() + 3
    while len(beats) < 5 and time.monotonic() < deadline:
        got = server.recv(500)
        if got:
            beats.append(got[1].fields["rank"])
    hb.stop()
    assert beats == [7] * 5


def test_curve_lets_only_authorised_clients_through(tmp_path):
    make_keys(tmp_path / "keys")
    make_keys(tmp_path / "other")  # a stranger's key pair, not in our authorized/
    (tmp_path / "other" / "server.key").write_bytes((tmp_path / "keys" / "server.key").read_bytes())
    s = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MB, curve_dir=str(tmp_path / "keys"))
    try:
        stranger = ClientEndpoint(s.address, max_bytes=MB, curve_dir=str(tmp_path / "other"))
        plain = ClientEndpoint(s.address, max_bytes=MB)
        for client, rank in ((stranger, 1), (plain, 2)):
            # Refused in the handshake, a DEALER may be left with no connection to queue on: its send then
            # times out (PeerError) rather than queueing. Either way nothing may reach the server.
            client.sock.setsockopt(zmq.SNDTIMEO, 1000)
            try:
                client.send("heartbeat", {"rank": rank})
            except PeerError:
                pass
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


def test_client_drops_and_counts_bad_replies_then_takes_a_good_one():
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = ClientEndpoint(f"tcp://127.0.0.1:{port}", max_bytes=MB)
    try:
        client.send("heartbeat", {"rank": 5})
        assert router.poll(3000)
        peer = router.recv_multipart()[0]
        router.send_multipart([peer, b"\xc1"])
        router.send_multipart([peer, msgpack.packb({"v": 1, "kind": "weights", "step": "x", "version": 0})])
        router.send_multipart([peer, *[bytes(f) for f in wire.encode("stop", {"reason": "done"})]])
        msg = client.recv(3000)
        assert msg.kind == "stop" and msg.fields == {"reason": "done"}
        assert client.rejected == {"bad_header": 1, "bad_field": 1}
    finally:
        client.close()
        router.close()


def test_sending_to_a_vanished_peer_is_dropped_not_raised(server):
    assert server.send(b"\0nobody", "stop", {"reason": "x"}) == 0


def test_heartbeat_with_missing_keys_fails_in_the_caller(tmp_path):
    with pytest.raises(ConfigError, match="smolcluster.keys"):
        Heartbeat("tcp://127.0.0.1:1", rank=0, interval_s=1, max_bytes=MB, curve_dir=str(tmp_path)).start()


def test_two_curve_servers_in_one_process_each_admit_only_their_own_clients(tmp_path):
    make_keys(tmp_path / "a")
    make_keys(tmp_path / "b")
    sa = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MB, curve_dir=str(tmp_path / "a"))
    sb = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MB, curve_dir=str(tmp_path / "b"))
    # a third server in the same process admits every key (as a node agent's pairing port did with
    # pyzmq's process-wide allow-any): that must not open a's or b's door to a stranger
    make_keys(tmp_path / "c")
    admitted = []
    sc = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MB, curve_dir=str(tmp_path / "c"),
                        authorize=lambda key: admitted.append(key) or True)
    # b's client, given a's server key: it can reach a's server but holds no key a lets in
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "server.key").write_bytes((tmp_path / "a" / "server.key").read_bytes())
    (tmp_path / "b2" / "client.key_secret").write_bytes((tmp_path / "b" / "client.key_secret").read_bytes())
    clients = [ClientEndpoint(sa.address, max_bytes=MB, curve_dir=str(tmp_path / "b2")),
               ClientEndpoint(sa.address, max_bytes=MB, curve_dir=str(tmp_path / "a")),
               ClientEndpoint(sb.address, max_bytes=MB, curve_dir=str(tmp_path / "b"))]
    try:
        clients[0].sock.setsockopt(zmq.SNDTIMEO, 1000)
        try:  # refused in the handshake: its send may time out rather than queue (see the test above)
            clients[0].send("heartbeat", {"rank": 0})
        except PeerError:
            pass
        for rank, c in enumerate(clients[1:], start=1):
            c.send("heartbeat", {"rank": rank})
        got_a, got_b = sa.recv(3000), sb.recv(3000)
        assert got_a[1].fields["rank"] == 1 and got_b[1].fields["rank"] == 2
        # the stranger's key reaches c, which admits it and names it as the sender
        (tmp_path / "b3").mkdir()
        (tmp_path / "b3" / "server.key").write_bytes((tmp_path / "c" / "server.key").read_bytes())
        (tmp_path / "b3" / "client.key_secret").write_bytes((tmp_path / "b" / "client.key_secret").read_bytes())
        clients.append(ClientEndpoint(sc.address, max_bytes=MB, curve_dir=str(tmp_path / "b3")))
        clients[-1].send("heartbeat", {"rank": 3})
        got_c = sc.recv(3000)
        stranger = (tmp_path / "b" / "client.key").read_text().split('public-key = "')[1].split('"')[0]
        assert got_c[1].fields["rank"] == 3 and got_c[1].sender_key == stranger and admitted == [stranger]
        # a fresh handshake with a, after c admitted every key: still refused
        late = ClientEndpoint(sa.address, max_bytes=MB, curve_dir=str(tmp_path / "b2"))
        clients.append(late)
        late.sock.setsockopt(zmq.SNDTIMEO, 1000)
        try:
            late.send("heartbeat", {"rank": 9})
        except PeerError:
            pass
        assert sa.recv(1000) is None
    finally:
        for c in clients:
            c.close()
        sa.close()
        sb.close()
        sc.close()


def test_keys_cli_makes_one_pair_per_worker_and_each_gets_in(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert keys_main(["--dir", str(keys), "--clients", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank 2: " in out and "client2.key_secret" in out and "server.key_secret" in out
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["client.key", "client1.key", "client2.key"]
    assert keys_main(["--dir", str(keys)]) == 2  # refuses to overwrite without --force
    server = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MB, curve_dir=str(keys))
    workers = []
    try:
        for i, name in enumerate(["client", "client1", "client2"]):
            node = tmp_path / f"worker{i}"  # what the printed instructions say to copy to worker i
            node.mkdir()
            (node / "server.key").write_bytes((keys / "server.key").read_bytes())
            (node / "client.key_secret").write_bytes((keys / f"{name}.key_secret").read_bytes())
            workers.append(ClientEndpoint(server.address, max_bytes=MB, curve_dir=str(node)))
            workers[-1].send("heartbeat", {"rank": i})
        ranks = sorted(server.recv(3000)[1].fields["rank"] for _ in workers)
        assert ranks == [0, 1, 2]
    finally:
        for w in workers:
            w.close()
        server.close()


def test_zmtp_heartbeats_never_cut_a_long_message(monkeypatch):
    """libzmq counts only whole messages as traffic, so a heartbeat timeout shorter than one
    transfer cuts the connection mid-message, forever. Shrink the floor and the transfer
    window so loopback shows it: with the timeout sized from max_bytes the message arrives;
    with a 5 ms timeout (what sizing ignoring max_bytes would give) it never does."""
    from smolcluster.transport import sockets

    big = np.ones(100_000_000, np.float32)  # 400 MB: far more than 10 ms on any loopback
    monkeypatch.setattr(sockets, "HEARTBEAT_IVL_MS", 5)
    monkeypatch.setattr(sockets, "HEARTBEAT_FLOOR_MS", 5)
    results = []
    # sized from max_bytes (given 30 s to arrive on a loaded machine); then "infinitely fast" (never arrives)
    for rate, wait_ms in ((sockets.MIN_LINK_BYTES_PER_S, 30_000), (1e15, 4000)):
        monkeypatch.setattr(sockets, "MIN_LINK_BYTES_PER_S", rate)
        s = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=1 << 30)
        c = ClientEndpoint(s.address, max_bytes=1 << 30)
        try:
            c.send("weights", {"step": 0, "version": 0}, {"w": big})
            got = s.recv(wait_ms)
            results.append(got is not None and got[1].tensors["w"].size == big.size)
        finally:
            c.close()
            s.close()
    assert results == [True, False]
