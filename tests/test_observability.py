"""observability/: the Grafana dashboard, its provisioning, the compose file and the Prometheus config.

The dashboard is checked against Grafana's own schema (the Python models of
grafana-foundation-sdk, generated from Grafana 11.6's dashboard and panel schemas), every
query in it against the names the code emits (smolcluster.telemetry.loki / .prometheus),
and the PromQL and the scrape config with promtool (Debian's prometheus package;
`make test-deps` installs it).
"""

from __future__ import annotations

import enum
import json
import re
import shutil
import subprocess
import sys
import types
import typing
import urllib.request
from pathlib import Path, PurePosixPath

import pytest
import yaml

from smolcluster.telemetry import loki as loki_mod
from smolcluster.telemetry import prometheus as prom_mod

REPO = Path(__file__).resolve().parents[1]
OBS = REPO / "observability"
DASHBOARD = OBS / "grafana" / "dashboards" / "smolcluster.json"
COMPOSE = OBS / "docker-compose.yml"
DATASOURCES = OBS / "grafana" / "provisioning" / "datasources" / "datasources.yml"
PROVIDERS = OBS / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
PROM_CONFIG = OBS / "prometheus.yml"
TARGETS = OBS / "targets.json"

LOKI_LABELS = set(loki_mod.STREAM_LABELS)
PROM_LABELS = set(prom_mod.LABELS) | {"job", "instance"}  # Prometheus adds job and instance
METRICS = set(prom_mod.METRICS)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus: make test-deps)")

# Grafana's global variables and the values used when a query is checked outside Grafana.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range", "$__auto")


# -- reading the files -----------------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def all_panels(dash: dict) -> list[dict]:
    """Panels in order, the ones nested in collapsed rows included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def provisioned_uids() -> dict[str, str]:
    """uid -> datasource type, from the provisioning file."""
    return {d["uid"]: d["type"] for d in load_yaml(DATASOURCES)["datasources"]}


def queries(dash: dict) -> list[tuple[str, str, str, str | None]]:
    """(where, datasource type, query, legendFormat) for every panel target and query variable."""
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            ds = t.get("datasource") or p.get("datasource")
            out.append((f"panel {p['title']!r} {t['refId']}", ds["type"], t["expr"], t.get("legendFormat")))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
            out.append((f"variable {v['name']!r}", v["datasource"]["type"], q, None))
    return out


# -- a small PromQL / LogQL reader: label names and metric names ------------------------------------

STRING = r'"(?:[^"\\]|\\.)*"|`[^`]*`'
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(' + STRING + r')\s*')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)
LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "rate", "irate", "increase", "delta", "idelta", "deriv",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
    "quantile_over_time", "histogram_quantile", "abs", "clamp_min", "clamp_max", "round",
    "time", "timestamp", "vector", "scalar", "label_replace", "absent", "resets", "changes",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset"}
LOGQL_FUNCTIONS = {"sum", "avg", "min", "max", "count", "topk", "bottomk", "rate", "count_over_time",
                   "bytes_rate", "bytes_over_time", "sum_over_time", "avg_over_time"}


def matchers(selector_body: str, where: str) -> list[tuple[str, str, str]]:
    """The (label, op, value) of a `{...}` body; fails on anything that is not a matcher."""
    out, pos = [], 0
    body = selector_body.strip()
    while pos < len(body):
        m = MATCHER.match(body, pos)
        assert m, f"{where}: cannot read the label matchers {{{selector_body}}}"
        out.append((m.group(1), m.group(2), m.group(3)[1:-1]))
        pos = m.end()
        if pos < len(body):
            assert body[pos] == ",", f"{where}: cannot read the label matchers {{{selector_body}}}"
            pos += 1
    return out


def selectors(expr: str) -> list[str]:
    """Bodies of the `{...}` selectors, Grafana's `{{label}}` legend syntax aside."""
    no_strings = re.sub(STRING, lambda m: '"' + "_" * (len(m.group(0)) - 2) + '"', expr)
    return [expr[m.start() + 1:m.end() - 1] for m in re.finditer(r"\{[^{}]*\}", no_strings)]


