"""The sessions: every user's answers multiplexed onto one inference pipeline (or ``replicas`` of them), shared by
the chat page and the HTTP API. (The batching itself is the stages' work: :mod:`smolcluster.inference.stage`.)

    sessions = Sessions(lambda: pipeline_from_config(cfg), max_active=4).start()
    gen = sessions.submit(ids, user="alice", settings=Settings(max_new_tokens=50, stop=("\\nUser:",)))
    for piece in gen.stream():   # text as it is made (stop strings already cut)
        ...
    gen.cancel()                 # the pipeline frees the request's KV caches

Each :class:`Generation` waits for a slot in a :class:`~smolcluster.serving.fair_queue.FairQueue`,
then runs in its own thread: it submits to the pipeline, applies the stop strings and
hands the text to its consumer (a blocking iterator for Gradio, an ``async`` one for
the API). When a stage is lost the pipeline fails every open request; the sessions then
answer at once with :class:`PipelineDown` (never a hang) and, with ``reconnect``,
rebuilds the pipeline in the background with backoff (a cluster's stages keep running;
local stages are started again; with ``cluster=auto`` replicas the coordinator starts a lost stage again on its
agent first, :mod:`smolcluster.node.restarts`).

Replicas. Given one ``connect`` per replica, :class:`Sessions` owns R pipelines behind the same queue:
each answer goes to one (:mod:`smolcluster.serving.router`: the replica holding its prompt's
longest cached prefix, else the least loaded), a lost replica fails only its own answers
(naming it and the stage) and is rebuilt while the others serve.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from loguru import logger

from smolcluster.errors import ConfigError, PeerError, ReplicaGone, SmolclusterError
from smolcluster.inference.sampling import SamplingParams
from smolcluster.serving.fair_queue import FairQueue
from smolcluster.serving.prompting import ChatFormat, ChatTemplate, Transcript
from smolcluster.serving.stops import LeadingSpaceTrimmer, StopMatcher

_END = object()
FINISH_REASONS = {"eos": "stop", "length": "length", "context": "length", "cancelled": "cancelled",
                  "error": "error"}


class PipelineDown(SmolclusterError):
    """The inference pipeline cannot take requests now (a stage is lost, or it is reconnecting)."""


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()    # tokens that end the answer, unshown (a chat template's end of turn)
    stop_at_eos: bool = True
    trim_leading_space: bool = False  # chat answers: drop the space the model puts after "Assistant:"
    adapter: str = ""                 # the LoRA adapter it goes through ("": the base model)

    @classmethod
    def for_chat(cls, fmt: ChatFormat, stop: tuple[str, ...] = (), **kw) -> Settings:
        """An answer in a conversation rendered by ``fmt``: it ends where the format's turn ends."""
        return cls(stop=fmt.stops + tuple(stop), stop_ids=fmt.end_ids, trim_leading_space=fmt.trim_leading_space,
                   **kw)


@dataclass(frozen=True)
class ChatDefaults:
    """What the chat page's controls start at (and the API's chat ``max_tokens`` default)."""

    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams()  # the page's temperature / top-p sliders start at its values
    system_prompt: str = ""
    stop_at_eos: bool = True


