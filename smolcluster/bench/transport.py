"""``python -m smolcluster.bench transport``: a GPT-2-sized tensor through our wire vs raw pyzmq vs pickle.

The sender (this process) sends ``--floats`` float32 values (default 124M, GPT-2 small's
parameter count, 496 MB) to a receiver in a second process (``multiprocessing`` with
*spawn*: a real separate interpreter and a real TCP connection over loopback, as between
two machines, minus the NIC). The receiver gets the tensor, turns it into a torch tensor
and acknowledges; the sender times send -> ack. Four ways, in the same run:

- ``raw pyzmq``: DEALER -> ROUTER ``send(copy=False)`` / ``recv(copy=False)`` + ``np.frombuffer``,
  the floor any zmq transport can reach.
- ``smolcluster weights``: ClientEndpoint -> ServerEndpoint, kind ``weights`` (msgpack header,
  schema checks, zero-copy view), the path the parameter server uses.
- ``smolcluster grad``: the same, kind ``grad``, which also proves every value finite on receipt.
- ``pickle``: ``pickle.dumps(torch tensor)`` over a plain TCP ``socket``, length-prefixed, and
  ``pickle.loads`` on the other side: what many hand-rolled toolkits do. This benchmark
  baseline is the ONLY place in smolcluster that pickles anything; the product never does.
  Even here the receiver unpickles only from the one connection its parent made: the parent
  tells it that socket's address through the process's own queue (not the network), and a
  connection from anywhere else is refused before a byte of it is read.

The kinds take turns, message by message (round-robin, the order rotated each round), so
background load on a shared machine and the after-effects of the previous message hit them
alike; the first round warms the connections up and is not timed.
We report the median per kind. Memory: the payload once in the sender, one received
copy per kind in the receiver, pickle's transient copies: ~3.5 GB at the default size.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import socket
import statistics
import struct
import time

import numpy as np
import torch

from smolcluster.bench.report import write_report
from smolcluster.transport import ClientEndpoint, ServerEndpoint

# only transport imports zmq; the raw baseline borrows its module object
from smolcluster.transport.sockets import zmq

KINDS = ("raw pyzmq", "smolcluster weights", "smolcluster grad", "pickle")
MAX = 4 << 30
_LEN = struct.Struct("!Q")


def _turn(kinds: tuple[str, ...], i: int) -> tuple[str, ...]:
    """Round ``i``'s order: rotated by one each round, so every kind sits in every position
    equally often (whoever follows pickle's big frees pays for it otherwise)."""
    k = i % len(kinds)
    return kinds[k:] + kinds[:k]


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the sender closed the connection")
        got += k
    return buf


def _receiver(rounds: int, kinds: tuple[str, ...], ports, sender) -> None:
    """Bind all three servers, report their ports, then serve ``rounds`` x ``kinds`` messages in turn."""
    ours = ServerEndpoint("tcp://127.0.0.1:*", max_bytes=MAX)
    raw = zmq.Context.instance().socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, 0)
    raw_port = raw.bind_to_random_port("tcp://127.0.0.1")
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put((ours.port, raw_port, listener.getsockname()[1]))
    listener.settimeout(120)
    conn, addr = listener.accept()
    expected = tuple(sender.get(timeout=120))  # the address of the parent's own socket
    if addr != expected:
        conn.close()
        raise PermissionError(f"pickle baseline: a connection from {addr}, not the benchmark's {expected}; "
                              "refused unread (pickle.loads runs only on the benchmark's own bytes)")
    conn.settimeout(600)
    try:
        for i in range(rounds):
            for kind in _turn(kinds, i):
                if kind == "raw pyzmq":
                    if not raw.poll(600_000):
                        raise TimeoutError("raw pyzmq: nothing arrived")
                    frames = raw.recv_multipart(copy=False)
                    t = torch.from_numpy(np.frombuffer(frames[2].buffer, dtype=np.float32))
                    raw.send_multipart([frames[0], str(t.shape[0]).encode()])
                elif kind == "pickle":
                    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
                    t = pickle.loads(_recv_exact(conn, n))  # benchmark baseline only (see module doc)
                    conn.sendall(_LEN.pack(t.shape[0]))
                else:
                    got = ours.recv(600_000)
                    if got is None:
                        raise TimeoutError(f"{kind}: nothing arrived")
                    peer, msg = got
                    t = msg.tensor("w")
                    ours.send(peer, "heartbeat", {"rank": int(t.shape[0] > 0)})
                del t
    finally:
        time.sleep(0.2)  # let the last acks leave before linger=0 closes
        conn.close()
        listener.close()
        raw.close(linger=0)
        ours.close()


