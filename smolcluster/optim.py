"""Optimizer, warmup + cosine schedule and gradient clipping, shared by every algorithm."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from smolcluster.train_settings import TrainSettings


class FlatOptimizer:
    """torch.optim's SGD and AdamW, element for element, on the few large tensors a run steps (the flat buffers),
    with their ``state`` / ``param_groups`` / ``state_dict`` shapes, so checkpoints, resumes and the ring's
    catch-up state read and write what torch's did.

    Written out rather than taken from torch.optim because every torch.optim method is wrapped for
    torch.compile and imports torch._dynamo on its first call: over a second of every training process's
    start (more on a Raspberry Pi), for a compiler that never runs here. The arithmetic is torch's
    single-tensor path (``_single_tensor_sgd`` / ``_single_tensor_adam``, what torch runs on CPU);
    tests/test_optim.py holds the two equal, bit for bit.
    """

    def __init__(self, params, kind: str, **hyper):
        self.kind = kind
        self.param_groups = [{"params": list(params), **hyper}]
        self.state: defaultdict[torch.Tensor, dict] = defaultdict(dict)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._sgd if self.kind == "sgd" else self._adamw)(p, p.grad, self.state[p], group)

    @staticmethod
    def _sgd(p: torch.Tensor, grad: torch.Tensor, state: dict, g: dict) -> None:
        if g["weight_decay"]:
            grad = grad.add(p, alpha=g["weight_decay"])
        if g["momentum"]:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(g["momentum"]).add_(grad)
            grad = grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
        p.add_(grad, alpha=-g["lr"])

    @staticmethod
    def _adamw(p: torch.Tensor, grad: torch.Tensor, state: dict, g: dict) -> None:
        if not state:  # torch keeps the step count as a float32 scalar on the CPU
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        (beta1, beta2), lr = g["betas"], g["lr"]
        state["step"] += 1
        if g["weight_decay"]:
            p.mul_(1 - lr * g["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(g["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))

    def state_dict(self) -> dict:
        """torch.optim's layout: state by parameter index, groups with their settings and parameter indices."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": {index[id(p)]: dict(st) for p, st in self.state.items() if st}, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """As torch.optim does: the saved groups' settings win, state tensors move to their parameter's device and
        dtype (the step count stays as saved). Groups and sizes must match."""
        params = self._params()
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        if sizes != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"optimizer state for parameter groups of sizes {sizes} does not fit this optimizer's "
                             f"{[len(g['params']) for g in self.param_groups]}")
        for group, old in zip(self.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in old.items() if k in group and k != "params"})
        self.state = defaultdict(dict)
        for idx, st in saved["state"].items():
            p = params[int(idx)]
            self.state[p] = {k: v.to(p.device, p.dtype) if torch.is_tensor(v) and k != "step" else v
                             for k, v in st.items()}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]


def sgd(params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> FlatOptimizer:
    if momentum < 0:  # what torch.optim.SGD refuses
        raise ValueError(f"Invalid momentum value: {momentum} (it must be >= 0)")
    return FlatOptimizer(params, "sgd", lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def adamw(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.01, eps: float = 1e-8) -> FlatOptimizer:
    betas = tuple(betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):  # what torch.optim.AdamW refuses
        raise ValueError(f"Invalid betas {betas}: give two values, each in [0, 1)")
    return FlatOptimizer(params, "adamw", lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def build_optimizer(model: nn.Module, train: TrainSettings, flat=None) -> FlatOptimizer:
    """SGD or AdamW. Given the model's FlatParams, it steps the flat buffers: one fused update
    per dtype instead of one per tensor (the same arithmetic, element for element)."""
    params = list(flat.params.values()) if flat is not None else [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return sgd(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return adamw(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


def lr_at(step: int, train: TrainSettings, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio (or constant)."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: FlatOptimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_(params, max_norm: float) -> None:
    """Clip the global gradient norm of ``params`` in place (no-op when max_norm is 0)."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
