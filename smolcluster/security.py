"""Secure by default: what a node refuses to do unless told, and the gradients no run applies.

- ``check_bind``: a server, worker or stage listening beyond loopback without CURVE keys would let anyone
  on the network join the run; it refuses unless the user says ``cluster.insecure=true`` (then warns).
- ``check_api``: the chat/API server beyond loopback without ``serve.api_key`` likewise (``serve.insecure``).
- :class:`GradientGuard`: a gradient whose norm is non-finite, or more than ``ratio`` times the median
  of the last ``window`` accepted norms, is rejected and counted instead of applied. Keys stop a
  stranger; this stops a buggy node (an fp16 overflow) or a stranger on a keyless run.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import socket

import torch
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


class GradientGuard:
    """Reject a gradient whose norm is non-finite or above ``ratio`` x the median of recent accepted norms.

    The median of the last ``window`` accepted norms is robust: a minority of huge gradients cannot drag the
    bound up. The first ``warmup`` gradients are only checked for finiteness (there is no range yet).
    ``ratio <= 0`` turns the norm bound off (non-finite gradients are still rejected).
    """

    def __init__(self, ratio: float = 10.0, window: int = 50, warmup: int = 5):
        self.ratio, self.warmup = float(ratio), int(warmup)
        self.norms: collections.deque[float] = collections.deque(maxlen=max(1, int(window)))
        self.rejected = 0

    @classmethod
    def from_config(cls, train) -> GradientGuard:
        return cls(getattr(train, "max_grad_norm_ratio", 10.0), getattr(train, "grad_norm_window", 50),
                   getattr(train, "grad_norm_warmup", 5))

    def bound(self) -> float | None:
        """The largest norm accepted now, or None while warming up or with the bound off."""
        if self.ratio <= 0 or len(self.norms) < min(self.warmup, self.norms.maxlen):
            return None
        ordered = sorted(self.norms)
        return self.ratio * ordered[len(ordered) // 2]

    def check(self, norm: float, who: str = "a gradient") -> bool:
        """True: apply it (and remember its norm). False: rejected, counted and logged."""
        limit = self.bound()
        if math.isfinite(norm) and (limit is None or norm <= limit):
            self.norms.append(norm)
            return True
        self.rejected += 1
        why = "not finite" if not math.isfinite(norm) else f"> {self.ratio:g} x the recent median ({limit:.4g})"
        logger.warning(f"rejected {who}: norm {norm:.4g} is {why} (train.max_grad_norm_ratio); "
                       f"{self.rejected} rejected so far")
        return False


def grad_norm(tensors) -> float:
    """The global L2 norm of a collection of tensors, in float64 (a 1e6-per-value gradient does not overflow)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors))
