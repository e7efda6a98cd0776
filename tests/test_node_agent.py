"""Node agents and ``cluster=auto``: real agent processes, a real coordinator, real runs.

On loopback (agents with ``--state-dir`` in tmp, found through ``cluster.peers``; mDNS stays off
there so no test ever sees another test's agents): an unpaired coordinator is refused; pairing
with the code shown on both sides, then a ``syncps`` MNIST run through two agents; an agent
killed mid-run is reported within the heartbeat window and the run goes on without its worker.
Across network namespaces (as ``test_netns.py``, needs root): three agents found by mDNS over
the bridge, and again by ``cluster.peers`` with multicast blocked on the bridge.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from smolcluster.bench.netns import Lan
from smolcluster.node.pairing import fingerprint, identity, pairing_code, public_key
from tests.conftest import REPO


class Proc:
    """A child process whose output lines are collected with their arrival time."""

    def __init__(self, cmd: list[str], ns: str | None = None, env: dict | None = None):
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        self.lines: list[tuple[float, str]] = []
        self.p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
                                  start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.p.stdout.readline, ""):
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 60) -> tuple[float, re.Match]:
        """The first line matching ``pattern``: (its arrival time, the match). Fails if the process ends first."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                m = rx.search(line)
                if m:
                    return t, m
            if self.p.poll() is not None:
                time.sleep(0.2)  # the reader may still hold the last lines
                if not any(rx.search(line) for _, line in self.lines):
                    raise AssertionError(f"exited {self.p.returncode} before {pattern!r}:\n{self.text()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.text()[-4000:]}")

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not finish in {timeout}s:\n{self.text()[-4000:]}") from None
        time.sleep(0.1)
        return code

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=5)


def prepare(tmp: Path, names) -> dict[str, str]:
    """Make the agents' and the coordinator's key pairs up front; the pairing code of each agent."""
    coord = public_key(identity(tmp / "coord" / "coordinator" / "identity") / "client.key")
    return {n: pairing_code(public_key(identity(tmp / n / "identity") / "server.key"), coord) for n in names}


def spawn_agent(tmp: Path, name: str, *extra: str, ns: str | None = None, port: int = 0,
                bind: str = "127.0.0.1") -> Proc:
    mdns = [] if ns else ["--no-mdns"]  # on the shared host, never advertise
    return Proc([sys.executable, "-u", "-m", "smolcluster.node", "--state-dir", str(tmp / name), "--name", name,
                 "--port", str(port), "--bind", bind, "--ready-file", str(tmp / f"{name}.ready"), *mdns, *extra],
                ns=ns)


def listening(tmp: Path, name: str, proc: Proc) -> int:
    """The agent's control port, once it listens."""
    ready, deadline = tmp / f"{name}.ready", time.monotonic() + 90
    while not ready.is_file() or not ready.read_text():
        assert proc.p.poll() is None, f"agent {name} exited {proc.p.returncode}:\n{proc.text()}"
        assert time.monotonic() < deadline, f"agent {name} did not start listening:\n{proc.text()}"
        time.sleep(0.05)
    return int(ready.read_text())


def agents(tmp: Path, spec: dict[str, list[str]], procs: list, **kw) -> dict[str, tuple[Proc, int]]:
    """Start agents together (each imports torch once: in parallel, not one after another)."""
    started = {name: spawn_agent(tmp, name, *extra, **kw.get(name, {})) for name, extra in spec.items()}
    procs += started.values()
    return {name: (p, listening(tmp, name, p)) for name, p in started.items()}


def coordinator(tmp: Path, *overrides: str, ns: str | None = None, run: str = "run") -> Proc:
    return Proc([sys.executable, "-u", "-m", "smolcluster.train", "cluster=auto", f"cluster.state_dir={tmp / 'coord'}",
                 f"hydra.run.dir={tmp / run}", "hydra.output_subdir=null", "train.progress=false",
                 "cluster.discover_s=2", *overrides], ns=ns)


def role_pids(agent_proc: Proc) -> list[int]:
    return [int(m) for m in re.findall(r"started .*: pid (\d+)", agent_proc.text())]


def wait_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"role processes still running: {pids}"
        time.sleep(0.1)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def test_an_unpaired_coordinator_is_refused(tmp_path, procs):
    (a, port), = agents(tmp_path, {"a": []}, procs).values()
    # a control client with a key of its own: encrypted, but not obeyed
    from smolcluster.errors import ConfigError
    from smolcluster.node import discovery
    from smolcluster.node.coordinator import AgentLink

    info = discovery.ask(f"127.0.0.1:{port}")
    assert info.name == "a" and info.fingerprint == fingerprint(info.key) and info.source == "peer"
    stranger = identity(tmp_path / "stranger")
    link = AgentLink(info, stranger, tmp_path / "links")
    try:
        with pytest.raises(ConfigError, match=r"node a \(127.0.0.1:\d+\) refused: not paired"):
            link.request("start_role", {"name": "server", "role": "server", "run_id": "r1", "args": [], "keys": {}},
                         "role_state", 10)
    finally:
        link.close()
    assert not (tmp_path / "a" / "runs").exists()  # nothing was started
    # the coordinator, told not to wait for an operator: one line naming the node, exit 2
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[127.0.0.1:{port}]", "cluster.pair_timeout_s=0")
    procs.append(c)
    assert c.wait() == 2
    assert re.search(r"error: node a \(127.0.0.1:\d+\) has not paired with this coordinator", c.text()), c.text()
    assert not list((tmp_path / "a" / "paired").glob("*.key"))


