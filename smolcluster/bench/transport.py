"""``python -m smolcluster.bench transport``: a GPT-2-sized payload through our wire vs raw pyzmq vs pickle.

One process sends ``--floats`` float32 values (default 124M, GPT-2 small) ``--repeats``
times to a second process, which receives, views the tensor and acknowledges; the
sender times the round trips. Three ways, same run, same processes:

- ``smolcluster``: ClientEndpoint -> ServerEndpoint (msgpack header, schema checks, zero-copy view)
- ``raw pyzmq``: DEALER -> ROUTER ``send(copy=False)`` / ``recv(copy=False)`` + ``np.frombuffer``
- ``pickle``: ``multiprocessing.connection`` over TCP, which pickles the tensor — what many
  toolkits do. (Only this benchmark baseline pickles; smolcluster never does.)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from multiprocessing.connection import Client, Listener

import numpy as np

from smolcluster.bench.report import write_report
from smolcluster.cluster import free_port
from smolcluster.transport import ClientEndpoint, ServerEndpoint
from smolcluster.transport.sockets import (
    zmq,  # the transport package owns zmq; the raw baseline borrows it
)

MAX = 4 << 30


def _receiver(kind: str, port: int, repeats: int, ready) -> None:
    if kind == "smolcluster":
        server = ServerEndpoint(f"tcp://127.0.0.1:{port}", max_bytes=MAX)
        ready.set()
        for _ in range(repeats):
            peer, msg = server.recv(600_000)
            t = msg.tensor("w")
            server.send(peer, "heartbeat", {"rank": int(t.shape[0] > 0)})
        time.sleep(0.2)
        server.close()
    elif kind == "raw pyzmq":
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{port}")
        ready.set()
        for _ in range(repeats):
            frames = sock.recv_multipart(copy=False)
            arr = np.frombuffer(frames[2].buffer, dtype=np.float32)
            sock.send_multipart([frames[0], str(arr.shape[0]).encode()])
        time.sleep(0.2)
        sock.close()
    else:
        with Listener(("127.0.0.1", port)) as listener:
            ready.set()
            with listener.accept() as conn:
                for _ in range(repeats):
                    t = conn.recv()
                    conn.send(t.shape[0])


def _send_all(kind: str, port: int, payload: np.ndarray, repeats: int) -> float:
    """Send ``repeats + 1`` times on one connection; time all but the first (connection set-up, first touch)."""
    if kind == "smolcluster":
        client = ClientEndpoint(f"tcp://127.0.0.1:{port}", max_bytes=MAX)

        def once(i):
            client.send("weights", {"step": i, "version": i}, {"w": payload})
            assert client.recv(600_000) is not None

        close = client.close
    elif kind == "raw pyzmq":
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")

        def once(i):
            sock.send_multipart([b"w", payload], copy=False)
            sock.recv_multipart()

        close = sock.close
    else:
        # a numpy array: a torch tensor would go through torch's shared-memory reducer instead
        conn = Client(("127.0.0.1", port))

        def once(i):
            conn.send(payload)
            conn.recv()

        close = conn.close
    once(0)
    t0 = time.perf_counter()
    for i in range(repeats):
        once(i + 1)
    elapsed = time.perf_counter() - t0
    close()
    return elapsed


def measure(kind: str, payload: np.ndarray, repeats: int) -> float:
    """GB/s from this process to a fresh receiver process."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port = free_port()
    proc = ctx.Process(target=_receiver, args=(kind, port, repeats + 1, ready))
    proc.start()
    ready.wait(120)
    elapsed = _send_all(kind, port, payload, repeats)
    proc.join(60)
    return repeats * payload.nbytes / elapsed / 1e9


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench transport", description=__doc__)
    p.add_argument("--floats", type=int, default=124_000_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    payload = np.random.default_rng(0).standard_normal(args.floats, dtype=np.float32)
    rates = {}
    for kind in ("raw pyzmq", "smolcluster", "pickle"):
        rates[kind] = measure(kind, payload, args.repeats)
    rows = [{"transport": k, "GB_per_s": v, "vs_raw_pyzmq": v / rates["raw pyzmq"]} for k, v in rates.items()]
    write_report("transport", rows, {"payload_MB": payload.nbytes / 1e6, "repeats": args.repeats,
                                     "ours_vs_raw": rates["smolcluster"] / rates["raw pyzmq"],
                                     "ours_vs_pickle": rates["smolcluster"] / rates["pickle"], "goal": "ours >= 0.9x raw"})
    return 0
