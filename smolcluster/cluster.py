"""Who am I (role, rank, node, device) and the plumbing to start a whole cluster on this machine."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from typing import TYPE_CHECKING

from omegaconf import DictConfig

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


def worker_settings(cluster: DictConfig, rank: int, train: DictConfig) -> dict:
    """Per-worker batch size, device and test-only delay: cluster.nodes[rank] overrides the defaults."""
    nodes = list(cluster.get("nodes") or [])
    node = dict(nodes[rank]) if rank < len(nodes) and nodes[rank] else {}
    out = {
        "batch_size": int(node.get("batch_size", train.batch_size)),
        "device": node.get("device", None),
        "delay_s": float(node.get("delay_s", 0.0)),
        "blowup_every": int(node.get("blowup_every", 0)),  # test knob (allreduce): every Nth step's gradient x 1e6
        # test knob (allreduce): every Nth step this rank blows up its reduced chunks but reports their old norm
        "lie_norm_every": int(node.get("lie_norm_every", 0)),
        "host": node.get("host", None),
        "name": node.get("name", f"worker{rank}"),
    }
    if out["batch_size"] <= 0:
        raise ConfigError(f"cluster.nodes[{rank}].batch_size={out['batch_size']} must be positive")
    return out


def python_cmd() -> list[str]:
    return [sys.executable, "-u", "-m", "smolcluster.train"]