def test_pairing_with_the_code_then_syncps_mnist_through_two_agents(tmp_path, procs, mnist_root):
    codes = prepare(tmp_path, ["b"])  # b pairs by --accept-code (automation); a by the operator's command
    (a, pa), (b, pb) = agents(tmp_path, {"a": [], "b": ["--accept-code", codes["b"]]}, procs).values()
    steps = 30
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[127.0.0.1:{pa},127.0.0.1:{pb}]",
                    "cluster.server=a", "cluster.pair_timeout_s=60", "algo=syncps", "data=mnist",
                    f"data.root={mnist_root}", f"train.steps={steps}", "train.log_every=10")
    procs.append(c)
    # both screens show the same code; the operator confirms it on a's machine
    _, on_agent = a.wait_for(r"code (\d{6})\. If the coordinator shows the same code")
    _, on_coord = c.wait_for(r"pairing with node a .*: code (\d{6})")
    assert on_agent.group(1) == on_coord.group(1)
    subprocess.run([sys.executable, "-m", "smolcluster.node", "pair", on_agent.group(1), "--state-dir",
                    str(tmp_path / "a")], cwd=REPO, check=True, capture_output=True, timeout=60)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]

    coord_key = public_key(tmp_path / "coord" / "coordinator" / "identity" / "client.key")
    for n in ("a", "b"):  # each agent now keeps the coordinator's key: later runs need no pairing
        assert [public_key(f) for f in (tmp_path / n / "paired").glob("*.key")] == [coord_key]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == steps and summary["workers"]["0"]["node"] == "b"
    assert summary["eval_accuracy"] > 0.5  # MNIST subset after 30 steps (chance: 0.10)
    assert "[b:worker 0]" in c.text() and "[a:server]" in c.text()  # the roles' logs streamed back
    # the run's keys came over the control channel: the server's secret only on the server's node
    run_keys = {n: {str(p.relative_to(d)) for p in d.rglob("*.key*")}
                for n in ("a", "b") for d in (tmp_path / n / "runs").glob("*/*/keys")}
    assert run_keys["a"] == {"server.key", "server.key_secret", "authorized/client.key"}
    assert run_keys["b"] == {"server.key", "client.key", "client.key_secret"}
    secret = next((tmp_path / "a" / "runs").glob("*/server/keys/server.key_secret"))
    assert secret.stat().st_mode & 0o777 == 0o600
    wait_gone(role_pids(a) + role_pids(b))  # nothing left running


@pytest.mark.slow
def test_an_agent_killed_mid_run_is_reported_and_syncps_goes_on(tmp_path, procs):
    names = ["a", "b", "c"]
    codes = prepare(tmp_path, names)
    started = agents(tmp_path, {n: ["--accept-code", codes[n]] for n in names}, procs)
    liveness, steps = 3.0, 150
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[{peers}]", "cluster.server=a",
                    "algo=syncps", f"train.steps={steps}", "train.log_every=1", f"cluster.liveness_s={liveness}",
                    "cluster.heartbeat_s=0.5", "cluster.nodes=[{delay_s: 0.04},{delay_s: 0.04}]")
    procs.append(c)
    _, placed = c.wait_for(r"worker 1 on (\w+)")
    victim = placed.group(1)
    c.wait_for(r"\[a:server\] .*step 20/", timeout=120)
    worker_pid = role_pids(started[victim][0])[0]
    killed_at = time.monotonic()
    started[victim][0].p.send_signal(signal.SIGKILL)
    t, _ = c.wait_for(rf"node {victim} \(127.0.0.1:\d+\) vanished \(no answer for 3s\); it ran worker 1: "
                      "syncps goes on", timeout=30)
    assert t - killed_at < liveness + 2.0  # within the heartbeat window
    wait_gone([worker_pid])  # the agent took its role along (PR_SET_PDEATHSIG)
    assert c.wait(timeout=180) == 0, c.text()[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == steps and summary["workers_lost"] == [1]
    assert 20 <= summary["workers"]["1"]["lost_step"] < steps
    assert summary["workers"]["0"]["applied"] > summary["workers"]["1"]["applied"]


@pytest.mark.slow
def test_a_failing_role_or_sigterm_to_the_coordinator_stops_every_role_everywhere(tmp_path, procs):
    codes = prepare(tmp_path, ["a", "b"])
    started = agents(tmp_path, {n: ["--accept-code", codes[n]] for n in codes}, procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    # roles that fail as they start (no data there): one line naming the node, nothing left running
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[{peers}]", "cluster.server=a", "algo=syncps",
                    "data=mnist", f"data.root={tmp_path / 'nowhere'}", run="failed")
    procs.append(c)
    assert c.wait(timeout=120) == 2
    errors = [line for line in c.text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: node (a|b) \(127.0.0.1:\d+\): (the server|worker 0) exited with "
                                         r"code \d+ \(its log is above\); stopped the run everywhere", errors[0]), errors
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))
    # then a healthy run, ended by SIGTERM to the coordinator: every role stops, the agents stay
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[{peers}]", "cluster.server=a", "algo=edp",
                    "train.steps=100000", "train.log_every=1", "cluster.nodes=[{delay_s: 0.02}]")
    procs.append(c)
    c.wait_for(r"\[a:server\] .*step 5/", timeout=120)
    pids = [role_pids(started[n][0])[-1] for n in ("a", "b")]  # this run's roles (the first run's are gone)
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    c.p.send_signal(signal.SIGTERM)
    assert c.wait(timeout=60) == 130
    wait_gone(pids)
    for agent_proc, _ in started.values():
        assert agent_proc.p.poll() is None  # the agents stay, ready for the next run
        agent_proc.wait_for(r"stopping every role: the coordinator interrupted", timeout=5)


