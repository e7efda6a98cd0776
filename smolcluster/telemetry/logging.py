"""Configure loguru once per process, every line tagged with who wrote it.

Every process of a cluster (server, workers, stages) calls :func:`setup_logging`
once at start-up. Lines carry ``run_id``, ``node``, ``role``, ``rank`` and
``algo`` as loguru ``extra`` fields: readable on the console, JSON lines in the
run directory (``node-<node>-<role><rank>.log.jsonl``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loguru import logger

_CONSOLE_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[node]}/{extra[role]}{extra[rank]}</cyan> {message}"
)

_configured: dict | None = None


def setup_logging(
    *,
    node: str = "local",
    role: str = "main",
    rank: int | str = "",
    algo: str = "",
    run_id: str = "",
    run_dir: str | Path | None = None,
    level: str | None = None,
) -> dict:
    """(Re)configure the global loguru logger for this process; returns the identity labels."""
    global _configured
    level = level or os.environ.get("SMOLCLUSTER_LOG_LEVEL", "INFO")
    identity = {"run_id": run_id, "node": node, "role": role, "rank": str(rank), "algo": algo}
    logger.remove()
    logger.configure(extra=identity)
    logger.add(sys.stderr, level=level, format=_CONSOLE_FORMAT, colorize=None, enqueue=False)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        name = f"node-{node}-{role}{rank}.log.jsonl"
        logger.add(Path(run_dir) / name, level="DEBUG", serialize=True, enqueue=False)
    _configured = identity
    return identity


def identity() -> dict:
    """The labels of the last :func:`setup_logging` call (empty dict when never configured)."""
    return dict(_configured or {})
