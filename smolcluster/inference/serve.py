"""An inference stage: requests flow through this stage's layers, each with its own KV cache.

    python -m smolcluster.inference.serve STAGE.json    # what a local launch runs per stage
    python -m smolcluster.infer role=stage rank=N ...  # the same on a cluster node, from Hydra config

A stage imports torch, numpy and zmq, never ``transformers``, and reads only its own
tensors from the model's files, so its memory is its share of the model. It speaks every
family in ``smolcluster.pipeline.architectures``, told which by the model's ``config.json``.

The token loop. A head (the caller's process) sends ``submit`` (the prompt's ids and
sampling settings) to stage 0, which makes the request's KV cache, embeds the prompt
and runs its blocks; each stage hands its output to the next (``hidden``), the first
of which also introduces the request (so no stage can hear of a request late: a
submit sent to every stage could be overtaken on another link).
The stage holding the head (ln_f + LM head) turns the last position into logits,
picks the token (greedy or seeded sampling), and sends it to the head that asked
(``token``, streamed as it is made) and on to stage 0, which embeds it and starts the
next step. Where the head sits:

- ``head_first`` (default): on stage 0, beside the embedding it is tied to, so the
  embedding is held once; the last stage sends its hidden state back round the ring.
- otherwise on the last stage (as in training), which then holds its own copy.

Both cost the same hops per token. A request ends on any of its EOS ids, ``max_new_tokens``, or the
context (when feeding the token back would need position ``n_positions``), or when its head cancels it;
every stage then frees its cache. Several requests are in flight at once: a stage
serves messages in arrival order, so their steps interleave through the stages.
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
from smolcluster.inference.sampling import SamplingParams, make_generator, next_token
from smolcluster.pipeline.architectures import KVCache, family_for
from smolcluster.pipeline.mesh import Envelope, Mesh, PeerLost
from smolcluster.pipeline.partition import stage_name
from smolcluster.pipeline.quantize import StageFormat, resolve_device
from smolcluster.pipeline.weights import load_stage

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
    max_requests: int = 64
    log_level: str | None = None      # None: SMOLCLUSTER_LOG_LEVEL or INFO
    precision: str = "fp32"           # fp32 | bf16 | fp16: weights, KV cache and the activations sent
    quantize: str = "none"            # none | int8 | int4 (weight-only, applied as the stage loads)
    quantize_group: int = 64          # int4's group size (32 | 64 | 128)
    device: str | None = None         # cpu | cuda | cuda:N | mps | auto (None: cpu)
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
    generator: torch.Generator | None = None


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
        # Activations arrive in whatever type the sender computes in; this stage computes in its own.
        self.device, self.dtype = self.stage.device, self.stage.compute_dtype
        self.names = [stage_name(r) for r in range(sc.n_stages)]
        self.me = self.names[sc.rank]
        self.requests: dict[str, RequestState] = {}
        self.closed: OrderedDict[str, str] = OrderedDict()
        self.work: deque[tuple[str, int]] = deque()  # stage 0: (request, token) whose next step is due
        self.to_heads: list[tuple[str, dict]] = []  # tokens made this turn, for their heads
        self.heads: set[str] = set()
        self.stopping = False
        params = sum(p.numel() for p in self.stage.parameters())
        logger.info(f"{self.spec.describe(self.has_head, self.spec.first)}: {params:,} params from {sc.weights} "
                    f"({self.fmt.precision}, quantize={self.fmt.quantize}, on {self.fmt.device})")

    # -- links ------------------------------------------------------------------------------
    def connect(self) -> None:
        sc = self.sc
        self.mesh = Mesh(self.me, sc.nodes[sc.rank]["bind"], heartbeat_s=sc.heartbeat_s, liveness_s=sc.liveness_s,
                         max_bytes=sc.max_bytes, keys_dir=sc.keys_dir)
        self.mesh.on_unknown_heartbeat = self.on_new_head
        for r, node in enumerate(sc.nodes):
            if r != sc.rank:
                self.mesh.add_peer(self.names[r], node["address"])
        self.mesh.beacon = {
            "role": "stage", "rank": sc.rank, "stages": sc.n_stages, "head_rank": self.head_rank,
            "serving": False, "blocks": [self.spec.blocks.start, self.spec.blocks.stop],
            "shape": self.arch.describe(),
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
            dropped = self.drop_requests(lambda st: st.head == peer)
            logger.warning(f"{self.me}: head {peer} is gone; freed {dropped} of its requests")
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
        self.drop_requests(lambda st: True)

    def drop_requests(self, which) -> int:
        gone = [req for req, st in self.requests.items() if which(st)]
        for req in gone:
            self.close(req, "dropped")
        return len(gone)

    def close(self, req: str, why: str) -> None:
        self.requests.pop(req, None)  # its KV cache goes with it
        self.closed[req] = why
        while len(self.closed) > _CLOSED_MEMORY:
            self.closed.popitem(last=False)

    def tell_head(self, st: RequestState, kind: str, fields: dict) -> None:
        if st.head in self.mesh.peers:
            self.mesh.send(st.head, kind, fields, tag=fields.get("req", ""))

    def fail(self, req: str, message: str) -> None:
        """A request cannot go on: tell its head, and the other stages so they free its cache."""
        st = self.requests.get(req)
        if st is not None:
            self.tell_head(st, "mp.error", {"req": req, "message": message})
        for name in self.names:
            if name != self.me:
                self.mesh.send(name, "mp.error", {"req": req, "message": message}, tag=req)
        self.close(req, "error")

    # -- the token loop ---------------------------------------------------------------------
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
        elif req in self.requests:
            problem = f"request id {req} is already in flight"
        elif len(self.requests) >= self.sc.max_requests:
            problem = f"{self.me} already serves {self.sc.max_requests} requests; retry later"
        params = SamplingParams(float(f["temperature"]), int(f["top_k"]), float(f["top_p"]), int(f["seed"]))
        if problem is None:
            try:
                params.check()
            except ConfigError as e:
                problem = str(e)
        if problem is not None:
            if self.sc.rank == 0:  # every stage checks alike; one answer is enough
                self.mesh.send(env.src, "mp.error", {"req": req, "message": problem}, tag=req)
            self.close(req, "refused")
            return
        self.start(req, env.src, params, int(f["max_new_tokens"]), f["eos"], len(ids))
        x = self.stage.embed(torch.from_numpy(np.array(ids)).unsqueeze(0).to(self.device), 0)
        self.forward_out(req, self.requests[req], self.stage.run_blocks(x, self.requests[req].cache))

    def start(self, req: str, head: str, params: SamplingParams, max_new_tokens: int, eos: list[int],
              prompt_len: int) -> RequestState:
        st = RequestState(head, KVCache(len(self.spec.blocks)), params, max_new_tokens, eos, prompt_len)
        if self.has_head and not params.greedy:
            st.generator = make_generator(params.seed)
        self.requests[req] = st
        return st

    def forward_out(self, req: str, st: RequestState, x: torch.Tensor) -> None:
        """Hand this stage's output on: to the next stage, round the ring to stage 0, or to the head."""
        rank, last = self.sc.rank, self.sc.n_stages - 1
        if rank == last and self.has_head:
            self.emit(req, st, x)
            return
        fields = {"req": req}
        if st.cache.length == x.shape[1] and rank < last:  # the prefill: introduce the request downstream
            p = st.params
            fields.update(head=st.head, max_new_tokens=st.max_new_tokens, temperature=p.temperature,
                          top_k=p.top_k, top_p=p.top_p, seed=p.seed, eos=st.eos, prompt_len=st.prompt_len)
        dst = self.names[rank + 1] if rank < last else self.names[0]
        # Sent in the compute type (bf16/fp16: half fp32's bytes); the wire copies it off a GPU.
        self.mesh.send(dst, "mp.hidden", fields, {"x": x}, tag=req)

    def on_hidden(self, env: Envelope) -> None:
        f, req = env.fields, env.fields["req"]
        st = self.requests.get(req)
        if st is None and "head" in f and req not in self.closed:
            params = SamplingParams(float(f["temperature"]), int(f["top_k"]), float(f["top_p"]), int(f["seed"]))
            st = self.start(req, f["head"], params, f["max_new_tokens"], f["eos"], f["prompt_len"])
        if st is None:
            self.unknown(req, env)
            return
        x = env.tensors["x"]  # numpy, or torch for bfloat16 (numpy has none)
        x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(x)).to(self.device, self.dtype)
        if self.sc.rank == 0:  # the ring's return: stage 0 holds the head
            self.emit(req, st, x)
        else:
            self.forward_out(req, st, self.stage.run_blocks(x, st.cache))

    def emit(self, req: str, st: RequestState, x: torch.Tensor) -> None:
        """Pick the next token, stream it to the head, and start the next step (or finish)."""
        logits = self.stage.logits(x, last_only=True)[0, -1].float().cpu()
        token = next_token(logits, st.params, st.generator)
        st.generated += 1
        if token in st.eos:
            reason = "eos"
        elif st.generated >= st.max_new_tokens:
            reason = "length"
        elif st.prompt_len + st.generated > self.arch.context:
            reason = "context"  # feeding this token back would need a position the model does not have
        else:
            reason = ""
        fields = {"req": req, "token": token, "index": st.generated - 1, "done": bool(reason), "reason": reason}
        for r, name in enumerate(self.names):
            # Stage 0 needs every token (it embeds it next); the others only need to hear the end.
            if name != self.me and (r == 0 or reason):
                self.mesh.send(name, "mp.token", fields, tag=req)
        # The head hears of it once the next step is on its way: streaming is off the critical path.
        self.to_heads.append((st.head, fields))
        if reason:
            self.close(req, reason)
        elif self.sc.rank == 0:
            self.work.append((req, token))

    def on_token(self, env: Envelope) -> None:
        f, req = env.fields, env.fields["req"]
        if f["done"]:
            self.close(req, f["reason"])
        elif self.sc.rank == 0:
            if req in self.requests:
                self.work.append((req, f["token"]))
            else:
                self.unknown(req, env)

    def next_step(self, req: str, token: int) -> None:
        st = self.requests.get(req)
        if st is None:  # cancelled meanwhile
            return
        x = self.stage.embed(torch.tensor([[token]], device=self.device), st.cache.length)
        self.forward_out(req, st, self.stage.run_blocks(x, st.cache))

    def unknown(self, req: str, env: Envelope) -> None:
        if req not in self.closed:
            logger.warning(f"{self.me}: {env.kind} from {env.src} for unknown request {req}; dropped")

    def handle(self, env: Envelope) -> None:
        kind = env.kind
        if kind == "mp.submit":
            self.on_submit(env)
        elif kind == "mp.hidden":
            self.on_hidden(env)
        elif kind == "mp.token":
            self.on_token(env)
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

    def run(self) -> None:
        self.connect()
        started = time.monotonic()
        try:
            with torch.inference_mode():
                while not self.stopping:
                    self.mesh.beacon["serving"] = not any(
                        self.mesh.peers[n].lost for n in self.names if n in self.mesh.peers)
                    self.mesh.beacon["requests"] = len(self.requests)
                    try:
                        env = self.mesh.recv(0.0 if self.work else self.sc.heartbeat_s)
                    except PeerLost as e:
                        self.on_lost(e.peer, str(e))
                        continue
                    except PeerError as e:  # a sequence gap: the in-flight requests cannot be trusted
                        logger.error(str(e))
                        for req in list(self.requests):
                            self.fail(req, str(e))
                        continue
                    if env is not None:
                        self.dispatch(env)
                    if self.work:  # one step of a due request per turn: requests interleave fairly
                        req, token = self.work.popleft()
                        try:
                            self.next_step(req, token)
                        except Exception as e:
                            logger.exception(f"{self.me}: the next step of {req} failed")
                            self.fail(req, f"{self.me} failed on a step: {type(e).__name__}: {e}")
                    for head, fields in self.to_heads:
                        if head in self.mesh.peers:
                            self.mesh.send(head, "mp.token", fields, tag=fields["req"])
                    self.to_heads.clear()
                    if (self.sc.exit_with_head and not self.heads
                            and time.monotonic() - started > self.sc.connect_timeout_s):
                        logger.warning(f"{self.me}: no head came within {self.sc.connect_timeout_s:.0f}s; exiting")
                        self.stopping = True
        finally:
            self.mesh.close()

    def dispatch(self, env: Envelope) -> None:
        try:
            self.handle(env)
        except SmolclusterError as e:
            self.fail_env(env, str(e))
        except Exception as e:  # a bug or a bad tensor: fail that request, keep serving the rest
            logger.exception(f"{self.me}: {env.kind} from {env.src} failed")
            self.fail_env(env, f"{self.me} failed on {env.kind}: {type(e).__name__}: {e}")

    def fail_env(self, env: Envelope, message: str) -> None:
        req = env.fields.get("req")
        if isinstance(req, str) and req:
            self.fail(req, message)


def serve(sc: ServeConfig) -> None:
    from smolcluster.telemetry.logging import setup_logging

    setup_logging(role="stage", rank=sc.rank, algo="infer", level=sc.log_level)
    StageServer(sc).run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m smolcluster.inference.serve STAGE.json", file=sys.stderr)
        return 2
    try:
        serve(ServeConfig.loads(Path(argv[0]).read_text()))
    except SmolclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
