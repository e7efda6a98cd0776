"""Start a whole cluster on this machine: the server and ``cluster.workers`` workers as child processes.

Each child is ``python -m smolcluster.train`` with the same overrides plus its role,
a free loopback port and the shared run directory. Their output is relayed with a
``[server]`` / ``[worker N]`` prefix. If any child fails, every other child is
stopped and the launcher exits non-zero naming it; Ctrl-C / SIGTERM stop them all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import DictConfig

from smolcluster.cluster import python_cmd
from smolcluster.errors import PeerError
from smolcluster.supervisor import sigterm_as_interrupt

_ROLE_KEYS = ("role=", "rank=", "cluster.port=", "run_id=", "hydra.run.dir=", "hydra.output_subdir=",
              "train.progress=")


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    for line in iter(proc.stdout.readline, ""):
        sys.stderr.write(f"{prefix} {line}")
    proc.stdout.close()


def child_overrides(cfg: DictConfig) -> list[str]:
    """The user's command-line overrides, minus the ones the launcher sets per child."""
    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (tests calling launch directly)
        task = []
    return [o for o in task if not o.startswith(_ROLE_KEYS)]


def launch(cfg: DictConfig, run_dir: Path, extra: list[str] | None = None) -> dict:
    common = [*child_overrides(cfg), *(extra or []), f"run_id={cfg.run_id}", f"hydra.run.dir={run_dir}",
              "hydra.output_subdir=null", "train.progress=false"]
    n = cfg.cluster.workers
    # Share the cores: every child running torch's default thread pool on all cores would
    # oversubscribe the machine, and OpenMP's spin-waits then cost far more than they save.
    threads = str(max(1, (os.cpu_count() or 1) // (n + 1)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    sigterm_as_interrupt()  # so the finally below stops every child

    def start(name: str, args: list[str]) -> None:
        procs[name] = subprocess.Popen(python_cmd() + common + args, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        threading.Thread(target=_relay, args=(procs[name], f"[{name}]"), daemon=True).start()

    try:
        # The server binds the port it is given, or (port null) one the OS picks and reports in
        # server.json: no race with other jobs of a parallel sweep for a "free" port.
        (run_dir / "server.json").unlink(missing_ok=True)
        start("server", ["role=server", f"cluster.port={cfg.cluster.port or 0}"])
        port = _wait_for_port(run_dir / "server.json", procs["server"], cfg.cluster.connect_timeout_s)
        logger.info(f"launching {cfg.algo.name} on this machine: server on port {port} + {n} workers, "
                    f"run dir {run_dir}")
        for r in range(n):
            start(f"worker {r}", ["role=worker", f"rank={r}", f"cluster.port={port}"])
        failed = _supervise(procs)
        if failed:
            name, code = failed
            raise PeerError(f"{name} exited with code {code}; stopped the rest of the cluster (its log is above)")
    finally:
        _stop_all(procs)
    return json.loads((run_dir / "summary.json").read_text())


def _wait_for_port(path: Path, server: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            try:
                return int(json.loads(path.read_text())["port"])
            except (ValueError, KeyError):
                pass  # caught mid-write; read again
        if server.poll() is not None:
            raise PeerError(f"the server exited with code {server.returncode} before listening (its log is above)")
        time.sleep(0.05)
    raise PeerError(f"the server did not start listening within cluster.connect_timeout_s={timeout_s}s")


def _supervise(procs: dict[str, subprocess.Popen]) -> tuple[str, int] | None:
    """Wait until the server exits; the first child to fail (non-zero) ends the wait."""
    while True:
        for name, p in procs.items():
            code = p.poll()
            if code is not None and code != 0:
                return name, code
        if procs["server"].poll() == 0:
            # the server told the workers to stop; give them a moment to exit on their own
            deadline = time.monotonic() + 10
            while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
                time.sleep(0.1)
            return None
        time.sleep(0.1)


def _stop_all(procs: dict[str, subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
