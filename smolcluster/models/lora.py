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
from smolcluster.models.hf import staged_dir

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


def enabled(train_cfg) -> bool:
    """``train.lora.enabled`` (a config without the key: no LoRA)."""
    return bool((train_cfg.get("lora") or {}).get("enabled"))


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


def apply(model: nn.Module, lora: dict, seed: int) -> nn.Module:
    """``model`` frozen in ``lora.base_precision`` with peft's LoRA adapters (float32, seeded by ``seed``)."""
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
            quantize_bases(peft_model)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise ConfigError(f"train.lora.target_modules={sorted(config.target_modules)}: {e} (its Linear layers: "
                          f"{', '.join(linear_names(model)) or 'none'})") from None
    return peft_model


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


def quantize_bases(model: nn.Module) -> None:
    """Every adapted projection's frozen weight as int8 rows + scales (``pipeline.quantize.Int8Linear``): peft's
    LoRA layer calls its ``base_layer`` as a function, so the integer module takes the Linear's place there."""
    from peft.tuners.lora import LoraLayer

    from smolcluster.pipeline.quantize import Int8Linear, int8_rows

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(module, LoraLayer):
            continue
        if type(base) is not nn.Linear:
            raise ConfigError(f"train.lora.base_precision=int8 quantizes nn.Linear projections, not "
                              f"{type(base).__name__} (GPT-2's Conv1D): use fp32 or bf16")
        q = Int8Linear(base.in_features, base.out_features, bias=base.bias is not None)
        q.qweight, q.scales = int8_rows(base.weight.detach(), torch.float32)
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
