"""LoRA under ``algo=mp``: two pipeline stages, each training peft's adapters on its own blocks, against
``algo=local`` with LoRA, and the adapter directory their merged shards write against ``PeftModel``.

One run for the module: a random-init Qwen3 directory (test_lora's), 2 stages stopped half way and resumed
into the same directory, against a ``local`` run in this process. Both compute on one thread (test_mp.py
says why)."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file

from smolcluster.data.text import embedded_corpus
from smolcluster.errors import ConfigError
from smolcluster.models import lora
from smolcluster.models.gpt2 import build_gpt2
from smolcluster.models.hf import build_causal_lm
from smolcluster.paths import CONFIG_DIR
from smolcluster.pipeline.gpipe import split_for_training
from tests.conftest import train
from tests.test_hf_training import pretrained_dir
from tests.test_lora import FAST, STEPS, overrides, trainer_for

FAMILY = "qwen3"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": None, "base_precision": "fp32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """``mp``: the pipeline's run dir (stopped at STEPS/2, resumed to STEPS); ``local``: the reference Trainer
    after STEPS steps and ``losses``, its loss at each step; ``base``: the base model's directory."""
    d = tmp_path_factory.mktemp("bases")
    bases = {FAMILY: pretrained_dir(d / FAMILY, FAMILY), "corpus": d / "corpus.txt"}
    bases["corpus"].write_text(embedded_corpus()[:40_000])
    mp = tmp_path_factory.mktemp("mp")
    common = ["algo=mp", "algo.stages=2", "train.batch_size=8", "train.log_every=1", "train.lora.merge=true",
              *overrides(bases, FAMILY), *FAST]
    first = train(mp, *common, f"train.stop_after={STEPS // 2}", env=ONE_THREAD)
    summary = train(mp, *common, f"resume={mp}", env=ONE_THREAD)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = trainer_for(bases, FAMILY)
        losses = [float(local.step_local()[0]) for _ in range(STEPS)]
    finally:
        torch.set_num_threads(threads)
    return {"mp": mp, "first": first, "summary": summary, "local": local, "losses": losses, "base": bases[FAMILY]}


