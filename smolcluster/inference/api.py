"""``InferencePipeline``: the Python API over a pipeline of inference stages (the chat app uses it).

    from smolcluster.inference import InferencePipeline

    with InferencePipeline.start_local("runs/my-run", stages=2) as pipe:   # or .connect([...])
        req = pipe.submit("Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.95, seed=1)
        for tok in req:                       # Token(id, text, index), streamed as made
            print(tok.text, end="", flush=True)
        # req.cancel() frees the request's KV cache on every stage

``submit`` is thread-safe and returns at once; many requests may be in flight. A
lost stage raises :class:`~smolcluster.errors.PeerError` from the iteration (and from
later submits) within ``liveness_s``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from loguru import logger

from smolcluster.errors import ConfigError, PeerError
from smolcluster.inference.adapters import check_adapters
from smolcluster.inference.client import PipelineClient, Request
from smolcluster.inference.sampling import WIRE_FIELDS, SamplingParams
from smolcluster.inference.stage import ServeConfig
from smolcluster.launch.local import free_ports
from smolcluster.launch.supervisor import Children
from smolcluster.launch.threads import co_located_env, stage_env
from smolcluster.pipeline.quantize import StageFormat, resolve_device
from smolcluster.pipeline.weights import eos_ids, find_model


def describe_weights(source: str | Path, n_head: int | None = None, default_n_head: int | None = None) -> dict:
    """Where a model's weights and settings are: a Hugging Face model dir, a run dir, or a .safetensors file.

    Returns ``{"weights": dir or file, "config": config.json dict, "tokenizer": path or None,
    "eos": [ids] or None}``. ``n_head`` / ``default_n_head``: for a GPT-2 checkpoint that does
    not record it (see :func:`smolcluster.pipeline.weights.find_model`).
    """
    model = find_model(source, n_head, default_n_head)
    d = model.directory
    tokenizer = d / "tokenizer.json" if d is not None and (d / "tokenizer.json").is_file() else None
    if tokenizer is None and d is not None and d.name == "hf" and (d.parent / "tokenizer.json").is_file():
        tokenizer = d.parent / "tokenizer.json"
    return {"weights": model.weights, "config": model.config, "tokenizer": tokenizer, "eos": eos_ids(model)}


def checked_formats(base: dict, given: list[dict] | None, stages: int) -> list[dict]:
    """Each stage's format: ``base`` with ``given[rank]``'s keys over it, each checked here, in one line, before any
    stage starts."""
    given = list(given or [])
    formats = [{**base, **{k: v for k, v in (given[r] if r < len(given) else {}).items() if v is not None}}
               for r in range(stages)]
    for f in formats:
        StageFormat(f["precision"], f["quantize"], f["quantize_group"], resolve_device(f["device"]))
    return formats


# compile=true (or auto, where a stage finds it pays): stages compile every bucket's graph before they answer;
# cold, on a small busy CPU, that takes minutes, more than the usual connect timeouts. The heads and stages wait
# at least this long.
COMPILE_CONNECT_S = 900.0


def connect_wait(timeout_s: float, compile: bool | str) -> tuple[float, str]:
    """The connect timeout (raised where stages may compile: ``compile=true|auto``) and what a timeout's message
    adds."""
    from smolcluster.inference.settings import compile_mode

    mode = compile_mode(compile)
    if mode == "false":
        return timeout_s, ""
    return max(timeout_s, COMPILE_CONNECT_S), (
        f"; with compile={mode} a stage may answer only after compiling (minutes cold): raise "
        f"cluster.connect_timeout_s (waited {max(timeout_s, COMPILE_CONNECT_S):.0f}s) or set compile=false")


def check_compile(compile: bool | str, adapters) -> str:
    """``compile`` as settings.compile_mode says it (what a stage's ServeConfig carries). ``compile=true``
    compiles stages without LoRA adapters (fp32, bf16, int8, int4): refused here, before any stage starts (each
    stage checks again, StageServer.open_compiled). ``compile=auto`` leaves them eager."""
    from smolcluster.inference.settings import compile_mode

    mode = compile_mode(compile)
    if mode == "true" and adapters:
        raise ConfigError("compile=true compiles stages without LoRA adapters for now; this pipeline has LoRA "
                          "adapters: set compile=false (or auto)")
    return mode


def check_speculate(speculate: dict | None, config: dict) -> dict:
    """``speculate`` (settings.Speculate's fields) checked against the model before any stage starts ({}: off)."""
    from smolcluster.inference.settings import Speculate

    spec = Speculate(**(speculate or {})).check().check_draft().fields()
    if spec.get("draft"):
        from smolcluster.inference.speculate import draft_config

        draft_config(spec["draft"], config)
    return spec


class InferencePipeline:
    def __init__(self, client: PipelineClient, tokenizer=None, eos_ids: int | list[int] | None = None,
                 children: Children | None = None, workdir: Path | None = None):
        self.client, self.tokenizer = client, tokenizer
        self.eos_ids: list[int] = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        self._children = children
        self._cleanup: list[Path] = [workdir] if workdir is not None else []

    # -- making one ---------------------------------------------------------------------------
    @classmethod
    def start_local(cls, weights: str | Path, *, stages: int = 2, n_head: int | None = None,
                    head: str = "first", tokenizer=None, eos_ids: int | list[int] | None = None,
                    stage_weights: list[float] | None = None, host: str = "127.0.0.1",
                    heartbeat_s: float = 1.0, liveness_s: float = 10.0, connect_timeout_s: float = 120.0,
                    threads: int | None = None, log_path: str | Path | None = None,
                    max_requests: int = 64, kv_cache_mb: float | None = None, prefill_chunk: int = 256,
                    stream_interval_ms: float = 20.0, env: dict | None = None, precision: str = "fp32",
                    quantize: str = "none", quantize_group: int = 64, device: str | None = None,
                    formats: list[dict] | None = None, telemetry: dict | None = None,
                    co_located: bool = True, turns: bool | None = None,
                    adapters: dict[str, str] | None = None, speculate: dict | None = None,
                    prefix_cache: bool = True, prefix_block: int = 32, compile: bool | str = False,
                    compile_slots: int = 4) -> InferencePipeline:
        """Start ``stages`` stage processes on this machine and connect to them.

        ``weights``: a Hugging Face model directory (any supported family), a run directory
        written by ``train``, or a whole-model GPT-2 ``.safetensors`` file (then give ``n_head``).
        ``eos_ids``: generation stops at any of them (default: the model's
        ``generation_config.json``, else ``config.json``, else the tokenizer's). ``head``: ``first``
        keeps the LM head on stage 0 with the embedding it is tied to (each stage holds
        only its share); ``last`` puts it on the last stage as in training. ``tokenizer``:
        an object with ``encode``/``decode`` (default: the run's ``tokenizer.json`` if any).
        ``kv_cache_mb``: each stage's KV-cache budget (default a quarter of the node's memory);
        requests beyond it wait at stage 0. ``prefill_chunk``: prompt tokens per batched step at most.
        ``stream_interval_ms``: a request's tokens reach this head at most this often, together (its first and
        last at once; 0: each token as it is made); each keeps the time it was made.
        ``precision`` / ``quantize`` / ``quantize_group`` / ``device``: how every stage holds its weights
        (:mod:`smolcluster.pipeline.quantize`); ``formats[i]`` (those keys) overrides them for stage i.
        ``telemetry``: ``{"prometheus_port", "run_dir", "run_id"}``: each stage serves its figures there and
        announces itself in ``run_dir/endpoints/`` (:mod:`smolcluster.telemetry.serving`).
        ``co_located`` (default): the stages share this machine's cores: when a stage is large enough for
        threads to pay (``turns``; None: 16M parameters or more) they take turns, each with all the cores
        (or ``threads``), on one step of every running request; else each has ``cores // stages`` threads
        and they work on ``stages`` steps at once, as stages on separate machines do (``co_located=False``).
        ``adapters``: ``{name: PEFT directory}``, LoRA adapters a request may name (``submit(adapter=name)``),
        each checked against the model here, before any stage starts (:mod:`smolcluster.inference.adapters`).
        ``speculate``: settings.Speculate's fields; stage 0 proposes up to k tokens a pass (:mod:`.speculate`).
        ``prefix_cache``: stages keep served prefixes' KV in blocks of ``prefix_block`` tokens (:mod:`.prefix`).
        ``compile``: decode steps of up to ``compile_slots`` requests through ``torch.compile`` (``"auto"``: where
        it pays, :mod:`.compiled`), compiled before a stage serves (minutes cold): the wait is ``COMPILE_CONNECT_S``.
        """
        if head not in ("first", "last"):
            raise ConfigError(f"head={head!r} is invalid: choose first or last")
        info = describe_weights(weights, n_head)
        if tokenizer is None and info["tokenizer"] is not None:
            from smolcluster.data.text import TextTokenizer

            tokenizer = TextTokenizer.load(info["tokenizer"])
        formats = checked_formats({"precision": precision, "quantize": quantize, "quantize_group": quantize_group,
                                   "device": device}, formats, stages)
        adapters = check_adapters(adapters, info["config"])
        compile = check_compile(compile, adapters)
        speculate = check_speculate(speculate, info["config"])
        if eos_ids is None:
            eos_ids = info["eos"] if info["eos"] is not None else getattr(tokenizer, "eos_id", None)
        connect_timeout_s, hint = connect_wait(connect_timeout_s, compile)
        workdir = Path(tempfile.mkdtemp(prefix="smolcluster-infer-"))
        base = free_ports(host, stages)
        nodes = [{"address": f"tcp://{host}:{base + r}", "bind": f"tcp://{host}:{base + r}"} for r in range(stages)]
        children = Children(log_path)
        try:
            cls._start_stages(
                children, workdir, nodes, formats, env, weights=str(info["weights"]), config=info["config"],
                head_first=head == "first", stage_weights=stage_weights, heartbeat_s=heartbeat_s,
                liveness_s=liveness_s, connect_timeout_s=connect_timeout_s, exit_with_head=True, threads=threads,
                max_requests=max_requests, kv_cache_mb=kv_cache_mb, prefill_chunk=prefill_chunk,
                stream_interval_ms=stream_interval_ms, co_located=co_located, turns=turns, adapters=adapters,
                speculate=speculate, prefix_cache=prefix_cache, prefix_block=prefix_block, compile=compile,
                compile_slots=compile_slots, extra={"telemetry": telemetry or {}})
            client = cls._connect_while_watching(children, [n["address"] for n in nodes], host=host,
                                                 heartbeat_s=heartbeat_s, liveness_s=liveness_s,
                                                 connect_timeout_s=connect_timeout_s, hint=hint,
                                                 decode=tokenizer.decode if tokenizer is not None else None)
        except BaseException:
            children.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        logger.info(f"inference pipeline: {stages} local stages, blocks {client.partition}, head {client.head_rank}")
        return cls(client, tokenizer, eos_ids, children, workdir)

    @staticmethod
    def _start_stages(children: Children, workdir: Path, nodes: list[dict], formats: list[dict], env: dict | None,
                      **serve) -> None:
        """A stage process per entry of ``nodes``, each from its ServeConfig (``serve`` and its ``formats[rank]``)
        written as JSON in ``workdir``."""
        stages, threads, co_located = len(nodes), serve["threads"], serve["co_located"]
        for rank in range(stages):
            sc = ServeConfig(rank=rank, n_stages=stages, nodes=nodes, **serve, **formats[rank])
            path = workdir / f"stage-{rank}.json"
            path.write_text(sc.dumps())
            children.start(f"stage {rank}", [sys.executable, "-u", "-m", "smolcluster.inference.stage", str(path)],
                           stage_env(stages, co_located_env(env) if co_located else env,
                                     threads or (os.cpu_count() if co_located else None)))

    @staticmethod
    def _connect_while_watching(children: Children, addresses: list[str], **kw) -> PipelineClient:
        """Connect, but give up at once (naming the stage) if a stage process dies while starting."""
        import threading

        result: dict = {}

        def connect() -> None:
            try:
                result["client"] = PipelineClient(addresses, **kw)
            except BaseException as e:
                result["error"] = e

        t = threading.Thread(target=connect, daemon=True)
        t.start()
        try:
            children.wait(until=lambda: not t.is_alive())
        except PeerError as e:
            t.join(timeout=1)
            if "client" in result:
                result["client"].close()
            raise ConfigError(f"{e} while starting (its log is above)") from None
        if "error" in result:
            raise result["error"]
        return result["client"]

    @classmethod
    def connect(cls, addresses: list[str], *, tokenizer=None, eos_ids: int | list[int] | None = None,
                host: str = "127.0.0.1",
                port: int = 0, heartbeat_s: float = 1.0, liveness_s: float = 10.0, connect_timeout_s: float = 60.0,
                keys_dir: str | None = None, compile: bool | str = False) -> InferencePipeline:
        """Use stages already running (``python -m smolcluster.infer role=stage rank=N`` on each node).

        ``host`` is this machine's address as the stages can reach it (they connect back to it,
        on ``port``; 0 = any free port). ``compile``: the stages compile before answering (a longer wait).
        """
        connect_timeout_s, hint = connect_wait(connect_timeout_s, compile)
        client = PipelineClient(addresses, host=host, port=port, heartbeat_s=heartbeat_s, liveness_s=liveness_s,
                                connect_timeout_s=connect_timeout_s, keys_dir=keys_dir, hint=hint,
                                decode=tokenizer.decode if tokenizer is not None else None)
        return cls(client, tokenizer, eos_ids if eos_ids is not None else getattr(tokenizer, "eos_id", None))

    # -- using it -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this pipeline has no tokenizer: pass token ids, or a tokenizer")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def submit(self, prompt: str | list[int], *, max_new_tokens: int = 64, sampling: SamplingParams | None = None,
               stop_at_eos: bool = True, adapter: str | None = None, speculate: str = "", **knobs) -> Request:
        """Start generating; returns at once. ``sampling`` (default :class:`SamplingParams`: greedy), or its
        fields one by one (``temperature=0.8, top_p=0.95, seed=1``: they replace ``sampling``'s); a seed of
        None picks one (``request.seed``). ``adapter``: one of :attr:`adapters` (None: the base model);
        ``speculate``: the drafter ("": the stages' default; off, lookup or draft: docs/inference.md).
        Raises ConfigError for a bad prompt (e.g. longer than the context), a bad sampling value, or an
        adapter the stages do not serve."""
        unknown = set(knobs) - set(WIRE_FIELDS)
        if unknown:
            raise ConfigError(f"submit() got {sorted(unknown)}: the sampling keywords are {list(WIRE_FIELDS)}")
        sampling = replace(sampling or SamplingParams(), **knobs)
        eos = self.eos_ids if stop_at_eos else None
        return self.client.submit(self.encode(prompt), max_new_tokens=max_new_tokens, sampling=sampling, eos=eos,
                                  adapter=adapter or "", speculate=speculate)

    def generate(self, prompt: str | list[int], **kw) -> str:
        """Submit and wait: the generated text."""
        return self.submit(prompt, **kw).text()

    @property
    def context(self) -> int:
        """The model's context length (prompt + generated tokens)."""
        return self.client.context

    @property
    def model_info(self) -> dict:
        """What /v1/models reports: the architecture, context length, vocabulary size, each stage's matmul kernels
        and decode step."""
        return {"architecture": self.client.shape.get("model_type", "gpt2"), "context": self.client.context,
                "vocab_size": self.client.shape["vocab_size"], "kernels": self.client.kernels,
                "decode": self.client.decode_steps}

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters a request may name (every stage serves the same)."""
        return self.client.adapters

    @property
    def stages(self) -> int:
        return len(self.client.stages)

    def close(self) -> None:
        """Stop (and, when started here, shut down) the pipeline. Safe to call twice."""
        self.client.close(shutdown_stages=self._children is not None)
        if self._children is not None:
            self._children.stop(grace_s=5.0, exit_first_s=3.0)
            self._children = None
        for d in self._cleanup:
            shutil.rmtree(d, ignore_errors=True)
        self._cleanup = []

    def __enter__(self) -> InferencePipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
