"""Text corpora and their tokenizer: any UTF-8 file, or Python's own pydoc topics as the embedded default."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from loguru import logger
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smolcluster.errors import DataError

EOS = "<|endoftext|>"


def embedded_corpus() -> str:
    """The pydoc topics that ship with every CPython: ~0.5 MB of real English prose and code."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_corpus(path: str | None) -> str:
    if path is None:
        return embedded_corpus()
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path={path}: no such file ({p.resolve()}); give a UTF-8 text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data.path={path} is not UTF-8 text ({e}); convert it or pick another file") from e


class TextTokenizer:
    """A thin wrapper so GPT-2's tokenizer and a trained BPE look the same to the rest of the code."""

    def __init__(self, tokenizer: Tokenizer, kind: str, path: Path | None = None, eos: str = EOS):
        self.tok, self.kind = tokenizer, kind
        self.path = path  # the tokenizer.json it was loaded from (a model directory's, with its other files)
        self.eos_id = tokenizer.token_to_id(eos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """A tokenizer.json; its end-of-text token is ``tokenizer_config.json``'s ``eos_token`` when one lies
        beside it (a Hugging Face model directory: Llama's is not GPT-2's ``<|endoftext|>``)."""
        path = Path(path)
        eos = EOS
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token") or EOS
            eos = eos.get("content", EOS) if isinstance(eos, dict) else eos
        return cls(Tokenizer.from_file(str(path)), kind="file", path=path, eos=eos)


def _gpt2_from_cache() -> TextTokenizer | None:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download("gpt2", "tokenizer.json", local_files_only=True)
    except Exception:
        return None
    return TextTokenizer(Tokenizer.from_file(path), kind="gpt2")


def _train_bpe(text: str, vocab_size: int, cache_dir: Path) -> TextTokenizer:
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = cache_dir / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return TextTokenizer(Tokenizer.from_file(str(path)), kind="bpe")
    logger.info(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the corpus; cached at {path}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent workers never read a half-written file
    return TextTokenizer(tok, kind="bpe")


def get_tokenizer(text: str, kind: str = "auto", vocab_size: int = 4096, cache_dir: str | None = None) -> TextTokenizer:
    if kind in ("auto", "gpt2"):
        tok = _gpt2_from_cache()
        if tok is not None:
            return tok
        if kind == "gpt2":
            raise DataError("data.tokenizer=gpt2 but GPT-2's tokenizer is not in the Hugging Face cache; "
                            "use data.tokenizer=auto to train a BPE on the corpus")
    elif kind != "bpe":
        if Path(kind).is_file():
            return TextTokenizer.load(kind)
        raise DataError(f"data.tokenizer={kind!r}: choose auto, gpt2, bpe or a tokenizer.json path")
    cache = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "smolcluster"
    return _train_bpe(text, vocab_size, cache)


def windows(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into non-overlapping (input, next-token target) windows of block_size."""
    n = (len(ids) - 1) // block_size
    if n < 1:
        raise DataError(f"the corpus has {len(ids)} tokens, fewer than one block of {block_size}: "
                        "use a longer text or a smaller model.block_size")
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    return x, y
