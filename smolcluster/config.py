"""Checks on the typed training config, so a wrong value ends with one line naming the key and fix.

(Types are Hydra's job, as it composes against :mod:`smolcluster.train_settings`; these are the ranges,
choices and combinations a type cannot say.)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from smolcluster.errors import ConfigError
from smolcluster.security import check_bind
from smolcluster.telemetry import wandb_sink
from smolcluster.train_settings import TrainConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at(cfg: TrainConfig, key: str):
    """``cfg``'s value at a dotted ``key`` (``train.lr``), the name every message gives it."""
    return functools.reduce(getattr, key.split("."), cfg)


def _int(cfg: TrainConfig, key: str, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    value = _at(cfg, key)
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative integer" if allow_zero else "a positive integer"
        raise ConfigError(f"{key}={value!r} is invalid: it must be {want}, e.g. {key}=64")


def _number(cfg: TrainConfig, key: str, *, allow_zero: bool = True) -> None:
    value = _at(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(f"{key}={value!r} is invalid: it must be {want}")


def _choice(cfg: TrainConfig, key: str, choices: tuple[str, ...]) -> None:
    value = _at(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is invalid: choose one of {', '.join(choices)}")


def _betas(cfg: TrainConfig) -> None:
    betas = list(cfg.train.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"train.betas={betas} is invalid: give AdamW's two decay rates, each in [0, 1), "
                          "e.g. train.betas=[0.9,0.95]")


def _edp_min_workers(cfg: TrainConfig) -> None:
    m, n = getattr(cfg.algo, "min_workers", None), cfg.cluster.workers  # (edp's key; the rings check theirs)
    auto = cfg.cluster.name == "auto" and cfg.role == "launch"  # the coordinator counts the workers later
    if cfg.algo.name == "edp" and not (_is_int(m) and 1 <= m and (auto or m <= n)):
        raise ConfigError(f"algo.min_workers={m!r} is invalid: how many workers edp waits for before training, "
                          f"between 1 and cluster.workers ({n})")


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value found."""
    _int(cfg, "train.batch_size")
    _int(cfg, "train.steps", allow_none=True)
    _int(cfg, "train.epochs")
    _int(cfg, "train.log_every")
    for key in ("train.eval_every", "train.eval_samples", "train.checkpoint_every", "train.warmup_steps"):
        _int(cfg, key, allow_zero=True)
    _number(cfg, "train.lr", allow_zero=False)
    _number(cfg, "train.grad_clip")
    if cfg.train.max_grad_norm_ratio is not None:
        _number(cfg, "train.max_grad_norm_ratio")
        if cfg.train.max_grad_norm is not None:
            _number(cfg, "train.max_grad_norm")
        _int(cfg, "train.grad_norm_window")
        _int(cfg, "train.grad_norm_warmup", allow_zero=True)
    _number(cfg, "train.weight_decay")
    _number(cfg, "train.momentum")
    _betas(cfg)
    _choice(cfg, "train.optimizer", OPTIMIZERS)
    _choice(cfg, "logging.wandb.mode", wandb_sink.MODES)
    _int(cfg, "logging.prometheus.port", allow_none=True, allow_zero=True)
    _int(cfg, "logging.grad_norm_every", allow_zero=True)
    _int(cfg, "logging.hardware_every", allow_zero=True)
    _choice(cfg, "train.schedule", SCHEDULES)
    _edp_min_workers(cfg)
    if cfg.algo.name != "local":
        # every distributed role checks, so a keyless LAN run is refused (or warned about) on every node
        c = cfg.cluster
        check_bind([c.bind or c.host], c.keys, c.insecure, f"algo={cfg.algo.name}")
    _check_lora(cfg)
    kind = cfg.model.get("kind")
    if kind not in ("classifier", "lm"):
        raise ConfigError(f"model.kind={kind!r} is invalid: choose classifier or lm")
    data, name = cfg.data.get("name"), cfg.model.get("name")
    if kind == "lm" and data not in ("text", "chat"):
        raise ConfigError(
            f"model={name} is a language model but data={data}: add data=text "
            "(and data.path=FILE for your own corpus)"
        )
    if kind == "classifier" and data in ("text", "chat"):
        raise ConfigError(f"model={name} is a classifier but data=text: use data=digits or data=mnist")
    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(str(pretrained)).expanduser().is_dir():
        from smolcluster.models.hf import read_config

        read_config(pretrained)  # an unsupported architecture is refused before any process or data is set up
    block, positions = cfg.model.get("block_size"), cfg.model.get("n_positions")
    if block is not None and positions is not None and block > positions:
        raise ConfigError(
            f"model.block_size={block} exceeds model.n_positions={positions}: lower model.block_size"
        )


def _check_lora(cfg: TrainConfig) -> None:
    if not cfg.train.lora.enabled:
        return
    from smolcluster.models.lora import BASE_PRECISIONS

    _int(cfg, "train.lora.r")
    _number(cfg, "train.lora.alpha", allow_zero=False)
    _number(cfg, "train.lora.dropout")
    _choice(cfg, "train.lora.base_precision", tuple(BASE_PRECISIONS))
    if cfg.algo.name != "mp":
        return
    # Refused here, not as a stage builds: every process stops at once instead of its peers waiting for it.
    if cfg.model.get("kind") != "lm":
        raise ConfigError(f"train.lora with algo=mp adapts a language model's decoder blocks, not model="
                          f"{cfg.model.get('name')}: use algo=local, syncps, edp or allreduce")
    if _model_type(cfg) == "gpt2":
        raise ConfigError("train.lora with algo=mp: the pipeline's GPT-2 stages hold their own Conv1D, which peft "
                          "does not wrap: use algo=local, syncps, edp or allreduce for GPT-2")
    for target in cfg.train.lora.target_modules or []:
        if str(target).rsplit(".", 1)[-1] in ("lm_head", "embed_tokens", "wte"):
            raise ConfigError(f"train.lora.target_modules names {target} under algo=mp, which adapts the decoder "
                              "blocks only (a stage projects onto the vocabulary with the embedding's weight, "
                              "bypassing a LoRA layer): drop it, or use algo=local, syncps, edp or allreduce")


def _model_type(cfg: TrainConfig) -> str | None:
    """The model's family as far as the config tells: a local ``model.pretrained`` directory's config.json
    decides it (as it does when the model is built), else GPT-2's builder or ``model.family``."""
    pretrained = cfg.model.get("pretrained")
    config = Path(str(pretrained)).expanduser() / "config.json" if pretrained else None
    if config is not None and config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None  # the model's loader says what is wrong with it
    if str(cfg.model.get("_target_", "")).endswith(".build_gpt2"):
        return "gpt2"
    return cfg.model.get("family")
