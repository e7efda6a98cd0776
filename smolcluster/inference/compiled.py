"""Compiled decode steps (``compile=true``): a stage's decode-only steps as one ``torch.compile`` graph.

A decode step's work is small matmuls (one row per request) and many small ops between them; in eager
PyTorch each op is a Python call and a kernel launch. Inductor (its CPU C++/OpenMP codegen, so the node needs
a C++ compiler) fuses the ops between the matmuls into a few loops and runs the step without the interpreter.

For that the shapes must stay fixed, as in gpt-fast: every request that can use the compiled path holds a
*slot* of one preallocated KV cache per block, ``(slots + 1, kv_heads, positions + 1, head_dim)``, and a step
writes each row's key/value at (its slot, its position) and attends over its slot's first ``seen`` positions
(the longest row's), with the positions past its own masked out. ``seen`` is the graph's one dynamic size;
otherwise it depends only on how many rows the step has, padded up to a *bucket* (1, 2, 4, ... up to
``slots``; the padding rows use the spare last slot): one graph per bucket, compiled when the stage starts,
before it serves, with a log line each. Its kernel calls are made from C++ (inductor's ``cpp_wrapper``), and
once compiled a graph is called directly, without dynamo (:class:`Graph`).

A graph covers a group of consecutive blocks (up to :data:`GROUP_BLOCKS`, :func:`group_sizes`), not the whole
stage: the blocks' weights are its inputs, so every group of a size runs through the same graph (regional
compilation, torch's own recipe for repeated layers). Compiling then costs one or two groups' graphs, several
times less than the whole stage's, for one compiled call per group in a step (``bench cpu --compile``).

The request's :class:`~smolcluster.pipeline.architectures.base.KVCache` is a view of its slot, so the eager
path (prefill chunks, speculation's several rows, prefix-cache copies, truncation) reads and writes the very
same memory and the two paths hand a request to each other at any step. A step goes through the graph when
every request in it has one row, a slot and room left in it; otherwise (a prompt chunk or speculated rows, a
request that found no free slot because more are running than ``slots``, or one that may outgrow
``positions``) the whole step runs eagerly, which reads the weights once where a split step would read them
twice (:meth:`CompiledDecode.run_step`).

Quantized stages (``quantize=int8|int4``) compile too: their kernels (``smolcluster::rows_mm``,
``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, :mod:`smolcluster.pipeline.quantize`) stay op calls
inside the graph, as ``rows_mm`` does for a float stage,
and the bf16 casts of their activations fuse into the generated loops. Inductor's other CPU options were
measured and left off (docs/benchmarks.md, quantize --decode --compile): ``freezing`` with ``max_autotune``'s
C++ GEMM templates (incl. its AVX2 bf16 x int8 micro-kernel) gained within the noise at one row, for minutes of
autotuning per shape, and they take their thread count from ``cpp.threads``, which is 1 here.

Compiled artifacts are cached on disk (inductor's FX graph cache, ``TORCHINDUCTOR_CACHE_DIR``, default
``~/.cache/smolcluster/inductor``): a stage restarted with the same shapes loads them instead of compiling.
Whether compiling pays on a CPU: ``bench quantize --decode`` has an eager-vs-compiled arm (docs/benchmarks.md).
"""

from __future__ import annotations

import inspect
import os
import time
import weakref
from pathlib import Path

import torch

# Inductor's disk cache: the user's TORCHINDUCTOR_CACHE_DIR, else ours (not /tmp, which a reboot may empty). Set
# before torch._dynamo is imported: importing it fixes the variable to inductor's default.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "smolcluster" / "inductor"))

import torch.nn.functional as F  # noqa: E402
from loguru import logger  # noqa: E402

from smolcluster.errors import ConfigError
from smolcluster.pipeline.architectures.base import Batch, KVCache
from smolcluster.pipeline.architectures.gpt2 import GPT2Stage
from smolcluster.pipeline.architectures.llama import LlamaStage, rotate_half

# (torch._dynamo and torch._inductor are imported where a stage compiles, not here: importing them costs over a
# second, which every stage would pay for compile=auto's question of whether to compile.)

