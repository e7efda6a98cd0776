"""LoRA adapters served per request, unmerged, so requests for different adapters (or none) share one batch.

    python -m smolcluster.chat model.pretrained=BASE adapters="{sql:RUN_DIR/adapter,chat:OTHER/adapter}"

An adapter is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``, what
``PeftModel.save_pretrained`` and ``train.lora`` write). Each stage reads, for its own blocks only,
every adapter's ``lora_A`` / ``lora_B`` matrices and wraps each adapted projection in a
:class:`LoRALinear`. A step's rows come from several requests; before the step the stage tells its
:class:`Router` which adapter each request uses, and every wrapped projection computes

    y = base(x);  y[rows of adapter k] += scale_k * (x[rows of adapter k] @ A_k^T) @ B_k^T

as peft's ``LoraLayer`` does (its order of operations, in float32 on any base format), one gather per
adapter present in the step: Punica's and LoRAX's multi-LoRA batching, with a plain gather standing in
for their segmented GPU kernels.

Why the config is read as JSON, not with ``peft.LoraConfig``: importing peft pulls in ``transformers``, which
stages otherwise never import (its start-up time and memory in every stage process). The format is
peft's; the keys read are peft's names, and every option that changes a LoRA layer's output beyond the
formula above is refused by name (:data:`UNSUPPORTED`) rather than served wrong.

Every check runs before a stage starts (:func:`check_adapters`, from the launcher) and again as each
stage loads (:func:`attach`): an adapter that does not fit the served model (a module it adapts is
missing, or its matrices' shapes differ) is refused in one line naming the mismatch and the fix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.errors import ConfigError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # an adapter's name: the API's model id is BASE:NAME
# peft options that change a LoRA layer's output (or what it adapts) beyond base(x) + scale * B(A(x)):
# refused, with the value that is fine.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None,
               "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
               "arrow_config": None, "layer_replication": None, "alpha_pattern": {}, "rank_pattern": {},
               "use_qalora": False, "use_bdlora": None, "kasa_config": None, "velora_config": None,
               "monteclora_config": None}


@dataclass(frozen=True)
class Adapter:
    """One adapter as read from its directory (headers only): which modules it adapts, and its scale."""

    name: str
    path: Path
    scale: float                              # lora_alpha / r (or / sqrt(r): use_rslora)
    modules: dict[str, tuple[str, str]]       # module name (the stage's) -> (A key, B key) in the file
    digest: str                               # sha256 of its config and weights: stages serving a name agree on it


def digest(path: Path) -> str:
    """sha256 of an adapter's config and weights files' bytes: what stages compare, so a name means one adapter
    (names alone would let two nodes serve different directories under one name)."""
    h = hashlib.sha256()
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        with open(path / file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # (hashlib.file_digest needs Python 3.11)
                h.update(chunk)
    return h.hexdigest()


def unknown_adapter(name: str, served) -> str:
    """What a request naming an adapter the pipeline does not serve is told (by the head and by stage 0)."""
    return (f"no adapter {name!r} here: this pipeline serves adapters {', '.join(served) or 'none'} "
            f"(start every stage with adapters={{{name}:DIR}})")


def model_ids(base: str, served) -> list[str]:
    """The model ids a request may name (the API's and the chat UI's): the base model's, then ``BASE:NAME`` for
    each adapter served."""
    return [base, *(f"{base}:{a}" for a in served)]


def adapter_of(model: str, base: str, served) -> str | None:
    """The adapter model id ``model`` names ("": the base model; None: an id not served here)."""
    if model == base:
        return ""
    name = model.removeprefix(f"{base}:")
    return name if name != model and name in served else None


def projections(config: dict) -> dict[str, tuple[int, int]]:
    """``{module name: (in, out)}`` of the served model's blocks' projections (what an adapter may adapt),
    from the whole model built on the meta device (no memory)."""
    from smolcluster.pipeline.architectures import family_for
    from smolcluster.pipeline.architectures.gpt2 import Conv1D

    arch = family_for(config)
    with torch.device("meta"):
        full = arch.stage(False, False, range(arch.n_layer))  # blocks only: the embedding and head are not adapted
    out = {}
    for name, m in full.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, Conv1D):  # GPT-2's: weight (in, out)
            out[name] = tuple(m.weight.shape)
    return out


def lora_config(path: Path, where: str) -> dict:
    """The adapter's ``adapter_config.json``, refused when it is no plain LoRA."""
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{where}: no {CONFIG_FILE} + {WEIGHTS_FILE} there: give a PEFT adapter directory "
                          "(what PeftModel.save_pretrained writes, e.g. a LoRA run's RUN_DIR/adapter)")
    resave = "re-save it with PeftModel.save_pretrained (or train it again with train.lora)"
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {path / CONFIG_FILE} is not valid JSON ({e}): {resave}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: {path / CONFIG_FILE} is not a JSON object: {resave}")
    missing = [k for k in ("r", "lora_alpha") if not isinstance(cfg.get(k), (int, float))]
    if cfg.get("peft_type") == "LORA" and missing:
        raise ConfigError(f"{where}: {path / CONFIG_FILE} has no number {missing[0]!r}: {resave}")
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: a {cfg.get('peft_type')} adapter; serving applies LoRA adapters only")
    for key, fine in UNSUPPORTED.items():
        value = cfg.get(key, fine)
        if value != fine and value not in (None, {}, [], False):
            raise ConfigError(f"{where}: {key}={cfg[key]!r} is not supported by serving (it applies plain LoRA, "
                              "base(x) + scale * B(A(x))): serve the merged model instead (train.lora.merge=true)")
    return cfg


