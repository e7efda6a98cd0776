"""``partition=auto``: blocks placed so each stage's weights + KV cache budget fit its node's memory.

A stage needs (bytes): its parameters in its format (:func:`bytes_per_param`), plus the KV cache of
``requests`` requests at full context for its blocks, plus :data:`RUNTIME_BYTES` for Python +
torch. A node offers ``cluster.nodes[i].memory_gb`` (else, for stages launched on this machine,
what this machine offers a new process, :func:`usable_memory`: ``MemAvailable``, or less under a
cgroup memory limit, shared among them), less :data:`MARGIN`. Blocks go in proportion to what each
node offers (the same min-max split as ``cluster.nodes[i].weight``), and the plan is checked
stage by stage before any weight is read: a model that fits nowhere is refused in one line
saying how much is missing and what would help.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from smolcluster.errors import ConfigError
from smolcluster.pipeline.architectures import Architecture
from smolcluster.pipeline.quantize import StageFormat

# A stage before any weight: measured here ~150 MB of anonymous memory (Python, torch, zmq, threads:
# what a cgroup charges it) plus ~90 MB of torch's library pages (file-backed: shared by a
# machine's stages, and reclaimable), so RSS ~240 MB. The anonymous part is what a stage must
# have; the rest is rounded up into this.
RUNTIME_BYTES = 200 << 20
MARGIN = 0.10               # of each node's memory kept free


def size(n: float) -> str:
    """Bytes for a person: GB, or MB below one GB (test-sized nodes)."""
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def bytes_per_param(fmt: StageFormat, ends: bool) -> float:
    """Bytes a parameter costs in ``fmt``: blocks' linear weights, or the embedding / head (``ends``)."""
    if fmt.quantize == "none":
        return fmt.dtype.itemsize
    if fmt.quantize == "int8" or ends:  # int4 keeps the embedding / head in int8
        return 1.0
    return 0.5 + 2 * fmt.dtype.itemsize / fmt.group_size  # nibbles + a scale and a zero per group


def kv_bytes_per_block(arch: Architecture, fmt: StageFormat, tokens: int) -> int:
    shape = arch.shape
    width = getattr(shape, "n_kv_head", None)
    width = width * shape.head_dim if width else shape.n_embd  # Llama-shaped: GQA heads; GPT-2: all
    return 2 * width * tokens * fmt.dtype.itemsize


def prefer_faster(arch: Architecture, formats: list[StageFormat], memory: list, gflops: list[float],
                  head_first: bool, requests: int, by_memory: list[float]) -> list[float]:
    """Stage weights in proportion to each node's measured speed (``cluster.nodes[i].gflops``, which the SSH
    launcher's preflight records), so stages take about equal time, when that split fits every node's memory;
    else ``by_memory`` (:func:`auto_weights`' split, already checked)."""
    n = len(gflops)
    head_rank = 0 if head_first else n - 1
    for s, f, m in zip(arch.plan(n, gflops, head_first=head_first), formats, memory, strict=True):
        if stage_bytes(arch, f, s.blocks, s.first, s.rank == head_rank, requests) > getattr(m, "bytes", m) * (1 - MARGIN):
            return by_memory
    return list(gflops)


def stage_bytes(arch: Architecture, fmt: StageFormat, blocks: range, embed: bool, head: bool,
                requests: int) -> int:
    none = range(0)
    ends = arch.numel(embed, head, none) * bytes_per_param(fmt, True)
    body = arch.numel(False, False, blocks) * bytes_per_param(fmt, False)
    kv = len(blocks) * kv_bytes_per_block(arch, fmt, requests * arch.context)
    return int(ends + body + kv + RUNTIME_BYTES)


@dataclass(frozen=True)
class NodeMemory:
    """Bytes a node offers its stages, and where that figure comes from (named when a model is refused)."""

    bytes: int
    source: str