# compile=auto compiles a stage where it pays. What a compiled step saves is the small ops between the matmuls
# (norms, RoPE, activations, the interpreter's call for each): about the same for every block, while the
# matmuls' cost is reading the block's weights. So it pays where blocks are light in their format (SmolLM2-135M:
# 30 blocks of 13.5 MB in fp32, 3.4 MB in int8) and not where they are heavy (GPT-2 124M's 27 MB fp32 blocks
# decode no faster compiled), and a stage too small is not worth a compile that costs about the same per graph
# whatever the model (tens of seconds cold a bucket, seconds from the cache): its eager step is already cheap.
# bench cpu --compile and bench pipeline --batching-only --compile false,true (docs/benchmarks.md).
AUTO_MIN_PARAMS = 10_000_000  # in the stage's blocks (keeps the suite's tiny models eager, too)
AUTO_MAX_BLOCK_MB = 16.0      # a block's weights in the stage's format


def unsupported(stage) -> str | None:
    """Why ``stage`` has no compiled decode step (None: it has one)."""
    if isinstance(stage, LlamaStage):
        if any(w is not None for w in stage.shape.windows):
            return "sliding-window attention (Mistral) is not compiled"
        return None
    if isinstance(stage, GPT2Stage):
        return None
    return f"{type(stage).__name__} has no compiled decode step"


def blocks_of(stage) -> list[torch.nn.Module]:
    """The stage's blocks, in order (a family :func:`unsupported` passes)."""
    return list(stage.model.layers.values() if isinstance(stage, LlamaStage) else stage.transformer.h.values())


