"""LoRA fine-tuning (``train.lora.enabled=true``): peft's LoRA layers on a frozen base.

The base model (``model.pretrained=DIR``, or a named config's seeded init) is built as usual, cast
to ``train.lora.base_precision`` and frozen; :func:`apply` wraps it with ``peft.get_peft_model``,
so the adapters are peft's own layers and its config format (an int8 base: each adapted
projection's base layer then becomes the pipeline's ``Int8Linear``). Only the adapters require
gradients, and everything downstream keys on that: :class:`smolcluster.flat.FlatParams` holds
only trainable parameters, so the optimizer, every wire message (``flat.grads``/``flat.params``)
and every checkpoint carry only the adapters.

A checkpoint also writes ``RUN_DIR/adapter/`` with ``PeftModel.save_pretrained`` (what
``PeftModel.from_pretrained(base, dir)`` loads), and with ``merge=true`` ``RUN_DIR/hf/``, the base
with the adapters merged in, as a Hugging Face directory.

Under ``algo=mp`` each pipeline stage wraps its own blocks the same way (:func:`wrap_stage`) and checkpoints
its adapters as a shard; merging the shards writes ``adapter/`` through :func:`save_whole_adapter`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from smolcluster.errors import ConfigError
from smolcluster.models.hf import FAMILIES, check_vocab, read_config, staged_dir

# What a base may be held in; adapters are always float32 (peft's autocast_adapter_dtype). int8: the adapted
# projections as int8 rows + scales (the pipeline's Int8Linear, dequantized on the fly), the rest float32.
BASE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
# The attention and MLP projections of each family (their module names in transformers).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def lora_config(lora: dict, model: nn.Module):
    """The ``peft.LoraConfig`` for ``train.lora``; target modules default to the family's projections."""
    from peft import LoraConfig

    family = getattr(getattr(model, "config", None), "model_type", None)
    targets = lora.get("target_modules") or DEFAULT_TARGETS.get(family)
    if not targets:
        raise ConfigError(f"train.lora: no default target modules for model type {family!r}; name them, e.g. "
                          f"train.lora.target_modules=[{','.join(linear_names(model)[:2])}] (its Linear layers: "
                          f"{', '.join(linear_names(model)) or 'none'})")
    return LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora.get("dropout") or 0),
                      target_modules=list(targets), bias="none", task_type="CAUSAL_LM" if family else None,
                      fan_in_fan_out=family == "gpt2")  # GPT-2's projections are Conv1D (in x out)


def apply(model: nn.Module, lora: dict, seed: int, quantized: dict | None = None) -> nn.Module:
    """``model`` frozen in ``lora.base_precision`` with peft's LoRA adapters (float32, seeded by ``seed``).
    ``quantized``: int8 bases already read (:func:`load_base`), by module name."""
    from peft import get_peft_model

    precision = lora.get("base_precision", "fp32")
    if precision not in BASE_PRECISIONS:
        raise ConfigError(f"train.lora.base_precision={precision!r}: choose {' | '.join(BASE_PRECISIONS)}")
    config = lora_config(lora, model)
    dtype = BASE_PRECISIONS[precision]
    with torch.no_grad():  # the weights only: model.to() would also round buffers (RoPE's inv_freq stays float32,
        for p in model.parameters():  # as from_pretrained(dtype=...) leaves it)
            p.data = p.data.to(dtype)
    # Seeded here, not by whatever the base's construction drew: the adapters' init is the same
    # whether the base was loaded or built, on every process and for the peft reference.
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
        if precision == "int8":
            quantize_bases(peft_model, quantized)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise ConfigError(f"train.lora.target_modules={sorted(config.target_modules)}: {e} (its Linear layers: "
                          f"{', '.join(linear_names(model)) or 'none'})") from None
    return peft_model


def build(model_cfg, data_info: dict, lora: dict, seed: int) -> nn.Module:
    """The peft model ``train.lora`` trains. A pretrained Llama/Mistral/Qwen directory is read tensor by tensor
    into the base precision (:func:`load_base`), so a process never holds the float32 model; any other model
    is built as usual (``build_model``) and then cast."""
    from smolcluster.models import build_model

    pretrained = model_cfg.get("pretrained")
    if (pretrained and str(model_cfg.get("_target_", "")).endswith("hf.build_causal_lm")
            and Path(pretrained).expanduser().is_dir() and read_config(pretrained)["model_type"] in FAMILIES):
        base, quantized = load_base(pretrained, lora, data_info.get("vocab_size"))
        return apply(base, lora, seed, quantized)
    return apply(build_model(model_cfg, data_info), lora, seed)


