"""What an inference stage and a chat head publish on Prometheus (what ``smolcluster.top`` shows for inference).

A stage calls :meth:`ServingMetrics.step` once per turn of its loop (one batched step) with counts it
keeps anyway, and :meth:`ServingMetrics.tokens` once per forward with the step's rows; the head calls
them from its supervisor thread every ``watch_s``. Nothing is done per token, and a stage without a
port gets :data:`OFF`, whose methods do nothing, so its loop has no branch for it.

Ports: ``logging.prometheus.port`` is the base, as for training: the head (the chat or infer process)
takes the base and stage ``i`` takes ``base + 1 + i``; ``0`` lets the OS choose. With a run directory
each announces its URL in ``RUN_DIR/endpoints/`` (:meth:`PrometheusSink.announce`), where ``top`` looks.
"""

from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

from smolcluster.telemetry.prometheus import (
    LABELS,
    REPLICA_GAUGES,
    SERVING_COUNTERS,
    SERVING_GAUGES,
    PrometheusSink,
    metrics_port,
)

_HARDWARE_EVERY_S = 1.0  # CPU / RSS are read (a few syscalls) at most this often, not every step


class ServingMetrics:
    def __init__(self, port: int, identity: dict, run_dir: str | Path | None = None, addr: str = "127.0.0.1",
                 kv_budget: int | None = None):
        """``kv_budget``: a stage's (None: the head, which holds no KV cache and serves no KV gauges)."""
        gauges = {k: v for k, v in SERVING_GAUGES.items() if kv_budget is not None or not k.startswith("kv_")}
        self.sink = PrometheusSink(port, identity, addr=addr, gauges=gauges, counters=SERVING_COUNTERS)
        g = self.sink.gauges
        self._active, self._waiting, self._kv = g["active"], g["waiting"], g.get("kv_bytes")
        self._draft_kv = g.get("kv_draft_bytes")
        self._tokens = self.sink.counters["tokens"]
        if kv_budget is not None:
            g["kv_budget"].set(kv_budget)
        self._hardware, self._next_hardware = None, 0.0
        self._totals: dict[str, int] = {}
        self._replicas: dict | None = None
        if run_dir is not None:
            self.sink.announce(Path(run_dir))

    def step(self, active: int, waiting: int, kv_bytes: int | None = None, draft_kv_bytes: int = 0) -> None:
        """The state after a step: requests running and waiting, KV bytes held (a stage's; of them, the draft
        model's on stage 0)."""
        self._active.set(active)
        self._waiting.set(waiting)
        if self._kv is not None:
            self._kv.set(kv_bytes)
            self._draft_kv.set(draft_kv_bytes)
        now = time.monotonic()
        if now >= self._next_hardware:
            from smolcluster.telemetry.hardware import HardwareSampler

            self._hardware = self._hardware or HardwareSampler()
            sample = self._hardware.sample()
            self.sink.gauges["cpu_percent"].set(sample["cpu_percent"])
            self.sink.gauges["rss_bytes"].set(sample["rss_bytes"])
            self._next_hardware = now + _HARDWARE_EVERY_S

    def tokens(self, n: int) -> None:
        """``n`` more tokens through this stage's layers (a head: answered)."""
        self._tokens.inc(n)

    def speculated(self, drafted: int, accepted: int) -> None:
        """Stage 0's speculative decoding totals so far (proposed, kept): the counters catch up to them."""
        self._catch_up(drafted=drafted, accepted=accepted)

    def prefix(self, hits: int, tokens: int, nbytes: int) -> None:
        """The prefix cache's totals so far (requests that reused blocks, tokens they skipped) and its bytes."""
        self._catch_up(prefix_hits=hits, prefix_tokens=tokens)
        self.sink.gauges["kv_prefix_bytes"].set(nbytes)

    def replicas(self, states: list[dict]) -> None:
        """A head's replicas: each ``{"replica", "up", "load", "served"}`` (REPLICA_GAUGES, labelled by replica)."""
        if self._replicas is None:
            from prometheus_client import Gauge

            self._replicas = {key: Gauge(name, help_, (*LABELS, "replica"), registry=self.sink.registry)
                              for key, (name, help_) in REPLICA_GAUGES.items()}
        values = [str(self.sink.identity.get(k, "")) for k in LABELS]
        for state in states:
            for key, gauge in self._replicas.items():
                gauge.labels(*values, str(state["replica"])).set(state[key])

    def _catch_up(self, **totals: int) -> None:
        for key, total in totals.items():
            self.sink.counters[key].inc(total - self._totals.get(key, 0))
            self._totals[key] = total

    def close(self) -> None:
        self.sink.close()


class _Off:
    """A node that publishes nothing: the same calls, doing nothing."""

    def step(self, active: int, waiting: int, kv_bytes: int | None = None, draft_kv_bytes: int = 0) -> None:
        pass

    def tokens(self, n: int) -> None:
        pass

    def speculated(self, drafted: int, accepted: int) -> None:
        pass

    def prefix(self, hits: int, tokens: int, nbytes: int) -> None:
        pass

    def replicas(self, states: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


OFF = _Off()


def open_serving_metrics(telemetry: dict | None, identity: dict, rank: int | None = None,
                         kv_budget: int | None = None) -> ServingMetrics | _Off:
    """This node's metrics, when ``telemetry`` (``{"prometheus_port", "prometheus_addr", "run_dir"}``, from
    ``logging.prometheus`` / ``logging.run_dir``) names a port; else :data:`OFF`. A taken port is a warning."""
    telemetry = telemetry or {}
    if telemetry.get("prometheus_port") is None:
        return OFF
    port = metrics_port(int(telemetry["prometheus_port"]), rank)
    try:
        return ServingMetrics(port, identity, telemetry.get("run_dir"), telemetry.get("prometheus_addr") or "127.0.0.1",
                              kv_budget)
    except OSError as e:
        logger.warning(f"no prometheus endpoint: port {port} is not free ({e}); choose another base with "
                       "logging.prometheus.port=N (the head takes N, stage i N+1+i) or 0 for any free port")
        return OFF
