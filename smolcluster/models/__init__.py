"""Build the model named in config: any nn.Module through Hydra's ``_target_``.

The data decides a few constructor arguments (``in_features``, ``num_classes``,
``vocab_size``); they are passed only to constructors that accept them, so a
custom module needs no smolcluster-specific signature.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from torch import nn

from smolcluster.errors import ConfigError

# Config keys that describe the model to smolcluster, not arguments of its constructor
# (``deprecated``: the note an old model name carries, printed by train.py).
_META_KEYS = ("name", "kind", "deprecated")


def build_model(model_cfg: Mapping, data_info: dict) -> nn.Module:
    """``model_cfg``: the model group as plain data (a TrainConfig's or inference Pipeline's ``model``)."""
    cfg = dict(model_cfg)
    target = cfg.get("_target_")
    if not target:
        raise ConfigError(f"model={cfg.get('name')!r} has no _target_: name the nn.Module class, e.g. model._target_=mypkg.MyNet")
    try:
        fn = get_method(target)
    except Exception as e:
        raise ConfigError(f"model._target_={target!r} cannot be imported ({e}); check the module path is on PYTHONPATH") from e
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in data_info.items() if k in params or takes_kwargs}
    for key in _META_KEYS:
        cfg.pop(key, None)
    cfg.update({k: v for k, v in extra.items() if k not in cfg or cfg[k] is None})
    try:
        model = instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise ConfigError(f"model._target_={target}: could not build it: {e.__cause__ or e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={target} returned {type(model).__name__}, not a torch nn.Module")
    return model


def fingerprint(model: nn.Module) -> str:
    """A short hash of parameter names, shapes and dtypes: peers must agree on it to train together."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_output_logits(out) -> torch.Tensor:
    """Hugging Face models return an output object with ``.logits``; plain modules return the tensor."""
    return out.logits if hasattr(out, "logits") else out
