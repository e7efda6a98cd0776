"""What a node offers a stage: usable memory (RAM, its cgroup's limit, VRAM) and a measured matmul speed.

Stdlib only at import, because the preflight ships this file's source to every node and runs it
with the node's own Python (:data:`launchers.preflight.PROBE`); torch is imported inside
:func:`speed` and :func:`vram`, so a node without it still reports its memory.

    python -m launchers.preflight --local     # this machine's facts, as the preflight reports a node's
"""

from __future__ import annotations  # the probe runs on any Python, and reports one that is too old

import os
import time


def meminfo() -> dict:
    """RAM in bytes: ``total`` and ``available`` (Linux ``MemAvailable``; elsewhere total only)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    out["total" if key == "MemTotal" else "available"] = int(value.split()[0]) * 1024
    except OSError:
        try:
            out["total"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _file_cache(directory: str, key: str) -> int:
    """The page cache a cgroup's usage includes (reclaimable: the kernel drops it before failing)."""
    try:
        with open(os.path.join(directory, "memory.stat")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return 0


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> dict | None:
    """The tightest memory limit on this process's cgroup and its ancestors (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), with the usage charged against it and what of that usage cannot be reclaimed
    (``held``: usage less file cache, as smolcluster/inference/placement.py counts it); None when no limit
    applies."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            version, base, limit_file, usage_file, cache_key = 2, root, "memory.max", "memory.current", "file"
        elif "memory" in controllers.split(","):
            version, base, limit_file, usage_file, cache_key = (1, os.path.join(root, "memory"),
                                                                "memory.limit_in_bytes", "memory.usage_in_bytes",
                                                                "total_cache")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        # the process's own cgroup first, then each ancestor: a parent's limit binds its children too
        for depth in range(len(parts), -1, -1):
            d = os.path.join(base, *parts[:depth])
            limit = _read_int(os.path.join(d, limit_file))
            if limit is None or limit >= 1 << 60:  # v1 writes a huge number for "no limit"
                continue
            if best is None or limit < best["limit"]:
                usage = _read_int(os.path.join(d, usage_file)) or 0
                best = {"version": version, "path": d, "limit": limit, "usage": usage,
                        "held": max(0, usage - _file_cache(d, cache_key))}
    return best


def vram() -> list[dict]:
    """Free and total bytes of each CUDA device (empty without torch or CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "free": free, "total": total})
        return out
    except Exception:
        return []


def speed(device: str = "cpu", seconds: float = 0.2, n: int = 512) -> float | None:
    """fp32 matmul GFLOP/s on ``device``, measured for about ``seconds`` after one warm-up product."""
    try:
        import torch

        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        a @ b
        sync()
        count, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            for _ in range(4):
                a @ b
            sync()
            count += 4
        return round(2 * n**3 * count / elapsed / 1e9, 1)
    except Exception:
        return None


def usable_bytes(facts: dict, device: str | None = None) -> int | None:
    """Memory a stage on this node can use: available RAM within the cgroup's headroom, or the GPU's free
    memory when the stage runs on cuda."""
    if device and str(device).startswith("cuda") and facts.get("vram"):
        index = int(str(device).split(":")[1]) if ":" in str(device) else 0
        gpus = [g for g in facts["vram"] if g["device"] == f"cuda:{index}"]
        if gpus:
            return gpus[0]["free"]
    ram = facts.get("ram") or {}
    have = ram.get("available", ram.get("total"))
    cg = facts.get("cgroup")
    if cg:
        headroom = cg["limit"] - cg.get("held", cg.get("usage") or 0)
        have = headroom if have is None else min(have, headroom)
    return have


def resources(probe_speed: bool = True) -> dict:
    """Every fact above, as the preflight reports it."""
    out = {"ram": meminfo(), "cgroup": cgroup_memory(), "vram": vram()}
    if probe_speed:
        out["gflops"] = {"cpu": speed("cpu")}
        for gpu in out["vram"]:
            out["gflops"][gpu["device"]] = speed(gpu["device"])
    return out


def gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GB"


def describe(facts: dict) -> tuple[str, str]:
    """One line on memory and one on speed, for the preflight's table."""
    ram, cg = facts.get("ram") or {}, facts.get("cgroup")
    memory = f"RAM {gb(ram.get('total'))}, {gb(ram.get('available'))} available"
    if cg:
        memory += (f"; cgroup v{cg['version']} limit {gb(cg['limit'])} at {cg['path']} ({gb(cg.get('usage'))} used, "
                   f"{gb(cg.get('held'))} not reclaimable)")
    for g in facts.get("vram") or []:
        memory += f"; {g['device']} {g['name']}: {gb(g['free'])} free of {gb(g['total'])}"
    memory += f"; usable {gb(usable_bytes(facts))}"
    rates = facts.get("gflops") or {}
    speed_line = ", ".join(f"{dev} {v} GFLOP/s" if v is not None else f"{dev} ?" for dev, v in rates.items())
    return memory, (speed_line + " (fp32 512x512 matmul, 0.2 s each)") if rates else "not measured"
