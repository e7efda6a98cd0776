"""Configure loguru once per process, every line tagged with who wrote it.

Every process of a cluster (server, workers, stages) calls :func:`setup_logging`
once at start-up. Lines carry ``run_id``, ``node``, ``role``, ``rank`` and
``algo`` as loguru ``extra`` fields: readable on the console, JSON lines in the
run directory (``node-<node>-<role><rank>.log.jsonl``) and, when ``logging.loki.url``
is set, pushed to Grafana Loki with those fields as stream labels (telemetry/loki.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from smolcluster.telemetry.loki import LokiSink

_CONSOLE_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[node]}/{extra[role]}{extra[rank]}</cyan> {message}"
)

_configured: dict | None = None
_loki: LokiSink | None = None


def setup_logging(
    *,
    node: str | None = None,
    role: str = "main",
    rank: int | str = "",
    algo: str = "",
    run_id: str = "",
    run_dir: str | Path | None = None,
    level: str | None = None,
    loki: Mapping | None = None,
) -> dict:
    """(Re)configure the global loguru logger for this process; returns the identity labels.

    ``loki`` is the ``logging.loki`` config node: with its ``url`` set, lines at ``level``
    and above are also pushed to Loki (batched, from a daemon thread, dropped when it lags).
    """
    global _configured, _loki
    level = level or os.environ.get("SMOLCLUSTER_LOG_LEVEL", "INFO")
    if node is None:  # this machine's name (an agent's role: the agent's --name), as train's nodes log
        from smolcluster.cluster import node_name

        node = node_name()
    identity = {"run_id": run_id, "node": node, "role": role, "rank": str(rank), "algo": algo}
    if _loki is not None:  # flush it while the console is still there for its last drop count
        _loki.close()
        _loki = None
    logger.remove()
    logger.configure(extra=identity)
    logger.add(sys.stderr, level=level, format=_CONSOLE_FORMAT, colorize=None, enqueue=False)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        name = f"node-{node}-{role}{rank}.log.jsonl"
        logger.add(Path(run_dir) / name, level="DEBUG", serialize=True, enqueue=False)
    if loki is not None and loki.get("url"):
        from smolcluster.telemetry.loki import LokiSink  # imports requests: only when asked for

        _loki = LokiSink.from_config(loki)
        logger.add(_loki, **_loki.handler_options(level))
    _configured = identity
    return identity


def loki_sink() -> LokiSink | None:
    """The Loki sink of the last :func:`setup_logging` call, if it added one (for its stats)."""
    return _loki


def identity() -> dict:
    """The labels of the last :func:`setup_logging` call (empty dict when never configured)."""
    return dict(_configured or {})
