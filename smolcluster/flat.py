"""Parameters and gradients in one flat buffer per dtype; the module's tensors become views.

This is what lets a whole step cross the wire as one frame per dtype, with no
per-tensor Python loop on the hot path: the flat gradient *is* every ``p.grad``
and the flat parameter buffer *is* every ``p.data``.

Only trainable parameters (``requires_grad``) are flattened: a frozen base under LoRA
(:mod:`smolcluster.models.lora`) stays where it is, so the buffers, the optimizer over them and
every message built from them carry only the adapters.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatParams:
    def __init__(self, model: nn.Module):
        self.model = model
        groups: dict[torch.dtype, list[nn.Parameter]] = {}
        # parameters() de-duplicates tied weights
        self.tensors = [p for p in model.parameters() if p.requires_grad]  # the parameters the buffers hold
        for p in self.tensors:
            groups.setdefault(p.dtype, []).append(p)
        self.params: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        for dtype, ps in groups.items():
            name = str(dtype).removeprefix("torch.")
            total = sum(p.numel() for p in ps)
            flat = torch.empty(total, dtype=dtype, device=ps[0].device)
            grad = torch.zeros(total, dtype=dtype, device=ps[0].device)
            offset = 0
            for p in ps:
                n = p.numel()
                flat[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = flat[offset : offset + n].view_as(p)
                # A pre-set grad view makes autograd accumulate into the flat buffer in place.
                p.grad = grad[offset : offset + n].view_as(p)
                offset += n
            flat.grad = grad  # so an optimizer can step the whole flat buffer at once
            self.params[name], self.grads[name] = flat, grad

    def zero_grad(self) -> None:
        # Never optimizer.zero_grad(set_to_none=True): that would detach p.grad from the flat buffer.
        for g in self.grads.values():
            g.zero_()

    def numel(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def load_params(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, flat in self.params.items():
            flat.copy_(tensors[name])

    def load_grads(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, flat in self.grads.items():
            flat.copy_(tensors[name])
