"""LoRA adapters served per request, through real stage processes on loopback, against ``peft``.

A tiny random-init Llama saved as a Hugging Face directory, and two peft adapters made here with
``get_peft_model(init_lora_weights=False)`` (random nonzero A and B) and ``save_pretrained``: served
greedy text equals ``PeftModel.generate`` token for token; requests for different adapters and for
none share the stages' batches and each equals its solo run; the API lists ``base`` and
``base:NAME`` and routes by ``model``; an adapter that does not fit the model is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from smolcluster.bench.common import write_tokenizer
from smolcluster.errors import ConfigError
from smolcluster.inference.adapters import attach, check_adapters
from smolcluster.models.hf import family_config
from smolcluster.pipeline.architectures import KVCache
from smolcluster.pipeline.architectures.base import Batch
from smolcluster.pipeline.quantize import StageFormat
from smolcluster.pipeline.weights import find_model, load_stage
from smolcluster.serving.app import WebServer, build_app
from tests.conftest import run_cli, wait_until

VOCAB, CONTEXT, MODEL = 300, 128, "tiny-llama"
SHAPE = dict(vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=32, n_kv_head=2, intermediate_size=64, n_positions=CONTEXT)
# name -> (LoraConfig keywords, seed): every projection at r=4; two at r=2 with rsLoRA's scale
ADAPTERS = {"alpha": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]), 1),
            "beta": (dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["v_proj", "down_proj"]), 2)}


def base_model(**shape):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config("llama", **{**SHAPE, **shape})
    config.initializer_range = 0.2  # far from uniform logits, so greedy decoding tests something
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def save_adapter(model, out: Path, seed: int, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model dir with its tokenizer, {name: adapter dir})."""
    root = tmp_path_factory.mktemp("lora-serve")
    base_model().save_pretrained(root / MODEL)
    write_tokenizer(root / MODEL, VOCAB)
    return root / MODEL, {name: save_adapter(base_model(), root / name, seed, **kw)
                          for name, (kw, seed) in ADAPTERS.items()}


