"""Checkpoint shards: each training stage writes its own; one command merges them into a whole checkpoint.

A shard ``stage-<rank>-of-<n>.safetensors`` holds the stage's parameters under the
full model's names and its optimizer state per parameter (``optim/<name>/<key>``);
``stage-<rank>-of-<n>.json`` holds the step, the parameter order and optimizer settings. Only trainable
parameters are saved, as :func:`smolcluster.checkpoint.save` does: a LoRA stage's shard holds its adapters;
merging writes ``adapter/`` from them (and, with ``train.lora.merge``, ``hf/`` from the stages' merged parts
``stage-<rank>-of-<n>.hf.safetensors``).

The merged ``checkpoint.safetensors`` has exactly the layout ``algo=local`` writes
(parameters by name, optimizer state as one flat buffer ``optim/0/<key>`` in the
model's parameter order), so it loads with :func:`smolcluster.checkpoint.load`,
resumes a ``local`` run, and resumes ``mp`` with any number of stages::

    python -m smolcluster.pipeline.merge RUN_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smolcluster import checkpoint
from smolcluster.errors import ConfigError
from smolcluster.launch.cli import command
from smolcluster.pipeline.weights import read_header, read_tensors

_SHARD = re.compile(r"stage-(\d+)-of-(\d+)\.safetensors$")


def shard_paths(run_dir: Path, rank: int, n: int) -> tuple[Path, Path]:
    base = Path(run_dir) / f"stage-{rank}-of-{n}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def flat_offsets(named_sizes: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    out, offset = {}, 0
    for name, n in named_sizes:
        out[name] = (offset, offset + n)
        offset += n
    return out


def save_shard(run_dir: str | Path, rank: int, n: int, stage: torch.nn.Module, optimizer, step: int,
               extra: dict | None = None) -> Path:
    """Write this stage's parameters and optimizer state (one flat buffer, see FlatParams)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    named = [(name, p) for name, p in stage.named_parameters() if p.requires_grad]
    tensors = {name: p.detach().cpu().contiguous() for name, p in named}
    offsets = flat_offsets([(name, p.numel()) for name, p in named])
    total = sum(p.numel() for _, p in named)
    meta: dict = {"step": step, "rank": rank, "n_stages": n, "names": [name for name, _ in named], **(extra or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        if len(state["param_groups"]) != 1 or len(state["param_groups"][0]["params"]) != 1:
            raise ConfigError("a pipeline stage's optimizer must step one flat buffer (FlatParams)")
        for key, value in state["state"].get(0, {}).items():
            if torch.is_tensor(value) and value.numel() == total:
                flat = value.detach().cpu().reshape(-1)
                for name, (a, b) in offsets.items():
                    tensors[f"optim/{name}/{key}"] = flat[a:b].contiguous()
            elif torch.is_tensor(value):
                tensors[f"optim/-/{key}"] = value.detach().cpu().contiguous()
            else:
                meta.setdefault("optim_scalars", {})[key] = value
        meta["optim_param_groups"] = state["param_groups"]
    file, meta_file = shard_paths(run_dir, rank, n)
    _atomic(file, lambda tmp: save_file(tensors, str(tmp), metadata={"step": str(step)}))
    _atomic(meta_file, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return file


def hf_part_path(run_dir: Path, rank: int, n: int) -> Path:
    return Path(run_dir) / f"stage-{rank}-of-{n}.hf.safetensors"


def save_hf_part(run_dir: Path, rank: int, n: int, tensors: dict[str, torch.Tensor], step: int) -> Path:
    """A LoRA stage's part of the merged Hugging Face model (its base with the adapters merged in), by name;
    its step is kept so the merge takes only parts of the checkpoint's step."""
    file = hf_part_path(run_dir, rank, n)
    state = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    _atomic(file, lambda tmp: save_file(state, str(tmp), metadata={"step": str(step)}))
    return file


def find_shards(run_dir: str | Path) -> dict[int, Path]:
    """``{rank: shard file}`` of the most recent complete set of shards in ``run_dir`` (empty if none)."""
    found: dict[int, dict[int, Path]] = {}
    for p in Path(run_dir).glob("stage-*-of-*.safetensors"):
        m = _SHARD.search(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    complete = {n: ranks for n, ranks in found.items() if set(ranks) == set(range(n))}
    if not complete:
        return {}
    newest = max(complete, key=lambda n: max(p.stat().st_mtime for p in complete[n].values()))
    return complete[newest]


def fingerprint_of(named: list[tuple[str, tuple, str]]) -> str:
    """The same hash as :func:`smolcluster.models.fingerprint`, from (name, shape, dtype) triples."""
    h = hashlib.sha256()
    for name, shape, dtype in named:
        h.update(f"{name}:{tuple(shape)}:{dtype};".encode())
    return h.hexdigest()[:16]


def merge(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge the stage shards of ``run_dir`` into ``checkpoint.safetensors`` (+ ``checkpoint.json``)."""
    run_dir = Path(run_dir)
    shards = find_shards(run_dir)
    if not shards:
        raise ConfigError(f"{run_dir}: no complete set of stage-<rank>-of-<n>.safetensors shards; copy every "
                          "stage's shard into one directory first")
    metas = [json.loads(shard_paths(run_dir, r, len(shards))[1].read_text()) for r in range(len(shards))]
    steps = {m["step"] for m in metas}
    if len(steps) != 1:
        raise ConfigError(f"{run_dir}: the shards are from different steps {sorted(steps)}; rerun or resume "
                          "so every stage writes the same step")
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    scalar_state: dict[str, torch.Tensor] = {}
    order: list[str] = []
    for rank in range(len(shards)):
        header, _ = read_header(shards[rank])
        tensors = read_tensors(shards[rank], {k: k for k in header})
        for name in metas[rank]["names"]:
            if name in params:
                # The tied embedding: the first and the last stage each hold it; training kept them equal.
                diff = (params[name] - tensors[name]).abs().max().item()
                if diff > 0:
                    logger.warning(f"merge: the copies of {name} differ by up to {diff:.3g}; keeping stage 0's")
                continue
            params[name] = tensors[name]
            order.append(name)
            for key in tensors:
                if key.startswith(f"optim/{name}/"):
                    state.setdefault(key.rsplit("/", 1)[1], {})[name] = tensors[key]
        for key in tensors:
            if key.startswith("optim/-/"):
                scalar_state[key.rsplit("/", 1)[1]] = tensors[key]
    out = dict(params)
    for key, per_name in state.items():
        out[f"optim/0/{key}"] = torch.cat([per_name[name].reshape(-1) for name in order])
    for key, value in scalar_state.items():
        out[f"optim/0/{key}"] = value
    first = metas[0]
    # a LoRA run's checkpoint holds the adapters only: its fingerprint is the whole model's, as the stages hashed it
    fingerprint = first["fingerprint"] if first.get("lora") else fingerprint_of(
        [(n, params[n].shape, params[n].dtype) for n in order])
    meta = {"step": first["step"], "algo": "mp", "merged_from": [p.name for _, p in sorted(shards.items())],
            "fingerprint": fingerprint}
    if "run" in metas[-1]:  # the run's counters (the last stage's, which wrote the run's files), each stage's traffic
        meta["run"] = {**metas[-1]["run"], "stages": [m.get("run", {}) for m in metas]}
    if "optim_param_groups" in first:
        meta["optim_param_groups"] = first["optim_param_groups"]
        if first.get("optim_scalars"):
            meta["optim_scalars"] = {"0": first["optim_scalars"]}
    dest = Path(out_dir) if out_dir else run_dir
    dest.mkdir(parents=True, exist_ok=True)
    _atomic(dest / checkpoint.TENSORS,
            lambda tmp: save_file(out, str(tmp), metadata={"step": str(meta["step"])}))
    _atomic(dest / checkpoint.META, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    logger.info(f"merged {len(shards)} shards (step {meta['step']}) into {dest / checkpoint.TENSORS}")
    if first.get("hf_config"):  # a transformers model: the merged run as a Hugging Face directory too
        write_hf(run_dir, dest, first, params, len(shards))
    return dest / checkpoint.TENSORS


def write_hf(run_dir: Path, dest: Path, meta: dict, params: dict[str, torch.Tensor], n: int) -> None:
    """``dest/hf/`` from the merged parameters; a LoRA run's ``dest/adapter/`` from its merged adapters, and
    with ``train.lora.merge`` its ``hf/`` from the stages' merged parts."""
    from transformers import AutoConfig

    from smolcluster.models.hf import save_hf_dir

    hf = dict(meta["hf_config"])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    tok = meta.get("tokenizer")
    if meta.get("lora"):
        from smolcluster.models.lora import save_whole_adapter

        save_whole_adapter(config, meta["lora"], params, dest / "adapter")
        if not meta["lora"].get("merge"):
            return
        params = {}
        for rank in range(n):  # a tied embedding is in two parts: the same frozen tensor
            part = hf_part_path(run_dir, rank, n)
            if not part.is_file():
                raise ConfigError(f"{part} is missing: train.lora.merge=true builds hf/ from every stage's merged "
                                  "part; copy each stage's stage-<rank>-of-<n>.hf.safetensors beside its shard")
            with safe_open(str(part), "pt") as f:
                part_step = (f.metadata() or {}).get("step")
            if part_step != str(meta["step"]):
                raise ConfigError(f"{part} is from step {part_step}, the shards from step {meta['step']}: rerun or "
                                  "resume so every stage writes both at the same step")
            params.update(load_file(part))
    save_hf_dir(params, config, dest / "hf", tok if tok and Path(tok).is_file() else None)


def resolve_resume(path: str | Path) -> Path:
    """The whole-model checkpoint to resume from: merge the run's shards first when they are newer."""
    p = Path(path).expanduser()
    if p.is_dir():
        shards = find_shards(p)
        merged = p / checkpoint.TENSORS
        if shards and (not merged.is_file() or _shard_step(p, shards) > checkpoint.load_meta(merged)["step"]):
            return merge(p)
    return checkpoint.resolve(p)


def _shard_step(run_dir: Path, shards: dict[int, Path]) -> int:
    return json.loads(shard_paths(run_dir, 0, len(shards))[1].read_text())["step"]


def stage_optimizer_state(path: Path, full_layout: list[tuple[str, int]], stage_names: list[str],
                          meta: dict) -> dict | None:
    """An optimizer ``state_dict`` for a stage's flat buffer, sliced from a whole-model checkpoint."""
    if "optim_param_groups" not in meta:
        return None
    groups = meta["optim_param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != 1:
        raise ConfigError(f"{path}: its optimizer state spans {len(groups)} groups; a pipeline stage needs "
                          "one flat buffer (a checkpoint written by algo=local or algo=mp)")
    header, _ = read_header(path)
    keys = {k: k for k in header if k.startswith("optim/0/")}
    tensors = read_tensors(path, keys)
    offsets = flat_offsets(full_layout)
    total = sum(n for _, n in full_layout)
    st: dict = {}
    for key, value in tensors.items():
        name = key.rsplit("/", 1)[1]
        if value.numel() == total and value.dim() == 1:
            st[name] = torch.cat([value[slice(*offsets[n])] for n in stage_names])
        else:
            st[name] = value
    st.update((meta.get("optim_scalars") or {}).get("0", {}))
    return {"state": {0: st} if st else {}, "param_groups": groups}


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m smolcluster.pipeline.merge RUN_DIR\n\nMerge stage-<rank>-of-<n> shards "
              "into RUN_DIR/checkpoint.safetensors", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    print(merge(argv[0]))
    return 0