def labels_and_metrics(expr: str, where: str, logql: bool) -> tuple[set[str], set[str], set[str]]:
    """(every label name used, the labels of `by (...)` clauses, the metric names) of a query."""
    labels: set[str] = set()
    m = LABEL_VALUES.match(expr)
    if m:  # a Grafana variable query: label_values(selector, label)
        expr = m.group(1)
        labels.add(m.group(2))
    for body in selectors(expr):
        labels |= {name for name, _, _ in matchers(body, where)}
    by_labels: set[str] = set()
    for _, names in GROUPING.findall(expr):
        names = {n.strip() for n in names.split(",") if n.strip()}
        labels |= names
        by_labels |= names
    # what is left once strings, selectors, ranges and groupings are cut out: functions and metric names
    rest = re.sub(STRING, " ", expr)
    rest = re.sub(r"\{[^{}]*\}", " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = GROUPING.sub(" ", rest)
    metrics = set()
    if logql:
        # line filters (|= |~ != !~ "...") lost their strings above; label filters are `| name op`
        labels |= set(re.findall(r"\|\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=|>|<)", expr))
        assert not re.search(r"\|\s*(json|logfmt|regexp|pattern|unpack)\b", expr), \
            f"{where}: a parser stage would make labels the code does not emit"
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", re.sub(r"\|\s*[A-Za-z_]\w*\s*(=~|!~|!=|=)", " ", rest)))
        unknown = words - LOGQL_FUNCTIONS - PROMQL_KEYWORDS
        assert not unknown, f"{where}: unknown words {sorted(unknown)} in LogQL {expr!r}"
    else:
        for w in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", rest):
            name = w.group(0)
            if name in PROMQL_KEYWORDS:
                continue
            if re.match(r"\s*\(", rest[w.end():]):
                assert name in PROMQL_FUNCTIONS, f"{where}: unknown PromQL function {name!r}"
            else:
                metrics.add(name)
    return labels, by_labels, metrics


def promql_for_promtool(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by values."""
    m = LABEL_VALUES.match(expr)
    if m:
        expr = m.group(1)
    for var in GRAFANA_INTERVALS:
        expr = expr.replace(var, "5m")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


# -- the dashboard against Grafana's schema ----------------------------------------------------------

def _check_type(value, hint, path: str, errors: list[str]) -> None:
    """Is ``value`` (as decoded by the SDK's from_json) what the schema's type hint says?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is object:
        if type(value).__module__.startswith("grafana_foundation_sdk.models"):
            _check_model(value, path, errors)  # e.g. a panel's options, decoded per panel type
        return
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return
        best = None
        for a in args:
            if a is type(None):
                continue
            errs: list[str] = []
            _check_type(value, a, path, errs)
            if not errs:
                return
            if best is None or (isinstance(a, type) and isinstance(value, a)):
                best = errs
        errors.extend(best or [f"{path}: {value!r} is not {hint}"])
    elif origin is typing.Literal:
        if value not in args:
            errors.append(f"{path}: {value!r} is not one of {args}")
    elif origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: {value!r} is not a list")
            return
        for i, v in enumerate(value):
            _check_type(v, args[0], f"{path}[{i}]", errors)
    elif origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: {value!r} is not an object")
            return
        for k, v in value.items():
            _check_type(v, args[1], f"{path}.{k}", errors)
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        if value not in {m.value for m in hint}:
            errors.append(f"{path}: {value!r} is not one of {[m.value for m in hint]}")
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if hint is int else (int, float)):
            errors.append(f"{path}: {value!r} is not {hint.__name__}")
    elif hint in (str, bool):
        if not isinstance(value, hint):
            errors.append(f"{path}: {value!r} is not {hint.__name__}")
    elif isinstance(hint, type):
        if not isinstance(value, hint):
            errors.append(f"{path}: {type(value).__name__} is not {hint.__name__}")
        else:
            _check_model(value, path, errors)
    else:
        errors.append(f"{path}: no check for the type {hint}")


def _check_model(obj, path: str, errors: list[str]) -> None:
    for name, hint in typing.get_type_hints(type(obj)).items():
        _check_type(getattr(obj, name, None), hint, f"{path}.{name}", errors)


def _dropped_keys(src, out, path="$") -> list[str]:
    """Keys of the source JSON that did not survive decoding + encoding: unknown to the schema."""
    if isinstance(src, dict) and isinstance(out, dict):
        missing = [f"{path}.{k}" for k in src if k not in out]
        return missing + [d for k in src if k in out for d in _dropped_keys(src[k], out[k], f"{path}.{k}")]
    if isinstance(src, list) and isinstance(out, list):
        return [d for i, (a, b) in enumerate(zip(src, out)) for d in _dropped_keys(a, b, f"{path}[{i}]")]
    return [] if src == out else [f"{path}: {src!r} came back as {out!r}"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="grafana-foundation-sdk needs Python 3.11+")
def test_dashboard_is_valid_against_grafanas_schema():
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.runtime import UnknownDataquery
    from grafana_foundation_sdk.models import dashboard as schema

    plugins.register_default_plugins()  # per panel type options, per datasource queries
    src = load_dashboard()
    dash = schema.Dashboard.from_json(src)

    errors: list[str] = []
    _check_model(dash, "$", errors)
    assert not errors, "dashboard does not match Grafana's schema:\n" + "\n".join(errors)

    back = json.loads(json.dumps(dash, cls=JSONEncoder))
    dropped = _dropped_keys(src, back)
    assert not dropped, "keys Grafana's schema does not know (typos?):\n" + "\n".join(dropped)

    for p in dash.panels:
        for t in getattr(p, "targets", None) or []:
            assert not isinstance(t, UnknownDataquery), f"panel {p.title!r}: a query of no known datasource type"


# -- the dashboard's structure (what Grafana's provisioning and the users need) ----------------------

def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] == "smolcluster" and dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 39
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    # the grid: inside 24 columns, no two panels on the same cell
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]

    uids = provisioned_uids()
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] in uids, f"{p['title']!r}: datasource {p['datasource']} not provisioned"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), f"{p['title']!r}: refIds {refs}"
        for t in p["targets"]:
            ds = t.get("datasource", p["datasource"])
            assert uids.get(ds["uid"]) == ds["type"], f"{p['title']!r}: datasource {ds} not provisioned"
            assert t["expr"].strip(), f"{p['title']!r} {t['refId']}: empty query"
    for v in dash["templating"]["list"]:
        if "datasource" in v:
            assert uids.get(v["datasource"]["uid"]) == v["datasource"]["type"], v["name"]

    # the panels the issue asks for, each on the metric it is about
    def exprs(title_part: str) -> str:
        found = [p for p in panels if title_part.lower() in p["title"].lower() and p["type"] != "row"]
        assert found, f"no panel titled like {title_part!r}"
        return " ".join(t["expr"] for p in found for t in p["targets"])
    assert "smolcluster_loss{" in exprs("train loss")
    assert "smolcluster_eval_loss" in exprs("eval loss")
    assert "smolcluster_eval_accuracy" in exprs("eval accuracy")
    assert "smolcluster_samples_per_second" in exprs("samples/s per node")
    assert {"smolcluster_staleness_mean", "smolcluster_staleness_max"} <= set(re.findall(r"\w+", exprs("staleness")))
    wire = exprs("bytes on the wire")
    assert "rate(smolcluster_bytes_sent_total" in wire and "rate(smolcluster_bytes_received_total" in wire
    assert "smolcluster_peers_alive" in exprs("peers alive")
    assert "smolcluster_cpu_percent" in exprs("cpu")
    assert "smolcluster_rss_bytes" in exprs("rss")

    # the variables, and the logs panel filtered by all of them
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"run_id", "node", "role", "search"} <= set(variables)
    assert variables["search"]["type"] == "textbox"
    logs = [p for p in panels if p["type"] == "logs"]
    assert len(logs) == 1 and uids[logs[0]["datasource"]["uid"]] == "loki"
    log_query = logs[0]["targets"][0]["expr"]
    assert '|~ "$search"' in log_query
    for name in ("run_id", "node", "role"):
        assert f'{name}=~"${name}"' in log_query
    # every metric panel follows the variables too
    for where, ds_type, q, _ in queries(dash):
        if where.startswith("panel") and ds_type == "prometheus":
            for name in ("run_id", "node", "role"):
                assert f'{name}=~"${name}"' in q, f"{where}: {q!r} ignores ${name}"


