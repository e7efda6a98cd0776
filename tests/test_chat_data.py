"""``data=chat``: conversations rendered with the model's chat template, loss on the assistant's tokens only.

The reference for the assistant spans is ``transformers``' own ``return_assistant_tokens_mask``, over a
ChatML template whose assistant turns are marked ``{% generation %}``; the model directory is built
offline (a BPE tokenizer with that template beside a random-init Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from smolcluster.data import chat
from smolcluster.errors import DataError
from smolcluster.models.hf import build_causal_lm
from smolcluster.paths import CONFIG_DIR
from smolcluster.serving.prompting import ChatTemplate
from smolcluster.train_settings import train_config
from smolcluster.trainer import Trainer
from tests.test_chat_template import save_tokenizer

CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MULTI_TURN = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Name a keyword."},
              {"role": "assistant", "content": "def"},
              {"role": "user", "content": "Another one, please."},
              {"role": "assistant", "content": "return, and then yield"}]
SHORT = [{"role": "user", "content": "What does yield do?"}, {"role": "assistant", "content": "It pauses."}]


def instruct_dir(d: Path) -> Path:
    """A random-init one-layer Llama (hidden 32) with a ChatML tokenizer whose template marks the assistant turns."""
    tok = save_tokenizer(d, CHATML_GENERATION)
    torch.manual_seed(0)
    build_causal_lm("llama", vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128).save_pretrained(d)
    return d


def write_chat(path: Path, copies: int = 4) -> Path:
    """A JSONL file of ``copies`` times the multi-turn and the short conversation."""
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [MULTI_TURN, SHORT] * copies))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return instruct_dir(tmp_path_factory.mktemp("instruct"))


def test_the_labels_are_exactly_the_assistant_spans_of_apply_chat_template(model_dir):
    fmt = ChatTemplate.load(model_dir)
    ids, labels = chat.encode(fmt, [(m["role"], m["content"]) for m in MULTI_TURN])
    ref = fmt.tokenizer.apply_chat_template(MULTI_TURN, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    mask = ref["assistant_masks"]
    assert sum(mask) > 4 and [lab != chat.IGNORE for lab in labels] == [bool(m) for m in mask]
    assert all(lab == i for lab, i in zip(labels, ids) if lab != chat.IGNORE)
    answer = fmt.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert answer == "def<|im_end|>\nreturn, and then yield<|im_end|>\n"  # both turns, each with its end of turn


def test_a_malformed_line_is_refused_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": SHORT})
    for bad, why in [("{not json", "Expecting"), (json.dumps({"messages": SHORT[:1]}), "no assistant message"),
                     (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "no role"),
                     (json.dumps({"prompt": "x"}), "no \"messages\"")]:
        path.write_text(f"{good}\n\n{bad}\n{good}\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:3: .*{why}"):
            chat.read_conversations(path)


def test_rows_pad_cut_drop_and_pack_as_configured():
    a = ([1, 2, 3, 4, 5, 6], [chat.IGNORE, chat.IGNORE, 3, 4, chat.IGNORE, 6])
    b = ([7, 8, 9], [chat.IGNORE, 8, 9])
    x, y = chat.rows([a, b], 4, packing=False, truncation="cut", pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [7, 8, 0, 0]]
    assert y.tolist() == [[chat.IGNORE, 3, 4, chat.IGNORE], [8, 9, chat.IGNORE, chat.IGNORE]]
    x, y = chat.rows([a, b], 4, packing=False, truncation="drop", pad_id=0)
    assert x.tolist() == [[7, 8, 0, 0]]
    x, y = chat.rows([a, b], 4, packing=True, truncation="cut", pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert y.tolist() == [[chat.IGNORE, 3, 4, chat.IGNORE], [6, chat.IGNORE, 8, 9]]


def test_a_lora_run_on_chat_data_is_trained_on_the_assistant_tokens_only(model_dir, tmp_path):
    path = write_chat(tmp_path / "chat.jsonl")
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["algo=local", "model=llama-tiny", f"model.pretrained={model_dir}",
                                           "model.block_size=48", "data=chat", f"data.path={path}",
                                           "train.batch_size=4", "train.steps=2", "train.lora.enabled=true"])
    t = Trainer(train_config(cfg), [4], device="cpu")
    x, y = t.batch(0)
    assert (y == chat.IGNORE).any() and (y != chat.IGNORE).any()
    with torch.no_grad():
        logits = t.model(x).logits
    keep = y != chat.IGNORE  # the mean over the assistant's tokens, and nothing else
    expected = F.cross_entropy(logits[keep], y[keep])
    loss, _ = t.local_gradients(0)
    assert abs(float(loss) - float(expected)) < 1e-6
    assert t.evaluate()["eval_loss"] > 0
