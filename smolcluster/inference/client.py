"""The head: the caller's end of an inference pipeline. Submit token ids, stream tokens back, cancel.

:class:`PipelineClient` links to every stage (it binds its own inbox and announces it
in its heartbeats, so stages that run all the time learn of it), waits until every
stage is linked and serving, then runs one I/O thread that receives tokens and
hands them to their :class:`Request`. ``submit`` and ``cancel`` may be called from
any thread. A stage that stops heartbeating fails every open request with a
:class:`~smolcluster.errors.PeerError` within ``liveness_s``; nothing waits forever.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from loguru import logger

from smolcluster.errors import ConfigError, PeerError
from smolcluster.inference.adapters import unknown_adapter
from smolcluster.inference.sampling import SamplingParams
from smolcluster.pipeline.mesh import Mesh, PeerLost
from smolcluster.pipeline.partition import stage_name

_DONE = object()
# A head still waiting for its stages after this long says so once: stages that compile their decode step
# (compile=true, or auto where it pays) answer only after compiling, minutes the first time.
WAIT_NOTICE_S = 10.0


@dataclass(frozen=True)
class Token:
    id: int
    text: str    # the text this token adds (may be "" while a multi-byte character is incomplete)
    index: int   # 0 for the first generated token


class Request:
    """One generation in flight. Iterate it for :class:`Token` as they arrive; ``cancel()`` to stop it."""

    def __init__(self, client: PipelineClient, req_id: str, prompt_ids: list[int], params: SamplingParams,
                 max_new_tokens: int, decode=None):
        self.id, self.prompt_ids, self.params = req_id, prompt_ids, params
        self.seed, self.max_new_tokens = params.seed, max_new_tokens
        self.ids: list[int] = []
        self.finish_reason: str | None = None  # eos | length | context | cancelled | error
        self.error: Exception | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.token_at: list[float] = []  # when each token arrived (per-token latency)
        self.finished_at: float | None = None
        self.drafted = self.accepted = 0  # speculative decoding: tokens proposed for it, and kept
        self._client, self._decode = client, decode
        self._events: queue.Queue = queue.Queue()
        self._finished = threading.Event()
        self._text = ""

    # -- called by the I/O thread -----------------------------------------------------------
    def _push(self, tokens: list[int], index: int, ages: list[float], done: bool, reason: str) -> None:
        """Tokens from ``index`` on; each was made ``ages[i]`` seconds before its stage sent them (a stage holds
        a request's tokens up to ``stream_interval_ms`` and sends them together)."""
        now = time.perf_counter()
        for i, (token, age) in enumerate(zip(tokens, ages)):
            self.token_at.append(now - age)
            if self.first_token_at is None:
                self.first_token_at = self.token_at[-1]
            self._events.put((token, index + i))
        if done:
            self._finish(reason)

    def _finish(self, reason: str, error: Exception | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self.finished_at = time.perf_counter()
            self._events.put(error if error is not None else _DONE)
            self._finished.set()

    # -- the caller's side ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Token]:
        while True:
            try:
                ev = self._events.get(timeout=0.25)
            except queue.Empty:
                err = self._client.error
                if err is not None and self.finish_reason is None:
                    self._finish("error", err)
                continue
            if ev is _DONE:
                tail = self._flush_text()
                if tail:
                    yield Token(-1, tail, len(self.ids))  # the rest of an incomplete character at the end
                return
            if isinstance(ev, Exception):
                raise ev
            token, index = ev
            self.ids.append(token)
            yield Token(token, self._new_text(), index)

    def _new_text(self) -> str:
        if self._decode is None:
            return ""
        full = self._decode(self.ids)
        if full.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        piece, self._text = full[len(self._text):], full
        return piece

    def _flush_text(self) -> str:
        if self._decode is None:
            return ""
        full = self._decode(self.ids)
        piece, self._text = full[len(self._text):], full
        return piece

    def wait(self) -> None:
        """Block until the request ends (without waking per token); raise its error if it failed."""
        while not self._finished.wait(timeout=0.25):
            err = self._client.error
            if err is not None:
                self._finish("error", err)
        while True:  # move what arrived into self.ids
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(ev, Exception):
                raise ev
            if ev is not _DONE:
                self.ids.append(ev[0])

    def tokens(self) -> list[int]:
        """Wait for the end and return every generated token id."""
        self.wait()
        return list(self.ids)

    def text(self) -> str:
        """Wait for the end and return the generated text."""
        self.wait()
        return self._decode(self.ids) if self._decode is not None else ""

    def cancel(self) -> None:
        """Stop generating; every stage frees this request's KV cache."""
        self._client.cancel(self)


def check_same_adapters(served: list[dict[str, str]]) -> None:
    """``served[r]``: stage r's ``{adapter name: digest}``. Every stage must serve the same adapters (in any
    order): a request's rows go through the adapter its name means on each stage."""
    for name in sorted(set().union(*served)):
        digests = [s.get(name) for s in served]
        if len(set(digests)) > 1:
            have = [r for r, d in enumerate(digests) if d is not None]
            lacking = [r for r, d in enumerate(digests) if d is None]
            problem = (f"stages {lacking} do not serve it, stages {have} do" if lacking else
                       "its files differ between stages " + ", ".join(f"{r} ({d[:12]})" for r, d in enumerate(digests)))
            raise ConfigError(f"adapter {name!r}: {problem}: start every stage with the same adapters= "
                              "(the same files under each name)")


class PipelineClient:
    def __init__(self, addresses: list[str], *, host: str = "127.0.0.1", port: int = 0, heartbeat_s: float = 1.0,
                 liveness_s: float = 10.0, connect_timeout_s: float = 60.0, max_bytes: int = 2 << 30,
                 keys_dir: str | None = None, decode=None, hint: str = ""):
        if not addresses:
            raise ConfigError("no stage addresses: give every stage's tcp://host:port")
        self.name = f"h{uuid.uuid4().hex[:8]}"
        self.decode = decode
        self.heartbeat_s = heartbeat_s
        # The stages connect back to this inbox: host must be this machine's address as they see it.
        self.mesh = Mesh(self.name, f"tcp://{host}:{port}", heartbeat_s=heartbeat_s, liveness_s=liveness_s,
                         max_bytes=max_bytes, keys_dir=keys_dir)
        self.mesh.beacon = {"head": True, "address": self.mesh.address}
        self.stages = [stage_name(r) for r in range(len(addresses))]
        for name, address in zip(self.stages, addresses):
            self.mesh.add_peer(name, address)
        self.mesh.on_restarted = self._stage_restarted
        self.error: PeerError | None = None
        self._requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        try:
            self._handshake(connect_timeout_s, hint)
        except BaseException:
            self.mesh.close()
            raise
        self._thread = threading.Thread(target=self._io_loop, name=f"pipeline-head-{self.name}", daemon=True)
        self._thread.start()

    @staticmethod
    def _stage_restarted(src: str, message: str) -> None:
        raise PeerLost(src, message)  # its requests' KV caches went with it: lost, however fast it came back

    def _handshake(self, timeout_s: float, hint: str = "") -> None:
        """``hint``: what a timeout's message adds (e.g. that compile=true stages answer late)."""
        deadline = time.monotonic() + timeout_s
        slow = ": stages that compile their decode step answer once compiled (minutes the first time)" if hint else ""
        self.mesh.wait_ready(self.stages, timeout_s, f" (the inference stages{hint})", notice=(WAIT_NOTICE_S, slow))
        while not all(self.mesh.peers[s].info.get("serving") for s in self.stages):
            if time.monotonic() > deadline:
                waiting = [s for s in self.stages if not self.mesh.peers[s].info.get("serving")]
                raise PeerError(f"stages {', '.join(waiting)} answer but are not serving after {timeout_s:.0f}s: "
                                "they are still linking to each other (check their logs)")
            self.mesh.recv(0.05, check_liveness=False)
        infos = [self.mesh.peers[s].info for s in self.stages]
        for r, info in enumerate(infos):
            if info.get("rank") != r or info.get("stages") != len(self.stages):
                raise ConfigError(f"the stage at {self.mesh.peers[self.stages[r]].address} is rank "
                                  f"{info.get('rank')} of {info.get('stages')}, but this head expects rank {r} of "
                                  f"{len(self.stages)}: list the stage addresses in rank order")
            if info.get("shape") != infos[0].get("shape"):
                raise ConfigError(f"stage {r} serves a model of shape {info.get('shape')}, stage 0 "
                                  f"{infos[0].get('shape')}: start every stage with the same weights")
        check_same_adapters([info.get("adapters") or {} for info in infos])
        blocks = [info.get("prefix_block", 0) for info in infos]
        if len(set(blocks)) > 1:  # stage 0 decides what every stage reuses: the others must hold the same blocks
            raise ConfigError(f"the stages' prefix caches differ (serve.prefix_block per stage, 0: off: {blocks}): "
                              "start every stage with the same serve.prefix_cache and serve.prefix_block")
        self.shape = dict(infos[0]["shape"])
        self.head_rank = int(infos[0]["head_rank"])
        self.partition = [info.get("blocks") for info in infos]
        self.kernels = [info.get("kernels", "") for info in infos]  # each stage's matmul kernels, in words
        self.decode_steps = [info.get("decode", "") for info in infos]  # each stage's decode step: compiled or eager
        self.adapters: list[str] = list(infos[0].get("adapters") or {})  # the LoRA adapters a request may name

    @property
    def context(self) -> int:
        return int(self.shape["n_positions"])

    # -- requests ---------------------------------------------------------------------------
    def submit(self, ids: list[int], *, max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
               eos: int | list[int] | None = None, adapter: str = "", speculate: str = "") -> Request:
        """Start generating ``ids``' continuation; it stops at any id in ``eos`` (one id or several).
        ``sampling``: its seed None picks one (``request.params.seed``).
        ``adapter``: one of the stages' LoRA adapters (``self.adapters``), or "" for the base model.
        ``speculate``: its drafter, "" (the stages' ``speculate`` default), off, lookup or draft."""
        if self.error is not None:
            raise self.error
        if self._closed:
            raise PeerError("this pipeline is closed")
        ids = [int(t) for t in ids]
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if len(ids) > self.context:
            raise ConfigError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                              f"{self.context}: shorten it (the pipeline never truncates silently)")
        vocab = int(self.shape["vocab_size"])
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"prompt token ids must be in [0, {vocab}): is the tokenizer the model's?")
        if adapter and adapter not in self.adapters:
            raise ConfigError(unknown_adapter(adapter, self.adapters))
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        params = sampling.check().resolved()
        req = Request(self, f"{self.name}-{next(self._ids)}", ids, params, max_new_tokens, self.decode)
        with self._lock:
            self._requests[req.id] = req
        fields = {"req": req.id, "max_new_tokens": max_new_tokens, **params.to_wire(), "adapter": adapter,
                  "speculate": str(speculate),
                  "eos": [] if eos is None else [int(eos)] if isinstance(eos, (int, np.integer)) else [int(t) for t in eos]}
        self.mesh.send(self.stages[0], "mp.submit", fields, {"ids": np.asarray(ids, dtype=np.int64)}, tag=req.id)
        return req

    def cancel(self, req: Request) -> None:
        with self._lock:
            live = self._requests.pop(req.id, None) is not None
        if live and self.error is None and not self._closed:
            for s in self.stages:
                self.mesh.send(s, "mp.cancel", {"req": req.id}, tag=req.id)
        req._finish("cancelled")

    def in_flight(self) -> int:
        with self._lock:
            return len(self._requests)

    # -- the I/O thread ---------------------------------------------------------------------
    def _io_loop(self) -> None:
        while not self._closed:
            try:
                env = self.mesh.recv(min(0.25, self.heartbeat_s))
            except PeerLost as e:
                self._fail_all(PeerError(f"pipeline stage lost: {e}; the open requests cannot finish"))
                return
            except PeerError as e:
                self._fail_all(e)
                return
            except Exception as e:  # the sockets were closed under us (close() from another thread)
                if not self._closed:
                    self._fail_all(PeerError(f"the pipeline head failed: {e}"))
                return
            if env is None:
                continue
            if env.kind == "mp.lost":  # a stage noticed first that its neighbour is gone
                self._fail_all(PeerError(f"pipeline stage lost: {env.fields['message']}; "
                                         "the open requests cannot finish"))
                return
            req_id = env.fields.get("req")
            with self._lock:
                req = self._requests.get(req_id) if isinstance(req_id, str) else None
                if req is not None and (env.kind == "mp.error" or (env.kind == "mp.token" and env.fields["done"])):
                    del self._requests[req_id]
            if env.kind == "mp.token":
                f = env.fields
                tokens, ages = f["tokens"], f["ages"]
                if (len(tokens) != len(ages) or not all(type(t) is int for t in tokens)
                        or not all(type(a) in (int, float) and 0 <= a < 3600 for a in ages)):
                    problem = (f"a malformed mp.token from {env.src}: {len(tokens)} tokens, {len(ages)} ages "
                               "(are the stages running this version of smolcluster?)")
                    logger.error(f"head: {problem}")
                    if req is not None:  # its tokens are lost: the request cannot go on
                        with self._lock:
                            self._requests.pop(req.id, None)
                        req._finish("error", PeerError(problem))
                elif req is not None:
                    req.drafted, req.accepted = f["drafted"], f["accepted"]
                    req._push(tokens, f["index"], ages, f["done"], f["reason"])
            elif env.kind == "mp.error":
                if req is not None:
                    req._finish("error", PeerError(env.fields["message"]))
                else:
                    logger.warning(f"pipeline error from {env.src}: {env.fields['message']}")
            elif env.kind != "mp.bye":
                logger.warning(f"head ignored {env.kind!r} from {env.src}")

    def _fail_all(self, error: PeerError) -> None:
        logger.error(str(error))
        self.error = error
        with self._lock:
            reqs, self._requests = list(self._requests.values()), {}
        for r in reqs:
            r._finish("error", error)

    def close(self, shutdown_stages: bool = False) -> None:
        if self._closed:
            return
        try:  # tell every stage still there, even when another was lost
            for s in self.stages:
                if not self.mesh.peers[s].lost:
                    self.mesh.send(s, "mp.shutdown" if shutdown_stages else "mp.bye", {})
            time.sleep(0.05)  # let those leave before linger=0 closes the socket
        except Exception as e:
            logger.debug(f"head close: {e}")
        self._closed = True
        self._thread.join(timeout=2)
        with self._lock:
            reqs, self._requests = list(self._requests.values()), {}
        for r in reqs:
            r._finish("cancelled")
        self.mesh.close()
