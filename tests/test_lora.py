"""LoRA fine-tuning (``train.lora``): against a plain PyTorch loop over ``peft.get_peft_model``, the
distributed algorithms against ``local``, and the adapter directory against ``PeftModel.from_pretrained``.

The bases are random-init Llama and Qwen3 directories (``save_pretrained``, with a small BPE tokenizer),
built once for the module."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file

from smolcluster.data.text import embedded_corpus
from smolcluster.errors import ConfigError
from smolcluster.models.lora import DEFAULT_TARGETS
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.trainer import Trainer
from tests.conftest import train
from tests.test_hf_training import pretrained_dir

SEED, STEPS, LR, R, ALPHA = 0, 20, 1e-3, 4, 8.0
FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def overrides(bases: dict, family: str, *extra: str) -> list[str]:
    return ["model=llama-tiny", f"model.pretrained={bases[family]}", "model.block_size=32", "data=text",
            f"data.path={bases['corpus']}",
            f"train.steps={STEPS}", "train.optimizer=adamw", f"train.lr={LR}", "train.schedule=constant",
            "train.eval_samples=16", "train.lora.enabled=true", f"train.lora.r={R}", f"train.lora.alpha={ALPHA}",
            f"seed={SEED}", *extra]


def trainer_for(bases: dict, family: str, *extra: str) -> Trainer:
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=local", "train.batch_size=8", *overrides(bases, family, *extra)]))
    return Trainer(cfg, [8], device="cpu")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """The two base model directories, and ``corpus``: 40 kB of the embedded corpus (encoding it all costs seconds)."""
    out = {family: pretrained_dir(tmp_path_factory.mktemp(family), family) for family in ("llama", "qwen3")}
    out["corpus"] = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    out["corpus"].write_text(embedded_corpus()[:40_000])
    return out


@pytest.fixture(scope="module")
def trained(bases) -> dict:
    """Per family: our ``local`` LoRA run of STEPS steps."""
    out = {}
    for family in ("llama", "qwen3"):
        t = trainer_for(bases, family)
        for _ in range(STEPS):
            t.step_local()
        out[family] = t
    return out


def peft_reference(base_dir, family: str, batches, dtype=torch.float32):
    """The reference: peft's model over the transformers base (in ``dtype``), AdamW on its trainable parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=DEFAULT_TARGETS[family],
                                            task_type="CAUSAL_LM"))
    return peft_train(model, batches)


