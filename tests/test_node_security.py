"""The node agent and ``cluster=auto`` against a stranger on the LAN and a careless or hostile coordinator.

Real processes on loopback: a rogue agent that claims to be paired (cuda, 999 GB) gets no role and
no key; a pairing code cannot be ground; the agent's ports stay bounded under an endless multipart
message; what a paired coordinator asks for is refused unless it is a plain override of the role's
program (the ``--experimental-rerun`` pickle, an absolute ``name``, a NUL byte); a hypothesis fuzzer
on the node protocol. docs/setup_cluster.md, "Threat model", quotes these tests by name.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolcluster.errors import ConfigError
from smolcluster.node import discovery
from smolcluster.node.coordinator import AgentLink, ask_operator, pair_all
from smolcluster.node.infoport import MAX_CONNECTIONS, exchange
from smolcluster.node.pairing import (
    AgentStore,
    Allowlist,
    commitment,
    identity,
    nonce,
    pairing_code,
    private_dir,
    public_key,
    write_private,
)
from smolcluster.train_settings import AutoSpec
from tests.test_node_agent import Proc, agents, coordinator, handshake, prepare, procs  # noqa: F401 (procs: a fixture)


def _link(tmp: Path, port: int, who: str = "coord") -> AgentLink:
    d = tmp / who / "coordinator"
    return AgentLink(discovery.ask(f"127.0.0.1:{port}"), identity(d / "identity"), d / "links")


def _ask(link: AgentLink, kind: str, fields: dict, timeout_s: float = 20):
    """Send one control message, the agent's answer (any kind)."""
    link.ep.send(kind, fields)
    msg = link.ep.recv(int(timeout_s * 1000))
    assert msg is not None, f"no answer to {kind} within {timeout_s}s"
    return msg


# -- hole 1: a rogue agent ---------------------------------------------------------------------------------------

def test_a_rogue_agent_claiming_paired_cuda_999gb_gets_no_role_and_no_key(tmp_path, procs):  # noqa: F811
    """A fake agent (its own key, claims ``paired``, cuda, 999 GB) beside a paired agent: the coordinator would
    have placed the server on it by its claims; it refuses in one line, and the rogue never hears a control
    message (no reserve, no start_role, no key). The same name as a paired agent under another key: one line."""
    prepare(tmp_path, ["a"])
    (_, port), = agents(tmp_path, {"a": []}, procs).values()
    log = tmp_path / "rogue.jsonl"
    rogue = Proc([sys.executable, "-u", "-m", "tests.rogue_agent", "rogue", str(tmp_path / "rogue.ready"), str(log)])
    procs.append(rogue)
    deadline = time.monotonic() + 60
    while not (tmp_path / "rogue.ready").is_file() or not (tmp_path / "rogue.ready").read_text():
        assert rogue.p.poll() is None and time.monotonic() < deadline, rogue.text()
        time.sleep(0.05)
    rport = int((tmp_path / "rogue.ready").read_text())
    peers = f"cluster.peers=[127.0.0.1:{port},127.0.0.1:{rport}]"
    c = coordinator(tmp_path, "cluster.mdns=false", peers, "cluster.pair_timeout_s=2", "algo=syncps")
    procs.append(c)
    assert c.wait(timeout=120) == 2, c.text()[-3000:]
    errors = [line for line in c.text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: node rogue \(127.0.0.1:{rport}\): pairing code \d{{6}} was not confirmed on this "
        r"machine within cluster.pair_timeout_s=2s: run again and confirm it there", errors[0]), errors
    heard = [json.loads(line) for line in log.read_text().splitlines()]
    assert {h["port"] for h in heard} == {"info"}, heard  # the control port never heard a word
    assert not any("secret" in json.dumps(h) for h in heard)
    assert not (tmp_path / "coord" / "coordinator" / "agents" / "rogue.key").exists()
    # a rogue answering under a paired agent's name: refused in one line saying how to re-pair
    (tmp_path / "rogue.ready").unlink()
    rogue.stop()
    rogue = Proc([sys.executable, "-u", "-m", "tests.rogue_agent", "a", str(tmp_path / "rogue.ready"), str(log)])
    procs.append(rogue)
    while not (tmp_path / "rogue.ready").is_file() or not (tmp_path / "rogue.ready").read_text():
        assert rogue.p.poll() is None and time.monotonic() < deadline + 60, rogue.text()
        time.sleep(0.05)
    rport = int((tmp_path / "rogue.ready").read_text())
    state = tmp_path / "coord" / "coordinator"  # (the coordinator's own pairing step, in this process)
    with pytest.raises(ConfigError) as e:
        pair_all([discovery.ask(f"127.0.0.1:{rport}")], public_key(state / "identity" / "client.key"),
                 AgentStore(state), AutoSpec(pair_timeout_s=2), state)
    assert re.fullmatch(r"node a now presents key \w{16}, not the key this coordinator paired with \(\w{16}\): if that "
                        r"machine was reinstalled, re-pair with rm .*/coordinator/agents/a.key and run again",
                        str(e.value)), str(e.value)


