"""Finding agents: DNS-SD/mDNS with python-zeroconf, and static peers where multicast does not pass.

An agent advertises ``NAME._smolcluster._tcp.local.`` with its address, control port and a TXT
record of public facts: version, node protocol, device, cores, usable memory, its CURVE public key
and that key's fingerprint. A coordinator browses for a bounded time (``cluster.discover_s``,
ending early once ``cluster.expect`` agents answered). ``cluster.peers: [host:port, ...]`` asks
each agent's info port (control port + 1: a bounded JSON-lines responder, see infoport.py) for the
same facts.

Nothing here is trusted: a key learned from the network is checked by the pairing code
(see :mod:`smolcluster.node.pairing`) before the agent and coordinator trust each other, and
an agent's facts (device, memory) are used for placement only once it is paired.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from loguru import logger

from smolcluster.errors import ConfigError
from smolcluster.node.infoport import exchange
from smolcluster.node.pairing import fingerprint
from smolcluster.node.protocol import NODE_PROTOCOL, SERVICE_TYPE, VERSION


@dataclass
class NodeInfo:
    name: str
    host: str
    port: int          # control port (CURVE); the info port is port + 1
    key: str           # the agent's CURVE public key (z85)
    fingerprint: str
    version: str
    protocol: int
    device: str
    cores: int
    memory_gb: float
    source: str = "mdns"

    def where(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"

    def check(self) -> None:
        """Same smolcluster version and node protocol as this coordinator, and a key matching its fingerprint."""
        if self.protocol != NODE_PROTOCOL or self.version != VERSION:
            raise ConfigError(f"node {self.where()} runs smolcluster {self.version} (node protocol {self.protocol}); "
                              f"this coordinator runs {VERSION} (protocol {NODE_PROTOCOL}): install the same "
                              "version on every machine")
        if fingerprint(self.key) != self.fingerprint:
            raise ConfigError(f"node {self.where()} advertises a key that does not match its fingerprint: "
                              "not a smolcluster agent, or tampered with")

    def as_dict(self) -> dict:
        return asdict(self)


def advertised_addresses(bind: str, advertise: str | None = None) -> list[str]:
    """Where an agent says it is: ``--advertise``, else the one address it listens on, else (bound to every
    interface) every IPv4 address here. Never an address it does not listen on."""
    if advertise:
        return [advertise]
    return local_addresses() if bind in ("0.0.0.0", "*", "::", "") else [bind]


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses beyond loopback (loopback when there are none)."""
    import ifaddr

    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return found or ["127.0.0.1"]


class Advertisement:
    """This agent on mDNS while it lives; ``close`` withdraws it (a goodbye packet)."""

    def __init__(self, name: str, port: int, facts: dict, addresses: list[str]):
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        props = {k: str(v) for k, v in facts.items()}
        self.info = ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port, properties=props,
                                parsed_addresses=addresses, server=f"{name}.local.")
        self.zc = Zeroconf(ip_version=IPVersion.V4Only)
        self.zc.register_service(self.info, allow_name_change=True)

    def close(self) -> None:
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


def _from_service(info) -> NodeInfo | None:
    p = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
    addrs = info.parsed_addresses()
    try:
        return NodeInfo(name=p["name"], host=addrs[0], port=int(info.port), key=p["key"],
                        fingerprint=p["fingerprint"], version=p["version"], protocol=int(p["protocol"]),
                        device=p["device"], cores=int(p["cores"]), memory_gb=float(p["memory_gb"]), source="mdns")
    except (KeyError, ValueError, IndexError) as e:
        logger.warning(f"ignored a malformed smolcluster advertisement {info.name}: {e!r}")
        return None


def browse(seconds: float, expect: int | None = None) -> list[NodeInfo]:
    """Agents answering on mDNS within ``seconds`` (sooner once ``expect`` have answered)."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

    names: list[str] = []

    class Listener(ServiceListener):
        def add_service(self, zc, type_, name):
            names.append(name)

        def update_service(self, zc, type_, name):
            pass

        def remove_service(self, zc, type_, name):
            pass

    zc = Zeroconf(ip_version=IPVersion.V4Only)
    found: dict[str, NodeInfo] = {}
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, Listener())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (expect and len(found) >= expect):
            for name in [n for n in names if n not in found]:
                info = zc.get_service_info(SERVICE_TYPE, name, timeout=2000)
                node = _from_service(info) if info else None
                if node:
                    found[name] = node
            time.sleep(0.05)
        browser.cancel()
    finally:
        zc.close()
    return list(found.values())


def peer_list(peers) -> list[str]:
    """``cluster.peers`` as a list: ``[a:5660, b:5660]``, or one ``host:port`` (or ``a:5660,b:5660``) without the
    brackets, which Hydra reads as a string (it was iterated a character at a time)."""
    if not peers:
        return []
    if isinstance(peers, str):
        return [p.strip() for p in peers.split(",") if p.strip()]
    return [str(p) for p in peers]


def split_peer(peer: str) -> tuple[str, int]:
    host, _, port = str(peer).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster.peers: {peer!r} is not host:port (the agent's control port, e.g. 10.0.0.5:5660)")
    return host.strip("[]"), int(port)


def ask(peer: str, timeout_s: float = 5.0) -> NodeInfo:
    """An agent's public facts from its info port (control port + 1)."""
    host, port = split_peer(peer)
    try:
        f = exchange(host, port + 1, [{"kind": "node_hello"}], timeout_s)[0]
        if f.get("kind") != "node_info":
            raise ValueError(f"answered {str(f.get('kind'))[:40]}")
        return NodeInfo(name=str(f["name"]), host=host, port=port, key=str(f["key"]),
                        fingerprint=str(f["fingerprint"]), version=str(f["version"]), protocol=int(f["protocol"]),
                        device=str(f["device"]), cores=int(f["cores"]), memory_gb=float(f["memory_gb"]), source="peer")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cluster.peers: no smolcluster agent answers at {host}:{port} within {timeout_s:g}s "
                          f"({e}): is `python -m smolcluster.node` running there, and ports "
                          f"{port} and {port + 1} open?") from None
