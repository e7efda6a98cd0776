"""The agent: one long-running process per machine that runs ``smolcluster.train`` roles for a paired coordinator.

It binds two ports: the control port (a CURVE ROUTER with the agent's own key pair; any key may
connect and is encrypted, but only a paired coordinator's key is obeyed) and the info port
(control + 1, plain: it answers ``node_hello`` with public facts, for ``cluster.peers``).
A role is ``python -m smolcluster.train role=R rank=N ...`` as a child process; its output is
streamed back line by line, its state reported, and the run's keys (sent by the coordinator over
the encrypted channel) written next to it with mode 0600. Children die with the agent
(SIGTERM/Ctrl-C stop and wait for them; on Linux even a SIGKILL'd agent takes them along).

Ports without a race: every address a run's roles must know before they start (the server's, each
ring rank's, each pipeline stage's) is a port this agent *reserves* (``reserve``) and holds for the
role: a socket bound with SO_REUSEADDR that never listens. No other program's ``bind`` gets that
port meanwhile, nor does the OS hand it out for an outgoing connection, while the role's own bind
(ZeroMQ sets SO_REUSEADDR too) succeeds beside it; the agent lets go when the role exits. (Outside
Linux the reservation is let go just before the role starts.) A port taken all the same, by
another program binding it with SO_REUSEADDR explicitly, fails the role with one line ("cannot
listen on ...: is another server using the port?") that the coordinator reports.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from smolcluster.cluster import node_name
from smolcluster.node.pairing import (
    Allowlist,
    confirm_path,
    fingerprint,
    identity,
    pairing_code,
    public_key,
)
from smolcluster.node.protocol import MAX_BYTES, NODE_PROTOCOL, PROGRAMS, ROLES, VERSION, facts
from smolcluster.supervisor import sigterm_as_interrupt, stop_process_groups
from smolcluster.transport import ServerEndpoint

# the run's key files an agent accepts, and nothing else (no paths of the coordinator's choosing)
KEY_FILES = re.compile(r"(server\.key(_secret)?|client\.key(_secret)?|authorized/client[0-9]*\.key)")
NOT_PAIRED = ("not paired: this node obeys only coordinators it has paired with (start the coordinator, "
              "then confirm its code here with python -m smolcluster.node pair CODE)")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the agent dies, however it dies (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def reserve_port(bind: str) -> socket.socket:
    """A free port on ``bind``, held (bound with SO_REUSEADDR, never listening) until the role binds it itself."""
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((bind, 0))
    return s


@dataclass
class Role:
    name: str
    role: str
    proc: subprocess.Popen
    dir: Path
    owner: bytes
    state: str = "running"
    lines: queue.Queue = field(default_factory=queue.Queue)
    held: list = field(default_factory=list)  # its reserved ports' sockets, let go when it exits
    announced: set = field(default_factory=set)  # endpoints/*.json files already told to the coordinator
    looked_at: float = 0.0

    def release(self) -> None:
        for s in self.held:
            s.close()
        self.held.clear()


class Agent:
    def __init__(self, state_dir: Path, *, port: int, bind: str = "0.0.0.0", name: str | None = None,
                 accept_code: str | None = None, owner_timeout_s: float = 15.0):
        self.state_dir = Path(state_dir).expanduser()
        self.name = name or node_name()
        self.id_dir = identity(self.state_dir / "identity")
        self.key = public_key(self.id_dir / "server.key")
        self.allow = Allowlist(self.state_dir)
        self.accept_code, self.owner_timeout_s = accept_code, owner_timeout_s
        self.control = ServerEndpoint(f"tcp://{bind}:{port}", max_bytes=MAX_BYTES, curve_dir=str(self.id_dir),
                                      authorize=lambda key: True)
        self.info = ServerEndpoint(f"tcp://{bind}:{self.control.port + 1}", max_bytes=1 << 16)
        self.port = self.control.port
        self.facts = {"name": self.name, "version": VERSION, "protocol": NODE_PROTOCOL, **facts(),
                      "fingerprint": fingerprint(self.key), "key": self.key, "port": self.port}
        self.roles: dict[str, Role] = {}
        self.pending: dict[str, str] = {}  # code -> coordinator key awaiting the operator
        self.owner_seen: dict[bytes, float] = {}
        # role name -> (the coordinator that asked, the ports held for the role): reserved, not started yet
        self.reserved: dict[str, tuple[bytes, list[socket.socket]]] = {}

    # -- control messages ---------------------------------------------------------------------------
    def handle(self, peer: bytes, msg) -> None:
        key = msg.sender_key
        paired = key in self.allow
        if paired:
            self.owner_seen[peer] = time.monotonic()
        if msg.kind == "node_hello":
            self.control.send(peer, "node_info", {**self.facts, "paired": paired})
        elif msg.kind == "pair_request":
            self.control.send(peer, "pair_state", self.pair(key, msg.fields["name"]))
        elif not paired:
            logger.warning(f"refused {msg.kind} from an unpaired coordinator (key {fingerprint(key or '')})")
            self.control.send(peer, "refuse", {"reason": NOT_PAIRED})
        elif msg.kind == "status":
            self.control.send(peer, "node_status", {"roles": {n: r.state for n, r in self.roles.items()}})
        elif msg.kind == "reserve":
            self.reserve(peer, msg.fields)
        elif msg.kind == "start_role":
            self.start(peer, msg.fields)
        elif msg.kind == "stop_roles":
            logger.info(f"stopping every role: {msg.fields['reason']}")
            self.stop_all()
        else:
            self.control.send(peer, "refuse", {"reason": f"an agent does not take {msg.kind!r} messages"})

    def pair(self, key: str, who: str) -> dict:
        code = pairing_code(self.key, key)
        if key in self.allow:
            return {"state": "paired", "code": code}
        confirmed = confirm_path(self.state_dir, code)
        if self.accept_code == code or confirmed.is_file():
            confirmed.unlink(missing_ok=True)
            self.allow.add(key)
            self.pending.pop(code, None)
            logger.success(f"paired with coordinator {who} (key {fingerprint(key)}, code {code})")
            return {"state": "paired", "code": code}
        if code not in self.pending:
            self.pending[code] = key
            logger.warning(f"pairing request from coordinator {who} (key {fingerprint(key)}): code {code}. "
                           f"If the coordinator shows the same code, confirm with: python -m smolcluster.node "
                           f"pair {code} --state-dir {self.state_dir}")
        return {"state": "pending", "code": code}

    # -- roles --------------------------------------------------------------------------------------
    def reserve(self, peer: bytes, f: dict) -> None:
        name, count = f["name"], f["count"]
        try:
            ipaddress.ip_address(f["bind"])
        except ValueError:
            self.control.send(peer, "refuse", {"reason": f"reserve: bind={f['bind']!r} is not an IP address"})
            return
        if not 1 <= count <= 16:
            self.control.send(peer, "refuse", {"reason": f"reserve: count={count} must be 1..16"})
            return
        for s in self.reserved.pop(name, (peer, []))[1]:  # a coordinator asking again: new ports replace the old
            s.close()
        try:
            socks = [reserve_port(f["bind"]) for _ in range(count)]
        except OSError as e:
            self.control.send(peer, "refuse", {"reason": f"cannot reserve a port on {f['bind']}: {e}"})
            return
        self.reserved[name] = (peer, socks)
        self.control.send(peer, "reserved", {"name": name, "ports": [s.getsockname()[1] for s in socks]})

    def start(self, peer: bytes, f: dict) -> None:
        name, role = f["name"], f["role"]
        bad = self._check_start(f)
        if bad:
            self.control.send(peer, "role_state", {"name": name, "state": "failed", "detail": bad})
            return
        rdir = self.state_dir / "runs" / f["run_id"] / name.replace(" ", "_")
        (rdir / "keys" / "authorized").mkdir(parents=True, exist_ok=True)
        for fname, text in f["keys"].items():
            path = rdir / "keys" / fname
            path.write_text(text)
            path.chmod(0o600)
        program = f.get("program") or "train"
        cmd = [sys.executable, "-u", "-m", f"smolcluster.{program}", *f["args"], f"role={role}",
               f"hydra.run.dir={rdir}", "hydra.output_subdir=null"]
        if program == "train":  # (inference's schema has no run id, node name or progress bar)
            cmd += [f"run_id={f['run_id']}", "train.progress=false", f"node={self.name}"]
        if f.get("rank") is not None:
            cmd.append(f"rank={f['rank']}")
        if f["keys"]:
            cmd.append(f"cluster.keys={rdir / 'keys'}")
        held = self.reserved.pop(name, (peer, []))[1]
        if sys.platform != "linux":  # BSD's SO_REUSEADDR would keep the role itself off the port
            for s in held:
                s.close()
            held = []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "SMOLCLUSTER_NODE": self.name},  # logs, top
                                start_new_session=True,
                                preexec_fn=_die_with_parent)
        r = self.roles[name] = Role(name, role, proc, rdir, peer, held=held)
        threading.Thread(target=_read_lines, args=(proc, r.lines), daemon=True).start()
        logger.info(f"started {name} ({role}) for run {f['run_id']}: pid {proc.pid}")
        self.control.send(peer, "role_state", {"name": name, "state": "running"})

    def _check_start(self, f: dict) -> str | None:
        if f["role"] not in ROLES:
            return f"role={f['role']!r} is not one of {', '.join(ROLES)}"
        if (f.get("program") or "train") not in PROGRAMS:
            return f"program={f.get('program')!r} is not one of {', '.join(PROGRAMS)}"
        if f["name"] in self.roles and self.roles[f["name"]].proc.poll() is None:
            return f"{f['name']} is already running here"
        if not all(isinstance(a, str) for a in f["args"]):
            return "args must be strings (key=value overrides)"
        # overrides only: nothing that makes Hydra instantiate code or move the run's files
        for a in f["args"]:
            if a.startswith(("hydra", "+hydra", "~hydra", "role=", "rank=")) or "_target_" in a:
                return f"override {a!r} is not allowed through an agent"
        if any(not KEY_FILES.fullmatch(k) or not isinstance(v, str) for k, v in f["keys"].items()):
            return "keys may only be server.key[_secret], client.key[_secret] and authorized/clientN.key"
        if not f["run_id"].replace("-", "").replace("_", "").isalnum():
            return f"run_id {f['run_id']!r} must be letters, digits, - and _"
        return None

    def poll_roles(self) -> None:
        for r in self.roles.values():
            lines = []
            while not r.lines.empty() and len(lines) < 200:
                lines.append(r.lines.get_nowait())
            if lines:
                self.control.send(r.owner, "role_log", {"name": r.name, "lines": lines})
            if r.state in ("running", "listening") and time.monotonic() - r.looked_at > 1.0:
                r.looked_at = time.monotonic()
                self.tell_endpoints(r)
            if r.state == "running" and r.role == "server" and (r.dir / "server.json").is_file():
                try:
                    port = int(json.loads((r.dir / "server.json").read_text())["port"])
                except (ValueError, KeyError):
                    continue  # caught mid-write
                r.state = "listening"
                self.control.send(r.owner, "role_state", {"name": r.name, "state": "listening", "port": port})
            code = r.proc.poll()
            if code is not None and r.state in ("running", "listening") and r.lines.empty():
                r.state = f"exited {code}"
                r.release()
                out = {"name": r.name, "state": "exited", "code": code}
                if (r.dir / "summary.json").is_file():
                    out["summary"] = json.loads((r.dir / "summary.json").read_text())
                logger.info(f"{r.name} exited with code {code}")
                self.control.send(r.owner, "role_state", out)

    def tell_endpoints(self, r: Role) -> None:
        """The /metrics URLs the role announced in its run dir (logging.prometheus.port), so the coordinator's
        run dir lists them for ``smolcluster.top`` as a run on one machine does."""
        for path in sorted((r.dir / "endpoints").glob("*.json")):
            if path.name in r.announced:
                continue
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written
            r.announced.add(path.name)
            self.control.send(r.owner, "role_endpoint", {"name": r.name, "file": path.name, "endpoint": info})

    def orphaned(self) -> bool:
        """Roles run, but their coordinator has been silent past owner_timeout_s: it is gone."""
        now = time.monotonic()
        live = {r.owner for r in self.roles.values() if r.proc.poll() is None}
        live |= {owner for owner, _ in self.reserved.values()}  # ports held for roles never started
        return any(now - self.owner_seen.get(o, now) > self.owner_timeout_s for o in live)

    def stop_all(self, grace_s: float = 10.0) -> None:
        live = [r for r in self.roles.values() if r.proc.poll() is None]
        stop_process_groups([r.proc for r in live], grace_s)
        for s in (s for _, socks in self.reserved.values() for s in socks):
            s.close()
        self.reserved.clear()
        for r in live:
            r.release()
            r.state = f"stopped ({r.proc.returncode})"
            self.control.send(r.owner, "role_state", {"name": r.name, "state": "stopped", "code": r.proc.returncode})

    # -- main loop ----------------------------------------------------------------------------------
    def serve(self, ready=None) -> None:
        logger.info(f"smolcluster agent {self.name}: control port {self.port} (CURVE), info port {self.port + 1}, "
                    f"key {self.facts['fingerprint']}, {self.facts['device']}, {self.facts['cores']} cores, "
                    f"{self.facts['memory_gb']:.1f} GB free; state in {self.state_dir}")
        if ready:
            ready()
        while True:
            got = self.control.recv(50)
            if got:
                self.handle(*got)
            asked = self.info.recv(0)
            if asked and asked[1].kind == "node_hello":
                self.info.send(asked[0], "node_info", self.facts)
            self.poll_roles()
            if self.orphaned():
                logger.error(f"the coordinator has been silent for {self.owner_timeout_s:g}s: stopping its roles")
                self.stop_all()
            for code in list(self.pending):  # `smolcluster.node pair CODE` may have confirmed one meanwhile
                if confirm_path(self.state_dir, code).is_file():
                    self.pair(self.pending[code], "(confirmed by the operator)")

    def close(self, reason: str = "the agent is shutting down") -> None:
        owners = {r.owner for r in self.roles.values() if r.proc.poll() is None}
        self.stop_all()
        for peer in owners:  # a coordinator still running a run here hears it at once, not after liveness_s
            self.control.send(peer, "node_bye", {"reason": reason})
        self.control.close(linger_s=1.0)
        self.info.close()


def _read_lines(proc: subprocess.Popen, out: queue.Queue) -> None:
    for line in iter(proc.stdout.readline, ""):
        out.put(line.rstrip("\n")[:2000])
    proc.stdout.close()


def run_agent(args) -> int:
    from smolcluster.node.discovery import Advertisement, local_addresses

    agent = Agent(args.state_dir, port=args.port, bind=args.bind, name=args.name, accept_code=args.accept_code,
                  owner_timeout_s=args.owner_timeout)
    sigterm_as_interrupt()
    ad = None
    try:
        if args.mdns:
            addresses = [args.advertise] if args.advertise else local_addresses()
            try:
                ad = Advertisement(agent.name, agent.port, agent.facts, addresses)
                logger.info(f"advertised on mDNS as {ad.info.name} at {', '.join(addresses)}")
            except Exception as e:  # no multicast here: static cluster.peers still reach this agent
                logger.warning(f"mDNS advertisement failed ({e!r}): coordinators need cluster.peers=[HOST:{agent.port}]")
        ready = (lambda: (Path(args.ready_file).write_text(str(agent.port)))) if args.ready_file else None
        agent.serve(ready)
    except KeyboardInterrupt:
        logger.info("stopping (signal)")
    finally:
        if ad:
            ad.close()
        agent.close()
    return 0
