"""``python -m smolcluster.train cluster=auto ...``: find the paired agents, place the roles, run through them.

    1. discover   mDNS for cluster.discover_s (early once cluster.expect answered) + cluster.peers
    2. check      same version and node protocol everywhere; pair (code on both screens) where not yet
    3. place      the server on cluster.server (or the node with the most free memory), one worker on each
                  other node (accelerators first; every node when there is only one); cluster.workers=N cycles
    4. keys       a fresh CURVE set for this run: the server's pair to the server's node only, one client
                  pair per worker, all sent over the encrypted control channel (never copied by hand)
    5. run        start the server (on a port its agent picks), then the workers; relay their logs
                  ``[node:role]``; a heartbeat (``status``) to every agent each cluster.heartbeat_s
    6. stop       on success, Ctrl-C, SIGTERM or failure: ``stop_roles`` to every agent, and wait

A node silent for cluster.liveness_s has vanished: one error line naming it; the run goes on as
the algorithm defines when it only held workers (the server drops them), and stops everywhere when
it held the server. A role that fails to start or exits non-zero stops the run everywhere.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from smolcluster.errors import ConfigError, PeerError
from smolcluster.launch_local import child_overrides
from smolcluster.node import discovery
from smolcluster.node.discovery import NodeInfo
from smolcluster.node.pairing import identity, pairing_code, public_key, write_public_key
from smolcluster.node.protocol import MAX_BYTES, NODE_PROTOCOL, VERSION
from smolcluster.security import is_loopback
from smolcluster.supervisor import sigterm_as_interrupt
from smolcluster.transport import ClientEndpoint, make_keys

ALGOS = ("syncps", "edp")  # server + workers; allreduce and mp through agents are not wired yet
# what the coordinator decides per run: never forwarded from the user's command line to the roles
_OWN = ("cluster.host=", "cluster.bind=", "cluster.workers=", "cluster.keys=", "cluster.nodes=", "cluster.peers=",
        "cluster.write=", "cluster.server=", "cluster.discover_only=", "cluster.expect=", "node=", "cluster.insecure=",
        "hydra.", "hydra/")  # Hydra's own settings stay with the coordinator (agents refuse them)
FINAL = ("exited", "stopped", "failed")


class AgentLink:
    """The encrypted control channel to one agent, with what the coordinator knows of it."""

    def __init__(self, node: NodeInfo, id_dir: Path, links_dir: Path):
        self.node, self.name = node, node.name
        d = links_dir / node.fingerprint
        write_public_key(d / "server.key", node.key)  # the agent's key: CURVE checks we reach *that* agent
        shutil.copyfile(id_dir / "client.key_secret", d / "client.key_secret")
        (d / "client.key_secret").chmod(0o600)
        self.ep = ClientEndpoint(f"tcp://{node.host}:{node.port}", max_bytes=MAX_BYTES, curve_dir=str(d))
        self.last_seen = time.monotonic()
        self.alive = True
        self.roles: dict[str, dict] = {}  # role name -> its last role_state fields

    def request(self, kind: str, fields: dict, want: str, timeout_s: float):
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
        raise PeerError(f"node {self.node.where()} did not answer {kind} within {timeout_s:g}s "
                        "(agent stopped, or a firewall between here and there?)")

    def close(self) -> None:
        self.ep.close()


def discover(c: DictConfig) -> list[NodeInfo]:
    found: dict[str, NodeInfo] = {}
    for peer in c.get("peers") or []:
        n = discovery.ask(str(peer))
        found[n.fingerprint] = n
    if c.get("mdns", True):
        for n in discovery.browse(float(c.discover_s), expect=c.get("expect")):
            found.setdefault(n.fingerprint, n)
    nodes = sorted(found.values(), key=lambda n: n.name)
    if not nodes:
        raise ConfigError(f"cluster=auto found no agents (mDNS for {c.discover_s:g}s, {len(c.get('peers') or [])} "
                          "static peers): start `python -m smolcluster.node` on each machine, or list them in "
                          "cluster.peers=[HOST:5660,...] where multicast does not pass")
    if c.get("expect") and len(nodes) < c.expect:
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


def pair(link: AgentLink, my_key: str, c: DictConfig) -> None:
    info = link.request("node_hello", {"protocol": NODE_PROTOCOL, "version": VERSION}, "node_info", 10).fields
    if info["key"] != link.node.key or info["version"] != VERSION or info["protocol"] != NODE_PROTOCOL:
        raise ConfigError(f"node {link.node.where()} answers with another key or version than it advertised")
    if info.get("paired"):
        return
    where = link.node.where()
    if float(c.pair_timeout_s) <= 0:
        raise ConfigError(f"node {where} has not paired with this coordinator: set cluster.pair_timeout_s=120 "
                          "and confirm the code it shows there with python -m smolcluster.node pair CODE")
    code = pairing_code(link.node.key, my_key)
    logger.warning(f"pairing with node {where} (key {link.node.fingerprint}): code {code}. If that machine shows "
                   f"the same code, confirm there: python -m smolcluster.node pair {code}")
    deadline = time.monotonic() + float(c.pair_timeout_s)
    while time.monotonic() < deadline:
        state = link.request("pair_request", {"name": "coordinator"}, "pair_state", 10).fields
        if state["code"] != code:
            raise ConfigError(f"node {where} computes pairing code {state['code']}, this coordinator {code}: someone "
                              "between the two changed a key; not pairing")
        if state["state"] == "paired":
            logger.success(f"paired with node {where}")
            return
        time.sleep(0.3)
    raise ConfigError(f"node {where}: pairing code {code} was not confirmed within cluster.pair_timeout_s="
                      f"{c.pair_timeout_s}s: run python -m smolcluster.node pair {code} on it")


def place(nodes: list[NodeInfo], c: DictConfig) -> tuple[NodeInfo, list[NodeInfo]]:
    """(server node, worker node per rank)."""
    if c.get("server"):
        match = [n for n in nodes if n.name == c.server]
        if not match:
            raise ConfigError(f"cluster.server={c.server} is not among the agents found: "
                              f"{', '.join(n.name for n in nodes)}")
        server = match[0]
    else:
        server = max(nodes, key=lambda n: (n.memory_gb, n.name))
    hosts = sorted((n for n in nodes if n is not server), key=lambda n: (n.device == "cpu", -n.memory_gb, n.name))
    hosts = hosts or [server]
    count = int(c.workers) if c.get("workers") else len(hosts)
    return server, [hosts[r % len(hosts)] for r in range(count)]


def write_cluster(path: Path, cfg: DictConfig, server: NodeInfo, workers: list[NodeInfo]) -> None:
    """The discovered cluster as a normal cluster file (conf/cluster/lan-example.yaml's shape)."""
    c = cfg.cluster
    out = {"name": path.stem, "host": server.host, "port": 5555, "bind": "0.0.0.0", "workers": len(workers),
           "keys": None, "insecure": False, "heartbeat_s": c.heartbeat_s, "liveness_s": c.liveness_s,
           "connect_timeout_s": c.connect_timeout_s, "max_message_mb": c.max_message_mb,
           "server": {"name": server.name, "host": server.host},
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


def nodes_override(c: DictConfig, workers: list[NodeInfo]) -> str:
    """``cluster.nodes=[...]`` for the roles: the user's per-rank settings (batch_size, delay_s, ...) with each
    rank's node name and host from discovery."""
    user = OmegaConf.to_container(c.nodes, resolve=True) if c.get("nodes") else []
    entries = []
    for r, n in enumerate(workers):
        mine = user[r] if r < len(user) and isinstance(user[r], dict) else {}
        entry = {k: v for k, v in mine.items() if isinstance(v, (str, int, float, bool))}
        entry.setdefault("name", n.name)
        entry["host"] = n.host
        entries.append("{" + ",".join(f"{k}:{_value(v)}" for k, v in entry.items()) + "}")
    return f"cluster.nodes=[{','.join(entries)}]"


def _files(d: Path, names: dict[str, str]) -> dict[str, str]:
    return {dest: (d / src).read_text() for dest, src in names.items()}


class Run:
    def __init__(self, cfg: DictConfig, links: dict[str, AgentLink], run_dir: Path):
        self.cfg, self.c, self.links, self.run_dir = cfg, cfg.cluster, links, run_dir
        self.last_beat = 0.0
        self.server_node: str | None = None

    def start(self, link: AgentLink, name: str, role: str, rank: int | None, args: list[str], keys: dict) -> None:
        fields = {"name": name, "role": role, "run_id": str(self.cfg.run_id), "args": args, "keys": keys}
        if rank is not None:
            fields["rank"] = rank
        link.roles[name] = {"name": name, "state": "starting"}
        link.ep.send("start_role", fields)

    def pump(self) -> None:
        """Take every waiting message from every agent; beat; notice vanished agents."""
        now = time.monotonic()
        beat = now - self.last_beat >= float(self.c.heartbeat_s)
        for link in self.links.values():
            if not link.alive:
                continue
            while (msg := link.ep.recv(0)) is not None:
                link.last_seen = time.monotonic()
                self.handle(link, msg)
            if beat:
                link.ep.send("status", {})
            if link.alive and time.monotonic() - link.last_seen > float(self.c.liveness_s):
                self.vanished(link, f"no answer for {self.c.liveness_s:g}s")
        if beat:
            self.last_beat = now

    def handle(self, link: AgentLink, msg) -> None:
        f = msg.fields
        if msg.kind == "role_log":
            for line in f["lines"]:
                sys.stderr.write(f"[{link.name}:{f['name']}] {line}\n")
        elif msg.kind == "role_state":
            link.roles[f["name"]] = f
            if f["state"] == "failed":
                raise PeerError(f"node {link.node.where()} could not start {f['name']}: {f.get('detail')}")
        elif msg.kind == "node_bye":
            self.vanished(link, f["reason"])
        elif msg.kind == "refuse":
            raise ConfigError(f"node {link.node.where()} refused: {f['reason']}")

    def vanished(self, link: AgentLink, why: str) -> None:
        link.alive = False
        held = ", ".join(link.roles) or "no roles"
        if link.name == self.server_node:
            raise PeerError(f"node {link.node.where()} vanished ({why}); it ran the server ({held}): "
                            "stopped the run everywhere")
        logger.error(f"node {link.node.where()} vanished ({why}); it ran {held}: {self.cfg.algo.name} goes on "
                     "without it as the algorithm defines")

    def wait_for(self, link: AgentLink, name: str, states: tuple[str, ...], timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump()
            st = link.roles.get(name, {})
            if st.get("state") in states:
                return st
            if st.get("state") in FINAL:
                raise PeerError(f"node {link.node.where()}: {name} exited with code {st.get('code')} before "
                                f"{what} (its log is above)")
            if not link.alive:
                raise PeerError(f"node {link.node.where()} vanished before {name} {what}")
            time.sleep(0.05)
        raise PeerError(f"node {link.node.where()}: {name} did not {what} within {timeout_s:g}s")

    def supervise(self, server: AgentLink) -> dict:
        """Until the server exits: a worker failing or the server's node vanishing raises."""
        while True:
            self.pump()
            st = server.roles.get("server", {})
            if st.get("state") in FINAL:
                if st.get("code") != 0 or "summary" not in st:
                    raise PeerError(f"node {server.node.where()}: the server exited with code {st.get('code')} "
                                    "(its log is above); stopped the run everywhere")
                self._let_workers_finish()
                return st["summary"]
            for link in self.links.values():
                for name, rs in link.roles.items():
                    if link.alive and rs.get("state") in ("exited", "stopped") and rs.get("code") not in (0, None):
                        raise PeerError(f"node {link.node.where()}: {name} exited with code {rs.get('code')} "
                                        "(its log is above); stopped the run everywhere")
            time.sleep(0.05)

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


def run_auto(cfg: DictConfig, run_dir: Path) -> dict:
    c = cfg.cluster
    if cfg.algo.name not in ALGOS:
        raise ConfigError(f"cluster=auto runs {', '.join(ALGOS)} so far, not algo={cfg.algo.name}: use a cluster file "
                          "(python -m launchers.ssh, or write one with cluster.write=FILE)")
    sigterm_as_interrupt()
    state = Path(str(c.state_dir)).expanduser() / "coordinator"
    id_dir = identity(state / "identity")
    my_key = public_key(id_dir / "client.key")
    nodes = discover(c)
    show(nodes)
    server_node, worker_nodes = place(nodes, c)
    if c.get("write"):
        write_cluster(Path(str(c.write)).expanduser(), cfg, server_node, worker_nodes)
    links = {n.name: AgentLink(n, id_dir, state / "links") for n in nodes}
    run = Run(cfg, links, run_dir)
    run.server_node = server_node.name
    try:
        for link in links.values():
            pair(link, my_key, c)
        if c.get("discover_only"):
            return {}
        logger.info(f"placing {cfg.algo.name}: server on {server_node.name}, "
                    + ", ".join(f"worker {r} on {n.name}" for r, n in enumerate(worker_nodes)))
        keys = run_dir / "keys"
        make_keys(keys, clients=len(worker_nodes))
        common = [o for o in child_overrides(cfg) if not o.startswith(_OWN)]
        common += [f"cluster.workers={len(worker_nodes)}", nodes_override(c, worker_nodes)]
        server_keys = _files(keys, {"server.key": "server.key", "server.key_secret": "server.key_secret"})
        for i, _ in enumerate(worker_nodes):
            client = "client" if i == 0 else f"client{i}"
            server_keys[f"authorized/{client}.key"] = (keys / "authorized" / f"{client}.key").read_text()
        host = server_node.host
        bind = host if is_loopback(host) else "0.0.0.0"  # keys make a LAN bind safe (security.check_bind)
        slink = links[server_node.name]
        run.start(slink, "server", "server", None,
                  [*common, f"cluster.host={host}", f"cluster.bind={bind}", "cluster.port=0"], server_keys)
        port = run.wait_for(slink, "server", ("running", "listening"), float(c.connect_timeout_s), "start")["port"]
        logger.info(f"server starting on {server_node.name} at {host}:{port}")
        for r, n in enumerate(worker_nodes):
            client = "client" if r == 0 else f"client{r}"
            wkeys = _files(keys, {"server.key": "server.key", "client.key": f"{client}.key",
                                  "client.key_secret": f"{client}.key_secret"})
            run.start(links[n.name], f"worker {r}", "worker", r,
                      [*common, f"cluster.host={host}", f"cluster.port={port}"], wkeys)
        summary = run.supervise(slink)
        run.stop_everywhere("the run finished")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(f"the server's run files (metrics.jsonl, checkpoint) are on {server_node.name}, in its agent's "
                    f"STATE/runs/{cfg.run_id}/server/; here: summary.json")
        return summary
    except BaseException as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e}"
        run.stop_everywhere(f"the coordinator {why}")
        raise
    finally:
        for link in links.values():
            link.close()
