"""Preflight: check every node of a cluster file before training starts.

For each node, over the same SSH path the launcher uses, a small stdlib-only Python probe
reports the Python and package versions, the accelerator, whether the working dir is
writable and the key dir exists. The server's probe binds the training port (``port in use``
is the most common surprise) and keeps listening; each worker's probe then opens a TCP
connection to it from its own host, which is what a firewall or a wrong ``cluster.host``
would break. Clock skew is measured NTP-style over the SSH session (offset +- half the round
trip): skewed clocks make the nodes' logs and metrics disagree on when things happened.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field

from omegaconf import DictConfig

import smolcluster
from launchers.cluster_file import Node
from launchers.remote import NO_PYTHON, NO_WORKDIR, SSH_FAILED, host_command, python_script
from smolcluster.errors import PeerError
from smolcluster.security import KEYS_FIX, is_loopback

# Runs on the node with its own Python; stdlib only, so it reports missing packages instead of failing.
PROBE = r'''
import json, os, platform, select, socket, sys, threading, time
a = json.loads(sys.argv[1])
out = {"hostname": socket.gethostname(), "python": platform.python_version(),
       "platform": platform.platform(terse=True), "cwd": os.getcwd(), "writable": os.access(".", os.W_OK)}
if not a.get("port_only"):  # the full check; a port-only probe skips the slow imports
    pkgs = {}
    for mod, dist in (("smolcluster", "smolcluster"), ("torch", "torch"), ("zmq", "pyzmq"),
                      ("msgpack", "msgpack"), ("hydra", "hydra-core"), ("numpy", "numpy")):
        try:
            pkgs[dist] = getattr(__import__(mod), "__version__", "?")
        except Exception as e:
            pkgs[dist] = None
            out.setdefault("import_errors", {})[dist] = f"{type(e).__name__}: {e}"
    out["packages"] = pkgs
    try:
        import zmq
        out["curve"] = bool(zmq.has("curve"))
    except Exception:
        out["curve"] = None
    try:
        import torch
        out["cuda"] = torch.cuda.is_available()
        out["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except Exception:
        pass
if a.get("keys"):
    kd = os.path.expanduser(a["keys"])
    out["keys_dir"] = os.path.isdir(kd)
    out["keys_missing"] = [f for f in a["key_files"] if not os.path.exists(os.path.join(kd, f))]
listener = None
if a["role"] == "server":
    bind = "" if a["bind"] in ("0.0.0.0", "*", "") else a["bind"]
    try:
        listener = socket.socket()
        listener.bind((bind, int(a["port"] or 0)))
        listener.listen(16)
        out["port"] = listener.getsockname()[1]
    except OSError as e:
        out["port_error"] = f"{e.strerror or e} (bind {a['bind']}:{a['port']})"
        listener = None
else:
    try:
        out["server_ip"] = socket.getaddrinfo(a["server_host"], None)[0][4][0]
    except OSError as e:
        out["resolve_error"] = f"cannot resolve {a['server_host']}: {e}"

def accept():
    while True:
        try:
            conn, _ = listener.accept()
            conn.close()
        except OSError:
            return

if listener is not None:
    threading.Thread(target=accept, daemon=True).start()
print(json.dumps(out), flush=True)
# then answer requests until the launcher closes stdin (or a minute passes)
deadline = time.time() + 60
while time.time() < deadline:
    ready, _, _ = select.select([sys.stdin], [], [], 1.0)
    if not ready:
        continue
    line = sys.stdin.readline()
    if not line:
        break
    cmd = line.split()
    if cmd[0] == "time":
        print(json.dumps({"time": time.time()}), flush=True)
    elif cmd[0] == "connect":
        try:
            socket.create_connection((cmd[1], int(cmd[2])), timeout=5).close()
            print(json.dumps({"connect": "ok"}), flush=True)
        except OSError as e:
            print(json.dumps({"connect": f"{e.strerror or e}"}), flush=True)
'''

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class NodeReport:
    node: Node
    checks: list[tuple[str, str, str]] = field(default_factory=list)  # (check, OK/WARN/FAIL, detail)
    facts: dict = field(default_factory=dict)

    def add(self, check: str, status: str, detail: str) -> None:
        self.checks.append((check, status, detail))

    @property
    def failed(self) -> bool:
        return any(s == FAIL for _, s, _ in self.checks)


class Probe:
    """The probe running on one node, spoken to line by line over its SSH session."""

    def __init__(self, node: Node, args: dict):
        self.node = node
        cmd = host_command(node.ssh, python_script(node.ssh, PROBE, [json.dumps(args)]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.said: list[str] = []  # lines that are not replies (the wrapper's own messages)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.put(line)
        self.lines.put(None)

    def reply(self, timeout: float) -> dict | None:
        """The next JSON line from the probe; None if it ended or said nothing in time."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith("{"):
                return json.loads(line)
            self.said.append(line.strip())
        return None

    def ask(self, request: str, timeout: float) -> dict | None:
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        return self.reply(timeout)

    def clock_offset(self, rounds: int = 5) -> tuple[float, float] | None:
        """(offset of the node's clock in seconds, +- error) from the round with the shortest trip."""
        best = None
        for _ in range(rounds):
            t0 = time.time()
            got = self.ask("time", 10)
            t1 = time.time()
            if not got:
                return best
            rtt = t1 - t0
            if best is None or rtt / 2 < best[1]:
                best = (got["time"] - (t0 + t1) / 2, rtt / 2)
        return best

    def close(self, timeout: float = 10) -> str:
        """End the probe; returns what it wrote to stderr (ssh's own errors land there)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        try:
            return self.proc.stderr.read().strip()
        except (OSError, ValueError):
            return ""


def _unreachable(report: NodeReport, probe: Probe) -> None:
    said = [*probe.said, *probe.close().splitlines()]
    code = probe.proc.returncode
    ours = [line for line in said if line.startswith("smolcluster-launch: ")]
    last = (ours or said or ["(no output)"])[-1].replace("smolcluster-launch: ", "")
    if code == SSH_FAILED and not probe.node.ssh.local:
        report.add("ssh", FAIL, f"cannot log in to {probe.node.ssh.target}: {last}")
        return
    report.add("ssh", OK, f"logged in to {probe.node.ssh.target}")
    if code == NO_WORKDIR:
        report.add("workdir", FAIL, last)
    elif code == NO_PYTHON:
        report.add("python", FAIL, last)
    else:
        report.add("probe", FAIL, f"the probe ended with code {code}: {last}")


def _node_checks(report: NodeReport, facts: dict, cluster: DictConfig, node_cfg: dict) -> None:
    node = report.node
    report.add("ssh", OK, f"{node.ssh.target} is {facts['hostname']} ({facts['platform']})")
    py = tuple(int(x) for x in facts["python"].split(".")[:2])
    report.add("python", OK if py >= (3, 10) else FAIL,
               f"{facts['python']}" + ("" if py >= (3, 10) else " (smolcluster needs >= 3.10)"))
    pkgs = facts["packages"]
    missing = [d for d, v in pkgs.items() if v is None]
    if missing:
        errors = facts.get("import_errors", {})
        report.add("packages", FAIL, f"missing {', '.join(missing)} for {node.ssh.python} "
                   f"({errors.get(missing[0], '')}): run `make install` in {node.ssh.workdir}")
    else:
        report.add("packages", OK, ", ".join(f"{d} {v}" for d, v in pkgs.items()))
    mine = smolcluster.__version__
    if pkgs.get("smolcluster") and pkgs["smolcluster"] != mine:
        report.add("version", FAIL, f"smolcluster {pkgs['smolcluster']} here vs {mine} on the launcher: "
                   "run the same version on every node")
    if not facts["writable"]:
        report.add("workdir", FAIL, f"{facts['cwd']} is not writable: run files cannot be written there")
    if "cuda" not in facts:  # torch did not import: the packages row already says so
        return _keys_check(report, facts, cluster)
    want = str(node_cfg.get("device") or "auto")
    have = "cuda" if facts.get("cuda") else "mps" if facts.get("mps") else "cpu"
    if want.startswith("cuda") and not facts.get("cuda") or want == "mps" and not facts.get("mps"):
        report.add("device", FAIL, f"device={want} but this node has {have}: set its device to auto or {have}")
    else:
        report.add("device", OK, f"{want} ({have} available)")
    _keys_check(report, facts, cluster)


# What each role reads from the key dir (python -m smolcluster.keys writes them all).
KEY_FILES = {"server": ["server.key_secret", "authorized"], "worker": ["server.key", "client.key_secret"]}


def _keys_check(report: NodeReport, facts: dict, cluster: DictConfig) -> None:
    if not cluster.get("keys"):
        bind = str(cluster.get("bind") or cluster.host)
        if not is_loopback(bind):  # what every node's own start-up check (smolcluster.security) will say
            if cluster.get("insecure"):
                report.add("keys", WARN, f"none: cluster.insecure=true, so anyone who reaches {bind} can join the run")
            else:
                report.add("keys", FAIL, f"none, and the cluster binds {bind}: every node will refuse to start; {KEYS_FIX}")
        return
    if not facts.get("keys_dir"):
        report.add("keys", FAIL, f"key dir {cluster.get('keys')} not found in {facts['cwd']}: copy the keys "
                   "(python -m smolcluster.keys --dir keys/) to every node")
    elif facts.get("keys_missing"):
        report.add("keys", FAIL, f"{cluster.get('keys')} lacks {', '.join(facts['keys_missing'])}, which the "
                   f"{report.node.role} needs: copy them from the machine that made the keys")
    elif facts.get("curve") is False:
        report.add("keys", FAIL, "this node's libzmq has no CURVE support: reinstall pyzmq from wheels")
    else:
        report.add("keys", OK, f"{cluster.get('keys')}: {', '.join(KEY_FILES[report.node.role])}; CURVE available")


def check(cluster: DictConfig, nodes: list[Node], max_skew_s: float = 2.0) -> tuple[list[NodeReport], int | None]:
    """Run every node's checks in parallel; returns the reports and the port the server could bind."""
    server = nodes[0]
    node_cfgs = list(cluster.get("nodes") or [])
    keys = cluster.get("keys")
    probes = [Probe(server, {"role": "server", "bind": str(cluster.get("bind") or "0.0.0.0"),
                             "port": cluster.get("port"), "keys": keys, "key_files": KEY_FILES["server"]})]
    probes += [Probe(n, {"role": "worker", "server_host": str(cluster.host), "keys": keys,
                         "key_files": KEY_FILES["worker"]}) for n in nodes[1:]]
    reports = [NodeReport(p.node) for p in probes]
    port = None
    try:
        # the first reply carries the node's facts; torch's import takes a while on a small board
        facts = [p.reply(timeout=120) for p in probes]
        for report, probe, f in zip(reports, probes, facts):
            if f is None:
                _unreachable(report, probe)
                continue
            report.facts = f
            cfg = dict(node_cfgs[report.node.rank]) if report.node.rank is not None and report.node.rank < len(node_cfgs) else {}
            _node_checks(report, f, cluster, cfg)
            offset = probe.clock_offset()
            if offset is not None:
                skew, err = offset
                status = OK if abs(skew) <= max_skew_s else FAIL
                detail = f"{skew * 1000:+.1f} ms (+-{err * 1000:.1f} ms) vs this machine"
                if status == FAIL:
                    detail += f", over --max-skew {max_skew_s}s: sync the clocks (NTP: timedatectl set-ntp true)"
                report.add("clock", status, detail)
        sf = facts[0]
        if sf is not None:
            if "port_error" in sf:
                reports[0].add("port", FAIL, f"cannot listen on port {cluster.get('port')}: {sf['port_error']}: "
                               "pick another cluster.port or stop what holds it")
            else:
                port = int(sf["port"])
                what = f"port {port} is free" if cluster.get("port") else f"port: null, {port} would be used"
                reports[0].add("port", OK, f"{what} (bind {cluster.get('bind') or '0.0.0.0'})")
        for report, probe, f in zip(reports[1:], probes[1:], facts[1:]):
            if f is None:
                continue
            if "resolve_error" in f:
                report.add("reach", FAIL, f["resolve_error"] + ": fix cluster.host")
            elif port is not None:
                got = probe.ask(f"connect {cluster.host} {port}", timeout=15) or {"connect": "no answer"}
                if got["connect"] == "ok":
                    report.add("reach", OK, f"connected to {cluster.host}:{port}")
                else:
                    report.add("reach", FAIL, f"cannot connect to {cluster.host}:{port}: {got['connect']}: "
                               f"is cluster.host the server's address, and TCP {port} open in its firewall?")
        versions = {r.facts["packages"]["torch"] for r in reports if r.facts} - {None}
        if len(versions) > 1:  # works (the wire carries raw arrays), but numerics may differ slightly
            reports[0].add("torch", WARN, f"torch versions differ across nodes: {', '.join(sorted(versions))}")
    finally:
        for p in probes:
            p.close()
    return reports, port


def free_server_port(cluster: DictConfig, server: Node) -> int:
    """A port the server's host can listen on now (asked on that host, not here)."""
    probe = Probe(server, {"role": "server", "bind": str(cluster.get("bind") or "0.0.0.0"), "port": 0,
                           "port_only": True})
    try:
        got = probe.reply(timeout=60)
    finally:
        probe.close()
    if not got or "port" not in got:
        raise PeerError(f"could not get a free port from {server.describe()}: "
                        f"{(got or {}).get('port_error') or ' '.join(probe.said) or 'no answer'}")
    return int(got["port"])


def format_reports(reports: list[NodeReport]) -> str:
    lines = ["| node | check | result | detail |", "|---|---|---|---|"]
    for r in reports:
        for check_name, status, detail in r.checks:
            lines.append(f"| {r.node.describe()} | {check_name} | {status} | {detail.replace('|', '/')} |")
    failed = [r.node.describe() for r in reports if r.failed]
    lines.append("")
    lines.append(f"preflight FAILED on {', '.join(failed)}" if failed else
                 f"preflight ok: {len(reports)} nodes ready")
    return "\n".join(lines)
