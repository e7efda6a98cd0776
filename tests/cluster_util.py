"""Start real server / worker processes on loopback for the multi-process tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from smolcluster.cluster import free_port
from smolcluster.transport import ClientEndpoint
from tests.conftest import REPO

# A role's process with its imports done, held until the test releases it: the heavy imports (torch, the
# algorithm) are most of a fresh process's start-up, seconds on a loaded machine.
HELD = """import importlib, runpy, sys
for module in sys.argv[1].split(","):
    importlib.import_module(module)
print("imported; waiting for the test to release me", flush=True)
sys.stdin.readline()
sys.argv = ["smolcluster.train", *sys.argv[2:]]
runpy.run_module("smolcluster.train", run_name="__main__", alter_sys=True)
"""
IMPORTS = "torch,hydra,smolcluster.config,smolcluster.telemetry.run_files,smolcluster.algorithms.{algo}"  # what train.py uses


class Cluster:
    """One server and N workers as separate processes sharing a run dir and a port."""

    def __init__(self, run_dir: Path, algo: str, *overrides: str, workers: int = 2, port: int | None = None):
        self.run_dir, self.algo = Path(run_dir), algo
        self.port = port or free_port()
        self.common = [f"algo={algo}", f"cluster.workers={workers}", f"cluster.port={self.port}",
                       f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", "train.progress=false",
                       "run_id=test", *overrides]
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, *args: str, held: bool = False) -> subprocess.Popen:
        """Start ``python -m smolcluster.train`` with the cluster's overrides and ``args``. ``held``: import
        everything, then wait for :meth:`release` (a late joiner or a restarted role then arrives within its
        config and model set-up, not after a whole start-up, so the others' runs can be short)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.run_dir / f"{name.replace(' ', '_')}.out"
        self.logs[name] = log
        cmd = ["-c", HELD, IMPORTS.format(algo=self.algo)] if held else ["-m", "smolcluster.train"]
        proc = subprocess.Popen([sys.executable, *cmd, *self.common, *args], cwd=REPO, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, stdin=subprocess.PIPE if held else None,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.procs[name] = proc
        return proc

    def release(self, name: str, timeout: float = 180) -> None:
        """Let a role started with ``held=True`` run, once its imports are done."""
        self.wait_for_line(name, "imported; waiting for the test", timeout)
        self.procs[name].stdin.write(b"go\n")
        self.procs[name].stdin.close()

    def wait_for_line(self, name: str, text: str, timeout: float = 120) -> None:
        """Wait until ``text`` appears in ``name``'s output, failing at once if ``name`` exits first."""
        deadline = time.monotonic() + timeout
        while text not in self.output(name):
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited {self.procs[name].returncode} before {text!r}\n"
                                     f"{self.output(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from {name} within {timeout}s\n{self.output(name)[-3000:]}")
            time.sleep(0.05)

    def server(self, *args: str, name: str = "server", held: bool = False) -> subprocess.Popen:
        return self.start(name, "role=server", *args, held=held)

    def worker(self, rank: int, *args: str, name: str | None = None, held: bool = False) -> subprocess.Popen:
        return self.start(name or f"worker{rank}", "role=worker", f"rank={rank}", *args, held=held)

    def output(self, name: str) -> str:
        return self.logs[name].read_text() if name in self.logs else ""

    def wait(self, name: str, timeout: float = 180) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish in {timeout}s\n{self.output(name)[-3000:]}") from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait(timeout=30)

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.metrics()
            if rows and rows[-1]["step"] >= step:
                return
            for name, p in self.procs.items():
                if p.poll() not in (None, 0):
                    raise AssertionError(f"{name} exited {p.returncode}\n{self.output(name)[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no step {step} within {timeout}s\n{self.output('server')[-3000:]}")

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def register_with(server, fields: dict, curve_dir, client_key: str = "client"):
    """Register with an in-process parameter server (``server.poll`` runs here) as a CURVE client holding
    ``curve_dir/<client_key>.key_secret``; the server's reply (welcome / refuse), or None after 30 s."""
    client = ClientEndpoint(server.endpoint.address, max_bytes=server.endpoint.max_bytes, curve_dir=str(curve_dir),
                            client_key=client_key)
    client.send("register", fields)
    deadline = time.monotonic() + 30
    while not client.pending() and time.monotonic() < deadline:
        server.poll(0.05)
    reply = client.recv(1000)
    client.close()
    return reply
