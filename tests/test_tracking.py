"""Metrics leaving a node: W&B (offline runs read back from their files) and Prometheus (scraped live)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smolcluster.launch import local
from smolcluster.telemetry.prometheus import LABELS, METRICS
from tests.cluster_util import Cluster
from tests.conftest import run_cli, train
from tests.wandb_records import read_run

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def free_ports(n: int) -> int:
    """A base port with base..base+n-1 all free right now."""
    return local.free_ports("127.0.0.1", n)


def test_an_offline_wandb_run_per_node_holds_the_metrics(tmp_path):
    s = train(tmp_path, "algo=edp", "cluster.workers=2", "algo.min_workers=2", "train.steps=100", "train.log_every=10", "train.eval_every=50",
              "logging.wandb.mode=offline", "logging.grad_norm_every=10", "logging.hardware_every=10", *FAST,
              "run_id=wbtest")
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {r.name.rsplit("-", 1)[1]: r for r in map(read_run, files)}
    assert sorted(runs) == ["server", "worker0", "worker1"], [r.name for r in runs.values()]
    assert {r.group for r in runs.values()} == {"wbtest"}  # one W&B group per cluster run
    assert {k: r.job_type for k, r in runs.items()} == {"server": "server", "worker0": "worker", "worker1": "worker"}

    server = runs["server"]
    assert server.config["algo"]["name"] == "edp" and server.config["train"]["steps"] == 100
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # every logged number is in W&B at the same step, unchanged
    for row in rows:
        logged = server.history[row["step"]]
        if "loss" in row:
            assert logged["train/loss"] == pytest.approx(row["loss"]) and logged["train/lr"] == pytest.approx(row["lr"])
            assert logged["train/samples_per_s"] > 0 and logged["edp/staleness_mean"] == row["staleness_mean"]
            assert logged["wire/bytes_received"] == row["bytes_received"] > 0
    final = server.history[s["steps"]]
    assert final["eval/accuracy"] == pytest.approx(s["eval_accuracy"]) and final["eval/loss"] == pytest.approx(s["eval_loss"])
    assert "eval/accuracy" in server.history[50]  # train.eval_every=50
    # per-layer gradient norms every 10 steps, one per parameter of the MLP, and their global norm
    norms = server.history[20]
    layer = {k for k in norms if k.startswith("grad_norm/")}
    assert layer == {f"grad_norm/net.{i}.{p}" for i in (1, 3, 5) for p in ("weight", "bias")}
    assert norms["grad_norm"] == pytest.approx(sum(norms[k] ** 2 for k in layer) ** 0.5) and norms["grad_norm"] > 0
    assert norms["hardware/rss_bytes"] > 50e6 and norms["hardware/cpu_percent"] >= 0
    assert any(row.get("wire/bytes_received_per_s", 0) > 0 for row in server.history.values())

    reports = {}
    for name in ("worker0", "worker1"):  # each worker's own run: its speed, its bytes, its memory
        hist = runs[name].history
        reports[name] = [hist[k] for k in sorted(k for k, v in hist.items() if "train/samples_per_s" in v)]
        assert reports[name] and reports[name][0]["train/samples_per_s"] > 0
        assert reports[name][0]["wire/bytes_sent"] > 0 and reports[name][0]["wire/bytes_received"] > 0
        assert reports[name][0]["hardware/rss_bytes"] > 50e6
    # no barrier in EDP: a busy machine may give one worker most of the 100 updates, but together they log on
    longest = max(reports.values(), key=len)
    assert len(longest) >= 2 and longest[-1]["wire/bytes_sent"] > longest[0]["wire/bytes_sent"]


def test_wandb_online_without_a_login_falls_back_to_offline_and_a_bad_mode_is_refused(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": "", "NETRC": str(tmp_path / "none")}
    p = run_cli("smolcluster.train", "algo=local", "train.steps=5", f"hydra.run.dir={tmp_path / 'r'}",
                "logging.wandb.mode=online", env=env)
    assert "not logged in to W&B" in p.stderr and "logging offline" in p.stderr
    assert len(list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    bad = run_cli("smolcluster.train", "algo=local", "logging.wandb.mode=yes", f"hydra.run.dir={tmp_path / 'b'}",
                  check=False)
    assert bad.returncode == 2 and "logging.wandb.mode='yes' is invalid" in bad.stderr


def scrape(port: int) -> dict[tuple[str, str], float]:
    """{(sample name, role+rank): value} from a node's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("smolcluster_"):
                assert set(sample.labels) == set(LABELS), sample
                out[sample.name, sample.labels["role"] + sample.labels["rank"]] = sample.value
    return out


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_node_serves_prometheus_metrics_and_the_step_counter_rises(tmp_path):
    base = free_ports(3)
    with Cluster(tmp_path, "syncps", "train.steps=100000", "logging.prometheus.port=" + str(base), *FAST,
                 "cluster.nodes=[{delay_s: 0.01},{delay_s: 0.01}]", "train.log_every=5") as c:
        c.server()
        c.worker(0)
        c.worker(1)
        prom = None
        if shutil.which("prometheus"):  # Debian's prometheus scrapes the three nodes for real
            prom_port = free_ports(1)
            (tmp_path / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: smolcluster\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{base}', '127.0.0.1:{base + 1}', '127.0.0.1:{base + 2}']\n")
            prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                    stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
        try:
            first = wait_for(lambda: (m := scrape(base)).get(("smolcluster_steps_total", "server")) and m, 120,
                             f"the server's /metrics on {base}")
            second = wait_for(lambda: (m := scrape(base))[("smolcluster_steps_total", "server")]
                              > first[("smolcluster_steps_total", "server")] + 10 and m, 60, "the step counter to rise")
            assert second[("smolcluster_peers_alive", "server")] == 2
            assert second[("smolcluster_bytes_sent_total", "server")] > first[("smolcluster_bytes_sent_total", "server")]
            assert second[("smolcluster_loss", "server")] > 0 and second[("smolcluster_samples_per_second", "server")] > 0
            for rank in (0, 1):
                w = wait_for(lambda r=rank: scrape(base + 1 + r), 30, f"worker {rank}'s /metrics")
                later = wait_for(lambda r=rank, w=w: (m := scrape(base + 1 + r))[("smolcluster_steps_total", f"worker{r}")]
                                 > w[("smolcluster_steps_total", f"worker{r}")] and m, 30, "a worker's steps to rise")
                assert later[("smolcluster_bytes_sent_total", f"worker{rank}")] > 0
            names = {name for name, _ in second}
            assert names <= {*METRICS, *(n.removesuffix("_total") + "_created" for n in METRICS)}
            if prom is not None:
                def query(q):
                    url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.parse.quote(q)}"
                    return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]

                def steps_seen():
                    res = query('smolcluster_steps_total{role="server"}')
                    return res and float(res[0]["value"][1])

                a = wait_for(steps_seen, 60, "Prometheus to scrape the server")
                wait_for(lambda: steps_seen() > a, 30, "Prometheus to see the step counter rise")
                up = wait_for(lambda: len(r := query('up{job="smolcluster"} == 1')) == 3 and r, 30, "all 3 targets up")
                assert {x["metric"]["instance"] for x in up} == {f"127.0.0.1:{base + i}" for i in range(3)}
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)