def read_header(file: Path, where: str) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of an adapter's safetensors file, refused in one line when it is no such file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except SafetensorError as e:
        raise ConfigError(f"{where}: {file} is not a readable safetensors file ({e}): re-save the adapter with "
                          "PeftModel.save_pretrained (or copy it again: it may be truncated)") from None


def read_adapter(name: str, path: str | Path, config: dict, shapes: dict[str, tuple[int, int]] | None = None) -> Adapter:
    """Adapter ``name`` at ``path``, checked against the served model (``config``: its config.json dict)."""
    where = f"adapters.{name}={path}"
    if not NAME.match(str(name)):
        raise ConfigError(f"adapters: {name!r} is not an adapter name: use letters, digits, '.', '_' or '-' "
                          "(the API's model id is BASE:NAME)")
    path = Path(path).expanduser()
    cfg = lora_config(path, where)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    base = cfg.get("base_model_name_or_path")
    model_class = (cfg.get("auto_mapping") or {}).get("base_model_class")
    served_class = (config.get("architectures") or [None])[0]
    fix = f"serve it with the model it was trained on ({base})" if base else "serve it with the model it was trained on"
    if model_class and served_class and model_class != served_class:
        raise ConfigError(f"{where} was trained on a {model_class}, the served model is a {served_class}: {fix}")
    shapes = projections(config) if shapes is None else shapes
    header = read_header(path / WEIGHTS_FILE, where)
    modules: dict[str, tuple[str, str]] = {}
    for key in header:
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        if kind == "A.weight":
            modules[module] = (key, key.replace(".lora_A.", ".lora_B."))
    if not modules:
        raise ConfigError(f"{where}: {WEIGHTS_FILE} holds no LoRA matrices")
    for module, (a, b) in modules.items():
        if module not in shapes:
            raise ConfigError(f"{where} does not fit the served {config.get('model_type')} model: it adapts "
                              f"{module!r}, which is not one of its blocks' projections (target_modules "
                              f"{cfg.get('target_modules')}): {fix}")
        n_in, n_out = shapes[module]
        want_a, want_b = (r, n_in), (n_out, r)
        if header[a] != want_a or header.get(b) != want_b:
            raise ConfigError(f"{where} does not fit the served model: {module} maps {n_in} -> {n_out} here, so "
                              f"r={r} needs A {want_a} and B {want_b}; the adapter has A {header[a]} and B "
                              f"{header.get(b)}: {fix}")
    extra = sorted(set(header) - {k for pair in modules.values() for k in pair})
    if extra:  # a trained copy of a whole layer (modules_to_save, an adapted embedding's base), DoRA's magnitudes
        raise ConfigError(f"{where}: tensor {extra[0]!r} is not a LoRA A/B matrix; serving applies plain LoRA "
                          "(serve the merged model instead: train.lora.merge=true)")
    return Adapter(str(name), path, scale, modules, digest(path))


