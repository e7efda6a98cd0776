"""Decoder-only language models of the Hugging Face families the pipeline speaks, as ``transformers`` modules.

Training (``local``, ``syncps``, ``edp``) uses these modules as they are; ``algo=mp`` and
inference split them into stages (``smolcluster.pipeline.architectures``), reading the
same ``config.json``. Two ways in:

- a named small config (``model=llama-tiny``, ``qwen2-tiny``, ``qwen3-tiny``, ``mistral-tiny``):
  a seeded random init of the family at the given size;
- ``model.pretrained=DIR``: a Hugging Face model directory as ``huggingface-cli download``
  leaves it (``config.json`` + ``model.safetensors`` or sharded ``model-0000N-of-0000M.safetensors``).
  The family then comes from ``config.json``, whatever ``model.family`` says.
"""

from __future__ import annotations

import json
from pathlib import Path

from smolcluster.errors import ConfigError

# HF model_type -> the config class name in transformers. GPT-2 has its own builder (models/gpt2.py).
FAMILIES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
# Every model_type the pipeline can split; refusals name this list.
SUPPORTED = ("gpt2", *FAMILIES)


def family_config(family: str, *, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                  n_kv_head: int | None = None, intermediate_size: int | None = None,
                  head_dim: int | None = None, n_positions: int = 2048, rope_theta: float = 10000.0,
                  rope_scaling: dict | None = None, rms_norm_eps: float = 1e-6, tie_embeddings: bool = False,
                  sliding_window: int | None = None, eos_token_id: int | None = None):
    """A transformers config of ``family`` at this size (the names follow GPT-2's, as the other model configs do)."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} is not supported: choose one of {', '.join(FAMILIES)} "
                          "(or model=gpt2-tiny / gpt2 for GPT-2)")
    import transformers

    rope = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling:
        rope = {**rope, **dict(rope_scaling)}
    kw = dict(vocab_size=vocab_size, hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
              num_key_value_heads=n_kv_head or n_head, intermediate_size=intermediate_size or 4 * n_embd,
              max_position_embeddings=n_positions, rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie_embeddings,
              rope_parameters=rope)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if family == "mistral":
        kw["sliding_window"] = sliding_window
    if eos_token_id is not None:  # a tokenizer trained on the corpus has its own end-of-text id
        kw.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    else:  # the transformers defaults (1, 2) may not exist in a small vocabulary
        kw.update(bos_token_id=None, eos_token_id=None)
    return getattr(transformers, FAMILIES[family])(**kw)


def build_causal_lm(family: str = "llama", vocab_size: int = 32000, n_layer: int = 2, n_head: int = 4,
                    n_embd: int = 128, n_kv_head: int | None = None, intermediate_size: int | None = None,
                    head_dim: int | None = None, n_positions: int = 2048, rope_theta: float = 10000.0,
                    rope_scaling: dict | None = None, rms_norm_eps: float = 1e-6, tie_embeddings: bool = False,
                    sliding_window: int | None = None, pretrained: str | None = None,
                    block_size: int | None = None, dropout: float = 0.0, eos_token_id: int | None = None):
    """A random-init model of ``family`` (the caller seeds torch first), or ``pretrained`` from a directory."""
    del block_size  # used by the data pipeline, accepted here so configs stay flat
    if dropout:
        raise ConfigError(f"model.dropout={dropout}: the {family} family has no dropout here; set model.dropout=0")
    if pretrained:
        return load_pretrained(pretrained)
    from transformers import AutoModelForCausalLM

    config = family_config(family, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                           n_kv_head=n_kv_head, intermediate_size=intermediate_size, head_dim=head_dim,
                           n_positions=n_positions, rope_theta=rope_theta, rope_scaling=rope_scaling,
                           rms_norm_eps=rms_norm_eps, tie_embeddings=tie_embeddings, sliding_window=sliding_window,
                           eos_token_id=eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def read_config(directory: str | Path) -> dict:
    """``config.json`` of a Hugging Face model directory, its architecture checked against :data:`SUPPORTED`."""
    d = Path(directory).expanduser()
    path = d / "config.json"
    if not path.is_file():
        raise ConfigError(f"{d}: no config.json there; model.pretrained needs a Hugging Face model directory "
                          "(download one on a connected machine with huggingface-cli download)")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(f"{d}: model_type {model_type!r} is not supported; supported architectures: "
                          f"{', '.join(SUPPORTED)}")
    return config


def load_pretrained(pretrained: str):
    """A supported causal LM from a local Hugging Face model directory (sharded safetensors included)."""
    d = Path(pretrained).expanduser()
    if not d.is_dir():  # a hub id in the HF cache (GPT-2 only, as before)
        from smolcluster.models.gpt2 import _load_pretrained

        return _load_pretrained(pretrained)
    read_config(d)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(d, local_files_only=True, attn_implementation="sdpa",
                                                    dtype="float32")
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.pretrained={pretrained}: could not load it ({e})") from e
