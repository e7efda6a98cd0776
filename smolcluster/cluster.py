"""Who am I (role, rank, node, device) and the plumbing to start a whole cluster on this machine."""

from __future__ import annotations

import os
import random
import socket
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from smolcluster.errors import ConfigError, PeerError

if TYPE_CHECKING:
    import torch


def pick_device(pref: str = "auto") -> torch.device:
    """cuda > mps > cpu for ``auto``; an explicit choice that is not available is an error."""
    import torch  # here, not at the top: a launcher imports this module and never needs torch

    if pref in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={pref} but CUDA is not available on this machine: use device=auto or device=cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={pref} but MPS is not available on this machine: use device=auto or device=cpu")
    return dev


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(host, 1)


# Its own generator: a test or a training run that seeds `random` would otherwise pick the same ports each time.
PORTS = random.SystemRandom()


def ephemeral_low() -> int:
    """The lowest port the OS hands out for outgoing connections (Linux's ``ip_local_port_range``; 32768 where it
    cannot be read, which is also below macOS's and Windows' range, 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(host: str, n: int, tries: int = 50) -> int:
    """A port P such that P..P+n-1 are free on ``host`` right now.

    Chosen at random *below* the ephemeral range: a port the OS picked for ``bind(0)`` lies in that range, where
    every outgoing connection (a ZMQ peer's, a test's HTTP client) takes its source port too, and one may take it
    between this check and the stage's bind ("Address already in use"; ci-fresh --busy saw it)."""
    lo, hi = 10000, ephemeral_low() - n
    if hi <= lo:  # an OS that lends every port out: anywhere, then
        lo, hi = 1024, 65536 - n
    for _ in range(tries):
        base = PORTS.randrange(lo, hi)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise PeerError(f"found no {n} consecutive free ports on {host}; set cluster.port")


def node_name() -> str:
    return os.environ.get("SMOLCLUSTER_NODE") or socket.gethostname().split(".")[0]


def new_run_id() -> str:
    """A fresh run id. The letter in front matters: launchers pass it on as ``run_id=ID`` and Hydra
    reads a bare ``35e71139`` as the float 35e71139 (inf) and ``12345678`` as an int."""
    return "r" + uuid.uuid4().hex[:8]


def python_cmd() -> list[str]:
    return [sys.executable, "-u", "-m", "smolcluster.train"]
