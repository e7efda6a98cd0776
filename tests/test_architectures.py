"""Every family the pipeline speaks (GPT-2, Llama, Qwen2, Qwen3, Mistral) against ``transformers``.

Each model is a seeded random init built with ``transformers``, saved with ``save_pretrained``
in several shard files, as ``huggingface-cli download`` leaves a real model; stages read only
their own tensors from it. Split over 1, 2 and 3 stages, the last-position logits equal the
``transformers`` forward (max-abs 1e-5, fp32; bit for bit with training's ops) and KV-cached greedy
decoding equals ``generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smolcluster.errors import ConfigError
from smolcluster.inference.sampling import SamplingParams, next_token
from smolcluster.models.gpt2 import gpt2_config
from smolcluster.models.hf import SUPPORTED, family_config
from smolcluster.pipeline.architectures import FAMILIES, KVCache, family_for
from smolcluster.pipeline.architectures.base import pin_attributes
from smolcluster.pipeline.quantize import FloatLinear, TransposedHead
from smolcluster.pipeline.weights import find_model, load_stage, tensor_files

VOCAB = 101
SHARD = "40KB"  # a few blocks per file: every tiny model below spans several shards

# family -> the keyword arguments of smolcluster.models.hf.family_config (GPT-2 has its own builder)
SMALL = dict(vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=32, n_kv_head=2, intermediate_size=64, n_positions=128)
CASES = {
    "gpt2": None,
    "llama": dict(family="llama", **SMALL),
    "llama-tied": dict(family="llama", tie_embeddings=True, **SMALL),
    "qwen2": dict(family="qwen2", tie_embeddings=True, **SMALL),
    "qwen3": dict(family="qwen3", head_dim=16, **SMALL),
    "mistral": dict(family="mistral", **SMALL),
    # the rope scaling of Llama 3.1/3.2, with prompts running past its original context of 32
    "llama3-rope": dict(family="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, **SMALL),
    "mistral-window": dict(family="mistral", sliding_window=12, **SMALL),  # prompts and generation past the window
}


def build(case: str, **over):
    """Case ``case``'s seeded model; ``over``: the config arguments that differ from the case's."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(0)
    if CASES[case] is None:
        config = gpt2_config(VOCAB, **{"n_layer": 3, "n_head": 4, "n_embd": 32, "n_positions": 128, **over})
        config.bos_token_id = config.eos_token_id = None
    else:
        config = family_config(**{**CASES[case], **over})
    config.initializer_range = 0.2  # far from uniform logits, so greedy decoding tests something
    if CASES[case] is None:
        return GPT2LMHeadModel(config).eval()
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (model dir, transformers model), built once per case."""
    cache: dict = {}

    def get(case: str):
        if case not in cache:
            d = tmp_path_factory.mktemp(case)
            model = build(case)
            model.save_pretrained(d, max_shard_size=SHARD)
            cache[case] = (d, model)
        return cache[case]

    return get


def split(n_layer: int, n_stages: int) -> list[range]:
    cuts = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def stages_of(d: Path, n_stages: int, head_first: bool = False):
    source = find_model(d)
    arch = family_for(source.config)
    blocks = split(arch.n_layer, n_stages)
    head_rank = 0 if head_first else n_stages - 1
    return [load_stage(source.weights, source.config, b, embed=r == 0, head=r == head_rank)
            for r, b in enumerate(blocks)], head_rank


def training_stages(d: Path, model, n_stages: int, head_first: bool = False):
    """The stages as training builds them (``arch.stage``, the model's own tensors): serving's loader may hold
    a tensor differently (an fp32 CPU head transposed, for speed: ``quantize.TransposedHead``)."""
    arch = family_for(find_model(d).config)
    head_rank = 0 if head_first else n_stages - 1
    full, stages = model.state_dict(), []
    for r, b in enumerate(split(arch.n_layer, n_stages)):
        stage = arch.stage(r == 0, r == head_rank, b)
        stage.load_state_dict({k: full[k] for k in stage.state_dict()}, strict=True)
        stages.append(stage.eval())
    return stages, head_rank


def chained_logits(stages, head_rank: int, ids: torch.Tensor, caches=None) -> torch.Tensor:
    caches = caches or [None] * len(stages)
    x = stages[0].embed(ids, caches[0].length if caches[0] is not None else 0)
    for s, c in zip(stages, caches):
        x = s.run_blocks(x, c)
    return stages[head_rank].logits(x, last_only=True)[0, -1]


def greedy(stages, head_rank: int, prompt: list[int], n: int) -> list[int]:
    caches = [KVCache(len(s.blocks)) for s in stages]
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        token = next_token(chained_logits(stages, head_rank, ids, caches), SamplingParams(), None)
        out.append(token)
        ids = torch.tensor([[token]])
    return out


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(prompt):].tolist()


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- the registry --------------------------------------------------------------------------------
def test_the_registry_is_the_supported_list_and_refuses_others_in_one_line():
    assert tuple(FAMILIES) == SUPPORTED
    with pytest.raises(ConfigError) as e:
        family_for({"model_type": "bert", "hidden_size": 32})
    assert str(e.value) == ("model_type 'bert' is not supported by the pipeline; supported architectures: "
                            "gpt2, llama, mistral, qwen2, qwen3")


@pytest.mark.parametrize("case", ["gpt2", "llama", "llama-tied", "qwen2", "qwen3", "mistral"])
def test_stage_parameters_are_the_hf_models_in_its_order(saved, case):
    d, model = saved(case)
    source = find_model(d)
    assert len({f for f in tensor_files(d).values()}) > 1  # really sharded
    arch = family_for(source.config)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert arch.param_shapes(True, True, range(arch.n_layer)) == names


# -- logits and greedy decoding against transformers ------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_split_stages_equal_the_transformers_forward_and_generate(saved, case):
    d, model = saved(case)
    p = prompt(1, 40)  # past llama3-rope's original 32 positions and mistral-window's 12
    with torch.inference_mode():
        ref = model(torch.tensor([p])).logits[0, -1]
        ref_last = model(torch.tensor([p]), logits_to_keep=1).logits[0, -1]  # the head's matmul as the stage's
        want = hf_greedy(model, p, 12)
        for n_stages in (1, 2, 3):
            stages, head_rank = stages_of(d, n_stages, head_first=n_stages == 3)
            got = chained_logits(stages, head_rank, torch.tensor([p]))  # serving's ops (inference mode)
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-5, (case, n_stages, diff)
            with torch.inference_mode(False), torch.no_grad():  # training's ops: the same as transformers'
                exact = chained_logits(*training_stages(d, model, n_stages, head_first=n_stages == 3),
                                       torch.tensor([p]))
            assert torch.equal(exact, ref_last), (case, n_stages)  # bit for bit: the same ops in the same order
            # Serving holds an fp32 CPU head for a faster matmul (transposed for MKL, or (out, in) for rows_mm where it
            # is built): its logits are within 1e-5 (above), its token lookups (a tied embedding) are the very rows,
            # bit for bit.
            full = model.get_output_embeddings().weight
            head = next(m for m in stages[head_rank].modules()
                        if isinstance(m, (TransposedHead, FloatLinear)) and m.n_out == full.shape[0])
            assert torch.equal(head.weight_t.t() if isinstance(head, TransposedHead) else head.weight, full)
            if head_rank == 0 and model.config.tie_word_embeddings:  # the head is stage 0's token embedding too
                ids = torch.tensor([p])
                assert torch.equal(head(ids), model.get_input_embeddings()(ids)), (case, n_stages)
            assert greedy(stages, head_rank, p, 12) == want, (case, n_stages)
        short = prompt(2, 5)  # a short prompt, generation crossing the window / scaling boundary
        assert greedy(stages, head_rank, short, 40) == hf_greedy(model, short, 40)


def test_a_pinned_stage_computes_the_same_and_a_reassigned_parameter_is_not_stale(saved):
    """Serving pins a stage's parameters and submodules as plain attributes (fast lookups): the same
    tensors, so the same logits bit for bit; a parameter assigned later replaces the pinned copy."""
    d, _ = saved("gpt2")
    stages, head_rank = stages_of(d, 2, head_first=True)
    ids = torch.tensor([prompt(3, 20)])
    with torch.inference_mode():
        want = chained_logits(stages, head_rank, ids)
        for s in stages:
            pin_attributes(s)
        assert torch.equal(chained_logits(stages, head_rank, ids), want)
    ln_f = stages[0].transformer.ln_f
    assert vars(ln_f)["weight"] is ln_f._parameters["weight"]  # pinned
    ln_f.weight = torch.nn.Parameter(torch.zeros_like(ln_f.weight))
    assert "weight" not in vars(ln_f) and ln_f.weight is ln_f._parameters["weight"]
    with torch.inference_mode():
        assert not torch.equal(chained_logits(stages, head_rank, ids), want)  # the new weight is used


# -- bad weights ---------------------------------------------------------------------------------
def test_a_missing_or_mis_shaped_tensor_is_named(saved, tmp_path):
    d, _ = saved("llama")
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = bad / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    source = find_model(bad)
    with pytest.raises(ConfigError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(64, 31\), "
                                          r"the model's config.json says \(64, 32\)"):
        load_stage(source.weights, source.config, range(1, 2), embed=False, head=False)
    del index["weight_map"][key]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_stage(source.weights, source.config, range(1, 3), embed=False, head=True)
    # stages that do not need it still load
    load_stage(source.weights, source.config, range(2, 3), embed=False, head=True)


# -- through real stage processes ---------------------------------------------------------------------
def two_eos(model, p1: list[int], p2: list[int], n: int) -> tuple[int, int]:
    """Ids (a, b): greedy from p1 meets a before b, greedy from p2 meets b before a (neither at once)."""
    r1, r2 = hf_greedy(model, p1, n), hf_greedy(model, p2, n)
    for i, a in enumerate(r1[1:], 1):
        for j, b in enumerate(r2[1:], 1):
            if a != b and a not in r1[:i] and b not in r1[:i + 1] and b not in r2[:j] and a not in r2[:j + 1]:
                return a, b
    raise AssertionError(f"no two EOS candidates in {r1} / {r2}")


@pytest.mark.parametrize("case,stages,head", [("llama", 2, "first"), ("qwen3", 3, "last")])
def test_real_stage_processes_generate_like_transformers_and_stop_at_every_eos(saved, tmp_path, case, stages, head):
    import shutil

    from smolcluster.inference import InferencePipeline

    d, model = saved(case)
    p1, p2 = prompt(3, 9), prompt(4, 30)
    a, b = two_eos(model, p1, p2, 20)
    served = tmp_path / case
    shutil.copytree(d, served)
    (served / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, b]}))
    with InferencePipeline.start_local(served, stages=stages, head=head, heartbeat_s=0.2, liveness_s=5.0) as pipe:
        assert pipe.eos_ids == [a, b]
        from smolcluster.pipeline.quantize import StageFormat, kernels

        assert pipe.model_info == {"architecture": model.config.model_type, "context": 128, "vocab_size": VOCAB,
                                   "kernels": [kernels(StageFormat())] * stages,
                                   "decode": ["compiled decode: off"] * stages}
        assert len(pipe.client.partition) == stages
        reqs = [pipe.submit(p, max_new_tokens=30, stop_at_eos=False) for p in (p1, p2, prompt(5, 1))]
        assert [r.tokens() for r in reqs] == [hf_greedy(model, p, 30) for p in (p1, p2, prompt(5, 1))]
        assert all(r.finish_reason == "length" for r in reqs)
        for p, eos in ((p1, a), (p2, b)):
            r = pipe.submit(p, max_new_tokens=20)
            ref = hf_greedy(model, p, 20)
            assert r.tokens() == ref[:ref.index(eos) + 1] and r.finish_reason == "eos"


def test_infer_serves_a_random_init_of_a_named_llama_config(tmp_path):
    from tests.conftest import run_cli

    p = run_cli("smolcluster.infer", "model=llama-tiny", "model.n_layer=2", "prompt=To be", "max_new_tokens=6",
                "stop_at_eos=false", "cluster.heartbeat_s=0.2", f"data.cache_dir={tmp_path}", timeout=240)
    assert p.stdout.startswith("To be") and "6 tokens in" in p.stderr and "finished: length" in p.stderr


# -- algo=mp training ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama-tiny", "qwen3-tiny"])  # untied; tied (the stages sum its gradient)
def test_two_stages_20_steps_end_on_the_local_parameters(tmp_path, model):
    from tests.conftest import train
    from tests.test_mp import ONE_THREAD, max_diff, params_of, run_local

    args = [f"model={model}", "data=text", "model.block_size=32", "train.batch_size=8", "train.eval_samples=64",
            "train.log_every=5", "train.optimizer=adamw", "train.lr=3e-3", "train.warmup_steps=5", "train.steps=20",
            f"data.cache_dir={tmp_path / 'tok'}"]
    ref = run_local(tmp_path / "local", *args)
    s = train(tmp_path / "mp", "algo=mp", *args, env=ONE_THREAD)
    assert s["partition"] == ["stage 0/2: embeddings + blocks 0-1", "stage 1/2: blocks 2-3 + head"]
    mp, local = params_of(tmp_path / "mp"), params_of(tmp_path / "local")
    assert ("lm_head.weight" in mp) == (model == "llama-tiny")
    diff = max_diff(mp, local)
    assert diff <= 1e-5, diff
    assert s["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    # the merged run is a Hugging Face directory too, holding exactly the trained parameters
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mp" / "hf")
    assert hf.config.model_type == model.removesuffix("-tiny")
    assert max(float((p.detach() - mp[n]).abs().max()) for n, p in hf.named_parameters()) == 0.0
    assert (tmp_path / "mp" / "hf" / "tokenizer.json").is_file()


def test_a_run_directory_serves_its_hf_directory(saved, tmp_path):
    import shutil

    from smolcluster.inference.api import describe_weights

    d, _ = saved("qwen2")
    run = tmp_path / "run"
    shutil.copytree(d, run / "hf")
    (run / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    info = describe_weights(run)
    assert info["weights"] == run / "hf" and info["config"]["model_type"] == "qwen2" and info["eos"] == [7]
    source = find_model(run)
    stage = load_stage(source.weights, source.config, range(0, 3), embed=True, head=True)
    assert "lm_head.weight" not in dict(stage.named_parameters())  # tied: the head is the embedding
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
        find_model(tmp_path)


def test_infer_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    p = run_cli("smolcluster.infer", f"model.pretrained={tmp_path}", "prompt=Hi", check=False, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].endswith(
        "model_type 'bert' is not supported by the pipeline; supported architectures: gpt2, llama, mistral, qwen2, qwen3")


def test_a_stage_process_never_imports_transformers(saved):
    import subprocess
    import sys

    from tests.conftest import REPO

    d, _ = saved("qwen3")
    code = ("import sys, json, torch; from smolcluster.inference import stage; "
            "from smolcluster.pipeline.weights import load_stage; "
            f"c = json.load(open({str(d / 'config.json')!r})); "
            f"s = load_stage({str(d)!r}, c, range(1, 3), embed=False, head=True); "
            "print(sum(p.numel() for p in s.parameters()), 'transformers' in sys.modules, 'hydra' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out[1:] == ["False", "False"] and int(out[0]) > 0
