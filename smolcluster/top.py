"""``python -m smolcluster.top``: a live terminal view of a running cluster.

    python -m smolcluster.top                                # the newest run under runs/ (its endpoints/)
    python -m smolcluster.top --run-dir runs/DATE/TIME-syncps-mlp
    python -m smolcluster.top --targets 192.168.1.20:9400-9402,192.168.1.21:9401
    python -m smolcluster.top --once                         # one table on stdout, for scripts

It reads only what the nodes already publish: each node's Prometheus ``/metrics``
(``logging.prometheus.port=N``, or ``0`` for ports the OS picks; every node then writes
its URL to ``RUN_DIR/endpoints/``) and, with a run directory, the per-node JSON log
files for the last lines. So watching costs the hot path nothing: a scrape is served
by prometheus_client's own thread from values the node sets once per logged step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from smolcluster.launch.cli import command
from smolcluster.telemetry.prometheus import LABELS, METRICS, SERVING_METRICS
from smolcluster.telemetry.weights import WEIGHT_LABELS, WEIGHTS_GAUGES

# exposition name -> the short key the view uses (the metrics.jsonl key it came from)
_KEYS = {"smolcluster_steps": "step", "smolcluster_samples": "samples", "smolcluster_bytes_sent": "bytes_sent",
         "smolcluster_bytes_received": "bytes_received", "smolcluster_gradients_dropped": "dropped",
         "smolcluster_samples_per_second": "samples_per_s", "smolcluster_loss": "loss",
         "smolcluster_eval_loss": "eval_loss", "smolcluster_eval_accuracy": "eval_accuracy",
         "smolcluster_learning_rate": "lr", "smolcluster_staleness_mean": "staleness_mean",
         "smolcluster_staleness_max": "staleness_max", "smolcluster_peers_alive": "peers_alive",
         "smolcluster_allreduce_seconds": "allreduce_s",
         "smolcluster_cpu_percent": "cpu_percent", "smolcluster_rss_bytes": "rss_bytes",
         "smolcluster_trainable_parameters": "trainable_params", "smolcluster_parameters": "params",
         # algo=diloco's rounds
         "smolcluster_rounds": "rounds", "smolcluster_round_inner_steps": "round_inner_steps",
         "smolcluster_round_bytes_sent": "round_bytes_sent", "smolcluster_inner_samples_per_second": "inner_samples_per_s",
         # inference stages and the chat head (telemetry/serving.py)
         "smolcluster_requests_active": "active", "smolcluster_requests_waiting": "waiting",
         "smolcluster_kv_cache_bytes": "kv_bytes", "smolcluster_kv_cache_budget_bytes": "kv_budget",
         "smolcluster_tokens": "tokens", "smolcluster_speculative_drafted": "drafted",
         "smolcluster_speculative_accepted": "accepted", "smolcluster_prefix_hits": "prefix_hits",
         "smolcluster_prefix_tokens_saved": "prefix_tokens", "smolcluster_prefix_cache_bytes": "prefix_bytes",
         "smolcluster_draft_kv_cache_bytes": "draft_kv_bytes"}
assert {n.removesuffix("_total") for n in [*METRICS, *SERVING_METRICS]} <= set(_KEYS), "a metric the view does not know"
# a head's weights in flight (telemetry/weights.py): one series per (stage, peer), kept apart in values["weights"]
_WEIGHT_KEYS = {name: key for key, (name, _) in WEIGHTS_GAUGES.items()}


# -- where the nodes are -------------------------------------------------------------------------
def parse_targets(spec: str) -> list[str]:
    """``host:port`` / ``host:first-last`` items, comma-separated -> metrics URLs."""
    urls = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        host, _, ports = item.rpartition(":")
        if not host or not ports:
            raise ValueError(f"--targets item {item!r} is not host:port or host:first-last")
        first, _, last = ports.partition("-")
        for port in range(int(first), int(last or first) + 1):
            urls.append(f"http://{host}:{port}/metrics")
    return urls


def newest_run(root: Path = Path("runs")) -> Path | None:
    """The most recently started run directory under ``root`` that has announced endpoints."""
    found = sorted(root.glob("**/endpoints"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1].parent if found else None


def endpoints_of(run_dir: Path) -> dict[str, dict]:
    """``{url: labels}`` the nodes of a run announced (a node that has since stopped stays listed)."""
    found = {}
    for path in sorted((run_dir / "endpoints").glob("*.json")):
        try:
            info = json.loads(path.read_text())
            found[info.pop("url")] = {k: info.get(k, "") for k in LABELS}
        except (OSError, ValueError, KeyError, AttributeError):
            continue  # being written, or not ours
    return found


# -- what they say ---------------------------------------------------------------------------------
@dataclass
class Node:
    url: str
    labels: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    up: bool = False
    seen_at: float = 0.0
    rates: dict = field(default_factory=dict)  # per-second rates of counters, from the last two scrapes

    @property
    def serving(self) -> bool:
        """An inference stage or head (its own table: requests, tokens/s, KV) rather than a training node."""
        return "active" in self.values or self.labels.get("role") in ("stage", "head") and \
            self.labels.get("algo") in ("infer", "chat")

    @property
    def weights(self) -> bool:
        """A head's weights endpoint (its table: a line per stage the weights travel to)."""
        return self.labels.get("role") == "weights"

    @property
    def name(self) -> str:
        role, rank = self.labels.get("role", "?"), self.labels.get("rank", "")
        return f"{self.labels.get('node', '?')} {role}{rank}"