def peft_train(model, batches):
    """A plain PyTorch loop: AdamW on the model's trainable parameters, one step per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    for x, y in batches:
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_local_lora_equals_a_plain_loop_over_peft_get_peft_model(bases, trained, family):
    ours = trained[family]
    batches = [ours.batch(step) for step in range(STEPS)]
    ref = peft_reference(bases[family], family, batches)
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.model.named_parameters() if p.requires_grad}
    assert our_params.keys() == ref_params.keys() and all("lora_" in n for n in our_params)
    diff = max(float((our_params[n] - ref_params[n]).detach().abs().max()) for n in our_params)
    assert diff < 1e-6, diff
    moved = max(float(p.detach().abs().max()) for n, p in our_params.items() if "lora_B" in n)  # B starts at zero
    assert moved > 1e-3, moved
    # only the adapters are in the flat buffers and the optimizer: the base stays frozen
    n_adapter = sum(p.numel() for p in our_params.values())
    assert ours.flat.numel() == n_adapter < ours.num_params / 10
    opt_params = [p for g in ours.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in opt_params) == n_adapter
    base_w = dict(ours.model.named_parameters())
    ref_w = dict(ref.named_parameters())
    name = next(n for n in base_w if n.endswith("q_proj.base_layer.weight"))
    assert torch.equal(base_w[name], ref_w[name])


def test_a_bf16_base_holds_its_weights_in_bf16_and_trains_float32_adapters_as_peft_does(bases):
    ours = trainer_for(bases, "llama", "train.lora.base_precision=bf16")
    for _ in range(5):
        ours.step_local()
    ref = peft_reference(bases["llama"], "llama", [ours.batch(step) for step in range(5)], dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in ours.model.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16} and list(ours.flat.params) == ["float32"]
    ref_params = dict(ref.named_parameters())
    diff = max(float((p - ref_params[n]).detach().abs().max()) for n, p in ours.model.named_parameters()
               if p.requires_grad)
    assert diff < 1e-6, diff


def test_an_int8_base_trains_as_peft_does_over_its_dequantized_weights(bases, tmp_path):
    """The reference holds each adapted projection's weight as ``q * scale`` in float32: the same numbers the
    int8 rows stand for (ours scales after the matmul, so the two round differently: 1e-5)."""
    from peft.tuners.lora import LoraLayer

    from smolcluster.models.lora import dequantized
    from smolcluster.pipeline.quantize import Int8Linear

    ours = trainer_for(bases, "llama", "train.lora.base_precision=int8")
    for _ in range(5):
        ours.step_local()
    layers = [m for m in ours.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.base_layer, Int8Linear) and m.base_layer.qweight.dtype == torch.int8
                          for m in layers)
    ref = peft_reference(bases["llama"], "llama", [], dtype=torch.float32)
    with torch.no_grad():  # the reference's frozen weights := ours, dequantized
        ref_layers = [m for m in ref.modules() if isinstance(m, LoraLayer)]
        for mine, theirs in zip(layers, ref_layers, strict=True):
            theirs.base_layer.weight.copy_(dequantized(mine.base_layer).weight)
    ref = peft_train(ref, [ours.batch(step) for step in range(5)])
    ref_params = dict(ref.named_parameters())
    diff = max(float((p - ref_params[n]).detach().abs().max()) for n, p in ours.model.named_parameters()
               if p.requires_grad)
    assert diff < 1e-5, diff
    ours.train = dataclasses.replace(ours.train, lora=dataclasses.replace(ours.train.lora, merge=True))  # this run's copy
    ours.save(tmp_path)  # merges the dequantized base
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = ours.data.test_x[:2]
    ours.model.eval()
    with torch.no_grad():
        assert float((merged(x).logits - ours.model(x).logits).abs().max()) < 1e-4


@pytest.mark.parametrize("extra", [("train.lora.base_precision=int8",), ("train.lora.enabled=false",)],
                         ids=["lora-int8", "full"])
def test_activation_checkpointing_gives_the_same_training_with_one_blocks_activations(bases, extra):
    """``train.activation_checkpointing``: the same weights after 3 steps (LoRA over a frozen int8 base, whose
    first block gets an input needing no grad, and a full fine-tune), while the graph keeps far fewer tensors."""
    runs = {}
    for on in (False, True):
        t = trainer_for(bases, "llama", *extra, f"train.activation_checkpointing={str(on).lower()}")
        saved: list[int] = []  # what autograd keeps for the backward, counted over the first forward

        def count(x, saved=saved):
            saved.append(x.numel())
            return x
        with torch.autograd.graph.saved_tensors_hooks(count, lambda x: x):
            t.step_local()
        for _ in range(2):
            t.step_local()
        runs[on] = (t, sum(saved))
    (plain, kept), (ckpt, kept_ckpt) = runs[False], runs[True]
    theirs = dict(ckpt.model.named_parameters())
    diff = max(float((p - theirs[n]).detach().abs().max()) for n, p in plain.model.named_parameters())
    assert diff < 1e-6, diff
    assert kept_ckpt < 0.7 * kept, (kept_ckpt, kept)


def test_activation_checkpointing_is_refused_for_a_model_without_blocks():
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=local", "model.hidden=[8]", "train.activation_checkpointing=true"]))
    with pytest.raises(ConfigError, match="activation_checkpointing=true: model=mlp has no transformer blocks"):
        Trainer(cfg, [8], device="cpu")


def test_top_shows_trainable_parameters_and_bytes_per_step():
    from smolcluster.top import Node, row_of

    node = Node("u", labels={"node": "n", "role": "server"}, values={"trainable_params": 11264, "params": 175424},
                rates={"step": 2.0, "bytes_sent": 90112.0})
    row = row_of(node)
    assert "11,264/175,424 (6.4%)" in row and "44.0 KB" in row  # 90112 B/s at 2 steps/s


def test_adapter_and_merged_directories_load_with_peft_and_transformers(bases, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = trained["qwen3"]
    ours.train = dataclasses.replace(ours.train, lora=dataclasses.replace(ours.train.lora, merge=True))  # this run's copy
    ours.save(tmp_path)
    ckpt = safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt")
    names = [k for k in ckpt.keys() if not k.startswith("optim/")]
    assert names and all(".lora_A." in k or ".lora_B." in k for k in names)  # no base tensor in the checkpoint
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == R
    x = ours.data.test_x[:4]
    ours.model.eval()
    with torch.no_grad():
        mine = ours.model(x).logits
    base = AutoModelForCausalLM.from_pretrained(bases["qwen3"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((loaded(x).logits - mine).abs().max()) < 1e-5
        assert float((merged(x).logits - mine).abs().max()) < 1e-5


def test_a_stopped_and_resumed_lora_run_ends_as_one_run(bases, trained, tmp_path):
    first = trainer_for(bases, "llama", "train.stop_after=10")
    while first.step < first.end_step:
        first.step_local()
    first.save(tmp_path)
    second = trainer_for(bases, "llama")
    second.resume(tmp_path)
    while second.step < STEPS:
        second.step_local()
    full = dict(trained["llama"].model.named_parameters())
    assert max(float((p - full[n]).detach().abs().max()) for n, p in second.model.named_parameters()) == 0.0


@pytest.mark.parametrize("algo", ["syncps", "allreduce"])
def test_distributed_lora_equals_local_and_checkpoints_only_adapters(bases, trained, tmp_path, algo):
    """2 workers of batch 4 against the in-process ``local`` run of batch 8 (allreduce with ZeRO-1)."""
    extra = ["algo.zero=1"] if algo == "allreduce" else []
    dist = train(tmp_path, f"algo={algo}", "cluster.workers=2", "train.batch_size=4", *extra,
                 *overrides(bases, "llama"), *FAST)
    local = trained["llama"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sizes = next(r for r in rows if "trainable_params" in r)  # what top shows
    assert (sizes["trainable_params"], sizes["params"]) == (local.flat.numel(), local.num_params)
    assert dist["steps"] == STEPS and dist["trainable_params"] == local.flat.numel() < local.num_params / 10
    ours = load_file(tmp_path / "checkpoint.safetensors")
    params = {k: v for k, v in ours.items() if not k.startswith("optim/")}
    expected = {n: p.detach() for n, p in local.model.named_parameters() if p.requires_grad}
    assert params.keys() == expected.keys()  # the adapters and nothing else
    diff = max(float((params[n] - expected[n]).abs().max()) for n in params)
    # float32 sums in another order, through AdamW: 1e-5 as for the whole-model AdamW checks (tests/equivalence.py;
    # under 1e-6 on earlier machines, 1.1e-6 on an AVX2 EPYC); a wrong sum or a lost adapter gradient is off by far more
    assert diff < 1e-5, diff
    # the wire carried the adapters' gradients (float32), a tenth of what the whole model's would be
    adapter_bytes = 4 * local.flat.numel()
    if algo == "syncps":  # each of 2 workers sends one gradient per step
        per_grad = dist["bytes_received"] / (2 * STEPS)
        assert adapter_bytes <= per_grad < 1.2 * adapter_bytes, (per_grad, adapter_bytes)
    else:  # a 2-rank ring: a reduce-scatter and an all-gather of half the buffer each
        assert adapter_bytes <= dist["bytes_sent_per_step"] < 1.2 * adapter_bytes, (dist["bytes_sent_per_step"], adapter_bytes)


@pytest.mark.parametrize(("extra", "expect"), [
    (["train.lora.base_precision=int4"], "train.lora.base_precision='int4' is invalid"),
    (["train.lora.r=0"], "train.lora.r=0 is invalid"),
])
def test_a_bad_lora_config_is_refused_naming_the_key(extra, expect):
    from smolcluster.config import validate
    from smolcluster.errors import ConfigError

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["model=llama-tiny", "data=text", "train.lora.enabled=true", *extra])
    with pytest.raises(ConfigError, match=expect):
        validate(train_config(cfg))


def test_lora_on_a_model_without_known_projections_asks_for_target_modules():
    from smolcluster.errors import ConfigError
    from smolcluster.models import lora
    from smolcluster.models.mlp import MLP

    with pytest.raises(ConfigError, match=r"e.g. train.lora.target_modules=\[1,3\] \(its Linear layers: 1, 3, 5\)"):
        lora.apply(MLP(in_features=8, num_classes=2), {"r": 2, "alpha": 4}, seed=0)
    with pytest.raises(ConfigError, match=r"target_modules=\['nope'\].*not found.*its Linear layers: 1, 3, 5"):
        lora.apply(MLP(in_features=8, num_classes=2), {"r": 2, "alpha": 4, "target_modules": ["nope"]}, seed=0)


def test_edp_trains_only_the_adapters_to_completion(bases, tmp_path):
    """EDP applies gradients as they come (no equality with local): it finishes, and the server's wire and
    checkpoint carry the adapters only."""
    s = train(tmp_path, "algo=edp", "cluster.workers=2", "train.batch_size=4", *overrides(bases, "llama"),
              "train.steps=8", *FAST)
    assert s["steps"] == 8 and s["applied"] == 8
    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        assert all(".lora_" in k or k.startswith("optim/") for k in f.keys())
    per_grad = s["bytes_received"] / sum(w["applied"] + w.get("dropped", 0) for w in s["workers"].values())
    assert 4 * s["trainable_params"] <= per_grad < 1.2 * 4 * s["trainable_params"], per_grad
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_base_read_tensor_by_tensor_equals_the_loaded_model_cast(bases, family, precision):
    """``lora.build`` reads a pretrained directory straight into the base precision (int8 rows quantized as read);
    the result is bit for bit ``load_pretrained`` then ``apply``: every tensor, buffers and int8 rows included."""
    from smolcluster.models import lora
    from smolcluster.models.hf import load_pretrained

    cfg = {"r": R, "alpha": ALPHA, "base_precision": precision}
    model_cfg = {"_target_": "smolcluster.models.hf.build_causal_lm", "pretrained": str(bases[family])}
    ours = lora.build(model_cfg, {}, cfg, SEED)
    ref = lora.apply(load_pretrained(str(bases[family])), cfg, SEED)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    assert any(k.endswith(".qweight") for k in mine) == (precision == "int8")
    for k, t in theirs.items():
        assert mine[k].dtype == t.dtype and torch.equal(mine[k], t), k
    for k, t in ref.named_buffers():  # RoPE's frequencies (no file holds them)
        assert torch.equal(dict(ours.named_buffers())[k], t), k
    assert ours.peft_config["default"].to_dict() == ref.peft_config["default"].to_dict()
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x).logits, ref.eval()(x).logits)


RSS_PROBE = """
import json, sys
from smolcluster.models import lora
import peft, transformers  # imported before the baseline: only the load is measured