def check_adapters(adapters: dict | None, config: dict) -> dict[str, str]:
    """``{name: directory}`` with every adapter checked against the model before any stage starts."""
    shapes = projections(config) if adapters else {}
    return {name: str(read_adapter(name, path, config, shapes).path.resolve()) for name, path in (adapters or {}).items()}


class Router:
    """Which rows of the current step use which adapter: set by the stage before each forward."""

    def __init__(self, names: list[str], device):
        self.names, self.index, self.device = names, {n: i for i, n in enumerate(names)}, device
        self.digests: dict[str, str] = {}  # name -> its adapter's digest, for the stage's beacon
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (adapter, its rows; None: every row)

    def route(self, adapters: list[int], sizes: list[int]) -> None:
        """``adapters[i]``: the adapter of the request whose ``sizes[i]`` rows come i-th (-1: none)."""
        used = sorted(set(adapters) - {-1})
        if len(used) == 1 and -1 not in adapters:
            self.groups = [(used[0], None)]  # every row: no gather
            return
        starts = [0, *itertools.accumulate(sizes)]
        self.groups = [(k, torch.tensor([r for a, s, n in zip(adapters, starts, sizes) if a == k
                                         for r in range(s, s + n)], device=self.device)) for k in used]


class LoRALinear(nn.Module):
    """A projection (float, int8 or int4) plus every adapter's A/B for it, applied to the rows routed to each."""

    def __init__(self, base: nn.Module, router: Router):
        super().__init__()
        self.base, self.router = base, router
        self.lora: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None] * len(router.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.forward(x)
        for k, rows in self.router.groups:
            lora = self.lora[k]
            if lora is None:  # adapter k leaves this projection alone
                continue
            a, b, scale = lora
            xs = x if rows is None else x.index_select(1, rows)
            # peft's order: lora_B(lora_A(x)) * scaling, in the adapter's float32, added to the base's output
            delta = F.linear(F.linear(xs.to(a.dtype), a), b) * scale
            if rows is None:
                y = (y + delta).to(y.dtype)
            else:
                y.index_copy_(1, rows, (y.index_select(1, rows) + delta).to(y.dtype))
        return y


def attach(stage: nn.Module, config: dict, adapters: dict[str, str], device) -> Router | None:
    """Wrap the stage's adapted projections (its own blocks only) and load their A/B; the stage's router."""
    if not adapters:
        return None
    from safetensors import safe_open

    shapes = projections(config)
    router = Router(list(adapters), device)
    own = dict(stage.named_modules())
    wrapped: dict[str, LoRALinear] = {}
    for k, (name, path) in enumerate(adapters.items()):
        adapter = read_adapter(name, path, config, shapes)
        router.digests[name] = adapter.digest
        with safe_open(str(adapter.path / WEIGHTS_FILE), "pt") as f:
            for module, (a, b) in adapter.modules.items():
                if module not in own:  # another stage's block
                    continue
                if module not in wrapped:
                    parent, _, attr = module.rpartition(".")
                    wrapped[module] = LoRALinear(own[module], router)
                    setattr(stage.get_submodule(parent), attr, wrapped[module])
                wrapped[module].lora[k] = (f.get_tensor(a).to(device, torch.float32),
                                           f.get_tensor(b).to(device, torch.float32), adapter.scale)
    return router


def adapter_numel(stage: nn.Module) -> int:
    """The adapters' parameters a stage holds (for its startup line)."""
    return sum(a.numel() + b.numel() for m in stage.modules() if isinstance(m, LoRALinear)
               for a, b, _ in filter(None, m.lora))