def scrape(url: str, timeout_s: float = 1.0) -> tuple[dict, dict] | None:
    """``(labels, {key: value})`` from one /metrics page; None when the node does not answer."""
    try:
        text = requests.get(url, timeout=timeout_s).text
    except requests.RequestException:
        return None
    labels, values = {}, {}
    for family in text_string_to_metric_families(text):
        key = _KEYS.get(family.name) or _WEIGHT_KEYS.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = {k: sample.labels.get(k, "") for k in LABELS}
            if family.name in _WEIGHT_KEYS:  # {(stage, peer): {total, need, done, rate}}
                where = tuple(sample.labels.get(k, "") for k in WEIGHT_LABELS)
                values.setdefault("weights", {}).setdefault(where, {})[key] = sample.value
            else:
                values[key] = sample.value
    return labels, values


class ClusterView:
    """Every node's latest figures; counters turned into rates between two polls."""

    def __init__(self, urls: list[str] | None = None, run_dir: Path | None = None, log_lines: int = 4):
        self.static, self.run_dir, self.log_lines = list(urls or []), run_dir, log_lines
        self.nodes: dict[str, Node] = {}
        self._pool = ThreadPoolExecutor(max_workers=8)

    def poll(self) -> list[Node]:
        announced = endpoints_of(self.run_dir) if self.run_dir is not None else {}
        urls = list(dict.fromkeys(self.static + list(announced)))
        now = time.monotonic()
        for url, got in zip(urls, self._pool.map(scrape, urls)):
            node = self.nodes.setdefault(url, Node(url, labels=announced.get(url, {})))
            if got is None or (url in announced and got[0].get("run_id") != announced[url].get("run_id")):
                node.up = False  # silent, or the port now belongs to another run's node
                continue
            labels, values = got
            dt = now - node.seen_at if node.up else 0.0
            for key in ("step", "samples", "bytes_sent", "bytes_received", "tokens"):
                if dt > 0 and key in values and key in node.values:
                    node.rates[key] = max(0.0, values[key] - node.values[key]) / dt
            node.labels, node.values, node.up, node.seen_at = labels, values, True, now
        # a scanned port range keeps only the ports where a node ever answered
        return [n for n in self.nodes.values() if n.labels]

    def last_logs(self, node: Node) -> list[str]:
        """The node's last log lines, from its JSON log in the run directory (empty without one)."""
        if self.run_dir is None or not node.labels:
            return []
        lb = node.labels
        path = self.run_dir / f"node-{lb.get('node')}-{lb.get('role')}{lb.get('rank')}.log.jsonl"
        if not path.is_file():
            return []
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 32_768))  # the tail only: logs can be large
            lines = deque(f.read().decode("utf-8", "replace").splitlines()[1:], maxlen=self.log_lines)
        out = []
        for line in lines:
            try:
                rec = json.loads(line)["record"]
                out.append(f"{rec['time']['repr'][11:19]} {rec['level']['name'][:4]} {rec['message']}")
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)


