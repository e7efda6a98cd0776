"""The Loki sink against real HTTP receivers: the payload contract, a real cluster, a dead or
slow Loki (training must never wait for it), and retries."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from loguru import logger

from smolcluster.cluster import free_port
from smolcluster.telemetry.logging import loki_sink, setup_logging
from smolcluster.telemetry.loki import STREAM_LABELS
from tests.conftest import REPO, train

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -c SCRIPT ARGS`` from the repo root (conftest's run_cli runs modules); the timeout is a hang guard."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


class Receiver:
    """A stand-in for Loki on 127.0.0.1: records every push and answers with the next scripted
    status (then 204). ``delay_s`` holds each answer back (a slow Loki); ``release`` ends holds."""

    def __init__(self, statuses=(), delay_s: float = 0.0):
        self.statuses, self.delay_s = list(statuses), delay_s
        self.pushes: list[dict] = []
        self.lock, self.release = threading.Lock(), threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    status = outer.statuses.pop(0) if outer.statuses else 204
                    outer.pushes.append({"path": self.path, "headers": dict(self.headers), "raw": raw,
                                         "status": status})
                if outer.delay_s:
                    outer.release.wait(outer.delay_s)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up waiting: that is the point of a slow receiver

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def streams(self, accepted_only: bool = True) -> list[dict]:
        with self.lock:
            pushes = [p for p in self.pushes if p["status"] < 300 or not accepted_only]
        return [s for p in pushes for s in json.loads(gzip.decompress(p["raw"]))["streams"]]

    def lines(self) -> list[tuple[dict, int, str]]:
        return [(s["stream"], int(ts), line) for s in self.streams() for ts, line in s["values"]]


@pytest.fixture(autouse=True)
def plain_logging():
    yield
    setup_logging()  # closes the test's Loki sink, back to the console only


def loki_cfg(url: str, **kw) -> dict:
    return {"url": url, "batch_size": 100, "flush_interval_s": 0.05, "queue_size": 1000, "timeout_s": 2.0,
            "max_retries": 3, **kw}


@pytest.mark.timeout(30)
def test_payload_matches_the_loki_push_api_and_the_label_contract():
    with Receiver() as rx:
        setup_logging(node="n1", role="worker", rank=1, algo="syncps", run_id="r42", loki=loki_cfg(rx.url))
        t0 = time.time_ns()
        for i in range(250):
            logger.info(f"step {i}")
        logger.warning("a warning")
        logger.bind(role="server", rank="").success("from the server")
        logger.bind(no_loki=True).info("kept off Loki")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            logger.exception("it failed")
        t1 = time.time_ns()
        sink = loki_sink()
        setup_logging()  # closes the sink: everything queued is pushed first
        assert sink.stats() == {"sent": 253, "dropped": 0, "queued": 0}

        assert rx.pushes and all(p["path"] == "/loki/api/v1/push" for p in rx.pushes)
        for p in rx.pushes:
            assert p["headers"]["Content-Type"] == "application/json"
            assert p["headers"]["Content-Encoding"] == "gzip"
        streams = rx.streams()
        for s in streams:
            assert set(s["stream"]) == set(STREAM_LABELS)
            assert s["stream"]["job"] == "smolcluster" and s["stream"]["run_id"] == "r42"
            stamps = [ts for ts, _ in s["values"]]
            assert all(re.fullmatch(r"\d{19}", ts) for ts in stamps)
            assert [int(ts) for ts in stamps] == sorted(int(ts) for ts in stamps)
            # the record's own time (microsecond resolution), not the time it was sent
            assert all(t0 - 1000 <= int(ts) <= t1 for ts in stamps)
        labels = {tuple(s["stream"][k] for k in STREAM_LABELS) for s in streams}
        assert labels == {("smolcluster", "r42", "n1", "worker", "1", "syncps", "INFO"),
                          ("smolcluster", "r42", "n1", "worker", "1", "syncps", "WARNING"),
                          ("smolcluster", "r42", "n1", "server", "", "syncps", "SUCCESS"),
                          ("smolcluster", "r42", "n1", "worker", "1", "syncps", "ERROR")}
        lines = [line for _, _, line in rx.lines()]
        info = [x for x in lines if x.startswith("INFO step ")]
        assert info == [f"INFO step {i}" for i in range(250)]
        assert "WARNING a warning" in lines and "SUCCESS from the server" in lines
        error = next(x for x in lines if x.startswith("ERROR it failed"))
        assert "Traceback" in error and "ZeroDivisionError: division by zero" in error
        assert not any("kept off Loki" in x or "\x1b[" in x for x in lines)


def test_values_are_sorted_by_record_time_and_static_labels_are_added():
    with Receiver() as rx:
        setup_logging(loki=loki_cfg(rx.url, labels={"cluster": "lab"}))
        sink = loki_sink()
        now = datetime.now(timezone.utc)
        key = ("r", "n", "worker", "0", "syncps", "INFO")
        batch = [(key, now + timedelta(microseconds=5), "late"), (key, now, "early")]
        (stream,) = sink.payload(batch)["streams"]
        assert [line for _, line in stream["values"]] == ["early", "late"]
        assert int(stream["values"][1][0]) - int(stream["values"][0][0]) == 5000
        assert stream["stream"] == {"cluster": "lab", "job": "smolcluster", "run_id": "r", "node": "n",
                                    "role": "worker", "rank": "0", "algo": "syncps", "level": "INFO"}


@pytest.mark.timeout(120)
def test_every_node_of_a_local_syncps_cluster_pushes_its_lines(tmp_path):
    with Receiver() as rx:
        train(tmp_path, "algo=syncps", "cluster.workers=2", "train.steps=30", f"logging.loki.url={rx.url}",
              "logging.loki.flush_interval_s=0.2", *FAST, timeout=100)
        labels = [s["stream"] for s in rx.streams()]
    assert {lb["run_id"] for lb in labels} != {""} and len({lb["run_id"] for lb in labels}) == 1
    assert {lb["algo"] for lb in labels} == {"syncps"}
    assert {(lb["role"], lb["rank"]) for lb in labels} >= {("server", ""), ("worker", "0"), ("worker", "1")}
    lines = [line for _, _, line in rx.lines()]
    assert any("registered with" in x for x in lines)


# A process that logs N lines to a Loki that cannot keep up, then exits without closing
# anything itself (the atexit hook must). It prints how many calls returned, the sink's
# counts then, and (from an atexit hook that runs after the sink's) the final counts.
DEAD_LOKI_SCRIPT = textwrap.dedent("""
    import atexit, json, sys
    from loguru import logger
    from smolcluster.telemetry.logging import loki_sink, setup_logging

    url, n = sys.argv[1], int(sys.argv[2])
    atexit.register(lambda: print("final", json.dumps(loki_sink().stats()), flush=True))
    setup_logging(role="worker", rank=0, run_id="dead", loki={
        "url": url, "queue_size": 50, "batch_size": 10, "flush_interval_s": 0.05, "timeout_s": 0.3,
        "max_retries": 2})
    for i in range(n):
        logger.info(f"line {i}")
    print("returned", n, flush=True)
    print("running", json.dumps(loki_sink().stats()), flush=True)
