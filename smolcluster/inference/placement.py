"""``partition=auto``: blocks placed so each stage's weights + KV cache budget fit its node's memory.

A stage needs (bytes): its parameters in its format (:func:`bytes_per_param`), plus the KV cache of
``requests`` requests at full context for its blocks and, where it may compile its decode step
(``compile=true``, or ``auto`` where :func:`~smolcluster.inference.compiled.may_compile`), the
compiled step's slot caches (``compiled[rank]`` positions a block), plus :data:`RUNTIME_BYTES` for
Python + torch. A node offers ``cluster.nodes[i].memory_gb`` (else, for stages launched on this
machine, what this machine offers a new process, :func:`usable_memory`: ``MemAvailable``, or less
under a cgroup memory limit, shared among them), less :data:`MARGIN`. Blocks go in proportion to
what each node offers (the same min-max split as ``cluster.nodes[i].weight``), and the plan is
checked stage by stage before any weight is read: a model that fits nowhere is refused in one line
saying how much is missing and what would help.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolcluster import resources
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
                  head_first: bool, requests: int, by_memory: list[float],
                  compiled: list[int] | None = None) -> list[float]:
    """Stage weights in proportion to each node's measured speed (``cluster.nodes[i].gflops``, which the SSH
    launcher's preflight records), so stages take about equal time, when that split fits every node's memory;
    else ``by_memory`` (:func:`auto_weights`' split, already checked)."""
    n = len(gflops)
    head_rank = 0 if head_first else n - 1
    compiled = compiled or [0] * n
    for s, f, m in zip(arch.plan(n, gflops, head_first=head_first), formats, memory, strict=True):
        need = stage_bytes(arch, f, s.blocks, s.first, s.rank == head_rank, requests, compiled[s.rank])
        if need > getattr(m, "bytes", m) * (1 - MARGIN):
            return by_memory
    return list(gflops)


def stage_bytes(arch: Architecture, fmt: StageFormat, blocks: range, embed: bool, head: bool,
                requests: int, compiled_tokens: int = 0) -> int:
    none = range(0)
    ends = arch.numel(embed, head, none) * bytes_per_param(fmt, True)
    body = arch.numel(False, False, blocks) * bytes_per_param(fmt, False)
    kv = len(blocks) * kv_bytes_per_block(arch, fmt, requests * arch.context + compiled_tokens)
    return int(ends + body + kv + RUNTIME_BYTES)


@dataclass(frozen=True)
class NodeMemory:
    """Bytes a node offers its stages, and where that figure comes from (named when a model is refused)."""

    bytes: int
    source: str


def usable_memory() -> NodeMemory:
    """What this machine offers a new process: ``MemAvailable``, or, when this process runs under a cgroup
    memory limit (a container, a systemd slice, ``cgcreate``), that limit less what the cgroup already holds,
    whichever is smaller. The one count of a node's memory (:func:`smolcluster.resources.usable_bytes`, which the
    preflight runs on every node): partition=auto, an agent's advertised facts and a stage's KV default read it."""
    facts = {"ram": resources.meminfo(), "cgroup": resources.cgroup_memory()}
    have = resources.usable_bytes(facts)
    ram, cg = facts["ram"], facts["cgroup"]
    if cg and have < ram.get("available", ram.get("total", have + 1)):
        return NodeMemory(have, f"cgroup memory limit {size(cg['limit'])} at {cg['path']}, "
                                f"{size(cg['held'])} of it in use")
    return NodeMemory(have, f"MemAvailable {size(have)}")


def node_memory(cluster, n_stages: int, local: bool) -> list[NodeMemory]:
    """What each stage's node offers: ``cluster.nodes[i].memory_gb``, else (local stages) a share of what this
    machine offers (:func:`usable_memory`)."""
    out = []
    here = None
    for i in range(n_stages):
        gb = cluster.node(i).memory_gb if cluster is not None else None
        if gb is None:
            if not local:
                raise ConfigError(f"partition=auto needs cluster.nodes[{i}].memory_gb (the node's usable memory "
                                  "in GB) for a stage on another machine")
            here = here or usable_memory()
            out.append(NodeMemory(here.bytes // n_stages, f"1/{n_stages} of this machine's {here.source}"))
        else:
            out.append(NodeMemory(int(gb * (1 << 30)), f"cluster.nodes[{i}].memory_gb={gb:g}"))
    return out


def auto_weights(arch: Architecture, formats: list[StageFormat], memory: list[NodeMemory | int],
                 head_first: bool, requests: int = 1, compiled: list[int] | None = None) -> list[float]:
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
    compiled = compiled or [0] * n
    need = [stage_bytes(arch, f, s.blocks, s.first, s.rank == head_rank, requests, compiled[s.rank])
            for s, f in zip(specs, formats, strict=True)]
    have = [int(m * (1 - MARGIN)) for m in memory]
    short = [(i, need[i] - have[i]) for i in range(n) if need[i] > have[i]]
    if short:
        total_short = sum(need) - sum(have)
        worst, gap = max(short, key=lambda t: t[1])
        help_ = ["more stages"]
        slots = f" + the compiled step's KV slots ({compiled[worst]} positions)" if compiled[worst] else ""
        if formats[worst].precision == "fp32" and formats[worst].quantize == "none":
            help_.append("precision=bf16 (about half the weights)")
        if formats[worst].quantize != "int8" and formats[worst].quantize != "int4":
            help_.append("quantize=int8 (about a quarter)")
        if compiled[worst]:
            help_.append("compile=false (no compiled step's slots)")
        raise ConfigError(
            f"the model does not fit: stage {worst} needs {size(need[worst])} (weights + KV cache for {requests} "
            f"request(s) of {arch.context} tokens{slots} + runtime) but its node offers {size(have[worst])} "
            f"({nodes[worst].source}, less {MARGIN:.0%}); {size(max(total_short, gap))} missing; would help: "
            f"{', '.join(help_)}")
    return weights
