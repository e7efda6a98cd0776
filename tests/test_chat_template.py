"""Chat with a model that has a chat template: the page and the API render conversations with it.

The model directory is what ``huggingface-cli download`` leaves for an instruct model, built
offline: a seeded random GPT-2 (``save_pretrained``) beside a BPE tokenizer wrapped in
``PreTrainedTokenizerFast`` with a ChatML template (``save_pretrained`` writes
``chat_template.jinja``), and a ``generation_config.json`` listing two EOS ids. The
reference for the prompt is ``transformers``' own ``apply_chat_template``; the reference
for the answer is ``transformers``' greedy ``generate`` from those ids, cut at the first
end-of-turn id.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smolcluster.inference import InferencePipeline
from smolcluster.inference.settings import Pipeline
from smolcluster.models.gpt2 import build_gpt2
from smolcluster.serving.app import WebServer, build_app
from smolcluster.serving.config import chat_template
from smolcluster.serving.prompting import (
    ChatTemplate,
    PromptTooLong,
    Transcript,
    build_chat_prompt,
    render,
)
from smolcluster.serving.sessions import ChatDefaults, Sessions

VOCAB, CONTEXT, MAX_NEW = 400, 256, 24
MODEL = "tiny-instruct"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m.role == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
CONVERSATIONS = [
    [("system", "You are terse."), ("user", "What is a list?")],
    [("user", "Name a keyword."), ("assistant", "def"), ("user", "Another one, please.")],
    [("system", "Answer in code."), ("user", "How do I open a file?")],
    [("user", "What does yield do?")],
]


def as_dicts(messages: list[tuple[str, str]]) -> list[dict]:
    return [{"role": r, "content": t} for r, t in messages]


def save_tokenizer(d: Path, template: str = CHATML):
    """A byte-level BPE (with ChatML's control tokens) as a Hugging Face tokenizer with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from pydoc_data.topics import topics

    tok.train_from_iterator(list(topics.values())[:200], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # eos_token is <|endoftext|>: the template's <|im_end|> must be found as its end of turn all the same
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 chat_template=template)
    hf.save_pretrained(str(d))
    return hf


def greedy(model, ids: list[int], n: int = MAX_NEW) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def pick_eos(outs: list[list[int]], never: set[int], decode) -> tuple[int, int, list[int]]:
    """Two token ids, each the first end of a different answer in ``outs`` (and absent from the other's
    answer before it), so one answer stops at the first and another at the second: (a, b, [x, y, i, j]).
    The text before each stop does not end inside a character (the stream holds such bytes back)."""
    def first(out, t):
        return out.index(t) if t in out else len(out)

    for x, ox in enumerate(outs):
        for y, oy in enumerate(outs):
            if x == y:
                continue
            for i in range(2, len(ox)):
                a = ox[i]
                if first(ox, a) != i or decode(ox[:i]).endswith("\ufffd") or set(ox[:i + 1]) & never:
                    continue
                for j in range(2, len(oy)):
                    b = oy[j]
                    if (b != a and first(oy, b) == j and first(oy, a) > j and first(ox, b) > i
                            and not decode(oy[:j]).endswith("\ufffd") and not set(oy[:j + 1]) & never):
                        return a, b, [x, y, i, j]
    raise AssertionError("no two answers end on different tokens: change the seed or the conversations")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The model directory, its greedy answers to CONVERSATIONS, and the two EOS ids its generation_config lists."""
    d = tmp_path_factory.mktemp("instruct")
    hf_tok = save_tokenizer(d)
    torch.manual_seed(0)
    model = build_gpt2(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, n_positions=CONTEXT).eval()
    with torch.no_grad():  # GPT-2's 0.02 init makes a random model repeat one token; this one varies
        for w in model.parameters():
            if w.dim() >= 2:
                w.normal_(0.0, 0.5)
    model.config.bos_token_id = model.config.eos_token_id = hf_tok.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(str(d))
    prompts = [hf_tok.apply_chat_template(as_dicts(c), add_generation_prompt=True)["input_ids"]
               for c in CONVERSATIONS]
    outs = [greedy(model, p) for p in prompts]
    specials = {hf_tok.convert_tokens_to_ids(t) for t in SPECIALS}
    decode = Tokenizer.from_file(str(d / "tokenizer.json")).decode  # as the pipeline decodes
    a, b, (x, y, i, j) = pick_eos(outs, specials, decode)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, b]}))
    return {"dir": d, "tok": hf_tok, "decode": decode, "prompts": prompts, "outs": outs, "eos": [a, b],
            "stops": {x: i, y: j}}


# -- the template, without a pipeline ----------------------------------------------------------------------
def test_the_template_is_found_in_either_file_and_its_end_of_turn_ends_answers(chat_model, tmp_path):
    d, tok = chat_model["dir"], chat_model["tok"]
    t = ChatTemplate.load(d)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # every EOS id of generation_config.json, the tokenizer's eos_token, and the template's end of turn
    assert t.end_ids == (*chat_model["eos"], tok.eos_token_id, im_end)
    assert (d / "chat_template.jinja").is_file()

    old = tmp_path / "old-layout"  # the template inside tokenizer_config.json, as older models ship it
    shutil.copytree(d, old)
    (old / "chat_template.jinja").unlink()
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    assert ChatTemplate.load(old).render(CONVERSATIONS[0]) == t.render(CONVERSATIONS[0])

    bare = tmp_path / "no-template"
    shutil.copytree(d, bare)
    (bare / "chat_template.jinja").unlink()
    assert ChatTemplate.load(bare) is None and ChatTemplate.load(tmp_path / "empty") is None


def test_rendered_ids_equal_apply_chat_template_and_oldest_turns_go_first(chat_model):
    tok, t = chat_model["tok"], ChatTemplate.load(chat_model["dir"])
    for c in CONVERSATIONS:
        p = build_chat_prompt(c, t)
        assert p.ids == tok.apply_chat_template(as_dicts(c), add_generation_prompt=True)["input_ids"]
        assert p.text == tok.apply_chat_template(as_dicts(c), add_generation_prompt=True, tokenize=False)
    msgs = [("system", "S"), ("user", "a " * 20), ("assistant", "b " * 20), ("user", "c " * 20),
            ("assistant", "d " * 20), ("user", "last question")]
    keep = [msgs[0], *msgs[3:]]
    budget = len(tok.apply_chat_template(as_dicts(keep), add_generation_prompt=True)["input_ids"])
    p = build_chat_prompt(msgs, t, budget)
    assert p.dropped == 2 and p.ids == tok.apply_chat_template(as_dicts(keep), add_generation_prompt=True)[
        "input_ids"]
    p = build_chat_prompt(msgs, t, budget - 1)  # the next exchange goes too; the system message stays
    assert p.dropped == 4 and p.text.startswith("<|im_start|>system\nS<|im_end|>") and "d d" not in p.text
    with pytest.raises(PromptTooLong, match="conversation"):
        build_chat_prompt(msgs, t, budget, truncate=False)
    # OpenAI's "developer" role is the template's system role
    assert build_chat_prompt([("developer", "S"), ("user", "q")], t).ids == \
        build_chat_prompt([("system", "S"), ("user", "q")], t).ids


def test_a_template_that_refuses_a_conversation_is_a_clear_error(tmp_path):
    t = ChatTemplate(save_tokenizer(tmp_path, NO_SYSTEM))
    assert "<|im_start|>user\nhi" in build_chat_prompt([("user", "hi")], t).text
    with pytest.raises(ValueError, match="chat template refuses this conversation: System role not supported"):
        build_chat_prompt([("system", "S"), ("user", "hi")], t)


def test_the_chat_finds_the_template_of_the_model_it_serves(chat_model, tmp_path):
    d = chat_model["dir"]

    def cfg(**kw):
        return Pipeline(**{"checkpoint": None, "model": {"name": "gpt2-tiny", "pretrained": None}, **kw})

    assert chat_template(cfg(model={"name": "x", "pretrained": str(d)})).end_ids == ChatTemplate.load(d).end_ids
    run = tmp_path / "run"  # a fine-tuned HF model's run: its hf/ directory holds the tokenizer files
    shutil.copytree(d, run / "hf")
    assert chat_template(cfg(checkpoint=str(run))) is not None
    assert chat_template(cfg(checkpoint=str(tmp_path / "plain-run"))) is None
    assert chat_template(cfg()) is None  # a random init: the transcript


# -- served: the API and the page -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(chat_model):
    d = chat_model["dir"]
    sessions = Sessions(lambda: InferencePipeline.start_local(d, stages=2, heartbeat_s=0.2, liveness_s=5.0),
                    chat_template=ChatTemplate.load(d)).start()
    try:
        server = WebServer(build_app(sessions, MODEL, ChatDefaults(max_new_tokens=MAX_NEW), ui=False)).start()
    except BaseException:
        sessions.close()
        raise
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield sessions, http
    server.stop()
    sessions.close()


def chat(http: httpx.Client, messages: list[tuple[str, str]], **kw) -> dict:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": as_dicts(messages), "temperature": 0,
                                                "max_tokens": MAX_NEW, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_api_renders_with_the_template_and_stops_at_every_eos_id(served, chat_model):
    sessions, http = served
    decode, outs = chat_model["decode"], chat_model["outs"]
    assert sessions.chat_format.end_ids[:2] == tuple(chat_model["eos"])
    for k, conv in enumerate(CONVERSATIONS):
        w = chat(http, conv)
        answer = w["choices"][0]["message"]["content"]
        assert w["usage"]["prompt_tokens"] == len(chat_model["prompts"][k])  # the template's ids, not a transcript
        stop = chat_model["stops"].get(k)
        if stop is None:
            continue
        # greedy, so the answer is transformers' own, cut where one of generation_config's EOS ids came
        assert outs[k][stop] in chat_model["eos"]
        assert answer == decode(outs[k][:stop]) and w["choices"][0]["finish_reason"] == "stop"
        assert w["usage"]["completion_tokens"] == stop + 1  # the EOS token counts, as OpenAI counts it
        streamed = http.post("/v1/chat/completions", json={"model": MODEL, "messages": as_dicts(conv),
                                                           "temperature": 0, "max_tokens": MAX_NEW, "stream": True})
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer
    assert sorted(outs[k][s] for k, s in chat_model["stops"].items()) == sorted(chat_model["eos"])  # both stopped one


def test_the_page_renders_the_conversation_as_the_api_does(served, chat_model):
    """The page's own answer function (what the browser's Send runs) against the API, same conversation."""
    from smolcluster.serving.chat_ui import build_chat_ui

    sessions, http = served
    demo = build_chat_ui(sessions, ChatDefaults(max_new_tokens=MAX_NEW), MODEL)
    respond = next(f.fn for f in demo.fns.values() if f.name == "respond")
    for conv in CONVERSATIONS[:3]:
        system = conv[0][1] if conv[0][0] == "system" else ""
        history = as_dicts([m for m in conv[:-1] if m[0] != "system"])
        *_, (final, _, stats) = respond(conv[-1][1], history, system, 0.0, 1.0, MAX_NEW, None)
        api = chat(http, conv)
        assert final[-1] == {"role": "assistant", "content": api["choices"][0]["message"]["content"]}
        assert f"{api['usage']['completion_tokens']} tokens" in stats


def test_models_report_the_architecture_and_context(served):
    _, http = served
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["architecture"] == "gpt2"
    assert card["context_length"] == CONTEXT and card["vocab_size"] == VOCAB


def test_without_a_template_the_transcript_is_unchanged(chat_model):
    """A model without a template: the same prompt as before templates existed."""
    fmt = Transcript(chat_model["tok"].encode)
    p = build_chat_prompt(CONVERSATIONS[1], fmt)
    assert p.text == "User: Name a keyword.\nAssistant: def\nUser: Another one, please.\nAssistant:"
    assert p.text == render(CONVERSATIONS[1]) and fmt.end_ids == () and "\nUser:" in fmt.stops
