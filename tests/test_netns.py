"""A real three-host LAN on one machine: the server and two workers each in its own network
namespace with its own IP address, joined by a bridge, running ``syncps`` through a cluster
file (``--config-dir DIR cluster=netns``), exactly as on separate machines; then one worker's
cable is pulled mid-run (its switch port goes down) and the run must still finish.

    [ns srv 10.213.N.10] --veth-+
    [ns w0  10.213.N.11] --veth-+-- br0 in [ns sw]   (a switch of its own: no host firewall rules apply)
    [ns w1  10.213.N.12] --veth-+   (smolcluster.testing.netns.Lan)

Needs root and iproute2 (`apt-get install -y iproute2`); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from smolcluster.testing.netns import Lan
from tests.conftest import REPO

PORT = 5555  # every namespace has its own port space: a fixed port cannot collide with the host's


def _cluster_file(conf_dir: Path, net: Lan) -> None:
    """conf_dir/cluster/netns.yaml: the repo's local cluster file with this LAN's addresses."""
    cluster = OmegaConf.load(REPO / "conf" / "cluster" / "local.yaml")
    cluster.merge_with({
        # keyless on purpose (a private test LAN): without insecure=true a 0.0.0.0 bind is refused
        "name": "netns", "host": net.ip["srv"], "port": PORT, "bind": "0.0.0.0", "workers": 2, "insecure": True,
        # a worker step costs >= delay_s, so the run lasts long enough to pull a cable in the middle
        "nodes": [{"name": "w0", "host": net.ip["w0"], "delay_s": 0.06},
                  {"name": "w1", "host": net.ip["w1"], "delay_s": 0.06}],
        "heartbeat_s": 0.5, "liveness_s": 3.0, "connect_timeout_s": 60.0,
    })
    (conf_dir / "cluster").mkdir(parents=True)
    OmegaConf.save(cluster, conf_dir / "cluster" / "netns.yaml")


@pytest.mark.slow
def test_syncps_across_namespaces_survives_a_pulled_cable(lan, tmp_path):
    conf_dir, run_dir = tmp_path / "conf", tmp_path / "run"
    run_dir.mkdir()
    _cluster_file(conf_dir, lan)
    steps, cut_at = 120, 20
    common = [sys.executable, "-u", "-m", "smolcluster.train", f"--config-dir={conf_dir}", "cluster=netns",
              "algo=syncps", f"train.steps={steps}", "train.log_every=1", "train.progress=false",
              "algo.straggler_timeout=60", "run_id=netns", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    roles = {"srv": ["role=server"], "w0": ["role=worker", "rank=0"], "w1": ["role=worker", "rank=1"]}
    procs: dict[str, subprocess.Popen] = {}
    logs = {host: run_dir / f"{host}.out" for host in roles}

    def output(host: str) -> str:
        return logs[host].read_text()[-4000:] if logs[host].is_file() else ""

    def step_reached() -> int:
        path = run_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        return max((r["step"] for r in rows), default=0)

    try:
        for host, args in roles.items():
            procs[host] = subprocess.Popen(["ip", "netns", "exec", lan.ns[host], *common, *args], cwd=REPO,
                                           stdout=logs[host].open("w"), stderr=subprocess.STDOUT,
                                           env={**os.environ, "SMOLCLUSTER_NODE": host, "PYTHONUNBUFFERED": "1"},
                                           start_new_session=True)
        deadline = time.monotonic() + 150
        while step_reached() < cut_at:
            for host, p in procs.items():
                assert p.poll() is None, f"{host} exited {p.returncode} before step {cut_at}:\n{output(host)}"
            assert time.monotonic() < deadline, f"no step {cut_at} in time:\n{output('srv')}"
            time.sleep(0.1)

        # the workers reach the server over the LAN from their own addresses: nothing goes through loopback
        assert lan.established_peers("srv", PORT) >= {lan.ip["w0"], lan.ip["w1"]}

        cut_step = step_reached()  # read before the pull: then surely no later than the loss
        lan.pull_cable("w1")
        try:
            assert procs["srv"].wait(timeout=150) == 0, output("srv")
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not finish after the cable was pulled:\n{output('srv')}") from None
        assert procs["w0"].wait(timeout=60) == 0, output("w0")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["workers_lost"] == [1]
    w0, w1 = summary["workers"]["0"], summary["workers"]["1"]
    assert w0["alive"] and not w1["alive"]
    assert w0["node"] == "w0" and w1["node"] == "w1"
    # worker 1 was dropped after the cut (once it had been silent for liveness_s), not before
    assert cut_step <= w1["lost_step"] < steps
    assert w1["applied"] < w0["applied"]
    assert w0["applied"] >= steps - 2  # worker 0 carried every step after the drop
    assert "worker 1 (w1) lost: silent for" in logs["srv"].read_text()
