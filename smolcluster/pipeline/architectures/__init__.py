"""The decoder families a pipeline stage speaks, keyed by Hugging Face ``model_type``.

Each family is one small file behind one interface (:mod:`.base`): an :class:`Architecture`
read from ``config.json`` (which tensors a stage holds, how blocks split) and a stage module
(``embed`` / ``run_blocks`` / ``logits`` with a per-request :class:`KVCache`). Adding a family
is adding a file and a line below. Stages never import ``transformers``.

- ``gpt2``: GPT-2;
- ``llama``: Llama 2/3.x (incl. llama3 RoPE scaling), SmolLM2, TinyLlama; the Llama-shaped block;
- ``qwen``: Qwen2/2.5 and Qwen3; ``mistral``: Mistral (sliding window honoured).
"""

from __future__ import annotations

from smolcluster.errors import ConfigError
from smolcluster.pipeline.architectures.base import Architecture, KVCache
from smolcluster.pipeline.architectures.gpt2 import GPT2
from smolcluster.pipeline.architectures.llama import Llama
from smolcluster.pipeline.architectures.mistral import Mistral
from smolcluster.pipeline.architectures.qwen import Qwen2, Qwen3

# The same list as smolcluster.models.hf.SUPPORTED (a test keeps them equal; importing that
# module here would pull Hydra into every stage process).
FAMILIES: dict[str, type[Architecture]] = {"gpt2": GPT2, "llama": Llama, "mistral": Mistral, "qwen2": Qwen2,
                                           "qwen3": Qwen3}


def family_for(config: dict) -> Architecture:
    """The architecture of a Hugging Face ``config.json`` dict; an unsupported one is refused in one line."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"model_type {model_type!r} is not supported by the pipeline; supported architectures: "
                          f"{', '.join(FAMILIES)}")
    return family(config)


__all__ = ["FAMILIES", "Architecture", "KVCache", "family_for"]
