"""Where a model and its stages' weights come from, read tensor by tensor so a stage holds only its share.

Sources (:func:`find_model`):

- a Hugging Face model directory, as ``huggingface-cli download`` leaves it: ``config.json``
  and ``model.safetensors`` or sharded ``model-0000N-of-0000M.safetensors`` with
  ``model.safetensors.index.json`` (``model.pretrained=DIR``, or a hub id in the local cache);
- a run written by ``train`` (``checkpoint=RUN_DIR``): its ``hf/`` directory when it has one,
  else ``checkpoint.safetensors`` (GPT-2, whose ``checkpoint.json`` or Hydra config records n_head);
- a whole-model GPT-2 ``.safetensors`` file (give n_head).

Whatever the source, the model is described by its ``config.json`` dict (one is written for a
GPT-2 checkpoint from its tensor shapes), which is what reaches a stage.

Each stage reads only the tensors it holds, from whichever file holds them. The reader does
not use ``safetensors.safe_open``: that memory-maps the whole file, and every page a stage
touches while reading counts toward its peak RSS on top of the copy it keeps. Plain
``readinto`` into the parameter's own storage allocates each tensor exactly once.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from smolcluster.errors import ConfigError
from smolcluster.pipeline import quantize
from smolcluster.pipeline.architectures import family_for
from smolcluster.pipeline.quantize import StageFormat

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


def _readinto(f, offset: int, t: torch.Tensor, what: str) -> None:
    """Fill ``t``'s memory from file ``f`` at ``offset`` (no intermediate buffer)."""
    nbytes = t.numel() * t.element_size()
    f.seek(offset)
    view = memoryview(t.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
    got = 0
    while got < nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise ConfigError(f"{what} is truncated")
        got += n


def read_tensors(path: str | Path, keys: dict[str, str], dtype: torch.dtype | None = None,
                 convert=None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` for ``keys = {name: key in file}``; each tensor read straight into its own memory.

    ``convert(name, shape, read_rows)``, when given, builds a tensor's state-dict entries itself from
    ``read_rows(r0, r1)`` (rows of the file's tensor): precision and quantization applied as it is
    read, a chunk at a time (:func:`smolcluster.pipeline.quantize.convert`).
    """
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
            shape = tuple(info["shape"])
            nbytes = torch.Size(shape).numel() * file_dtype.itemsize
            if end - start != nbytes:
                raise ConfigError(f"{path}: tensor {key!r} is {end - start} bytes, its shape needs {nbytes}")
            if convert is not None:
                row = (torch.Size(shape[1:]).numel() if shape else 1) * file_dtype.itemsize

                def read_rows(r0: int, r1: int, shape=shape, start=start, row=row, key=key, file_dtype=file_dtype):
                    t = torch.empty((r1 - r0, *shape[1:]) if shape else (), dtype=file_dtype)
                    _readinto(f, base + start + r0 * row, t, f"{path} (tensor {key!r})")
                    return t

                out.update(convert(name, shape, read_rows))
                continue
            t = torch.empty(shape, dtype=file_dtype)
            _readinto(f, base + start, t, f"{path} (tensor {key!r})")
            out[name] = t if dtype is None or t.dtype == dtype else t.to(dtype)
    return out


# -- finding a model ------------------------------------------------------------------------------
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


@dataclass(frozen=True)
class ModelSource:
    """A model as the pipeline reads it: its ``config.json`` dict, and where its tensors are."""

    weights: Path                      # a Hugging Face directory or a whole-model .safetensors file
    config: dict
    directory: Path | None = None      # where tokenizer / generation config files may be


def is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and ((p / SINGLE).is_file() or (p / INDEX).is_file())


def _hub_snapshot(name: str) -> Path:
    """The local Hugging Face cache's snapshot directory of hub id ``name`` (never the network)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, "config.json", local_files_only=True)).parent
    except Exception as e:
        raise ConfigError(f"{name!r}: not a directory and not in the Hugging Face cache; download the model on a "
                          "connected machine (huggingface-cli download NAME --local-dir DIR) and give DIR") from e


def gpt2_config(path: Path, n_head: int | None, eps: float = 1e-5) -> dict:
    """The ``config.json`` dict of a whole-model GPT-2 file, from its tensor shapes (n_head cannot be read off them)."""
    header, _ = read_header(path)
    prefix = "" if "transformer.wte.weight" in header else "transformer."

    def get(name: str) -> list[int]:
        key = name.removeprefix(prefix)
        if key not in header:
            raise ConfigError(f"{path} has no {key!r}: it holds neither GPT-2 weights nor a Hugging Face model "
                              "(config.json)")
        return header[key]["shape"]

    vocab, n_embd = get("transformer.wte.weight")
    h = (prefix and "h.") or "transformer.h."
    n_layer = len({k[len(h):].split(".", 1)[0] for k in header if k.startswith(h)})
    if not n_head:
        raise ConfigError(f"{path}: the number of attention heads is not recorded there; pass n_head "
                          "(model.n_head=...)")
    return {"model_type": "gpt2", "vocab_size": vocab, "n_positions": get("transformer.wpe.weight")[0],
            "n_embd": n_embd, "n_head": int(n_head), "n_layer": n_layer, "layer_norm_epsilon": eps}


def _run_n_head(run_dir: Path) -> int | None:
    meta = run_dir / "checkpoint.json"
    meta = json.loads(meta.read_text()) if meta.is_file() else {}
    if isinstance(meta.get("model"), dict) and meta["model"].get("n_head"):  # a checkpoint that describes its model
        return meta["model"]["n_head"]
    run_cfg = run_dir / ".hydra" / "config.yaml"
    if run_cfg.is_file():  # else the run's own Hydra config
        from omegaconf import OmegaConf

        return OmegaConf.load(run_cfg).model.get("n_head")
    return None


def find_model(source: str | Path, n_head: int | None = None, default_n_head: int | None = None) -> ModelSource:
    """The model at ``source``: a Hugging Face directory (or hub id in the cache), a run directory, or a
    GPT-2 ``.safetensors`` file. ``n_head`` overrides what a GPT-2 checkpoint records; ``default_n_head``
    is used when it records none."""
    p = Path(source).expanduser()
    if not p.exists() and not str(source).startswith(("/", ".", "~")) and str(source).count("/") <= 1:
        p = _hub_snapshot(str(source))
    if p.is_dir():
        if is_hf_dir(p / "hf"):  # a run of a Hugging Face family writes its model back as one
            p = p / "hf"
        if is_hf_dir(p):
            config = json.loads((p / "config.json").read_text())
            family_for(config)  # an unsupported architecture is refused here, before any stage starts
            return ModelSource(p, config, p)
        if (p / "checkpoint.safetensors").is_file():  # a GPT-2 run written by train
            heads = n_head or _run_n_head(p) or default_n_head
            return ModelSource(p / "checkpoint.safetensors", gpt2_config(p / "checkpoint.safetensors", heads), p)
        raise ConfigError(f"{source}: neither a Hugging Face model directory (config.json + model.safetensors or "
                          "model.safetensors.index.json) nor a run directory (checkpoint.safetensors)")
    if p.is_file():
        return ModelSource(p, gpt2_config(p, n_head or default_n_head))
    raise ConfigError(f"{source}: no such model directory, run directory or weights file")


def tensor_files(weights: Path) -> dict[str, Path]:
    """``{tensor key: file holding it}`` of a Hugging Face directory (sharded or not) or a single file."""
    weights = Path(weights)
    if weights.is_dir():
        index = weights / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index} has no weight_map: it is not a safetensors index")
            return {key: weights / name for key, name in weight_map.items()}
        weights = weights / SINGLE
    header, _ = read_header(weights)
    return dict.fromkeys(header, weights)


def stage_keys(weights: str | Path, files: dict[str, Path], wanted: list[tuple[str, tuple]]) -> dict[str, str]:
    """``{parameter name: tensor key in the files}`` of a stage's parameters ``wanted`` (``arch.param_shapes``)."""
    keys: dict[str, str] = {}
    for name, _ in wanted:
        # GPT-2's original files name tensors without the "transformer." prefix.
        key = name if name in files else name.removeprefix("transformer.")
        if key not in files:
            hint = " (the model's config.json says tie_word_embeddings=false)" if name == "lm_head.weight" else ""
            raise ConfigError(f"{weights} has no tensor {name!r}{hint}: it was written for another model")
        keys[name] = key
    return keys


def load_stage(weights: str | Path, config: dict, blocks: range, embed: bool, head: bool,
               fmt: StageFormat | None = None):
    """A stage of the model ``config`` describes, its parameters read from ``weights`` (nothing else allocated).

    ``fmt``: the precision, quantization and device its weights take as each is read
    (:mod:`smolcluster.pipeline.quantize`); default fp32 on the CPU.
    """
    fmt = fmt or StageFormat()
    arch = family_for(config)
    with torch.device("meta"):
        stage = arch.stage(embed, head, blocks)
    targets = quantize.prepare(stage, fmt, head=arch.head_name.removesuffix(".weight") if head else None)
    files = tensor_files(Path(weights))
    wanted = arch.param_shapes(embed, head, blocks)
    keys = stage_keys(weights, files, wanted)
    tensors: dict[str, torch.Tensor] = {}
    by_file: dict[Path, dict[str, str]] = {}
    for name, key in keys.items():
        by_file.setdefault(files[key], {})[name] = key
    expected = dict(wanted)

    def convert(name, shape, read_rows):
        if shape != expected[name]:
            raise ConfigError(f"{weights}: tensor {keys[name]!r} has shape {shape}, the model's config.json says "
                              f"{expected[name]}")
        return quantize.convert(name, shape, read_rows, fmt, targets)

    for path, names in by_file.items():
        tensors.update(read_tensors(path, names, convert=convert))
    stage.load_state_dict(tensors, strict=True, assign=True)
    stage.to(fmt.device)  # the buffers built in place (RoPE frequencies); the weights are there already
    stage.compute_dtype, stage.device = fmt.dtype, torch.device(fmt.device)
    return stage.eval().requires_grad_(False)


def eos_ids(source: ModelSource) -> list[int] | None:
    """The end-of-sequence ids: ``generation_config.json``'s eos_token_id (an int or a list), else config.json's."""
    found = None
    gen = source.directory / "generation_config.json" if source.directory is not None else None
    if gen is not None and gen.is_file():
        found = json.loads(gen.read_text()).get("eos_token_id")
    if found is None:
        found = source.config.get("eos_token_id")
    if found is None:
        return None
    return [int(t) for t in (found if isinstance(found, list) else [found])]
