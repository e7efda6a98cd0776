"""Decoder-only language models of the Hugging Face families the pipeline speaks, as ``transformers`` modules.

Training (``local``, ``syncps``, ``edp``) uses these modules as they are; ``algo=mp`` and
inference split them into stages (``smolcluster.pipeline.architectures``), reading the
same ``config.json``. Two ways in:

- a named small config (``model=llama-tiny``, ``qwen2-tiny``, ``qwen3-tiny``, ``mistral-tiny``):
  a seeded random init of the family at the given size;
- ``model.pretrained=DIR``: a Hugging Face model directory as ``huggingface-cli download``
  leaves it (``config.json`` + ``model.safetensors`` or sharded ``model-0000N-of-0000M.safetensors``).
  The family then comes from ``config.json``, whatever ``model.family`` says; data=text then
  encodes the corpus with the directory's ``tokenizer.json`` (its ids are the model's vocabulary).

A run's checkpoint of any of these (GPT-2 included) is also written as a Hugging Face
directory, ``RUN_DIR/hf/`` (:func:`save_hf_dir`), so the result goes anywhere transformers does.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
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


def build_causal_lm(family: str = "llama", vocab_size: int | None = None, n_layer: int = 2, n_head: int = 4,
                    n_embd: int = 128, n_kv_head: int | None = None, intermediate_size: int | None = None,
                    head_dim: int | None = None, n_positions: int = 2048, rope_theta: float = 10000.0,
                    rope_scaling: dict | None = None, rms_norm_eps: float = 1e-6, tie_embeddings: bool = False,
                    sliding_window: int | None = None, pretrained: str | None = None,
                    block_size: int | None = None, dropout: float = 0.0, eos_token_id: int | None = None):
    """A random-init model of ``family`` (the caller seeds torch first), or ``pretrained`` from a directory.

    ``vocab_size`` comes from the data's tokenizer (None: Llama 2's 32000); a pretrained model must have
    an embedding row for each of its tokens."""
    del block_size  # used by the data pipeline, accepted here so configs stay flat
    if dropout:
        raise ConfigError(f"model.dropout={dropout}: the {family} family has no dropout here; set model.dropout=0")
    if pretrained:
        return load_pretrained(pretrained, vocab_size)
    from transformers import AutoModelForCausalLM

    config = family_config(family, vocab_size=vocab_size or 32000, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
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


def load_pretrained(pretrained: str, vocab_size: int | None = None):
    """A supported causal LM from a local Hugging Face model directory (sharded safetensors included),
    in float32 for training. ``vocab_size``: the data's tokenizer, whose ids must all be rows of the embedding."""
    d = Path(pretrained).expanduser()
    if not d.is_dir():  # a hub id in the HF cache (GPT-2 only, as before)
        from smolcluster.models.gpt2 import _load_pretrained

        model = _load_pretrained(pretrained)
    else:
        read_config(d)
        from transformers import AutoModelForCausalLM

        try:
            with _no_progress_bars():  # one bar per process of a cluster run says nothing the log does not
                model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, attn_implementation="sdpa",
                                                             dtype="float32")
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.pretrained={pretrained}: could not load it ({e})") from e
    check_vocab(pretrained, model, vocab_size)
    return model


def check_vocab(pretrained: str, model, vocab_size: int | None) -> None:
    """Refuse a data tokenizer with more ids than ``model`` has embedding rows."""
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > rows:
        raise ConfigError(f"model.pretrained={pretrained}: the data's tokenizer has {vocab_size} tokens, the model "
                          f"only {rows}: train with the model's own tokenizer (its tokenizer.json in that "
                          "directory, or data.tokenizer=PATH)")


# Tokenizer files a model directory may carry beside tokenizer.json; copied as they are (chat template included).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


@contextmanager
def _no_progress_bars():
    """transformers' tqdm bars off for a while (they are a global switch)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextmanager
def staged_dir(out_dir: Path):
    """A fresh sibling of ``out_dir`` to write a directory into; when the block ends well, each file moves
    into ``out_dir`` by an atomic rename, so a crash mid-write leaves every file whole (old or new)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            f.replace(out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_hf_model(model) -> bool:
    """A ``transformers`` PreTrainedModel (without importing transformers when nothing did yet)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def checkpoint_activations(model, model_name: str) -> None:
    """Keep only each transformer block's input for the backward and recompute the rest of the block there
    (``train.activation_checkpointing``): a block's activations instead of all of them, for a second forward.
    The gradients are the same (the recompute replays the same ops and RNG). Non-reentrant checkpoints: a
    frozen embedding (LoRA) gives the first block an input that needs no grad, which reentrant ones mishandle."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    if not is_hf_model(base) or not base.supports_gradient_checkpointing:
        raise ConfigError(f"train.activation_checkpointing=true: model={model_name} has no transformer blocks "
                          "to checkpoint; it works for the Hugging Face families (gpt2, llama, qwen, mistral, ...)")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _tokenizer_config(tokenizer_json: Path, config) -> dict:
    """A ``tokenizer_config.json`` for a bare ``tokenizer.json`` (a BPE trained on the corpus, GPT-2's):
    ``AutoTokenizer`` then loads it as a ``PreTrainedTokenizerFast`` that knows its end-of-text token."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    name = tok.id_to_token(eos) if eos is not None else None
    name = name or ("<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else None)
    if name is not None:
        out["eos_token"] = name
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context:
        out["model_max_length"] = int(context)
    return out


def save_hf_dir(model_or_state, config, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write ``out_dir`` as a Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load: config.json, generation_config.json, model.safetensors (tied
    weights stored once, as ``save_pretrained`` does: it is what writes them) and the tokenizer files.

    ``model_or_state`` is a PreTrainedModel (``config`` may then be None), or a state dict of the whole
    model under its ``named_parameters`` names with its transformers ``config`` (a pipeline's stages
    together). The tokenizer files next to ``tokenizer_path`` (a pretrained directory's) are copied;
    a bare tokenizer.json gets a ``tokenizer_config.json`` naming its end-of-text token. Every file
    lands by an atomic rename, so a crash mid-write leaves each file whole (old or new).
    """
    import torch

    out_dir = Path(out_dir)
    if is_hf_model(model_or_state):
        model = model_or_state
        config = config if config is not None else model.config
        state = {name: p.detach() for name, p in model.named_parameters()}
    else:
        from transformers import AutoModelForCausalLM

        state = dict(model_or_state)
        with torch.device("meta"):  # only the module tree: save_pretrained reads its tied-weight and naming rules
            model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    with staged_dir(out_dir) as tmp:
        # one file however large (transformers would shard at 50GB): the directory a run hands over stays simple;
        # no "Writing model shards" bar in the middle of a training log
        with _no_progress_bars():
            model.save_pretrained(tmp, state_dict=state, max_shard_size=2**50)
        if tokenizer_path is not None:
            tokenizer_path = Path(tokenizer_path)
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            for name in TOKENIZER_FILES:
                if (tokenizer_path.parent / name).is_file():
                    shutil.copyfile(tokenizer_path.parent / name, tmp / name)
            if not (tmp / "tokenizer_config.json").is_file():
                (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer_path, config),
                                                                      indent=2))
    return out_dir
