"""An inference stage: requests flow through this stage's layers, each with its own KV cache.

    python -m smolcluster.inference.stage STAGE.json    # what a local launch runs per stage
    python -m smolcluster.infer role=stage rank=N ...  # the same on a cluster node, from Hydra config

A stage imports torch, numpy and zmq, never ``transformers``, and reads only its own
tensors from the model's files, so its memory is its share of the model. It speaks every
family in ``smolcluster.pipeline.architectures``, told which by the model's ``config.json``.

The token loop, batched (continuous batching). A head (the caller's process) sends ``submit``
(the prompt's ids and sampling settings) to stage 0, which admits it when every stage's KV-cache
budget has room for its prompt plus ``max_new_tokens`` (else it waits, in arrival order: memory is
reserved up front, so a stage never runs out mid-answer). Stage 0 then runs *steps*: one forward
over every running request's next token (decode) plus at most ``prefill_chunk`` tokens of prompts
(chunked prefill: a long prompt joins in slices, so it delays the running decodes by one chunk's
forward per step at most). The rows are concatenated, each request with its own position and its
own KV cache (:class:`~smolcluster.pipeline.architectures.base.Batch` says why ragged); requests join
at the next step and leave at any step. Each stage hands the step's output to the next
(``hidden``: the rows' request ids and sizes; a request's first rows also introduce it, so no
stage can hear of a request late). The stage holding the head (ln_f + LM head) picks each finished
row's token (greedy, or sampled with the request's own seeded generator, so a request's tokens do
not depend on what else is in the batch), streams it to the head that asked (``token``), and hands
the step's results to stage 0 (``step``), which schedules the next step. Where the head sits:

- ``head_first`` (default): on stage 0, beside the embedding it is tied to, so the
  embedding is held once; the last stage sends its hidden state back round the ring.
- otherwise on the last stage (as in training), which then holds its own copy.

Both cost the same hops per token. With ``speculate.k``, stage 0 proposes tokens after a decode's last one
and the step carries them as more rows of that request (with ``head=last``, and its ``drafts`` field, to the
last stage); the head keeps what the target agrees with, the results tell stage 0 how many (``kept``), and
the next step's ``trim`` cuts the rejected rows from every stage's cache (speculate.py).
A request ends on any of its EOS ids, ``max_new_tokens``, or the
context (when feeding the token back would need position ``n_positions``), or when its head cancels it
(the head tells every stage) or goes away; every stage then frees its cache at once. Two or more
steps can be in flight round the ring at once (requests that joined while one was out), which keeps
every stage busy.

What crossing a stage costs per token (traced on one gpt2-tiny request, docs/benchmarks.md): zmq's
thread hand-offs (a hop wakes the sender's and the receiver's I/O threads and the receiving loop,
~0.1-0.15 ms on a busy 2-core machine) far more than the wire's encode and checks (~5 and ~10 us),
then the interpreter: Python is ~40% of a stage's CPU. So the loop keeps per-token work small: the
beacon is refreshed a few times per heartbeat, not per turn, a step of decodes skips the row gather,
greedy rows take their tokens from one argmax, and the stage's modules are pinned as plain attributes
(:func:`~smolcluster.pipeline.architectures.base.pin_attributes`); the wire packs headers with one
reusable msgpack Packer (a Packer per message mapped and unmapped 256 KiB under the stages' fixed mmap
threshold).
"""

from __future__ import annotations

import json
import sys
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from smolcluster.errors import ConfigError, PeerError, SmolclusterError
from smolcluster.inference.adapters import adapter_numel, attach, unknown_adapter
from smolcluster.inference.prefix import PrefixCache, chain, root_key
from smolcluster.inference.sampling import SamplingParams, make_generator, next_token
from smolcluster.launch.cli import command
from smolcluster.launch.threads import threads_each
from smolcluster.pipeline.architectures import KVCache, family_for
from smolcluster.pipeline.architectures.base import Batch, pin_attributes
from smolcluster.pipeline.mesh import Envelope, Mesh, PeerLost
from smolcluster.pipeline.partition import stage_name
from smolcluster.pipeline.protocol import REQUEST_FIELDS
from smolcluster.pipeline.quantize import StageFormat, kernels, resolve_device
from smolcluster.pipeline.weights import load_stage

TURNS_MIN_PARAMS = 16_000_000  # co-located stages take turns with all cores from this stage size (parameters)
_CLOSED_MEMORY = 10_000  # finished request ids remembered, so their stragglers are dropped quietly


@dataclass
class ServeConfig:
    """Everything one inference stage needs; JSON-serialisable so a launcher can hand it over."""

    rank: int
    n_stages: int
    weights: str                      # a Hugging Face model directory or a whole-model .safetensors file
    config: dict                      # the model's config.json (the architecture and its shape)
    nodes: list[dict]                 # every stage: {"address": connect address, "bind": bind address}
    head_first: bool = True
    stage_weights: list[float] | None = None
    heartbeat_s: float = 1.0
    liveness_s: float = 10.0
    connect_timeout_s: float = 60.0
    max_bytes: int = 2 << 30
    keys_dir: str | None = None
    exit_with_head: bool = False      # started by a head: exit when it is gone (or never comes)
    threads: int | None = None
    max_requests: int = 64            # requests running at once; more wait at stage 0
    max_waiting: int = 256            # requests waiting for room; more are refused ("retry later")
    kv_cache_mb: float | None = None  # KV-cache budget per stage; None: a quarter of this node's memory
    prefill_chunk: int = 256          # prompt tokens per step at most (chunked prefill)
    stream_interval_ms: float = 20.0  # a request's tokens reach its head at most this often (0: each at once)
    co_located: bool = False          # every stage shares this one machine's cores (see StageServer.turns)
    turns: bool | None = None         # take turns with all cores on one step; None: when co-located and large
    log_level: str | None = None      # None: SMOLCLUSTER_LOG_LEVEL or INFO
    precision: str = "fp32"           # fp32 | bf16 | fp16: weights, KV cache and the activations sent
    quantize: str = "none"            # none | int8 | int4 (weight-only, applied as the stage loads)
    quantize_group: int = 64          # int4's group size (32 | 64 | 128)
    device: str | None = None         # cpu | cuda | cuda:N | mps | auto (None: cpu)
    adapters: dict = field(default_factory=dict)  # LoRA adapters a request may name: {name: PEFT directory}
    speculate: dict = field(default_factory=dict)  # {"k", "lookup", "draft", ...}: settings.Speculate.fields() ({}: off)
    prefix_cache: bool = True         # keep served prefixes' KV for requests that start with them (prefix.py)
    prefix_block: int = 32            # ... in blocks of this many tokens
    compile: str = "false"            # decode-only steps through torch.compile: true | false | auto (compiled.py)
    compile_slots: int = 4            # ... requests holding a static KV slot (the largest compiled step)
    compile_positions: int = 512      # ... positions per slot (a longer request decodes eagerly)
    extra: dict = field(default_factory=dict)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))


