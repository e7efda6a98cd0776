"""Node agents and ``cluster=auto``: real agent processes, a real coordinator, real runs.

On loopback (agents with ``--state-dir`` in tmp, found through ``cluster.peers``; mDNS stays off
there so no test ever sees another test's agents): an unpaired coordinator is refused; pairing
with the code shown on both sides, then a ``syncps`` MNIST run through two agents; an agent
killed mid-run is reported within the heartbeat window and the run goes on without its worker; allreduce,
diloco and a LoRA fine-tune on chat data (diloco) through a shared pair of agents.
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

from smolcluster.node.pairing import AgentStore, Allowlist, fingerprint, identity, public_key
from smolcluster.testing.netns import Lan
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


def prepare(tmp: Path, names) -> dict[str, list]:
    """Pair the test's coordinator and these agents up front, as confirming the code on both machines does: each
    agent keeps the coordinator's key, the coordinator each agent's name and key. {name: []} (no extra flags)."""
    coord = public_key(identity(tmp / "coord" / "coordinator" / "identity") / "client.key")
    store = AgentStore(tmp / "coord" / "coordinator")
    for n in names:
        Allowlist(tmp / n).add(coord)
        store.add(n, public_key(identity(tmp / n / "identity") / "server.key"))
    return {n: [] for n in names}


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


def handshake(port: int, server_key: str, id_dir: Path, kind: str = "status") -> str:
    """Connect to an agent's control port as the client pair in ``id_dir`` and send ``kind``: how the CURVE
    handshake ended ("succeeded", "failed (auth)", ...), from the socket's own monitor events."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.curve_serverkey = server_key.encode()
    s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(str(id_dir / "client.key_secret"))
    mon = s.get_monitor_socket()
    ends = {zmq.EVENT_HANDSHAKE_SUCCEEDED: "succeeded", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "failed (auth)",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "failed (protocol)", zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed"}
    try:
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send_multipart([b"\x81\xa4kind\xa9" + kind.encode()[:9].ljust(9)], flags=zmq.NOBLOCK)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if mon.poll(100) and (event := recv_monitor_message(mon)["event"]) in ends:
                return ends[event]
        raise AssertionError(f"no CURVE handshake with 127.0.0.1:{port} within 30s")
    finally:
        s.disable_monitor()
        mon.close(linger=0)
        s.close(linger=0)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def test_an_unpaired_coordinator_is_refused(tmp_path, procs):
    (a, port), = agents(tmp_path, {"a": []}, procs).values()
    # a control client with a key of its own (not paired): its CURVE handshake fails, nothing it sends gets in
    from smolcluster.node import discovery

    info = discovery.ask(f"127.0.0.1:{port}")
    assert info.name == "a" and info.fingerprint == fingerprint(info.key) and info.source == "peer"
    stranger = identity(tmp_path / "stranger")
    assert handshake(port, info.key, stranger, "start_role") == "failed (auth)"
    assert not list((tmp_path / "a" / "runs").iterdir())  # nothing was started
    # the coordinator, told not to wait for an operator: one line naming the node, exit 2 (one peer may be given
    # without the list's brackets)
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=127.0.0.1:{port}", "cluster.pair_timeout_s=0")
    procs.append(c)
    assert c.wait() == 2
    assert re.search(r"error: node a \(127.0.0.1:\d+\) has not paired with this coordinator", c.text()), c.text()
    assert not list((tmp_path / "a" / "paired").glob("*.key"))


def test_pairing_with_the_code_then_syncps_mnist_through_two_agents(tmp_path, procs, mnist_root):
    (a, pa), (b, pb) = agents(tmp_path, {"a": [], "b": []}, procs).values()  # both paired by the operator
    steps = 30
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[127.0.0.1:{pa},127.0.0.1:{pb}]",
                    "cluster.server=a", "cluster.pair_timeout_s=60", "algo=syncps", "data=mnist",
                    f"data.root={mnist_root}", f"train.steps={steps}", "train.log_every=10")
    procs.append(c)
    # each agent's screen and the coordinator's show the same code, every code before any is confirmed (one walk
    # past the machines); the operator confirms each on both machines
    codes = {}
    for name, agent in (("a", a), ("b", b)):
        _, on_agent = agent.wait_for(r"code (\d{6})\. If the coordinator shows the same code")
        _, on_coord = c.wait_for(rf"pairing with node {name} .*: code (\d{{6}})")
        assert on_agent.group(1) == on_coord.group(1)
        codes[name] = on_agent.group(1)
    for name, code in codes.items():
        for state in (tmp_path / name, tmp_path / "coord" / "coordinator"):
            subprocess.run([sys.executable, "-m", "smolcluster.node", "pair", code, "--state-dir", str(state)],
                           cwd=REPO, check=True, capture_output=True, timeout=60)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]

    # one-shot: no confirmation is left behind to pair a later key whose code happens to match
    assert not list((tmp_path / "coord" / "coordinator" / "confirm").glob("*"))
    coord_key = public_key(tmp_path / "coord" / "coordinator" / "identity" / "client.key")
    for n in ("a", "b"):  # each side now keeps the other's key: later runs need no pairing
        assert [public_key(f) for f in (tmp_path / n / "paired").glob("*.key")] == [coord_key]
        assert public_key(tmp_path / "coord" / "coordinator" / "agents" / f"{n}.key") == public_key(
            tmp_path / n / "identity" / "server.key")
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
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.parent.stat().st_mode & 0o777 == 0o700
    here = tmp_path / "run" / "keys"  # the coordinator's copy of the run's keys: secrets 0600 in a 0700 dir
    assert here.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in here.glob("*_secret")} == {0o600}
    wait_gone(role_pids(a) + role_pids(b))  # nothing left running


