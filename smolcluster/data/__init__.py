"""Data sets as in-memory tensors, usable offline: digits (embedded), MNIST (IDX files), text, chat (JSONL).

Every loader returns a :class:`DataBundle`; samples are rows of ``train_x``/``train_y``
and batches are picked by index (see :mod:`smolcluster.data.sharding`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from smolcluster.errors import ConfigError


@dataclass
class DataBundle:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict = field(default_factory=dict)  # constructor args the model needs: in_features, num_classes, vocab_size
    tokenizer: object | None = None


def build_data(data_cfg: Mapping, model_cfg: Mapping) -> DataBundle:
    name = data_cfg["name"]
    if name == "digits":
        from smolcluster.data import digits

        tx, ty, vx, vy = digits.load(data_cfg.get("test_fraction", 0.2))
        return DataBundle(tx, ty, vx, vy, info={"in_features": tx.shape[1], "num_classes": 10})
    if name == "mnist":
        from smolcluster.data import mnist

        tx, ty, vx, vy = mnist.load(data_cfg["root"], download=bool(data_cfg.get("download", False)),
                                    mirror=data_cfg.get("mirror") or mnist.MIRROR)
        return DataBundle(tx, ty, vx, vy, info={"in_features": tx.shape[1], "num_classes": 10})
    if name == "text":
        from smolcluster.data import text

        corpus = text.read_corpus(data_cfg.get("path"))
        kind = data_cfg.get("tokenizer", "auto")
        pretrained = model_cfg.get("pretrained")
        if kind == "auto" and pretrained and (Path(pretrained).expanduser() / "tokenizer.json").is_file():
            kind = str(Path(pretrained).expanduser() / "tokenizer.json")  # its ids are the model's vocabulary
        tok = text.get_tokenizer(corpus, kind, data_cfg.get("vocab_size", 4096), data_cfg.get("cache_dir"))
        ids = torch.tensor(tok.encode(corpus), dtype=torch.long)
        n_val = max(int(len(ids) * data_cfg.get("val_fraction", 0.1)), model_cfg["block_size"] + 1)
        tx, ty = text.windows(ids[:-n_val], model_cfg["block_size"])
        vx, vy = text.windows(ids[-n_val:], model_cfg["block_size"])
        return DataBundle(tx, ty, vx, vy, info={"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id}, tokenizer=tok)
    if name == "chat":
        return _chat(data_cfg, model_cfg)
    raise ConfigError(f"data={name!r} is unknown: choose digits, mnist, text or chat")


def _chat(data_cfg: Mapping, model_cfg: Mapping) -> DataBundle:
    """Conversations rendered with the chat template of the model directory (model.pretrained, or data.template_dir)."""
    from smolcluster.data import chat, text

    model_dir = data_cfg.get("template_dir") or model_cfg.get("pretrained")
    if not model_dir:
        raise ConfigError("data=chat renders conversations with a model directory's chat template: give "
                          "model.pretrained=DIR (or data.template_dir=DIR)")
    if not Path(model_dir).expanduser().is_dir():
        raise ConfigError(f"data=chat: {model_dir} is not a directory; give the model directory whose chat template "
                          "renders the conversations (model.pretrained=DIR or data.template_dir=DIR)")
    if not data_cfg.get("path"):
        raise ConfigError("data=chat needs data.path=FILE.jsonl (one {\"messages\": [...]} conversation a line)")
    tx, ty, vx, vy = chat.load(data_cfg, model_cfg["block_size"], model_dir)
    tok = text.TextTokenizer.load(Path(model_dir).expanduser() / "tokenizer.json")
    return DataBundle(tx, ty, vx, vy, info={"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id}, tokenizer=tok)
