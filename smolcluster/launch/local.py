"""The local backend's launchers: every role of a run as a child process on this machine.

- :func:`launch_star` (``algo=syncps`` / ``edp``, ``role=launch``): the server and ``cluster.workers`` workers.
  The server binds the port it is given, or one the OS picks and reports in ``server.json``.
- :func:`launch_ranks` (``algo=allreduce`` / ``diloco``'s ring, ``algo=mp``'s stages): ranks 0..n-1 on
  consecutive ports (:func:`free_ports`); :func:`launch_training` is ``algo=mp role=launch``.

Each child is ``python -m smolcluster.train`` with the user's overrides (:func:`.overrides.child_overrides`)
plus its role, rank, port and the shared run directory, its share of the cores (:mod:`.threads`), its output
relayed with a ``[server]`` / ``[worker N]`` / ``[stage N]`` prefix (:class:`.supervisor.Children`). The first
child to fail stops the rest and the launcher exits naming it; Ctrl-C / SIGTERM stop them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from smolcluster.cluster import free_ports, python_cmd
from smolcluster.errors import PeerError
from smolcluster.launch.overrides import child_overrides
from smolcluster.launch.supervisor import Children, stop_process_groups
from smolcluster.launch.threads import stage_env, thread_env, threads_each

if TYPE_CHECKING:  # (the launchers' users, inference among them, need not import training's settings)
    from smolcluster.train_settings import TrainConfig

# what every local child is told besides the user's overrides: one run dir, no .hydra/ per child, no progress bar
_SHARED = ("hydra.output_subdir=null", "train.progress=false")


def launch_star(cfg: TrainConfig, run_dir: Path, extra: list[str] | None = None) -> dict:
    """A server and ``cluster.workers`` workers here; returns the server's summary once it has finished."""
    common = [*child_overrides(), *(extra or []), f"run_id={cfg.run_id}", f"hydra.run.dir={run_dir}", *_SHARED]
    n = cfg.cluster.workers
    env = thread_env({**os.environ, "PYTHONUNBUFFERED": "1"}, threads_each(n + 1))
    ended = False
    with Children() as children:
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


def launch_ranks(cfg: TrainConfig, run_dir: Path, n: int, role: str, what: str) -> None:
    """Ranks 0..n-1 of ``role`` as ``python -m smolcluster.train`` children on this machine (mp's stages,
    allreduce's ring), on consecutive ports; returns when every one has exited cleanly. The first to fail
    stops the rest (PeerError naming it), and so do Ctrl-C and SIGTERM."""
    port = cfg.cluster.port or free_ports(cfg.cluster.host, n)
    common = [*child_overrides(), f"cluster.port={port}", f"++run_id={cfg.run_id}", f"hydra.run.dir={run_dir}",
              *_SHARED]
    logger.info(f"launching {what} on this machine: ports {port}..{port + n - 1}, run dir {run_dir}")
    with Children() as children:
        for rank in range(n):
            children.start(f"{role} {rank}", [sys.executable, "-u", "-m", "smolcluster.train", *common,
                                              f"role={role}", f"rank={rank}"], stage_env(n))
        children.wait_all()


def launch_training(cfg: TrainConfig, run_dir: Path) -> dict:
    """``algo=mp role=launch``: every stage as a ``python -m smolcluster.train`` child; merge their shards."""
    from smolcluster.pipeline import shards

    n = int(cfg.algo.stages)
    launch_ranks(cfg, run_dir, n, "stage", f"algo=mp ({n} stages)")
    shards.merge(run_dir)
    return json.loads((Path(run_dir) / "summary.json").read_text())