@dataclass
class RequestState:
    head: str
    cache: KVCache
    params: SamplingParams
    max_new_tokens: int
    eos: list[int]                    # generation stops at any of these
    prompt_len: int
    generated: int = 0
    generator: torch.Generator | None = None  # sampled: the head's; head=last, on stage 0: the draft model's
    prompt: np.ndarray | None = None  # stage 0: the prompt, fed in chunks
    fed: int = 0                      # stage 0: prompt tokens sent into the pipeline so far
    reserved: list[int] = field(default_factory=list)  # stage 0: KV bytes held for it on each stage
    adapter: str = ""                 # the LoRA adapter its rows go through ("": none)
    drafter: str = "off"              # stage 0: lookup | draft | off (speculate.py)
    history: list[int] | None = None  # stage 0, speculating or caching prefixes: the prompt and every token made
    drafts: list[int] = field(default_factory=list)  # stage 0 and the head's: the proposals out in its current step
    q: torch.Tensor | None = None     # ... and their drafter's probabilities (None: point masses)
    trim: int | None = None           # stage 0: cut every stage's cache to this length before its next step
    pace: object = None               # stage 0: its running acceptance (speculate.Pace: speculate.adaptive)
    sent_at: float = 0.0              # stage 0: when its proposals were made (a pass's time: Speculator.choose_k)
    drafted: int = 0                  # stage 0: proposals made for it, and kept (its acceptance rate)
    accepted: int = 0
    keys: list[str] = field(default_factory=list)  # stage 0: its tokens' prefix-cache chain (prefix.py)
    stored: int = 0                   # stage 0: its blocks offered to the prefix cache so far
    reused: list[str] = field(default_factory=list)  # stage 0: the blocks it starts from, until its intro names them
    introduced: bool = False          # stage 0: its first rows have left (with its intro)


def check_intro(req, intro, src: str, block: int = 0) -> None:
    """A request's intro (``mp.hidden``'s ``intro[req]``) typed as :data:`protocol.REQUEST_FIELDS` says: the wire
    checks a message's own fields, not what nests in them, and a wrong type would fail deep in a step. Its
    ``prefix`` names block keys (``block`` tokens each) short of its prompt (whose last token is always fed)."""
    if not isinstance(intro, dict):
        raise PeerError(f"{src} introduced request {req!r} with {type(intro).__name__}, not a dict of "
                        "its settings: every stage must run the same smolcluster version")
    for key, kind in REQUEST_FIELDS.items():
        value = intro.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise PeerError(f"{src} introduced request {req!r} with {key}={value!r} ({key} must be {want}): every "
                            "stage must run the same smolcluster version")
    keys = intro["prefix"]
    if not all(isinstance(k, str) for k in keys) or (keys and len(keys) * block >= intro["prompt_len"]):
        raise PeerError(f"{src} introduced request {req!r} with prefix={keys!r}: it must name block keys (str) of "
                        f"fewer than its {intro['prompt_len']} prompt tokens ({block} a block); every stage must run "
                        "the same smolcluster version")


def node_memory_bytes() -> int:
    """What this node offers a stage, counted as placement, the preflight and the agents count it (within its
    cgroup's limit): the KV budget's default is a quarter of it."""
    from smolcluster.inference.placement import usable_memory

    return usable_memory().bytes


@dataclass
class Step:
    """One forward's rows: ``sizes[i]`` tokens of ``reqs[i]``; ``emit[i]``: they end its prompt or are a
    decode, so the head picks a token from its last row (else a prompt chunk, more to come)."""

    reqs: list[str]
    sizes: list[int]
    emit: list[bool]
    intro: dict = field(default_factory=dict)  # req -> what a later stage needs to start it
    trim: dict = field(default_factory=dict)   # req -> its cache's length before these rows (rejected proposals cut)
    prefix: list = field(default_factory=list)  # stage 0's prefix-cache decisions, replayed first (prefix.py)
    drafts: dict = field(default_factory=dict)  # head=last: req -> its proposals, for the last stage to check
    q: dict = field(default_factory=dict)       # ... req -> their draft model's probabilities (sampled; tensor q)

    def fields(self) -> dict:
        return {"reqs": self.reqs, "sizes": self.sizes, "emit": self.emit, "intro": self.intro, "trim": self.trim,
                "prefix": self.prefix, "drafts": self.drafts, "sampled": list(self.q)}

    def only(self, keep: list[int]) -> Step:
        """The step with only rows groups ``keep`` (the others' requests were cancelled here)."""
        reqs = [self.reqs[i] for i in keep]
        return Step(reqs, [self.sizes[i] for i in keep], [self.emit[i] for i in keep],
                    *({r: v for r, v in d.items() if r in reqs} for d in (self.intro, self.trim)), self.prefix,
                    *({r: v for r, v in d.items() if r in reqs} for d in (self.drafts, self.q)))


