"""The draft model drafting ahead (``DraftModel.ahead``) while a step is out: its proposals stay the draft's own
greedy continuation of the history, whatever ran ahead and however much of it the target rejected.

In process against ``transformers`` (the draft's greedy chain from a full forward per token), with a sliding
window (the cuts drop what ran ahead past the window's slack); through 2 stage processes, a draft that is the
target keeps every proposal, so the tokens drafted ahead are proposed, and the output equals plain decoding.
"""

from __future__ import annotations

import random

import torch

from smolcluster.inference import InferencePipeline
from smolcluster.inference.sampling import SamplingParams
from smolcluster.inference.speculate import DraftModel, Want
from tests.conftest import wait_until
from tests.test_architectures import VOCAB, build

K = 4
GREEDY = SamplingParams(0.0, 0, 1.0, 0)


def greedy_chain(model, history: list[int], n: int) -> list[int]:
    """The reference: ``n`` argmax tokens after ``history``, each from a full forward (no cache)."""
    ids = list(history)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(history):]


def test_proposals_after_drafting_ahead_and_rejections_are_the_drafts_greedy_chain(tmp_path):
    model = build("mistral-window")  # window 12: a cut past what ran ahead must leave the window's keys
    model.save_pretrained(tmp_path / "draft")
    draft = DraftModel(str(tmp_path / "draft"), model.config.to_dict(), None, K)
    rng = random.Random(0)
    history = [rng.randrange(VOCAB) for _ in range(10)]
    outcomes = {"all kept, guess right": 0, "all kept, guess wrong": 0, "one rejected": 0}
    with torch.inference_mode():
        while len(history) < 70:
            proposed, q = draft.propose([Want("r", history, K, GREEDY, None)])["r"]
            expected = greedy_chain(model, history, K + 1)
            assert q is None and proposed == expected[:K], len(history)
            for _ in range(rng.randrange(0, 2 * K + 3)):  # the step out: as many tokens ahead as time allows
                draft.ahead([("r", len(history) + 2 * K)])
            outcome = rng.choice(list(outcomes))
            outcomes[outcome] += 1
            if outcome == "all kept, guess right":  # the next proposals may be ready without a forward
                history = history + expected
            elif outcome == "all kept, guess wrong":
                history = history + expected[:K] + [(expected[K] + 1) % VOCAB]
            else:
                kept = rng.randrange(K)
                history = history + expected[:kept] + [(expected[kept] + 1) % VOCAB]
    assert min(outcomes.values()) > 0, outcomes
    assert draft.ahead_used > 0 and draft.ahead_made > draft.ahead_used, (draft.ahead_made, draft.ahead_used)


def test_a_draft_that_is_the_target_proposes_what_it_drafted_ahead_and_output_is_unchanged(tmp_path):
    model = tmp_path / "model"
    build("gpt2").save_pretrained(model)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8]]
    with InferencePipeline.start_local(model, stages=2, heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "draft": str(model)}) as pipe:
        plain = [pipe.submit(p, max_new_tokens=40, speculate="off").tokens() for p in prompts]
        reqs = [pipe.submit(p, max_new_tokens=40) for p in prompts]
        assert [r.tokens() for r in reqs] == plain
        info = lambda: pipe.client.mesh.peers[pipe.client.stages[0]].info  # noqa: E731
        assert wait_until(lambda: info().get("ahead_used", 0) > 0, 10), \
            f"stage 0's beacon never counted a proposal drafted ahead: {info()}"
    assert all(r.accepted == r.drafted > 0 for r in reqs), [(r.drafted, r.accepted) for r in reqs]
