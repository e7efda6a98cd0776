"""Next-token choice on the last stage: greedy, or temperature / top-k / top-p sampling with a seed.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a request's
tokens depend on its seed alone, never on what else is in flight. The filters
follow Hugging Face's order and semantics: temperature, then top-k, then top-p
(keep the smallest set of tokens whose probability reaches ``top_p``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smolcluster.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int = 0

    def check(self) -> SamplingParams:
        if not (self.temperature >= 0):
            raise ConfigError(f"temperature={self.temperature} is invalid: use 0 (greedy) or a positive number")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is invalid: use 0 (off) or a positive integer")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p} is invalid: it must be in (0, 1] (1 = off)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to a 1-D logits vector (a new tensor)."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[-1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits (shape (V,))."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))
