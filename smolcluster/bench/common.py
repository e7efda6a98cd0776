"""What the benchmarks share: the in-process ``algo=local`` benches' data arguments and config, and a tiny
run directory for the serving benches (and tests)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hydra import compose, initialize_config_dir

from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import TrainConfig, train_config


def add_local_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    shared = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", "../shared/data"))
    p.add_argument("--root", default=str(shared / "mnist"),
                   help="MNIST IDX directory (default: $SMOLCLUSTER_SHARED_DATA/mnist, else ../shared/data/mnist)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64)


def local_config(args: argparse.Namespace, *extra: str) -> TrainConfig:
    """The composed config of an ``algo=local`` run on ``args``' data, steps and batch size."""
    overrides = [f"data={args.data}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                 "train.progress=false", "algo=local", *extra]
    if args.data == "mnist":
        overrides.append(f"data.root={args.root}")
    return compose_config(overrides)


def compose_config(overrides: list[str]) -> TrainConfig:
    """The training config ``python -m smolcluster.train OVERRIDES`` would run (Hydra's compose, in process)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return train_config(compose("config", overrides=overrides))


def write_tiny_run(d: Path, n_positions: int, vocab: int = 500, seed: int = 0,
                   n_layer: int = 2, n_embd: int = 64) -> Path:
    """A run directory as ``train`` writes it, for the serving benchmarks and tests: a seeded random GPT-2
    (n_head=4, as model=gpt2-tiny says) in checkpoint.safetensors, and a byte-level BPE of its vocabulary
    in tokenizer.json."""
    import torch

    from smolcluster import checkpoint
    from smolcluster.models.gpt2 import build_gpt2

    torch.manual_seed(seed)
    model = build_gpt2(vocab_size=vocab, n_layer=n_layer, n_head=4, n_embd=n_embd, n_positions=n_positions).eval()
    checkpoint.save(d, model, None, 0)
    write_tokenizer(d, vocab)
    return d


def write_tokenizer(d: Path, vocab: int) -> Path:
    """``d/tokenizer.json``: a byte-level BPE of ``vocab`` tokens (at least 257), trained on Python's help topics."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from pydoc_data.topics import topics

    tok.train_from_iterator(list(topics.values())[:200], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    return d
