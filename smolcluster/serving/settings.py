"""The ``chat`` command's settings as typed dataclasses: read from Hydra once, at the edge.

``conf/chat.yaml`` is validated against :class:`ChatConfig` (registered in Hydra's ConfigStore as
``chat_schema``, named first in the file's defaults list), so a mistyped override fails before anything
starts. ``chat.py`` turns the composed config into :class:`ChatSettings` with :func:`chat_settings`; the
pipeline part is infer's (:mod:`smolcluster.inference.settings`), the ``serve.*`` keys are the chat's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from smolcluster.errors import ConfigError
from smolcluster.inference.sampling import SamplingParams
from smolcluster.inference.settings import (
    CommonSchema,
    Pipeline,
    max_new_tokens_setting,
    pipeline_settings,
    sampling_settings,
)


@dataclass
class Serve:
    host: str = "127.0.0.1"
    port: int = 7860
    model_name: str | None = None
    api_key: str | None = None
    insecure: bool = False  # serve beyond loopback without an API key (refused otherwise)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides loopback's and the bound host
    max_body_mb: float = 8.0  # a larger request body is refused (413) before it is parsed
    max_active: int = 16
    max_waiting: int = 64
    kv_cache_mb: float | None = None
    prefix_cache: bool = True  # stages keep served prefixes' KV (inference/prefix.py)
    prefix_block: int = 32     # ... in blocks of this many tokens
    reconnect: bool = True
    ui: bool = True
    log_level: str = "warning"


@dataclass
class ChatSettings:
    """``sampling``, ``max_new_tokens``, ``stop_at_eos``: what the chat page's answers start at (and the API's
    chat ``max_tokens`` default)."""

    pipeline: Pipeline
    sampling: SamplingParams
    serve: Serve
    max_new_tokens: int = 128
    stop_at_eos: bool = True
    system_prompt: str = ""


@dataclass
class ChatConfig(CommonSchema):
    system_prompt: str = ""
    serve: Serve = field(default_factory=Serve)


def register() -> None:
    """Make ``chat_schema`` known to Hydra (called before ``hydra.main`` runs)."""
    ConfigStore.instance().store(name="chat_schema", node=ChatConfig)


register()


def chat_settings(cfg) -> ChatSettings:
    serve = Serve(**OmegaConf.to_container(cfg.serve, resolve=True))
    if serve.max_active < 1:
        raise ConfigError(f"serve.max_active={serve.max_active} must be at least 1")
    if serve.max_body_mb <= 0:
        raise ConfigError(f"serve.max_body_mb={serve.max_body_mb} must be positive")
    bad = [h for h in serve.allowed_hosts if "*" in h[1:] or (h.startswith("*") and h != "*" and h[:2] != "*.")]
    if bad:
        raise ConfigError(f"serve.allowed_hosts: {bad} are not host names: use a name, an address, "
                          "'*.example.com' for a domain's names or '*' for any")
    return ChatSettings(pipeline_settings(cfg), sampling_settings(cfg), serve, max_new_tokens_setting(cfg),
                        bool(cfg.stop_at_eos), str(cfg.system_prompt or ""))