# -- one agent for the rest (each test leaves it as it found it) ---------------------------------------------------

@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """(tmp, agent Proc, control port): one agent paired with the test's coordinator identity."""
    tmp = tmp_path_factory.mktemp("node")
    prepare(tmp, ["a"])
    started: list = []
    (proc, port), = agents(tmp, {"a": []}, started).values()
    yield tmp, proc, port
    for p in started:
        p.stop()


def _alive_and_serving(tmp: Path, proc: Proc, port: int) -> None:
    assert proc.p.poll() is None, proc.text()[-3000:]
    assert discovery.ask(f"127.0.0.1:{port}").name == "a"
    link = _link(tmp, port)
    try:
        assert _ask(link, "status", {}).kind == "node_status"
    finally:
        link.close()


# -- hole 4: pairing codes ---------------------------------------------------------------------------------------

def _pair_exchange(port: int, key: str, reveal=None, name: str = "test", source: str | None = None) -> list[dict]:
    """The coordinator's side of the exchange by hand; ``reveal(agent_nonce) -> nonce`` may lie."""
    mine = nonce()
    want = [{"kind": "pair_commit", "key": key, "commit": commitment(key, mine), "name": name},
            lambda r: {"kind": "pair_reveal", "nonce": reveal(r["nonce"]) if reveal else mine}]
    for _ in range(200):  # one exchange per source per second: wait for the turn (a state, not a duration)
        replies = _exchange_from(source, port + 1, want)
        if "one pairing request per" not in replies[0].get("reason", ""):
            return [*replies, {"mine": mine}]
        time.sleep(0.05)
    raise AssertionError("the agent's rate limit never let the exchange through")


def _exchange_from(source: str | None, port: int, requests: list) -> list[dict]:
    if source is None:
        return exchange("127.0.0.1", port, requests)
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    f, out = s.makefile("rwb"), []
    with s:
        for req in requests:
            f.write(json.dumps(req(out[-1]) if callable(req) else req).encode() + b"\n")
            f.flush()
            out.append(json.loads(f.readline()))
            if out[-1]["kind"] == "refuse":
                break
    return out


def test_a_code_cannot_be_ground_and_confirmation_pairs_exactly_the_key_shown(agent):
    """The legitimate coordinator's exchange shows code X on the agent. No code exists before both fresh nonces do:
    the same two keys give another code in the next exchange, so nothing ground offline from keys (the old
    scheme's 25 s attack) matches. Online, an attacker must commit to its nonce before it sees the agent's; a
    reveal other than the committed nonce (what a nonce ground to give X would be) is refused. Confirming X pairs
    the key X was shown for, and no other; X is then spent. A rogue's name with a newline and escape codes is
    logged as one sanitized line."""
    tmp, proc, port = agent
    agent_key = discovery.ask(f"127.0.0.1:{port}").key
    legit = public_key(identity(tmp / "legit" / "identity") / "client.key")
    mallory = public_key(identity(tmp / "mallory" / "identity") / "client.key")
    r = _pair_exchange(port, legit)
    assert r[1] == {"kind": "pair_state", "state": "pending"}
    x = pairing_code(agent_key, legit, r[0]["nonce"], r[2]["mine"])
    proc.wait_for(rf"key \w+\): code {x}\. If the coordinator shows the same code")
    ground = _pair_exchange(port, mallory, reveal=lambda agent_nonce: nonce(), name="evil\n\x1b[31mFAKE LOG LINE")
    assert ground[1]["kind"] == "refuse" and "does not match the commitment" in ground[1]["reason"]
    codes = set()
    for _ in range(2):
        honest = _pair_exchange(port, mallory, name="evil\n\x1b[31mFAKE LOG LINE")
        assert honest[1]["state"] == "pending"
        codes.add(pairing_code(agent_key, mallory, honest[0]["nonce"], honest[2]["mine"]))
    assert len(codes) == 2 and x not in codes  # (each a 1e-6 chance otherwise)
    proc.wait_for(rf"coordinator evil\?\?\[31mFAKE LOG LINE at 127.0.0.1 \(key \w+\): code {max(codes)}")
    assert not any("\x1b" in line or line.startswith("[31mFAKE") for _, line in proc.lines)
    (tmp / "a" / "confirm").mkdir(exist_ok=True)
    (tmp / "a" / "confirm" / x).write_text("confirmed\n")
    proc.wait_for(r"paired with coordinator test \(key")
    assert legit in Allowlist(tmp / "a") and mallory not in Allowlist(tmp / "a")
    assert exchange("127.0.0.1", port + 1, [{"kind": "pair_status", "key": mallory}])[0]["state"] == "pending"
    (tmp / "a" / "confirm" / x).write_text("confirmed\n")  # spent: confirming it again pairs nobody
    proc.wait_for(rf"no pairing waits for code {x}")
    assert mallory not in Allowlist(tmp / "a")
    for f in (tmp / "a" / "paired").glob("*.key"):  # leave the agent paired with the test's coordinator only
        if public_key(f) == legit:
            f.unlink()