@pytest.mark.slow
def test_an_agent_killed_mid_run_is_reported_and_syncps_goes_on(tmp_path, procs):
    names = ["a", "b", "c"]
    codes = prepare(tmp_path, names)
    started = agents(tmp_path, codes, procs)
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
    started = agents(tmp_path, codes, procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    # roles that fail as they start (no data there): one line naming the node, nothing left running
    c = coordinator(tmp_path, "cluster.mdns=false", f"cluster.peers=[{peers}]", "cluster.server=a", "algo=syncps",
                    "data=mnist", f"data.root={tmp_path / 'nowhere'}", run="failed")
    procs.append(c)
    assert c.wait(timeout=120) == 2
    errors = [line for line in c.text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(r"error: node (a|b) \(127.0.0.1:\d+\): (the server|worker 0) exited with "
                                         r"code \d+ \(.+\); stopped the run everywhere", errors[0]), errors
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


def paired_link(tmp: Path, name: str, port: int):
    """A control link to agent ``name`` from the test's coordinator identity (paired by ``prepare``)."""
    from smolcluster.node import discovery
    from smolcluster.node.coordinator import AgentLink

    link = AgentLink(discovery.ask(f"127.0.0.1:{port}"), identity(tmp / "coord" / "coordinator" / "identity"),
                     tmp / "coord" / "links")
    assert link.request("node_hello", {"protocol": 3, "version": "?"}, "node_info", 10).fields["paired"]
    return link


def test_a_reserved_port_is_the_roles_alone_and_a_taken_one_is_one_line(tmp_path, procs):
    """Race-free ports: the agent holds the port it reserved for a role, so no other program can bind it (a
    plain bind fails) while the role's own ZeroMQ bind succeeds beside it; a named port (a role started again) is
    held the same way, or refused in one line when taken. A port taken all the same: the role fails with one line
    the coordinator repeats, naming the node and the port."""
    import socket

    import zmq

    from smolcluster.errors import ConfigError, PeerError
    from smolcluster.node.coordinator import Run
    from smolcluster.train_settings import ClusterSpec

    codes = prepare(tmp_path, ["a"])
    (a, port), = agents(tmp_path, codes, procs).values()
    link = paired_link(tmp_path, "a", port)
    run = Run("syncps", "r1", ClusterSpec(heartbeat_s=0.5, liveness_s=10.0), {"a": link})
    squatter = socket.socket()
    try:
        reserved = run.reserve(link, "server", "127.0.0.1")
        with pytest.raises(OSError, match="in use"):
            squatter.bind(("127.0.0.1", reserved))
        role = zmq.Context.instance().socket(zmq.ROUTER)
        role.bind(f"tcp://127.0.0.1:{reserved}")  # what the role itself does: it gets the port
        role.close(linger=0)
        # a port some other program listens on: the server cannot have it, and the error says which
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        # a role started again asks for its own port back (a replica's stage): held the same way, or refused in one
        # line when another program listens there
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        ask = {"name": "again", "bind": "127.0.0.1", "count": 1}
        assert link.request("reserve", {**ask, "port": free}, "reserved", 10).fields["ports"] == [free]
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", free))
        with pytest.raises(ConfigError, match=r"^node a \(127.0.0.1:\d+\) refused: cannot reserve a port on "
                                              r"127.0.0.1: .*in use"):
            link.request("reserve", {**ask, "port": taken}, "reserved", 10)
        run.start(link, "server", "server", None, ["algo=syncps", "cluster.host=127.0.0.1", "cluster.bind=127.0.0.1",
                                                   f"cluster.port={taken}", "train.steps=5"], {})
        with pytest.raises(PeerError, match=rf"node a \(127.0.0.1:\d+\): the server exited with code 2 \(cannot "
                                            rf"listen on tcp://127.0.0.1:{taken} .*another server using the port"):
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                run.pump()
                run.check_roles()
                time.sleep(0.05)
    finally:
        squatter.close()
        link.close()
    wait_gone(role_pids(a))


def ring_keys_of(tmp: Path, agent: str) -> set[str]:
    return {str(p.relative_to(d)) for d in (tmp / agent / "runs").glob("*/*/keys") for p in d.rglob("*.key*")}


def checkpoint_of(tmp: Path, agent: str, run_id: str, role: str) -> dict:
    from safetensors.torch import load_file

    return load_file(tmp / agent / "runs" / run_id / role / "checkpoint.safetensors")


RING = ["algo=allreduce", "data=mnist", "train.steps=60", "train.log_every=10", "cluster.heartbeat_s=0.5",
        "cluster.nodes=[{delay_s: 0.03},{delay_s: 0.03}]"]


@pytest.fixture(scope="module")
def ring_agents(tmp_path_factory):
    """Two paired agents, a and b, shared by the ring tests (each run has its own run_id and hydra dir)."""
    tmp, started = tmp_path_factory.mktemp("ring"), []
    try:
        yield tmp, agents(tmp, prepare(tmp, ["a", "b"]), started)
    finally:
        for p in started:
            p.stop()


def test_allreduce_through_two_agents_and_a_stranger_on_its_ports_changes_nothing(ring_agents, procs, mnist_root):
    """A ring of two ranks placed on two agents trains MNIST to the end; run again with a stranger on both
    ranks' ports while it trains (plain ZeroMQ garbage, and a CURVE client that knows the run's server public
    key but holds no key of the run): its handshakes fail, and the run ends on bit-identical weights."""
    import torch
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    tmp_path, started = ring_agents
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    ring = [f"cluster.peers=[{peers}]", "cluster.mdns=false", f"data.root={mnist_root}", *RING]
    c = coordinator(tmp_path, *ring, "run_id=quiet")
    procs.append(c)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["algo"] == "allreduce" and summary["steps"] == 60 and summary["ring"] == 2
    assert summary["eval_accuracy"] > 0.6  # MNIST subset after 60 steps (chance: 0.10)
    assert re.search(r"\[a:worker [01]\]", c.text()) and re.search(r"\[b:worker [01]\]", c.text())  # one rank each
    for n in ("a", "b"):  # each rank binds and connects: the run's server pair, its client pair, both members' keys
        assert ring_keys_of(tmp_path, n) == {"server.key", "server.key_secret", "client.key", "client.key_secret",
                                             "authorized/client.key", "authorized/client1.key"}
    lead = "a" if "[a:worker 0]" in c.text() else "b"
    quiet = checkpoint_of(tmp_path, lead, "quiet", "worker_0")
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))

    c = coordinator(tmp_path, *ring, "run_id=disturbed", run="run2")
    procs.append(c)
    _, m = c.wait_for(r"started 2 workers: worker 0 on \w+ \(127.0.0.1:(\d+)\), worker 1 on \w+ \(127.0.0.1:(\d+)\)")
    ports = [int(m.group(1)), int(m.group(2))]
    c.wait_for(r"\[\w:worker 0\] .*step 10/", timeout=120)
    server_key = next((tmp_path / lead / "runs" / "disturbed").glob("worker_0/keys/server.key"))
    ctx, socks, monitors = zmq.Context.instance(), [], []
    try:
        for p in ports:
            plain = ctx.socket(zmq.DEALER)
            keyed = ctx.socket(zmq.DEALER)
            keyed.curve_serverkey = zmq.auth.load_certificate(str(server_key))[0]
            keyed.curve_publickey, keyed.curve_secretkey = zmq.curve_keypair()
            for s in (plain, keyed):
                monitors.append(s.get_monitor_socket())
                s.connect(f"tcp://127.0.0.1:{p}")
                socks.append(s)
                # garbage, then frames shaped like the ring's own (a report claiming to be rank 1)
                s.send_multipart([b"\x00" * 64, b"garbage"], flags=zmq.NOBLOCK)
                s.send_multipart([b"\x82\xa4kind\xabring_report", b"\x00" * 1024], flags=zmq.NOBLOCK)
        failed, succeeded = set(), 0
        deadline = time.monotonic() + 30
        while len(failed) < len(monitors) and time.monotonic() < deadline:  # every stranger's handshake fails
            for i, mon in enumerate(monitors):
                if mon.poll(50):
                    ev = recv_monitor_message(mon)["event"]
                    if ev in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                        failed.add(i)
                    succeeded += ev == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert len(failed) == len(monitors) and succeeded == 0, (failed, succeeded)
    finally:
        for s in socks:
            s.disable_monitor()
            s.close(linger=0)
        for mon in monitors:
            mon.close(linger=0)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]
    disturbed = checkpoint_of(tmp_path, lead, "disturbed", "worker_0")
    assert quiet.keys() == disturbed.keys() and all(torch.equal(quiet[k], disturbed[k]) for k in quiet)
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["eval_loss"] == summary["eval_loss"]
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