@dataclass
class Generation:
    """One answer: queued, then running in the pipeline, then done (``finish_reason`` set)."""

    id: str
    user: str
    prompt_ids: list[int]
    settings: Settings
    text: str = ""                      # what has been released to the consumer so far
    completion_tokens: int = 0          # tokens the model made (a stop string's tokens included)
    finish_reason: str | None = None    # stop | length | cancelled | error
    error: Exception | None = None
    state: str = "queued"               # queued | running | done
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self):
        self._sessions: Sessions | None = None
        self._ticket = None
        self._request = None
        self._cancelled = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: queue.Queue | asyncio.Queue = queue.Queue()
        self._done = threading.Event()

    # -- the consumer's side -----------------------------------------------------------------------
    def stream(self, poll_s: float | None = None) -> Iterator[str | None]:
        """Text pieces as they are made, until the answer ends. With ``poll_s``, also ``None``
        whenever that long passes without any (a chance to show the queue position)."""
        if self._loop is not None:
            raise RuntimeError("this generation streams to an event loop: use astream()")
        while True:
            try:
                ev = self._events.get(timeout=poll_s if poll_s is not None else 1.0)
            except queue.Empty:
                if poll_s is not None:
                    yield None
                continue
            if ev is _END:
                return
            yield ev

    async def astream(self) -> AsyncIterator[str]:
        """Text pieces as they are made (for a generation submitted with ``loop=``)."""
        if self._loop is None:
            raise RuntimeError("this generation was submitted without an event loop: use stream()")
        while True:
            ev = await self._events.get()
            if ev is _END:
                return
            yield ev

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop this answer: leave the queue, or cancel the request in the pipeline (caches freed)."""
        with self._lock:
            if self._cancelled or self.state == "done":
                return
            self._cancelled = True
            request, ticket = self._request, self._ticket
        if request is not None:
            request.cancel()
        elif ticket is not None and self._sessions is not None:
            self._sessions.queue.leave(ticket)  # wakes the runner, which finishes as cancelled

    def position(self) -> int:
        """Requests that will start before this one (0 once it runs)."""
        if self.state != "queued" or self._sessions is None or self._ticket is None:
            return 0
        return self._sessions.queue.position(self._ticket)

    def stats(self) -> dict:
        """Tokens, tokens/s (from submission to the pipeline to the end), time to first token
        (from arrival here, queueing included) and time queued."""
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        run_s = end - self.started_at if self.started_at is not None else None
        return {
            "tokens": self.completion_tokens,
            "tokens_per_s": round(self.completion_tokens / run_s, 1) if run_s else None,
            "ttft_ms": round((self.first_token_at - self.queued_at) * 1000, 1) if self.first_token_at else None,
            "queue_ms": round(((self.started_at or end) - self.queued_at) * 1000, 1),
            "finish_reason": self.finish_reason,
        }

    # -- the runner thread ---------------------------------------------------------------------------
    def _emit(self, item) -> None:
        if self._loop is None:
            self._events.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    def _run(self) -> None:
        sessions, s = self._sessions, self.settings
        reason, replica = "error", None
        try:
            while not sessions.queue.wait(self._ticket, 0.5):
                if sessions.closed:
                    self.cancel()
            with self._lock:
                if self._cancelled:
                    reason = "cancelled"
                    return
                self.state = "running"
            replica, pipe = sessions._route(self)
            request = pipe.submit(self.prompt_ids, max_new_tokens=s.max_new_tokens, sampling=s.sampling,
                                  stop_at_eos=s.stop_at_eos, adapter=s.adapter)
            self.started_at = request.submitted_at
            with self._lock:
                self._request, cancelled = request, self._cancelled
            if cancelled:
                request.cancel()
            stops = StopMatcher(s.stop)
            trim = LeadingSpaceTrimmer() if s.trim_leading_space else None
            stopped_at_id = False
            for tok in request:
                if tok.id >= 0:
                    self.completion_tokens += 1
                    self.first_token_at = self.first_token_at or request.first_token_at
                if tok.id in s.stop_ids:  # counted like the pipeline's EOS, never shown
                    request.cancel()
                    stopped_at_id = True
                    break
                piece = stops.feed(tok.text)
                if stops.stopped:
                    request.cancel()
                piece = trim.feed(piece) if trim is not None else piece
                if piece:
                    self.text += piece
                    self._emit(piece)
                if stops.stopped:
                    break
            tail = stops.flush()
            tail = trim.feed(tail) if trim is not None else tail
            if tail:
                self.text += tail
                self._emit(tail)
            reason = "stop" if stops.stopped or stopped_at_id else FINISH_REASONS.get(request.finish_reason, "stop")
        except PeerError as e:
            pipe_error = replica.error() if replica is not None else None
            self.error = PipelineDown(f"{sessions._whose(replica)} is down: {pipe_error}") if pipe_error else e
        except SmolclusterError as e:  # PipelineDown, or a ConfigError the checks before submit missed
            self.error = e
        except Exception as e:  # a bug: keep the server up, fail this answer, keep the traceback in the log
            logger.exception(f"generation {self.id} failed")
            self.error = e
        finally:
            self.finished_at = time.perf_counter()
            with self._lock:
                self.finish_reason = "error" if self.error is not None else reason
                self.state = "done"
            sessions.queue.leave(self._ticket)
            sessions._forget(self, replica)
            self._done.set()
            self._emit(_END)


@dataclass
class Replica:
    """One pipeline of the sessions' ``replicas``: its connection, state and the head's counts of what it serves."""

    index: int
    connect: Callable[[], object]
    pipe: object = None
    down: str | None = "not started"  # why it takes no requests (None: it does, unless its client failed since)
    served: int = 0                   # requests routed here
    load: int = 0                     # routed here and not finished: active + waiting on its stages
    rebuilding: bool = False
    gone: bool = False                # it will not come back (its connect said ReplicaGone): not rebuilt again

    def error(self) -> str | None:
        pipe, down = self.pipe, self.down
        if pipe is not None and pipe.client.error is not None:
            return str(pipe.client.error)
        return down


class Sessions:
    REBUILD_JOIN_S = 30.0  # close() waits this long for a reconnect in progress (a connect's own timeout ends it)

    def __init__(self, connect: Callable[[], object] | list[Callable[[], object]], *, max_active: int = 16,
                 max_waiting: int = 64, reconnect: bool = True, watch_s: float = 0.25, max_backoff_s: float = 30.0,
                 chat_template: ChatTemplate | None = None, metrics=None, prefix_block: int = 32):
        """``connect()`` returns a ready :class:`~smolcluster.inference.InferencePipeline` (called again
        to reconnect); a list of them: one replica each, every request routed to one (:mod:`.router`,
        ``prefix_block``: the stages' block size). At most ``max_active`` requests run at once, over all replicas;
        at most ``max_waiting`` more wait for a slot. ``chat_template``: the model's, if it has one
        (else conversations become a transcript). ``metrics``: this head's Prometheus figures
        (:func:`~smolcluster.telemetry.serving.open_serving_metrics`), updated every ``watch_s``."""
        from smolcluster.serving.router import Router

        connects = connect if isinstance(connect, list) else [connect]
        self.replicas = [Replica(i, c) for i, c in enumerate(connects)]
        self.router = Router(prefix_block)
        self.chat_template = chat_template
        self.queue = FairQueue(max_active, max_waiting)
        self.reconnect, self.watch_s, self.max_backoff_s = reconnect, watch_s, max_backoff_s
        self.closed = False
        self._lock = threading.Lock()
        self._live: dict[str, Generation] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._rebuilds: list[threading.Thread] = []  # the supervisor's reconnect threads, joined by close()
        self.tokenizer = None
        self.context = 0
        self.vocab_size = 0
        self.model_info: dict = {}
        self.adapters: list[str] = []  # the LoRA adapters the stages serve (what a request may name)
        self.stages = 0
        self.reconnects = 0
        from smolcluster.telemetry.serving import OFF

        self.metrics, self._tokens_done, self._tokens_counted = metrics or OFF, 0, 0

    def start(self) -> Sessions:
        """Connect every replica, at once (raises if one cannot be built), and watch them from then on."""
        pipes: list = [None] * len(self.replicas)

        def build(r: Replica) -> None:
            try:
                pipes[r.index] = r.connect()
            except Exception as e:
                pipes[r.index] = e

        # the first here (a Ctrl-C while it starts unwinds it as it always has), the others beside it
        threads = [threading.Thread(target=build, args=(r,), daemon=True) for r in self.replicas[1:]]
        for t in threads:
            t.start()
        build(self.replicas[0])
        for t in threads:
            t.join()
        failed = next((p for p in pipes if isinstance(p, Exception)), None)
        for r, pipe in zip(self.replicas, pipes):
            if pipe is not None and not isinstance(pipe, Exception):
                self._adopt(r, pipe)
        if failed is not None:
            self.close()
            raise failed
        if self.tokenizer is None:
            self.close()
            raise ConfigError("the pipeline has no tokenizer: the chat and the API work on text (give "
                              "checkpoint= a run directory with tokenizer.json, or the data options)")
        self._supervisor = threading.Thread(target=self._supervise, name="serving-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def _adopt(self, replica: Replica, pipe) -> None:
        with self._lock:
            replica.pipe, replica.down = pipe, None
        self.tokenizer = pipe.tokenizer
        self.context = pipe.context
        self.vocab_size = int(pipe.client.shape["vocab_size"])
        self.model_info = pipe.model_info
        self.adapters = pipe.adapters
        self.stages = pipe.stages

    @property
    def chat_format(self) -> ChatFormat:
        """How a conversation becomes a prompt here: the model's chat template, else a transcript."""
        return self.chat_template or Transcript(self.tokenizer.encode)

    # -- requests --------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], *, user: str, settings: Settings,
               loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue an answer; returns at once. Raises :class:`PipelineDown` when every replica is down,
        :class:`~smolcluster.serving.fair_queue.QueueFull` when too many wait."""
        if self.closed:
            raise PipelineDown("the server is shutting down")
        self.pipeline()  # fail fast rather than queue behind a pipeline that is down
        gen = Generation(f"gen-{next(self._ids)}", user, list(prompt_ids), settings)
        gen._sessions = self
        if loop is not None:
            gen._loop, gen._events = loop, asyncio.Queue()
        gen._ticket = self.queue.join(user)
        with self._lock:
            self._live[gen.id] = gen
        threading.Thread(target=gen._run, name=f"serving-{gen.id}", daemon=True).start()
        return gen

    def cancel_user(self, user: str) -> int:
        """Cancel every answer of ``user`` still queued or running; how many there were."""
        with self._lock:
            gens = [g for g in self._live.values() if g.user == user]
        for g in gens:
            g.cancel()
        return len(gens)

    def live(self) -> list[Generation]:
        with self._lock:
            return list(self._live.values())

    def _route(self, gen: Generation) -> tuple[Replica, object]:
        """The replica ``gen`` runs on (:meth:`Router.pick <smolcluster.serving.router.Router.pick>`), counted
        there until :meth:`_forget`, and its pipeline as it was then (a lost one fails the submit with its error)."""
        keys = self.router.keys(gen.prompt_ids, gen.settings.adapter)
        with self._lock:
            live = [r.error() is None for r in self.replicas]
            i = self.router.pick(keys, [r.load for r in self.replicas], live, [r.served for r in self.replicas])
            if i is not None:
                replica = self.replicas[i]
                replica.load += 1
                replica.served += 1
                self.router.remember(keys, i)
                return replica, replica.pipe
        self.pipeline()  # raises PipelineDown, saying why
        raise PipelineDown("no replica takes requests")  # (a replica came back in between: retry)

    def _forget(self, gen: Generation, replica: Replica | None = None) -> None:
        answered = gen._request is not None and gen.error is None and replica is not None
        keys = self.router.keys(gen.prompt_ids + gen._request.ids, gen.settings.adapter) if answered else []
        with self._lock:
            self._live.pop(gen.id, None)
            self._tokens_done += gen.completion_tokens  # (for the tokens counter: no per-token cost)
            if replica is not None:
                replica.load -= 1
            if keys:  # its stages cached the answer's blocks too: a conversation's next turn starts with them
                self.router.remember(keys, replica.index)

    def _whose(self, replica: Replica | None) -> str:
        if len(self.replicas) == 1 or replica is None:
            return "the inference pipeline"
        return f"replica {replica.index}'s pipeline"

    def _publish(self) -> None:
        """The head's Prometheus figures, from the supervisor thread every ``watch_s``."""
        with self._lock:
            tokens = self._tokens_done + sum(g.completion_tokens for g in self._live.values())
        q = self.queue.stats()
        self.metrics.step(q["active"], q["waiting"])
        if tokens > self._tokens_counted:
            self.metrics.tokens(tokens - self._tokens_counted)
            self._tokens_counted = tokens
        if len(self.replicas) > 1:
            self.metrics.replicas([{"replica": r.index, "up": int(r.error() is None), "load": r.load,
                                    "served": r.served} for r in self.replicas])

    # -- the pipelines' state --------------------------------------------------------------------------
    def pipeline(self):
        """A live replica's pipeline (the first), or :class:`PipelineDown` saying why there is none."""
        for r in self.replicas:
            pipe = r.pipe
            if pipe is not None and r.error() is None:
                return pipe
        more = "; reconnecting in the background, retry in a few seconds" if self.reconnect else \
            "; restart the server"
        if len(self.replicas) == 1:
            raise PipelineDown(f"the inference pipeline is down ({self.replicas[0].error()}){more}")
        why = "; ".join(f"replica {r.index}: {r.error()}" for r in self.replicas)
        raise PipelineDown(f"every replica's inference pipeline is down ({why}){more}")

    def pipeline_error(self) -> str | None:
        """Why no replica takes requests (None: one does)."""
        errors = [r.error() for r in self.replicas]
        if any(e is None for e in errors):
            return None
        return errors[0] if len(errors) == 1 else "; ".join(f"replica {i}: {e}" for i, e in enumerate(errors))

    def health(self) -> dict:
        out: dict = {"status": "ok", "context": self.context, "queue": self.queue.stats(),
                     "reconnects": self.reconnects}
        error = self.pipeline_error()
        if self.closed or error is not None:
            out.update(status="down", message=error or "closed")
        out["stages"], out["replicas"] = [], []
        for r in self.replicas:
            pipe, r_error = r.pipe, r.error()
            entry = {"replica": r.index, "status": "ok" if r_error is None else "down", "served": r.served,
                     "load": r.load, "prefix_hits": None, "message": r_error}
            if pipe is not None:
                client = pipe.client
                info = {s: client.mesh.peers[s].info for s in client.stages}
                out["stages"] += [{"name": s, "replica": r.index, "requests": info[s].get("requests"),
                                   "waiting": info[s].get("waiting"), "kv_bytes": info[s].get("kv_bytes"),
                                   "kv_budget": info[s].get("kv_budget"), "drafted": info[s].get("drafted"),
                                   "accepted": info[s].get("accepted"), "lost": client.mesh.peers[s].lost}
                                  for s in client.stages]
                out["in_flight"] = out.get("in_flight", 0) + client.in_flight()
                entry["prefix_hits"] = info[client.stages[0]].get("prefix_hits")
            out["replicas"].append(entry)
        return out

    def _supervise(self) -> None:
        while not self._stop.wait(self.watch_s):
            self._publish()
            for r in self.replicas:
                self._watch(r)

    def _watch(self, r: Replica) -> None:
        """A lost replica is marked down (its requests fail, new ones go to the others), closed and, with
        ``reconnect``, rebuilt in its own thread while the others serve."""
        with self._lock:
            pipe, error = r.pipe, r.pipe.client.error if r.pipe is not None else None
            if r.rebuilding or r.gone or (pipe is not None and error is None) or (pipe is None and not self.reconnect):
                return
            if pipe is not None:
                r.pipe, r.down = None, str(error)
                self.router.forget(r.index)
            r.rebuilding = True
        if pipe is not None:
            logger.error(f"{self._whose(r)} lost: {error}")
        t = threading.Thread(target=self._rebuild, args=(r, pipe), name=f"serving-rebuild-{r.index}", daemon=True)
        self._rebuilds = [*(x for x in self._rebuilds if x.is_alive()), t]
        t.start()

    def _rebuild(self, r: Replica, old) -> None:
        if old is not None:
            self._close_pipe(old)
        backoff = 1.0
        while self.reconnect and not self._stop.is_set():
            logger.info(f"reconnecting {self._whose(r)}")
            try:
                new = r.connect()
            except ReplicaGone as e:  # (whoever gave up on it said so in its one line)
                with self._lock:
                    r.down, r.gone = str(e), True
                break
            except Exception as e:
                logger.error(f"reconnecting failed: {e}; next try in {backoff:.0f}s")
                with self._lock:
                    r.down = f"{(r.down or '').split('; reconnecting failed')[0]}; reconnecting failed: {e}"
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if self._stop.is_set():
                self._close_pipe(new)
                break
            self._adopt(r, new)
            self.reconnects += 1
            logger.info(f"{self._whose(r)} back")
            break
        with self._lock:
            r.rebuilding = False

    @staticmethod
    def _close_pipe(pipe) -> None:
        try:
            pipe.close()
        except Exception as e:  # a half-dead pipeline may fail to say goodbye; it is gone either way
            logger.debug(f"closing the old pipeline: {e}")

    def close(self) -> None:
        """Cancel every answer, stop watching, shut every replica down (at once). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        for g in self.live():
            g.cancel()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for t in self._rebuilds:  # a pipeline a rebuild adopts now is closed below, not left running
            t.join(timeout=self.REBUILD_JOIN_S)
            if t.is_alive():
                logger.warning(f"{t.name} still connecting after {self.REBUILD_JOIN_S:.0f}s: leaving it (it closes "
                               "what it builds once it sees the sessions closed)")
        with self._lock:
            pipes = [r.pipe for r in self.replicas if r.pipe is not None]
            for r in self.replicas:
                r.pipe, r.down = None, "closed"
        closing = [threading.Thread(target=self._close_pipe, args=(p,), daemon=True) for p in pipes]
        for t in closing:
            t.start()
        for t in closing:
            t.join()
        self.metrics.close()