_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, int, Path] | None:
    """This process's cgroup memory limit, what the cgroup holds that cannot be reclaimed (its usage less
    file cache), and the cgroup's directory; None when no limit below the machine's memory is set.

    cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``); a limit set on a parent cgroup
    binds too, so the smallest on the path up counts. A container's memory limit is one of these.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file, file_keys = (_CGROUP_ROOT / "memory", "memory.limit_in_bytes",
                                                       "memory.usage_in_bytes", ("total_cache",))
        elif controllers == "" and (_CGROUP_ROOT / "cgroup.controllers").is_file():  # v2, unified at the root
            base, limit_file, usage_file, file_keys = _CGROUP_ROOT, "memory.max", "memory.current", ("file",)
        else:
            continue
        d = base / rel.lstrip("/")
        best = None
        for c in (d, *d.parents):
            if base not in (c, *c.parents):
                break
            limit = _read_int(c / limit_file)
            if limit is not None and (best is None or limit < best[0]):
                best = (limit, c)
        if best is None:
            continue
        usage = _read_int(d / usage_file) or 0
        stat = {}
        try:
            stat = dict(x.split() for x in (d / "memory.stat").read_text().splitlines() if x.count(" ") == 1)
        except OSError:
            pass
        held = max(0, usage - sum(int(stat.get(k, 0)) for k in file_keys))
        if found is None or best[0] < found[0]:
            found = (best[0], held, best[1])
    if found is None:
        return None
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return found if found[0] < phys else None  # v1 reports "no limit" as a huge number


def available_bytes() -> int:
    """This machine's ``MemAvailable`` (Linux), else total RAM by sysconf."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_memory() -> NodeMemory:
    """What this machine offers a new process: ``MemAvailable``, or, when this process runs under a cgroup
    memory limit (a container, a systemd slice, ``cgcreate``), that limit less what the cgroup already holds,
    whichever is smaller. The preflight reports this as the node's usable memory."""
    avail = available_bytes()
    cg = cgroup_memory()
    if cg is not None and cg[0] - cg[1] < avail:
        limit, held, where = cg
        return NodeMemory(limit - held, f"cgroup memory limit {size(limit)} at {where}, {size(held)} of it in use")
    return NodeMemory(avail, f"MemAvailable {size(avail)}")


def node_memory(cluster, n_stages: int, local: bool) -> list[NodeMemory]:
    """What each stage's node offers: ``cluster.nodes[i].memory_gb``, else (local stages) a share of what this
    machine offers (:func:`usable_memory`)."""
    nodes = list(getattr(cluster, "nodes", None) or []) if cluster is not None else []
    out = []
    here = None
    for i in range(n_stages):
        node = nodes[i] if i < len(nodes) and nodes[i] else {}
        gb = node.get("memory_gb")
        if gb is None:
            if not local:
                raise ConfigError(f"partition=auto needs cluster.nodes[{i}].memory_gb (the node's usable memory "
                                  "in GB) for a stage on another machine")
            here = here or usable_memory()
            out.append(NodeMemory(here.bytes // n_stages, f"1/{n_stages} of this machine's {here.source}"))
        elif not isinstance(gb, (int, float)) or isinstance(gb, bool) or gb <= 0:
            raise ConfigError(f"cluster.nodes[{i}].memory_gb={gb!r} is invalid: give a positive number of GB")
        else:
            out.append(NodeMemory(int(gb * (1 << 30)), f"cluster.nodes[{i}].memory_gb={gb:g}"))
    return out


def auto_weights(arch: Architecture, formats: list[StageFormat], memory: list[NodeMemory | int],
                 head_first: bool, requests: int = 1) -> list[float]:
    """Stage weights for :meth:`Architecture.plan` so blocks go where the memory is; refuses a model that
    cannot fit (before any weight is read), naming what each node offers and where that figure comes from."""
    nodes = [m if isinstance(m, NodeMemory) else NodeMemory(int(m), "given") for m in memory]
    memory = [m.bytes for m in nodes]
    n = len(memory)
    usable = [m * (1 - MARGIN) - RUNTIME_BYTES for m in memory]
    ref = bytes_per_param(formats[0], False)
    weights = [max(u, 1.0) * ref / bytes_per_param(f, False) for u, f in zip(usable, formats, strict=True)]
    if n > arch.n_layer:
        raise ConfigError(f"partition=auto: {n} stages for {arch.n_layer} blocks; use at most {arch.n_layer}")
    specs = arch.plan(n, weights, head_first=head_first)
    head_rank = 0 if head_first else n - 1
    need = [stage_bytes(arch, f, s.blocks, s.first, s.rank == head_rank, requests)
            for s, f in zip(specs, formats, strict=True)]
    have = [int(m * (1 - MARGIN)) for m in memory]
    short = [(i, need[i] - have[i]) for i in range(n) if need[i] > have[i]]
    if short:
        total_short = sum(need) - sum(have)
        worst, gap = max(short, key=lambda t: t[1])
        help_ = ["more stages"]
        if formats[worst].precision == "fp32" and formats[worst].quantize == "none":
            help_.append("precision=bf16 (about half the weights)")
        if formats[worst].quantize != "int8" and formats[worst].quantize != "int4":
            help_.append("quantize=int8 (about a quarter)")
        raise ConfigError(
            f"the model does not fit: stage {worst} needs {size(need[worst])} (weights + KV cache for {requests} "
            f"request(s) of {arch.context} tokens + runtime) but its node offers {size(have[worst])} "
            f"({nodes[worst].source}, less {MARGIN:.0%}); {size(max(total_short, gap))} missing; would help: "
            f"{', '.join(help_)}")
    return weights
