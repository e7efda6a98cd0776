"""Checkpoints: tensors in ``checkpoint.safetensors``, step and optimizer settings in ``checkpoint.json``.

Model parameters are stored under their ``named_parameters`` names (so a
pipeline stage can load just its own layers by name), trainable ones only (a LoRA run's frozen
base is rebuilt from ``model.pretrained`` or the seed, and only its adapters are stored); optimizer state tensors
under ``optim/<param index>/<key>``. Writes are atomic (temp file + rename) so
a crash mid-write never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from smolcluster.errors import ConfigError
from smolcluster.optim import FlatOptimizer

TENSORS, META = "checkpoint.safetensors", "checkpoint.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def save(run_dir: str | Path, model: nn.Module, optimizer: FlatOptimizer | None, step: int,
         extra: dict | None = None) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    meta: dict = {"step": step, **(extra or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, st in state["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
                else:
                    meta.setdefault("optim_scalars", {}).setdefault(str(idx), {})[key] = value
        meta["optim_param_groups"] = state["param_groups"]
    _atomic_write(run_dir / TENSORS, lambda tmp: save_file(tensors, str(tmp), metadata={"step": str(step)}))
    _atomic_write(run_dir / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return run_dir / TENSORS


def resolve(path: str | Path) -> Path:
    """Accept a run directory or the checkpoint file itself; error clearly when there is none."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TENSORS
    if not p.is_file():
        raise ConfigError(f"resume={path}: no {TENSORS} there; give a run directory that finished a checkpoint")
    return p


def load_meta(path: str | Path) -> dict:
    meta = resolve(path).with_name(META)
    return json.loads(meta.read_text()) if meta.is_file() else {"step": 0}


def load(path: str | Path, model: nn.Module, optimizer: FlatOptimizer | None = None,
         prefix: str = "") -> dict:
    """Load parameters (only those the model has, optionally under ``prefix``) and optimizer state."""
    file = resolve(path)
    meta = load_meta(file)
    device = next(model.parameters()).device
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                key = prefix + name
                if key not in keys:
                    raise ConfigError(f"checkpoint {file} has no tensor {key!r}: it was written by another model")
                t = f.get_tensor(key)
                if t.shape != p.shape:
                    raise ConfigError(f"checkpoint {file}: {key} has shape {tuple(t.shape)}, model wants {tuple(p.shape)}")
                p.copy_(t.to(device))
        if optimizer is not None and "optim_param_groups" in meta:
            state: dict = {}
            for key in keys:
                if key.startswith("optim/"):
                    _, idx, name = key.split("/", 2)
                    state.setdefault(int(idx), {})[name] = f.get_tensor(key).to(device)
            for idx, scalars in meta.get("optim_scalars", {}).items():
                state.setdefault(int(idx), {}).update(scalars)
            optimizer.load_state_dict({"state": state, "param_groups": meta["optim_param_groups"]})
    return meta