""")


def log_then_exit(url: str, n: int) -> tuple[dict, dict, str]:
    proc = run_script("-c", DEAD_LOKI_SCRIPT, url, str(n), timeout=60)  # the sink must let it exit
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out["returned"] == str(n)  # every logger.info call came back
    return json.loads(out["running"]), json.loads(out["final"]), proc.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("loki", ["closed port", "slow receiver"])
def test_a_dead_or_slow_loki_drops_and_counts_lines_and_never_blocks(loki):
    n, queue_size, batch_size = 2000, 50, 10
    if loki == "closed port":
        running, final, stderr = log_then_exit(f"http://127.0.0.1:{free_port()}", n)
    else:
        with Receiver(delay_s=5.0) as rx:  # answers long after timeout_s=0.3
            running, final, stderr = log_then_exit(rx.url, n)
            assert rx.pushes  # it did accept the connections
    # Whatever is not in the queue or in flight was dropped, not buffered.
    assert running["sent"] == 0 and running["queued"] <= queue_size
    assert running["dropped"] >= n - queue_size - batch_size
    # At exit what was left is dropped too; only a batch still in flight may be uncounted.
    assert final["sent"] == 0 and n - batch_size <= final["dropped"] <= n
    counts = [int(c) for c in re.findall(r"loki: dropped (\d+) log lines", stderr)]
    assert counts and counts == sorted(counts)  # logged each time it grew
    assert final["dropped"] - batch_size <= counts[-1] <= final["dropped"]  # (a batch may fail after)


@pytest.mark.timeout(30)
def test_drop_warnings_reach_the_console_but_never_loki(capfd):
    with Receiver(delay_s=20.0) as rx:  # holds every push until released
        setup_logging(loki=loki_cfg(rx.url, queue_size=20, batch_size=10, timeout_s=20.0))
        for i in range(500):
            logger.info(f"burst {i}")
        sink = loki_sink()
        assert sink.stats()["dropped"] >= 500 - 20 - 10
        rx.release.set()
        setup_logging()
        assert sink.stats()["sent"] + sink.stats()["dropped"] == 500
        assert all(line.startswith("INFO burst ") for _, _, line in rx.lines())
    assert f"loki: dropped {sink.stats()['dropped']} log lines" in capfd.readouterr().err


@pytest.mark.timeout(30)
def test_server_errors_are_retried_with_backoff_and_the_batch_arrives_once():
    with Receiver(statuses=[500, 500]) as rx:
        # a batch is pushed when full (three lines) or after 60 s: the three lines make one batch
        setup_logging(loki=loki_cfg(rx.url, batch_size=3, flush_interval_s=60.0))
        for i in range(3):
            logger.info(f"retry me {i}")
        sink = loki_sink()
        while sink.stats()["sent"] < 3:  # the test's timeout is the hang guard
            time.sleep(0.05)
        setup_logging()
        assert [p["status"] for p in rx.pushes] == [500, 500, 204]
        assert len({p["raw"] for p in rx.pushes}) == 1  # the same batch each time
        assert [line for _, _, line in rx.lines()] == [f"INFO retry me {i}" for i in range(3)]
        assert sink.stats() == {"sent": 3, "dropped": 0, "queued": 0}


@pytest.mark.timeout(30)
def test_a_client_error_is_not_retried_and_its_lines_are_counted_as_dropped():
    with Receiver(statuses=[400]) as rx:
        setup_logging(loki=loki_cfg(rx.url))
        logger.info("rejected")
        sink = loki_sink()
        setup_logging()
        assert [p["status"] for p in rx.pushes] == [400]
        assert sink.stats() == {"sent": 0, "dropped": 1, "queued": 0}