def load_base(pretrained: str, lora: dict, vocab_size: int | None = None) -> tuple[nn.Module, dict]:
    """The model of a Hugging Face directory, built on the meta device and each tensor then read from its
    safetensors file into ``lora.base_precision`` (the pipeline's reader and converter: a large tensor a chunk of
    rows at a time). With int8, every projection ``train.lora`` adapts is quantized as it is read; those come
    back as ``{module name: (qweight, scales)}`` (``int8_rows`` of the float32 weight, row by row: the same
    integers as quantizing the loaded model), their Linear holding a zero-byte placeholder weight until
    :func:`quantize_bases` swaps it out. The result equals ``load_pretrained`` then :func:`apply`'s cast."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from smolcluster.pipeline import quantize
    from smolcluster.pipeline.weights import read_tensors, tensor_files

    precision = lora.get("base_precision", "fp32")
    if precision not in BASE_PRECISIONS:
        raise ConfigError(f"train.lora.base_precision={precision!r}: choose {' | '.join(BASE_PRECISIONS)}")
    d = Path(pretrained).expanduser()
    config = AutoConfig.from_pretrained(d, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.name_or_path = config._name_or_path = str(d)  # as from_pretrained records it (peft's adapter config)
    targets = {}
    if precision == "int8":
        lcfg = lora_config(lora, model)
        targets = {f"{n}.weight": quantize._Target("int8", False) for n, m in model.named_modules()
                   if type(m) is nn.Linear and check_target_module_exists(lcfg, n)}
    fmt = quantize.StageFormat(precision="bf16" if precision == "bf16" else "fp32")
    files, wanted = tensor_files(d), {n for n, _ in model.named_parameters()}
    by_file: dict[Path, dict[str, str]] = {}
    for key, path in files.items():
        if key not in wanted:
            raise ConfigError(f"model.pretrained={pretrained}: tensor {key!r} is not in a {config.model_type} "
                              "of its config.json: the directory mixes two models")
        by_file.setdefault(path, {})[key] = key
    state: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        state.update(read_tensors(path, keys, convert=lambda n, shape, rows: quantize.convert(n, shape, rows, fmt,
                                                                                           targets)))
    quantized = {}
    for name in (t.removesuffix(".weight") for t in targets):
        module = model.get_submodule(name)
        quantized[name] = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        # peft reads a base layer's shape, device and dtype, never its values: one float stands for them all
        module.weight = nn.Parameter(torch.zeros(()).expand(module.out_features, module.in_features),
                                     requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied head is stored once (the embedding): point it there again
    _build_buffers(model)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ConfigError(f"model.pretrained={pretrained}: no tensor {left[0]!r} in its safetensors files")
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d, local_files_only=True)
    check_vocab(pretrained, model, vocab_size)
    return model, quantized


def _build_buffers(model: nn.Module) -> None:
    """The buffers no file holds (RoPE's frequencies), left on the meta device by a meta build: each module
    holding one is built again, on the CPU, from the model's config (what ``from_config`` did)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=model.config))


def wrap_stage(stage: nn.Module, whole: nn.Module, lora: dict, where: str = "this stage") -> nn.Module:
    """A pipeline stage (built on the meta device) wrapped as :func:`apply` wrapped ``whole``: peft's LoRA layers
    on the same target modules, int8 bases where ``whole``'s are; the caller then assigns it ``whole``'s tensors.

    ``get_peft_model`` (task_type None: a stage's forward is its own, not a causal LM's) rather than
    ``inject_adapter_in_model``: its ``base_model.model.`` prefix makes the stage's parameter names exactly the
    whole peft model's, so the stage takes its adapters (seeded over the whole model, as ``local``'s) from
    ``whole`` by name and its checkpoint shards merge into the very checkpoint ``algo=local`` writes.
    """
    from peft import get_peft_model

    config = copy.deepcopy(whole.peft_config["default"])
    config.task_type, config.base_model_name_or_path = None, None  # the stage is no transformers model
    try:
        stage = get_peft_model(stage, config)
    except ValueError as e:
        if "Conv1D" in str(e):  # "Target module Conv1D() is not supported": the pipeline's own GPT-2 layer
            raise ConfigError(f"train.lora with algo=mp: {e} (the pipeline's GPT-2 stages hold their own Conv1D): "
                              "use algo=local, syncps, edp or allreduce for GPT-2") from None
        # e.g. "Target modules {...} not found in the base model": the whole model has them, this stage's blocks not
        raise ConfigError(f"train.lora.target_modules={sorted(config.target_modules)}: {where} holds none of them "
                          f"({e}); under algo=mp every stage adapts its own blocks: name projections every block "
                          f"has (its Linear layers: {', '.join(linear_names(stage)) or 'none'})") from None
    if lora.get("base_precision") == "int8":
        quantize_bases(stage)
    return stage


def save_whole_adapter(hf_config, lora: dict, adapters: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """``out_dir`` as :func:`save_adapter` writes it for the whole model, from its adapter tensors by name (a
    pipeline's merged shards): peft's model over the base built on the meta device (no base weights are read),
    the adapters assigned, ``save_pretrained``. The same adapter_config.json and tensors as ``algo=local``'s."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config)
        model = get_peft_model(base, lora_config(lora, base))
    keys = model.load_state_dict(adapters, assign=True, strict=False)
    # An adapter the shards lack would stay a meta tensor ("Cannot copy out of meta tensor" as it is saved).
    missing = [k for k in keys.missing_keys if ".lora_" in k]
    if keys.unexpected_keys or missing:
        problem = (f"the shards' adapter {keys.unexpected_keys[0]} is not in" if keys.unexpected_keys else
                   f"the shards lack adapter {missing[0]} of")
        raise ConfigError(f"{out_dir}: {problem} a {hf_config.model_type} with train.lora's target modules: "
                          "merge shards of one run")
    return save_adapter(model, out_dir)


def quantize_bases(model: nn.Module, quantized: dict | None = None) -> None:
    """Every adapted projection's frozen weight as int8 rows + scales (``pipeline.quantize.Int8Linear``): peft's
    LoRA layer calls its ``base_layer`` as a function, so the integer module takes the Linear's place there.
    ``quantized``: ``{module name in the base: (qweight, scales)}`` already read (:func:`load_base`)."""
    from peft.tuners.lora import LoraLayer

    from smolcluster.pipeline.quantize import KERNEL_DTYPE, Int8Linear, int8_rows

    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(module, LoraLayer):
            continue
        if type(base) is not nn.Linear:
            raise ConfigError(f"train.lora.base_precision=int8 quantizes nn.Linear projections, not "
                              f"{type(base).__name__} (GPT-2's Conv1D): use fp32 or bf16")
        q = Int8Linear(base.in_features, base.out_features, bias=base.bias is not None)
        read = (quantized or {}).get(name.removeprefix("base_model.model."))
        q.qweight, q.scales = read if read is not None else int8_rows(base.weight.detach(), torch.float32)
        q.kernel_scales = q.scales.to(KERNEL_DTYPE)  # as Int8Linear's state-dict load sets it (its packed kernel)
        if base.bias is not None:
            q.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        module.base_layer = q


def dequantized(module: nn.Module) -> nn.Linear:
    """An Int8Linear back as a float32 nn.Linear (``q * scale``), for merging."""
    linear = nn.Linear(module.n_in, module.n_out, bias=module.bias is not None)
    linear.weight.data = module.qweight.float() * module.scales[:, None]
    if module.bias is not None:
        linear.bias.data = module.bias.detach().clone()
    return linear


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of ``model``'s Linear layers: what target_modules may name."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """``out_dir`` as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), each file
    landing by an atomic rename so a crash mid-write leaves it whole."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
    return out_dir


def merged(model: nn.Module) -> nn.Module:
    """A copy of the base with the adapters merged into its weights (``merge_and_unload``); ``model`` is untouched."""
    from smolcluster.pipeline.quantize import Int8Linear

    with torch.no_grad():
        model = copy.deepcopy(model)
        for module in model.modules():  # an int8 base merges as its dequantized weights
            if isinstance(getattr(module, "base_layer", None), Int8Linear):
                module.base_layer = dequantized(module.base_layer)
        return model.merge_and_unload()