# -- how it looks ----------------------------------------------------------------------------------
COLUMNS = ("node", "role", "state", "step", "steps/s", "loss", "samples/s", "staleness", "sent/s", "recv/s",
           "sent/step", "trainable", "peers", "CPU %", "RSS")
# added when a node runs algo=diloco: its rounds, the inner steps and bytes sent of its last round, its own
# inner samples/s (its samples/s column is the lead's, for the whole ring)
ROUND_COLUMNS = ("rounds", "inner/round", "sent/round", "inner samples/s")


def training_columns(nodes: list[Node]) -> tuple[str, ...]:
    return COLUMNS + ROUND_COLUMNS if any("rounds" in n.values for n in nodes) else COLUMNS


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _bytes(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _rate(value) -> str:
    return "-" if value is None else _bytes(value) + "/s"


def row_of(node: Node, rounds: bool = False) -> tuple[str, ...]:
    """The node's training row (``rounds``: with the ROUND_COLUMNS)."""
    v = node.values
    extra = (_num(v.get("rounds"), ".0f"), _num(v.get("round_inner_steps"), ".0f"), _bytes(v.get("round_bytes_sent")),
             _num(v.get("inner_samples_per_s"), ".0f")) if rounds else ()
    return _base_row(node) + extra


def _base_row(node: Node) -> tuple[str, ...]:
    v, r, lb = node.values, node.rates, node.labels
    staleness = None if "staleness_mean" not in v else f"{v['staleness_mean']:.1f}/{v.get('staleness_max', 0):.0f}"
    return (lb.get("node", "?"), f"{lb.get('role', '')}{lb.get('rank', '')}", "up" if node.up else "DOWN",
            _num(v.get("step"), ".0f"), _num(r.get("step"), ".1f"), _num(v.get("loss"), ".4f"),
            _num(v.get("samples_per_s"), ".0f"), staleness or "-", _rate(r.get("bytes_sent")), _rate(r.get("bytes_received")),
            _bytes(r["bytes_sent"] / r["step"]) if r.get("step") and "bytes_sent" in r else "-", _trainable(v),
            _num(v.get("peers_alive"), ".0f"), _num(v.get("cpu_percent"), ".0f"), _bytes(v.get("rss_bytes")))


def _trainable(v: dict) -> str:
    """Trainable / all parameters (a LoRA run trains a few percent of them)."""
    if v.get("trainable_params") is None or not v.get("params"):
        return "-"
    return f"{v['trainable_params']:,.0f}/{v['params']:,.0f} ({v['trainable_params'] / v['params']:.1%})"


SERVING_COLUMNS = ("node", "role", "state", "active", "waiting", "tokens/s", "tokens", "KV MB", "KV budget MB",
                   "accepted %", "prefix hits", "CPU %", "RSS")


def serving_row_of(node: Node) -> tuple[str, ...]:
    v, r, lb = node.values, node.rates, node.labels
    kv, budget = v.get("kv_bytes"), v.get("kv_budget")
    drafted = v.get("drafted")  # speculate.k on stage 0: the share of proposed tokens the target kept
    return (lb.get("node", "?"), f"{lb.get('role', '')}{lb.get('rank', '')}", "up" if node.up else "DOWN",
            _num(v.get("active"), ".0f"), _num(v.get("waiting"), ".0f"), _num(r.get("tokens"), ".1f"),
            _num(v.get("tokens"), ".0f"), _num(kv and kv / 2**20, ".2f"), _num(budget and budget / 2**20, ".0f"),
            _num(100 * v.get("accepted", 0) / drafted if drafted else None, ".0f"),
            _num(v.get("prefix_hits"), ".0f"),  # requests that started from the prefix cache (inference/prefix.py)
            _num(v.get("cpu_percent"), ".0f"), _bytes(v.get("rss_bytes")))


WEIGHTS_COLUMNS = ("stage", "to", "state", "sent", "MB/s", "time left")


def weights_rows_of(node: Node) -> list[tuple[str, ...]]:
    """A line per stage (per agent: ``stage`` names the stages it runs) the head's weights travel to: MB sent of
    those to send while in flight, then what was sent (``cached: 0 bytes sent`` when the agent held them all)."""
    rows = []
    for (stage, peer), w in sorted(node.values.get("weights", {}).items()):
        need, done, rate = w.get("need", 0), w.get("done", 0), w.get("rate", 0)
        if not need:
            state, sent = "cached: 0 bytes sent", f"{w.get('total', 0) / 2**20:.1f} MB held there"
        else:
            state = "sending" if done < need else "done"
            sent = f"{done / 2**20:.1f}/{need / 2**20:.1f} MB"
        left = "-" if done >= need or not rate else f"{(need - done) / rate:.0f}s"
        rows.append((stage, peer, state if node.up else f"{state} (head gone)", sent,
                     _num(rate / 2**20 if need else None, ".1f"), left))
    return rows


def rich_tables(nodes: list[Node]) -> list:
    """A training table, an inference table and the weights' lines, each when it has nodes."""
    from rich.table import Table

    training = [n for n in nodes if not n.serving and not n.weights]
    columns = training_columns(training)
    kinds = [("smolcluster", columns, lambda n: [row_of(n, columns != COLUMNS)], training),
             ("smolcluster inference", SERVING_COLUMNS, lambda n: [serving_row_of(n)], [n for n in nodes if n.serving]),
             ("smolcluster weights", WEIGHTS_COLUMNS, weights_rows_of, [n for n in nodes if n.weights])]
    out = []
    for title, columns, rows, group in [k for k in kinds if k[3]] or kinds[:1]:
        table = Table(*columns, title=title)
        for node in group:
            for row in rows(node):
                table.add_row(*row)
        out.append(table)
    return out


def no_logs_hint(view: ClusterView) -> str:
    """Why the log pane is empty, in the words that fit this view."""
    if view.run_dir is None:
        return "(no log lines: give --run-dir RUN_DIR for them)"
    return (f"(no log lines in {view.run_dir} for these nodes: a node on another machine writes its log "
            "into the run directory there)")


def no_nodes_reason(view: ClusterView, nodes: list[Node]) -> str:
    """One line on why ``--once`` found nothing to show."""
    if nodes:
        return f"none of the {len(nodes)} nodes answered on /metrics: the run has ended or its nodes are down"
    where = f"{view.run_dir}" if view.run_dir is not None else "the given --targets"
    return (f"no node publishes metrics for {where}: start the run with logging.prometheus.port=0 (or N), "
            "or give --targets host:port")


def make_app(view: ClusterView, interval_s: float):
    """The Textual app (built here so ``--once`` never imports Textual)."""
    from textual.app import App, ComposeResult
    from textual.widgets import DataTable, Footer, Header, Static

    class TopApp(App):
        TITLE = "smolcluster top"
        BINDINGS = [("q", "quit", "Quit")]
        CSS = "DataTable { height: auto; max-height: 40%; } #logs { height: 1fr; border-top: solid $accent; }"

        def compose(self) -> ComposeResult:
            yield Header()
            yield DataTable(id="nodes", zebra_stripes=True)  # training nodes
            yield DataTable(id="stages", zebra_stripes=True)  # inference stages and heads
            yield DataTable(id="weights", zebra_stripes=True)  # a line per stage the head's weights travel to
            yield Static("", id="logs")
            yield Footer()

        def on_mount(self) -> None:
            self.query_one("#nodes", DataTable).add_columns(*COLUMNS)
            self.query_one("#stages", DataTable).add_columns(*SERVING_COLUMNS)
            self.query_one("#weights", DataTable).add_columns(*WEIGHTS_COLUMNS)
            self.polls = 0
            self.refresh_view()
            self.set_interval(interval_s, self.refresh_view)

        def refresh_view(self) -> None:
            self.run_worker(self._poll, thread=True, exclusive=True, group="poll")

        def _poll(self) -> None:
            nodes = view.poll()
            logs = {n.name: view.last_logs(n) for n in nodes}
            self.call_from_thread(self._show, nodes, logs)

        def _show(self, nodes: list[Node], logs: dict) -> None:
            training = [n for n in nodes if not n.serving and not n.weights]
            columns = training_columns(training)
            table = self.query_one("#nodes", DataTable)
            if len(table.columns) != len(columns):  # a diloco node appeared: its round columns
                table.clear(columns=True)
                table.add_columns(*columns)
            groups = (("#nodes", lambda n: [row_of(n, columns != COLUMNS)], training),
                      ("#stages", lambda n: [serving_row_of(n)], [n for n in nodes if n.serving]),
                      ("#weights", weights_rows_of, [n for n in nodes if n.weights]))
            for table_id, rows, group in groups:
                table = self.query_one(table_id, DataTable)
                table.clear()
                for node in group:
                    for i, row in enumerate(rows(node)):
                        table.add_row(*row, key=f"{node.url}#{i}")
                table.display = bool(group) or (table_id == "#nodes" and not nodes)
            where = view.run_dir or ", ".join(view.static) or "nothing"
            self.sub_title = f"{len(nodes)} nodes · {where}"
            text = [f"[b]{name}[/b]\n" + "\n".join(f"  {line}" for line in lines) for name, lines in logs.items() if lines]
            self.query_one("#logs", Static).update("\n".join(text) or no_logs_hint(view))
            self.polls += 1

        def on_unmount(self) -> None:
            view.close()

    return TopApp()


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.top", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Nodes publish their figures with logging.prometheus.port=N (or 0). "
                                       "Docs: docs/logging.md.")
    p.add_argument("--run-dir", type=Path, help="a run directory on this machine (default: the newest under runs/)")
    p.add_argument("--targets", default="", help="host:port or host:first-last, comma-separated (other machines)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    args = p.parse_args(argv)
    try:
        urls = parse_targets(args.targets)
    except ValueError as e:
        p.error(str(e))
    run_dir = args.run_dir or (None if urls else newest_run())
    if run_dir is None and not urls:
        p.error("no run to watch: give --run-dir RUN_DIR (started with logging.prometheus.port=0 or N) or "
                "--targets host:port,...")
    if run_dir is not None and not run_dir.is_dir():
        p.error(f"--run-dir {run_dir}: no such directory")
    view = ClusterView(urls, run_dir)
    if args.once:
        from rich.console import Console

        view.poll()
        time.sleep(args.interval)  # a second look, so the rates (steps/s, bytes/s) have a span
        nodes = view.poll()
        console = Console()
        if not console.is_terminal:
            console.width = 160  # a pipe or a file: do not squeeze the columns to 80
        view.close()
        for table in rich_tables(nodes) if nodes else []:
            console.print(table)
        if not any(n.up for n in nodes):
            print(f"smolcluster top: {no_nodes_reason(view, nodes)}", file=sys.stderr)
            return 1
        return 0
    make_app(view, args.interval).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
