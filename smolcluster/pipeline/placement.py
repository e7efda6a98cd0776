"""``partition=auto``: blocks placed so each stage's weights + KV cache budget fit its node's memory.

A stage needs (bytes): its parameters in its format (:func:`param_bytes`), plus the KV cache of
``requests`` requests at full context for its blocks, plus :data:`RUNTIME_BYTES` for Python +
torch. A node offers ``cluster.nodes[i].memory_gb`` (else, for stages launched on this machine,
its available memory shared among them), less :data:`MARGIN`. Blocks go in proportion to what each
node offers (the same min-max split as ``cluster.nodes[i].weight``), and the plan is checked
stage by stage before any weight is read: a model that fits nowhere is refused in one line
saying how much is missing and what would help.
"""

from __future__ import annotations

from pathlib import Path

from smolcluster.errors import ConfigError
from smolcluster.pipeline.architectures import Architecture
from smolcluster.pipeline.quantize import StageFormat

RUNTIME_BYTES = 300 << 20   # Python + torch + zmq before any weight (measured ~230 MB; rounded up)
MARGIN = 0.10               # of each node's memory kept free


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


def available_bytes() -> int:
    """This machine's ``MemAvailable`` (Linux), else total RAM by sysconf."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def node_memory(cluster, n_stages: int, local: bool) -> list[int]:
    """Bytes each stage's node offers: ``cluster.nodes[i].memory_gb``, else (local stages) a share of this
    machine's available memory."""
    nodes = list(getattr(cluster, "nodes", None) or []) if cluster is not None else []
    out = []
    for i in range(n_stages):
        node = nodes[i] if i < len(nodes) and nodes[i] else {}
        gb = node.get("memory_gb")
        if gb is None:
            if not local:
                raise ConfigError(f"partition=auto needs cluster.nodes[{i}].memory_gb (the node's usable memory "
                                  "in GB) for a stage on another machine")
            out.append(available_bytes() // n_stages)
        elif not isinstance(gb, (int, float)) or isinstance(gb, bool) or gb <= 0:
            raise ConfigError(f"cluster.nodes[{i}].memory_gb={gb!r} is invalid: give a positive number of GB")
        else:
            out.append(int(gb * (1 << 30)))
    return out


def auto_weights(arch: Architecture, formats: list[StageFormat], memory: list[int], head_first: bool,
                 requests: int = 1) -> list[float]:
    """Stage weights for :meth:`Architecture.plan` so blocks go where the memory is; refuses a model that
    cannot fit (before any weight is read)."""
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
            f"the model does not fit: stage {worst} needs {need[worst] / 2**30:.2f} GB (weights + KV cache for "
            f"{requests} request(s) of {arch.context} tokens + runtime) but its node offers {have[worst] / 2**30:.2f}"
            f" GB; {max(total_short, gap) / 2**30:.2f} GB missing; would help: {', '.join(help_)}")
    return weights