def test_a_taken_metrics_port_is_reported_and_training_goes_on(tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run_cli("smolcluster.train", "algo=local", "train.steps=20", f"hydra.run.dir={tmp_path}",
                    f"logging.prometheus.port={port}")
    assert f"port {port} is not free" in p.stderr and "logging.prometheus.port=N" in p.stderr
    assert json.loads(Path(tmp_path / "summary.json").read_text())["steps"] == 20


def test_sigterm_closes_a_nodes_run_files_and_finishes_its_wandb_run(tmp_path):
    """SIGTERM mid-run unwinds like Ctrl-C: the worker's and the server's W&B runs are finished with exit code 130,
    and metrics.jsonl is complete, its last row saying the server stopped."""
    with Cluster(tmp_path, "syncps", "train.steps=100000", "train.log_every=2", "logging.wandb.mode=offline", *FAST,
                 "cluster.nodes=[{delay_s: 0.02}]", workers=1) as c:
        c.server()
        c.worker(0)
        c.wait_for_step(6)
        c.kill("worker0", signal.SIGTERM)  # mid-run: the server is waiting for its gradient
        c.kill("server", signal.SIGTERM)
        codes = {name: p.returncode for name, p in c.procs.items()}
        assert codes == {"server": 130, "worker0": 130}, c.output("server")[-3000:] + c.output("worker0")[-3000:]
    runs = {r.name.rsplit("-", 1)[1]: r for r in map(read_run, sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))}
    assert {k: r.exit_code for k, r in runs.items()} == {"server": 130, "worker0": 130}
    assert max(runs["worker0"].history) >= 6 and max(runs["server"].history) >= 6  # what they logged is kept
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert rows[-1]["event"] == "stopped" and rows[-1]["exit_code"] == 130
    assert rows[-1]["step"] == rows[-2]["step"] >= 6 and rows[-1]["reason"] == "KeyboardInterrupt"
    assert not (tmp_path / "summary.json").exists()  # the run did not finish: no summary
