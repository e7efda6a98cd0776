"""A stage of a model whose forward is one ``nn.Sequential`` (the MLP): a run of its modules.

A *block* is a module with parameters plus the parameter-free modules after it
(Linear + ReLU); parameter-free modules in front (Flatten) go with the first block.
Modules keep their indices, so stage parameters keep the full model's names
(``net.3.weight``) and load from / merge into a whole-model checkpoint by name.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from smolcluster.errors import ConfigError


def find_sequential(model: nn.Module) -> tuple[str, nn.Sequential]:
    children = list(model.named_children())
    if len(children) == 1 and isinstance(children[0][1], nn.Sequential):
        return children[0]
    raise ConfigError(
        f"algo=mp cannot split {type(model).__name__}: it splits the decoder families of "
        "smolcluster.pipeline.architectures (GPT-2, Llama, Mistral, Qwen2, Qwen3) or a "
        "model whose only child is an nn.Sequential (like smolcluster.models.mlp.MLP)"
    )


def block_groups(seq: nn.Sequential) -> list[list[int]]:
    """Module indices of each block: a parametrised module and the parameter-free ones after it."""
    groups: list[list[int]] = []
    leading: list[int] = []
    for i, m in enumerate(seq):
        if any(True for _ in m.parameters()):
            groups.append(leading + [i])
            leading = []
        elif groups:
            groups[-1].append(i)
        else:
            leading.append(i)
    if not groups:
        raise ConfigError("the model's nn.Sequential has no layers with parameters: nothing to split")
    groups[-1] += leading
    return groups


class SequentialStage(nn.Module):
    def __init__(self, attr: str, modules: OrderedDict[str, nn.Module], first: bool, last: bool):
        super().__init__()
        self.attr, self.first, self.last = attr, first, last
        setattr(self, attr, nn.Sequential(modules))

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        del cache  # no per-request state in an MLP
        return getattr(self, self.attr)(x)


def sequential_stage(model: nn.Module, blocks: range, first: bool, last: bool) -> SequentialStage:
    attr, seq = find_sequential(model)
    groups = block_groups(seq)
    keep = [i for b in blocks for i in groups[b]]
    return SequentialStage(attr, OrderedDict((str(i), seq[i]) for i in keep), first, last)
