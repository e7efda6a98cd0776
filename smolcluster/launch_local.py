"""Start a whole cluster on this machine: the server and ``cluster.workers`` workers as child processes.

Each child is ``python -m smolcluster.train`` with the same overrides plus its role,
a free loopback port and the shared run directory. Their output is relayed with a
``[server]`` / ``[worker N]`` prefix. If any child fails, every other child is
stopped and the launcher exits non-zero naming it; Ctrl-C / SIGTERM stop them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from loguru import logger

from smolcluster.cluster import python_cmd
from smolcluster.errors import PeerError
from smolcluster.supervisor import (
    Children,
    child_overrides,
    sigterm_as_interrupt,
    stop_process_groups,
)
from smolcluster.train_settings import TrainConfig


def launch(cfg: TrainConfig, run_dir: Path, extra: list[str] | None = None) -> dict:
    common = [*child_overrides(), *(extra or []), f"run_id={cfg.run_id}", f"hydra.run.dir={run_dir}",
              "hydra.output_subdir=null", "train.progress=false"]
    n = cfg.cluster.workers
    # Share the cores: every child running torch's default thread pool on all cores would
    # oversubscribe the machine, and OpenMP's spin-waits then cost far more than they save.
    threads = str(max(1, (os.cpu_count() or 1) // (n + 1)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ, "PYTHONUNBUFFERED": "1"}
    children = Children()
    sigterm_as_interrupt()  # so the finally below stops every child
    ended = False
    try:
        # The server binds the port it is given, or (port null) one the OS picks and reports in
        # server.json: no race with other jobs of a parallel sweep for a "free" port.
        (run_dir / "server.json").unlink(missing_ok=True)
        server = children.start("server", [*python_cmd(), *common, "role=server",
                                           f"cluster.port={cfg.cluster.port or 0}"], env)
        port = _wait_for_port(run_dir / "server.json", server, cfg.cluster.connect_timeout_s)
        logger.info(f"launching {cfg.algo.name} on this machine: server on port {port} + {n} workers, "
                    f"run dir {run_dir}")
        for r in range(n):
            children.start(f"worker {r}", [*python_cmd(), *common, "role=worker", f"rank={r}",
                                           f"cluster.port={port}"], env)
        children.wait_all(until="server")  # the first child to fail stops the rest (PeerError naming it)
        ended = True
    finally:
        # After a clean end the server has told the workers it saw to stop: a moment to exit on their own.
        # One that never registered (edp ends without it) was told nothing, and on a failure, Ctrl-C or
        # SIGTERM every one is stopped at once.
        seen = _registered(run_dir) if ended else set()
        stop_process_groups([p for name, p in children.procs.items()
                             if name.startswith("worker ") and name.split()[1] not in seen])
        children.stop(exit_first_s=10 if ended else 0)
    return json.loads((run_dir / "summary.json").read_text())


def _registered(run_dir: Path) -> set[str]:
    """The ranks (as strings) the server's summary lists: the workers that joined the run."""
    try:
        return set(json.loads((run_dir / "summary.json").read_text()).get("workers", {}))
    except (OSError, ValueError):
        return set()


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
