"""What the head publishes while weights travel to the stages (node/weightsend.py), for ``smolcluster.top``.

One series per agent the head sends to, labelled ``stage`` (the stages that agent runs: ``0``, ``0,2``; with
replicas ``r1 0``) and ``peer`` (the agent's name and address). They are set once per acknowledged chunk (1 MB),
never per byte, and stay after the transfer until the head stops, so ``top`` shows what each stage was sent
(``cached: 0 bytes sent`` on a second run).

The endpoint is the sender's own: the ``infer`` / ``chat`` head's with ``cluster=auto`` (node/coordinator.py), or
``launchers.ssh serve --weights``' (launchers/ssh_weights.py, a line per stage host). The head's serving
figures take ``logging.prometheus.port`` only once the stages run, so this one takes a port the OS picks and
announces it as ``RUN_DIR/endpoints/NODE-weights.json``, where ``top --run-dir`` looks.
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import Gauge

from smolcluster.telemetry.prometheus import LABELS, PrometheusSink

# key -> (exposition name, help); labels: LABELS + ("stage", "peer")
WEIGHTS_GAUGES = {
    "total": ("smolcluster_weights_bytes", "bytes of weights the stages on this agent need (all their cache entries)"),
    "need": ("smolcluster_weights_bytes_to_send", "of those, the bytes the agent lacked when the transfer began"),
    "done": ("smolcluster_weights_bytes_done", "bytes sent to the agent and acknowledged so far"),
    "rate": ("smolcluster_weights_bytes_per_second", "mean rate of this agent's transfer so far (since its first byte)"),
}
WEIGHT_LABELS = ("stage", "peer")


class WeightsMetrics:
    """The head's weights gauges on a /metrics endpoint of their own (``role=weights``)."""

    def __init__(self, identity: dict, run_dir: str | Path | None, addr: str = "127.0.0.1"):
        self.sink = PrometheusSink(0, {**identity, "role": "weights", "rank": ""}, addr=addr, gauges={}, counters={})
        self.gauges = {key: Gauge(name, help_, (*LABELS, *WEIGHT_LABELS), registry=self.sink.registry)
                       for key, (name, help_) in WEIGHTS_GAUGES.items()}
        self._ids = [str(self.sink.identity.get(k, "")) for k in LABELS]
        self._began: dict[tuple[str, str], float] = {}
        if run_dir is not None:
            self.sink.announce(Path(run_dir))

    def show(self, stage: str, peer: str, total: int, need: int, done: int) -> None:
        """One agent's transfer now: ``done`` of the ``need`` bytes it lacked (of ``total`` its stages use)."""
        now = time.monotonic()
        if done == 0:  # a transfer (re)starts: its rate counts from here, not from an earlier one's start
            self._began[(stage, peer)] = now
        began = self._began.setdefault((stage, peer), now)
        values = {"total": total, "need": need, "done": done, "rate": done / (now - began) if now > began else 0.0}
        for key, value in values.items():
            self.gauges[key].labels(*self._ids, stage, peer).set(value)

    def close(self) -> None:
        self.sink.close()


def open_weights_metrics(telemetry: dict | None, identity: dict) -> WeightsMetrics | None:
    """The head's weights endpoint when ``logging.prometheus.port`` is given (``telemetry``: the Pipeline's), else
    None. A port the OS cannot give is a warning, not a failure: the weights still travel."""
    telemetry = telemetry or {}
    if telemetry.get("prometheus_port") is None:
        return None
    try:
        return WeightsMetrics({**identity, "run_id": telemetry.get("run_id", identity.get("run_id", ""))},
                              telemetry.get("run_dir"), telemetry.get("prometheus_addr") or "127.0.0.1")
    except OSError as e:
        from loguru import logger

        logger.warning(f"no prometheus endpoint for the weights' progress: {e}")
        return None
