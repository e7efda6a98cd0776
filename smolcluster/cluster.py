"""Who am I (role, rank, node, device) and the plumbing to start a whole cluster on this machine."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import TYPE_CHECKING

from smolcluster.errors import ConfigError

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
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_name() -> str:
    return os.environ.get("SMOLCLUSTER_NODE") or socket.gethostname().split(".")[0]


def new_run_id() -> str:
    """A fresh run id. The letter in front matters: launchers pass it on as ``run_id=ID`` and Hydra
    reads a bare ``35e71139`` as the float 35e71139 (inf) and ``12345678`` as an int."""
    return "r" + uuid.uuid4().hex[:8]


def python_cmd() -> list[str]:
    return [sys.executable, "-u", "-m", "smolcluster.train"]