def test_an_operator_at_the_coordinators_terminal_confirms_with_y_and_anything_else_confirms_nothing(
        tmp_path, monkeypatch):
    """At a terminal the coordinator asks, one node after another; 'y' writes the confirmation `node pair CODE`
    would, 'n' writes none, and a code confirmed by the command meanwhile is not asked about."""
    import io

    paths = [tmp_path / n / "confirm" / "123456" for n in ("y", "n", "done", "y2")]
    write_private(paths[2], "confirmed\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\nn\ny\n"))  # three answers for the three still open
    asker = ask_operator([(f"Does node {p.parent.parent.name} show the code 123456? [y/N] ", p) for p in paths])
    asker.join(timeout=30)
    assert not asker.is_alive() and [p.is_file() for p in paths] == [True, False, True, True]
    assert paths[0].read_text() == "confirmed\n" and oct(paths[0].stat().st_mode & 0o777) == "0o600"


def test_pairing_requests_are_rate_limited_per_source_and_the_pending_set_is_capped(agent):
    tmp, proc, port = agent
    key = public_key(identity(tmp / "coord" / "coordinator" / "identity") / "client.key")
    stranger = public_key(identity(tmp / "flood" / "identity") / "client.key")
    assert exchange("127.0.0.1", port + 1, [{"kind": "pair_commit", "key": key, "commit": "0" * 64}])[0] == {
        "kind": "pair_state", "state": "paired"}  # (a paired key needs no exchange)
    first = _exchange_from("127.0.0.9", port + 1, [{"kind": "pair_commit", "key": stranger, "commit": "0" * 64}])
    again = _exchange_from("127.0.0.9", port + 1, [{"kind": "pair_commit", "key": stranger, "commit": "0" * 64}])
    assert first[0]["kind"] == "pair_nonce" and "one pairing request per" in again[0]["reason"]
    # the pending set: many keys from many sources fill it to its cap, then every new key is refused
    refused = None
    for i in range(40):
        k = public_key(identity(tmp / "flood" / str(i)) / "client.key") if i < 20 else None
        if k is None:
            break
        r = _pair_exchange(port, k, source=f"127.0.1.{i + 1}")
        if r[0]["kind"] == "refuse":
            refused = r[0]["reason"]
            break
    assert refused and "pairings already await an operator here" in refused
    _alive_and_serving(tmp, proc, port)


# -- hole 3: the agent runs only what it means to ------------------------------------------------------------------

