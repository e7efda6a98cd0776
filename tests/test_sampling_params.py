"""SamplingParams, the one home of the sampling settings: its defaults reach infer and chat unchanged, it
round-trips through the wire fields a request carries to stage 0 and from an OpenAI request, and a bad
value is refused in one line naming the key. In-process: no stages are started."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from smolcluster.data.text import TextTokenizer
from smolcluster.errors import ConfigError
from smolcluster.inference.sampling import WIRE_FIELDS, SamplingParams
from smolcluster.inference.settings import infer_settings
from smolcluster.paths import CONFIG_DIR
from smolcluster.pipeline.protocol import REQUEST_FIELDS
from smolcluster.serving.openai_requests import ModelLimits, parse_completion
from smolcluster.serving.openai_schema import CompletionRequest
from smolcluster.serving.sessions import ChatDefaults, Settings
from smolcluster.serving.settings import chat_settings

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "sampling_seed")


def word_tokenizer() -> TextTokenizer:
    tok = Tokenizer(WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return TextTokenizer(tok, "words")


def composed(name: str, overrides: list[str] = ()):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("name", ["infer", "chat"])
def test_yaml_leaves_the_defaults_to_the_dataclass(name):
    on_disk = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert [k for k in SAMPLING_KEYS if k in on_disk] == []
    settings = (infer_settings if name == "infer" else chat_settings)(composed(name))
    assert settings.sampling == SamplingParams() == SamplingParams(0.0, 0, 1.0, None)
    assert Settings().sampling == ChatDefaults().sampling == SamplingParams()


def test_command_line_keys_still_set_it_and_the_sampling_seed_is_its_own_key():
    cfg = composed("infer", ["temperature=0.8", "top_k=5", "top_p=0.95", "sampling_seed=3", "seed=9"])
    s = infer_settings(cfg)
    assert s.sampling == SamplingParams(temperature=0.8, top_k=5, top_p=0.95, seed=3)
    assert s.pipeline.seed == 9  # the random init's seed, not the sampler's
    assert infer_settings(composed("infer", ["seed=9"])).sampling.seed is None
    chat = chat_settings(composed("chat", ["temperature=0.7", "top_p=0.9"]))
    assert (chat.sampling.temperature, chat.sampling.top_p, chat.max_new_tokens) == (0.7, 0.9, 128)


def test_the_old_seed_for_sampling_with_given_weights_is_warned_about_naming_sampling_seed():
    from loguru import logger

    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="WARNING")
    try:
        for overrides in (["seed=9", "temperature=0.8", "checkpoint=/runs/x"],         # warned
                          ["seed=9", "temperature=0.8", "+model.pretrained=/models/x"],  # warned
                          ["seed=9", "temperature=0.8"],                # seeds the random init: its job
                          ["seed=9", "checkpoint=/runs/x"],             # greedy: no sampling to seed
                          ["temperature=0.8", "checkpoint=/runs/x"]):   # seed left alone
            infer_settings(composed("infer", overrides))
    finally:
        logger.remove(sink)
    warned = [m for m in said if "sampling_seed=9" in m]
    assert len(warned) == 2 and "seed=9 only seeds a random init" in warned[0]


def test_wire_round_trip_keeps_every_field_and_the_protocols_names():
    p = SamplingParams(temperature=0.9, top_k=40, top_p=0.92, seed=123456789)
    wire = p.to_wire()
    assert list(wire) == list(WIRE_FIELDS) == [f.name for f in fields(SamplingParams)]
    assert set(WIRE_FIELDS) <= set(REQUEST_FIELDS)  # what stage 0 and the later stages check on arrival
    assert SamplingParams.from_wire(json.loads(json.dumps(wire))) == p
    # JSON may carry a whole-number float as an int: from_wire gives the same types back
    assert SamplingParams.from_wire({"temperature": 1, "top_k": 0, "top_p": 1, "seed": 5}) == SamplingParams(1.0, 0, 1.0, 5)


def test_an_unset_seed_is_drawn_once_and_sent():
    fresh = SamplingParams(temperature=1.0)
    a, b = fresh.to_wire()["seed"], fresh.to_wire()["seed"]
    assert isinstance(a, int) and 0 <= a < 2**31 and isinstance(b, int)
    resolved = fresh.resolved()
    assert resolved.seed is not None and resolved.resolved() is resolved
    assert SamplingParams.from_wire(resolved.to_wire()) == resolved


@pytest.mark.parametrize("body, expected", [
    ({}, SamplingParams(1.0, 0, 1.0, None)),  # OpenAI's own defaults: temperature 1, top_p 1
    ({"temperature": 0.3, "top_p": 0.8, "top_k": 7, "seed": 11}, SamplingParams(0.3, 7, 0.8, 11)),
    ({"temperature": 0.7, "top_p": 0.0}, SamplingParams(0.0, 0, 1.0, None)),  # top_p=0 leaves one token: greedy
    ({"temperature": 0}, SamplingParams(0.0, 0, 1.0, None)),
])
def test_from_an_openai_request(body, expected):
    req = CompletionRequest(model="m", prompt="hello world", **body)
    parsed = parse_completion(req, ModelLimits("m", context=64, vocab_size=3), word_tokenizer())
    assert parsed.settings.sampling == expected
    assert SamplingParams.from_openai(req.temperature, req.top_p, req.top_k, req.seed) == expected


@pytest.mark.parametrize("bad, key, hint", [
    ({"temperature": -0.5}, "temperature=-0.5", "0 (greedy) or a positive number"),
    ({"temperature": float("nan")}, "temperature=nan", "0 (greedy) or a positive number"),
    ({"top_k": -1}, "top_k=-1", "0 (off) or a positive integer"),
    ({"top_p": 0.0}, "top_p=0.0", "(0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5", "(0, 1]"),
    ({"seed": -3}, "seed=-3", "[0, 2**63)"),
])
def test_bad_values_are_refused_in_one_line(bad, key, hint):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**bad).check()
    msg = str(e.value)
    assert msg.startswith(key) and hint in msg and "\n" not in msg


def test_a_bad_override_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"^top_p=2\.0 is invalid: it must be in \(0, 1\]"):
        infer_settings(composed("infer", ["top_p=2.0"]))
    with pytest.raises(ConfigError, match=r"^temperature=-1\.0 is invalid"):
        chat_settings(composed("chat", ["temperature=-1"]))
    for name, settings in (("infer", infer_settings), ("chat", chat_settings)):  # named as given, not seed=
        with pytest.raises(ConfigError, match=r"^sampling_seed=-1 is invalid: use an integer in \[0, 2\*\*63\)"):
            settings(composed(name, ["sampling_seed=-1"]))


def test_the_schemas_import_it_without_torch():
    """A bad override or --help answers before torch loads, though the schemas import SamplingParams."""
    code = "import sys, smolcluster.inference.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