def status_mb(key):  # VmHWM, not ru_maxrss: that one keeps the parent's size from before the fork's exec
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

before = status_mb("VmRSS")
model_cfg = {"_target_": "smolcluster.models.hf.build_causal_lm", "pretrained": sys.argv[1]}
lora.build(model_cfg, {}, {"r": 4, "alpha": 8, "base_precision": sys.argv[2]}, 0)
print(json.dumps({"grew_mb": status_mb("VmHWM") - before}))
"""


def test_an_int8_base_loads_in_a_fraction_of_the_float32_models_memory(tmp_path):
    """A fresh process's peak RSS growth while it builds the LoRA model: with an int8 base it holds the integer
    rows, never the float32 projections (34M parameters: 134 MB in float32, 34 MB in int8)."""
    import json
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from smolcluster.launch.threads import stage_env

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                 num_attention_heads=8)).save_pretrained(tmp_path)
    grew = {}
    for precision in ("fp32", "int8"):
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path), precision], capture_output=True,
                             text=True, env=stage_env(1, {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}),
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        grew[precision] = json.loads(out.stdout.strip().splitlines()[-1])["grew_mb"]
    assert grew["fp32"] > 100, grew  # the float32 projections alone are 134 MB
    assert grew["int8"] < 0.4 * grew["fp32"], grew
