"""Checks on the composed config, so a wrong value ends with one line naming the key and fix."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from smolcluster.errors import ConfigError
from smolcluster.paths import CONFIG_DIR
from smolcluster.security import check_bind
from smolcluster.telemetry import wandb_sink

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(cfg: DictConfig, key: str, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative integer" if allow_zero else "a positive integer"
        raise ConfigError(f"{key}={value!r} is invalid: it must be {want}, e.g. {key}=64")


def _number(cfg: DictConfig, key: str, *, allow_zero: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative number" if allow_zero else "a positive number"
        raise ConfigError(f"{key}={value!r} is invalid: it must be {want}")


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is invalid: choose one of {', '.join(choices)}")


OPEN_GROUPS = ("model", "hydra")  # take keys the defaults do not list: a custom model's kwargs, Hydra's own


def refuse_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse ``+train.stpes=100``: a key the defaults do not have would be stored and ignored. Hydra itself
    refuses the typo without ``+``, then advises adding the ``+``; this check ends that road with the near
    name. (``++key`` is Hydra's explicit "set or add", and is left to the user.)"""
    groups = {d.name for d in CONFIG_DIR.iterdir() if d.is_dir()}
    for o in overrides:
        if not o.startswith("+") or o.startswith("++"):
            continue
        key = o[1:].split("=", 1)[0]
        parts = key.split(".")
        if parts[0] in OPEN_GROUPS or (len(parts) == 1 and parts[0] in groups):
            continue
        parent = OmegaConf.select(cfg, ".".join(parts[:-1])) if len(parts) > 1 else cfg
        known = [k for k in (parent.keys() if isinstance(parent, DictConfig) else []) if k != parts[-1]]
        where = ".".join(parts[:-1])
        near = difflib.get_close_matches(parts[-1], known, n=1)
        hint = (f"did you mean {where + '.' if where else ''}{near[0]}?" if near else
                f"{where or 'the top level'} has {', '.join(map(str, known))}" if known else
                f"{where} takes no settings")
        raise ConfigError(f"{key} is not a setting (it would be stored and ignored): {hint}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value found."""
    _int(cfg, "train.batch_size")
    _int(cfg, "train.steps", allow_none=True)
    _int(cfg, "train.epochs")
    _int(cfg, "train.log_every")
    for key in ("train.eval_every", "train.eval_samples", "train.checkpoint_every", "train.warmup_steps"):
        _int(cfg, key, allow_zero=True)
    _number(cfg, "train.lr", allow_zero=False)
    _number(cfg, "train.grad_clip")
    if OmegaConf.select(cfg, "train.max_grad_norm_ratio") is not None:
        _number(cfg, "train.max_grad_norm_ratio")
        if OmegaConf.select(cfg, "train.max_grad_norm") is not None:
            _number(cfg, "train.max_grad_norm")
        _int(cfg, "train.grad_norm_window")
        _int(cfg, "train.grad_norm_warmup", allow_zero=True)
    _number(cfg, "train.weight_decay")
    _choice(cfg, "train.optimizer", OPTIMIZERS)
    if OmegaConf.select(cfg, "logging") is not None:
        _choice(cfg, "logging.wandb.mode", wandb_sink.MODES)
        _int(cfg, "logging.prometheus.port", allow_none=True, allow_zero=True)
        _int(cfg, "logging.grad_norm_every", allow_zero=True)
        _int(cfg, "logging.hardware_every", allow_zero=True)
    _choice(cfg, "train.schedule", SCHEDULES)
    if cfg.algo.name != "local":
        # every distributed role checks, so a keyless LAN run is refused (or warned about) on every node
        c = cfg.cluster
        check_bind([c.get("bind") or c.host], c.get("keys"), bool(c.get("insecure")), f"algo={cfg.algo.name}")
    _check_lora(cfg)
    kind = cfg.model.get("kind")
    if kind not in ("classifier", "lm"):
        raise ConfigError(f"model.kind={kind!r} is invalid: choose classifier or lm")
    if kind == "lm" and cfg.data.name not in ("text", "chat"):
        raise ConfigError(
            f"model={cfg.model.name} is a language model but data={cfg.data.name}: add data=text "
            "(and data.path=FILE for your own corpus)"
        )
    if kind == "classifier" and cfg.data.name in ("text", "chat"):
        raise ConfigError(f"model={cfg.model.name} is a classifier but data=text: use data=digits or data=mnist")
    pretrained = cfg.model.get("pretrained")
    if pretrained and Path(str(pretrained)).expanduser().is_dir():
        from smolcluster.models.hf import read_config

        read_config(pretrained)  # an unsupported architecture is refused before any process or data is set up
    block, positions = cfg.model.get("block_size"), cfg.model.get("n_positions")
    if block is not None and positions is not None and block > positions:
        raise ConfigError(
            f"model.block_size={block} exceeds model.n_positions={positions}: lower model.block_size"
        )


def _check_lora(cfg: DictConfig) -> None:
    if not OmegaConf.select(cfg, "train.lora.enabled"):
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
                          f"{cfg.model.name}: use algo=local, syncps, edp or allreduce")
    if _model_type(cfg) == "gpt2":
        raise ConfigError("train.lora with algo=mp: the pipeline's GPT-2 stages hold their own Conv1D, which peft "
                          "does not wrap: use algo=local, syncps, edp or allreduce for GPT-2")
    for target in OmegaConf.select(cfg, "train.lora.target_modules") or []:
        if str(target).rsplit(".", 1)[-1] in ("lm_head", "embed_tokens", "wte"):
            raise ConfigError(f"train.lora.target_modules names {target} under algo=mp, which adapts the decoder "
                              "blocks only (a stage projects onto the vocabulary with the embedding's weight, "
                              "bypassing a LoRA layer): drop it, or use algo=local, syncps, edp or allreduce")


def _model_type(cfg: DictConfig) -> str | None:
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
