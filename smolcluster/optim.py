"""Optimizer, warmup + cosine schedule and gradient clipping, shared by every algorithm."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn


def build_optimizer(model: nn.Module, train: SimpleNamespace, flat=None) -> torch.optim.Optimizer:
    """SGD or AdamW. Given the model's FlatParams, it steps the flat buffers: one fused update
    per dtype instead of one per tensor (the same arithmetic, element for element)."""
    params = list(flat.params.values()) if flat is not None else [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def lr_at(step: int, train: SimpleNamespace, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio (or constant)."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_(params, max_norm: float) -> None:
    """Clip the global gradient norm of ``params`` in place (no-op when max_norm is 0)."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
