"""Training the Hugging Face families (Llama, Qwen2, Qwen3, Mistral, GPT-2): the distributed algorithms against
``algo=local``, fine-tuning from a Hugging Face directory, and ``RUN_DIR/hf`` against ``transformers``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smolcluster import checkpoint
from smolcluster.data.text import EOS, embedded_corpus
from smolcluster.models.gpt2 import build_gpt2
from smolcluster.models.hf import SUPPORTED, build_causal_lm, save_hf_dir
from tests.conftest import run_cli, tokenizer_cache, train, train_together
from tests.equivalence import max_abs_diff

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]
# A few seconds of training on the embedded corpus: 2 layers, 32-token windows, a 512-token BPE. SGD with
# momentum, not AdamW: AdamW divides by sqrt(v) + 1e-8, so a coordinate whose first gradient is tiny (a rare
# token's embedding) turns float rounding into a step-sized difference; seen at 1.01e-5 after 20 steps of
# llama-tiny, a measure of the optimizer's conditioning, not of the algorithm. With SGD: 1.2e-7.
SMALL = ["data=text", "data.vocab_size=512", "model.n_layer=2", "model.block_size=32", "train.optimizer=sgd",
         "train.lr=0.1", "train.eval_samples=32"]


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory) -> Path:
    return tokenizer_cache(tmp_path_factory.mktemp("tok"), vocab_size=512)  # the corpus's BPE, trained once


def write_tokenizer(d: Path, vocab_size: int = 300, eos: str = "<|im_end|>") -> Tokenizer:
    """A byte-level BPE as a model directory carries it: tokenizer.json + tokenizer_config.json (eos, chat template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(embedded_corpus()[:100_000].splitlines(keepends=True), trainer=trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
        "chat_template": "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"}))
    return tok


def pretrained_dir(d: Path, family: str, **kw) -> Path:
    """A random-init model of ``family`` saved as ``huggingface-cli download`` leaves one: several shard files."""
    tok = write_tokenizer(d)
    torch.manual_seed(1)
    model = build_causal_lm(family, vocab_size=tok.get_vocab_size() + 20, n_layer=2, n_head=4, n_embd=64,
                            n_kv_head=2, n_positions=128, eos_token_id=tok.token_to_id("<|im_end|>"), **kw)
    model.save_pretrained(d, max_shard_size="100KB")
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1 and (d / "model.safetensors.index.json").is_file()
    return d