# -- the queries against the names the code emits ---------------------------------------------------

def test_queries_use_only_the_labels_and_metrics_the_code_emits():
    dash = load_dashboard()
    job = load_yaml(PROM_CONFIG)["scrape_configs"][0]["job_name"]
    seen_metrics: set[str] = set()
    for where, ds_type, q, legend in queries(dash):
        assert ds_type in ("prometheus", "loki"), where
        logql = ds_type == "loki"
        allowed = LOKI_LABELS if logql else PROM_LABELS
        labels, by_labels, metrics = labels_and_metrics(q, where, logql)
        assert labels <= allowed, f"{where}: labels {sorted(labels - allowed)} are not emitted: {q!r}"
        assert metrics <= METRICS, f"{where}: metrics {sorted(metrics - METRICS)} are not emitted: {q!r}"
        seen_metrics |= metrics
        # each query is scoped to smolcluster's own streams / job
        jobs = {v for body in selectors(q) for name, op, v in matchers(body, where) if name == "job"}
        assert jobs == {loki_mod.JOB if logql else job}, f"{where}: job matcher {jobs} in {q!r}"
        if legend and legend != "__auto":
            used = set(LEGEND_LABEL.findall(legend))
            assert used <= allowed, f"{where}: legend {legend!r} uses labels that are not emitted"
            if by_labels:
                assert used <= by_labels, f"{where}: legend {legend!r} names labels that `by` drops"
    assert job == "smolcluster"
    # the dashboard shows every metric the code serves
    assert seen_metrics == METRICS, f"not on the dashboard: {sorted(METRICS - seen_metrics)}"


