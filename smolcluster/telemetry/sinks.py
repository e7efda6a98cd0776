"""Build the optional metrics sinks a node's ``logging`` config turns on: W&B and Prometheus.

A sink has ``log(step, metrics)`` and ``close(summary, exit_code=0)``; :class:`~smolcluster.telemetry.run_files.RunRecorder`
fans every logged row out to them. A sink that cannot start (a port taken, W&B
failing) is logged with the fix and left out: tracking never takes training down.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from smolcluster.telemetry.prometheus import RANKED_ROLES, PrometheusSink, metrics_port
from smolcluster.telemetry.wandb_sink import WandbSink, resolve_mode


def build_sinks(cfg, *, run_dir: Path, identity: dict) -> list:
    """The sinks ``cfg.logging`` enables (``cfg``: a :class:`~smolcluster.train_settings.TrainConfig`); W&B gets
    the whole resolved config as its run config."""
    sinks, prom = [], cfg.logging.prometheus
    if prom.port is not None:
        ranked = identity.get("role", "") in RANKED_ROLES
        port = metrics_port(prom.port, int(identity.get("rank") or 0) if ranked else None)
        try:
            sink = PrometheusSink(port, identity, addr=prom.addr or "127.0.0.1")
            sinks.append(sink)
            sink.announce(run_dir)
        except OSError as e:
            logger.warning(f"no prometheus endpoint: port {port} is not free ({e}); choose another base with "
                           "logging.prometheus.port=N (workers use N+1+rank) or 0 for any free port")
    wcfg = cfg.logging.wandb
    mode = resolve_mode(wcfg.mode or "disabled")
    if mode != "disabled":
        try:
            sinks.append(WandbSink(wcfg, run_dir, identity, cfg.composed, mode))
        except Exception as e:  # wandb raises its own zoo of errors; none of them may stop training
            logger.warning(f"W&B tracking is off for this run: wandb.init failed: {e}")
    return sinks
