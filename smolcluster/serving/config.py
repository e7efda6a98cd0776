"""From the ``chat`` settings (``conf/chat.yaml``, typed in ``serving/settings.py``) to running sessions and a web server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loguru import logger

from smolcluster.errors import ConfigError
from smolcluster.inference.settings import Pipeline, Role
from smolcluster.security import check_api
from smolcluster.serving.prompting import ChatTemplate
from smolcluster.serving.sessions import ChatDefaults, Sessions
from smolcluster.serving.settings import ChatSettings


def model_name(s: ChatSettings) -> str:
    """The id the API lists and requests name: ``serve.model_name``, else the checkpoint's directory
    name, else the pretrained source's, else ``model.name``."""
    if s.serve.model_name:
        return s.serve.model_name
    for source in (s.pipeline.checkpoint, s.pipeline.model.get("pretrained")):
        if source:
            return Path(str(source)).expanduser().resolve().name or str(source)
    return str(s.pipeline.model.get("name"))


def chat_defaults(s: ChatSettings) -> ChatDefaults:
    return ChatDefaults(max_new_tokens=s.max_new_tokens, sampling=s.sampling, system_prompt=s.system_prompt,
                        stop_at_eos=s.stop_at_eos)


def model_dir(cfg: Pipeline) -> Path | None:
    """The Hugging Face model directory served, where a chat template may be: ``model.pretrained=DIR``,
    or ``checkpoint=RUN_DIR``'s ``hf/`` (a fine-tuned HF model's run), or a checkpoint that is one."""
    if cfg.checkpoint:
        run = Path(str(cfg.checkpoint)).expanduser()
        return next((d for d in (run / "hf", run) if (d / "tokenizer_config.json").is_file()
                     or (d / "chat_template.jinja").is_file()), None)
    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(str(pretrained)).expanduser().is_dir():
        return Path(str(pretrained)).expanduser()
    return None


def chat_template(cfg: Pipeline) -> ChatTemplate | None:
    d = model_dir(cfg)
    template = ChatTemplate.load(d) if d is not None else None
    if template is not None:
        logger.info(f"chat: the model's chat template ({d}); answers end at token ids {list(template.end_ids)}")
    else:
        logger.info("chat: no chat template with the model: conversations are a User:/Assistant: transcript")
    return template


def sessions_from_config(s: ChatSettings, revive=None) -> Sessions:
    """Start (``role=launch``) or join (``role=head``) the pipeline and wrap it in started Sessions. ``revive(r)``:
    called before replica r (re)connects (``cluster=auto``: waits while the coordinator starts its lost stages
    again, or raises :class:`~smolcluster.errors.ReplicaGone`)."""
    if s.pipeline.role is Role.stage:
        raise ConfigError("role=stage is not for the chat: choose launch (start the stages here) or head (connect "
                          "to stages already running; start those with python -m smolcluster.infer role=stage rank=N)")
    from smolcluster.inference.from_config import pipeline_from_config, replica_settings
    from smolcluster.telemetry.logging import identity
    from smolcluster.telemetry.serving import open_serving_metrics

    replicas = [replica_settings(s.pipeline, r) for r in range(s.pipeline.replicas)]  # bad node counts refused here
    metrics = open_serving_metrics(s.pipeline.telemetry, identity())  # this head's figures for smolcluster.top

    joined: set[int] = set()

    def connect(p):
        if revive is not None:
            revive(p.replica)
        if p.role is Role.head and p.replica in joined:
            # A rebuild: stages that compile did so before, and load their graphs from the node's cache in seconds,
            # so the head waits cluster.connect_timeout_s, not a first compile's minutes (compile=true|auto).
            p = replace(p, compile="false")
        pipe = pipeline_from_config(p)
        joined.add(p.replica)
        return pipe

    return Sessions([lambda p=p: connect(p) for p in replicas], max_active=s.serve.max_active,
                  max_waiting=s.serve.max_waiting, reconnect=s.serve.reconnect,
                  chat_template=chat_template(s.pipeline), metrics=metrics,
                  prefix_block=s.pipeline.prefix_block).start()


def serve(s: ChatSettings, restarts=None) -> None:
    """Bind the port (fail fast if taken), start the pipeline, serve until Ctrl-C, shut everything down.
    ``restarts`` (``cluster=auto`` replicas: :class:`~smolcluster.node.restarts.Restarts`): its ``revive`` is
    :func:`sessions_from_config`'s, and it is closed first on the way out, so a rebuild waiting in revive is let go
    at once and no stage is started again while the sessions close."""
    from smolcluster.serving.app import WebServer, bind, build_app

    check_api(s.serve.host, s.serve.api_key, s.serve.insecure)
    sock = bind(s.serve.host, s.serve.port)
    try:
        sessions = sessions_from_config(s, restarts.revive if restarts is not None else None)
    except BaseException:
        sock.close()
        raise
    try:
        name = model_name(s)
        app = build_app(sessions, name, chat_defaults(s), api_key=s.serve.api_key, ui=s.serve.ui, host=s.serve.host,
                        allowed_hosts=s.serve.allowed_hosts, max_body_mb=s.serve.max_body_mb)
        server = WebServer(app, s.serve.host, log_level=s.serve.log_level, sock=sock)
        page = "" if s.serve.ui else " (no page here: serve.ui=false)"
        replicas = f" x {len(sessions.replicas)} replicas" if len(sessions.replicas) > 1 else ""
        print(f"smolcluster chat: {server.url}/{page}  ·  OpenAI API: {server.url}/v1  ·  model {name!r}  ·  "
              f"{sessions.stages} stages{replicas}, context {sessions.context}", flush=True)
        server.run()
    finally:
        logger.info("shutting down the pipeline")
        if restarts is not None:
            restarts.close()
        sessions.close()