def test_the_query_reader_catches_wrong_names():
    """The checks above are only as good as this reader: it must see what a typo changes."""
    labels, by, metrics = labels_and_metrics(
        'sum by (node, host) (rate(smolcluster_bytes_sent{job="smolcluster", gpu=~"$node"}[$__rate_interval]))',
        "t", logql=False)
    assert labels == {"node", "host", "job", "gpu"} and by == {"node", "host"}
    assert metrics == {"smolcluster_bytes_sent"}
    labels, _, _ = labels_and_metrics('{job="smolcluster", hostname="x"} |~ "$search" | lvl="info"', "t", logql=True)
    assert labels == {"job", "hostname", "lvl"}
    labels, _, metrics = labels_and_metrics('label_values({job="smolcluster", run_id=~"$run_id"}, node)', "t", False)
    assert labels == {"job", "run_id", "node"} and metrics == set()
    with pytest.raises(AssertionError):
        labels_and_metrics('{job="smolcluster"} | json', "t", logql=True)
    with pytest.raises(AssertionError):
        labels_and_metrics('rated(smolcluster_steps_total[5m])', "t", logql=False)


@needs_promtool
def test_promql_parses(tmp_path):
    """promtool parses every PromQL query of the dashboard (as recording rules)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": promql_for_promtool(q)}
             for i, (_, ds_type, q, _) in enumerate(queries(load_dashboard())) if ds_type == "prometheus"]
    assert len(rules) > 10
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_the_metrics_endpoint_passes_promtool_and_serves_what_the_dashboard_queries():
    sink = prom_mod.PrometheusSink(0, {"run_id": "r1", "node": "n1", "role": "worker", "rank": 0,
                                       "algo": "edp"}, addr="127.0.0.1")
    try:
        sink.log(3, {"loss": 0.5, "samples": 192, "bytes_sent": 1000, "samples_per_s": 10.0})
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        sink.close()
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    served = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    for name in METRICS:  # prometheus_client's TYPE line of a counter drops _total
        assert name in served or name.removesuffix("_total") in served, f"{name} is not served"
    series = re.search(r"^smolcluster_loss\{([^}]*)\} 0\.5$", text, re.M)
    assert series, text
    assert {n for n, _, _ in matchers(series.group(1), "exposition")} == set(prom_mod.LABELS)


# -- provisioning, compose, Loki and Prometheus configs ---------------------------------------------

def test_grafana_provisioning():
    ds = load_yaml(DATASOURCES)
    assert ds["apiVersion"] == 1
    by_uid = {d["uid"]: d for d in ds["datasources"]}
    assert by_uid["loki"]["type"] == "loki" and by_uid["prometheus"]["type"] == "prometheus"
    services = load_yaml(COMPOSE)["services"]
    for d in ds["datasources"]:  # the host's loopback (every service shares the host's network), its port
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/?", d["url"])
        assert m and listens(services[d["type"]])[1] == m.group(1), d["url"]

    providers = load_yaml(PROVIDERS)
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    host_dir = host_path("grafana", provider["options"]["path"])
    assert (host_dir / "smolcluster.json").resolve() == DASHBOARD.resolve()
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or host_path("grafana", home).resolve() == DASHBOARD.resolve()
    assert host_path("grafana", "/etc/grafana/provisioning/datasources").resolve() == DATASOURCES.parent.resolve()


def listens(service: dict) -> tuple[str, str]:
    """(default address, port) a compose service listens on, from its command line or environment."""
    env = service.get("environment", {})
    if "GF_SERVER_HTTP_ADDR" in env:
        return default_of(env["GF_SERVER_HTTP_ADDR"]), env["GF_SERVER_HTTP_PORT"]
    for arg in service["command"]:
        if arg.startswith(("--web.listen-address=", "-server.http-listen-address=")):
            value = default_of(arg.split("=", 1)[1])
            if arg.startswith("--web"):
                return tuple(value.rsplit(":", 1))
            cfg = load_yaml(host_path("loki", "/etc/loki/loki.yml"))
            return value, str(cfg["server"]["http_listen_port"])
    raise AssertionError(f"no listen address in {service}")


def default_of(value: str) -> str:
    """What compose makes of ``${VAR:-default}`` when VAR is unset."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return m.group(1) if m else value


