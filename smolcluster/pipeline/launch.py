"""Start pipeline stages as child processes on this machine, relay their output, stop them all together.

Used by ``algo=mp`` training (``role=launch``) and by inference when it starts its
own stages. Stages share the machine's cores: unless ``OMP_NUM_THREADS`` is set,
each gets ``cores // stages`` threads, so stages working at once do not fight over
cores. If any child fails, the others are stopped and the error names it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from loguru import logger

from smolcluster.errors import PeerError
from smolcluster.supervisor import sigterm_as_interrupt

_HERE_KEYS = ("role=", "rank=", "cluster.port=", "run_id=", "++run_id=", "+run_id=", "hydra.run.dir=", "hydra.output_subdir=",
              "train.progress=")


def free_ports(host: str, n: int, tries: int = 50) -> int:
    """A port P such that P..P+n-1 are free on ``host`` right now."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise PeerError(f"found no {n} consecutive free ports on {host}; set cluster.port")


def stage_env(n_stages: int, extra: dict | None = None, threads: int | None = None) -> dict:
    """A stage process's environment. ``threads``: its OpenMP threads (default: ``cores // n_stages``, for
    stages that compute at once); unless ``OMP_NUM_THREADS`` is set already."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    # glibc raises its mmap threshold after a large block is freed, so the chunks a stage reads
    # and converts its weights through would stay in the heap (RSS) after use; a fixed threshold
    # hands every large block back to the OS when freed (see pipeline/quantize.py).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // n_stages))
    return env


def co_located_env(extra: dict | None = None) -> dict:
    """What stages that share one machine's cores and take turns on them add to their environment.

    Each stage's OpenMP threads spin a short while after each parallel region, then sleep: long enough
    to bridge the gaps between one forward's ops (waking a sleeping thread costs ~10-50 us a region, and
    a forward has hundreds), short enough that a stage that has handed its step on gives the cores back
    to the next at once. libgomp's default spin (300k iterations) kept an idle stage spinning into the
    next stage's turn; ``OMP_WAIT_POLICY=PASSIVE`` (no spin) slowed each forward by a half. Measured on
    GPT-2 124M (docs/benchmarks.md). Kept if the caller set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``.
    """
    env = dict(extra or {})
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & (set(env) | set(os.environ)):
        env["GOMP_SPINCOUNT"] = str(CO_LOCATED_SPINCOUNT)
    return env


CO_LOCATED_SPINCOUNT = 20_000


class Children:
    """Child processes started in their own process groups, output relayed line by line with a prefix."""

    def __init__(self, log_path: Path | None = None):
        self.procs: dict[str, subprocess.Popen] = {}
        self.log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    def start(self, name: str, cmd: list[str], env: dict, cwd: str | None = None) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=cwd, start_new_session=True)
        self.procs[name] = p
        threading.Thread(target=self._relay, args=(p, f"[{name}]"), daemon=True).start()
        return p

    def _relay(self, proc: subprocess.Popen, prefix: str) -> None:
        for line in iter(proc.stdout.readline, ""):
            if self.log is not None:
                self.log.write(f"{prefix} {line}")
            else:
                sys.stderr.write(f"{prefix} {line}")
        proc.stdout.close()

    def failed(self) -> tuple[str, int] | None:
        for name, p in self.procs.items():
            code = p.poll()
            if code is not None and code != 0:
                return name, code
        return None

    def wait_all(self, poll_s: float = 0.1) -> None:
        """Until every child exits; the first to fail raises PeerError (the rest are stopped)."""
        while True:
            failed = self.failed()
            if failed:
                name, code = failed
                self.stop()
                raise PeerError(f"{name} exited with code {code}; stopped the others (its log is above)")
            if all(p.poll() == 0 for p in self.procs.values()):
                return
            time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0, exit_first_s: float = 0.0) -> None:
        """Give the children ``exit_first_s`` to exit by themselves, then SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + exit_first_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.05)
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        if self.log is not None:
            self.log.close()
            self.log = None


def child_overrides() -> list[str]:
    """The user's command-line overrides, minus the ones the launcher sets per child."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):  # not under Hydra
        task = []
    return [o for o in task if not o.startswith(_HERE_KEYS)]


def launch_ranks(cfg, run_dir: Path, n: int, role: str, what: str) -> None:
    """Ranks 0..n-1 of ``role`` as ``python -m smolcluster.train`` children on this machine (mp's stages,
    allreduce's ring), on consecutive ports; returns when every one has exited cleanly. The first to fail
    stops the rest (PeerError naming it), and so do Ctrl-C and SIGTERM."""
    port = cfg.cluster.port or free_ports(cfg.cluster.host, n)
    common = [*child_overrides(), f"cluster.port={port}", f"++run_id={cfg.run_id}", f"hydra.run.dir={run_dir}",
              "hydra.output_subdir=null", "train.progress=false"]
    children = Children()
    previous = signal.getsignal(signal.SIGTERM)
    sigterm_as_interrupt()  # SIGTERM unwinds like Ctrl-C: stop the children
    logger.info(f"launching {what} on this machine: ports {port}..{port + n - 1}, run dir {run_dir}")
    try:
        for rank in range(n):
            children.start(f"{role} {rank}", [sys.executable, "-u", "-m", "smolcluster.train", *common,
                                              f"role={role}", f"rank={rank}"], stage_env(n))
        children.wait_all()
    finally:
        children.stop()
        signal.signal(signal.SIGTERM, previous)


def launch_training(cfg, run_dir: Path) -> dict:
    """``algo=mp role=launch``: every stage as a ``python -m smolcluster.train`` child; merge their shards."""
    from smolcluster.pipeline import shards

    n = int(cfg.algo.stages)
    launch_ranks(cfg, run_dir, n, "stage", f"algo=mp ({n} stages)")
    shards.merge(run_dir)
    return json.loads((Path(run_dir) / "summary.json").read_text())