def peft_greedy(model_dir: Path, adapter: Path | None, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(ids):].tolist()


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def served(saved):
    """``python -m smolcluster.chat model.pretrained=DIR adapters={alpha:..,beta:..}``'s sessions (2 local stages,
    from the Hydra config as the command composes it), behind the OpenAI API."""
    from hydra import compose, initialize_config_dir

    from smolcluster.paths import CONFIG_DIR
    from smolcluster.serving.config import model_name, sessions_from_config
    from smolcluster.serving.settings import chat_settings

    model_dir, adapters = saved
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("chat", [f"model.pretrained={model_dir}", "cluster.heartbeat_s=0.2", "cluster.liveness_s=5",
                               f"adapters={{alpha:{adapters['alpha']},beta:{adapters['beta']}}}"])
    settings = chat_settings(cfg)
    assert model_name(settings) == MODEL
    sessions = sessions_from_config(settings)
    server = WebServer(build_app(sessions, MODEL, ui=False)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield sessions, http
    finally:
        server.stop()
        sessions.close()


def mixed_steps(pipe) -> list[int]:
    """Per stage, its steps whose rows went through more than one adapter (the base counting as one)."""
    return [pipe.client.mesh.peers[s].info.get("mixed_steps") for s in pipe.client.stages]


def test_served_greedy_equals_peft_generate_and_mixed_requests_equal_their_solo_runs(served, saved):
    sessions, _ = served
    pipe = sessions.pipeline()
    model_dir, adapters = saved
    assert pipe.adapters == ["alpha", "beta"]
    cases = [("alpha", prompt(1, 7)), ("beta", prompt(2, 19)), (None, prompt(3, 4))]
    solo = {}
    for adapter, p in cases:  # one at a time: each request alone in its batches
        solo[adapter] = pipe.submit(p, max_new_tokens=16, stop_at_eos=False, adapter=adapter).tokens()
        assert solo[adapter] == peft_greedy(model_dir, adapters.get(adapter), p, 16), adapter
    assert len({tuple(t) for t in solo.values()}) == 3  # the adapters change the answers
    # (None until a stage's beacon after it serves): one at a time, no step mixed adapters
    assert wait_until(lambda: all(isinstance(m, int) for m in mixed_steps(pipe)), 60), mixed_steps(pipe)
    assert not any(mixed_steps(pipe)), mixed_steps(pipe)
    # Together, until they shared steps on each stage (rows of different adapters, or of one and the base, in one
    # forward): under load a request may finish before the next arrives, so the scene is set up again then.
    for _ in range(5):
        reqs = [pipe.submit(p, max_new_tokens=16, stop_at_eos=False, adapter=a) for a, p in cases]
        assert [r.tokens() for r in reqs] == [solo[a] for a, _ in cases]
        if wait_until(lambda: min((m or 0) for m in mixed_steps(pipe)) > 0, 10):
            break
    assert min((m or 0) for m in mixed_steps(pipe)) > 0, mixed_steps(pipe)
    with pytest.raises(ConfigError, match="no adapter 'gamma' here: this pipeline serves adapters alpha, beta"):
        pipe.submit(prompt(4, 3), adapter="gamma")


def test_stage_0_refuses_an_adapter_it_does_not_serve_and_the_caller_hears_why(served):
    """Around the head's own check (its list of adapters given one more name): the stage's refusal reaches the
    request, and the pipeline serves on."""
    from smolcluster.errors import PeerError

    sessions, _ = served
    pipe = sessions.pipeline()
    pipe.client.adapters.append("gamma")
    try:
        req = pipe.submit(prompt(4, 3), max_new_tokens=2, adapter="gamma")  # the head lets it through
        with pytest.raises(PeerError, match=r"^no adapter 'gamma' here: this pipeline serves adapters alpha, beta "
                                            r"\(start every stage with adapters=\{gamma:DIR\}\)$"):
            req.tokens()
    finally:
        pipe.client.adapters.remove("gamma")
    assert len(pipe.submit(prompt(4, 3), max_new_tokens=2, stop_at_eos=False, adapter="beta").tokens()) == 2


PROMPTS = [prompt(5, 6), prompt(6, 3), prompt(7, 9)]
MIXED = [0, 1, -1]  # PROMPTS[i] through alpha, beta, the base
BASE = [-1, -1, -1]


@pytest.fixture(scope="module")
def forward(saved):
    """``forward(prompts, which, fmt)``: one forward of a whole-model stage in this process, every prompt's rows in
    one batch, ``prompts[i]``'s through adapter ``which[i]`` (0: alpha, 1: beta, -1: none); the logits, (rows,
    vocab) in float32. Each answer is kept: the tests compare the same few runs."""
    model_dir, adapters = saved
    source = find_model(model_dir)
    cache: dict = {}

    def run(prompts: list[list[int]], which: list[int], fmt: StageFormat = StageFormat()) -> torch.Tensor:
        key = (tuple(map(tuple, prompts)), tuple(which), fmt)
        if key not in cache:
            stage = load_stage(source.weights, source.config, range(3), embed=True, head=True, fmt=fmt)
            router = attach(stage, source.config, {k: str(v) for k, v in adapters.items()}, torch.device("cpu"))
            router.route(which, [len(p) for p in prompts])
            batch = Batch([KVCache(3) for _ in prompts], [len(p) for p in prompts])
            with torch.inference_mode():
                x = stage.embed(torch.tensor([sum(prompts, [])]), batch.positions()).to(stage.compute_dtype)
                cache[key] = stage.logits(stage.run_blocks(x, batch))[0].float()
        return cache[key]

    return run


def test_one_batch_of_rows_for_two_adapters_and_none_equals_each_request_alone(forward):
    together = forward(PROMPTS, MIXED)
    alone = torch.cat([forward([p], [k]) for p, k in zip(PROMPTS, MIXED)])
    base = forward(PROMPTS, BASE)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (together[:9] - base[:9]).abs().max() > 1.0  # the adapted rows really moved
    torch.testing.assert_close(together[9:], base[9:], atol=1e-5, rtol=1e-5)  # the base's rows: the base


@pytest.mark.parametrize("fmt", [StageFormat("bf16"), StageFormat("fp32", "int8")], ids=["bf16", "int8"])
def test_quantized_stages_apply_the_adapters_in_float32_on_their_activations(forward, fmt):
    """Off by no more than the format costs the base alone: the adapters' float32 path adds no error of its own."""
    exact, exact_base = forward(PROMPTS, MIXED), forward(PROMPTS, BASE)
    quant_error = (forward(PROMPTS, BASE, fmt) - exact_base).abs().max()
    assert (forward(PROMPTS, MIXED, fmt) - exact).abs().max() <= 2 * quant_error
    assert quant_error < 0.3 < (exact - exact_base).abs().max()  # the adapters move logits far more than that


def test_gpt2_adapters_on_its_conv1d_projections_equal_peft(tmp_path):
    """GPT-2's projections are Conv1D (weight stored in x out; peft's fan_in_fan_out): the same A/B math."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from smolcluster.models.gpt2 import build_gpt2

    torch.manual_seed(0)
    build_gpt2(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, n_positions=CONTEXT).save_pretrained(tmp_path / "m")
    save_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "m"), tmp_path / "a", 1, r=4, lora_alpha=8,
                 target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    ids = torch.tensor([prompt(9, 9)])
    with torch.no_grad():
        want = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "m"), tmp_path / "a")(ids).logits[0]
    source = find_model(tmp_path / "m")
    stage = load_stage(source.weights, source.config, range(2), embed=True, head=True)
    attach(stage, source.config, {"a": str(tmp_path / "a")}, torch.device("cpu")).route([0], [9])
    batch = Batch([KVCache(2)], [9])
    with torch.inference_mode():
        got = stage.logits(stage.run_blocks(stage.embed(ids, batch.positions()), batch))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_api_lists_base_and_base_name_and_routes_by_model(served):
    sessions, http = served
    models = http.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [(MODEL, None), (f"{MODEL}:alpha", MODEL),
                                                        (f"{MODEL}:beta", MODEL)]
    assert http.get(f"/v1/models/{MODEL}:beta").json()["parent"] == MODEL
    pipe, ids = sessions.pipeline(), prompt(8, 5)
    for adapter in ("alpha", "beta", None):
        model = f"{MODEL}:{adapter}" if adapter else MODEL
        r = http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 10, "temperature": 0})
        want = pipe.submit(ids, max_new_tokens=10, adapter=adapter).tokens()
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == pipe.tokenizer.decode(want), adapter
    r = http.post("/v1/completions", json={"model": f"{MODEL}:gamma", "prompt": ids, "max_tokens": 3})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["message"] == (f"The model '{MODEL}:gamma' does not exist: this server serves "
                                            f"'{MODEL}', '{MODEL}:alpha', '{MODEL}:beta'")


def stage_config(model_dir: Path, adapters: str):
    """``python -m smolcluster.infer role=stage rank=1 ... adapters=ADAPTERS``'s stage config (nothing started)."""
    from hydra import compose, initialize_config_dir

    from smolcluster.inference.from_config import serve_config_from
    from smolcluster.inference.settings import infer_settings
    from smolcluster.paths import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("infer", ["role=stage", "rank=1", "cluster.port=6100", f"model.pretrained={model_dir}",
                                f"adapters={adapters}"])
    return serve_config_from(infer_settings(cfg).pipeline)


def test_adapters_that_do_not_fit_the_model_are_refused_in_one_line(saved, tmp_path):
    model_dir, adapters = saved
    config = find_model(model_dir).config
    wide = save_adapter(base_model(n_embd=48), tmp_path / "wide", 3, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ConfigError) as e:
        check_adapters({"wide": str(wide)}, config)
    assert str(e.value) == (f"adapters.wide={wide} does not fit the served model: model.layers.0.self_attn.q_proj "
                            "maps 32 -> 32 here, so r=4 needs A (4, 32) and B (32, 4); the adapter has A (4, 48) "
                            "and B (48, 4): serve it with the model it was trained on")
    from smolcluster.models.gpt2 import build_gpt2

    gpt2 = save_adapter(build_gpt2(vocab_size=VOCAB, n_layer=1, n_head=4, n_embd=32, n_positions=CONTEXT),
                        tmp_path / "gpt2", 3, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ConfigError, match=r"was trained on a GPT2LMHeadModel, the served model is a LlamaForCausalLM"):
        check_adapters({"gpt2": str(gpt2)}, config)
    head = save_adapter(base_model(), tmp_path / "head", 3, r=4, lora_alpha=8, target_modules=["lm_head"])
    with pytest.raises(ConfigError, match="it adapts 'lm_head', which is not one of its blocks' projections"):
        check_adapters({"head": str(head)}, config)
    dora = save_adapter(base_model(), tmp_path / "dora", 3, r=4, lora_alpha=8, target_modules=["q_proj"],
                        use_dora=True)
    with pytest.raises(ConfigError, match="use_dora=True is not supported by serving"):
        check_adapters({"dora": str(dora)}, config)
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        check_adapters({"x": str(tmp_path)}, config)
    # a cluster node's stage (infer role=stage rank=N): its config takes the adapters, checked, or refuses them
    assert stage_config(model_dir, f"{{ok:{adapters['alpha']}}}").adapters == {"ok": str(adapters["alpha"])}
    with pytest.raises(ConfigError, match=r"^adapters.wide=.* does not fit the served model"):
        stage_config(model_dir, f"{{ok:{adapters['alpha']},wide:{wide}}}")
    # the command line: refused before any stage starts, exit 2, one line
    p = run_cli("smolcluster.infer", f"model.pretrained={model_dir}", f"adapters={{ok:{adapters['alpha']},wide:{wide}}}",
                "prompt=hi", timeout=120, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("error: adapters.wide=") and "does not fit" in lines[-1]


def test_a_broken_adapter_directory_is_refused_in_one_line_naming_the_file(saved, tmp_path):
    import json
    import shutil

    model_dir, adapters = saved
    config = find_model(model_dir).config
    broken = Path(shutil.copytree(adapters["beta"], tmp_path / "broken"))
    good_config = (broken / "adapter_config.json").read_text()
    (broken / "adapter_config.json").write_text(good_config[:-20])  # cut short
    with pytest.raises(ConfigError, match=rf"^adapters.b={broken}: {broken}/adapter_config.json is not valid JSON"):
        check_adapters({"b": str(broken)}, config)
    (broken / "adapter_config.json").write_text(json.dumps({**json.loads(good_config), "lora_alpha": None}))
    with pytest.raises(ConfigError, match=r"adapter_config.json has no number 'lora_alpha': re-save it"):
        check_adapters({"b": str(broken)}, config)
    (broken / "adapter_config.json").write_text(good_config)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ConfigError, match=rf"{weights} is not a readable safetensors file .*: re-save the adapter"):
        check_adapters({"b": str(broken)}, config)


def test_stages_must_serve_the_same_files_under_each_adapter_name_in_any_order(saved, tmp_path):
    import shutil

    from smolcluster.inference.adapters import digest
    from smolcluster.inference.client import check_same_adapters

    _, adapters = saved
    alpha, beta = digest(adapters["alpha"]), digest(adapters["beta"])
    assert digest(Path(shutil.copytree(adapters["alpha"], tmp_path / "copy"))) == alpha != beta
    check_same_adapters([{"alpha": alpha, "beta": beta}, {"beta": beta, "alpha": alpha}])  # order is no matter
    with pytest.raises(ConfigError) as e:  # node A: sql -> alpha's files, node B: sql -> beta's
        check_same_adapters([{"sql": alpha}, {"sql": alpha}, {"sql": beta}])
    assert str(e.value) == (f"adapter 'sql': its files differ between stages 0 ({alpha[:12]}), 1 ({alpha[:12]}), "
                            f"2 ({beta[:12]}): start every stage with the same adapters= (the same files under "
                            "each name)")
    with pytest.raises(ConfigError, match=r"^adapter 'sql': stages \[1\] do not serve it, stages \[0\] do: start"):
        check_same_adapters([{"sql": alpha}, {}])


def test_a_request_intro_with_a_field_of_the_wrong_type_is_refused_naming_it():
    """What ``mp.hidden`` nests (``intro[req]``) is checked as the wire checks a message's own fields."""
    from smolcluster.errors import PeerError
    from smolcluster.inference.stage import check_intro

    good = {"head": "h", "max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 1, "eos": [2],
            "prompt_len": 3, "adapter": "alpha", "prefix": []}
    check_intro("r1", good, "stage-0")
    with pytest.raises(PeerError) as e:
        check_intro("r1", {**good, "adapter": ["alpha"]}, "stage-0")
    assert str(e.value) == ("stage-0 introduced request 'r1' with adapter=['alpha'] (adapter must be str): every "
                            "stage must run the same smolcluster version")
    with pytest.raises(PeerError, match=r"with top_k=None \(top_k must be int\)"):
        check_intro("r1", {k: v for k, v in good.items() if k != "top_k"}, "stage-0")
    with pytest.raises(PeerError, match=r"with temperature=True \(temperature must be int or float\)"):
        check_intro("r1", {**good, "temperature": True}, "stage-0")