class _Pwn:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_rerun_pickle_an_absolute_name_and_a_nul_byte_are_refused_and_nothing_runs(agent):
    tmp, proc, port = agent
    marker, x = tmp / "pwned", tmp / "elsewhere"
    payload = pickle.dumps(_Pwn(str(marker)), protocol=0).decode()  # an ASCII pickle, as in the report
    link = _link(tmp, port)
    base = {"role": "server", "run_id": "r1", "program": "train"}
    attacks = {  # each alone, then all together (the report's chain)
        "name": {**base, "name": str(x), "args": ["algo=syncps"], "keys": {}},
        "rerun": {**base, "name": "server", "args": [f"--experimental-rerun={x}/keys/server.key"], "keys": {}},
        "pickle key": {**base, "name": "server", "args": [], "keys": {"server.key": payload}},
        "chain": {**base, "name": str(x), "args": [f"--experimental-rerun={x}/keys/server.key"],
                  "keys": {"server.key": payload}},
        "++hydra": {**base, "name": "server", "args": [f"++hydra.run.dir={x}"], "keys": {}},
        "+hydra": {**base, "name": "server", "args": ["+hydra.job.chdir=true"], "keys": {}},
        "~hydra": {**base, "name": "server", "args": ["~hydra.run"], "keys": {}},
        "_target_": {**base, "name": "server", "args": ["model._target_=os.system"], "keys": {}},
        "target in a dict": {**base, "name": "server", "args": ["model={_target_:os.system,command:id}"], "keys": {}},
        "interpolation": {**base, "name": "server", "args": ["data.root=${oc.env:HOME}"], "keys": {}},
        "group path": {**base, "name": "server", "args": ["model=../../../tmp/x"], "keys": {}},
        "run_id": {**base, "name": "server", "run_id": "../../x", "args": [], "keys": {}},
        "NUL": {**base, "name": "server", "args": ["train.steps=1\x00--experimental-rerun"], "keys": {}},
        "NUL in name": {**base, "name": "ser\x00ver", "args": [], "keys": {}},
        "escape in name": {**base, "name": "\x1b[2Jserver", "args": [], "keys": {}},
    }
    try:
        for what, fields in attacks.items():
            msg = _ask(link, "start_role", fields)
            assert msg.kind == "role_state" and msg.fields["state"] == "failed", (what, msg.kind, msg.fields)
        _alive_and_serving(tmp, proc, port)
    finally:
        link.close()
    assert not marker.exists() and not x.exists()
    assert not re.search(r"started .*: pid \d+", proc.text())  # nothing ran
    assert not list((tmp / "a" / "runs").iterdir())
    for _, line in proc.lines:
        assert "\x00" not in line and "\x1b" not in line


def test_key_files_are_written_new_0600_in_0700_dirs_never_through_a_symlink(tmp_path):
    d = private_dir(tmp_path / "a" / "b")
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in (d, d.parent))
    f = write_private(d / "k_secret", "x")
    assert f.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_private(f, "y")  # never over an existing file
    os.symlink(tmp_path / "target", d / "link_secret")
    with pytest.raises(OSError):
        write_private(d / "link_secret", "secret")  # nor through a link (dangling or not)
    assert not (tmp_path / "target").exists()
    os.symlink(tmp_path, tmp_path / "dirlink")
    with pytest.raises(ConfigError, match="not a directory"):
        private_dir(tmp_path / "dirlink")
    with pytest.raises(ConfigError, match="re-pair with rm"):
        store = AgentStore(tmp_path / "coord")
        store.add("pi", "a" * 40)
        store.knows("pi", "b" * 40)


# -- hole 2: bounded ports ---------------------------------------------------------------------------------------

ZMTP_NULL_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
STREAM_MB = 200  # per port; the bound below holds for any amount (the ports close on the first bytes they refuse)
RSS_BOUND_MB = 64


def _stream_endless_multipart(port: int, total_mb: int) -> int:
    """A raw TCP peer: ZMTP 3 greeting (NULL mechanism), then 60 KB frames with MORE set and never a last one,
    reconnecting whenever the agent hangs up, until ``total_mb`` went out or the agent refuses connections."""
    frame = b"\x03" + (60 * 1024).to_bytes(8, "big") + b"\x00" * (60 * 1024)
    sent, connects = 0, 0
    while sent < total_mb << 20 and connects < 2000:
        connects += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(ZMTP_NULL_GREETING)
                while sent < total_mb << 20:
                    s.sendall(frame)
                    sent += len(frame)
        except OSError:
            continue  # hung up on: the bound at work
    return sent


def test_an_endless_multipart_message_to_the_agents_ports_stays_bounded_and_it_keeps_serving(agent):
    """Both listening ports of an agent, each streamed an endless multipart message (raw ZMTP, 60 KB MORE
    frames) by a peer holding no key; the info port also held by more connections than its cap. The agent's
    RSS grows by less than RSS_BOUND_MB, and it answers a real client after each."""
    tmp, proc, port = agent
    rss = psutil.Process(proc.p.pid)
    before = rss.memory_info().rss
    held = [socket.create_connection(("127.0.0.1", port + 1)) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        for p in (port, port + 1):
            _stream_endless_multipart(p, STREAM_MB)
            grown = (rss.memory_info().rss - before) / 2**20
            assert grown < RSS_BOUND_MB, f"port {p}: RSS grew {grown:.0f} MB"
    finally:
        for s in held:
            s.close()
    # The held connections' slots come back as their handler threads read the close; until then a new
    # connection is refused at the cap (on a loaded machine, for a while): wait for that state.
    deadline = time.monotonic() + 60
    while True:
        try:
            server_key = discovery.ask(f"127.0.0.1:{port}").key
            break
        except ConfigError as e:
            assert time.monotonic() < deadline, f"the info port never answered after the held ones closed: {e}"
            time.sleep(0.1)
    # a CURVE client with a key of its own, not paired: its handshake fails (nothing it sends gets in)
    assert handshake(port, server_key, identity(tmp / "stranger2" / "identity")) == "failed (auth)"
    assert handshake(port, server_key, identity(tmp / "coord" / "coordinator" / "identity")) == "succeeded"
    _alive_and_serving(tmp, proc, port)


# -- the node protocol fuzzer --------------------------------------------------------------------------------------

_text = st.one_of(st.text(max_size=40), st.sampled_from(["server", "worker 0", "/etc", "../x", "a" * 40, ""]))
_override = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["train.steps=1", "--experimental-rerun=/tmp/x", "++hydra.run.dir=/", "+hydra.x=1",
                     "~hydra", "model._target_=os.system", "algo=syncps", "cluster.nodes=[{name:a}]", "a=${b}",
                     "x\x00=1", "-m", "model=../x", "data.root=/tmp"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["train.steps", "hydra.run.dir", "model", "seed", "_x_"]),
              st.text(max_size=20)))