def run(payload: np.ndarray, repeats: int, kinds: tuple[str, ...] = KINDS) -> dict[str, list[float]]:
    """Seconds per send -> ack, per kind, ``repeats`` times each (after one untimed round)."""
    ctx = mp.get_context("spawn")
    ports, sender = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(repeats + 1, kinds, ports, sender), daemon=True)
    proc.start()
    ours_port, raw_port, pickle_port = ports.get(timeout=120)
    client = ClientEndpoint(f"tcp://127.0.0.1:{ours_port}", max_bytes=MAX)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"tcp://127.0.0.1:{raw_port}")
    conn = socket.create_connection(("127.0.0.1", pickle_port), timeout=600)
    sender.put(conn.getsockname())  # only this connection's bytes are ever unpickled
    tensor = torch.from_numpy(payload)  # shares the payload's memory
    grad = {"rank": 0, "samples": 1, "loss": 0.0}

    def once(kind: str, i: int) -> None:
        if kind == "raw pyzmq":
            raw.send_multipart([b"w", payload], copy=False)
            if not raw.poll(600_000):
                raise TimeoutError("raw pyzmq: no ack")
            raw.recv_multipart()
        elif kind == "pickle":
            data = pickle.dumps(tensor, protocol=pickle.HIGHEST_PROTOCOL)
            conn.sendall(_LEN.pack(len(data)))
            conn.sendall(data)
            del data
            _recv_exact(conn, _LEN.size)
        else:
            if kind == "smolcluster weights":
                client.send("weights", {"step": i, "version": i}, {"w": payload})
            else:
                client.send("grad", {"step": i, "version": i, **grad}, {"w": payload})
            if client.recv(600_000) is None:
                raise TimeoutError(f"{kind}: no ack")

    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for i in range(repeats + 1):
            for kind in _turn(kinds, i):
                t0 = time.perf_counter()
                once(kind, i)
                if i:  # round 0: connection set-up, first touch of the pages
                    times[kind].append(time.perf_counter() - t0)
    finally:
        client.close()
        raw.close(linger=0)
        conn.close()
        proc.join(60)
    return times


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--floats", type=int, default=124_000_000, help="float32 values per message (default 124M)")
    p.add_argument("--repeats", type=int, default=8, help="timed messages per kind (default 8)")
    args = p.parse_args(argv)
    payload = np.random.default_rng(0).standard_normal(args.floats, dtype=np.float32)
    times = run(payload, args.repeats)
    rate = {k: payload.nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    raw, ours = rate["raw pyzmq"], rate["smolcluster weights"]
    rows = [{"transport": k, "GB_per_s": rate[k], "best_GB_per_s": payload.nbytes / min(times[k]) / 1e9,
             "median_s": statistics.median(times[k]), "vs_raw_pyzmq": rate[k] / raw, "vs_pickle": rate[k] / rate["pickle"]}
            for k in KINDS]
    write_report("transport", rows, {
        "payload_MB": payload.nbytes / 1e6, "repeats": args.repeats,
        "ours_vs_raw": ours / raw, "ours_vs_pickle": ours / rate["pickle"],
        "grad_vs_raw": rate["smolcluster grad"] / raw, "goal": "ours >= 0.9x raw pyzmq",
        "met": ours >= 0.9 * raw, "times_s": times,
    })
    return 0