def hf_logits(hf_dir: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


def test_llama_tiny_syncps_equals_local_and_a_resumed_local_run_ends_bit_identical(tmp_path, tok_cache):
    common = ["model=llama-tiny", *SMALL, "train.steps=20", f"data.cache_dir={tok_cache}"]
    local = ["algo=local", "train.batch_size=8", *common]
    # the three runs that do not depend on another at once; one intra-op thread in every local run (the resumed
    # one's included), so that the bit-for-bit comparison below compares the same sums
    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    s, _, _ = train_together(
        (tmp_path / "ps", ["algo=syncps", "cluster.workers=2", "train.batch_size=4", *common, *FAST]),
        (tmp_path / "local", local), (tmp_path / "half", [*local, "train.stop_after=10"]), env=one)
    assert s["steps"] == 20 and s["workers"]["0"]["applied"] == s["workers"]["1"]["applied"] == 20
    diff = max_abs_diff(tmp_path / "ps", tmp_path / "local")
    assert diff < 1e-5, diff
    # and the server's checkpoint is also a Hugging Face directory
    assert json.loads((tmp_path / "ps" / "hf" / "config.json").read_text())["model_type"] == "llama"

    # resume: stopped at step 10 (RUN_DIR/hf is that step), resumed, it ends where the uninterrupted run did
    half_hf = load_file(tmp_path / "half" / "hf" / "model.safetensors")
    half = load_file(tmp_path / "half" / "checkpoint.safetensors")
    assert all(torch.equal(half_hf[k], half[k]) for k in half_hf)
    r = train(tmp_path / "resumed", *local, f"resume={tmp_path / 'half'}", env=one)
    assert r["steps"] == 20 and max_abs_diff(tmp_path / "local", tmp_path / "resumed") == 0.0
    a = load_file(tmp_path / "local" / "hf" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_a_sharded_qwen3_directory_with_syncps_equals_local_and_hf_dir_gives_the_same_logits(tmp_path):
    src = pretrained_dir(tmp_path / "qwen3", "qwen3", head_dim=16, tie_embeddings=True)
    common = ["model=qwen3-tiny", f"model.pretrained={src}", *SMALL, "train.steps=8"]
    s = train(tmp_path / "ps", "algo=syncps", "cluster.workers=2", "train.batch_size=4", *common, *FAST)
    train(tmp_path / "local", "algo=local", "train.batch_size=8", *common)
    assert s["steps"] == 8 and s["params"] == sum(p.numel() for p in build_causal_lm(
        "qwen3", pretrained=str(src)).parameters())
    assert max_abs_diff(tmp_path / "ps", tmp_path / "local") < 1e-5
    run = tmp_path / "ps"
    # the corpus was encoded with the model's own tokenizer, and the run hands it on
    assert (run / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    trained = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    start = {n: p.detach().clone() for n, p in trained.named_parameters()}
    checkpoint.load(run, trained)  # the trained parameters, by their checkpoint names
    assert max(float((p.detach() - start[n]).abs().max()) for n, p in trained.named_parameters()) > 1e-4  # trained
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(x).logits
    got = hf_logits(run / "hf", x)
    assert (got - want).abs().max() <= 1e-6
    files = {p.name for p in (run / "hf").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert "lm_head.weight" not in load_file(run / "hf" / "model.safetensors")  # tied: stored once
    tok = AutoTokenizer.from_pretrained(run / "hf")
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.eos_token == "<|im_end|>"
    assert tok.chat_template is not None  # the source directory's tokenizer files travel with the model
    gen = json.loads((run / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


def test_edp_fine_tunes_a_qwen2_directory_to_completion_and_names_the_model_it_loaded(tmp_path):
    # a Qwen2 directory fine-tuned under the llama-tiny preset (128 wide, untied)
    src = pretrained_dir(tmp_path / "my-qwen", "qwen2", tie_embeddings=True)
    s = train(tmp_path / "run", "algo=edp", "cluster.workers=2", "model=llama-tiny", f"model.pretrained={src}",
              *SMALL, "train.steps=12", "train.batch_size=4", *FAST)
    assert s["steps"] == 12 and s["applied"] == 12 and s["workers_lost"] == []
    # the run describes the model it loaded, not the preset that named the run
    loaded = {"name": "my-qwen", "family": "qwen2", "n_embd": 64, "n_layer": 2, "tie_embeddings": True}
    assert s["model"] == "my-qwen" and loaded.items() <= s["config"]["model"].items(), s["config"]["model"]
    assert loaded.items() <= json.loads((tmp_path / "run" / "checkpoint.json").read_text())["model"].items()
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(tmp_path / "run" / "hf", x) - hf_logits(src, x)).abs().max() > 1e-4  # fine-tuned


def test_a_pretrained_directory_of_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    proc = run_cli("smolcluster.train", f"hydra.run.dir={tmp_path / 'run'}", "algo=syncps", "model=llama-tiny",
                   f"model.pretrained={tmp_path / 'bert'}", *SMALL, "train.steps=2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "model_type 'bert' is not supported" in errors[0] and ", ".join(SUPPORTED) in errors[0]
    assert "[server]" not in proc.stderr  # refused before any process was started


def test_a_tokenizer_larger_than_the_pretrained_vocabulary_is_refused(tmp_path, tok_cache):
    src = pretrained_dir(tmp_path / "llama", "llama")
    (src / "tokenizer.json").unlink()  # no tokenizer of its own: data=text falls back to a 512-token BPE
    proc = run_cli("smolcluster.train", f"hydra.run.dir={tmp_path / 'run'}", "algo=local", "model=llama-tiny",
                   f"model.pretrained={src}", *SMALL, f"data.cache_dir={tok_cache}", "train.steps=2",
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the data's tokenizer has 512 tokens, the model only 320" in proc.stderr


FAMILIES = {
    "gpt2": lambda: build_gpt2(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64, eos_token_id=0),
    "llama": lambda: build_causal_lm("llama", vocab_size=300, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32}),
    "qwen2": lambda: build_causal_lm("qwen2", vocab_size=300, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                                     tie_embeddings=True),
    "qwen3": lambda: build_causal_lm("qwen3", vocab_size=300, n_layer=2, n_head=4, n_embd=32, head_dim=16),
    "mistral": lambda: build_causal_lm("mistral", vocab_size=300, n_layer=2, n_head=4, n_embd=32, sliding_window=8),
}


@pytest.mark.parametrize("as_state", [False, True], ids=["module", "state_dict"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_dir_loads_in_transformers_with_the_same_logits(family, as_state, tmp_path):
    from transformers import AutoTokenizer

    from smolcluster.flat import FlatParams

    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    flat = FlatParams(model)  # as in training: every parameter a view of one buffer
    with torch.no_grad():
        flat.params["float32"].add_(torch.randn_like(flat.params["float32"]) * 0.01)
    tok_dir = tmp_path / "tok"
    write_tokenizer(tok_dir, eos=EOS)
    (tok_dir / "tokenizer_config.json").unlink()  # a bare tokenizer.json, as a run trains one
    if as_state:  # what a pipeline has: the whole model's parameters under their names, and its config
        save_hf_dir({n: p.detach().clone() for n, p in model.named_parameters()}, model.config, tmp_path / "hf",
                    tok_dir / "tokenizer.json")
    else:
        save_hf_dir(model, None, tmp_path / "hf", tok_dir / "tokenizer.json")
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
    assert (hf_logits(tmp_path / "hf", x) - want).abs().max() <= 1e-6
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == EOS and tok.eos_token_id == 0
    assert not list(tmp_path.glob(".hf.tmp*"))  # the staging directory is gone


@pytest.mark.parametrize("family", list(FAMILIES))
def test_any_model_config_with_pretrained_loads_the_directory_s_family_from_shards(family, tmp_path):
    from omegaconf import OmegaConf

    from smolcluster.models import build_model
    from smolcluster.paths import CONFIG_DIR

    torch.manual_seed(0)
    FAMILIES[family]().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert len(list((tmp_path / "m").glob("model-*-of-*.safetensors"))) > 1
    for name in ("gpt2-tiny", "llama-tiny"):  # whichever config names it, config.json decides
        spec = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
        spec.pretrained = str(tmp_path / "m")
        model = build_model(spec, {"vocab_size": 300, "eos_token_id": 0}).eval()
        assert model.config.model_type == family
        x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(x).logits, hf_logits(tmp_path / "m", x))


def test_gpt2_tiny_special_ids_fit_its_vocabulary_and_transformers_says_nothing(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = build_gpt2(vocab_size=4096, n_layer=1, n_head=2, n_embd=32, n_positions=64)
        trained = build_gpt2(vocab_size=4096, n_layer=1, n_head=2, n_embd=32, n_positions=64, eos_token_id=7)
        full = build_gpt2(vocab_size=50257, n_layer=1, n_head=2, n_embd=32, n_positions=64)
    assert small.config.bos_token_id is None and small.config.eos_token_id is None
    assert trained.config.bos_token_id == trained.config.eos_token_id == 7
    assert full.config.eos_token_id == 50256  # GPT-2's own vocabulary keeps its <|endoftext|>
    assert "bos_token_id must be" not in capfd.readouterr().err


def test_the_old_model_name_mnist_still_trains_the_mlp_with_a_note(tmp_path):
    proc = run_cli("smolcluster.train", f"hydra.run.dir={tmp_path}", "algo=local", "model=mnist", "train.steps=3",
                   "train.progress=false")
    assert "model=mnist is the old name of model=mlp" in proc.stderr + proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == "mlp"