def test_diloco_through_two_agents_syncs_the_same_outer_state_on_both_nodes(ring_agents, procs, mnist_root):
    """algo=diloco is placed as allreduce is (a ring rank on each agent, rank 0 essential): the run ends with one
    outer step a round, and the outer weights and Nesterov momentum that each node holds (its own
    diloco-rankR.safetensors, in its agent's run directory) are bit-identical: the ring synced them across nodes."""
    import torch
    from safetensors.torch import load_file

    tmp, started = ring_agents
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    c = coordinator(tmp, f"cluster.peers=[{peers}]", "cluster.mdns=false", f"data.root={mnist_root}", "algo=diloco",
                    "algo.inner_steps=5", "data=mnist", "train.steps=20", "train.log_every=5",
                    "cluster.heartbeat_s=0.5", "run_id=diloco", run="run_diloco")
    procs.append(c)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]
    assert "placing diloco: a ring of 2" in c.text()
    s = json.loads((tmp / "run_diloco" / "summary.json").read_text())
    assert s["algo"] == "diloco" and s["steps"] == 20 and s["ring"] == 2 and s["outer_steps"] == 4
    assert s["eval_accuracy"] > 0.5  # MNIST subset (chance: 0.10)
    # one rank per node, each with its own state file; a 2-ring sends 2(N-1)/N = 1 model a round
    files = {n: list((tmp / n / "runs" / "diloco").glob("worker_*/diloco-rank*.safetensors")) for n in ("a", "b")}
    assert sorted(f.name for fs in files.values() for f in fs) == ["diloco-rank0.safetensors",
                                                                    "diloco-rank1.safetensors"], files
    states = [load_file(fs[0]) for fs in files.values()]
    assert s["bytes_sent"] >= 4 * s["params"] * 4
    for key in ("outer/0", "momentum/0"):
        assert torch.equal(states[0][key], states[1][key]) and float(states[0][key].abs().max()) > 0
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


