"""The control channel's messages: kinds on the project's validated wire format (msgpack headers, no pickle).
(Public facts and pairing go over the info port instead: infoport.py.)

    coordinator -> agent                        agent -> coordinator
    node_hello {protocol, version}              node_info {name, version, protocol, facts..., paired}
    reserve {name, bind, count, port?}          reserved {name, ports}  (held for that role: see agent.py)
    start_role {name, role, rank, run_id,       role_state {name, state, code?, port?, detail?, summary?}
                args, keys, program?, model?}   role_log {name, lines}
                                                role_endpoint {name, file, endpoint}  (its /metrics, for top)
    status {}                                   node_status {roles}
    stop_roles {reason, name?}                  refuse {reason, name?}  (an unpaired key, a bad request;
                                                        name: the reservation refused)
                                                node_bye {reason} (the agent is shutting down)
    weights_ask {entries, files}                weights_status {have, free, readable}
    weights_chunk {sha, size, offset} + data    weights_ack {sha, offset, n, state}

Weights that travel (weightsend.py, weightcache.py): ``weights_ask`` names the cache entries a stage needs
({sha256: size}) and, for ``cluster.weights=auto``, the head's own model files ({path: [size, sha256]}); the
agent answers whether it reads those very files itself (same path, size and sha256: then nothing is sent), or
else what of each entry it holds (``have``, after pruning others' entries to make room) and its free disk. Chunks of at
most ``CHUNK`` bytes follow, each acknowledged (``state``: partial, done, or bad: the entry hashed wrong and
was discarded). ``start_role``'s ``model`` ({config_files: {name: sha}, tensors: {key: sha}}) has the agent
build the stage's model directory from its cache.

A coordinator sends ``status`` every ``cluster.heartbeat_s``; an agent silent for
``cluster.liveness_s`` has vanished. An agent whose coordinator goes silent that long stops
the roles it started for it (nothing is left running when a coordinator dies).
"""

from __future__ import annotations

import os

from smolcluster import __version__
from smolcluster.transport import register_kind

NODE_PROTOCOL = 7  # 7: stop_roles may name one role, a refused reserve names its role; 6: reserve may name the port (a replica's stage started again); 5: weights_ask's files carry [size, sha256]; 4: weights that travel (weights_ask, weights_chunk); 3: the bounded info port and mutual pairing (2: reserve/reserved, start_role's program)
VERSION = __version__
SERVICE_TYPE = "_smolcluster._tcp.local."
ROLES = ("server", "worker", "stage", "head")
PROGRAMS = ("train", "infer")  # python -m smolcluster.PROGRAM: training roles, inference stages
MAX_BYTES = 16 << 20  # control messages are small: keys, overrides, log lines, a summary, a weights chunk
CHUNK = 1 << 20  # a weights chunk's bytes at most (many in flight: weightsend.WINDOW)

_NUM = (int, float)
register_kind("node_hello", {"protocol": int, "version": str}, optional={"name": str})
register_kind("node_info", {"name": str, "version": str, "protocol": int, "device": str, "cores": int,
                            "memory_gb": _NUM, "fingerprint": str, "key": str, "port": int},
              optional={"paired": bool})
register_kind("reserve", {"name": str, "bind": str, "count": int}, optional={"port": int})
register_kind("reserved", {"name": str, "ports": list})
register_kind("start_role", {"name": str, "role": str, "run_id": str, "args": list, "keys": dict},
              optional={"rank": int, "program": str, "model": dict})
register_kind("role_state", {"name": str, "state": str},
              optional={"code": int, "port": int, "detail": str, "summary": dict})
register_kind("role_log", {"name": str, "lines": list})
register_kind("role_endpoint", {"name": str, "file": str, "endpoint": dict})
register_kind("status", {})
register_kind("node_status", {"roles": dict})
register_kind("stop_roles", {"reason": str}, optional={"name": str})  # name: that role alone
register_kind("node_bye", {"reason": str})
register_kind("weights_ask", {"entries": dict, "files": dict})
register_kind("weights_status", {"have": dict, "free": int, "readable": bool})
register_kind("weights_chunk", {"sha": str, "size": int, "offset": int})
register_kind("weights_ack", {"sha": str, "offset": int, "n": int, "state": str})


def device_kind() -> str:
    """cuda / mps / cpu: what ``device=auto`` would pick here (torch is imported only for this)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def facts() -> dict:
    """What an agent advertises about its machine (the facts placement uses). Its memory is what a new process
    may use here, within this agent's cgroup limit (a container's), as the preflight and partition=auto count it."""
    # (the import loads torch, as device_kind does)
    from smolcluster.inference.placement import usable_memory

    return {"device": device_kind(), "cores": os.cpu_count() or 1,
            "memory_gb": round(usable_memory().bytes / 2**30, 2)}
