"""The thread policy: how many OpenMP / torch threads a process gets when several share this machine's cores.

One rule for every place that picks a thread count: processes that compute at the same time split the cores
(:func:`threads_each`), and a thread count the user set in ``OMP_NUM_THREADS`` always wins (:func:`thread_env`).
Every process running torch's default pool on all cores would oversubscribe the machine, and OpenMP's
spin-waits then cost far more than they save. Users: the star and ring launchers (:mod:`.local`), inference's
local stages and replicas (``inference/api.py``, ``inference/from_config.py``), the stage server's own share
(``inference/stage.py``) and the benchmarks that start children.
"""

from __future__ import annotations

import os

CO_LOCATED_SPINCOUNT = 20_000  # OpenMP spin iterations after a parallel region (see co_located_env)


def threads_each(sharing: int, cores: int | None = None) -> int:
    """Threads for one of ``sharing`` processes computing at once on ``cores`` (default: this machine's)."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, sharing))


def thread_env(env: dict, threads: int) -> dict:
    """``env`` with ``threads`` OpenMP / MKL threads, unless it (or this process's environment) says already."""
    if "OMP_NUM_THREADS" not in env and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("MKL_NUM_THREADS", str(threads))
    return env


def stage_env(n_stages: int, extra: dict | None = None, threads: int | None = None) -> dict:
    """A stage process's environment. ``threads``: its OpenMP threads (default: ``cores // n_stages``, for
    stages that compute at once); unless ``OMP_NUM_THREADS`` is set already."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    # glibc raises its mmap threshold after a large block is freed, so the chunks a stage reads
    # and converts its weights through would stay in the heap (RSS) after use; a fixed threshold
    # hands every large block back to the OS when freed (see pipeline/quantize.py).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return thread_env(env, threads or threads_each(n_stages))


def co_located_env(extra: dict | None = None) -> dict:
    """What stages that share one machine's cores and take turns on them add to their environment.

    Each stage's OpenMP threads spin a short while after each parallel region, then sleep: long enough
    to bridge the gaps between one forward's ops, short enough that a stage that has handed its step on
    gives the cores to the next at once. libgomp's default spin (300k iterations) lets an idle stage spin
    into the next stage's turn, and ``OMP_WAIT_POLICY=PASSIVE`` (no spin) makes a batched step slower
    (``python -m smolcluster.bench pipeline``, docs/benchmarks.md). Kept if the caller set
    ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``.
    """
    env = dict(extra or {})
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & (set(env) | set(os.environ)):
        env["GOMP_SPINCOUNT"] = str(CO_LOCATED_SPINCOUNT)
    return env
