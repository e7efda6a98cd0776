"""``bench speculate``'s recipe: a 1-layer draft distilled from the target agrees with it more than the target's
own first layer did before the fit (the KL on text it did not train on falls); its prompts are several passages."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

from smolcluster.bench.speculate import distill_draft, prompts
from tests.test_architectures import VOCAB, build


class Bytes:
    """A tokenizer of the target's tiny vocabulary: each character's code, modulo it."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % VOCAB for c in text]


def kl_to(target, draft, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p, q = target(ids).logits.log_softmax(-1), draft(ids).logits.log_softmax(-1)
    return float(torch.nn.functional.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True,
                                            reduction="batchmean"))


def test_the_distilled_draft_fits_the_targets_next_token_distribution(tmp_path):
    target = build("gpt2")  # 3 layers
    target.save_pretrained(tmp_path / "target")
    text = "".join(chr(97 + (i * i + 3 * i) % 26) for i in range(4000))
    draft_dir = distill_draft(tmp_path / "target", text, Bytes(), tmp_path, steps=60, block=32, batch=8)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    assert draft.config.n_layer == 1
    # before the fit: the target's embeddings, first block and final norm, as distill_draft starts
    start = AutoModelForCausalLM.from_config(draft.config).eval()
    start.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("transformer.h.") or k.startswith("transformer.h.0.")})
    held_out = torch.tensor([Bytes().encode("".join(chr(97 + (i * 7) % 26) for i in range(64)))])
    before, after = kl_to(target, start, held_out), kl_to(target, draft, held_out)
    assert after < 0.5 * before, (before, after)


def test_the_prompts_are_evenly_spaced_held_out_passages_and_the_edits_quote_their_start():
    rng = random.Random(0)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(1000))
    got = prompts(text, Bytes(), length=40, n=4)
    ids = Bytes().encode(text)
    starts = [i * ((len(ids) - 40) // 4) for i in range(4)]
    assert got["draft"] == [ids[s: s + 40] for s in starts] and len({tuple(p) for p in got["draft"]}) == 4
    for passage, edit in zip(got["draft"], got["lookup"]):
        assert edit == passage + Bytes().encode("\n\n") + passage[:10]


def test_the_cost_table_times_every_component_of_a_pass(tmp_path):
    """``--costs``: each stage's blocks at 1 and k+1 rows, the LM head, a draft proposal and acceptance, in CPU ms."""
    from smolcluster.bench.speculate import component_costs

    build("gpt2").save_pretrained(tmp_path / "target")  # 3 layers: stage 0 gets 1, stage 1 the other 2
    build("gpt2").save_pretrained(tmp_path / "draft")
    rows = component_costs(tmp_path / "target", tmp_path / "draft", list(range(3, 19)), k=3)
    names = [r["component"] for r in rows]
    assert names[:4] == ["stage 0: blocks, 1 row (a decode step)", "stage 0: blocks, 4 rows (a verify pass)",
                         "stage 1: blocks, 1 row (a decode step)", "stage 1: blocks, 4 rows (a verify pass)"]
    assert any(n.startswith("draft model") for n in names) and any(n.startswith("accept") for n in names)
    assert all(r["cpu_ms"] > 0 for r in rows), rows
