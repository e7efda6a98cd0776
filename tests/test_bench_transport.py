"""The transport benchmark's pickle baseline never unpickles bytes from a connection it did not make."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket

from smolcluster.bench import transport


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # unpickling this creates a file: proof that pickle.loads ran
        return (open, (self.path, "w"))


def test_a_foreign_connection_to_the_pickle_receiver_is_refused_unread(tmp_path):
    ctx = mp.get_context("spawn")
    ports, sender = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=transport._receiver, args=(1, ("pickle",), ports, sender), daemon=True)
    proc.start()
    try:
        _, _, pickle_port = ports.get(timeout=120)
        intruder = socket.create_connection(("127.0.0.1", pickle_port), timeout=30)
        data = pickle.dumps(_Evil(str(tmp_path / "pwned")))
        intruder.sendall(transport._LEN.pack(len(data)) + data)
        sender.put(("127.0.0.1", 1))  # the address the benchmark's own socket would have had
        proc.join(60)
        assert proc.exitcode not in (0, None)  # it refused, with a PermissionError
        assert not os.path.exists(tmp_path / "pwned")
        intruder.close()
    finally:
        if proc.is_alive():
            proc.kill()


def test_the_benchmark_itself_still_runs_all_four_ways():
    times = transport.run(transport.np.ones(1000, transport.np.float32), repeats=2)
    assert sorted(times) == sorted(transport.KINDS) and all(len(t) == 2 for t in times.values())
