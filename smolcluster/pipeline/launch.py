"""Start pipeline stages as child processes on this machine, relay their output, stop them all together.

Used by ``algo=mp`` / ``algo=allreduce`` training (``role=launch``) and by inference when it starts
its own stages (the children themselves: :class:`smolcluster.supervisor.Children`). Stages share the
machine's cores: unless ``OMP_NUM_THREADS`` is set, each gets ``cores // stages`` threads, so stages
working at once do not fight over cores; inference's stages of a large model take turns with all of
them instead (:func:`co_located_env`). If any child fails, the others are stopped and the error names it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

from loguru import logger

from smolcluster.errors import PeerError
from smolcluster.supervisor import Children, child_overrides, sigterm_as_interrupt


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


CO_LOCATED_SPINCOUNT = 20_000  # OpenMP spin iterations after a parallel region (see co_located_env)


def co_located_env(extra: dict | None = None) -> dict:
    """What stages that share one machine's cores and take turns on them add to their environment.

    Each stage's OpenMP threads spin a short while after each parallel region, then sleep: long enough
    to bridge the gaps between one forward's ops, short enough that a stage that has handed its step on
    gives the cores to the next at once. Measured on GPT-2 124M (docs/benchmarks.md): with libgomp's
    default spin (300k iterations) an idle stage spins into the next stage's turn (1.11-1.20x of padded
    ``generate`` at 8 in flight and 0.86-0.91x of ``generate`` for one request, against 1.25-1.26x and
    1.09-1.13x with 20k in the same rounds); ``OMP_WAIT_POLICY=PASSIVE`` (no spin) made an 8-row step a
    third slower (47.3 -> 62.6 ms). Kept if the caller set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``.
    """
    env = dict(extra or {})
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & (set(env) | set(os.environ)):
        env["GOMP_SPINCOUNT"] = str(CO_LOCATED_SPINCOUNT)
    return env



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
