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
from dataclasses import dataclass, field, replace
from pathlib import Path

import smolcluster
from launchers.cluster_file import Node
from launchers.remote import NO_PYTHON, NO_WORKDIR, SSH_FAILED, host_command, python_script
from smolcluster import resources
from smolcluster.errors import PeerError
from smolcluster.launch.cli import command
from smolcluster.security import KEYS_FIX, is_loopback
from smolcluster.train_settings import ClusterSpec
from smolcluster.transport import client_key_name

# Runs on the node with its own Python after resources.py's source (memory and speed); stdlib only at
# import, so it reports missing packages instead of failing. Args: listen (bind + port, or ports=N
# consecutive free ones from 0) and resolve (the hosts this node must reach).
PROBE_BODY = r'''
import json, platform, select, socket, sys, threading
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
    out["resources"] = resources(probe_speed=a.get("speed", True))
if a.get("keys"):
    kd = os.path.expanduser(a["keys"])
    out["keys_dir"] = os.path.isdir(kd)
    out["keys_missing"] = [f for f in a["key_files"]
                           if not any(os.path.exists(os.path.join(kd, alt)) for alt in f.split("|"))]
listeners = []
if a.get("listen"):
    bind = "" if a["bind"] in ("0.0.0.0", "*", "") else a["bind"]
    want = int(a.get("ports") or 1)
    for _ in range(50):  # port 0 + ports=N: the first of N consecutive free ports
        try:
            first = socket.socket()
            first.bind((bind, int(a["port"] or 0)))
            listeners = [first]
            for p in range(first.getsockname()[1] + 1, first.getsockname()[1] + want):
                s = socket.socket()
                listeners.append(s)
                s.bind((bind, p))
            break
        except OSError as e:
            for s in listeners:
                s.close()
            listeners = []
            if a["port"]:
                out["port_error"] = f"{e.strerror or e} (bind {a['bind']}:{a['port']})"
                break
    if listeners:
        for s in listeners:
            s.listen(16)
        out["port"] = listeners[0].getsockname()[1]
for host in a.get("resolve") or []:
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        out["resolve_error"] = f"cannot resolve {host}: {e}"

def accept(listener):
    while True:
        try:
            conn, _ = listener.accept()
            conn.close()
        except OSError:
            return

for s in listeners:
    threading.Thread(target=accept, args=(s,), daemon=True).start()
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
PROBE = Path(resources.__file__).read_text() + PROBE_BODY

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


def _node_checks(report: NodeReport, facts: dict, cluster: ClusterSpec, node_cfg: dict, kind: str) -> None:
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
        return _keys_check(report, facts, cluster, kind)
    want = str(node_cfg.get("device") or "auto")
    have = "cuda" if facts.get("cuda") else "mps" if facts.get("mps") else "cpu"
    if want.startswith("cuda") and not facts.get("cuda") or want == "mps" and not facts.get("mps"):
        report.add("device", FAIL, f"device={want} but this node has {have}: set its device to auto or {have}")
    else:
        report.add("device", OK, f"{want} ({have} available)")
    _resources_check(report, facts, want)
    _keys_check(report, facts, cluster, kind)


def _resources_check(report: NodeReport, facts: dict, device: str) -> None:
    """Memory and speed rows; ``facts["usable_bytes"]`` is what ``partition=auto`` may plan with."""
    res = facts.get("resources")
    if not res:
        return
    memory, speed = resources.describe(res)
    usable = resources.usable_bytes(res, device)
    facts["usable_bytes"] = usable
    cg = res.get("cgroup")
    if device.startswith("cuda") and usable is not None:
        memory += f"; a cuda stage gets {resources.gb(usable)}"
    report.add("memory", OK if usable is None or usable >= 512 << 20 else WARN,
               memory if usable is None or usable >= 512 << 20 else
               memory + ": under 512 MB usable, even a small stage may not load" + (
                   f" (the cgroup at {cg['path']} caps this process)" if cg else ""))
    report.add("speed", OK, speed)


# What each role reads from the key dir (python -m smolcluster.keys writes them all; "a|b": either will do).
KEY_FILES = {"server": ["server.key_secret", "authorized"], "worker": ["server.key", "client.key_secret"]}
KEY_FILES["peer"] = KEY_FILES["server"] + KEY_FILES["worker"]  # a rank (ring, stage) listens and connects


def worker_key_files(rank: int) -> list[str]:
    """Worker ``rank`` connects with its own pair, ``clientN.key_secret``, or that file renamed client.key_secret."""
    own = f"{client_key_name(rank)}.key_secret"
    return ["server.key", own if rank == 0 else f"{own}|client.key_secret"]


def _keys_check(report: NodeReport, facts: dict, cluster: ClusterSpec, kind: str) -> None:
    if not cluster.keys:
        bind = str(cluster.bind or cluster.host)
        if not is_loopback(bind):  # what every node's own start-up check (smolcluster.security) will say
            if cluster.insecure:
                report.add("keys", WARN, f"none: cluster.insecure=true, so anyone who reaches {bind} can join the run")
            else:
                report.add("keys", FAIL, f"none, and the cluster binds {bind}: every node will refuse to start; {KEYS_FIX}")
        return
    if not facts.get("keys_dir"):
        report.add("keys", FAIL, f"key dir {cluster.keys} not found in {facts['cwd']}: copy the keys "
                   "(python -m smolcluster.keys --dir keys/) to every node")
    elif facts.get("keys_missing"):
        report.add("keys", FAIL, f"{cluster.keys} lacks {', '.join(facts['keys_missing'])}, which the "
                   f"{report.node.label} needs: copy them from the machine that made the keys")
    elif facts.get("curve") is False:
        report.add("keys", FAIL, "this node's libzmq has no CURVE support: reinstall pyzmq from wheels")
    else:
        report.add("keys", OK, f"{cluster.keys}: {', '.join(KEY_FILES[kind])}; CURVE available")


def _ranks_layout(nodes: list[Node]) -> bool:
    """No server: every node is a rank that listens on its own port and reaches the others (ring, stages)."""
    return nodes[0].role != "server"


def rank_addresses(cluster: ClusterSpec, n: int, port: int) -> list[tuple[str, int]]:
    """(host, port) each rank listens on: ``cluster.nodes[r].host/port``, else cluster.host and port + r."""
    from smolcluster.launch.nodes import stage_nodes

    return [(s.host, s.port) for s in stage_nodes(replace(cluster, port=port), n)]


def _port_reports(listening: list[tuple[NodeReport, dict | None]], cluster: ClusterSpec, bind: str) -> None:
    """Each listening node's port check: free (or the one ``port: null`` would use), or why it cannot listen."""
    for report, f in listening:
        if f is None:
            continue
        if "port_error" in f:
            report.add("port", FAIL, f"cannot listen: {f['port_error']}: pick another cluster.port (or "
                       "cluster.nodes[i].port) or stop what holds it")
        else:
            what = f"port {f['port']} is free" if cluster.port else f"port: null, {f['port']} would be used"
            report.add("port", OK, f"{what} (bind {bind})")


def check(cluster: ClusterSpec, nodes: list[Node], max_skew_s: float = 2.0) -> tuple[list[NodeReport], int | None]:
    """Run every node's checks in parallel; returns the reports and the port the cluster can use (the server's,
    or the first rank's: rank r listens on port + r unless its node sets one)."""
    ranks = _ranks_layout(nodes)
    node_cfgs = cluster.nodes
    keys = cluster.keys
    bind = str(cluster.bind or ("0.0.0.0" if not ranks else cluster.host))
    base = cluster.port
    if ranks:
        if base is None and not all(len(node_cfgs) > r and (node_cfgs[r] or {}).get("port") for r in range(len(nodes))):
            base = free_ports_on(cluster, nodes[0], len(nodes))
        addresses = rank_addresses(cluster, len(nodes), base)
        probes = [Probe(n, {"listen": True, "bind": bind, "port": addresses[i][1], "keys": keys,
                            "key_files": KEY_FILES["peer"], "resolve": sorted({h for h, _ in addresses})})
                  for i, n in enumerate(nodes)]
    else:
        probes = [Probe(nodes[0], {"listen": True, "bind": bind, "port": base, "keys": keys,
                                   "key_files": KEY_FILES["server"]})]
        probes += [Probe(n, {"resolve": [str(cluster.host)], "keys": keys, "key_files": worker_key_files(rank)})
                   for rank, n in enumerate(nodes[1:])]
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
            cfg = dict(node_cfgs[report.node.rank] or {}) if report.node.rank is not None and report.node.rank < len(node_cfgs) else {}
            _node_checks(report, f, cluster, cfg, "peer" if ranks else report.node.role)
            offset = probe.clock_offset()
            if offset is not None:
                skew, err = offset
                status = OK if abs(skew) <= max_skew_s else FAIL
                detail = f"{skew * 1000:+.1f} ms (+-{err * 1000:.1f} ms) vs this machine"
                if status == FAIL:
                    detail += f", over --max-skew {max_skew_s}s: sync the clocks (NTP: timedatectl set-ntp true)"
                report.add("clock", status, detail)
        _port_reports(list(zip(reports, facts)) if ranks else [(reports[0], facts[0])], cluster, bind)
        if ranks:
            if all(f is not None and "port" in f for f in facts):
                port = base if base is not None else facts[0]["port"]
            # every rank connects to every other one: the ring's and the pipeline's links, whichever way round
            targets = [(r.node, a) for r, a in zip(reports, addresses)]
        else:
            port = int(facts[0]["port"]) if facts[0] is not None and "port" in facts[0] else None
            targets = [(nodes[0], (str(cluster.host), port))] if port is not None else []
        for report, probe, f in zip(reports, probes, facts):
            if f is None:
                continue
            if "resolve_error" in f:
                report.add("reach", FAIL, f["resolve_error"] + ": fix cluster.host / cluster.nodes[i].host")
                continue
            reached, failed = [], []
            for node, (host, p) in targets:
                if node is report.node:
                    continue
                got = probe.ask(f"connect {host} {p}", timeout=15) or {"connect": "no answer"}
                (reached if got["connect"] == "ok" else failed).append((node, host, p, got["connect"]))
            if failed:
                node, host, p, why = failed[0]
                report.add("reach", FAIL, f"cannot connect to {host}:{p} ({node.label}): {why}: is that its "
                           f"address, and TCP {p} open in its firewall?")
            elif reached:
                report.add("reach", OK, "connected to " + ", ".join(f"{h}:{p}" for _, h, p, _ in reached))
        versions = {r.facts["packages"]["torch"] for r in reports if r.facts} - {None}
        if len(versions) > 1:  # works (the wire carries raw arrays), but numerics may differ slightly
            reports[0].add("torch", WARN, f"torch versions differ across nodes: {', '.join(sorted(versions))}")
    finally:
        for p in probes:
            p.close()
    return reports, port


def free_ports_on(cluster: ClusterSpec, node: Node, n: int = 1) -> int:
    """The first of ``n`` consecutive ports the node's host can listen on now (asked on that host, not here)."""
    probe = Probe(node, {"listen": True, "bind": str(cluster.bind or "0.0.0.0"), "port": 0, "ports": n,
                         "port_only": True})
    try:
        got = probe.reply(timeout=60)
    finally:
        probe.close()
    if not got or "port" not in got:
        raise PeerError(f"could not get a free port from {node.describe()}: "
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


@command
def main(argv: list[str] | None = None) -> int:
    """``python -m launchers.preflight --local``: this machine's memory and speed, as the preflight reports a
    node's (``python -m launchers.ssh check --cluster ...`` does every node of a cluster file)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m launchers.preflight", description=main.__doc__)
    parser.add_argument("--local", action="store_true", required=True, help="probe this machine")
    parser.add_argument("--device", default="auto", help="the device a stage would use here (cpu, cuda, cuda:N)")
    parser.add_argument("--json", action="store_true", help="print the raw facts as JSON")
    args = parser.parse_args(argv)
    facts = resources.resources()
    if args.json:
        print(json.dumps({**facts, "usable_bytes": resources.usable_bytes(facts, args.device)}, indent=2))
        return 0
    memory, speed = resources.describe(facts)
    usable = resources.usable_bytes(facts, args.device)
    print("| check | detail |\n|---|---|")
    print(f"| memory | {memory} |\n| usable by a stage (device={args.device}) | {resources.gb(usable)} |\n| speed | {speed} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
