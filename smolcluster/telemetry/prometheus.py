"""A Prometheus ``/metrics`` endpoint on each node, fed by the same rows as ``metrics.jsonl``.

Every series carries the node's identity (:data:`LABELS`), so one Prometheus
scraping every node of a cluster can tell them apart; ``observability/`` has the
scrape config and a Grafana dashboard that query exactly the names in :data:`METRICS`.

Ports (:func:`metrics_port`, training and inference alike): ``logging.prometheus.port`` is the base.
The node that coordinates (a server, the single ``local`` process, a chat head) takes the base; worker or
pipeline stage ``r`` takes ``base + 1 + r``, so several nodes on one machine never collide. ``0`` lets the
OS choose; the chosen port is logged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

LABELS = ("run_id", "node", "role", "rank", "algo")

# metrics.jsonl key -> (exposition name, help). Gauges take the value as it is.
_GAUGES = {
    "samples_per_s": ("smolcluster_samples_per_second", "training throughput of this node"),
    "loss": ("smolcluster_loss", "train loss (mean over the last log window)"),
    "eval_loss": ("smolcluster_eval_loss", "loss on the held-out set at the last evaluation"),
    "eval_accuracy": ("smolcluster_eval_accuracy", "accuracy on the held-out set at the last evaluation"),
    "lr": ("smolcluster_learning_rate", "scheduled learning rate"),
    "staleness_mean": ("smolcluster_staleness_mean", "EDP / allreduce: mean staleness of gradients in the last window"),
    "staleness_max": ("smolcluster_staleness_max", "EDP / allreduce: max staleness of gradients in the last window"),
    "allreduce_s": ("smolcluster_allreduce_seconds", "allreduce: ring time per step that backward did not hide (mean)"),
    "peers_alive": ("smolcluster_peers_alive", "workers (or stages) this node currently hears from"),
    "cpu_percent": ("smolcluster_cpu_percent", "CPU use of this process (100 = one core)"),
    "rss_bytes": ("smolcluster_rss_bytes", "resident memory of this process"),
    "trainable_params": ("smolcluster_trainable_parameters", "parameters this process trains (LoRA: its adapters)"),
    "params": ("smolcluster_parameters", "parameters of the whole model, frozen ones included"),
    "round_inner_steps": ("smolcluster_round_inner_steps", "diloco: inner steps this node took in its last round"),
    "round_bytes_sent": ("smolcluster_round_bytes_sent", "diloco: bytes this node sent in its last round (the outer sync)"),
    "inner_samples_per_s": ("smolcluster_inner_samples_per_second", "diloco: samples/s of this node's own inner steps"),
}
# metrics.jsonl key -> (exposition name, help). Counters: the row holds the running total.
_COUNTERS = {
    "step": ("smolcluster_steps_total", "optimizer steps (server/local) or gradient steps (worker)"),
    "samples": ("smolcluster_samples_total", "training samples processed"),
    "bytes_sent": ("smolcluster_bytes_sent_total", "bytes this node sent on the wire"),
    "bytes_received": ("smolcluster_bytes_received_total", "bytes this node received from the wire"),
    "dropped": ("smolcluster_gradients_dropped_total", "EDP: gradients dropped as too stale"),
    "rounds": ("smolcluster_rounds_total", "diloco: rounds completed (each ends with an outer step of every fragment)"),
}
METRICS = {name: help_ for name, help_ in [*_GAUGES.values(), *_COUNTERS.values()]}

# An inference stage's or chat head's figures (telemetry/serving.py sets them once per stage step).
SERVING_GAUGES = {
    "active": ("smolcluster_requests_active", "requests running in the pipeline (their KV caches held here)"),
    "waiting": ("smolcluster_requests_waiting", "requests waiting: for KV room (stage 0) or a slot (head)"),
    "kv_bytes": ("smolcluster_kv_cache_bytes", "KV-cache bytes the running requests hold on this stage"),
    "kv_budget": ("smolcluster_kv_cache_budget_bytes", "this stage's KV-cache budget (serve.kv_cache_mb)"),
    "kv_prefix_bytes": ("smolcluster_prefix_cache_bytes", "KV-cache bytes the prefix cache's blocks hold here"),
    "kv_draft_bytes": ("smolcluster_draft_kv_cache_bytes",
                       "of the KV-cache bytes, those the draft model's caches hold (speculate.draft, stage 0)"),
    "cpu_percent": _GAUGES["cpu_percent"],
    "rss_bytes": _GAUGES["rss_bytes"],
}
SERVING_COUNTERS = {
    "tokens": ("smolcluster_tokens_total", "tokens through this stage's layers (head: tokens answered)"),
    "drafted": ("smolcluster_speculative_drafted_total", "tokens proposed by speculative decoding (stage 0)"),
    "accepted": ("smolcluster_speculative_accepted_total", "proposed tokens the target kept (stage 0)"),
    "prefix_hits": ("smolcluster_prefix_hits_total", "requests that started from the prefix cache's blocks"),
    "prefix_tokens": ("smolcluster_prefix_tokens_saved_total", "prompt tokens not prefilled: the prefix cache had them"),
}
# A chat head's replicas (replicas>1), one series per replica (label ``replica``); top shows each replica's
# stages instead (their node is NAME-rR), so these are for Prometheus and /health's readers.
REPLICA_GAUGES = {
    "up": ("smolcluster_replica_up", "1 while this replica's pipeline takes requests, 0 while it is lost or rebuilt"),
    "load": ("smolcluster_replica_load", "requests routed to this replica and not finished (active + waiting there)"),
    "served": ("smolcluster_replica_requests_served", "requests routed to this replica since the head started"),
}
SERVING_METRICS = {name: help_ for name, help_ in [*SERVING_GAUGES.values(), *SERVING_COUNTERS.values()]}


RANKED_ROLES = ("worker", "stage")  # the roles whose nodes are numbered: they take base + 1 + rank


def metrics_port(base: int, rank: int | None) -> int:
    """The port a node serves /metrics on: ``base`` for the one that coordinates (a server, a local run, a chat
    head), ``base + 1 + r`` for rank ``r`` (a worker, a training or inference stage); 0 stays 0 (any free port)."""
    return 0 if base == 0 else base + (0 if rank is None else 1 + int(rank))


class PrometheusSink:
    """A metrics sink (``log(step, row)`` / ``close(summary)``) that serves what it is given on HTTP."""

    def __init__(self, port: int, identity: dict, addr: str = "127.0.0.1", gauges: dict = _GAUGES,
                 counters: dict = _COUNTERS):
        """``gauges`` / ``counters``: the families served (a training node's, or SERVING_GAUGES / _COUNTERS)."""
        self.registry = CollectorRegistry()
        values = [str(identity.get(k, "")) for k in LABELS]
        self.gauges = {key: Gauge(name, help_, LABELS, registry=self.registry).labels(*values)
                       for key, (name, help_) in gauges.items()}
        self.counters = {key: Counter(name, help_, LABELS, registry=self.registry).labels(*values)
                         for key, (name, help_) in counters.items()}
        self.totals = dict.fromkeys(counters, 0.0)
        self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port, self.addr, self.identity = self.server.server_address[1], addr, identity
        logger.info(f"prometheus metrics on http://{addr}:{self.port}/metrics")

    def announce(self, run_dir: Path) -> None:
        """Write ``RUN_DIR/endpoints/NODE-ROLERANK.json`` (the URL and labels), so ``smolcluster.top
        --run-dir`` finds every node of a run on this machine, ports chosen by the OS included."""
        i = self.identity
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "", "::") else self.addr
        path = Path(run_dir) / "endpoints" / f"{i.get('node', '')}-{i.get('role', '')}{i.get('rank', '')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"url": f"http://{host}:{self.port}/metrics", **{k: str(v) for k, v in i.items()}}))
        tmp.replace(path)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in {"step": step, **metrics}.items():
            if value is None or isinstance(value, (str, bool)):
                continue
            if key in self.gauges:
                self.gauges[key].set(value)
            elif key in self.counters and value > self.totals[key]:
                self.counters[key].inc(value - self.totals[key])
                self.totals[key] = value

    def close(self, summary: dict | None = None, exit_code: int = 0) -> None:
        self.server.shutdown()
        self.server.server_close()
