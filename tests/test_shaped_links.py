"""Real separate hosts on slow links: every node in its own network namespace on a bridge
(:class:`smolcluster.testing.netns.Lan`), every link shaped to 100 Mbit/s each way with ``tc ... tbf``.

- ``algo=allreduce`` with 3 ranks: each rank sends 2(N-1)/N x M bytes per step (M = the gradient's bytes),
  and a step takes at least that over the link (the shaping is real); then rank 2's cable is pulled and
  the survivors neither hang nor go on silently: within ``cluster.liveness_s`` (+ a margin) each names rank 2
  as lost and then stops or carries on (and finishes).
- ``algo=syncps`` with 2 workers: the server receives N x M and sends N x M per step; then worker 1's cable
  is pulled and the server drops it and finishes the run with worker 0.

Needs root, iproute2 and tc; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smolcluster.testing.netns import Lan, netns_unavailable
from tests.conftest import REPO

PORT = 5555
RATE_BYTES_S = 100e6 / 8  # the shaped links' rate
LIVENESS_S = 2.0
MARGIN_S = 20.0  # process scheduling on a shared 2-core machine, plus the in-flight step
# a 64 -> 512 -> 512 -> 10 MLP on the 8x8 digits: ~300k parameters (1.2 MB), trivial compute, so the link dominates
COMMON = ["data=digits", "model=mlp", "model.hidden=[512,512]", "train.batch_size=32", "train.log_every=1",
          "train.progress=false", "train.eval_every=0", "run_id=shaped", "hydra.output_subdir=null",
          f"cluster.port={PORT}", "cluster.bind=0.0.0.0", "cluster.insecure=true", "cluster.heartbeat_s=0.3",
          f"cluster.liveness_s={LIVENESS_S}", "cluster.connect_timeout_s=90"]


@pytest.fixture
def lan(request):
    reason = netns_unavailable(shaping=True)
    if reason:
        pytest.skip(reason)
    net = Lan(request.param, rate="100mbit")
    try:
        yield net.build()
    finally:
        net.close()


class Run:
    """``python -m smolcluster.train`` processes, each inside its host's namespace, sharing a run dir."""

    def __init__(self, lan: Lan, run_dir: Path, *overrides: str):
        self.lan, self.run_dir = lan, run_dir
        self.common = [*COMMON, f"hydra.run.dir={run_dir}", *overrides]
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, host: str, *args: str) -> None:
        self.procs[host] = subprocess.Popen(
            [*self.lan.exec(host), sys.executable, "-u", "-m", "smolcluster.train", *self.common, *args], cwd=REPO,
            stdout=(self.run_dir / f"{host}.out").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "SMOLCLUSTER_NODE": host, "PYTHONUNBUFFERED": "1"})

    def output(self, host: str) -> str:
        path = self.run_dir / f"{host}.out"
        return path.read_text() if path.is_file() else ""

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        return [r for r in rows if "samples" in r]  # training rows (not eval rows)

    def wait_for_step(self, step: int, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if rows and rows[-1]["step"] >= step:
                return rows
            for host, p in self.procs.items():
                assert p.poll() is None, f"{host} exited {p.returncode} before step {step}:\n{self.output(host)[-3000:]}"
            assert time.monotonic() < deadline, f"no step {step} in {timeout}s:\n{self.output(next(iter(self.procs)))[-3000:]}"
            time.sleep(0.1)

    def wait(self, host: str, timeout: float) -> int:
        try:
            return self.procs[host].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{host} still running after {timeout}s:\n{self.output(host)[-3000:]}") from None

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def gradient_bytes(log: str) -> int:
    """M: the flat fp32 gradient's size, from the parameter count the node logs."""
    return 4 * int(re.search(r"\(([\d,]+) params\)", log).group(1).replace(",", ""))


def per_step(rows: list[dict], key: str) -> float:
    """Mean of a cumulative counter's growth per step over ``rows`` (past the first, whose step had the handshake)."""
    a, b = rows[1], rows[-1]
    return (b[key] - a[key]) / (b["step"] - a["step"])


@pytest.mark.slow
@pytest.mark.parametrize("lan", [["w0", "w1", "w2"]], indirect=True)
def test_allreduce_on_shaped_links_sends_the_ring_formula_and_reforms_without_a_cut_rank(lan, tmp_path):
    n, measure_to, steps = 3, 10, 60
    nodes = ", ".join(f"{{name: {h}, host: '{lan.ip[h]}'}}" for h in lan.names)
    run = Run(lan, tmp_path, "algo=allreduce", f"cluster.workers={n}", f"cluster.nodes=[{nodes}]",
              f"train.steps={steps}")
    try:
        for r, host in enumerate(lan.names):
            run.start(host, "role=worker", f"rank={r}")
        rows = run.wait_for_step(measure_to)
        m = gradient_bytes(run.output("w0"))
        sent = [r["bytes_sent_step"] for r in rows[1:measure_to]]
        want = 2 * (n - 1) / n * m
        assert all(abs(s / want - 1) < 0.10 for s in sent), (sent, want)
        # the links are really shaped: rank 0's share of the ring cannot cross its 100 Mbit/s faster than that
        span = rows[measure_to - 1]["time"] - rows[1]["time"]
        assert span >= 0.8 * sum(sent[1:]) / RATE_BYTES_S, (span, sent)
        # ... and shaped as a switch port does: by queueing, not by dropping the ring's large writes
        assert [lan.dropped(h) for h in lan.names] == [0] * n

        lan.pull_cable("w2")
        cut = time.monotonic()
        # the ring is elastic: within liveness both survivors agree on a 2-ring without rank 2 and carry on
        reformed = re.compile(r"ring epoch 1 of ranks \[0, 1\] from step \d+ \(joined \[\], left \[2\]\)")
        survivors = ["w0", "w1"]
        while not all(reformed.search(run.output(h)) for h in survivors):
            assert time.monotonic() - cut < LIVENESS_S + MARGIN_S, \
                "the survivors did not re-form a ring without rank 2:\n" + \
                "\n".join(f"--- {h}\n{run.output(h)[-1500:]}" for h in survivors)
            time.sleep(0.1)
        for h in survivors:
            assert run.wait(h, timeout=LIVENESS_S + MARGIN_S + 60) == 0, run.output(h)[-3000:]
        assert run.rows()[-1]["step"] == steps
        events = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
        assert [(e["event"], e["members"], e["left"]) for e in events] == [("membership", [0, 1], [2])], events
        # the cut-off rank sees the others "die" just as they see it die: alone it holds no majority, so it stops
        # (not a second ring training apart and writing to the same run)
        assert run.wait("w2", timeout=LIVENESS_S + MARGIN_S + 60) != 0
        assert "not a majority" in run.output("w2"), run.output("w2")[-3000:]
    finally:
        run.stop()


@pytest.mark.slow
@pytest.mark.parametrize("lan", [["srv", "w0", "w1"]], indirect=True)
def test_syncps_on_shaped_links_moves_n_copies_through_the_server_and_drops_a_cut_worker(lan, tmp_path):
    n, measure_to, steps = 2, 8, 40
    nodes = ", ".join(f"{{name: {h}, host: '{lan.ip[h]}'}}" for h in ("w0", "w1"))
    run = Run(lan, tmp_path, "algo=syncps", f"cluster.workers={n}", f"cluster.host='{lan.ip['srv']}'",
              f"cluster.nodes=[{nodes}]", f"train.steps={steps}", "algo.straggler_timeout=60")
    try:
        run.start("srv", "role=server")
        run.start("w0", "role=worker", "rank=0")
        run.start("w1", "role=worker", "rank=1")
        rows = run.wait_for_step(measure_to)
        m = gradient_bytes(run.output("srv"))
        got_in, got_out = per_step(rows, "bytes_received"), per_step(rows, "bytes_sent")
        assert abs(got_in / (n * m) - 1) < 0.10, (got_in, n * m)  # N gradients in
        assert abs(got_out / (n * m) - 1) < 0.10, (got_out, n * m)  # N weight copies out
        span = rows[-1]["time"] - rows[1]["time"]  # the server's link carries N x M each way per step
        assert span >= 0.8 * got_out * (rows[-1]["step"] - rows[1]["step"]) / RATE_BYTES_S, span

        cut_step = run.rows()[-1]["step"]
        lan.pull_cable("w1")
        assert run.wait("srv", timeout=120) == 0, run.output("srv")[-3000:]
        assert run.wait("w0", timeout=60) == 0, run.output("w0")[-3000:]
    finally:
        run.stop()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == steps and summary["workers_lost"] == [1]
    assert cut_step <= summary["workers"]["1"]["lost_step"] < steps
    assert "worker 1 (w1) lost" in run.output("srv")
