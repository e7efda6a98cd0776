"""The ``infer`` command's settings, and the pipeline settings ``chat`` shares, as typed dataclasses: read from
Hydra once, at the edge.

``conf/infer.yaml`` is validated against :class:`InferConfig` (registered in Hydra's ConfigStore and named
first in the file's defaults list), so a mistyped override fails before anything starts, naming the key
and what it accepts (``max_new_tokens=abc``, ``role=bogus``, ``head=middle``). ``infer.py`` then turns the
composed config into these objects with :func:`infer_settings`; nothing below it reads a DictConfig.
The chat command's own settings (``serve.*``, its schema) are in :mod:`smolcluster.serving.settings`, built
on :class:`CommonSchema` and :func:`pipeline_settings` here.

The model, data and cluster groups stay open (any ``_target_`` model takes its own keys,
a cluster file may carry keys for other commands): the model and data arrive as plain dicts,
the cluster as training's :class:`~smolcluster.train_settings.ClusterSpec` (one type for it:
its byte limit converted once, its cluster=auto keys typed for the coordinator).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any  # noqa: UP035 -- Hydra's structured configs need typing.Optional on py3.10

from hydra.core.config_store import ConfigStore
from loguru import logger
from omegaconf import MISSING, DictConfig, OmegaConf

from smolcluster.errors import ConfigError
from smolcluster.inference.sampling import SamplingParams
from smolcluster.train_settings import ClusterSpec


class Role(Enum):
    launch = "launch"  # start the stages here, as child processes
    head = "head"      # connect to stages already running
    stage = "stage"    # serve one stage of a cluster (infer only)


class HeadPlace(Enum):
    first = "first"  # the LM head on stage 0, beside the embedding it is tied to (held once)
    last = "last"    # on the last stage, as in training


@dataclass
class Speculate:
    """Speculative decoding (``speculate.*``): stage 0 proposes ``k`` tokens per decode, the pipeline scores them
    in one pass (:mod:`smolcluster.inference.speculate`). ``lookup``: the longest n-gram (up to ``lookup``
    tokens) ending the context is found earlier in it and what followed is proposed; ``draft``: a small Hugging
    Face model directory with the target's tokenizer, run on stage 0. Both given: ``draft`` is the default
    and a request may name either (``submit(speculate="lookup")``). ``adaptive``: ``k`` is the most a greedy
    request proposes, its own count chosen each pass from its acceptance and the measured costs (speculate.py);
    ``confidence``: a draft model stops proposing after a token it gives less than this probability."""

    k: int = 0                 # tokens proposed per decode step at most (0: off)
    lookup: int = 0            # prompt-lookup n-gram size (0: off)
    draft: str | None = None   # a draft model directory (None: off)
    adaptive: bool = True      # a greedy request's count of proposals follows its acceptance (up to k)
    confidence: float = 0.0    # the draft model stops after a proposal it is less sure of (0: off)

    def check(self) -> Speculate:
        if self.k < 0:
            raise ConfigError(f"speculate.k={self.k} is invalid: use 0 (off) or the tokens to propose per step")
        if self.lookup < 0:
            raise ConfigError(f"speculate.lookup={self.lookup} is invalid: use 0 (off) or an n-gram size (e.g. 3)")
        if not 0.0 <= self.confidence < 1.0:
            raise ConfigError(f"speculate.confidence={self.confidence} is invalid: use a probability in [0, 1) "
                              "(0: the draft model always proposes k; e.g. 0.4)")
        if self.k and not self.lookup and not self.draft:
            raise ConfigError(f"speculate.k={self.k} needs a drafter: add speculate.lookup=N (n-grams from the "
                              "context) or speculate.draft=DIR (a small model with the same tokenizer)")
        return self

    def check_draft(self) -> Speculate:
        """The draft directory, where it is read (stage 0's node, or the launching machine)."""
        if self.k and self.draft and not (Path(self.draft).expanduser() / "config.json").is_file():
            raise ConfigError(f"speculate.draft={self.draft}: no config.json there; give a Hugging Face model "
                              "directory (save_pretrained's output) of a model with the target's tokenizer")
        return self

    def fields(self) -> dict:
        """What a stage's :class:`~smolcluster.inference.stage.ServeConfig` carries ({} when off)."""
        if not self.k:
            return {}
        draft = str(Path(self.draft).expanduser().resolve()) if self.draft else None
        return {"k": self.k, "lookup": self.lookup, "draft": draft, "adaptive": bool(self.adaptive),
                "confidence": float(self.confidence)}


@dataclass
class Pipeline:
    """Which model, how many stages, and this process's part in them."""

    model: dict = field(default_factory=dict)   # the model group (name, _target_, pretrained, shape keys)
    data: dict = field(default_factory=dict)    # the data group: rebuilds a run's tokenizer when it has none
    checkpoint: str | None = None
    stages: int = 2
    head: HeadPlace = HeadPlace.first
    role: Role = Role.launch
    rank: int | None = None
    head_host: str | None = None
    head_port: int = 0
    stage_log_level: str | None = None
    seed: int = 0
    kv_cache_mb: float | None = None  # each stage's KV-cache budget (serve.kv_cache_mb); None: a quarter of its memory
    links: ClusterSpec = field(default_factory=ClusterSpec)  # where stages listen, how links are kept and secured
    precision: str = "fp32"
    quantize: str = "none"
    quantize_group: int = 64
    compile: str = "auto"             # true | false | auto: decode steps through torch.compile (inference/compiled.py)
    partition: str = "even"           # even (cluster.nodes[i].weight) | auto (by each node's memory)
    max_active: int = 1               # requests at once (the chat's serve.max_active): partition=auto's KV need
    telemetry: dict = field(default_factory=dict)  # logging.prometheus / run_dir: what smolcluster.top reads
    adapters: dict = field(default_factory=dict)   # {name: PEFT adapter dir}: LoRA adapters a request may name
    speculate: Speculate = field(default_factory=Speculate)
    prefix_cache: bool = True         # serve.prefix_cache: stages keep served prefixes' KV (inference/prefix.py)
    prefix_block: int = 32            # serve.prefix_block: ... in blocks of this many tokens
    replicas: int = 1                 # chat: this many pipelines of ``stages`` stages behind one head (serving/sessions.py)
    replica: int = 0                  # which of them this is (from_config.replica_settings)
    replica_links: list = field(default_factory=list)  # cluster=auto: each replica's ClusterSpec (node/coordinator.py)


@dataclass
class InferSettings:
    """``adapter``: which of ``pipeline.adapters`` the prompt goes through (None: the base model)."""

    pipeline: Pipeline
    sampling: SamplingParams
    max_new_tokens: int = 64
    stop_at_eos: bool = True
    prompt: str | None = None
    adapter: str | None = None


# -- the schema Hydra checks the yaml and every override against (chat's extends CommonSchema) -----------------------------------
@dataclass
class CommonSchema:
    """The keys ``infer`` and ``chat`` share: the pipeline, its model and the sampling."""

    model: Any = MISSING
    data: Any = MISSING
    cluster: Any = MISSING
    logging: Any = MISSING
    checkpoint: str | None = None
    stages: int = 2
    replicas: int = 1             # chat: pipelines of `stages` stages behind one head (infer: 1)
    head: HeadPlace = HeadPlace.first
    role: Role = Role.launch
    head_host: str | None = None
    head_port: int = 0
    stage_log_level: str | None = None
    seed: int = 0
    precision: str = "fp32"       # fp32 | bf16 | fp16 (cluster.nodes[i].precision overrides per node)
    quantize: str = "none"        # none | int8 | int4 (cluster.nodes[i].quantize overrides per node)
    quantize_group: int = 64      # int4's group size: 32 | 64 | 128
    compile: str = "auto"         # true | false | auto (where it pays): stages' decode steps through torch.compile
    partition: str = "even"       # even (cluster.nodes[i].weight) | auto (by cluster.nodes[i].memory_gb)
    max_new_tokens: int = 64
    # sampling: the keys are SamplingParams' (sampling_seed is its seed: `seed` is the random init's), and
    # so are the defaults; the yaml files leave them out, so they are defined in inference/sampling.py alone
    temperature: float = SamplingParams.temperature
    top_k: int = SamplingParams.top_k
    top_p: float = SamplingParams.top_p
    sampling_seed: int | None = SamplingParams.seed
    stop_at_eos: bool = True
    adapters: Any = None  # {name: PEFT adapter dir}, served per request (Any: a typed dict would refuse new names)
    speculate: Speculate = field(default_factory=Speculate)


@dataclass
class StageServe:
    kv_cache_mb: float | None = None  # each stage's KV-cache budget; null: a quarter of the node's memory
    prefix_cache: bool = True         # stages keep served prefixes' KV (inference/prefix.py)
    prefix_block: int = 32            # ... in blocks of this many tokens


@dataclass
class InferConfig(CommonSchema):
    prompt: str | None = None
    adapter: str | None = None
    rank: int | None = None
    serve: StageServe = field(default_factory=StageServe)


def register() -> None:
    """Make ``infer_schema`` known to Hydra (called before ``hydra.main`` runs)."""
    ConfigStore.instance().store(name="infer_schema", node=InferConfig)


register()


# -- DictConfig -> settings (the only place the inference path reads Hydra's config) ------------------
def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


COMPILE_MODES = ("auto", "true", "false")


def compile_mode(value) -> str:
    """``compile=``'s value as one of :data:`COMPILE_MODES` (Hydra gives a bool for true/false, a str-typed key
    "True"): what every stage's ServeConfig carries (inference/compiled.py decides ``auto``)."""
    mode = str(value).lower()
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile={value} is invalid: choose auto (compile a stage's decode step where it pays), "
                          f"true or false")
    return mode


def pipeline_settings(cfg) -> Pipeline:
    stages = int(cfg.stages)
    if stages < 1:
        raise ConfigError(f"stages={stages} is invalid: a pipeline needs at least one stage")
    partition = str(cfg.partition)
    if partition not in ("even", "auto"):
        raise ConfigError(f"partition={partition!r} is invalid: choose even (cluster.nodes[i].weight) or auto (by memory)")
    kv = cfg.serve.kv_cache_mb
    if kv is not None and kv <= 0:
        raise ConfigError(f"serve.kv_cache_mb={kv} must be positive (or null: a quarter of the node's memory)")
    block = int(cfg.serve.prefix_block)
    if block < 1:
        raise ConfigError(f"serve.prefix_block={block} is invalid: give the prefix cache's block size in tokens "
                          "(e.g. 32), or serve.prefix_cache=false to turn it off")
    replicas = int(cfg.replicas)
    if replicas < 1:
        raise ConfigError(f"replicas={replicas} is invalid: give how many pipelines of stages={stages} to serve "
                          "from (1: one pipeline)")
    return Pipeline(model=_plain(cfg.model), data=_plain(cfg.data), checkpoint=cfg.checkpoint, stages=stages,
                    head=HeadPlace(cfg.head), role=Role(cfg.role), rank=cfg.get("rank"), head_host=cfg.head_host,
                    head_port=int(cfg.head_port), stage_log_level=cfg.stage_log_level, seed=int(cfg.seed),
                    kv_cache_mb=kv, links=ClusterSpec.of(_plain(cfg.cluster)), precision=str(cfg.precision),
                    quantize=str(cfg.quantize), quantize_group=int(cfg.quantize_group),
                    compile=compile_mode(cfg.compile),
                    partition=partition,
                    max_active=int(cfg.serve.get("max_active") or 1), telemetry=_telemetry(cfg),
                    adapters=_adapters(cfg.get("adapters")), speculate=Speculate(**_plain(cfg.speculate)).check(),
                    prefix_cache=bool(cfg.serve.prefix_cache), prefix_block=block, replicas=replicas)


def _adapters(node) -> dict[str, str]:
    """``adapters={name:DIR,...}`` (or ``+adapters.name=DIR``) as ``{name: dir}``."""
    if node is None:
        return {}
    if not isinstance(node, DictConfig) or any(not isinstance(v, str) for v in node.values()):
        raise ConfigError(f"adapters={node}: give {{name:DIR,...}}, each DIR a PEFT adapter directory "
                          "(a LoRA run's RUN_DIR/adapter)")
    return {str(k): str(v) for k, v in node.items()}


def _telemetry(cfg) -> dict:
    """``logging.prometheus.port`` (the head takes it, stage i port + 1 + i; 0: any free port) and
    ``logging.run_dir``, where every node announces its endpoint for ``smolcluster.top`` (default with a
    port: ``runs/serve/DATE/TIME``, a fresh directory each start, which ``top`` finds as the newest run)."""
    log = _plain(cfg.get("logging"))
    prom = log.get("prometheus") or {}
    port, run_dir = prom.get("port"), log.get("run_dir")
    if port is None:
        return {"run_dir": run_dir} if run_dir else {}
    if not run_dir:
        run_dir = str(Path("runs", "serve", time.strftime("%Y-%m-%d"), time.strftime("%H-%M-%S")).resolve())
    from smolcluster.cluster import new_run_id

    return {"prometheus_port": int(port), "prometheus_addr": prom.get("addr"), "run_dir": str(run_dir),
            "run_id": new_run_id()}


def sampling_settings(cfg) -> SamplingParams:
    return SamplingParams(float(cfg.temperature), int(cfg.top_k), float(cfg.top_p), cfg.sampling_seed).check("sampling_seed")


def max_new_tokens_setting(cfg) -> int:
    n = int(cfg.max_new_tokens)
    if n < 1:
        raise ConfigError(f"max_new_tokens={n} is invalid: give how many tokens to generate at most (e.g. 64)")
    return n


def infer_settings(cfg) -> InferSettings:
    if int(cfg.replicas) != 1:
        raise ConfigError(f"replicas={cfg.replicas} is for the chat server (python -m smolcluster.chat): infer "
                          "answers one prompt, which one pipeline serves; drop replicas=")
    s = InferSettings(pipeline_settings(cfg), sampling_settings(cfg), max_new_tokens_setting(cfg), bool(cfg.stop_at_eos),
                      None if cfg.prompt is None else str(cfg.prompt), cfg.adapter or None)
    _warn_seed_unused(s)
    return s


def _warn_seed_unused(s: InferSettings) -> None:
    """``seed=N`` once seeded the sampler too; with given weights it now does nothing, so say which key does."""
    p = s.pipeline
    if p.seed != Pipeline.seed and (p.checkpoint or p.model.get("pretrained")) and not s.sampling.greedy:
        logger.warning(f"seed={p.seed} only seeds a random init, and the weights here are given: it does not "
                       f"seed sampling; use sampling_seed={p.seed} to repeat an answer")
