"""Secure by default: what a node refuses to do unless told.

- ``check_bind``: a server, worker or stage listening beyond loopback without CURVE keys would let anyone
  on the network join the run; it refuses unless the user says ``cluster.insecure=true`` (then warns).
- ``check_api``: the chat/API server beyond loopback without ``serve.api_key`` likewise (``serve.insecure``).

Keys stop a stranger; the gradients a member may hand the run are bounded where they are aggregated
(:mod:`smolcluster.algorithms.guard`).
"""

from __future__ import annotations

import ipaddress
import socket

from loguru import logger

from smolcluster.errors import ConfigError

KEYS_FIX = ("make keys (python -m smolcluster.keys --dir keys/, or make keys) and set cluster.keys=keys/ on every "
            "node, or set cluster.insecure=true on a trusted network")


def host_of(address: str) -> str:
    """``tcp://10.0.0.2:5555`` / ``[::1]:80`` / ``10.0.0.2`` -> the host part."""
    host = address.split("://", 1)[-1]
    if host.startswith("["):
        return host[1:host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (a wildcard such as 0.0.0.0 or * is not)."""
    host = host_of(host)
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: what it resolves to decides
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_bind(binds, keys, insecure: bool, what: str) -> None:
    """Refuse to listen on a non-loopback address without keys, unless ``insecure`` (then warn)."""
    exposed = sorted({host_of(str(b)) for b in binds if b is not None and not is_loopback(str(b))})
    if not exposed or keys:
        return
    if insecure:
        logger.warning(f"cluster.insecure=true: {what} listens on {', '.join(exposed)} without keys: anyone who "
                       "reaches it can join the run and send it gradients (unencrypted, unauthenticated)")
        return
    raise ConfigError(f"{what} would listen on {', '.join(exposed)} (beyond this machine) without keys: {KEYS_FIX}")


def check_api(host: str, api_key: str | None, insecure: bool) -> None:
    """The chat/API server beyond loopback needs ``serve.api_key`` unless ``serve.insecure=true``."""
    if is_loopback(host) or api_key:
        return
    if insecure:
        logger.warning(f"serve.insecure=true: the chat/API server on {host} answers anyone without an API key")
        return
    raise ConfigError(f"serve.host={host} is reachable beyond this machine but serve.api_key is not set: "
                      "set serve.api_key=SECRET (clients send Authorization: Bearer SECRET), "
                      "or serve.insecure=true on a trusted network")