class StageServer:
    def __init__(self, sc: ServeConfig):
        self.sc = sc
        if sc.threads:
            torch.set_num_threads(sc.threads)
        self.arch = family_for(sc.config)
        self.specs = self.arch.plan(sc.n_stages, sc.stage_weights, head_first=sc.head_first)
        self.spec = self.specs[sc.rank]
        self.head_rank = 0 if sc.head_first else sc.n_stages - 1
        self.has_head = sc.rank == self.head_rank
        self.fmt = StageFormat(sc.precision, sc.quantize, sc.quantize_group, resolve_device(sc.device))
        self.stage = load_stage(sc.weights, sc.config, self.spec.blocks, embed=self.spec.first, head=self.has_head,
                                fmt=self.fmt)
        self.lora = attach(self.stage, sc.config, sc.adapters, self.stage.device)  # None without adapters
        pin_attributes(self.stage)  # loaded for good: nn.Module's attribute lookups cost ~1-1.5 us each otherwise
        # Activations arrive in whatever type the sender computes in; this stage computes in its own.
        self.device, self.dtype = self.stage.device, self.stage.compute_dtype
        # Stages sharing one machine take turns, each with all its cores, on one step of every running request,
        # when a stage is big enough for threads to pay (GPT-2 124M in bench pipeline: 1.11x of generate for one
        # request and 1.30x of padded generate at 8 in flight, against 0.62x and 0.79x with one thread each;
        # gpt2-tiny, whose forward is ~0.4 ms, lost a third that way: docs/benchmarks.md). Otherwise, as on separate
        # machines, each has its share of the cores and they work on n_stages steps at once.
        largest = max(self.arch.numel(s.first, r == self.head_rank, s.blocks) for r, s in enumerate(self.specs))
        self.turns = sc.turns if sc.turns is not None else sc.co_located and largest >= TURNS_MIN_PARAMS
        if sc.co_located and not self.turns and not sc.threads:
            torch.set_num_threads(threads_each(sc.n_stages, torch.get_num_threads()))
        self.names = [stage_name(r) for r in range(sc.n_stages)]
        self.me = self.names[sc.rank]
        self.requests: dict[str, RequestState] = {}
        self.closed: OrderedDict[str, str] = OrderedDict()
        # Stage 0's schedule: decodes due (request -> its last token), prompts with chunks left, requests whose
        # step is out round the ring, requests waiting for KV room (their submit's fields), and the KV bytes
        # reserved per stage.
        self.due: dict[str, int] = {}
        self.prefilling: deque[str] = deque()
        self.out: set[str] = set()
        self.forwards = self.rows = 0  # this stage's forwards (steps) and the rows they carried
        self.mixed = 0  # steps whose rows went through more than one adapter (or one and the base): multi-LoRA
        self.waiting: deque[tuple[str, str, dict, np.ndarray]] = deque()
        self.reserved = [0] * sc.n_stages
        # The budget is the same number on every stage; stage 0 reserves against each stage's own
        # bytes per position (its share of the blocks), in the stage's dtype (its parameters').
        budget_mb = sc.kv_cache_mb if sc.kv_cache_mb else node_memory_bytes() / 4 / 2**20
        self.kv_budget = int(budget_mb * 2**20)
        element = next(self.stage.parameters()).element_size()
        self.kv_per_token = [self.arch.kv_bytes_per_token(len(sp.blocks), element) for sp in self.specs]
        self.compiled, self.compile_note = self.open_compiled()
        # Tokens made and not yet streamed, per request: its head, [(token, index, made at)], done, reason
        self.to_heads: dict[str, list] = {}
        self.stream_s = max(0.0, float(sc.stream_interval_ms)) / 1000
        self.heads: set[str] = set()
        self.stopping = False
        params = sum(p.numel() for p in self.stage.parameters())
        lora = f"; adapters {', '.join(sc.adapters)}: {adapter_numel(self.stage):,} params" if sc.adapters else ""
        logger.info(f"{self.spec.describe(self.has_head, self.spec.first)}: {params:,} params from {sc.weights} "
                    f"({self.fmt.precision}, quantize={self.fmt.quantize}, on {self.fmt.device}; "
                    f"matmuls: {kernels(self.fmt)}{lora}; {torch.get_num_threads()} intra-op thread(s)"
                    f"{', taking turns' if self.turns else ''}; {self.compiled_line()})")
        if self.compiled is not None:
            self.compiled.warm(self.me)
        # Prometheus for smolcluster.top (telemetry/serving.py): set once per step, a no-op without a port
        from smolcluster.telemetry.logging import identity
        from smolcluster.telemetry.serving import open_serving_metrics

        self.metrics = open_serving_metrics(sc.extra.get("telemetry"), identity(), sc.rank, self.kv_budget)
        self.speculator = self.open_speculator()
        self.prefix = self.open_prefix()

    def open_compiled(self):
        """The compiled decode step and its slot caches (None when off), and what ``compile=auto`` decided (or "")."""
        sc = self.sc
        mode = sc.compile  # (settings.compile_mode's, said by the head)
        if mode not in ("true", "auto"):
            return None, ""
        from smolcluster.inference import compiled

        positions = min(sc.compile_positions, self.arch.context)
        if mode == "auto":
            params = self.arch.numel(False, False, self.spec.blocks)
            pool = compiled.pool_tokens(sc.compile_slots, positions) * self.kv_per_token[sc.rank]
            why = compiled.eager_reason(self.stage, params, pool, self.kv_budget, sc.adapters, bool(sc.speculate))
            if why:
                return None, f"compile=auto: eager, {why}"
        elif sc.adapters:
            raise ConfigError("compile=true compiles stages without LoRA adapters for now; this stage has adapters: "
                              "set compile=false (or auto)")
        note = "compile=auto: compiled" if mode == "auto" else ""
        return compiled.CompiledDecode(self.stage, sc.compile_slots, positions, self.dtype, self.device), note

    def compiled_line(self) -> str:
        """What the startup line says of the compiled path (and why, for compile=auto)."""
        c, why = self.compiled, f" ({self.compile_note})" if self.compile_note else ""
        if c is None:
            return f"compiled decode: off{why}"
        return (f"compiled decode: on{why}, steps of {'/'.join(map(str, c.buckets))} rows, {c.slots} slots of "
                f"{c.positions} positions")

    def run_blocks(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The stage's blocks over a step: the requests the compiled graph covers through it, the rest eagerly."""
        if self.compiled is not None:
            return self.compiled.run_step(x, batch, self.stage.run_blocks)
        return self.stage.run_blocks(x, batch)

    def open_speculator(self):
        """Stage 0's drafters when ``speculate.k`` is set: beside the schedule, which knows each request's tokens
        (with head=last the proposals travel to the last stage with the step, and the results say what was kept)."""
        if not self.sc.speculate or self.sc.rank != 0:
            return None
        from smolcluster.inference.speculate import Speculator

        return Speculator(self.sc.speculate, self.sc.config, self.fmt)

    def open_prefix(self) -> PrefixCache | None:
        """Every stage's prefix cache, unless off or the model slides a window (its caches drop old keys)."""
        sc = self.sc
        if not sc.prefix_cache or any(w is not None for w in getattr(self.arch.shape, "windows", ())):
            return None
        if isinstance(sc.prefix_block, bool) or not isinstance(sc.prefix_block, int) or sc.prefix_block < 1:
            raise ConfigError(f"serve.prefix_block={sc.prefix_block!r} is invalid: give the prefix cache's block "
                              "size in tokens (e.g. 32), or serve.prefix_cache=false to turn it off")
        # Stage 0's root key: what besides the ids makes the KV (the adapter joins per request, prefix.root_key).
        self.prefix_identity = {"weights": sc.weights, "precision": sc.precision, "quantize": sc.quantize,
                                "group": sc.quantize_group, "block": sc.prefix_block}
        return PrefixCache(sc.prefix_block)

    # -- links ------------------------------------------------------------------------------
    def connect(self) -> None:
        sc = self.sc
        self.mesh = Mesh(self.me, sc.nodes[sc.rank]["bind"], heartbeat_s=sc.heartbeat_s, liveness_s=sc.liveness_s,
                         max_bytes=sc.max_bytes, keys_dir=sc.keys_dir)
        self.mesh.on_unknown_heartbeat = self.on_new_head
        self.mesh.on_restarted = self.on_lost  # its requests' KV and its prefix cache are gone: as if lost first
        for r, node in enumerate(sc.nodes):
            if r != sc.rank:
                self.mesh.add_peer(self.names[r], node["address"])
        self.mesh.beacon = {
            "role": "stage", "rank": sc.rank, "stages": sc.n_stages, "head_rank": self.head_rank,
            "serving": False, "blocks": [self.spec.blocks.start, self.spec.blocks.stop],
            "shape": self.arch.describe(), "kv_budget": self.kv_budget, "kernels": kernels(self.fmt),
            "decode": self.compiled_line(),  # compiled or eager, and why (compile=auto): /v1/models says it
            "adapters": self.lora.digests if self.lora else {},  # {name: digest}: the head checks stages agree
            "prefix_block": self.prefix.block if self.prefix else 0,  # the prefix cache's (0: off); the same
        }
        others = [n for n in self.names if n != self.me]
        self.mesh.wait_ready(others, sc.connect_timeout_s, " (the other inference stages)")
        self.mesh.beacon["serving"] = True
        logger.info(f"{self.me}: serving at {self.mesh.address}")

    def on_new_head(self, src: str, fields: dict) -> None:
        info = fields.get("info") or {}
        if not info.get("head") or not isinstance(info.get("address"), str):
            logger.warning(f"{self.me}: heartbeat from {src!r}, which is neither a stage nor a head; ignored")
            return
        logger.info(f"{self.me}: head {src} joined from {info['address']}")
        self.mesh.add_peer(src, info["address"], watched=True)
        self.heads.add(src)

    def on_lost(self, peer: str, message: str) -> None:
        if peer in self.heads:
            dropped = self.drop_requests(lambda head: head == peer)
            if dropped:  # a head that left mid-request; one whose requests were all answered just finished
                logger.warning(f"{self.me}: head {peer} is gone; freed {dropped} of its requests")
            else:
                logger.info(f"{self.me}: head {peer} left")
            self.heads.discard(peer)
            self.mesh.remove_peer(peer)
            if self.sc.exit_with_head and not self.heads:
                self.stopping = True
            return
        logger.error(message)
        # The chain is broken for every request, not just the open ones: every head hears it from
        # whichever node noticed first, and says the same thing to its callers.
        for head in self.heads:
            if head in self.mesh.peers:
                self.mesh.send(head, "mp.lost", {"stage": peer, "message": message})
        self.drop_requests(lambda head: True)
        if self.prefix is not None:  # a restarted stage starts empty: so do the others, never to disagree
            self.prefix.clear()

    def drop_requests(self, which) -> int:
        gone = [req for req, st in self.requests.items() if which(st.head)]
        gone += [w[0] for w in self.waiting if which(w[1])]
        for req in gone:
            self.close(req, "dropped")
        return len(gone)

    def close(self, req: str, why: str) -> None:
        st = self.requests.pop(req, None)  # its KV cache goes with it
        if st is not None and self.compiled is not None:
            self.compiled.release(st.cache)
        self.closed[req] = why
        while len(self.closed) > _CLOSED_MEMORY:
            self.closed.popitem(last=False)
        if self.sc.rank != 0:
            return
        if self.speculator is not None:
            self.speculator.forget(req)
        self.due.pop(req, None)  # (a stale entry in `prefilling` is skipped when its turn comes)
        self.out.discard(req)
        if st is not None:
            self.reserved = [r - n for r, n in zip(self.reserved, st.reserved)]
        elif any(w[0] == req for w in self.waiting):
            self.waiting = deque(w for w in self.waiting if w[0] != req)
        self.admit_waiting()

    def tell_head(self, st: RequestState, kind: str, fields: dict) -> None:
        if st.head in self.mesh.peers:
            self.mesh.send(st.head, kind, fields, tag=fields.get("req", ""))

    def fail(self, req: str, message: str) -> None:
        """A request cannot go on: tell its head, and the other stages so they free its cache."""
        st = self.requests.get(req)
        self.to_heads.pop(req, None)  # its held tokens would only follow the error
        if st is not None:
            self.tell_head(st, "mp.error", {"req": req, "message": message})
        for name in self.names:
            if name != self.me:
                self.mesh.send(name, "mp.error", {"req": req, "message": message}, tag=req)
        self.close(req, "error")

    # -- admission (stage 0) ----------------------------------------------------------------
    def kv_need(self, prompt_len: int, max_new_tokens: int, drafter: str = "off") -> list[int]:
        """KV bytes a request can come to on each stage: its prompt and every token it may add; on stage 0 also
        its draft model's cache (speculate.draft), which holds as many positions of the draft's own shape."""
        positions = min(prompt_len + max_new_tokens, self.arch.context)
        need = [positions * per for per in self.kv_per_token]
        need[0] += self.draft_need(prompt_len, max_new_tokens, drafter)
        return need

    def draft_need(self, prompt_len: int, max_new_tokens: int, drafter: str) -> int:
        """Stage 0's KV bytes for a request's drafter; none below 2 new tokens (its one token leaves no room for a
        proposal: :meth:`wants` asks for max_new_tokens - 1 at most, so the draft model never runs)."""
        if self.speculator is None or max_new_tokens < 2:
            return 0
        return self.speculator.kv_need(drafter, prompt_len + max_new_tokens)

    def fits(self, need: list[int]) -> bool:
        return len(self.requests) < self.sc.max_requests and self.kv_fits(need)

    def kv_fits(self, need: list[int], evicted: int = 0) -> bool:
        """``need`` more bytes fit every stage's budget beside the reserved and the prefix cache's blocks (less
        ``evicted`` of them)."""
        cached = (len(self.prefix.blocks) - evicted) * self.prefix.block if self.prefix is not None else 0
        return all(r + cached * per + n <= self.kv_budget
                   for r, per, n in zip(self.reserved, self.kv_per_token, need))

    def make_room(self, need: list[int], keep: set[str] | frozenset = frozenset()) -> bool:
        """Stage 0: evict the prefix cache's least recently used blocks until ``need`` fits; whether it does. Kept:
        ``keep`` and the blocks a request not yet introduced to the other stages starts from."""
        if self.kv_fits(need):
            return True
        if self.prefix is None:
            return False
        keep = keep | {key for st in self.requests.values() for key in st.reused}
        evictable = [k for k in self.prefix.blocks if k not in keep]
        if not self.kv_fits(need, len(evictable)):
            return False  # it cannot fit whatever goes: keep the blocks for the requests that can reuse them
        for key in evictable:
            self.prefix.evict(key)
            self.prefix.ops.append(["e", key])
            if self.kv_fits(need):
                return True
        return False

    def on_submit(self, env: Envelope) -> None:
        f, req = env.fields, env.fields["req"]
        ids = env.tensors.get("ids")
        problem = None
        if ids is None or ids.ndim != 1 or ids.dtype != np.int64 or not len(ids):
            problem = "the prompt must be a non-empty 1-D int64 tensor 'ids'"
        elif len(ids) > self.arch.context:
            problem = (f"the prompt is {len(ids)} tokens, longer than the model's context of "
                       f"{self.arch.context}: shorten it (the pipeline never truncates silently)")
        elif int(ids.min()) < 0 or int(ids.max()) >= self.arch.vocab_size:
            problem = f"prompt token ids must be in [0, {self.arch.vocab_size})"
        elif not isinstance(f.get("eos"), list) or not all(isinstance(t, int) for t in f["eos"]):
            problem = "eos must be a list of token ids"
        elif f["max_new_tokens"] < 1:
            problem = "max_new_tokens must be at least 1"
        elif f["adapter"] and f["adapter"] not in self.sc.adapters:
            problem = unknown_adapter(f["adapter"], self.sc.adapters)
        elif self.drafter(f["speculate"]) is None:
            served = f"speculate.k={self.speculator.k}, drafters: {self.speculator.default}" if self.speculator else \
                "no speculate.k"
            problem = (f"speculate={f['speculate']!r} is not served here ({served}): ask for one of \"\" (the "
                       "default), off, lookup or draft that the stages were started with")
        elif req in self.requests or any(w[0] == req for w in self.waiting):
            problem = f"request id {req} is already in flight"
        elif len(self.waiting) >= self.sc.max_waiting:
            problem = f"{self.me} already has {self.sc.max_waiting} requests waiting for room; retry later"
        else:
            problem = self.too_big(len(ids), int(f["max_new_tokens"]), self.drafter(f["speculate"]))
        params = SamplingParams.from_wire(f)
        if problem is None:
            try:
                params.check()
            except ConfigError as e:
                problem = str(e)
        if problem is not None:
            self.mesh.send(env.src, "mp.error", {"req": req, "message": problem}, tag=req)
            self.close(req, "refused")
            return
        self.closed.pop(req, None)
        self.waiting.append((req, env.src, dict(f), np.array(ids)))
        self.admit_waiting()

    def too_big(self, prompt_len: int, max_new_tokens: int, drafter: str) -> str | None:
        """Why a request can never fit a stage's KV budget, even alone (None: it can)."""
        need = self.kv_need(prompt_len, max_new_tokens, drafter)
        worst = max(range(len(need)), key=lambda r: need[r])
        if need[worst] <= self.kv_budget:
            return None
        draft = self.draft_need(prompt_len, max_new_tokens, drafter) if worst == 0 else 0
        mb = lambda n: f"{n / 2**20:.2f} MB"  # noqa: E731
        of_it = (f" ({mb(draft)} of it the draft model's, speculate.draft: or ask for speculate=\"lookup\" or "
                 "\"off\")") if draft else ""
        return (f"this request needs {mb(need[worst])} of KV cache on stage {worst}{of_it}, more than its budget "
                f"serve.kv_cache_mb={self.kv_budget / 2**20:.2f}: lower max_tokens or raise serve.kv_cache_mb")

    def admit_waiting(self) -> None:
        """Start waiting requests, in arrival order, while every stage's KV budget has room."""
        while self.waiting:
            req, head, f, ids = self.waiting[0]
            need = self.kv_need(len(ids), int(f["max_new_tokens"]), self.drafter(f["speculate"]))
            keys = self.prompt_keys(ids, f["adapter"])
            if len(self.requests) >= self.sc.max_requests or not self.make_room(need):
                return
            self.waiting.popleft()
            params = SamplingParams.from_wire(f)
            st = self.start(req, head, params, int(f["max_new_tokens"]), f["eos"], len(ids), f["adapter"])
            st.prompt, st.reserved = ids, need
            st.drafter = self.drafter(f["speculate"])
            if st.drafter != "off":
                from smolcluster.inference.speculate import Pace

                st.pace = Pace()
            if st.drafter != "off" or self.prefix is not None:
                st.history = ids.tolist()
            self.reserved = [r + n for r, n in zip(self.reserved, need)]
            if keys:
                self.reuse(st, keys)
            self.prefilling.append(req)

    def prompt_keys(self, ids: np.ndarray, adapter: str) -> list[str]:
        """Stage 0: the prefix-cache keys of a prompt's whole blocks but its last token (which is always fed); the
        cache's matching ones marked used, so they are the last evicted to make room for it."""
        if self.prefix is None:
            return []
        block, keys, parent = self.prefix.block, [], root_key(self.prefix_identity, adapter)
        for i in range((len(ids) - 1) // block):
            parent = chain(parent, ids[i * block:(i + 1) * block])
            keys.append(parent)
        self.prefix.touch(keys[:self.prefix.match(keys)])
        return keys

    def reuse(self, st: RequestState, keys: list[str]) -> None:
        """Stage 0: start a new request from the longest prefix of its prompt the cache holds; its intro will
        name those blocks to the other stages, which copy them too (prefix.py)."""
        st.keys = keys
        n = self.prefix.match(keys)
        if n:
            st.reused = keys[:n]
            self.prefix.load(st.reused, st.cache)
            st.stored, st.fed = n, n * self.prefix.block

    def offer_blocks(self, req: str, st: RequestState) -> None:
        """Stage 0, building a step: the blocks now whole in a request's cache join the prefix cache, here now and
        on the other stages with this step (its ops). Room is made by evicting least recently used blocks (not
        this chain's); a block that finds none ends the request's offers."""
        block, length = self.prefix.block, st.cache.length
        offered = st.stored
        while (st.stored + 1) * block <= length:
            i = st.stored
            if i == len(st.keys):
                parent = st.keys[-1] if st.keys else root_key(self.prefix_identity, st.adapter)
                st.keys.append(chain(parent, st.history[i * block:(i + 1) * block]))
            key = st.keys[i]
            if key not in self.prefix:
                if not self.make_room([block * per for per in self.kv_per_token], set(st.keys[:i])):
                    st.stored = 1 << 30  # no room: its later blocks would hang off a missing one
                    break
                self.prefix.store(key, st.cache, i)
                self.prefix.ops.append(["s", key, req, i])
            st.stored += 1
        if st.stored > offered:
            self.prefix.touch(st.keys[:st.stored])

    def start(self, req: str, head: str, params: SamplingParams, max_new_tokens: int, eos: list[int],
              prompt_len: int, adapter: str = "") -> RequestState:
        # The cache grows (doubling) up to the positions stage 0 reserved for it in the budget, never past them.
        limit = min(prompt_len + max_new_tokens, self.arch.context)
        slack = int(self.sc.speculate.get("k", 0))  # rejected proposals are cut from the cache (KVCache.truncate)
        n = len(self.spec.blocks)
        cache = self.compiled.cache(n, limit, slack) if self.compiled is not None else None
        st = RequestState(head, cache or KVCache(n, limit, slack), params, max_new_tokens, eos, prompt_len,
                          adapter=adapter)
        if self.has_head and not params.greedy:
            st.generator = make_generator(params.seed)
        elif self.speculator is not None and not params.greedy:  # head=last: the draft model's own (speculate.py)
            from smolcluster.inference.speculate import draft_seed

            st.generator = make_generator(draft_seed(params.seed))
        self.requests[req] = st
        return st

    def drafter(self, asked: str) -> str | None:
        """The drafter a request asking for ``asked`` gets: off, lookup or draft (None: not served here)."""
        if self.speculator is None:
            return "off" if asked in ("", "off") else None
        return self.speculator.drafter(asked)

    # -- the token loop ---------------------------------------------------------------------
    def can_step(self) -> bool:
        """Stage 0: a step has work, and may leave now (co-located stages take turns: one step at a time)."""
        return bool(self.due or self.prefilling) and not (self.turns and self.out)

    def step(self) -> None:
        """Stage 0: one forward over every due decode and up to ``prefill_chunk`` prompt tokens."""
        if not self.can_step():
            return
        step, ids = Step([], [], []), []
        # Stages working at once: the running requests go round as n_stages groups (steps), so while one stage
        # works on a group the others work on theirs; a single step of all of them would leave all but one
        # stage idle (2 stages, 8 in flight: gpt2-tiny +19% tokens/s with 2 groups). Stages taking turns
        # (self.turns) run one step of every request: each weight is read once per round, not once per group.
        # The rest stay due for the next turn.
        room = len(self.requests) if self.turns else -(-len(self.requests) // self.sc.n_stages)
        decodes = [(req, self.due.pop(req)) for req in list(self.due)[:room]]
        decodes, proposals = self.propose(decodes)
        for req, token in decodes:
            st = self.requests[req]
            st.drafts, st.q = proposals.get(req, ([], None))
            if st.drafts:
                st.sent_at = time.perf_counter()
            if st.drafts and not self.has_head:  # head=last: the last stage checks them
                step.drafts[req] = st.drafts
                if st.q is not None:
                    step.q[req] = st.q
            if st.trim is not None:  # rejected proposals of its last step: cut here, and on each stage it reaches
                step.trim[req] = st.trim
                st.cache.truncate(st.trim)
                st.trim = None
            if self.prefix is not None:
                self.offer_blocks(req, st)
            step.reqs.append(req), step.sizes.append(1 + len(st.drafts)), step.emit.append(True)
            ids.append(token)
            ids.extend(st.drafts)
        room = self.sc.prefill_chunk
        while self.prefilling and room > 0:
            req = self.prefilling.popleft()
            st = self.requests.get(req)
            if st is None:  # cancelled while waiting for its next chunk
                continue
            n = min(room, len(st.prompt) - st.fed)
            if self.prefix is not None:
                self.offer_blocks(req, st)
            if not st.introduced:
                step.intro[req] = {"head": st.head, "max_new_tokens": st.max_new_tokens, **st.params.to_wire(),
                                   "eos": st.eos, "prompt_len": st.prompt_len,
                                   "adapter": st.adapter, "prefix": st.reused}
                st.introduced, st.reused = True, []
            ids.extend(int(t) for t in st.prompt[st.fed:st.fed + n])
            st.fed += n
            room -= n
            step.reqs.append(req), step.sizes.append(n), step.emit.append(st.fed == len(st.prompt))
        if not step.reqs:
            return
        if self.prefix is not None:
            step.prefix, self.prefix.ops = self.prefix.ops, []
        self.out.update(step.reqs)
        batch = self.batch(step)
        try:
            x = self.stage.embed(torch.tensor([ids], device=self.device), batch.positions())
            x = self.run_blocks(x, batch)
        except Exception as e:
            logger.exception(f"{self.me}: a step failed")
            if self.prefix is not None:  # its ops (already applied here) leave with the next step
                self.prefix.ops[:0] = step.prefix
            for req in step.reqs:
                self.fail(req, f"{self.me} failed on a step: {type(e).__name__}: {e}")
            return
        self.forward_out(step, x)

    def propose(self, decodes: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], dict]:
        """Proposals for this step's speculating decodes, each at most as many as it may still make (and the
        context holds) less the one token the pass makes of its own. Should the drafter fail (the draft model
        runs here), the speculating decodes fail (their heads and the other stages hear of it), the rest go on."""
        if self.speculator is None:
            return decodes, {}
        wants = self.wants([req for req, _ in decodes])
        try:
            return decodes, self.speculator.propose(wants)
        except Exception as e:
            logger.exception(f"{self.me}: proposing failed")
            failed = {w.req for _, w in wants}
            for req in failed:
                self.fail(req, f"{self.me} failed proposing (speculate): {type(e).__name__}: {e}")
            return [(req, token) for req, token in decodes if req not in failed], {}

    def wants(self, reqs: list[str]) -> list:
        """This step's speculating decodes' (drafter, Want) pairs."""
        from smolcluster.inference.speculate import Want

        wants = []
        for req in reqs:
            st = self.requests[req]
            if st.drafter == "off":
                continue
            # adaptive k for greedy requests only: it follows measured times, and a sampled request's draws depend
            # on how many proposals each pass makes (its seed would no longer give the same tokens run after run)
            k = self.speculator.choose_k(st.pace, st.drafter) if st.params.greedy else self.speculator.k
            k = min(k, st.max_new_tokens - st.generated - 1, self.arch.context - len(st.history))
            wants.append((st.drafter, Want(req, st.history, k, st.params, st.generator,
                                           st.prompt_len + st.max_new_tokens)))
        return wants

    def batch(self, step: Step) -> Batch:
        """The step's rows as a batch of its requests' caches; each row routed to its request's adapter."""
        states = [self.requests[r] for r in step.reqs]
        if self.lora is not None:
            adapters = [self.lora.index.get(st.adapter, -1) for st in states]
            self.lora.route(adapters, step.sizes)
            self.mixed += len(set(adapters)) > 1
        return Batch([st.cache for st in states], step.sizes)

    def forward_out(self, step: Step, x: torch.Tensor) -> None:
        """Hand this stage's output on: to the next stage, round the ring to stage 0, or to the head."""
        rank, last = self.sc.rank, self.sc.n_stages - 1
        self.metrics.tokens(x.shape[1])  # (every stage's forward ends here, once per step)
        self.forwards, self.rows = self.forwards + 1, self.rows + x.shape[1]
        if rank == last and self.has_head:
            self.emit(step, x)
            return
        fields, tensors = step.fields(), {"x": x}
        if rank == last:  # round the ring: stage 0 knows these requests already (and has cut their caches)
            fields["intro"], fields["trim"], fields["prefix"] = {}, {}, []
        elif step.q:  # head=last, sampled through a draft model: its rows of q, in the order of `sampled`
            tensors["q"] = torch.cat([step.q[r] for r in fields["sampled"]])
        dst = self.names[rank + 1] if rank < last else self.names[0]
        # Sent in the compute type (bf16/fp16: half fp32's bytes); the wire copies it off a GPU.
        self.mesh.send(dst, "mp.hidden", fields, tensors, tag=step.reqs[0])

    def on_hidden(self, env: Envelope) -> None:
        f = env.fields
        step = Step(list(f["reqs"]), list(f["sizes"]), list(f["emit"]), dict(f["intro"]), dict(f["trim"]),
                    list(f["prefix"]), dict(f["drafts"]))
        self.replay(step.prefix)  # stage 0's prefix-cache decisions, before any request that relies on them
        try:
            self.run_hidden(env, step)
        except Exception:  # the step's requests fail (dispatch), its ops still reach the next stages
            self.pass_ops(step.prefix)
            raise

    def run_hidden(self, env: Envelope, step: Step) -> None:
        """A step's rows here: start the requests it introduces, cut the caches it trims, run the blocks."""
        if env.fields["sampled"]:
            step.q = self.split_q(env, step)
        for req, intro in step.intro.items():
            if req not in self.requests and req not in self.closed:
                check_intro(req, intro, env.src, self.prefix.block if self.prefix is not None else 0)
                params = SamplingParams.from_wire(intro)
                adapter = intro["adapter"]
                if adapter and adapter not in self.sc.adapters:
                    raise ConfigError(f"{self.me}: {unknown_adapter(adapter, self.sc.adapters)} (start every "
                                      "stage with the same adapters=)")
                st = self.start(req, intro["head"], params, intro["max_new_tokens"], intro["eos"],
                                intro["prompt_len"], adapter)
                if intro["prefix"]:
                    self.load_prefix(req, st, intro["prefix"])
        for req, length in step.trim.items():  # rejected proposals: before this step's rows (speculate.py)
            if req in self.requests:
                cache = self.requests[req].cache
                if not isinstance(length, int) or not 0 <= length <= cache.length:
                    raise PeerError(f"{self.me}: {env.src} asked to cut request {req}'s cache to {length!r} of "
                                    f"{cache.length} positions (a stage of another version?)")
                cache.truncate(length)
        x = env.tensors["x"]  # numpy, or torch for bfloat16 (numpy has none)
        x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(x)).to(self.device, self.dtype)
        # Rows of requests cancelled meanwhile are dropped; the rest go on unchanged.
        keep = [i for i, req in enumerate(step.reqs) if req in self.requests]
        if len(keep) < len(step.reqs):
            if not keep:
                self.pass_ops(step.prefix)
                return
            starts = [sum(step.sizes[:i]) for i in range(len(step.sizes))]
            x = torch.cat([x[:, starts[i]:starts[i] + step.sizes[i]] for i in keep], dim=1)
            step = step.only(keep)  # (the kept requests' trims still go on: the next stages cut too)
        if self.sc.rank == 0:  # the ring's return: stage 0 holds the head
            self.emit(step, x)
            return
        if self.has_head:  # head=last: the proposals this stage checks came with the step
            self.take_drafts(env, step)
        self.forward_out(step, self.run_blocks(x, self.batch(step)))

    def take_drafts(self, env: Envelope, step: Step) -> None:
        """The last stage (head=last): each decode's proposals, checked against its rows, onto its state."""
        for req, size, emit in zip(step.reqs, step.sizes, step.emit):
            drafts = step.drafts.get(req, [])
            if not isinstance(drafts, list) or not all(isinstance(t, int) and 0 <= t < self.arch.vocab_size
                                                       for t in drafts) or (drafts and len(drafts) + 1 != size):
                raise PeerError(f"{self.me}: {env.src} sent request {req} proposals {drafts!r} for {size} rows: they "
                                f"must be token ids, one fewer than its rows (a stage of another version?)")
            st = self.requests[req]
            st.drafts, st.q = (drafts, step.q.get(req)) if emit else ([], None)

    def split_q(self, env: Envelope, step: Step) -> dict:
        """The tensor ``q`` of a step (head=last, sampled drafts): each ``sampled`` request's rows, one a proposal."""
        q, sampled = env.tensors.get("q"), env.fields["sampled"]
        sizes = [len(step.drafts.get(r) or []) if isinstance(r, str) else -1 for r in sampled]
        if q is None or min(sizes, default=0) < 1 or q.ndim != 2 or q.shape != (sum(sizes), self.arch.vocab_size):
            raise PeerError(f"{self.me}: {env.src} sent q of shape {None if q is None else tuple(q.shape)} for "
                            f"requests {sampled!r}: it must hold a row per proposal of each, {self.arch.vocab_size} "
                            "wide (a stage of another version?)")
        q = q if isinstance(q, torch.Tensor) else torch.from_numpy(q)
        return dict(zip(sampled, q.split(sizes)))

    def pass_ops(self, ops: list) -> None:
        """Hand stage 0's prefix-cache ops on without rows (``mp.prefix``: a step's rows all dropped, or its step
        failed here), so the next stages' blocks still mirror stage 0's."""
        if ops and self.sc.rank < self.sc.n_stages - 1:
            self.mesh.send(self.names[self.sc.rank + 1], "mp.prefix", {"ops": ops}, tag="prefix")

    def replay(self, ops: list) -> None:
        """Stages past 0: apply stage 0's prefix-cache ops; a block this stage could not store (its request was
        cancelled here first) is reported to stage 0, which forgets it everywhere."""
        if not ops or self.prefix is None:
            return
        lost = self.prefix.apply(ops, {req: st.cache for req, st in self.requests.items()})
        if lost:
            self.mesh.send(self.names[0], "mp.forget", {"keys": lost}, tag="prefix")

    def load_prefix(self, req: str, st: RequestState, keys: list) -> None:
        """Stages past 0: a new request starts from the blocks stage 0 chose; one missing here fails it (its
        output would be wrong), and stage 0 forgets the missing ones so that a retry prefills in full."""
        missing = [k for k in keys if self.prefix is None or k not in self.prefix]
        if not missing:
            self.prefix.load(keys, st.cache)
            return
        self.mesh.send(self.names[0], "mp.forget", {"keys": missing}, tag="prefix")
        self.fail(req, f"{self.me} lacks {len(missing)} of the {len(keys)} prefix-cache blocks request {req} starts "
                       "from (its store here was overtaken by a cancel, or this stage runs serve.prefix_cache=false "
                       "unlike stage 0); stage 0 forgets them: retry the request")

    def emit(self, step: Step, x: torch.Tensor) -> None:
        """Pick each finished row's token(s), stream them to its head, and hand the step's results to stage 0."""
        last_rows = Batch([], step.sizes).last_rows()
        # A speculating decode's last 1 + len(drafts) rows are scored (speculate.py); any other, its last row.
        spans = [(last_rows[i] - len(self.requests[req].drafts), last_rows[i] + 1)
                 for i, (req, e) in enumerate(zip(step.reqs, step.emit)) if e]
        rows = [r for a, b in spans for r in range(a, b)]
        if len(rows) < x.shape[1]:
            x = x[:, rows, :]  # (a step of decodes only: every row is a last row, no gather)
        logits = self.stage.logits(x).float().cpu() if rows else None
        # Every row's greedy pick in one argmax (a row's own argmax, so the same token; a per-row call cost
        # ~10 us a request); only sampled rows go through next_token one by one.
        picks = logits[0].argmax(-1).tolist() if rows else None
        tokens, ended, kept = [], [], {}
        k = 0
        for req, emit in zip(step.reqs, step.emit):
            if not emit:
                tokens.append(-1)  # a prompt chunk: the next one is due
                continue
            st = self.requests[req]
            if st.drafts:
                made, kept[req] = self.verify(st, logits[0, k:k + len(st.drafts) + 1])
            else:
                made = [picks[k] if st.params.greedy else next_token(logits[0, k], st.params, st.generator)]
            k += len(st.drafts) + 1
            reason = self.take(req, st, made)
            tokens.append(made[-1])  # (what the next step feeds)
            if reason:
                ended.append((req, reason))
        results = {"reqs": step.reqs, "tokens": tokens, "ended": ended, "kept": kept}
        if ended:  # the other stages free these caches now
            for r, name in enumerate(self.names):
                if name != self.me and r != 0:
                    self.mesh.send(name, "mp.done", {"ended": ended}, tag=ended[0][0])
        if self.sc.rank == 0:
            self.schedule(results)
            return
        self.mesh.send(self.names[0], "mp.step", results, tag=step.reqs[0])
        # head=last: this stage frees them too (no mp.done comes back to it); their held tokens stay in
        # to_heads, which close() leaves alone, and still stream.
        for req, reason in ended:
            self.close(req, reason)

    def verify(self, st: RequestState, logits: torch.Tensor) -> tuple[list[int], int]:
        """A speculating step's tokens (the proposals the target keeps and its own next one) and how many
        proposals were kept: stage 0 cuts the rejected ones' positions from every stage's cache (:meth:`count_kept`)."""
        from smolcluster.inference.speculate import accept

        made, kept = accept(logits, st.drafts, st.q, st.params, st.generator)
        st.drafted += len(st.drafts)
        st.accepted += kept
        return made, kept

    def take(self, req: str, st: RequestState, made: list[int]) -> str:
        """Count a step's tokens, up to the first that ends the request; held for its head. The reason it ended."""
        reason = ""
        for token in made:
            st.generated += 1
            if st.history is not None:
                st.history.append(token)
            if token in st.eos:
                reason = "eos"
            elif st.generated >= st.max_new_tokens:
                reason = "length"
            elif st.prompt_len + st.generated > self.arch.context:
                reason = "context"  # feeding this token back would need a position the model does not have
            # The head hears of it once the next step is on its way: streaming is off the critical path.
            out = self.to_heads.setdefault(req, [st.head, [], False, "", 0, 0])
            out[1].append((token, st.generated - 1, time.monotonic()))
            out[2], out[3], out[4], out[5] = bool(reason), reason, st.drafted, st.accepted
            if reason:
                break
        return reason

    def stream_due(self) -> float:
        """When the held tokens must leave: at once for a request's first or last token, else
        ``stream_interval_ms`` after the oldest. Why hold them: each message wakes the head's I/O thread and
        its reader (the head's process took ~130 us of CPU per gpt2-tiny token, ~25 with 20 ms batches, on
        cores the stages may share: one request went from 0.82x to 0.86x of generate), while people read a
        few tokens a second.
        A model slower than the interval per token streams every token as it is made."""
        due = float("inf")
        for _, made, done, *_ in self.to_heads.values():
            if done or made[0][1] == 0:
                return 0.0
            due = min(due, made[0][2] + self.stream_s)
        return due

    def stream(self) -> None:
        """Send every held token to its head, one message per request (with each token's age, so the head
        knows when it was made: per-token latency stays measurable)."""
        now = time.monotonic()
        for req, (head, made, done, reason, drafted, accepted) in self.to_heads.items():
            if head in self.mesh.peers:
                self.mesh.send(head, "mp.token", {"req": req, "tokens": [t for t, _, _ in made], "index": made[0][1],
                                                  "ages": [now - at for _, _, at in made], "done": done,
                                                  "reason": reason, "drafted": drafted, "accepted": accepted},
                               tag=req)
        self.to_heads.clear()

    def schedule(self, results: dict) -> None:
        """Stage 0: after a step came back, its requests' next steps are due (or they ended)."""
        self.out.difference_update(results["reqs"])
        self.count_kept(results)
        for req, reason in results["ended"]:
            self.close(req, reason)
        continuing = []
        for req, token in zip(results["reqs"], results["tokens"]):
            if req not in self.requests:
                continue
            if token < 0:
                continuing.append(req)
                continue
            self.due[req] = token
            st = self.requests[req]
            if not self.has_head:
                # head=last: the head's `take` ran on another stage, so the drafters and the prefix cache's keys
                # (offer_blocks) learn the answer here: the proposals the head kept, and its own token
                made = st.drafts[:results["kept"].get(req, 0)] + [token]
                st.generated += len(made)
                if st.history is not None:
                    st.history.extend(made)
        # A prompt half fed goes first, so it starts answering soonest.
        self.prefilling.extendleft(reversed(continuing))

    def count_kept(self, results: dict) -> None:
        """Stage 0: what the head said of a step's proposals. Counted (the acceptance rate), and the rejected
        ones' positions are cut from every stage's cache before the request's next rows (its ``trim``)."""
        kept = results["kept"]
        if not isinstance(kept, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in kept.values()):
            raise PeerError(f"{self.me}: a step's results said kept={kept!r}: it must map requests to the proposals "
                            "kept (int); every stage must run the same smolcluster version")
        for req, n in kept.items():
            st = self.requests.get(req)
            if st is None or self.speculator is None:
                continue
            if not 0 <= n <= len(st.drafts):
                raise PeerError(f"{self.me}: a step's results kept {n} of request {req}'s {len(st.drafts)} "
                                "proposals; every stage must run the same smolcluster version")
            self.speculator.drafted += len(st.drafts)
            self.speculator.accepted += n
            st.pace.update(len(st.drafts), n)
            self.speculator.timed("pass", time.perf_counter() - st.sent_at)
            if n < len(st.drafts):
                st.trim = st.cache.length - (len(st.drafts) - n)

    def unknown(self, req: str, env: Envelope) -> None:
        if req not in self.closed:
            logger.warning(f"{self.me}: {env.kind} from {env.src} for unknown request {req}; dropped")

    def handle(self, env: Envelope) -> None:
        kind = env.kind
        if kind == "mp.submit":
            self.on_submit(env)
        elif kind == "mp.hidden":
            self.on_hidden(env)
        elif kind == "mp.step":
            self.schedule(env.fields)
        elif kind == "mp.prefix":  # a step's prefix-cache ops, its rows all dropped on the way
            if self.sc.rank == 0 or env.src != self.names[self.sc.rank - 1]:
                raise PeerError(f"{self.me}: prefix-cache ops from {env.src}, not from the previous stage; ignored")
            self.replay(env.fields["ops"])
            self.pass_ops(env.fields["ops"])
        elif kind == "mp.forget":  # blocks a stage could not store: no request may start from them again
            keys = env.fields["keys"]
            if env.src not in self.names or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise PeerError(f"{self.me}: mp.forget from {env.src} with keys={keys!r}: only a stage may have "
                                "stage 0 forget prefix-cache blocks, named by their keys (str); ignored")
            for key in keys:
                if self.prefix is not None and key in self.prefix:
                    self.prefix.evict(key)
                    self.prefix.ops.append(["e", key])
        elif kind == "mp.done":
            for req, reason in env.fields["ended"]:
                self.close(req, reason)
        elif kind in ("mp.cancel", "mp.error"):
            # Remembered even when the request has not reached this stage yet (the head's cancel can
            # overtake the previous stage's first hidden): its late arrival is then ignored.
            self.close(env.fields["req"], "cancelled" if kind == "mp.cancel" else "error")
        elif kind == "mp.shutdown":
            logger.info(f"{self.me}: shutdown asked by {env.src}")
            self.stopping = True
        elif kind == "mp.bye" and env.src in self.heads:
            self.on_lost(env.src, f"{env.src} said bye")
        else:
            logger.warning(f"{self.me}: ignored {kind!r} from {env.src}")

    def kv_bytes(self) -> int:
        """KV-cache bytes this stage holds for its requests: their buffers' capacity (what memory really holds),
        with the draft model's caches on stage 0 (:meth:`draft_kv_bytes`), which the budget counts too. A request
        in a compiled slot counts its positions (the slots' pool is the beacon's ``compiled_kv_bytes``)."""
        size = self.compiled.cache_bytes if self.compiled is not None else KVCache.nbytes
        return sum(size(st.cache) for st in self.requests.values()) + self.draft_kv_bytes()

    def draft_kv_bytes(self) -> int:
        return self.speculator.nbytes() if self.speculator is not None else 0

    def refresh_beacon(self) -> None:
        beacon = self.mesh.beacon
        beacon["serving"] = not any(self.mesh.peers[n].lost for n in self.names if n in self.mesh.peers)
        beacon["requests"], beacon["waiting"] = len(self.requests), len(self.waiting)
        beacon["kv_bytes"], beacon["draft_kv_bytes"] = self.kv_bytes(), self.draft_kv_bytes()
        beacon["steps"], beacon["rows"] = self.forwards, self.rows  # rows / steps: the tokens a step carries
        beacon["mixed_steps"] = self.mixed
        beacon["compiled_steps"] = self.compiled.steps if self.compiled is not None else 0
        beacon["compiled_kv_bytes"] = self.compiled.nbytes if self.compiled is not None else 0
        if self.prefix is not None:  # hits and tokens saved count every stage's copies (the same on each)
            p = self.prefix
            beacon["prefix_hits"], beacon["prefix_tokens"], beacon["prefix_bytes"] = p.hits, p.saved, p.nbytes
            self.metrics.prefix(p.hits, p.saved, p.nbytes)
        if self.speculator is not None:  # acceptance rate: accepted / drafted
            beacon["drafted"], beacon["accepted"] = self.speculator.drafted, self.speculator.accepted
            self.metrics.speculated(self.speculator.drafted, self.speculator.accepted)
        beacon["active"] = list(self.requests)[:64]  # (what a health check or a test looks at)
        self.metrics.step(len(self.requests), len(self.waiting), beacon["kv_bytes"],  # the same counts, for top
                          beacon["draft_kv_bytes"])

    def run(self) -> None:
        self.connect()
        started = time.monotonic()
        try:
            with torch.inference_mode():
                beacon_due = 0.0
                while not self.stopping:
                    # The beacon leaves with each heartbeat: refreshing it every turn of this loop (per token)
                    # cost ~10-30 us/turn of the hop (profiled, see docs/benchmarks.md); 20 times per beat is plenty.
                    now = time.monotonic()
                    if now >= beacon_due:
                        self.refresh_beacon()
                        beacon_due = now + self.sc.heartbeat_s / 20
                    # Everything that has arrived is handled before the next step, so it joins that step.
                    timeout = 0.0 if self.sc.rank == 0 and self.can_step() else self.sc.heartbeat_s
                    if self.to_heads:  # tokens held back are sent when due, even if nothing else comes
                        timeout = min(timeout, max(0.0, self.stream_due() - now))
                    for _ in range(256):
                        try:
                            env = self.mesh.recv(timeout)
                        except PeerLost as e:
                            self.on_lost(e.peer, str(e))
                            break
                        except PeerError as e:  # a sequence gap: the in-flight requests cannot be trusted
                            logger.error(str(e))
                            for req in list(self.requests):
                                self.fail(req, str(e))
                            break
                        if env is None:
                            break
                        self.dispatch(env)
                        timeout = 0.0
                    if self.sc.rank == 0:
                        self.step()
                    if self.to_heads and time.monotonic() >= self.stream_due():
                        self.stream()
                    if (self.sc.exit_with_head and not self.heads
                            and time.monotonic() - started > self.sc.connect_timeout_s):
                        logger.warning(f"{self.me}: no head came within {self.sc.connect_timeout_s:.0f}s; exiting")
                        self.stopping = True
        finally:
            self.mesh.close()
            self.metrics.close()

    def dispatch(self, env: Envelope) -> None:
        try:
            self.handle(env)
        except SmolclusterError as e:
            if not (env.fields.get("reqs") or env.fields.get("req")):  # no request to tell: the log does
                logger.error(str(e))
            self.fail_env(env, str(e))
        except Exception as e:  # a bug or a bad tensor: fail those requests, keep serving the rest
            logger.exception(f"{self.me}: {env.kind} from {env.src} failed")
            self.fail_env(env, f"{self.me} failed on {env.kind}: {type(e).__name__}: {e}")

    def fail_env(self, env: Envelope, message: str) -> None:
        reqs = env.fields.get("reqs") or [env.fields.get("req")]
        for req in reqs:
            if isinstance(req, str) and req:
                self.fail(req, message)


def serve(sc: ServeConfig) -> None:
    from smolcluster.telemetry.logging import setup_logging

    telemetry = sc.extra.get("telemetry") or {}  # logging.prometheus / run_dir, for smolcluster.top
    setup_logging(role="stage", rank=sc.rank, algo="infer", level=sc.log_level, run_id=telemetry.get("run_id", ""),
                  run_dir=telemetry.get("run_dir"))
    StageServer(sc).run()


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m smolcluster.inference.stage STAGE.json", file=sys.stderr)
        return 2
    from smolcluster.launch.supervisor import sigterm_as_interrupt

    sigterm_as_interrupt()  # SIGTERM unwinds: the mesh and the metrics endpoint are closed on the way out
    serve(ServeConfig.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    from smolcluster.launch.supervisor import exit_without_teardown

    exit_without_teardown(main())  # 0, 2 or 130: each after the stage has unwound (a bug's traceback exits 1)
