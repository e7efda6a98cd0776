"""GPT-2 as Hugging Face's GPT2LMHeadModel: pretrained from a local path / the HF cache, or seeded random init."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from smolcluster.errors import ConfigError

GPT2_EOS = 50256  # <|endoftext|> in GPT-2's own 50257-token vocabulary


def gpt2_config(vocab_size: int, n_layer: int, n_head: int, n_embd: int, n_positions: int,
                dropout: float = 0.0, eos_token_id: int | None = None) -> GPT2Config:
    """``eos_token_id``: the tokenizer's end-of-text id; without one, GPT-2's own where the vocabulary has it,
    else none (transformers' default 50256 does not exist in a small vocabulary, and it says so)."""
    if eos_token_id is None and vocab_size > GPT2_EOS:
        eos_token_id = GPT2_EOS
    return GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    )


def build_gpt2(
    vocab_size: int | None = None,  # from the data's tokenizer; None: GPT-2's own 50257
    n_layer: int = 12,
    n_head: int = 12,
    n_embd: int = 768,
    n_positions: int = 1024,
    dropout: float = 0.0,
    pretrained: str | None = None,
    block_size: int | None = None,  # used by the data pipeline, accepted here so configs stay flat
    eos_token_id: int | None = None,
) -> GPT2LMHeadModel:
    """GPT-2 of the given shape. The caller seeds torch first, so random init is reproducible."""
    del block_size
    if pretrained:  # a Hugging Face directory of any supported family (its config.json decides), or a hub id
        from smolcluster.models.hf import load_pretrained

        return load_pretrained(pretrained, vocab_size)
    config = gpt2_config(vocab_size or GPT2_EOS + 1, n_layer, n_head, n_embd, n_positions, dropout, eos_token_id)
    return GPT2LMHeadModel(config)


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_pretrained(pretrained: str) -> GPT2LMHeadModel:
    """A local directory or the HF cache first; the hub only for a hub id (not a path) when online."""
    try:
        return GPT2LMHeadModel.from_pretrained(pretrained, local_files_only=True)
    except OSError as e:
        local_error = e
    # a hub id is "name" or "org/name"; anything else is a path the user meant on this disk
    is_path = pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1 or Path(pretrained).exists()
    if not is_path and not _offline():
        try:
            return GPT2LMHeadModel.from_pretrained(pretrained)
        except (OSError, ValueError) as e:
            local_error = e
    where = "there" if is_path else "in the Hugging Face cache" + ("" if _offline() else " or on the hub")
    raise ConfigError(
        f"model.pretrained={pretrained!r}: no GPT-2 weights found {where} ({type(local_error).__name__}); "
        "point it at a directory holding config.json + model.safetensors, or set model.pretrained=null "
        "for a random init" + ("" if is_path or _offline() else " (offline? HF_HUB_OFFLINE=1 skips the hub)")
    ) from local_error