_keys = st.dictionaries(st.sampled_from(["server.key", "client.key_secret", "../x", "authorized/client9.key", "k"]),
                        st.text(max_size=80), max_size=3)
_start = st.fixed_dictionaries({"name": _text, "role": st.sampled_from(["server", "worker", "stage", "x"]),
                                "run_id": _text, "args": st.lists(_override, max_size=4), "keys": _keys},
                               optional={"rank": st.integers(-2, 2**62), "program": st.sampled_from(["train", "x"])})
_control = st.one_of(
    st.tuples(st.just("start_role"), _start),
    st.tuples(st.just("reserve"), st.fixed_dictionaries({"name": _text, "bind": st.sampled_from(
        ["127.0.0.1", "0.0.0.0", "::1", "x", "1.2.3.4"]), "count": st.integers(-5, 40)})),
    st.tuples(st.just("node_hello"), st.fixed_dictionaries({"protocol": st.integers(-2**63, 2**63 - 1), "version": st.text(max_size=9)})),
    st.tuples(st.just("status"), st.just({})),
    st.tuples(st.just("stop_roles"), st.fixed_dictionaries({"reason": st.text(max_size=50)})))
_info = st.one_of(
    st.dictionaries(st.sampled_from(["kind", "key", "commit", "nonce", "name"]),
                    st.one_of(st.text(max_size=70), st.integers(), st.none(), st.lists(st.integers(), max_size=3))),  # (JSON: any int)
    st.fixed_dictionaries({"kind": st.sampled_from(["node_hello", "pair_status", "pair_commit", "pair_reveal", "x"]),
                           "key": st.one_of(st.text(min_size=40, max_size=40), st.integers()),
                           "commit": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
                           "name": st.text(max_size=30)}))


def _answered(link: AgentLink, kind: str, fields: dict) -> list[str]:
    """Send one message, then ``status``; the kinds of everything the agent answered until its node_status."""
    link.ep.send(kind, fields)
    link.ep.send("status", {})
    kinds, deadline = [], time.monotonic() + 30
    while "node_status" not in kinds:
        msg = link.ep.recv(int(max(1, deadline - time.monotonic()) * 1000))
        assert msg is not None, f"no node_status after {kind} within 30s (answered so far: {kinds})"
        kinds.append(msg.kind)
    return kinds


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paired=st.lists(_control, min_size=1, max_size=3), unpaired=st.lists(_control, max_size=3),
       info=st.lists(_info, max_size=3))
def test_the_node_protocol_fuzzed_from_paired_and_unpaired_keys(agent, paired, unpaired, info):
    """Random node_hello / reserve / start_role / status / stop_roles from the paired coordinator (each answered;
    start_role always carries one bad key file name, so nothing is spawned) and from an unpaired key, and random
    info-port requests: the agent answers, stays up, and never starts a role."""
    tmp, proc, port = agent
    link, stranger = _link(tmp, port), _link(tmp, port, who="stranger")
    try:
        for kind, fields in unpaired:
            stranger.ep.send(kind, fields)
        for kind, fields in paired:
            if kind == "start_role":
                fields = {**fields, "keys": {**fields["keys"], "../outside": "x"}}
            assert set(_answered(link, kind, fields)) <= {"node_info", "node_status", "reserved", "refuse", "role_state"}
        try:
            exchange("127.0.0.1", port + 1, info)
        except (OSError, ValueError):
            pass  # hung up on: fine
        assert exchange("127.0.0.1", port + 1, [{"kind": "node_hello"}])[0]["name"] == "a"
    finally:
        link.close()
        stranger.close()
    assert proc.p.poll() is None, proc.text()[-3000:]
    assert not re.search(r"started .*: pid \d+", proc.text())