def test_lora_diloco_on_chat_data_through_two_agents_syncs_the_same_adapters_on_both_nodes(ring_agents, procs):
    """LoRA fine-tuning (``train.lora.*``, ``data=chat data.path=FILE``) through agents: every override passes the
    agents' checks and reaches both ranks. The run trains the adapters only (the summary's trainable_params, the
    ring's bytes a round: one adapter's float32 size), both nodes end on bit-identical outer adapters, and the
    lead's ``RUN_DIR/adapter/`` (in its agent's run directory) loads with peft onto the base it was trained from."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.test_chat_data import instruct_dir, write_chat

    tmp, started = ring_agents
    # paths on the agents' machine (here: the same one): each role reads them where it runs
    base, jsonl = instruct_dir(tmp / "instruct"), write_chat(tmp / "chat.jsonl", copies=8)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    c = coordinator(tmp, f"cluster.peers=[{peers}]", "cluster.mdns=false", "algo=diloco", "algo.inner_steps=2",
                    "model=llama-tiny", f"model.pretrained={base}", "model.block_size=48", "data=chat",
                    f"data.path={jsonl}", "train.batch_size=4", "train.steps=8", "train.log_every=2",
                    "train.optimizer=adamw", "train.lr=0.01", "train.lora.enabled=true", "train.lora.r=4",
                    "train.lora.alpha=8", "train.lora.target_modules=[q_proj,v_proj]", "cluster.heartbeat_s=0.5",
                    "run_id=lora", run="run_lora")
    procs.append(c)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]
    s = json.loads((tmp / "run_lora" / "summary.json").read_text())
    assert s["algo"] == "diloco" and s["ring"] == 2 and s["steps"] == 8 and s["outer_steps"] == 4
    adapter_numel = 2 * 4 * (32 + 32)  # one layer: q_proj and v_proj (32 -> 32, no GQA here), A and B of rank 4
    assert s["trainable_params"] == adapter_numel < s["params"] / 20, s
    # a 2-ring sends 2(N-1)/N = one pseudo-gradient a round: the adapters' float32 bytes, not the model's
    assert 4 * adapter_numel <= s["bytes_sent"] / s["outer_steps"] < 1.2 * 4 * adapter_numel, s["bytes_sent"]
    states = [load_file(f) for n in ("a", "b") for f in (tmp / n / "runs" / "lora").glob("worker_*/diloco-rank*")]
    assert len(states) == 2 and states[0]["outer/0"].numel() == adapter_numel
    assert torch.equal(states[0]["outer/0"], states[1]["outer/0"]) and float(states[0]["outer/0"].abs().max()) > 0
    lead = "a" if re.search(r"\[a:worker 0\]", c.text()) else "b"
    run_dir = tmp / lead / "runs" / "lora" / "worker_0"
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      run_dir / "adapter")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in loaded.values()) == adapter_numel
    assert max(float(p.detach().abs().max()) for n, p in loaded.items() if "lora_B" in n) > 0  # B starts at zero
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


def test_mp_two_stages_through_two_agents(tmp_path, procs):
    codes = prepare(tmp_path, ["a", "b"])
    started = agents(tmp_path, codes, procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    c = coordinator(tmp_path, f"cluster.peers=[{peers}]", "cluster.mdns=false", "algo=mp", "model=mlp",
                    "data=digits", "train.steps=40", "train.lr=0.05", "train.log_every=10")
    procs.append(c)
    assert c.wait(timeout=240) == 0, c.text()[-4000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["algo"] == "mp" and s["stages"] == 2 and s["steps"] == 40
    assert s["eval_accuracy"] > 0.5, s  # digits (chance: 0.10)
    for n in ("a", "b"):  # one stage on each agent, each with its own shard of the checkpoint
        assert len(list((tmp_path / n / "runs").glob("*/stage_*/stage-*-of-2.safetensors"))) == 1
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


def test_infer_cluster_auto_runs_the_stages_on_two_agents_and_generates_greedy_text(tmp_path, procs):
    """``infer cluster=auto``: two stages on two agents (keys made for the run), the head here; the text is
    Hugging Face's greedy generate of the same weights (which local stages match, tests/test_infer.py)."""
    import torch
    from tokenizers import Tokenizer

    from smolcluster import checkpoint
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.models.gpt2 import build_gpt2

    # without weights, nothing is discovered or started: one line
    bare = subprocess.run([sys.executable, "-m", "smolcluster.infer", "cluster=auto", "cluster.mdns=false",
                           "prompt=x"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and bare.stderr.strip().splitlines()[-1] == (
        "error: cluster=auto stages need weights: give checkpoint=RUN_DIR or model.pretrained=DIR (on this "
        "machine: each stage's share travels to its node)"), bare.stderr
    d = write_tiny_run(tmp_path / "model", 128, vocab=500, n_layer=4)
    hf = build_gpt2(vocab_size=500, n_layer=4, n_head=4, n_embd=64, n_positions=128).eval()
    checkpoint.load(d, hf)
    codes = prepare(tmp_path, ["a", "b"])
    started = agents(tmp_path, codes, procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    c = Proc([sys.executable, "-u", "-m", "smolcluster.infer", "cluster=auto", f"cluster.state_dir={tmp_path / 'coord'}",
              "cluster.mdns=false", f"cluster.peers=[{peers}]", f"checkpoint={d}", "prompt=class Foo",
              "max_new_tokens=10", "stop_at_eos=false", "cluster.heartbeat_s=0.2"])
    procs.append(c)
    assert c.wait(timeout=180) == 0, c.text()[-4000:]
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = tok.encode("class Foo").ids
    want = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    text = "class Foo" + tok.decode(want[0, len(ids):].tolist())
    assert text in c.text(), c.text()[-3000:]
    assert "10 tokens in" in c.text() and "2 stages" in c.text()
    assert c.text().count("reads the model files itself: nothing to send") == 2  # as before: no weights travel
    for n in ("a", "b"):
        assert len(list((tmp_path / n / "runs").glob("*/stage_*/keys/server.key_secret"))) == 1
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


def test_top_sees_the_roles_an_agent_started(tmp_path, procs):
    """With logging.prometheus.port=0 each role serves /metrics on its node and announces it in its own run dir
    there; the agents pass the announcements on and the coordinator lists them in its run dir, which
    ``smolcluster.top`` reads as it reads a run on one machine: both roles, the step rising, the loss."""
    from smolcluster.top import ClusterView, endpoints_of

    codes = prepare(tmp_path, ["a", "b"])
    started = agents(tmp_path, codes, procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    c = coordinator(tmp_path, f"cluster.peers=[{peers}]", "cluster.mdns=false", "cluster.server=a", "algo=syncps",
                    "train.steps=100000", "train.log_every=1", "logging.prometheus.port=0",
                    "cluster.nodes=[{delay_s: 0.02}]")
    procs.append(c)
    view, deadline, seen = ClusterView(run_dir=tmp_path / "run"), time.monotonic() + 120, {}
    try:
        while time.monotonic() < deadline:
            assert c.p.poll() is None, c.text()[-4000:]
            for node in view.poll():
                if node.up and node.values.get("step", 0) > 0 and "loss" in node.values:
                    seen.setdefault(node.name, []).append(node.values["step"])
            if {"a server", "b worker0"} <= set(seen) and seen["a server"][-1] > seen["a server"][0]:
                break
            time.sleep(0.2)
        assert {"a server", "b worker0"} <= set(seen), (seen, endpoints_of(tmp_path / "run"), c.text()[-3000:])
        assert seen["a server"][-1] > seen["a server"][0]  # the step rises
    finally:
        view.close()
    c.p.send_signal(signal.SIGTERM)
    assert c.wait(timeout=60) == 130
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


# -- three machines on a bridge (network namespaces) ---------------------------------------------------------

def _lan_agents(tmp: Path, lan: Lan, procs: list) -> None:
    codes = prepare(tmp, lan.ip)
    agents(tmp, codes, procs,
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
    from smolcluster.node.protocol import NODE_PROTOCOL, VERSION

    key = "x" * 40
    node = NodeInfo("pi", "10.0.0.5", 5660, key, fingerprint(key), "0.0.9", NODE_PROTOCOL, "cpu", 4, 3.5)
    with pytest.raises(ConfigError, match=rf"node pi \(10.0.0.5:5660\) runs smolcluster 0.0.9 .* this coordinator "
                                          rf"runs {re.escape(VERSION)}"):
        node.check()
    node.version, node.fingerprint = VERSION, "0" * 16
    with pytest.raises(ConfigError, match="does not match its fingerprint"):
        node.check()


def test_an_agent_whose_info_port_is_taken_says_so_and_one_on_port_0_picks_a_free_pair(tmp_path):
    """The info port is the control port + 1. Asked for P with P + 1 held by another socket, the agent refuses
    in one line naming the info port (it used to die on a bare OSError, and with --port 0 the OS's pick could
    land there: a CI failure); on port 0 it takes a pair whose upper port is free."""
    import socket

    from smolcluster.errors import ConfigError
    from smolcluster.node.agent import Agent

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

    while True:  # a held port whose neighbour below is free, for the control port
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        if free(taken - 1):
            break
        held.close()
    try:
        with pytest.raises(ConfigError, match=f"port {taken} \\(the info port, --port \\+ 1\\) cannot be bound"):
            Agent(tmp_path / "a", port=taken - 1, bind="127.0.0.1", name="a")
        agent = Agent(tmp_path / "b", port=0, bind="127.0.0.1", name="b")
        try:
            assert agent.info.port == agent.port + 1 and agent.facts["port"] == agent.port
        finally:
            agent.close()
    finally:
        held.close()


def test_an_agent_advertises_only_where_it_listens():
    from smolcluster.node.discovery import advertised_addresses, local_addresses

    assert advertised_addresses("127.0.0.1") == ["127.0.0.1"]  # not this host's LAN address: nobody answers there
    assert advertised_addresses("10.1.2.3", "192.168.1.9") == ["192.168.1.9"]  # --advertise wins (a NAT)
    assert advertised_addresses("0.0.0.0") == local_addresses()