def host_path(service: str, container_path: str) -> Path:
    """Where a path inside a compose service's container comes from in the repo (bind mounts)."""
    target = PurePosixPath(container_path)
    for vol in load_yaml(COMPOSE)["services"][service].get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith((".", "/")) and (target == PurePosixPath(dst) or PurePosixPath(dst) in target.parents):
            return (COMPOSE.parent / src / target.relative_to(dst)).resolve()
    raise AssertionError(f"{container_path} is not mounted from the repo into {service}")


def test_compose_file():
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"loki", "grafana", "prometheus"}
    want = {"loki": ("grafana/loki:3.", "3100"), "grafana": ("grafana/grafana:1", "3000"),
            "prometheus": ("prom/prometheus:v", "9090")}
    for name, (image, port) in want.items():
        s = services[name]
        assert s["image"].startswith(image) and re.search(r":v?\d+\.\d+\.\d+$", s["image"]), \
            f"{name}: pin the image version ({s['image']})"
        # off the LAN by default: the host's network, listening on loopback, nothing published
        assert s["network_mode"] == "host" and "ports" not in s, name
        assert listens(s) == ("127.0.0.1", port), name
        for vol in s.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (COMPOSE.parent / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in compose["volumes"], f"{name}: named volume {src} is not declared"
    # persistent data
    assert any(v.split(":")[1] == "/var/lib/grafana" for v in services["grafana"]["volumes"])
    assert any(v.split(":")[1] == "/prometheus" for v in services["prometheus"]["volumes"])
    assert any(v.split(":")[1] == "/loki" for v in services["loki"]["volumes"])
    # Prometheus reads the repo's config and targets; nobody can stop or reload it over HTTP
    assert not any("lifecycle" in a or "admin-api" in a for a in services["prometheus"]["command"])
    (config,) = [a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file=")]
    assert host_path("prometheus", config) == PROM_CONFIG.resolve()
    assert (host_path("prometheus", config).parent / "targets.json").resolve() == TARGETS.resolve()
    (loki_config,) = [a.split("=", 1)[1] for a in services["loki"]["command"] if a.startswith("-config.file=")]
    assert host_path("loki", loki_config).is_file()
    # Loki's gRPC port stays on loopback too (host network)
    assert "-server.grpc-listen-address=127.0.0.1" in services["loki"]["command"]
    # Grafana: no anonymous access, no admin/admin: the password comes from the environment, required
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?.+\}", env["GF_SECURITY_ADMIN_PASSWORD"])


def test_loki_config():
    (loki_config,) = [a.split("=", 1)[1] for a in load_yaml(COMPOSE)["services"]["loki"]["command"]
                      if a.startswith("-config.file=")]
    cfg = load_yaml(host_path("loki", loki_config))
    assert cfg["server"]["http_listen_port"] == 3100
    assert cfg["auth_enabled"] is False  # the sink pushes without a tenant id
    (period,) = cfg["schema_config"]["configs"]
    assert period["store"] == "tsdb" and period["schema"] == "v13"
    assert cfg["limits_config"].get("max_label_names_per_series", 15) >= len(LOKI_LABELS)


def test_prometheus_targets():
    cfg = load_yaml(PROM_CONFIG)
    (job,) = cfg["scrape_configs"]
    static = [t for group in job["static_configs"] for t in group["targets"]]
    assert static == [f"127.0.0.1:{p}" for p in range(9400, 9406)]
    assert [f for sd in job["file_sd_configs"] for f in sd["files"]] == ["targets.json"]
    groups = json.loads(TARGETS.read_text())
    assert isinstance(groups, list)
    for g in groups:
        for t in g["targets"]:
            assert re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", t), f"not host:port: {t}"
        assert set(g.get("labels", {})).isdisjoint(PROM_LABELS), "target labels would clash with the code's"


@needs_promtool
def test_promtool_check_config():
    r = subprocess.run([PROMTOOL, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True,
                       timeout=30)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "WARNING" not in out, out  # e.g. targets.json not found


def test_make_targets():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    r = subprocess.run([make, "-n", "observability-up", "observability-down"], cwd=REPO, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "docker compose -f observability/docker-compose.yml up -d" in r.stdout
    assert "docker compose -f observability/docker-compose.yml down" in r.stdout
    for text in ("http://localhost:3000", "http://localhost:3100", "http://localhost:9090",
                 "logging.loki.url=", "logging.prometheus.port=", "GRAFANA_ADMIN_PASSWORD"):
        assert text in r.stdout, text
    assert "admin/admin" not in r.stdout and "anonymous" not in r.stdout
