"""Where a stage's weights come from, read tensor by tensor so a stage holds only its share.

Three sources, each a whole-model safetensors file read *by parameter name*:

- ``checkpoint=RUN_DIR``: a run written by ``train`` (``checkpoint.safetensors``);
- ``model.pretrained=DIR_OR_HUB_ID``: Hugging Face GPT-2 weights (``config.json`` +
  ``model.safetensors``, keys with or without the ``transformer.`` prefix);
- neither: a seeded random init, written once to a file by whoever starts the stages.

The reader below does not use ``safetensors.safe_open``: that memory-maps the whole
file, and every page a stage touches while reading counts toward its peak RSS on
top of the copy it keeps. Plain ``readinto`` into the parameter's own storage
allocates each tensor exactly once.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from smolcluster.errors import ConfigError
from smolcluster.pipeline.gpt2 import GPT2Shape, GPT2Stage, param_shapes

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> tuple[dict, int]:
    """The safetensors JSON header (name -> dtype, shape, data_offsets) and where the data starts."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ConfigError(f"{path} is not a safetensors file (header length {n} is implausible)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: str | Path, keys: dict[str, str], dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for ``keys = {name: key in file}``; each tensor read straight into its own memory."""
    path = Path(path)
    header, base = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with path.open("rb", buffering=0) as f:
        for name, key in keys.items():
            info = header.get(key)
            if info is None:
                raise ConfigError(f"{path} has no tensor {key!r}: it was written for another model")
            file_dtype = _DTYPES.get(info["dtype"])
            if file_dtype is None:
                raise ConfigError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=file_dtype)
            nbytes = t.numel() * t.element_size()
            if end - start != nbytes:
                raise ConfigError(f"{path}: tensor {key!r} is {end - start} bytes, its shape needs {nbytes}")
            f.seek(base + start)
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ConfigError(f"{path} is truncated (tensor {key!r})")
                got += n
            out[name] = t if dtype is None or t.dtype == dtype else t.to(dtype)
    return out


# -- GPT-2 ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPT2Weights:
    """A whole-model safetensors file and how to read GPT-2 parameters from it."""

    path: Path
    shape: GPT2Shape
    prefix: str  # "" when keys carry "transformer.", "transformer." when the file's keys lack it

    def key(self, name: str) -> str:
        return name.removeprefix(self.prefix) if self.prefix else name


def _shape_from_header(header: dict, prefix: str, n_head: int, eps: float, where: str) -> GPT2Shape:
    def get(name: str) -> list[int]:
        key = name.removeprefix(prefix) if prefix else name
        if key not in header:
            raise ConfigError(f"{where} has no {key!r}: it does not hold GPT-2 weights")
        return header[key]["shape"]

    vocab, n_embd = get("transformer.wte.weight")
    n_positions = get("transformer.wpe.weight")[0]
    h = (prefix and "h.") or "transformer.h."
    n_layer = len({k[len(h):].split(".", 1)[0] for k in header if k.startswith(h)})
    if n_embd % n_head:
        raise ConfigError(f"{where}: n_embd={n_embd} is not divisible by n_head={n_head}; set model.n_head")
    return GPT2Shape(vocab, n_positions, n_embd, n_head, n_layer, eps)


def gpt2_weights(path: str | Path, n_head: int, eps: float = 1e-5) -> GPT2Weights:
    """Describe a whole-model GPT-2 safetensors file; n_head cannot be read off tensor shapes."""
    path = Path(path)
    header, _ = read_header(path)
    prefix = "" if "transformer.wte.weight" in header else "transformer."
    return GPT2Weights(path, _shape_from_header(header, prefix, n_head, eps, str(path)), prefix)


def pretrained_files(pretrained: str) -> tuple[Path, dict]:
    """(model.safetensors, config.json contents) from a local directory or the Hugging Face cache."""
    p = Path(pretrained).expanduser()
    if p.is_dir():
        weights, config = p / "model.safetensors", p / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            config = Path(hf_hub_download(pretrained, "config.json", local_files_only=True))
            weights = Path(hf_hub_download(pretrained, "model.safetensors", local_files_only=True))
        except Exception as e:
            raise ConfigError(f"model.pretrained={pretrained!r}: not a directory and not in the Hugging Face "
                              "cache; give a directory holding config.json + model.safetensors") from e
    if not weights.is_file() or not config.is_file():
        raise ConfigError(f"model.pretrained={pretrained}: needs config.json and model.safetensors there "
                          f"(found {sorted(x.name for x in weights.parent.iterdir())})")
    return weights, json.loads(config.read_text())


def load_gpt2_stage(weights: GPT2Weights, blocks: range, embed: bool, head: bool,
                    dtype: torch.dtype = torch.float32) -> GPT2Stage:
    """Build a stage whose parameters are read from ``weights`` (and nothing else is allocated)."""
    with torch.device("meta"):
        stage = GPT2Stage(weights.shape, embed, head, blocks)
    names = {name: weights.key(name) for name, _ in param_shapes(weights.shape, embed, head, blocks)}
    tensors = read_tensors(weights.path, names, dtype)
    for name, shape in param_shapes(weights.shape, embed, head, blocks):
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"{weights.path}: {names[name]} has shape {tuple(tensors[name].shape)}, "
                              f"a stage of this model needs {shape}")
    stage.load_state_dict(tensors, strict=True, assign=True)
    return stage.eval().requires_grad_(False)