# -- three machines on a bridge (network namespaces) ---------------------------------------------------------

def _lan_agents(tmp: Path, lan: Lan, procs: list) -> None:
    codes = prepare(tmp, lan.ip)
    agents(tmp, {host: ["--accept-code", codes[host]] for host in lan.ip}, procs,
           **{host: {"ns": lan.ns[host], "port": 5660, "bind": "0.0.0.0"} for host in lan.ip})


def _check_lan_run(c: Proc, tmp: Path, lan: Lan, steps: int, found_by: str, run: str = "run") -> None:
    assert c.wait(timeout=240) == 0, c.text()[-4000:]
    for host in lan.ip:
        assert re.search(rf"^{host}\s+{lan.ip[host]}:5660 .* {found_by}$", c.text(), re.M), c.text()[:3000]
    summary = json.loads((tmp / run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["eval_accuracy"] > 0.5
    assert {summary["workers"][r]["node"] for r in ("0", "1")} == {"w0", "w1"}


LAN_RUN = ["cluster.server=srv", "algo=syncps", "train.steps=40", "train.log_every=10"]


@pytest.mark.slow
def test_three_agents_on_a_lan_by_static_peers_with_multicast_blocked_then_by_mdns(tmp_path, lan, procs):
    """One LAN, three agents, two runs: with multicast blocked on the switch through ``cluster.peers``,
    then, multicast back on, found by mDNS alone (no peers, no cluster file, no SSH)."""
    def flood(on: str) -> None:  # the switch floods multicast (mDNS's 224.0.0.251) to its ports, or not
        for port in lan.port_of.values():
            subprocess.run(["bridge", "-n", lan.ns["sw"], "link", "set", "dev", port, "mcast_flood", on], check=True)

    flood("off")
    _lan_agents(tmp_path, lan, procs)
    blind = coordinator(tmp_path, "cluster.discover_only=true", "cluster.expect=3", ns=lan.ns["srv"])
    procs.append(blind)
    # mDNS really is blocked: only the agent in the coordinator's own namespace answers (multicast loopback)
    assert blind.wait() == 2 and "error: cluster.expect=3 agents, found 1 (srv)" in blind.text(), blind.text()
    peers = ",".join(f"{ip}:5660" for ip in lan.ip.values())
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[{peers}]", *LAN_RUN, ns=lan.ns["srv"])
    procs.append(c)
    _check_lan_run(c, tmp_path, lan, 40, "peer")

    flood("on")
    c = coordinator(tmp_path, "cluster.expect=3", "cluster.discover_s=20", *LAN_RUN, ns=lan.ns["srv"], run="run2")
    procs.append(c)
    _check_lan_run(c, tmp_path, lan, 40, "mdns", run="run2")


def test_a_version_mismatch_is_one_line_naming_the_node():
    from smolcluster.errors import ConfigError
    from smolcluster.node.discovery import NodeInfo
    from smolcluster.node.protocol import VERSION

    key = "x" * 40
    node = NodeInfo("pi", "10.0.0.5", 5660, key, fingerprint(key), "0.0.9", 1, "cpu", 4, 3.5)
    with pytest.raises(ConfigError, match=rf"node pi \(10.0.0.5:5660\) runs smolcluster 0.0.9 .* this coordinator "
                                          rf"runs {re.escape(VERSION)}"):
        node.check()
    node.version, node.fingerprint = VERSION, "0" * 16
    with pytest.raises(ConfigError, match="does not match its fingerprint"):
        node.check()
