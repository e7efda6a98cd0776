"""``infer`` / ``chat`` settings -> an :class:`InferencePipeline`, or a stage's :class:`ServeConfig`.

Takes the typed :class:`~smolcluster.inference.settings.Pipeline` that ``infer.py`` and
``chat.py`` made from Hydra's config (``settings.py``); below this module the runtime
takes plain arguments and dataclasses.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import asdict, replace
from pathlib import Path

from loguru import logger

from smolcluster.errors import ConfigError
from smolcluster.inference.adapters import check_adapters
from smolcluster.inference.api import (
    InferencePipeline,
    check_compile,
    check_speculate,
    connect_wait,
    describe_weights,
)
from smolcluster.inference.settings import HeadPlace, Pipeline, Role, compile_mode
from smolcluster.inference.stage import ServeConfig


def _run_data(run_dir: Path) -> dict | None:
    """The data group a training run recorded (its ``.hydra/config.yaml``), when it trained on text."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("data") or {}
    return data if data.get("name") == "text" else None


def _tokenizer_from_data(data: dict):
    from smolcluster.data.text import get_tokenizer, read_corpus

    return get_tokenizer(read_corpus(data.get("path")), data.get("tokenizer", "auto"),
                         data.get("vocab_size", 4096), data.get("cache_dir"))


def resolve_model(cfg: Pipeline, need_tokenizer: bool = True) -> tuple[dict, object, Path | None]:
    """(weights info as :func:`describe_weights`, tokenizer, temp dir to delete) for an infer config.

    ``checkpoint=RUN_DIR`` (a train run), else ``model.pretrained`` (a Hugging Face model
    directory), else a seeded random init of ``model`` written once to a temporary directory.
    """
    from smolcluster.data.text import TextTokenizer, get_tokenizer

    n_head = cfg.model.get("n_head")
    if cfg.checkpoint:
        run_dir = Path(cfg.checkpoint).expanduser()
        info = describe_weights(run_dir, default_n_head=n_head)
        if not need_tokenizer:
            return info, None, None
        if info["tokenizer"] is not None:
            tok = TextTokenizer.load(info["tokenizer"])
        else:
            data = (_run_data(run_dir) if run_dir.is_dir() else None) or cfg.data
            logger.warning(f"{run_dir} has no tokenizer.json; rebuilding the run's tokenizer from data config")
            tok = _tokenizer_from_data(data)
        return info, tok, None
    if cfg.model.get("pretrained"):
        info = describe_weights(cfg.model["pretrained"])
        if not need_tokenizer:
            return info, None, None
        if info["tokenizer"] is not None:
            tok = TextTokenizer.load(info["tokenizer"])
        elif info["config"].get("model_type") == "gpt2":
            tok = get_tokenizer("", "gpt2")
        else:
            raise ConfigError(f"model.pretrained={cfg.model['pretrained']}: no tokenizer.json there; download the "
                              "model's tokenizer files with it")
        return info, tok, None
    with _RANDOM_INIT:
        return _random_init(cfg, n_head)


# Replicas resolve their models in parallel threads (serving.sessions.Sessions.start): the random init seeds and draws
# from torch's global generator and imports transformers lazily (not thread-safe), so one build at a time makes
# every replica's init the same weights.
_RANDOM_INIT = threading.Lock()


