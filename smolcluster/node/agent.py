"""The agent: one long-running process per machine that runs ``smolcluster.train`` roles for a paired coordinator.

It binds two ports. The control port is a CURVE ROUTER with the agent's own key pair that lets in
only the keys of coordinators it has paired with (ZAP asks the allowlist for each connecting key;
a stranger's handshake fails before it can send a frame). The info port (control + 1) is a tiny
bounded TCP responder (infoport.py): public facts for ``cluster.peers``, and the pairing exchange
(commit, nonce, reveal; the operator confirms the code with ``python -m smolcluster.node pair CODE``).
A role is ``python -m smolcluster.train role=R rank=N ...`` (or ``smolcluster.infer``) as a child
process with overrides checked by overrides.py; its output is streamed back line by line, its
state reported, and the run's keys (sent by the coordinator over the encrypted channel, checked
to be z85 CURVE keys) written next to it, new files, 0600 in 0700 directories. Children die with
the agent (SIGTERM/Ctrl-C stop and wait for them; on Linux even a SIGKILL'd agent takes them along).
One bad request is answered with ``refuse`` and logged; it never ends the agent.

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
import shutil
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
from smolcluster.errors import ConfigError
from smolcluster.launch.overrides import check_override
from smolcluster.launch.supervisor import (
    Children,
    signal_group,
    sigterm_as_interrupt,
    stop_process_groups,
)
from smolcluster.node.infoport import InfoPort
from smolcluster.node.pairing import (
    SAFE_NAME,
    Z85_KEY,
    Allowlist,
    commitment,
    fingerprint,
    identity,
    nonce,
    pairing_code,
    parse_certificate,
    printable,
    private_dir,
    public_key,
    write_private,
)
from smolcluster.node.protocol import (
    CHUNK,
    MAX_BYTES,
    NODE_PROTOCOL,
    PROGRAMS,
    ROLES,
    VERSION,
    facts,
)
from smolcluster.node.weightcache import CacheError, WeightCache, adapter_dirs, model_dir
from smolcluster.transport import ServerEndpoint

# the run's key files an agent accepts, and nothing else (no paths of the coordinator's choosing)
KEY_FILES = re.compile(r"(server\.key(_secret)?|client\.key(_secret)?|authorized/client[0-9]{0,4}\.key)")
ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,31}")  # "server", "worker 3", "stage 1"
NOT_PAIRED = ("not paired: this node obeys only coordinators it has paired with (run the coordinator with "
              "cluster.pair_timeout_s=120 and confirm the code it shows on both machines)")
PAIR_TTL_S = 300.0  # a code not confirmed within this is void
MAX_PENDING = 16  # pairings awaiting an operator at once
PAIR_EVERY_S = 1.0  # one pairing exchange per source address this often
STOP_GRACE_S = 10.0  # a role stopped alone (stop_one) is SIGKILLed if it has not exited this long after SIGTERM


def refusal(reason: str) -> dict:
    return {"kind": "refuse", "reason": reason}


@dataclass
class Pending:
    key: str
    name: str
    expires: float


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the agent dies, however it dies (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def reserve_port(bind: str, port: int = 0) -> socket.socket:
    """A free port on ``bind`` (or that ``port``, if free: the coordinator names one to start a role again where it
    listened before), held (bound with SO_REUSEADDR, never listening) until the role binds it itself."""
    s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind, port))
    except OSError:
        s.close()
        raise
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
    stop_by: float = 0.0  # stopping (stop_one): SIGKILLed if it still runs at this time

    def release(self) -> None:
        for s in self.held:
            s.close()
        self.held.clear()


class Agent:
    def __init__(self, state_dir: Path, *, port: int, bind: str = "0.0.0.0", name: str | None = None,
                 owner_timeout_s: float = 15.0, weights_cache_bytes: int | None = None):
        self.state_dir = private_dir(Path(state_dir))
        self.runs = private_dir(self.state_dir / "runs")
        self.cache = WeightCache(self.state_dir / "weights", weights_cache_bytes)  # weights a head sent (weightcache.py)
        self.cache_lock = threading.Lock()  # the cache: a weights_ask's thread re-hashes it while chunks may arrive
        self.hold_weights_until: Path | None = None  # a test knob (--hold-weights-until): see weights_chunk
        self.chunks_taken = 0
        self.outbox: queue.Queue = queue.Queue()  # (peer, kind, fields) from threads: the loop owns the socket
        self.name = name or node_name()
        self.id_dir = identity(self.state_dir / "identity")
        self.key = public_key(self.id_dir / "server.key")
        self.allow = Allowlist(self.state_dir)
        self.owner_timeout_s = owner_timeout_s
        self.facts = {"name": self.name, "version": VERSION, "protocol": NODE_PROTOCOL, **facts(),
                      "fingerprint": fingerprint(self.key), "key": self.key, "port": port}
        self.roles: dict[str, Role] = {}
        self.children = Children()  # the roles' processes (the local backend); their lines go to the coordinator
        self.lock = threading.Lock()  # the pairing state: the info port's threads and the main loop share it
        self.pending: dict[str, Pending] = {}  # code -> the coordinator awaiting the operator's confirmation
        self.last_ask: dict[str, float] = {}  # source address -> its last pairing exchange (rate limit)
        self.looked_for_confirms = 0.0
        self.owner_seen: dict[bytes, float] = {}
        # role name -> (the coordinator that asked, the ports held for the role): reserved, not started yet
        self.reserved: dict[str, tuple[bytes, list[socket.socket]]] = {}
        self.control, self.info = self._listen(bind, port)
        self.port = self.facts["port"] = self.control.port

    def _listen(self, bind: str, port: int, tries: int = 20) -> tuple[ServerEndpoint, InfoPort]:
        """The control port and the info port just above it. With ``port`` 0 the OS picks the control port, and
        the one above may be taken (another process's connection): then another pair is tried."""
        for _ in range(tries if port == 0 else 1):
            control = ServerEndpoint(f"tcp://{bind}:{port}", max_bytes=MAX_BYTES, curve_dir=str(self.id_dir),
                                     authorize=self.allow.__contains__)  # ZAP asks for each connecting key
            try:
                return control, InfoPort(bind, control.port + 1, self.answer_info)
            except OSError as e:
                control.close()
                if port:
                    raise ConfigError(f"port {port + 1} (the info port, --port + 1) cannot be bound: {e.strerror}; "
                                      "choose a --port whose next port is free") from None
        raise ConfigError(f"no free pair of ports (P, P + 1) on {bind} after {tries} tries: give --port")

    # -- control messages (CURVE; only paired coordinators' keys get through) ---------------------------
    def handle(self, peer: bytes, msg) -> None:
        """One request; whatever is wrong with it is logged and answered, never fatal to the agent."""
        try:
            self._handle(peer, msg)
        except Exception as e:
            logger.error(f"refused a bad {printable(msg.kind)} request: {printable(repr(e), 300)}")
            self.control.send(peer, "refuse", {"reason": f"bad {printable(msg.kind)} request: "
                                                         f"{printable(str(e), 300)}"})

    def _handle(self, peer: bytes, msg) -> None:
        key = msg.sender_key
        paired = key in self.allow
        if not paired:  # (ZAP keeps unpaired keys out at the handshake; this holds for a key forgotten since)
            logger.warning(f"refused {printable(msg.kind)} from an unpaired coordinator (key "
                           f"{fingerprint(key or '')})")
            self.control.send(peer, "refuse", {"reason": NOT_PAIRED})
            return
        self.owner_seen[peer] = time.monotonic()
        if msg.kind == "node_hello":
            self.control.send(peer, "node_info", {**self.facts, "paired": True})
        elif msg.kind == "status":
            self.control.send(peer, "node_status", {"roles": {n: r.state for n, r in self.roles.items()}})
        elif msg.kind == "reserve":
            self.reserve(peer, msg.fields)
        elif msg.kind == "start_role":
            self.start(peer, msg.fields)
        elif msg.kind == "weights_ask":
            self.weights_ask(peer, msg.fields)
        elif msg.kind == "weights_chunk":
            self.weights_chunk(peer, msg)
        elif msg.kind == "stop_roles" and "name" in msg.fields:
            self.stop_one(msg.fields["name"], msg.fields["reason"])
        elif msg.kind == "stop_roles":
            logger.info(f"stopping every role: {printable(msg.fields['reason'], 300)}")
            self.stop_all()
        else:
            self.control.send(peer, "refuse", {"reason": f"an agent does not take {printable(msg.kind)!r} messages"})

    # -- the info port (plain, bounded: see infoport.py): public facts and the pairing exchange ----------
    def answer_info(self, msg: dict, session: dict) -> dict | None:
        kind = msg.get("kind")
        if kind == "node_hello":
            return {"kind": "node_info", **self.facts}
        if kind == "pair_status" and isinstance(msg.get("key"), str):
            with self.lock:
                waiting = any(p.key == msg["key"] for p in self.pending.values())
            state = "paired" if msg["key"] in self.allow else "pending" if waiting else "unknown"
            return {"kind": "pair_state", "state": state}
        if kind == "pair_commit":
            return self.pair_commit(msg, session)
        if kind == "pair_reveal" and "commit" in session and isinstance(msg.get("nonce"), str):
            return self.pair_reveal(msg["nonce"], session)
        return None

    def pair_commit(self, msg: dict, session: dict) -> dict:
        key, commit, who = msg.get("key"), msg.get("commit"), printable(msg.get("name", "?"))
        if not (isinstance(key, str) and Z85_KEY.fullmatch(key) and isinstance(commit, str)
                and re.fullmatch(r"[0-9a-f]{64}", commit)):
            return refusal("pair_commit needs a z85 key and a sha256 commitment")
        if key in self.allow:
            return {"kind": "pair_state", "state": "paired"}
        now, source = time.monotonic(), session["source"]
        with self.lock:
            if now - self.last_ask.get(source, -PAIR_EVERY_S) < PAIR_EVERY_S:
                return refusal(f"one pairing request per {PAIR_EVERY_S:g}s from {source}: try again shortly")
            if len(self.last_ask) > 1024:  # forget sources that are quiet anyway
                self.last_ask = {s: t for s, t in self.last_ask.items() if now - t < PAIR_EVERY_S}
            self.last_ask[source] = now
            self.expire(now)
            if len(self.pending) >= MAX_PENDING and all(p.key != key for p in self.pending.values()):
                return refusal(f"{MAX_PENDING} pairings already await an operator here: try again later")
        session.update(key=key, commit=commit, name=who, nonce=nonce())
        return {"kind": "pair_nonce", "key": self.key, "nonce": session["nonce"]}

    def pair_reveal(self, coordinator_nonce: str, session: dict) -> dict:
        key = session["key"]
        if commitment(key, coordinator_nonce) != session.pop("commit"):
            logger.warning(f"pairing from {session['source']} refused: its nonce does not match its commitment")
            return refusal("the revealed nonce does not match the commitment: not pairing")
        code = pairing_code(self.key, key, session["nonce"], coordinator_nonce)
        with self.lock:
            for c in [c for c, p in self.pending.items() if p.key == key]:  # a new exchange replaces its old code
                del self.pending[c]
            self.pending[code] = Pending(key, session["name"], time.monotonic() + PAIR_TTL_S)
        logger.warning(f"pairing request from coordinator {session['name']} at {session['source']} (key "
                       f"{fingerprint(key)}): code {code}. If the coordinator shows the same code, confirm within "
                       f"{PAIR_TTL_S / 60:g} min: python -m smolcluster.node pair {code} --state-dir {self.state_dir}")
        return {"kind": "pair_state", "state": "pending"}

    def expire(self, now: float) -> None:
        for code in [c for c, p in self.pending.items() if p.expires < now]:
            logger.info(f"pairing code {code} expired unconfirmed")
            del self.pending[code]

    def take_confirmations(self) -> None:
        """Codes the operator confirmed (``smolcluster.node pair CODE``): each pairs exactly the key it was shown
        with, once; a confirmation of no waiting code is dropped (codes are one-shot)."""
        now = time.monotonic()
        if now - self.looked_for_confirms < 0.2:
            return
        self.looked_for_confirms = now
        d = self.state_dir / "confirm"
        with self.lock:
            self.expire(now)
            for f in (list(d.iterdir())[:64] if d.is_dir() else []):
                if f.is_dir() and not f.is_symlink():
                    continue  # not something `pair` writes
                p = self.pending.pop(f.name, None)
                f.unlink(missing_ok=True)
                if p is None:
                    logger.warning(f"no pairing waits for code {printable(f.name, 16)} (expired, or never shown): "
                                   "ignored")
                    continue
                self.allow.add(p.key)
                logger.success(f"paired with coordinator {p.name} (key {fingerprint(p.key)})")

    # -- weights that travel (weightsend.py on the head) ---------------------------------------------
    def weights_ask(self, peer: bytes, f: dict) -> None:
        """What of these cache entries is here (re-hashed: a corrupt one is dropped), the disk's room, and whether
        the head's own model files are readable here as they are there (then nothing needs sending)."""

        def answer() -> None:  # re-hashing gigabytes takes a while: off the loop, which keeps answering status
            try:
                with self.cache_lock:
                    reply = ("weights_status", self.cache.answer(f["entries"], f["files"]))
            except Exception as e:  # (a file vanished mid-hash, a bad size): answered, never a silent wait
                reply = ("refuse", {"reason": f"bad weights_ask request: {printable(str(e), 300)}"})
            self.outbox.put((peer, *reply))

        threading.Thread(target=answer, daemon=True, name="weights-ask").start()

    def weights_chunk(self, peer: bytes, msg) -> None:
        f, data = msg.fields, msg.tensors.get("data")
        if data is None or data.dtype.itemsize != 1 or data.nbytes > CHUNK:
            raise CacheError(f"a weights chunk carries one uint8 tensor 'data' of at most {CHUNK} bytes")
        ack = {"sha": f["sha"], "offset": f["offset"], "n": int(data.nbytes)}
        self.chunks_taken += 1
        if self.hold_weights_until is not None and self.chunks_taken > 1:
            # the test knob: the transfer stays part-sent until the test has seen it so (bounded: heartbeats wait)
            deadline = time.monotonic() + 30
            while not self.hold_weights_until.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            with self.cache_lock:
                done = self.cache.write(f["sha"], f["size"], f["offset"], memoryview(data))
            state = "done" if done else "partial"
        except CacheError as e:
            logger.warning(str(e))
            state = "bad"
        self.control.send(peer, "weights_ack", {**ack, "state": state})

    # -- roles --------------------------------------------------------------------------------------
    def reserve(self, peer: bytes, f: dict) -> None:
        name, count = f["name"], f["count"]

        def refuse(reason: str) -> None:  # (named: a coordinator restarting a role matches it to its request)
            self.control.send(peer, "refuse", {"reason": reason, "name": printable(name, 32)})

        if not ROLE_NAME.fullmatch(name) or (name not in self.reserved and len(self.reserved) >= 64):
            return refuse(f"reserve: name {printable(name)!r} is not a role name, or 64 reservations are held already")
        try:
            ipaddress.ip_address(f["bind"])
        except ValueError:
            return refuse(f"reserve: bind={f['bind']!r} is not an IP address")
        if not 1 <= count <= 16:
            return refuse(f"reserve: count={count} must be 1..16")
        port = f.get("port", 0)  # a stage started again: the port its pipeline's other stages know
        if not isinstance(port, int) or not 0 <= port <= 65535 or (port and count != 1):
            return refuse(f"reserve: port={port!r} must be 1..65535, with count=1")
        for s in self.reserved.pop(name, (peer, []))[1]:  # a coordinator asking again: new ports replace the old
            s.close()
        try:
            socks = [reserve_port(f["bind"], port) for _ in range(count)]
        except OSError as e:
            return refuse(f"cannot reserve a port on {f['bind']}: {e}")
        self.reserved[name] = (peer, socks)
        self.control.send(peer, "reserved", {"name": name, "ports": [s.getsockname()[1] for s in socks]})

    def start(self, peer: bytes, f: dict) -> None:
        name, role = f["name"], f["role"]
        bad = self._check_start(f)
        rdir = self.runs / f["run_id"] / name.replace(" ", "_") if not bad else None
        if rdir is not None and not rdir.resolve().is_relative_to(self.runs.resolve()):
            bad = f"run_id/name lead outside {self.runs}"
        if bad:
            logger.warning(f"refused to start {printable(name)}: {bad}")
            self.control.send(peer, "role_state", {"name": printable(name), "state": "failed", "detail": bad})
            return
        self.write_keys(rdir, f["keys"])
        shutil.rmtree(rdir / "endpoints", ignore_errors=True)  # a role started again: its last run's URLs are stale
        try:
            model = [f"checkpoint={model_dir(self.cache, rdir / 'model', f['model'])}",
                     *adapter_dirs(self.cache, rdir / "adapters", f["model"])] if f.get("model") else []
        except (CacheError, OSError) as e:  # a role's state, not a bad request: its coordinator gives up on it
            why = (f"its weights are not all in this agent's cache ({printable(str(e), 300)}; the cache may have "
                   "pruned them to make room: start the run again, which sends them)")
            logger.warning(f"could not start {name}: {why}")
            self.control.send(peer, "role_state", {"name": name, "state": "failed", "detail": why})
            return
        program = f.get("program") or "train"
        cmd = [sys.executable, "-u", "-m", f"smolcluster.{program}", *f["args"], *model, f"role={role}",
               f"hydra.run.dir={rdir}", "hydra.output_subdir=null"]
        if program == "train":  # (inference's schema has no run id, node name or progress bar)
            cmd += [f"run_id={f['run_id']}", "train.progress=false", f"node={self.name}"]
        if f.get("rank") is not None:
            cmd.append(f"rank={int(f['rank'])}")
        if f["keys"]:
            cmd.append(f"cluster.keys={rdir / 'keys'}")
        held = self.reserved.pop(name, (peer, []))[1]
        if sys.platform != "linux":  # BSD's SO_REUSEADDR would keep the role itself off the port
            for s in held:
                s.close()
            held = []
        lines: queue.Queue = queue.Queue()
        proc = self.children.start(name, cmd, {**os.environ, "PYTHONUNBUFFERED": "1", "SMOLCLUSTER_NODE": self.name},
                                   on_line=lambda line: lines.put(line.rstrip("\n")[:2000]),  # (logs, top: the node)
                                   preexec_fn=_die_with_parent)
        self.roles[name] = Role(name, role, proc, rdir, peer, lines=lines, held=held)
        logger.info(f"started {name} ({role}) for run {f['run_id']}: pid {proc.pid}")
        self.control.send(peer, "role_state", {"name": name, "state": "running"})

    @staticmethod
    def write_keys(rdir: Path, keys: dict) -> None:
        """The run's key files, rebuilt from the z85 keys found in what was sent (already checked), each new and 0600
        in 0700 directories; a rerun of the role replaces its old keys/ directory."""
        kdir = private_dir(rdir) / "keys"
        if os.path.lexists(kdir):
            shutil.rmtree(kdir)  # (refuses a symlink, and deletes links inside without following them)
        private_dir(kdir / "authorized")
        for fname, text in keys.items():
            write_private(kdir / fname, parse_certificate(text, fname.endswith("_secret")))

    def _check_start(self, f: dict) -> str | None:
        """Why this start_role is refused (None: it is not). What it may ask for: docs/setup_cluster.md."""
        if f["role"] not in ROLES:
            return f"role={printable(f['role'])!r} is not one of {', '.join(ROLES)}"
        program = f.get("program") or "train"
        if program not in PROGRAMS:
            return f"program={printable(program)!r} is not one of {', '.join(PROGRAMS)}"
        if not ROLE_NAME.fullmatch(f["name"]):
            return f"name {printable(f['name'])!r} must be a short plain name (letters, digits, space, - and _)"
        if not SAFE_NAME.fullmatch(f["run_id"]) or "." in f["run_id"]:
            return f"run_id {printable(f['run_id'])!r} must be letters, digits, - and _"
        if f["name"] in self.roles and self.roles[f["name"]].proc.poll() is None:
            return f"{f['name']} is already running here"
        for a in f["args"]:
            bad = check_override(a, program)
            if bad:
                return bad
        for k, v in f["keys"].items():
            if not KEY_FILES.fullmatch(k) or not isinstance(v, str):
                return "keys may only be server.key[_secret], client.key[_secret] and authorized/clientN.key"
            try:
                parse_certificate(v, k.endswith("_secret"))
            except ValueError as e:
                return f"key file {k}: {e}"
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
            if r.state == "stopping":
                self._stopping(r, code)
            elif code is not None and r.state in ("running", "listening") and r.lines.empty():
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

    def stop_one(self, name: str, reason: str) -> None:
        """Stop role ``name`` alone (a replica that stays down), and let go of a port held for it. Never waits (this
        loop must go on answering ``status``, or the coordinator declares the agent vanished): SIGTERM now;
        :meth:`poll_roles` reports it stopped once it has exited, SIGKILLed after ``STOP_GRACE_S``."""
        for s in self.reserved.pop(name, (None, []))[1]:
            s.close()
        r = self.roles.get(name)
        if r is None or r.proc.poll() is not None or r.state == "stopping":
            return
        logger.info(f"stopping {printable(name)}: {printable(reason, 300)}")
        r.state, r.stop_by = "stopping", time.monotonic() + STOP_GRACE_S
        signal_group(r.proc, signal.SIGTERM)

    def _stopping(self, r: Role, code: int | None) -> None:
        """A role :meth:`stop_one` is stopping: SIGKILL once its grace is over; once it has exited (its last lines
        sent), its held ports let go and ``stopped`` told."""
        if code is None and time.monotonic() > r.stop_by:
            logger.warning(f"{r.name} did not stop within {STOP_GRACE_S:g}s of SIGTERM: killing it")
            signal_group(r.proc, signal.SIGKILL)
            r.stop_by = float("inf")
        elif code is not None and r.lines.empty():
            r.release()
            r.state = f"stopped ({code})"
            logger.info(f"{r.name} stopped (code {code})")
            self.control.send(r.owner, "role_state", {"name": r.name, "state": "stopped", "code": code})

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
            while not self.outbox.empty():
                self.control.send(*self.outbox.get())
            self.poll_roles()
            if self.orphaned():
                logger.error(f"the coordinator has been silent for {self.owner_timeout_s:g}s: stopping its roles")
                self.stop_all()
            self.take_confirmations()  # `smolcluster.node pair CODE` may have confirmed one meanwhile

    def close(self, reason: str = "the agent is shutting down") -> None:
        owners = {r.owner for r in self.roles.values() if r.proc.poll() is None}
        self.stop_all()
        for peer in owners:  # a coordinator still running a run here hears it at once, not after liveness_s
            self.control.send(peer, "node_bye", {"reason": reason})
        self.control.close(linger_s=1.0)
        self.info.close()


def run_agent(args) -> int:
    from smolcluster.node.discovery import Advertisement, advertised_addresses
    from smolcluster.telemetry.logging import setup_logging

    setup_logging(node=args.name or node_name(), role="agent")  # the format every other node's lines have
    agent = Agent(args.state_dir, port=args.port, bind=args.bind, name=args.name, owner_timeout_s=args.owner_timeout,
                  weights_cache_bytes=int(args.weights_cache_gb * 2**30) if args.weights_cache_gb else None)
    agent.hold_weights_until = Path(args.hold_weights_until) if args.hold_weights_until else None
    sigterm_as_interrupt()
    ad = None
    try:
        if args.mdns:
            addresses = advertised_addresses(args.bind, args.advertise)
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