def block_mb(stage) -> float:
    """A block's weights (parameters and buffers: packed int8/int4 and their scales) in MB, on average."""
    blocks = blocks_of(stage)
    tensors = [t for b in blocks for t in (*b.parameters(), *b.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20 / max(1, len(blocks))


def toolchain_missing() -> str | None:
    """Why this node cannot compile (None: it can): torch.compile's isolate_recompiles, and a C++ compiler for
    inductor's CPU code."""
    if "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        return f"torch {torch.__version__} lacks torch.compile's isolate_recompiles (pip install -U torch)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # (inductor's search raises when no compiler it knows is on PATH)
        return f"inductor finds no C++ compiler ({e}): install g++ (build-essential)"
    return None


def eager_reason(stage, params: int, pool_bytes: int, kv_budget: int, adapters,
                 speculates: bool = False) -> str | None:
    """Why ``compile=auto`` leaves ``stage`` eager, or None where it compiles: a CPU stage without LoRA adapters
    or speculation, of a family with a compiled step, with at least :data:`AUTO_MIN_PARAMS` parameters in its
    blocks (``params``) and blocks of at most :data:`AUTO_MAX_BLOCK_MB`, whose slot caches (``pool_bytes``) take
    at most half its KV budget, on a node that can compile."""
    if adapters:
        return "it serves LoRA adapters"
    if speculates:  # (a pass with proposals carries several rows a request: an eager step)
        return "its steps carry speculated rows (speculate.k), which run eagerly"
    if stage.device.type != "cpu":
        return f"compiled steps are built for CPU stages and this one is on {stage.device}"
    why = unsupported(stage)
    if why:
        return why
    if params < AUTO_MIN_PARAMS:
        return (f"its blocks hold {params / 1e6:.1f}M parameters, under {AUTO_MIN_PARAMS / 1e6:.0f}M: its eager "
                f"step is already cheap")
    mb = block_mb(stage)
    if mb > AUTO_MAX_BLOCK_MB:
        return (f"its blocks are {mb:.0f} MB each, over {AUTO_MAX_BLOCK_MB:.0f} MB: reading their weights outweighs "
                f"the small ops a compile saves (quantize=int8 makes them lighter)")
    if 2 * pool_bytes > kv_budget:
        return (f"the compiled step's KV slots ({pool_bytes / 2**20:.0f} MB) would take over half the KV budget "
                f"({kv_budget / 2**20:.0f} MB; serve.kv_cache_mb)")
    return toolchain_missing()


def pool_tokens(slots: int, positions: int) -> int:
    """KV positions a block's slot caches hold, :class:`CompiledDecode`'s ``ks`` / ``vs`` (one more slot and
    position than requests use): what the compiled step adds to a stage's memory, for ``compile=auto``'s check
    and ``partition=auto``'s plan."""
    return (slots + 1) * (positions + 1)


def may_compile(mode: str, arch, fmt, device: str | None, adapters, speculates: bool) -> bool:
    """Whether a stage of this config may hold a compiled step, told before any weight is read (``partition=auto``
    plans its memory): :func:`eager_reason`'s rules that the config settles, for any share of ``arch``'s blocks.
    What only the node knows (its KV budget, its compiler) counts as compiling."""
    if mode == "false":
        return False
    if mode == "true":
        return True
    from smolcluster.inference.placement import bytes_per_param

    one_block = arch.numel(False, False, range(1))
    return (not adapters and not speculates and (device or "cpu") in ("cpu", "auto")
            and not any(w is not None for w in getattr(arch.shape, "windows", ()))
            and one_block * arch.n_layer >= AUTO_MIN_PARAMS
            and one_block * bytes_per_param(fmt, False) / 2**20 <= AUTO_MAX_BLOCK_MB)


def llama_prelude(stage: LlamaStage, x, pos, size: int):
    """What a step's every Llama block shares: RoPE's cos / sin at each row's position, and each row's mask over
    its slot's ``size`` positions (its own and those before)."""
    rows = x.shape[0]
    cos, sin = stage.rope(x, pos.view(rows, 1))
    mask = (torch.arange(size, device=x.device) <= pos.view(rows, 1)).view(rows, 1, 1, size)
    return cos.unsqueeze(1), sin.unsqueeze(1), mask


def llama_blocks(blocks, x, shared, pos, slots, ks, vs):
    """Llama-shaped blocks over one row per request (``x``: (rows, 1, hidden)), writing each row's key/value
    into its slot at its position and attending over the slot's buffer up to that position. The same
    operations as ``LlamaStage.run_blocks`` in the same order, with the rows as the batch dimension."""
    cos, sin, mask = shared
    rows = x.shape[0]
    for block, kc, vc in zip(blocks, ks, vs):
        att, h = block.self_attn, block.input_layernorm(x)
        n_kv, head_dim = kc.shape[1], kc.shape[3]
        shape = (rows, 1, -1, head_dim)
        q, k = att.q_proj(h).view(shape), att.k_proj(h).view(shape)
        if hasattr(att, "q_norm"):
            q, k = att.q_norm(q), att.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), att.v_proj(h).view(shape).transpose(1, 2)
        q, k = (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
        kc[slots, :, pos] = k[:, :, 0]
        vc[slots, :, pos] = v[:, :, 0]
        # One query per request: each kv head's group of query heads as its sequence (as the eager path does
        # for a single query with a mask), so grouped-query attention needs no repeated keys.
        q = q.reshape(rows, n_kv, att.groups, head_dim)
        seen = mask.shape[-1]
        out = F.scaled_dot_product_attention(q, kc.narrow(2, 0, seen)[slots],
                                             vc.narrow(2, 0, seen)[slots], attn_mask=mask, scale=att.scaling)
        x = x + att.o_proj(out.reshape(rows, 1, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    return x


def gpt2_prelude(stage: GPT2Stage, x, pos, size: int):
    rows = x.shape[0]
    return ((torch.arange(size, device=x.device) <= pos.view(rows, 1)).view(rows, 1, 1, size),)


def gpt2_blocks(blocks, x, shared, pos, slots, ks, vs):
    """GPT-2 blocks over one row per request, as :func:`llama_blocks` (``GPT2Stage.run_blocks``'s operations)."""
    (mask,), rows, hidden = shared, x.shape[0], x.shape[2]
    for block, kc, vc in zip(blocks, ks, vs):
        att, n_head = block.attn, kc.shape[1]
        q, k, v = (t.view(rows, 1, n_head, hidden // n_head).transpose(1, 2)
                   for t in att.c_attn(block.ln_1(x)).chunk(3, dim=2))
        kc[slots, :, pos] = k[:, :, 0]
        vc[slots, :, pos] = v[:, :, 0]
        seen = mask.shape[-1]
        out = F.scaled_dot_product_attention(q, kc.narrow(2, 0, seen)[slots],
                                             vc.narrow(2, 0, seen)[slots], attn_mask=mask, scale=att.scaling)
        x = att.c_proj(out.transpose(1, 2).reshape(rows, 1, hidden)) + x
        # serving's tanh GELU (gpt2.gelu_new in inference mode), named here: the graph has no inference-mode branch
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh"))
    return x


# The compiled graph covers this many consecutive blocks at most, and every group of its size reuses it (its
# blocks' weights are the graph's inputs, not constants): compiling scales with the group, not the stage (a
# 30-block stage compiles one 6-block graph), and a step makes one graph call per group. A group of 8 keeps
# those calls few; bench cpu --compile prints the compile time and the tokens/s (docs/benchmarks.md).
GROUP_BLOCKS = 8


def group_sizes(n_blocks: int) -> list[int]:
    """The stage's blocks in consecutive groups of at most :data:`GROUP_BLOCKS`, with as few distinct sizes as
    keep the calls few: equal groups where a divisor from 4 up does it (30: 6 x 5, one graph a bucket), else
    the fewest groups of two sizes (11: 6 + 5, 19: 7 + 7 + 5; two graphs a bucket)."""
    if n_blocks <= GROUP_BLOCKS:
        return [n_blocks] if n_blocks else []
    equal = next(g for g in range(GROUP_BLOCKS, 0, -1) if n_blocks % g == 0)
    if 2 * equal >= GROUP_BLOCKS:
        return [equal] * (n_blocks // equal)
    count = -(-n_blocks // GROUP_BLOCKS)
    size = -(-n_blocks // count)
    return [size] * (count - 1) + [n_blocks - size * (count - 1)]


def buckets_up_to(slots: int) -> list[int]:
    """Row counts a graph is compiled for: powers of two below ``slots``, and ``slots``."""
    out = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    return [*out, slots]


# What a group's call passes the graph, by position: the step's values (x, pos, slots, the attended length, then the
# prelude's tensors) or, for the weights and KV caches, a group's block j's tensor or its j-th cache.
X, POS, SLOTS, SIZE, SHARED = range(5)


def group_tensors(blocks, ks, vs) -> dict:
    """A group's weights and KV caches by their place among a graph's inputs: ``("block", j, name)``, ``("k", j)``,
    ``("v", j)``."""
    out = {("block", j, name): t for j, b in enumerate(blocks) for name, t in (*b.named_parameters(), *b.named_buffers())}
    out.update({("k", j): t for j, t in enumerate(ks)})
    out.update({("v", j): t for j, t in enumerate(vs)})
    return out


class Graph:
    """A compiled group graph called without dynamo.

    Through ``torch.compile`` every call of a group enters dynamo: it matches the frame against its compiled
    graphs, then walks the blocks' modules for the ~100 weights the graph takes as inputs, in Python, every step.
    A step's shape is ours to know (its bucket, its group's size), so once dynamo has compiled a graph, the
    stage keeps what its backend produced (AOTAutograd's and inductor's compiled function, the very callable
    dynamo would run) and calls it with the same inputs in the same order: the weights and caches of a group
    looked up once, the step's few tensors put in their places each call. That cut a step's time by a tenth
    (fp32) to a fifth (int8; the two paths A/B in one process, docs/benchmarks.md's cpu section). What the guards
    checked holds by construction: a step's rows are a bucket's (:meth:`CompiledDecode.run`), its length within
    the slots' positions (:meth:`CompiledDecode.fits`), its input in the stage's dtype (:meth:`CompiledDecode.step`),
    every group of a size compiled to the one graph (:meth:`CompiledDecode.warm` sends each through dynamo, and a
    second graph for a size is not called directly), and each block's weights are inputs of the graph, not
    constants in it (:meth:`order_of`); inductor itself asserts each input's sizes and strides.

    ``order``: for each graph input, where it comes from: ``("block", j, name)`` (the group's block j's
    parameter or buffer), ``("k" | "v", j)`` (its j-th KV cache), or one of the step's values (``X`` ...
    ``SHARED + j``)."""

    def __init__(self, fn, order: list):
        self.fn, self.order = fn, order
        self.bound: dict[int, tuple[list, list[tuple[int, int]]]] = {}  # group start -> (inputs, step's places)

    @staticmethod
    def order_of(gm, inputs, blocks, x, shared, pos, slots, ks, vs) -> list | None:
        """Where each of the graph's example ``inputs`` (the very tensors of the call dynamo compiled it from)
        comes from; None (dynamo then keeps calling the graph) if one is not the call's, or if the graph does not
        take every block's weights the same way as inputs: with weights held inside it (inductor's ``freezing``),
        or one tensor shared by two blocks (dynamo passes it once), a call for another group would run this
        group's weights."""
        if any(True for _ in gm.named_parameters()) or any(True for _ in gm.named_buffers()) or \
                any(n.op == "get_attr" for n in gm.graph.nodes):
            return None
        known = {id(t): place for place, t in group_tensors(blocks, ks, vs).items()}
        known.update({id(x): X, id(pos): POS, id(slots): SLOTS})
        known.update({id(t): SHARED + j for j, t in enumerate(shared)})
        order = [SIZE if isinstance(t, torch.SymInt) else known.get(id(t)) for t in inputs]
        if None in order or order.count(SIZE) > 1:
            return None
        names = [{o[2] for o in order if isinstance(o, tuple) and o[0] == "block" and o[1] == j}
                 for j in range(len(blocks))]
        return order if names[0] and all(n == names[0] for n in names) else None

    def bind(self, start: int, blocks, ks, vs) -> tuple[list, list[tuple[int, int]]]:
        """The inputs of the group from block ``start``: its weights and caches in place, and the places of the
        step's values."""
        if start not in self.bound:
            tensors = group_tensors(blocks, ks, vs)
            self.bound[start] = ([None if isinstance(o, int) else tensors[o] for o in self.order],
                                 [(i, o) for i, o in enumerate(self.order) if isinstance(o, int)])
        return self.bound[start]

    def __call__(self, start: int, blocks, ks, vs, step: tuple) -> torch.Tensor:
        inputs, places = self.bind(start, blocks, ks, vs)
        inputs = list(inputs)
        for i, o in places:
            inputs[i] = step[o]
        return self.fn(*inputs)[0]


class Capture:
    """``CompiledDecode``'s dynamo backend, holding it weakly (see its ``fn``)."""

    def __init__(self, owner: CompiledDecode):
        self.owner = weakref.ref(owner)

    def __call__(self, gm, example_inputs):
        owner = self.owner()
        if owner is None:  # (its stage is gone: nothing will call this graph directly)
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True})
        return owner.capture(gm, example_inputs)


class CompiledDecode:
    """A stage's compiled decode step and the slot caches it writes (see the module's docstring)."""

    def __init__(self, stage, slots: int, positions: int, dtype: torch.dtype, device, buckets: list[int] | None = None):
        why = unsupported(stage) or toolchain_missing()
        if why:
            raise ConfigError(f"compile=true: {why}; set compile=false (or auto) for this stage")
        s, self.layers = stage.shape, blocks_of(stage)
        if isinstance(stage, LlamaStage):
            kv_heads, head_dim, self.hidden = s.n_kv_head, s.head_dim, s.hidden
            prelude, blocks = llama_prelude, llama_blocks
        else:
            kv_heads, head_dim, self.hidden = s.n_head, s.n_embd // s.n_head, s.n_embd
            prelude, blocks = gpt2_prelude, gpt2_blocks
        if slots < 1 or positions < 2:
            raise ConfigError(f"compile_slots={slots}, compile_positions={positions}: at least 1 slot of 2 positions")
        if buckets and max(buckets) < slots:
            raise ConfigError(f"compiled buckets {buckets}: the largest must be at least compile_slots={slots} "
                              f"(a step of every slot must have a graph)")
        self.stage, self.slots, self.positions, self.device, self.dtype = stage, slots, positions, device, dtype
        self.buckets = sorted(buckets) if buckets else buckets_up_to(slots)  # (the largest must be >= slots)
        n = len(stage.blocks)
        # One slot more than requests may hold: the padding rows of a bucket write there. One position more than a
        # request may use: a step's slice of the first `seen` positions is then never the whole buffer, which the
        # graph would otherwise specialize on (a contiguity check) and recompile for.
        with torch.inference_mode():
            self.ks = [torch.zeros(slots + 1, kv_heads, positions + 1, head_dim, dtype=dtype, device=device)
                       for _ in range(n)]
            self.vs = [torch.zeros_like(k) for k in self.ks]
        self.free = list(range(slots))
        # Telemetry: the pool is held from the start (the beacon's compiled_kv_bytes); a request in a slot counts
        # its positions written, not the slot's whole length (which would overstate kv_bytes past the budget).
        self.nbytes = sum(t.numel() * t.element_size() for t in self.ks + self.vs)
        self.per_token = 2 * sum(k[0, :, 0].numel() * k.element_size() for k in self.ks)
        self.steps = 0  # decode steps that ran compiled (the beacon shows it)
        self.cache_dir = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        # (imported here, not at the top: see the imports; `as` names, so `torch` stays the module's global here)
        import torch._dynamo as _dynamo  # noqa: F401 (step() calls torch._dynamo.mark_dynamic)
        import torch._inductor.config as inductor

        inductor.fx_graph_cache = True
        # Weights stay graph inputs (one graph serves every group of a size): freezing would fold them into it.
        inductor.freezing = False
        # The generated loops single-threaded: a decode step's are a few thousand elements, too few to repay an
        # OpenMP fork/join, which an oversubscribed machine makes far worse; the matmuls (MKL) and attention keep
        # the stage's threads (bench quantize --decode --compile, docs/benchmarks.md).
        inductor.cpp.threads = 1
        # One graph per bucket and group size, and no more: a shape outside them would recompile mid-serving (fits()
        # keeps them out).
        self.prelude, self.groups = prelude, group_sizes(n)
        # The backend is inductor's (compile_fx, what torch.compile's default calls), kept by capture() to be called
        # without dynamo. cpp_wrapper: the graph's kernel calls from generated C++, not a generated Python function
        # (a 6-block int8 group makes ~150 calls a step, each a Python line and an allocation there).
        # isolate_recompiles: this stage's graphs in a cache of their own, not shared through the function with
        # another CompiledDecode in the process (a test's, a bench's). Its limit leaves room for a graph the
        # warm-up missed (step() compiles it rather than fail).
        # (The backend holds this object weakly: dynamo's cache keeps its backend for the process's life, and a
        # strong reference would keep the stage's weights and slots with it.)
        self.fn = torch.compile(blocks, backend=Capture(self), dynamic=False, fullgraph=True,
                                isolate_recompiles=True,
                                recompile_limit=2 * len(self.buckets) * len(set(self.groups)) + 8)
        self.graphs: dict[tuple[int, int], Graph | None] = {}  # (rows, group size) -> its graph (None: via dynamo)
        self.compiling: tuple | None = None  # ((rows, group size), the call's arguments) while dynamo compiles
        self.warmed = False
        self.missed = 0  # group calls after warm-up with no graph yet (each compiled then, with a warning)

    def capture(self, gm, example_inputs):
        """dynamo's backend (through :class:`Capture`): inductor's compiled function for this graph, kept (with
        where each of its inputs comes from) for the step's shape to be called directly from now on."""
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True})
        if self.compiling is not None:
            key, args = self.compiling
            order = Graph.order_of(gm, example_inputs, *args)
            if key in self.graphs or order is None:  # (not expected: then dynamo keeps calling these groups)
                why = ("a second graph was compiled for groups of that size: they differ, and one graph cannot "
                       "serve them all" if key in self.graphs else "its inputs are not its blocks' weights alone")
                logger.warning(f"compiled decode: {key[0]} row(s) x {key[1]} block(s) are called through dynamo: {why}")
                self.graphs[key] = None
            else:
                self.graphs[key] = Graph(fn, order)
        return fn

    def step(self, x: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, seen: int) -> torch.Tensor:
        """The blocks over one row per request (``x``: (1, rows, hidden)), a compiled group at a time, attending
        over the first ``seen`` positions of each slot (past every row's position)."""
        rows, i = x.shape[1], 0
        x = x.to(self.dtype).view(rows, 1, -1)  # (the graphs were compiled for the stage's dtype)
        shared = self.prelude(self.stage, x, pos, max(seen, 2))  # (2 at least: dynamo specializes a size of 0 or 1)
        step = [x, pos, slots, shared[-1].shape[-1], *shared]  # (every prelude's mask comes last)
        for g in self.groups:
            blocks, ks, vs = tuple(self.layers[i:i + g]), tuple(self.ks[i:i + g]), tuple(self.vs[i:i + g])
            graph = self.graphs.get((rows, g)) if self.warmed else None  # (warm-up: every group through dynamo)
            if graph:
                step[X] = graph(i, blocks, ks, vs, step)
            else:
                step[X] = self.compile_group(rows, g, blocks, step[X], shared, pos, slots, ks, vs)
            i += g
        return step[X].view(1, rows, -1)

    def compile_group(self, rows: int, g: int, blocks, x, shared, pos, slots, ks, vs) -> torch.Tensor:
        """A group's call through dynamo, which compiles its graph (capture() keeps it) the first time."""
        # The mask's length is the graph's one dynamic size: a step reads its slots' positions up to the longest
        # request's, not the slot's whole buffer (at 512 positions that was a third of an int8 step), and one
        # graph serves every length.
        torch._dynamo.mark_dynamic(shared[-1], 3, min=2, max=self.positions)
        if self.warmed and (rows, g) not in self.graphs:  # (a shape the warm-up did not compile: once, now)
            logger.warning(f"compiled decode: a step of {rows} row(s) x {g} block(s) had no graph; compiling one")
            self.missed += 1
        self.compiling = ((rows, g), (blocks, x, shared, pos, slots, ks, vs))
        try:
            return self.fn(blocks, x, shared, pos, slots, ks, vs)
        finally:
            self.compiling = None

    def warm(self, name: str) -> None:
        """Compile every bucket's graph now, before the stage serves (a step then never waits on a compiler)."""
        for rows in self.buckets:
            logger.info(f"{name}: compiling the decode step for {rows} row(s) x {self.positions} positions "
                        f"(inductor; once per shape, then from the cache in {self.cache_dir})...")
            t0 = time.perf_counter()
            # Every input an inference tensor, as a serving step's are: the graph's guards check a tensor's
            # dispatch keys, and one made outside inference mode would have the first real step recompile.
            with torch.inference_mode():
                pad = torch.full((rows,), self.slots, dtype=torch.long, device=self.device)
                self.step(torch.zeros(1, rows, self.hidden, dtype=self.dtype, device=self.device),
                          torch.zeros(rows, dtype=torch.long, device=self.device), pad, self.positions)
            logger.info(f"{name}: decode step for {rows} row(s) ready in {time.perf_counter() - t0:.1f}s")
        self.warmed = True

    def cache(self, n_layers: int, limit: int, slack: int) -> KVCache | None:
        """A request's KV cache in a free slot (None: none free, or it may outgrow the slots' positions)."""
        if not self.free or limit > self.positions:
            return None
        slot = self.free.pop()
        cache = KVCache(n_layers, limit, slack)
        cache.keys = [k[slot:slot + 1] for k in self.ks]
        cache.values = [v[slot:slot + 1] for v in self.vs]
        cache.slot = slot
        return cache

    def release(self, cache: KVCache) -> None:
        """A request's slot is free again (its cache is gone with it)."""
        slot = getattr(cache, "slot", None)
        if slot is not None:
            cache.slot = None
            self.free.append(slot)

    def backed(self, c: KVCache) -> bool:
        """Whether a request's cache is in its slot's memory (a cache that reallocated has left it)."""
        slot = getattr(c, "slot", None)
        return slot is not None and c.keys[0] is not None and c.keys[0].data_ptr() == self.ks[0][slot].data_ptr()

    def cache_bytes(self, c: KVCache) -> int:
        """A request's KV bytes: its positions in the slot, or its own buffers once it has left the slot."""
        return c.length * self.per_token if self.backed(c) else c.nbytes()

    def fits(self, c: KVCache, rows: int) -> bool:
        """A request's rows the graph covers: one row, in its slot, with a position left there."""
        return rows == 1 and c.length < self.positions and self.backed(c)

    def run_step(self, x: torch.Tensor, batch: Batch, eager) -> torch.Tensor:
        """A step over ``x``: through the graph when :meth:`fits` covers every request, else wholly through
        ``eager`` (the stage's own ``run_blocks``, on the same slot memory).

        Not split between the two: a decode step's cost is reading the weights, and a split step reads them
        twice, once per path: with more requests running than slots, split steps lost to eager ones by far
        (``bench pipeline --batching-only --compile false,true``, docs/benchmarks.md)."""
        if all(self.fits(c, n) for c, n in zip(batch.caches, batch.sizes)):
            return self.run(x, batch)
        return eager(x, batch)

    def run(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The compiled step over ``x`` (one row per request of ``batch``, each :meth:`fits`); each cache
        advances one position."""
        rows = len(batch.caches)
        bucket = next(b for b in self.buckets if b >= rows)
        slots = [c.slot for c in batch.caches] + [self.slots] * (bucket - rows)
        pos = [c.length for c in batch.caches] + [0] * (bucket - rows)
        if bucket > rows:
            x = torch.cat([x, x.new_zeros(1, bucket - rows, x.shape[2])], dim=1)
        out = self.step(x, torch.tensor(pos, device=self.device), torch.tensor(slots, device=self.device),
                        max(pos) + 1)
        for c in batch.caches:
            c.hi = [h + 1 for h in c.hi]
            c.length += 1
        self.steps += 1
        return out[:, :rows] if bucket > rows else out
