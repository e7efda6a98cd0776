"""``python -m smolcluster.train cluster=auto ...`` (and ``infer`` / ``chat``): find the paired agents, place
the roles, run through them.

    1. discover   mDNS for cluster.discover_s (early once cluster.expect answered) + cluster.peers
    2. check      same version and node protocol everywhere; pair where not yet: a code on both screens,
                  confirmed on both machines; only agents in this coordinator's store (STATE/coordinator/agents/)
                  get a control link, a role or a key, whatever else they claim
    3. place      syncps/edp: the server on cluster.server (or the node with the most free memory), one
                  worker on each other node (accelerators first; every node when there is only one);
                  allreduce, diloco: a ring rank on every node (cluster.workers=N cycles the nodes);
                  mp / inference: algo.stages / stages stages on the nodes by free memory, most first
                  (mp: each stage's share of the layers in proportion to its node's free memory, unless
                  cluster.nodes[i].weight says; inference: cluster.nodes[i].memory_gb for partition=auto)
                  chat replicas=R: R pipelines, a node per stage, each its own ports and keys (place_replicas)
    4. keys       a fresh CURVE set for this run, sent over the encrypted control channel (never copied by
                  hand): syncps/edp: the server's pair to the server's node only, one client pair per worker;
                  ring ranks and stages (each both binds and connects): the server pair, their own client
                  pair and every member's public client key
    5. run        reserve each listening role's port on its agent (held for it: no race, see agent.py),
                  start every role; relay their logs ``[node:role]``; a heartbeat (``status``) to every
                  agent each cluster.heartbeat_s. Inference: the head runs here, in infer / chat
    6. stop       on success, Ctrl-C, SIGTERM or failure: ``stop_roles`` to every agent, and wait

A node silent for cluster.liveness_s has vanished: one error line naming it; the run goes on as
the algorithm defines when that node held nothing the run needs (syncps/edp workers: the server
drops them; allreduce/diloco ranks but rank 0: the ring re-forms; diloco with fragments, overlap
or round_s stops), and stops everywhere when it held the
server, allreduce's rank 0 (which writes the run's files), or a pipeline stage. A role that fails
to start or exits non-zero stops the run everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from loguru import logger
from omegaconf import OmegaConf

from smolcluster.cluster import new_run_id
from smolcluster.errors import ConfigError, PeerError
from smolcluster.launch.overrides import child_overrides
from smolcluster.launch.supervisor import Supervisor, sigterm_as_interrupt
from smolcluster.node import discovery
from smolcluster.node.discovery import NodeInfo
from smolcluster.node.infoport import exchange
from smolcluster.node.pairing import (
    AgentStore,
    commitment,
    confirm_path,
    identity,
    nonce,
    pairing_code,
    printable,
    private_dir,
    public_key,
    write_private,
    write_public_key,
)
from smolcluster.node.protocol import MAX_BYTES
from smolcluster.security import is_loopback
from smolcluster.train_settings import MB, AutoSpec, ClusterSpec, TrainConfig
from smolcluster.transport import ClientEndpoint, client_key_name, make_keys

ALGOS = ("syncps", "edp", "allreduce", "diloco", "mp")
RINGS = ("allreduce", "diloco")  # a rank on every node, rank 0 writing the run's files
# what the coordinator decides per run: never forwarded from the user's command line to the roles
_OWN = ("cluster.host=", "cluster.bind=", "cluster.workers=", "cluster.keys=", "cluster.nodes=", "cluster.peers=",
        "cluster.write=", "cluster.server=", "cluster.discover_only=", "cluster.expect=", "node=", "cluster.insecure=",
        "hydra.", "hydra/")  # Hydra's own settings stay with the coordinator (agents refuse them)
FINAL = ("exited", "stopped", "failed")
WEIGHT_MODES = ("auto", "send", "shared")  # cluster.weights: inference's weights travel to the stages (weightsend.py)
# infer / chat overrides a stage takes (the head's sampling, prompt and serve keys stay here)
_STAGE_KEYS = ("checkpoint=", "model=", "model.", "+model.", "data=", "data.", "stages=", "head=", "seed=",
               "precision=", "quantize=", "quantize_group=", "partition=", "stage_log_level=", "serve.kv_cache_mb=",
               "serve.prefix_cache=", "serve.prefix_block=", "compile=",
               "cluster.heartbeat_s=", "cluster.liveness_s=", "cluster.connect_timeout_s=", "cluster.max_message_mb=",
               "adapters=", "adapters.", "+adapters.")


class AgentLink:
    """The encrypted control channel to one agent, with what the coordinator knows of it."""

    def __init__(self, node: NodeInfo, id_dir: Path, links_dir: Path):
        self.node, self.name = node, node.name
        d = private_dir(links_dir / node.fingerprint)
        write_public_key(d / "server.key", node.key)  # the agent's key: CURVE checks we reach *that* agent
        (d / "client.key_secret").unlink(missing_ok=True)
        write_private(d / "client.key_secret", (id_dir / "client.key_secret").read_text())
        self.ep = ClientEndpoint(f"tcp://{node.host}:{node.port}", max_bytes=MAX_BYTES, curve_dir=str(d))
        self.last_seen = time.monotonic()
        self.alive = True
        self.roles: dict[str, dict] = {}  # role name -> its last role_state fields

    def request(self, kind: str, fields: dict, want: str, timeout_s: float, on_other=None):
        """Send, and wait for the ``want`` answer; other messages meanwhile go to ``on_other(link, msg)`` (a run
        under way: its roles' logs and states) or are dropped (before any role runs)."""
        self.ep.send(kind, fields)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.ep.recv(int(max(1, (deadline - time.monotonic()) * 1000)))
            if msg is None:
                break
            self.last_seen = time.monotonic()
            if msg.kind == "refuse":
                raise ConfigError(f"node {self.node.where()} refused: {msg.fields['reason']}")
            if msg.kind == want:
                return msg
            if on_other is not None:
                on_other(self, msg)
        raise PeerError(f"node {self.node.where()} did not answer {kind} within {timeout_s:g}s "
                        "(agent stopped, or a firewall between here and there?)")

    def close(self) -> None:
        self.ep.close()


def discover(c: AutoSpec) -> list[NodeInfo]:
    found: dict[str, NodeInfo] = {}
    peers = discovery.peer_list(c.peers)
    for peer in peers:
        n = discovery.ask(peer)
        found[n.fingerprint] = n
    if c.mdns:
        for n in discovery.browse(c.discover_s, expect=c.expect):
            found.setdefault(n.fingerprint, n)
    nodes = sorted(found.values(), key=lambda n: n.name)
    if not nodes:
        raise ConfigError(f"cluster=auto found no agents (mDNS for {c.discover_s:g}s, {len(peers)} "
                          "static peers): start `python -m smolcluster.node` on each machine, or list them in "
                          "cluster.peers=[HOST:5660,...] where multicast does not pass")
    if c.expect and len(nodes) < c.expect:
        raise ConfigError(f"cluster.expect={c.expect} agents, found {len(nodes)} ({', '.join(n.name for n in nodes)})")
    names = [n.name for n in nodes]
    for n in nodes:  # two agents with one name (cloned machines): tell them apart by key
        if names.count(n.name) > 1:
            n.name = f"{n.name}-{n.fingerprint[:6]}"
    for n in nodes:
        n.check()
    return nodes


def show(nodes: list[NodeInfo]) -> None:
    print(f"{'node':<16} {'address':<22} {'device':<6} {'cores':>5} {'free GB':>8}  key fingerprint  found by",
          file=sys.stderr)
    for n in nodes:
        print(f"{n.name:<16} {n.host + ':' + str(n.port):<22} {n.device:<6} {n.cores:>5} {n.memory_gb:>8.1f}  "
              f"{n.fingerprint}  {n.source}", file=sys.stderr)


def _info(node: NodeInfo, requests: list) -> list[dict]:
    try:
        return exchange(node.host, node.port + 1, requests)
    except (OSError, ValueError) as e:
        raise PeerError(f"node {node.where()}: its info port {node.port + 1} does not answer ({e})") from None


def _start_pairing(node: NodeInfo, my_key: str) -> str:
    """The commit / nonce / reveal exchange with the agent; the code both screens show."""
    mine = nonce()
    replies = _info(node, [{"kind": "pair_commit", "key": my_key, "commit": commitment(my_key, mine),
                            "name": socket.gethostname()},
                           lambda r: {"kind": "pair_reveal", "nonce": mine}])
    if replies[-1]["kind"] == "refuse" or len(replies) < 2:
        raise ConfigError(f"node {node.where()} refused to pair: {replies[-1].get('reason', replies[-1])}")
    theirs = replies[0]
    if theirs.get("key") != node.key or not isinstance(theirs.get("nonce"), str):
        raise ConfigError(f"node {node.where()} pairs under another key than it advertised: not pairing")
    return pairing_code(node.key, my_key, theirs["nonce"], mine)


@dataclass
class Pairing:
    """One agent being paired: the code both screens show, and which side has confirmed it so far."""

    node: NodeInfo
    code: str
    known: bool        # this coordinator keeps the agent's key (the operator confirmed here)
    agent_knows: bool  # the agent keeps this coordinator's key (the operator confirmed there)
    confirm: Path      # the file a confirmation here writes

    def todo(self) -> list[str]:
        return ["there"] * (not self.agent_knows) + ["here"] * (not self.known)


def pair_all(nodes: list[NodeInfo], my_key: str, store: AgentStore, c: AutoSpec, state: Path) -> None:
    """Returns once this coordinator and every agent each hold the other's key (asking the operator where one
    does not); else a ConfigError naming the nodes. Every code is shown at once, so the operator confirms them
    in one walk past the machines. Nothing an agent says makes it trusted here: only the operator's
    confirmation of its code (``smolcluster.node pair CODE --state-dir STATE``) adds it to ``store``."""
    waiting = [x for x in (_begin_pairing(n, my_key, store, c, state) for n in nodes) if x is not None]
    if not waiting:
        return
    shown = list(waiting)
    if sys.stdin is not None and sys.stdin.isatty():  # one question after another, on one thread
        ask_operator([(f"Does node {printable(x.node.where(), 120)} show the code {x.code}? [y/N] ", x.confirm)
                      for x in waiting if not x.known])
    deadline = time.monotonic() + c.pair_timeout_s
    try:
        while waiting and time.monotonic() < deadline:
            for x in waiting:
                if not x.known and x.confirm.is_file():
                    store.add(x.node.name, x.node.key)
                    x.known = True
                if not x.agent_knows:
                    x.agent_knows = _info(x.node, [{"kind": "pair_status", "key": my_key}])[0].get("state") == "paired"
                if x.known and x.agent_knows:
                    logger.success(f"paired with node {x.node.where()}")
            waiting = [x for x in waiting if x.todo()]
            time.sleep(0.3)
    finally:
        for x in shown:
            x.confirm.unlink(missing_ok=True)  # one-shot: neither a late confirmation nor a used one counts again
    if waiting:
        where = {"there here": "both machines", "here": "this machine", "there": "the node"}
        late = "; ".join(f"node {x.node.where()}: pairing code {x.code} was not confirmed on "
                         f"{where[' '.join(x.todo())]}" for x in waiting)
        raise ConfigError(f"{late} within cluster.pair_timeout_s={c.pair_timeout_s:g}s: run again and confirm it there")


def _begin_pairing(node: NodeInfo, my_key: str, store: AgentStore, c: AutoSpec, state: Path) -> Pairing | None:
    """Start pairing with one agent and show its code; None when both sides already hold the other's key."""
    known = store.knows(node.name, node.key)  # (raises for a known name with another key)
    agent_knows = _info(node, [{"kind": "pair_status", "key": my_key}])[0].get("state") == "paired"
    if known and agent_knows:
        return None
    where = node.where()
    if c.pair_timeout_s <= 0:
        raise ConfigError(f"node {where} has not paired with this coordinator: set cluster.pair_timeout_s=120 "
                          "and confirm the code both machines show, on both, with python -m smolcluster.node pair CODE")
    code = _start_pairing(node, my_key)
    x = Pairing(node, code, known, agent_knows, confirm_path(state, code))
    x.confirm.unlink(missing_ok=True)  # a confirmation written before this code was shown confirms nothing
    here = f"python -m smolcluster.node pair {code} --state-dir {state}"
    here = f"with 'y' below, or {here}" if sys.stdin is not None and sys.stdin.isatty() else here
    there = f"python -m smolcluster.node pair {code} (with --state-dir as its agent was started, if not the default)"
    todo = [*([f"there: {there}"] if not agent_knows else []), *([f"here: {here}"] if not known else [])]
    logger.warning(f"pairing with node {where} (key {node.fingerprint}): code {code}. If that machine shows the "
                   f"same code, confirm {' and '.join(todo)}")
    return x


def ask_operator(questions: list[tuple[str, Path]]) -> threading.Thread:
    """At a terminal, the operator confirms here by answering ``y``, one question at a time: the answer writes
    the same file that ``python -m smolcluster.node pair CODE`` would, so either way ends the wait. A thread, so
    the wait keeps its deadline and notices the agents' side meanwhile."""
    def ask() -> None:
        for question, confirm in questions:
            if confirm.exists():  # confirmed with the command meanwhile
                continue
            try:
                answer = input(question)
            except (EOFError, OSError):
                return
            if answer.strip().lower() in ("y", "yes") and not confirm.exists():
                write_private(confirm, "confirmed\n")

    asker = threading.Thread(target=ask, name="pair-confirm", daemon=True)
    asker.start()
    return asker


def place(nodes: list[NodeInfo], c: AutoSpec) -> tuple[NodeInfo, list[NodeInfo]]:
    """(server node, worker node per rank)."""
    if c.server:
        match = [n for n in nodes if n.name == c.server]
        if not match:
            raise ConfigError(f"cluster.server={c.server} is not among the agents found: "
                              f"{', '.join(n.name for n in nodes)}")
        server = match[0]
    else:
        server = max(nodes, key=lambda n: (n.memory_gb, n.name))
    hosts = sorted((n for n in nodes if n is not server), key=lambda n: (n.device == "cpu", -n.memory_gb, n.name))
    hosts = hosts or [server]
    count = c.workers or len(hosts)
    return server, [hosts[r % len(hosts)] for r in range(count)]


def place_ranks(nodes: list[NodeInfo], count: int) -> list[NodeInfo]:
    """rank -> node for a ring or a pipeline: accelerators first, then the most free memory; cycles past the end."""
    order = sorted(nodes, key=lambda n: (n.device == "cpu", -n.memory_gb, n.name))
    return [order[r % len(order)] for r in range(count)]


def write_cluster(path: Path, c: ClusterSpec, server: NodeInfo | None, workers: list[NodeInfo]) -> None:
    """The discovered cluster as a normal cluster file (conf/cluster/lan-example.yaml's shape)."""
    first = server or workers[0]
    out = {"name": path.stem, "host": first.host, "port": 5555, "bind": "0.0.0.0", "workers": len(workers),
           "keys": None, "insecure": False, "heartbeat_s": c.heartbeat_s, "liveness_s": c.liveness_s,
           "connect_timeout_s": c.connect_timeout_s, "max_message_mb": c.max_bytes // MB,
           **({"server": {"name": server.name, "host": server.host}} if server else {}),
           "nodes": [{"name": n.name, "host": n.host, "device": n.device} for n in workers]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by smolcluster cluster=auto: set keys (python -m smolcluster.keys) before a LAN run\n"
                    + OmegaConf.to_yaml(OmegaConf.create(out)))
    logger.info(f"wrote the discovered cluster to {path} (use it with --config-dir or conf/cluster/)")


def _value(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(v)


def node_entries(c: ClusterSpec, workers: list[NodeInfo], ports: list[int] | None = None,
                 defaults: list[dict] | None = None) -> list[dict]:
    """Each rank's ``cluster.nodes`` entry: the user's per-rank settings (batch_size, delay_s, ...) with its node's
    name and host from discovery (and its reserved port; ``defaults``: where the user set none)."""
    user = c.nodes
    entries = []
    for r, n in enumerate(workers):
        mine = user[r] if r < len(user) and isinstance(user[r], dict) else {}
        entry = {k: v for k, v in mine.items() if isinstance(v, (str, int, float, bool))}
        entry.setdefault("name", n.name)
        for k, v in (defaults[r] if defaults else {}).items():
            entry.setdefault(k, v)
        entry["host"] = n.host
        if ports:
            entry["port"] = ports[r]
        entries.append(entry)
    return entries


def nodes_override(c: ClusterSpec, workers: list[NodeInfo], ports: list[int] | None = None,
                   defaults: list[dict] | None = None) -> str:
    """``cluster.nodes=[...]`` for the roles (:func:`node_entries`)."""
    entries = ("{" + ",".join(f"{k}:{_value(v)}" for k, v in e.items()) + "}"
               for e in node_entries(c, workers, ports, defaults))
    return f"cluster.nodes=[{','.join(entries)}]"


def _files(d: Path, names: dict[str, str]) -> dict[str, str]:
    return {dest: (d / src).read_text() for dest, src in names.items()}


def _label(name: str) -> str:
    return "the server" if name == "server" else name


def _why(rs: dict) -> str:
    """The role's own one-line error when it printed one, else a pointer to its log."""
    return f"({rs['error']})" if rs.get("error") else "(its log is above)"


def _ended_badly(link: AgentLink, name: str, rs: dict) -> str:
    return (f"node {link.node.where()}: {_label(name)} exited with code {rs.get('code')} {_why(rs)}; "
            "stopped the run everywhere")


class Run(Supervisor):
    """The node-agent backend of the supervisor (smolcluster/launch/supervisor.py): roles started through each
    node's agent, their output and state arriving over its control link (:meth:`pump`, on every poll)."""

    def __init__(self, what: str, run_id: str, c: ClusterSpec, links: dict[str, AgentLink],
                 run_dir: Path | None = None):
        self.what, self.run_id, self.c, self.links, self.run_dir = what, run_id, c, links, run_dir
        self.last_beat = 0.0
        self.essential: set[str] = set()  # nodes whose loss stops the run
        self.lead: tuple[AgentLink, str] | None = None  # the role whose end ends the run (supervise)
        self.started: dict[str, tuple[AgentLink, dict, str, int]] = {}  # role -> (link, start_role, bind, port)
        self.restarting: dict[str, int] = {}  # role -> its port: restart() asked for it, no answer yet

    def reserve(self, link: AgentLink, name: str, bind: str) -> int:
        """A port on ``link``'s node, held there for role ``name`` until it listens (before anything starts)."""
        port = int(link.request("reserve", {"name": name, "bind": bind, "count": 1}, "reserved", 10).fields["ports"][0])
        self.started[name] = (link, {}, bind, port)
        return port

    def start(self, link: AgentLink, name: str, role: str, rank: int | None, args: list[str], keys: dict,
              program: str = "train", model: dict | None = None) -> None:
        fields = {"name": name, "role": role, "run_id": self.run_id, "args": args, "keys": keys, "program": program}
        if rank is not None:
            fields["rank"] = rank
        if model is not None:  # the stage reads the weights sent to its agent's cache, not the head's paths
            fields["model"] = model
            fields["args"] = [a for a in args if not a.lstrip("+").startswith(("checkpoint=", "model.pretrained="))]
        link.roles[name] = {"name": name, "state": "starting"}
        link.ep.send("start_role", fields)
        _, _, bind, port = self.started.get(name, (link, {}, "", 0))
        self.started[name] = (link, fields, bind, port)

    def restart(self, name: str) -> None:
        """Start role ``name`` again as it was started, on its node and its port, so the roles that know its address
        (a pipeline's other stages) reach it there; its weights are still in the agent's cache. Never waits (the
        heartbeat thread calls it, and must keep every other agent's link beating): the port is asked for here and
        the start_role follows when the agent's ``reserved`` arrives (:meth:`handle`); a refusal or a port other
        than its own marks the role failed. (Restarts gives a start that never answers a deadline.)"""
        link, fields, bind, port = self.started[name]
        link.roles[name] = {"name": name, "state": "starting"}
        if not port:
            link.ep.send("start_role", fields)
            return
        self.restarting[name] = port
        link.ep.send("reserve", {"name": name, "bind": bind, "count": 1, "port": port})

    def _reserved(self, link: AgentLink, f: dict) -> None:
        """The answer to :meth:`restart`'s reserve (matched by its role name): now the start_role."""
        name = f["name"]
        port = self.restarting.pop(name, None)
        if port is None:
            return  # (start_ranks' own reserves are answered to their request)
        got = f["ports"][0] if f["ports"] else None
        if got != port:
            self.not_restarted(link, name, f"it held port {got} for {name}, not its port {port}")
            return
        link.ep.send("start_role", self.started[name][1])

    def not_restarted(self, link: AgentLink, name: str, why: str) -> None:
        """Role ``name``'s restart failed (refused, or not running by its deadline: Restarts): the role is failed,
        not left starting (which :meth:`stop_everywhere` would wait for), and a late ``reserved`` starts nothing."""
        self.restarting.pop(name, None)
        link.roles[name] = {"name": name, "state": "failed", "detail": why}

    def stop_role(self, name: str, reason: str) -> None:
        """Stop role ``name`` alone on its agent (the run's other roles go on)."""
        link = self.started[name][0]
        self.restarting.pop(name, None)
        link.ep.send("stop_roles", {"reason": reason, "name": name})

    def pump(self) -> None:
        """Take every waiting message from every agent; beat; notice vanished agents."""
        now = time.monotonic()
        beat = now - self.last_beat >= self.c.heartbeat_s
        for link in self.links.values():
            if not link.alive:
                continue
            while (msg := link.ep.recv(0)) is not None:
                link.last_seen = time.monotonic()
                self.handle(link, msg)
            if beat:
                link.ep.send("status", {})
            if link.alive and time.monotonic() - link.last_seen > self.c.liveness_s:
                self.vanished(link, f"no answer for {self.c.liveness_s:g}s")
        if beat:
            self.last_beat = now

    def handle(self, link: AgentLink, msg) -> None:
        f = msg.fields
        if msg.kind == "role_log":
            for line in f["lines"]:
                sys.stderr.write(f"[{link.name}:{f['name']}] {line}\n")
                if line.startswith("error: "):  # the role's one-line reason, for the coordinator's own
                    link.roles.setdefault(f["name"], {})["error"] = line[len("error: "):]
        elif msg.kind == "role_state":  # (running: a new process, nothing of an earlier one's error kept)
            link.roles[f["name"]] = {**(link.roles.get(f["name"], {}) if f["state"] != "running" else {}), **f}
            if f["state"] == "failed":
                raise PeerError(f"node {link.node.where()} could not start {f['name']}: {f.get('detail')}")
        elif msg.kind == "role_endpoint":
            self.announce(link, f)
        elif msg.kind == "reserved":
            self._reserved(link, f)
        elif msg.kind == "node_bye":
            self.vanished(link, f["reason"])
        elif msg.kind == "refuse" and f.get("name") in self.restarting:  # restart()'s reserve, refused
            self.not_restarted(link, f["name"], f"its port was refused: {f['reason']}")
        elif msg.kind == "refuse":
            raise ConfigError(f"node {link.node.where()} refused: {f['reason']}")

    def announce(self, link: AgentLink, f: dict) -> None:
        """A role's /metrics URL into RUN_DIR/endpoints/ here, where ``smolcluster.top`` looks (the URL's
        loopback host, what a role serving every interface writes, becomes its node's address)."""
        if self.run_dir is None or not re.fullmatch(r"[\w.-]+\.json", f["file"]) or f["file"].startswith("."):
            return
        info = {k: str(v) for k, v in f["endpoint"].items()}
        url = urlsplit(info.get("url", ""))
        if url.scheme != "http" or url.port is None:
            return
        if is_loopback(url.hostname or "") and not is_loopback(link.node.host):
            info["url"] = urlunsplit(url._replace(netloc=f"{link.node.host}:{url.port}"))
        path = self.run_dir / "endpoints" / f["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info))

    def vanished(self, link: AgentLink, why: str) -> None:
        link.alive = False
        held = ", ".join(link.roles) or "no roles"
        if link.name in self.essential:
            raise PeerError(f"node {link.node.where()} vanished ({why}); it ran {held}: stopped the run everywhere")
        logger.error(f"node {link.node.where()} vanished ({why}); it ran {held}: {self.what} goes on "
                     "without it as the algorithm defines")

    def tick(self) -> None:
        self.pump()

    def failed(self) -> str | None:
        """A role that exited non-zero (or failed to start), naming its node and its reason. Once the lead has
        ended, its own end alone counts: cleanly with a summary, or not."""
        if self.lead is not None:
            link, name = self.lead
            st = link.roles.get(name, {})
            if st.get("state") in FINAL:
                return None if st.get("code") == 0 and "summary" in st else _ended_badly(link, name, st)
        for link in self.links.values():
            for name, rs in link.roles.items():
                if link.alive and rs.get("state") in FINAL and rs.get("code") not in (0, None):
                    return _ended_badly(link, name, rs)
        return None

    def check_roles(self) -> None:
        """A role that exited non-zero (or failed to start) raises, naming its node and its reason."""
        why = self.failed()
        if why is not None:
            raise PeerError(why)

    def stop(self) -> None:
        self.stop_everywhere("the coordinator stopped the run")

    def supervise(self, lead: AgentLink, name: str) -> dict:
        """Until the lead role (the one that writes the run's files) exits: a role failing or a node the run
        needs vanishing raises."""
        self.lead = (lead, name)
        self.wait(lambda: lead.roles.get(name, {}).get("state") in FINAL, poll_s=0.05)
        self._let_workers_finish()
        return lead.roles[name]["summary"]

    def _let_workers_finish(self, grace_s: float = 10.0) -> None:
        """The server told its workers to stop: give them a moment to exit on their own."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(
                rs.get("state") not in FINAL for link in self.links.values() if link.alive for rs in link.roles.values()):
            self.pump()
            time.sleep(0.05)

    def stop_everywhere(self, reason: str, grace_s: float = 15.0) -> None:
        live = [link for link in self.links.values() if link.alive]
        for link in live:
            try:
                link.ep.send("stop_roles", {"reason": reason})
            except PeerError:
                link.alive = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            running = [(link.name, n) for link in live if link.alive for n, rs in link.roles.items()
                       if rs.get("state") not in FINAL]
            if not running:
                return
            try:
                self.pump()
            except (PeerError, ConfigError):
                pass  # already stopping
            time.sleep(0.05)
        logger.error(f"no confirmation that these roles stopped: {running}")

    def start_ranks(self, ranks: list[NodeInfo], role: str, args: list[str], keys_dir: Path, *,
                    program: str = "train", defaults: list[dict] | None = None, head: bool = False,
                    models=None, replica: int | None = None) -> list[int]:
        """A ring's ranks or a pipeline's stages, rank r on ``ranks[r]``: each binds a port its agent reserved,
        knows every other's, and holds the run's server pair, its own client pair and every member's public
        client key (``head``: one client pair more, for the head that runs here). ``models(node entries)``, once
        the ports are held: each rank's ``model`` for start_role (or None), weights sent. ``replica``: one replica's
        of several (its roles' names: :func:`role_name`). Returns the ports."""
        n = len(ranks)
        run_keys(keys_dir, clients=n + int(head))
        bind = "127.0.0.1" if all(is_loopback(x.host) for x in ranks) else "0.0.0.0"  # keys make a LAN bind safe
        names = [role_name(role, r, replica) for r in range(n)]
        ports = [self.reserve(self.links[x.name], names[r], bind) for r, x in enumerate(ranks)]
        common = [*args, f"cluster.host={ranks[0].host}", f"cluster.bind={bind}", f"cluster.port={ports[0]}",
                  nodes_override(self.c, ranks, ports, defaults)]
        shared = _files(keys_dir, {"server.key": "server.key", "server.key_secret": "server.key_secret"})
        for f in sorted((keys_dir / "authorized").glob("*.key")):
            shared[f"authorized/{f.name}"] = f.read_text()
        model = models(node_entries(self.c, ranks, ports, defaults)) if models else [None] * n
        for r, x in enumerate(ranks):
            client = client_key_name(r)
            keys = {**shared, **_files(keys_dir, {"client.key": f"{client}.key",
                                                  "client.key_secret": f"{client}.key_secret"})}
            self.start(self.links[x.name], names[r], role, r, common, keys, program, model[r])
        logger.info(f"started {n} {role}s: " + ", ".join(f"{names[r]} on {x.name} ({x.host}:{ports[r]})"
                                                        for r, x in enumerate(ranks)))
        return ports


def role_name(role: str, rank: int, replica: int | None = None) -> str:
    """A role's name on its agent: ``stage 1``; one replica's of several: ``r1 stage 0`` (what Restarts looks for)."""
    return f"{role} {rank}" if replica is None else f"r{replica} {role} {rank}"


def run_keys(d: Path, clients: int) -> None:
    """A fresh CURVE set for one run: secrets 0600 in a 0700 directory (made private before any key is in it)."""
    private_dir(d / "authorized")
    private_dir(d)
    make_keys(d, clients=clients)
    for f in d.glob("*_secret"):
        f.chmod(0o600)


def connect(c: AutoSpec) -> tuple[list[NodeInfo], dict[str, AgentLink]]:
    """Discover the agents, show them, pair where needed, open a control link to each (all paired)."""
    state = private_dir(Path(c.state_dir).expanduser() / "coordinator")
    id_dir = identity(state / "identity")
    my_key = public_key(id_dir / "client.key")
    nodes = discover(c)
    show(nodes)
    store = AgentStore(state)
    pair_all(nodes, my_key, store, c, state)
    return nodes, {n.name: AgentLink(n, id_dir, state / "links") for n in nodes}


def run_auto(tc: TrainConfig, run_dir: Path) -> dict:
    c, algo = tc.cluster, tc.algo.name
    if algo not in ALGOS:
        raise ConfigError(f"cluster=auto runs {', '.join(ALGOS)}, not algo={algo} (which runs in one process): "
                          "drop cluster=auto")
    sigterm_as_interrupt()
    nodes, links = connect(c.auto)
    run = Run(algo, str(tc.run_id), c, links, run_dir)
    try:
        server_node, worker_nodes, ranks = None, None, None
        if algo in ("syncps", "edp"):
            server_node, worker_nodes = place(nodes, c.auto)
        elif algo in RINGS:
            ranks = place_ranks(nodes, c.auto.workers or len(nodes))
        else:
            ranks = place_ranks(nodes, tc.algo.stages)
        if c.auto.write:
            write_cluster(Path(c.auto.write).expanduser(), c, server_node, worker_nodes or ranks)
        if c.auto.discover_only:
            return {}
        common = child_overrides(drop=_OWN)
        if ranks is None:
            lead, name = _start_ps(run, algo, run_dir, server_node, worker_nodes, common)
        elif algo in RINGS:
            run.essential = {ranks[0].name}  # rank 0 writes the run's files; the ring re-forms without the others
            logger.info(f"placing {algo}: a ring of {len(ranks)}")
            run.start_ranks(ranks, "worker", [*common, f"cluster.workers={len(ranks)}"], run_dir / "keys")
            lead, name = links[ranks[0].name], "worker 0"
        else:  # mp: a pipeline needs every stage; the last writes the run's files
            run.essential = {x.name for x in ranks}
            logger.info(f"placing mp: {len(ranks)} stages, layers in proportion to each node's free memory")
            common = [o for o in common if not o.startswith("algo.stages=")]
            run.start_ranks(ranks, "stage", [*common, f"algo.stages={len(ranks)}"], run_dir / "keys",
                            defaults=[{"weight": x.memory_gb} for x in ranks])
            lead, name = links[ranks[-1].name], f"stage {len(ranks) - 1}"
        summary = run.supervise(lead, name)
        run.stop_everywhere("the run finished")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        where = f"STATE/runs/{tc.run_id}/{name.replace(' ', '_')}/"
        shards = (" (mp: each stage's checkpoint shard is in its node's STATE/runs/RUN_ID/stage_N/; merge them with "
                  "smolcluster.pipeline.merge once copied together)" if algo == "mp" else "")
        logger.info(f"the run's files (metrics.jsonl, checkpoint) are on {lead.name}, in its agent's {where}; "
                    f"here: summary.json{shards}")
        return summary
    except BaseException as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e}"
        run.stop_everywhere(f"the coordinator {why}")
        raise
    finally:
        for link in links.values():
            link.close()


def _start_ps(run: Run, algo: str, run_dir: Path, server_node: NodeInfo, worker_nodes: list[NodeInfo],
              common: list[str]) -> tuple[AgentLink, str]:
    """syncps / edp: the server on a port its agent holds for it, then the workers (which retry until it listens)."""
    c, links = run.c, run.links
    run.essential = {server_node.name}
    logger.info(f"placing {algo}: server on {server_node.name}, "
                + ", ".join(f"worker {r} on {n.name}" for r, n in enumerate(worker_nodes)))
    keys = run_dir / "keys"
    run_keys(keys, clients=len(worker_nodes))
    common = [*common, f"cluster.workers={len(worker_nodes)}", nodes_override(c, worker_nodes)]
    server_keys = _files(keys, {"server.key": "server.key", "server.key_secret": "server.key_secret"})
    for i, _ in enumerate(worker_nodes):
        name = f"{client_key_name(i)}.key"
        server_keys[f"authorized/{name}"] = (keys / "authorized" / name).read_text()
    host = server_node.host
    bind = host if is_loopback(host) else "0.0.0.0"  # keys make a LAN bind safe (security.check_bind)
    slink = links[server_node.name]
    port = run.reserve(slink, "server", bind)
    run.start(slink, "server", "server", None,
              [*common, f"cluster.host={host}", f"cluster.bind={bind}", f"cluster.port={port}"], server_keys)
    logger.info(f"server starting on {server_node.name} at {host}:{port}")
    for r, n in enumerate(worker_nodes):
        wkeys = _files(keys, {"server.key": "server.key", "client.key": f"{client_key_name(r)}.key",
                              "client.key_secret": f"{client_key_name(r)}.key_secret"})
        run.start(links[n.name], f"worker {r}", "worker", r, [*common, f"cluster.host={host}", f"cluster.port={port}"],
                  wkeys)
    return slink, "server"


# -- inference: the stages on the agents, the head here ---------------------------------------------------------

def _towards(host: str) -> str:
    """This machine's address as ``host`` reaches it (the route's source address; no packet is sent)."""
    if is_loopback(host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def agent_stages(pipeline):
    """``infer`` / ``chat`` with ``cluster=auto``: a context in which ``pipeline`` (the typed
    :class:`~smolcluster.inference.settings.Pipeline`, changed in place to ``role=head``) attaches to stages the
    agents run. It gives the replicas' :class:`~smolcluster.node.restarts.Restarts` (``replicas>1``), else None.
    Anything else: nothing to do."""
    from smolcluster.inference.settings import Role

    if pipeline.links.auto is None or pipeline.role is not Role.launch:
        return nullcontext()
    return _agent_stages(pipeline)


@contextmanager
def _agent_stages(p):
    c = p.links
    if not p.checkpoint and not p.model.get("pretrained"):
        raise ConfigError("cluster=auto stages need weights: give checkpoint=RUN_DIR or model.pretrained=DIR "
                          "(on this machine: each stage's share travels to its node)")
    if c.auto.weights not in WEIGHT_MODES:
        raise ConfigError(f"cluster.weights={c.auto.weights} is not one of {', '.join(WEIGHT_MODES)}")
    sigterm_as_interrupt()
    nodes, links = connect(c.auto)
    run_dir = p.telemetry.get("run_dir")  # logging.run_dir: the stages' /metrics are listed there too
    run = Run("inference", new_run_id(), c, links, Path(run_dir) if run_dir else None)
    keys = Path(tempfile.mkdtemp(prefix="smolcluster-run-keys-"))
    stop = threading.Event()
    restarts, keeper, progress = None, None, None  # replicas: a lost replica's stages started again (restarts.py)
    try:
        replicas = place_replicas(nodes, p.stages, p.replicas)
        # one replica: a lost node stops the run; several: it downs only its replica, the others keep the heartbeat
        run.essential = {x.name for x in replicas[0]} if p.replicas == 1 else set()
        progress = _start_replicas(run, p, replicas, keys)
        if p.replicas > 1:
            from smolcluster.node.restarts import Restarts

            restarts = Restarts(run, replicas)
        keeper = threading.Thread(target=_keep, args=(run, restarts, stop), daemon=True, name="agent-heartbeat")
        keeper.start()
        yield restarts
    except BaseException as e:
        _stop_stages(run, restarts, stop, keeper,
                     "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e}")
        raise
    else:
        _stop_stages(run, restarts, stop, keeper, "finished")
    finally:
        for link in links.values():
            link.close()
        shutil.rmtree(keys, ignore_errors=True)
        if progress is not None:
            progress.close()


def _start_replicas(run: Run, p, replicas: list[list[NodeInfo]], keys: Path):
    """Every replica's stages on their agents (weights sent first where they travel), and ``p`` turned into the
    head's settings: each replica's links (``p.replica_links``). Returns the weights' /metrics endpoint (for
    ``top``; the caller closes it), or None where no weights travel."""
    from smolcluster.inference.settings import Role

    mode = p.links.auto.weights
    args = [*child_overrides(drop=("stages=", "head=", "compile="), keep=_STAGE_KEYS),  # chat's defaults are
            f"stages={p.stages}", f"head={p.head.value}", f"compile={p.compile}"]  # not infer's: say them
    # stage i of every replica plans with the least memory among their nodes: the same split, one weight plan
    defaults = [{"memory_gb": min(ranks[i].memory_gb for ranks in replicas)} for i in range(p.stages)]
    plan, progress = None, None
    if mode != "shared":  # planned (the model hashed) before any port is held for a stage: that may take a while
        plan = _plan_weights(p, node_entries(p.links, replicas[0], None, defaults))
        progress = _weights_metrics(p)
    sets = []
    try:
        for r, ranks in enumerate(replicas):  # each replica its own pipeline: its ports, its mesh, its keys
            models = None if plan is None else (
                lambda _entries, ranks=ranks, r=r: _send_weights(run, ranks, *plan, mode, p.adapters, progress,
                                                                 f"r{r} " if p.replicas > 1 else ""))
            d = keys / f"r{r}"
            ports = run.start_ranks(ranks, "stage", args, d, program="infer", head=True, defaults=defaults,
                                    models=models, replica=r if p.replicas > 1 else None)
            sets.append(replace(p.links, host=ranks[0].host, port=ports[0], keys=str(_head_keys(d, len(ranks))),
                                nodes=[{"host": x.host, "port": ports[i]} for i, x in enumerate(ranks)]))
    except BaseException:
        if progress is not None:  # (the caller closes it only once it has it)
            progress.close()
        raise
    p.role = Role.head
    p.head_host = p.head_host or _towards(replicas[0][0].host)
    p.links, p.replica_links = sets[0], sets  # (from_config.replica_settings hands replica r its set)
    return progress


def _keep(run: Run, restarts, stop: threading.Event) -> None:
    """The heartbeat thread while the head serves: heartbeats and the stages' logs (the agents stop orphaned
    roles). One pipeline: a stage lost ends it. Replicas (``restarts``): the engine fails a lost stage's replica
    alone and routes around it, and :meth:`Restarts.beat` starts that stage again."""
    while not stop.is_set():
        if restarts is not None:
            try:
                restarts.beat()
            except Exception as e:  # (a bug: this thread beats every agent's link, so it goes on whatever failed)
                logger.opt(exception=e).error(f"the heartbeat thread's restart check failed: {e!r}")
        else:
            try:
                run.pump()
                run.check_roles()
            except Exception as e:  # a stage gone: the head hears it on its own links too, and says so
                logger.error(str(e))
                return
        stop.wait(0.1)


def _stop_stages(run: Run, restarts, stop: threading.Event, keeper: threading.Thread | None, why: str) -> None:
    stop.set()
    if restarts is not None:  # no restart may start a stage while they stop
        restarts.close()
    if keeper is not None:
        keeper.join()
    run.stop_everywhere(f"the head {why}" if why == "finished" else f"the coordinator {why}")


def place_replicas(nodes: list[NodeInfo], stages: int, replicas: int) -> list[list[NodeInfo]]:
    """Each replica's stage nodes. One replica: :func:`place_ranks` (cycling past the end). Several: a node each,
    stage i of every replica on the i-th group of ``replicas`` nodes by :func:`place_ranks`' order (stage 0, which
    holds the embedding, on the largest), refused in one line when there are too few nodes."""
    if replicas == 1:
        return [place_ranks(nodes, stages)]
    if len(nodes) < replicas * stages:
        fit = len(nodes) // stages
        use = f"{fit} replicas fit: use replicas={fit}" if fit > 1 else "use replicas=1 (one pipeline may share nodes)"
        raise ConfigError(f"replicas={replicas} x stages={stages} needs {replicas * stages} agents (a node per "
                          f"stage), found {len(nodes)}: {use}, or start more agents")
    order = place_ranks(nodes, replicas * stages)
    return [[order[i * replicas + r] for i in range(stages)] for r in range(replicas)]


def _head_keys(keys: Path, stages: int) -> Path:
    """The head's keys for one pipeline's run set in ``keys``: a client of every stage (the last client pair), and
    the server they connect back to (the run's server pair, every stage's client key authorized)."""
    head = keys / "head"
    private_dir(head / "authorized")
    for name in ("server.key", "server.key_secret"):
        shutil.copyfile(keys / name, head / name)
    for f in (keys / "authorized").glob("*.key"):
        shutil.copyfile(f, head / "authorized" / f.name)
    shutil.copyfile(keys / f"{client_key_name(stages)}.key", head / "client.key")
    shutil.copyfile(keys / f"{client_key_name(stages)}.key_secret", head / "client.key_secret")
    for f in head.rglob("*_secret"):
        f.chmod(0o600)
    return head


def _plan_weights(p, entries: list[dict]) -> tuple[dict, list]:
    """The model's description and each stage's share of it, hashed (weightsend.plan_stages)."""
    from smolcluster.inference.from_config import resolve_model
    from smolcluster.node import weightsend

    info, _, _ = resolve_model(p, need_tokenizer=False)
    return info, weightsend.plan_stages(p, info, entries, _hash_book(p.links.auto))


def _hash_book(c: AutoSpec):
    from smolcluster.node.weightsend import HashBook

    return HashBook(Path(c.state_dir).expanduser() / "coordinator" / "weight-hashes.json")


def _weights_metrics(p):
    """The head's weights gauges for ``smolcluster.top`` (telemetry/weights.py) with ``logging.prometheus.port``,
    else None."""
    from smolcluster.telemetry.logging import identity
    from smolcluster.telemetry.weights import open_weights_metrics

    return open_weights_metrics(p.telemetry, identity())


def _send_weights(run: Run, ranks: list[NodeInfo], info: dict, plans: list, mode: str,
                  adapters: dict, progress=None, prefix: str = "") -> list:
    """Each stage's share of the weights into its agent's cache (weightsend.py); per rank the ``model`` its
    start_role carries, or None where the agent reads the model files itself (``cluster.weights=auto``).
    ``progress``: :func:`_weights_metrics`'; ``prefix``: the replica's, before its stages' labels there."""
    from smolcluster.node import weightsend

    c = run.c
    files = weightsend.model_files(info, _hash_book(c.auto), adapters) if mode == "auto" else {}
    transfers, readable = weightsend.prepare(run.links, ranks, plans, files, c.heartbeat_s, prefix=prefix)
    weightsend.stream(transfers, c.heartbeat_s, c.liveness_s, on_message=run.handle, progress=progress)
    return [None if reads else plan.manifest() for plan, reads in zip(plans, readable, strict=True)]