def test_two_stage_lora_equals_local_step_by_step_and_resumes_as_one_run(runs):
    mp, local, s = runs["mp"], runs["local"], runs["summary"]
    assert runs["first"]["steps"] == STEPS // 2 and s["steps"] == STEPS and s["resumed_from"].startswith(str(mp))
    rows = [json.loads(line) for line in (mp / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # each step once, across the resume
    diff = max(abs(r["loss"] - want) for r, want in zip(logged, runs["losses"]))
    assert diff < 1e-6, diff
    # the merged checkpoint is local's: the adapters under the peft model's names, and their AdamW state
    ours = load_file(mp / "checkpoint.safetensors")
    expected = {n: p.detach() for n, p in local.model.named_parameters() if p.requires_grad}
    assert {k for k in ours if not k.startswith("optim/")} == expected.keys()
    diff = max(float((ours[n] - expected[n]).abs().max()) for n in expected)
    assert diff < 1e-6, diff
    assert max(float(expected[n].abs().max()) for n in expected if "lora_B" in n) > 1e-3  # B moved off zero
    state = local.optimizer.state[local.flat.params["float32"]]
    assert float((ours["optim/0/exp_avg_sq"] - state["exp_avg_sq"]).abs().max()) < 1e-9


def test_each_stage_checkpoints_and_trains_only_its_adapters(runs):
    mp, local = runs["mp"], runs["local"]
    held = 0
    for rank in range(2):
        with safe_open(str(mp / f"stage-{rank}-of-2.safetensors"), framework="pt") as f:
            names = [k for k in f.keys() if not k.startswith("optim/")]
            assert names and all(".lora_A." in k or ".lora_B." in k for k in names)  # no base tensor
            held += sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in names)
    assert held == local.flat.numel() < local.num_params / 10
    assert runs["summary"]["params"] == local.num_params


def test_the_merged_adapter_is_locals_and_loads_with_peft(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    mp, local = runs["mp"], runs["local"]
    local.save(tmp_path)  # what algo=local writes: adapter/ alike, file for file
    configs = [json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (mp, tmp_path)]
    for c in configs:  # peft writes a set: its order is the process's string hashing
        c["target_modules"] = sorted(c["target_modules"])
    assert configs[0] == configs[1]
    theirs, want = load_file(mp / "adapter" / "adapter_model.safetensors"), load_file(
        tmp_path / "adapter" / "adapter_model.safetensors")
    assert theirs.keys() == want.keys() and max(float((theirs[k] - want[k]).abs().max()) for k in want) < 1e-6
    x = local.data.test_x[:4]
    local.model.eval()
    base = AutoModelForCausalLM.from_pretrained(runs["base"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, mp / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(mp / "hf", dtype=torch.float32).eval()  # train.lora.merge=true
    with torch.no_grad():
        mine = local.model(x).logits
        assert float((loaded(x).logits - mine).abs().max()) < 1e-5
        assert float((merged(x).logits - mine).abs().max()) < 1e-5


def test_a_merged_part_from_another_step_is_refused(runs, tmp_path):
    """Each stage's merged part (merge=true) carries its step; hf/ is built only from the checkpoint's step."""
    import shutil

    from safetensors.torch import save_file

    from smolcluster.pipeline.shards import merge

    run = shutil.copytree(runs["mp"], tmp_path / "run", ignore=shutil.ignore_patterns("hf", "adapter"))
    part = run / "stage-1-of-2.hf.safetensors"
    with safe_open(str(part), framework="pt") as f:
        assert f.metadata() == {"step": str(STEPS)}
    save_file(load_file(part), str(part), metadata={"step": str(STEPS // 2)})  # a part left from an earlier save
    with pytest.raises(ConfigError, match=rf"^{part} is from step {STEPS // 2}, the shards from step {STEPS}: rerun"):
        merge(run)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_stages_hold_the_base_in_its_precision_and_compute_the_whole_models_logits(precision):
    """The two stages of a peft model over a bf16 or int8 base (adapters moved off zero, the head tied: the last
    stage holds a frozen copy of the embedding) chain to its logits."""
    from smolcluster.pipeline.quantize import Int8Linear

    torch.manual_seed(0)
    whole = lora.apply(build_causal_lm("llama", vocab_size=64, n_layer=2, n_embd=32, n_head=2, tie_embeddings=True),
                       {**LORA, "base_precision": precision}, seed=0)
    with torch.no_grad():
        for name, p in whole.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    stages = [split_for_training(whole, 2, [1.0, 1.0], rank, {**LORA, "base_precision": precision})[1]
              for rank in range(2)]
    for stage in stages:
        assert {p.dtype for p in stage.parameters() if p.requires_grad} == {torch.float32}
        frozen = {n: p.dtype for n, p in stage.named_parameters() if not p.requires_grad}
        if precision == "bf16":
            assert set(frozen.values()) == {torch.bfloat16}
        else:
            layers = [m.base_layer for m in stage.modules() if hasattr(m, "base_layer")]
            assert layers and all(isinstance(q, Int8Linear) and q.qweight.dtype == torch.int8 for q in layers)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        diff = float((stages[1](stages[0](x)) - whole(x).logits).abs().max())
    assert diff < 1e-6, diff  # the stages compute transformers' ops in the base's precision, op for op


def gpt2_config_dir(tmp_path):
    """A model directory whose config.json says GPT-2 (all validation reads of it)."""
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return tmp_path / "gpt2"


def test_what_a_pipeline_cannot_adapt_is_refused_in_one_line(tmp_path):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["algo=mp", "model=mlp", "data=digits", "train.lora.enabled=true"])
    from smolcluster.config import validate
    from smolcluster.train_settings import train_config

    with pytest.raises(ConfigError, match="train.lora with algo=mp adapts a language model's decoder blocks"):
        validate(train_config(cfg))
    # refused as the config is validated, so every process stops at once (GPT-2, the embedding or LM head)
    for model, more, want in [("gpt2-tiny", [], "GPT-2 stages hold their own Conv1D.*allreduce for GPT-2$"),
                              ("llama-tiny", ["train.lora.target_modules=[q_proj,lm_head]"],
                               "^train.lora.target_modules names lm_head under algo=mp, which adapts the decoder"),
                              ("llama-tiny", [f"model.pretrained={gpt2_config_dir(tmp_path)}"], "GPT-2 stages")]:
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose("config", overrides=["algo=mp", f"model={model}", "data=text", "train.lora.enabled=true",
                                               *more])
        with pytest.raises(ConfigError, match=want):
            validate(train_config(cfg))
    torch.manual_seed(0)
    whole = lora.apply(build_causal_lm("llama", vocab_size=64, n_layer=2, n_embd=32, n_head=2),
                       {**LORA, "target_modules": ["q_proj", "lm_head"]}, seed=0)
    with pytest.raises(ConfigError, match="adapts lm_head under algo=mp, which adapts the decoder blocks only"):
        split_for_training(whole, 2, [1.0, 1.0], 1, LORA)
    only_block0 = lora.apply(build_causal_lm("llama", vocab_size=64, n_layer=2, n_embd=32, n_head=2),
                             {**LORA, "target_modules": ["layers.0.self_attn.q_proj"]}, seed=0)
    with pytest.raises(ConfigError, match=r"^train.lora.target_modules=\['layers.0.self_attn.q_proj'\]: stage 1 "
                                          r"\(blocks 1-1\) holds none of them \(Target modules"):
        split_for_training(only_block0, 2, [1.0, 1.0], 1, LORA)
    gpt2 = lora.apply(build_gpt2(vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_positions=32), LORA, seed=0)
    with pytest.raises(ConfigError, match="Conv1D.*use algo=local, syncps, edp or allreduce for GPT-2"):
        split_for_training(gpt2, 2, [1.0, 1.0], 0, LORA)


def test_the_adapter_directory_is_refused_when_the_shards_lack_or_add_an_adapter(tmp_path):
    torch.manual_seed(0)
    whole = lora.apply(build_causal_lm("llama", vocab_size=64, n_layer=2, n_embd=32, n_head=2), LORA, seed=0)
    adapters = {n: p.detach() for n, p in whole.named_parameters() if p.requires_grad}
    config, gone = whole.get_base_model().config, sorted(adapters)[0]
    lora.save_whole_adapter(config, LORA, adapters, tmp_path / "whole")
    assert load_file(tmp_path / "whole" / "adapter_model.safetensors").keys() == {
        k.replace(".default", "") for k in adapters}
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/part: the shards lack adapter {gone} of a llama with "
                                          "train.lora's target modules: merge shards of one run$"):
        lora.save_whole_adapter(config, LORA, {k: v for k, v in adapters.items() if k != gone}, tmp_path / "part")
    with pytest.raises(ConfigError, match="the shards' adapter extra.lora_A.weight is not in a llama"):
        lora.save_whole_adapter(config, LORA, {**adapters, "extra.lora_A.weight": adapters[gone]}, tmp_path / "more")


def test_a_bf16_stage_sends_its_activations_as_bf16_bits():
    """numpy has no bfloat16: a stage over a bf16 base hands the wire torch tensors, and gets them back exact."""
    from smolcluster.pipeline import protocol
    from smolcluster.pipeline.gpipe import array_of, tensor_of

    x = torch.randn(2, 16, 8).to(torch.bfloat16)
    frames = protocol.encode("mp.act", {"step": 3, "mb": 0, "phase": "train", "src": "s0", "seq": 1},
                             {"x": array_of(x)})
    _, _, tensors = protocol.decode([bytes(f) for f in frames], 1 << 20)
    got = tensor_of(tensors["x"], torch.device("cpu"))
    assert got.dtype == torch.bfloat16 and torch.equal(got, x)
    assert len(bytes(frames[-1])) == 2 * x.numel()  # two bytes a value on the wire