def _random_init(cfg: Pipeline, n_head) -> tuple[dict, object, Path]:
    import torch
    from transformers import PreTrainedModel

    from smolcluster import checkpoint
    from smolcluster.models import build_model

    tok = _tokenizer_from_data(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, {"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id})
    tmp = Path(tempfile.mkdtemp(prefix="smolcluster-init-"))
    if isinstance(model, PreTrainedModel):  # served like any Hugging Face directory
        model.save_pretrained(tmp)
    else:
        checkpoint.save(tmp, model, None, 0)
    logger.warning(f"no checkpoint= or model.pretrained: serving a random init of {cfg.model.get('name')} "
                   f"(seed {cfg.seed})")
    info = describe_weights(tmp, default_n_head=n_head)
    if info["eos"] is None and tok.eos_id is not None:
        info["eos"] = [tok.eos_id]
    return info, tok, tmp


def tokenizer_for_head(cfg: Pipeline):
    """The tokenizer when connecting to running stages: the run's, the pretrained model's, or data config's."""
    from smolcluster.data.text import TextTokenizer, get_tokenizer

    for source in (cfg.checkpoint, cfg.model.get("pretrained")):
        for d in ((Path(source).expanduser() / "hf", Path(source).expanduser()) if source else ()):
            if (d / "tokenizer.json").is_file():
                return TextTokenizer.load(d / "tokenizer.json")
    if cfg.model.get("pretrained"):
        return get_tokenizer("", "gpt2")
    return _tokenizer_from_data(cfg.data)


def eos_for_head(cfg: Pipeline) -> list[int] | None:
    """The EOS ids of the model the stages serve, when the head has its directory too (else the tokenizer's)."""
    from smolcluster.pipeline.weights import eos_ids, find_model

    source = cfg.checkpoint or cfg.model.get("pretrained")
    if not source:
        return None
    try:
        return eos_ids(find_model(source, default_n_head=cfg.model.get("n_head")))
    except ConfigError:  # the head may not hold the weights; the tokenizer's EOS then
        return None


def check_prompt_fits(prompt: str, tokenizer, config: dict) -> None:
    """Refuse a prompt longer than the model's context before any stage is started."""
    from smolcluster.pipeline.architectures import family_for

    context = family_for(config).context
    n = len(tokenizer.encode(prompt))
    if n > context:
        raise ConfigError(f"the prompt is {n} tokens, longer than the model's context of {context}: shorten it "
                          "(the pipeline never truncates silently)")


def check_stages(stages: int, config: dict) -> None:
    """More stages than blocks, refused before any stage starts (each stage would refuse it on its own)."""
    from smolcluster.pipeline.architectures import family_for

    blocks = family_for(config).n_layer
    if stages > blocks:
        raise ConfigError(f"stages={stages} but the model has {blocks} blocks: use at most stages={blocks} "
                          "(each stage holds one block or more)")


def stage_formats(cfg: Pipeline) -> list[dict]:
    """Each stage's weight format and device: ``precision`` / ``quantize`` / ``quantize_group``, overridden per
    node by ``cluster.nodes[i].precision`` / ``.quantize``, and ``cluster.nodes[i].device``. Checked here, so a
    bad value is refused before any stage starts."""
    from smolcluster.pipeline.quantize import StageFormat

    out = []
    for rank in range(cfg.stages):
        node = cfg.links.node(rank)
        fmt = {"precision": str(node.precision or cfg.precision), "quantize": str(node.quantize or cfg.quantize),
               "quantize_group": cfg.quantize_group, "device": node.device}
        StageFormat(fmt["precision"], fmt["quantize"], fmt["quantize_group"])
        out.append(fmt)
    check_compile(cfg.compile, cfg.adapters)
    return out


def stage_weights_for(cfg: Pipeline, info: dict, formats: list[dict], local: bool) -> list[float]:
    """``partition=even``: ``cluster.nodes[i].weight``; ``partition=auto``: by each node's memory, the model
    refused in one line when it cannot fit, or by each node's speed (``cluster.nodes[i].gflops``) when every
    node has one and that split fits too (:mod:`smolcluster.inference.placement`)."""
    from smolcluster.pipeline.partition import node_weights

    if cfg.partition == "even":
        return node_weights(cfg.links, cfg.stages)
    from smolcluster.inference.compiled import may_compile, pool_tokens
    from smolcluster.inference.placement import auto_weights, node_memory, prefer_faster
    from smolcluster.pipeline.architectures import family_for
    from smolcluster.pipeline.quantize import StageFormat

    fmts = [StageFormat(f["precision"], f["quantize"], f["quantize_group"]) for f in formats]
    arch, memory = family_for(info["config"]), node_memory(cfg.links, cfg.stages, local)
    # A stage that may compile its decode step holds the step's slot caches too.
    slots = pool_tokens(ServeConfig.compile_slots, min(ServeConfig.compile_positions, arch.context))
    compiled = [slots if may_compile(compile_mode(cfg.compile), arch, fmt, f["device"], cfg.adapters,
                                     cfg.speculate.k > 0) else 0 for fmt, f in zip(fmts, formats, strict=True)]
    weights = auto_weights(arch, fmts, memory, cfg.head is HeadPlace.first, cfg.max_active, compiled)
    speed = [cfg.links.node(i).gflops for i in range(cfg.stages)]
    if all(g is not None for g in speed):  # (ClusterSpec.node checked each is a positive number)
        return prefer_faster(arch, fmts, memory, speed, cfg.head is HeadPlace.first, cfg.max_active, weights,
                             compiled)
    return weights


def pipeline_from_config(cfg: Pipeline, prompt: str | None = None) -> InferencePipeline:
    """Start the stages here (``role=launch``) or connect to a cluster's (``role=head``).

    With ``prompt``, a prompt that cannot fit is refused before anything starts.
    """
    c = cfg.links
    if cfg.role is Role.launch:
        formats = stage_formats(cfg)  # a bad value is refused before the model is read
        info, tok, tmp = resolve_model(cfg)
        try:
            check_stages(cfg.stages, info["config"])
            if prompt is not None:
                check_prompt_fits(prompt, tok, info["config"])
            pipe = InferencePipeline.start_local(
                info["weights"], stages=cfg.stages, n_head=info["config"].get("n_head"), head=cfg.head.value,
                tokenizer=tok, eos_ids=info["eos"] if info["eos"] is not None else getattr(tok, "eos_id", None),
                stage_weights=stage_weights_for(cfg, info, formats, local=True), formats=formats,
                host=c.host, heartbeat_s=c.heartbeat_s, liveness_s=c.liveness_s,
                connect_timeout_s=c.connect_timeout_s, kv_cache_mb=cfg.kv_cache_mb,
                env=_stage_env(cfg), telemetry=cfg.telemetry,
                adapters=cfg.adapters, speculate=asdict(cfg.speculate), prefix_cache=cfg.prefix_cache,
                prefix_block=cfg.prefix_block, compile=cfg.compile)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if tmp is not None:
            pipe._cleanup.append(tmp)
        return pipe
    if cfg.role is Role.head:
        from smolcluster.launch.nodes import stage_nodes

        tok = tokenizer_for_head(cfg)
        addresses = [n.address for n in stage_nodes(c, cfg.stages)]
        pipe = InferencePipeline.connect(addresses, tokenizer=tok, eos_ids=eos_for_head(cfg),
                                         host=cfg.head_host or c.host, port=cfg.head_port,
                                         heartbeat_s=c.heartbeat_s, liveness_s=c.liveness_s,
                                         connect_timeout_s=c.connect_timeout_s, keys_dir=c.keys,
                                         compile=cfg.compile)
        if pipe.client.shape["vocab_size"] < tok.vocab_size:
            pipe.close()
            raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the stages' model only "
                              f"{pipe.client.shape['vocab_size']}: give the checkpoint= / data options it was "
                              "trained with")
        return pipe
    raise ConfigError(f"role={cfg.role.value} does not start a pipeline: choose launch (start the stages here) "
                      "or head (connect to running stages)")


def _stage_env(cfg: Pipeline) -> dict:
    """Local stages' environment: R co-located replicas split the cores between them, unless OMP_NUM_THREADS is set
    already; within its share each replica's stages split it or take turns on it as one pipeline's do
    (stage.StageServer.turns)."""
    env = {"SMOLCLUSTER_LOG_LEVEL": cfg.stage_log_level or "WARNING"}
    if cfg.replicas == 1:
        return env
    from smolcluster.cluster import node_name
    from smolcluster.launch.threads import thread_env, threads_each

    env["SMOLCLUSTER_NODE"] = f"{node_name()}-r{cfg.replica}"  # top's line and endpoint file per replica's stage
    return thread_env(env, threads_each(cfg.replicas))


def replica_settings(cfg: Pipeline, r: int) -> Pipeline:
    """Replica ``r``'s pipeline of ``cfg.replicas``. ``role=head``: its stages are cluster nodes
    ``r*stages .. r*stages+stages-1`` (or listen on ``cluster.port + r*stages + i``); ``role=launch``: its stages
    announce /metrics on ports after the replicas before it (stage i of replica r: base + 1 + r*stages + i) under
    the node name ``NODE-rR``. ``cluster=auto``: the links the coordinator made for replica ``r``'s stages
    (``replica_links``: their addresses and the head's keys for them). A fixed ``head_port``: replica r's head
    binds ``head_port + r``."""
    if cfg.replicas == 1:
        return cfg
    n, first = cfg.stages, r * cfg.stages
    links, nodes = cfg.links, list(cfg.links.nodes or [])
    if cfg.replica_links:
        links = cfg.replica_links[r]
    elif cfg.role is Role.head and nodes:
        if len(nodes) < cfg.replicas * n:
            raise ConfigError(f"replicas={cfg.replicas} x stages={n} needs {cfg.replicas * n} cluster.nodes, the "
                              f"cluster lists {len(nodes)}: list every replica's stages (replica r's stage i is "
                              f"node r*stages+i), or use replicas={max(1, len(nodes) // n)}")
        links = replace(links, nodes=nodes[first:first + n])
        _check_distinct_replicas(cfg, nodes)
    elif cfg.role is Role.head and links.port is not None:
        links = replace(links, port=int(links.port) + first)
    telemetry = dict(cfg.telemetry)
    if telemetry.get("prometheus_port"):  # 0 (any free port) stays 0
        telemetry["prometheus_port"] = int(telemetry["prometheus_port"]) + first
    head_port = cfg.head_port + r if cfg.head_port else 0  # each replica's head socket binds a port of its own
    return replace(cfg, links=links, telemetry=telemetry, replica=r, head_port=head_port)


def _check_distinct_replicas(cfg: Pipeline, nodes: list) -> None:
    """Refuse replicas whose stages resolve to the same addresses: nodes without a port each number theirs from
    ``cluster.port + i`` within their replica, so two replicas on the same hosts would share every stage."""
    from smolcluster.launch.nodes import stage_nodes

    n, seen = cfg.stages, {}
    for r in range(cfg.replicas):
        for node in stage_nodes(replace(cfg.links, nodes=nodes[r * n:r * n + n]), n):
            if node.address in seen:
                raise ConfigError(f"replicas {seen[node.address]} and {r} both reach a stage at {node.address}: "
                                  f"give every node its own port (cluster.nodes[i].port) or host")
            seen[node.address] = r


def stage_speculate(cfg: Pipeline, config: dict) -> dict:
    """``speculate.*`` for this stage: stage 0 proposes (its draft model must be on its node); the others only
    keep ``k`` positions of slack in sliding windows for the cut (stage.ServeConfig.speculate)."""
    if cfg.rank == 0:
        return check_speculate(asdict(cfg.speculate), config)
    return {"k": cfg.speculate.k} if cfg.speculate.k > 0 else {}


def serve_config_from(cfg: Pipeline) -> ServeConfig:
    """``role=stage rank=N``: this node's stage of a cluster, from the same config every node uses."""
    from smolcluster.launch.nodes import stage_nodes
    from smolcluster.security import check_bind

    if cfg.rank is None:
        raise ConfigError("role=stage needs its rank: add rank=N (0 <= N < stages)")
    c, n = cfg.links, cfg.stages
    nodes = stage_nodes(c, n)
    if not 0 <= cfg.rank < n:
        raise ConfigError(f"rank={cfg.rank} is invalid for stages={n}: use 0..{n - 1}")
    check_bind([nodes[cfg.rank].bind], c.keys, c.insecure, f"stage {cfg.rank}")
    if not cfg.checkpoint and not cfg.model.get("pretrained"):
        raise ConfigError("a cluster stage needs weights every node agrees on: give checkpoint=RUN_DIR or "
                          "model.pretrained=DIR (copied to every node)")
    formats = stage_formats(cfg)
    fmt = formats[int(cfg.rank)]
    node = nodes[cfg.rank]
    info, _, _ = resolve_model(cfg, need_tokenizer=False)

    return ServeConfig(rank=cfg.rank, n_stages=n, weights=str(info["weights"]), config=info["config"],
                       nodes=[{"address": x.address, "bind": x.bind} for x in nodes],
                       head_first=cfg.head is HeadPlace.first,
                       stage_weights=stage_weights_for(cfg, info, formats, local=False),
                       heartbeat_s=c.heartbeat_s, liveness_s=c.liveness_s,
                       connect_timeout_s=connect_wait(c.connect_timeout_s, cfg.compile)[0], max_bytes=c.max_bytes, keys_dir=c.keys, threads=node.threads, log_level=cfg.stage_log_level,
                       kv_cache_mb=cfg.kv_cache_mb, adapters=check_adapters(cfg.adapters, info["config"]),
                       speculate=stage_speculate(cfg, info["config"]), prefix_cache=cfg.prefix_cache,
                       prefix_block=cfg.prefix_block, compile=check_compile(cfg.compile, cfg.adapters),
                       extra={"telemetry": cfg.telemetry}, **fmt)
