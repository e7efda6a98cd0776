"""A LAN of separate hosts on one Linux machine: each host a network namespace with its own address, all
plugged into one bridge (a switch in a namespace of its own, so no host firewall rule applies), each link
optionally shaped with ``tc qdisc ... tbf`` in both directions. Used by the netns tests and the benches
(scaling, weights, lora, desk, replicas).

    [ns h0 SUBNET.10] --veth(eth0 | port ph0)--+
    [ns h1 SUBNET.11] --veth(eth0 | port ph1)--+-- br0 in [ns sw]
    ...

tbf shapes a device's egress only, so a shaped link gets a tbf on the host's eth0 (what the host sends) and
on its switch port (what it receives): each host has ``rate`` up and ``rate`` down, as on a switched LAN.
Needs root and iproute2 (``ip``, ``tc``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def netns_unavailable(shaping: bool = False) -> str | None:
    """Why namespaces (and, with ``shaping``, tc) cannot be used here; None when they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2: apt-get install -y iproute2"
    if shaping and shutil.which("tc") is None:
        return "needs tc (iproute2) to shape links: apt-get install -y iproute2"
    probe = f"scprobe{os.getpid()}"
    got = ip("netns", "add", probe, check=False)
    if got.returncode != 0:
        return f"cannot create a network namespace here: {got.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def parse_rate(rate: str) -> int:
    """'100mbit' / '1gbit' / '500kbit' -> bits per second."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    low = rate.strip().lower()
    for unit, mult in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * mult)
    raise ValueError(f"link rate {rate!r} is invalid: write e.g. 100mbit or 1gbit")


class Lan:
    """Hosts ``names`` on a bridge; ``rate`` (e.g. '100mbit') shapes every link, None leaves them at veth speed.
    Torn down by :meth:`close` (deleting a namespace deletes its links), whatever happened."""

    def __init__(self, names: list[str], rate: str | None = None, tag: str = "") -> None:
        pid = os.getpid()
        tag = tag or f"{pid % 100000}"
        self.subnet = f"10.213.{pid % 200 + 20}"
        self.names, self.rate = list(names), rate
        self.ns = {name: f"sc{tag}{name}" for name in ["sw", *names]}
        self.ip = {name: f"{self.subnet}.{10 + i}" for i, name in enumerate(names)}
        self.port_of = {name: f"p{name}" for name in names}  # host -> its switch port (the veth end inside sw)

    def build(self) -> Lan:
        try:
            for ns in self.ns.values():
                ip("netns", "add", ns)
            sw = self.ns["sw"]
            ip("-n", sw, "link", "add", "br0", "type", "bridge")
            ip("-n", sw, "link", "set", "br0", "up")
            for host in self.names:
                port, ns = self.port_of[host], self.ns[host]
                # create the pair inside the host's namespace, then move one end into the switch
                ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port)
                ip("-n", ns, "link", "set", port, "netns", sw)
                ip("-n", sw, "link", "set", port, "master", "br0")
                ip("-n", sw, "link", "set", port, "up")
                ip("-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
            if self.rate:
                self.shape(self.rate)
        except BaseException:
            self.close()
            raise
        return self

    def _shape(self, ns: str, dev: str) -> None:
        bits = parse_rate(self.rate)
        # the bucket holds 10 ms of traffic (at least a few full-size frames): big enough that the token refill
        # granularity does not cap the rate below `rate`, small enough that bursts stay short. `latency 100ms`
        # lets the queue hold 100 ms of traffic, as a switch port buffers: TCP's bursts wait instead of being
        # dropped (measured: no drop and no retransmit in `bench scaling`'s runs, see dropped())
        burst = max(bits // 8 // 100, 64 * 1024)
        got = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                              "rate", self.rate, "burst", str(burst), "latency", "100ms"],
                             capture_output=True, text=True, timeout=20)
        if got.returncode != 0:
            raise RuntimeError(f"tc tbf on {dev} in {ns} failed: {got.stderr.strip()}")

    def shape(self, rate: str) -> None:
        """Every link shaped to ``rate``, both ways."""
        self.rate = rate
        for host in self.names:
            self._shape(self.ns[host], "eth0")
            self._shape(self.ns["sw"], self.port_of[host])

    def unshape(self) -> None:
        """Every link back to veth speed (the tbf qdiscs removed, in both directions), while traffic flows."""
        for host in self.names:
            for ns, dev in ((self.ns[host], "eth0"), (self.ns["sw"], self.port_of[host])):
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                               capture_output=True, text=True, timeout=20)
        self.rate = None

    def dropped(self, host: str) -> int:
        """Packets the tbf on ``host``'s link dropped, both directions (``tc -s qdisc``'s ``dropped``)."""
        total = 0
        for ns, dev in ((self.ns[host], "eth0"), (self.ns["sw"], self.port_of[host])):
            out = subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                                 capture_output=True, text=True, timeout=20).stdout
            total += sum(int(x) for x in re.findall(r"dropped (\d+)", out))
        return total

    def exec(self, host: str) -> list[str]:
        """The prefix that runs a command inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns[host]]

    def pull_cable(self, host: str) -> None:
        """``host``'s switch port goes down: its packets go nowhere, and nothing tells its peers."""
        ip("-n", self.ns["sw"], "link", "set", self.port_of[host], "down")

    def established_peers(self, host: str, port: int) -> set[str]:
        """Remote addresses of the TCP connections to ``port`` inside ``host``'s namespace."""
        out = subprocess.run([*self.exec(host), "ss", "-Htn", "state", "established"],
                             capture_output=True, text=True, timeout=20).stdout
        peers = set()
        for line in out.splitlines():
            cols = line.split()
            local, remote = cols[-2], cols[-1]
            if local.endswith(f":{port}"):
                peers.add(remote.rsplit(":", 1)[0])
        return peers

    def close(self) -> None:
        for ns in self.ns.values():
            ip("netns", "del", ns, check=False)
