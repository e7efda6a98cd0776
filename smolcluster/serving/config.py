"""From a ``chat`` Hydra config (``conf/chat.yaml``) to a running engine and web server."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from smolcluster.errors import ConfigError
from smolcluster.serving.engine import ChatDefaults, Engine
from smolcluster.serving.prompting import ChatTemplate


def model_name(cfg) -> str:
    """The id the API lists and requests name: ``serve.model_name``, else the checkpoint's directory
    name, else the pretrained source's, else ``model.name``."""
    if cfg.serve.get("model_name"):
        return str(cfg.serve.model_name)
    for source in (cfg.get("checkpoint"), cfg.model.get("pretrained")):
        if source:
            return Path(str(source)).expanduser().resolve().name or str(source)
    return str(cfg.model.name)


def chat_defaults(cfg) -> ChatDefaults:
    return ChatDefaults(max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                        top_p=float(cfg.top_p), top_k=int(cfg.top_k), system_prompt=str(cfg.system_prompt or ""),
                        stop_at_eos=bool(cfg.stop_at_eos))


def model_dir(cfg) -> Path | None:
    """The Hugging Face model directory served, where a chat template may be: ``model.pretrained=DIR``,
    or ``checkpoint=RUN_DIR``'s ``hf/`` (a fine-tuned HF model's run), or a checkpoint that is one."""
    if cfg.get("checkpoint"):
        run = Path(str(cfg.checkpoint)).expanduser()
        return next((d for d in (run / "hf", run) if (d / "tokenizer_config.json").is_file()
                     or (d / "chat_template.jinja").is_file()), None)
    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(str(pretrained)).expanduser().is_dir():
        return Path(str(pretrained)).expanduser()
    return None


def chat_template(cfg) -> ChatTemplate | None:
    d = model_dir(cfg)
    template = ChatTemplate.load(d) if d is not None else None
    if template is not None:
        logger.info(f"chat: the model's chat template ({d}); answers end at token ids {list(template.end_ids)}")
    else:
        logger.info("chat: no chat template with the model: conversations are a User:/Assistant: transcript")
    return template


def engine_from_config(cfg) -> Engine:
    """Start (``role=launch``) or join (``role=head``) the pipeline and wrap it in a started engine."""
    if cfg.role not in ("launch", "head"):
        raise ConfigError(f"role={cfg.role!r} is invalid for the chat: choose launch (start the stages here) or "
                          "head (connect to stages already running; start those with "
                          "python -m smolcluster.infer role=stage rank=N)")
    if int(cfg.serve.max_active) < 1:
        raise ConfigError(f"serve.max_active={cfg.serve.max_active} must be at least 1")
    from smolcluster.inference.from_config import pipeline_from_config

    return Engine(lambda: pipeline_from_config(cfg), max_active=int(cfg.serve.max_active),
                  max_waiting=int(cfg.serve.max_waiting), reconnect=bool(cfg.serve.reconnect),
                  chat_template=chat_template(cfg)).start()


def serve(cfg) -> None:
    """Bind the port (fail fast if taken), start the pipeline, serve until Ctrl-C, shut everything down."""
    from smolcluster.serving.app import WebServer, bind, build_app

    sock = bind(str(cfg.serve.host), int(cfg.serve.port))
    try:
        engine = engine_from_config(cfg)
    except BaseException:
        sock.close()
        raise
    try:
        name = model_name(cfg)
        app = build_app(engine, name, chat_defaults(cfg), api_key=cfg.serve.get("api_key"), ui=bool(cfg.serve.ui))
        server = WebServer(app, str(cfg.serve.host), log_level=str(cfg.serve.log_level), sock=sock)
        print(f"smolcluster chat: {server.url}/  ·  OpenAI API: {server.url}/v1  ·  model {name!r}  ·  "
              f"{engine.stages} stages, context {engine.context}", flush=True)
        server.run()
    finally:
        logger.info("shutting down the pipeline")
        engine.close()
