"""Next-token choice on the last stage: greedy, or temperature / top-k / top-p sampling with a seed.

Each request owns a ``torch.Generator`` seeded from its ``seed``, so a request's
tokens depend on its seed alone, never on what else is in flight. The filters
follow Hugging Face's order and semantics: temperature, then top-k, then top-p
(keep the smallest set of tokens whose probability reaches ``top_p``).

:class:`SamplingParams` is the one home of these settings and their defaults: the ``infer`` / ``chat``
schemas (``inference/settings.py``) take their defaults from it, the chat sessions' ``Settings`` and the chat
page hold one, the client sends :meth:`~SamplingParams.to_wire` to stage 0, which rebuilds it with
:meth:`~SamplingParams.from_wire`, and the OpenAI API converts a request with
:meth:`~SamplingParams.from_openai`. How long an answer runs (``max_new_tokens``, stops, EOS) is not
here: the sampler never needs it, and each caller has its own default for it.
"""

from __future__ import annotations

import secrets
from dataclasses import astuple, dataclass, replace
from typing import TYPE_CHECKING

from smolcluster.errors import ConfigError

# torch is imported where it is used: the infer/chat schemas import SamplingParams, and a bad override
# or --help must answer before torch loads (sys.modules makes the per-call import a dict lookup)
if TYPE_CHECKING:
    import torch

WIRE_FIELDS = ("temperature", "top_k", "top_p", "seed")  # what mp.submit carries (pipeline/protocol.py)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0    # 0 = greedy (argmax): the default everywhere (infer, chat, the sessions)
    top_k: int = 0              # 0 = off
    top_p: float = 1.0          # 1 = off
    seed: int | None = None     # None = a fresh one per request (see :meth:`resolved`)

    def check(self, seed_key: str = "seed") -> SamplingParams:
        """Itself, or a ConfigError naming the first bad key and its valid range (``seed_key``: the seed's name
        where it was given, e.g. infer's ``sampling_seed``)."""
        if not (self.temperature >= 0):
            raise ConfigError(f"temperature={self.temperature} is invalid: use 0 (greedy) or a positive number")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is invalid: use 0 (off) or a positive integer")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p={self.top_p} is invalid: it must be in (0, 1] (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ConfigError(f"{seed_key}={self.seed} is invalid: use an integer in [0, 2**63), or null for a fresh one")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolved(self) -> SamplingParams:
        """With a seed: a request's tokens then depend on it alone, and it can be repeated."""
        return self if self.seed is not None else replace(self, seed=secrets.randbelow(2**31))

    def to_wire(self) -> dict:
        """The fields a request carries to stage 0 (the seed resolved: every stage must agree on it)."""
        return dict(zip(WIRE_FIELDS, astuple(self.resolved()), strict=True))

    @classmethod
    def from_wire(cls, fields: dict) -> SamplingParams:
        """From a request's fields (mp.submit, or the intro a stage passes on); their types were checked
        by pipeline/protocol.py, JSON may have sent a float as an int."""
        return cls(float(fields["temperature"]), int(fields["top_k"]), float(fields["top_p"]), int(fields["seed"]))

    @classmethod
    def from_openai(cls, temperature: float | None, top_p: float | None, top_k: int | None,
                    seed: int | None) -> SamplingParams:
        """An OpenAI request's sampling. Its unset keys take OpenAI's documented defaults (temperature 1,
        top_p 1), not ours: a client written for OpenAI gets what it expects. top_p=0 keeps only the most
        likely token, which is greedy."""
        temperature = 1.0 if temperature is None else float(temperature)
        top_p = 1.0 if top_p is None else float(top_p)
        if top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        return cls(temperature, int(top_k or 0), top_p, seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to a 1-D logits vector (a new tensor)."""
    import torch

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
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(int(seed))
