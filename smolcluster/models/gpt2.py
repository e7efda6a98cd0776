"""GPT-2 as Hugging Face's GPT2LMHeadModel: pretrained from a local path / the HF cache, or seeded random init."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from smolcluster.errors import ConfigError


def gpt2_config(vocab_size: int, n_layer: int, n_head: int, n_embd: int, n_positions: int,
                dropout: float = 0.0) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )


def build_gpt2(
    vocab_size: int = 50257,
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
    if pretrained:
        try:
            # Never reach for the network at run time: a local dir or the HF cache only.
            return GPT2LMHeadModel.from_pretrained(pretrained, local_files_only=True)
        except OSError as e:
            raise ConfigError(
                f"model.pretrained={pretrained!r}: no GPT-2 weights found there or in the Hugging Face "
                "cache; point it at a directory holding config.json + model.safetensors, or set "
                "model.pretrained=null for a random init"
            ) from e
    config = gpt2_config(vocab_size, n_layer, n_head, n_embd, n_positions, dropout)
    if eos_token_id is not None:  # a tokenizer trained on the corpus has its own end-of-text id
        config.bos_token_id = config.eos_token_id = eos_token_id
    return GPT2LMHeadModel(config)
