"""Speculative decoding (``speculate.k``): the output is the target's, whatever the drafter proposes.

Through 2 real stage processes on loopback, every family the pipeline serves: greedy requests
proposing with prompt lookup and with a draft model (the target itself: every proposal kept; a
1-layer model of another seed: nearly all rejected, so the caches are cut back on every stage) give,
token for token, the tokens of the same prompt decoded without speculation, alone and batched
together. In process: speculative sampling keeps the target's distribution over a tiny vocabulary
(chi-square against the exact two-token distribution), where keeping every proposal does not, and
with head=last's two generators per request (draft_seed), where one seed for both does not; the
lookup drafter's n-grams; the cache's cut; bad settings refused in one line.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from scipy.stats import chi2

from smolcluster.errors import ConfigError
from smolcluster.inference import InferencePipeline
from smolcluster.inference.api import check_speculate
from smolcluster.inference.sampling import SamplingParams, filter_logits, make_generator
from smolcluster.inference.speculate import accept, draft_seed, lookup
from smolcluster.models.gpt2 import gpt2_config
from smolcluster.pipeline.architectures import KVCache
from tests.conftest import wait_until
from tests.test_architectures import CASES, VOCAB, build

K = 4
N_SAMPLES = 4000


def drafter(case: str, seed: int):
    """A 1-layer model of the case's family and vocabulary (another seed: its proposals mostly fail)."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    from smolcluster.models.hf import family_config

    torch.manual_seed(seed)
    if CASES[case] is None:
        return GPT2LMHeadModel(gpt2_config(VOCAB, n_layer=1, n_head=4, n_embd=32, n_positions=128)).eval()
    return AutoModelForCausalLM.from_config(family_config(**{**CASES[case], "n_layer": 1})).eval()


def repeating(seed: int, n: int = 7, times: int = 3) -> list[int]:
    """A prompt that quotes itself: n random tokens, ``times`` over (prompt lookup finds its n-grams)."""
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist() * times


def speculated(pipe: InferencePipeline) -> tuple[int, int]:
    info = pipe.client.mesh.peers[pipe.client.stages[0]].info
    return info.get("drafted", 0), info.get("accepted", 0)


# One case per family the pipeline serves (the variants differ in nothing speculation touches; the window does).
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral-window"]


@pytest.mark.parametrize("case", FAMILIES)
def test_greedy_speculation_equals_plain_decoding_for_every_family_and_drafter(tmp_path, case):
    target, small = tmp_path / "target", tmp_path / "small"
    build(case).save_pretrained(target)
    drafter(case, 1).save_pretrained(small)
    with InferencePipeline.start_local(target, stages=2, heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "lookup": 3, "draft": str(small)}) as pipe:
        drafted, accepted = both_drafters_equal_plain(pipe)
    # Some proposals kept (lookup on prompts that quote themselves), most rejected (the 1-layer draft): the
    # rejected rows were cut from both stages' caches, and the output did not change.
    assert 0 < accepted < drafted, (accepted, drafted)


def test_a_draft_model_that_is_the_target_has_every_proposal_kept_as_requests_and_top_report(tmp_path):
    from smolcluster.top import SERVING_COLUMNS, ClusterView, serving_row_of

    model, run_dir = tmp_path / "model", tmp_path / "serve"
    build("llama").save_pretrained(model)
    telemetry = {"prometheus_port": 0, "run_dir": str(run_dir), "run_id": "spec"}
    with InferencePipeline.start_local(model, stages=2, heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "draft": str(model), "adaptive": False},  # k fixed:
                                       telemetry=telemetry) as pipe:  # adaptive's k follows measured times
        plain = pipe.submit(repeating(5), max_new_tokens=30, speculate="off")
        assert plain.tokens() and plain.drafted == 0
        reqs = [pipe.submit(repeating(5), max_new_tokens=30) for _ in range(2)]
        assert [r.tokens() for r in reqs] == [plain.tokens()] * 2
        # 29 tokens after the first one (the prompt's): 5 passes of 4 proposals and 5 tokens, then one of 3 and 4
        assert [(r.drafted, r.accepted) for r in reqs] == [(23, 23)] * 2
        assert wait_until(lambda: speculated(pipe) == (46, 46), 10), speculated(pipe)
        view = ClusterView(run_dir=run_dir)
        stage0 = lambda: next((n for n in view.poll() if n.up and n.labels["rank"] == "0"), None)  # noqa: E731
        assert wait_until(lambda: stage0() is not None and stage0().values.get("drafted") == 46, 30), view.nodes
        row = dict(zip(SERVING_COLUMNS, serving_row_of(stage0())))
        assert row["accepted %"] == "100"
        # Sampled through the draft model (its proposals drawn from q, checked by accept/resample): a seed's
        # tokens are its own, run after run.
        kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7)
        first = pipe.submit(repeating(6), **kw)
        assert len(first.tokens()) == 20 and first.drafted > 0
        assert pipe.submit(repeating(6), **kw).tokens() == first.tokens()


def test_adaptive_proposals_keep_greedy_output_and_fall_when_the_draft_misses(tmp_path):
    """``speculate.adaptive``: the output is still plain decoding's, token for token, and a draft the target
    always rejects comes to propose 1 token a pass, not ``k``. (Random models of any seed tend to agree: they
    fall into loops of one token. This draft is the target with its final norm negated: its pick is the
    target's least likely token.)"""
    target, small = tmp_path / "target", tmp_path / "small"
    model = build("gpt2")
    model.save_pretrained(target)
    with torch.no_grad():
        model.transformer.ln_f.weight.neg_(), model.transformer.ln_f.bias.neg_()
    model.save_pretrained(small)
    n = 40
    with InferencePipeline.start_local(target, stages=2, heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "draft": str(small), "adaptive": True}) as pipe:
        for prompt in (repeating(1), list(range(3, 11))):
            req = pipe.submit(prompt, max_new_tokens=n, speculate="draft")
            assert req.tokens() == pipe.submit(prompt, max_new_tokens=n, speculate="off").tokens()
            passes = n - 1 - req.accepted  # each pass makes its kept proposals plus one token of the target's
            assert req.accepted == 0 and req.drafted < 2 * passes, (req.drafted, passes)  # a fixed k: 4 a pass


def test_adaptive_k_is_the_most_tokens_per_second_for_the_acceptance_and_the_proposals_cost():
    from smolcluster.inference.speculate import Pace, Speculator

    spec = Speculator({"k": 6, "lookup": 2, "adaptive": True}, {}, None)
    assert spec.choose_k(Pace(), "draft") == 6  # nothing timed yet: k
    spec.timed("pass", 4.0)
    spec.timed("draft", 2.0, 4)  # a proposal costs an eighth of a pass
    high, low, mid = Pace(), Pace(), Pace()
    for _ in range(20):
        high.update(6, 6), low.update(3, 0), mid.update(4, 2)
    assert high.rate() > 0.99 and low.rate() < 0.01 and mid.rate() == pytest.approx(2 / 3, abs=0.01)
    # a = 2/3, c = 1/8: (1 - a^(k+1)) / (1 + k/8) is 0.333, 0.494, 0.563, 0.584, 0.579, 0.561, 0.538 for k = 0..6
    assert [spec.choose_k(pace, "draft") for pace in (high, low, mid)] == [6, 0, 3]
    # never kept (a < c): plain decoding, but one pass in PROBE proposes 1 so a recovery could be seen
    assert [spec.choose_k(low, "draft") for _ in range(2 * Pace.PROBE - 1)].count(1) == 2
    spec.timed("lookup", 0.001, 4)  # nearly free: a second proposal pays even at a 1% chance of being kept
    assert [spec.choose_k(pace, "lookup") for pace in (high, low, mid)] == [6, 2, 6]
    spec.adaptive = False
    assert spec.choose_k(low, "draft") == 6


def test_a_draft_model_stops_proposing_after_a_token_it_is_not_confident_of(tmp_path):
    """``speculate.confidence``: a random model is never 0.99 sure, so it proposes one token a request; at 0, k."""
    from smolcluster.inference.sampling import SamplingParams
    from smolcluster.inference.speculate import DraftModel, Want

    build("gpt2").save_pretrained(tmp_path / "m")
    model = DraftModel(str(tmp_path / "m"), json.loads((tmp_path / "m" / "config.json").read_text()), None, K)
    with torch.inference_mode():
        for confidence, want in ((0.99, 1), (0.0, K)):
            wants = [Want(f"r{i}", repeating(i), K, SamplingParams(), None, 64) for i in range(2)]
            got = model.propose(wants, confidence)
            assert [len(d) for d, _ in got.values()] == [want, want]


def both_drafters_equal_plain(pipe: InferencePipeline, n: int = 40) -> tuple[int, int]:
    """Greedy requests with each drafter, batched together and beside one that does not speculate, make the tokens
    of decoding without speculation; stage 0's totals (proposed, kept) after them. ``n`` 40: past mistral-window's
    window of 12, so cut caches slide."""
    prompts = [repeating(1), repeating(2, 5, 4), list(range(3, 9))]
    plain = [pipe.submit(p, max_new_tokens=n, speculate="off").tokens() for p in prompts]
    assert all(len(t) == n for t in plain)
    for how in ("lookup", "draft"):
        reqs = [pipe.submit(p, max_new_tokens=n, speculate=how) for p in prompts]
        reqs.append(pipe.submit(prompts[0], max_new_tokens=n, speculate="off"))
        assert [r.tokens() for r in reqs] == plain + plain[:1], how
    assert wait_until(lambda: speculated(pipe)[0] > 0, 10), "stage 0's beacon never counted a proposal"
    return speculated(pipe)


# -- in process ------------------------------------------------------------------------------------
def test_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_ngram():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3, 2) == [7, 5]  # the latest match, not the first
    assert lookup([4, 2, 3, 8, 6, 1, 2, 3], 3, 5) == [8, 6, 1, 2, 3]  # (2, 3) when (1, 2, 3) is not found
    assert lookup([5, 6, 7, 6], 3, 4) == [7, 6]  # the 1-gram (6): fewer than k left after it
    assert lookup([1, 2, 3, 4], 2, 4) == []
    assert lookup([7], 3, 4) == []


@pytest.mark.parametrize("keep", [None, 5])
def test_a_cut_cache_attends_as_if_the_cut_positions_were_never_fed(keep):
    """Feed 9 positions, cut 3 (speculate's rejected rows), feed 3 others: the keys and values held are those
    of feeding the 6 and the 3 alone (a sliding window of ``keep`` keeps ``slack`` more, so it still holds keep)."""
    torch.manual_seed(0)
    rows = [torch.randn(1, 2, 1, 4) for _ in range(12)]
    cut, whole = KVCache(1, slack=3), KVCache(1)
    for r in rows[:9]:
        k_cut = cut.append(0, r, r, keep)[0]
        cut.length += 1
    cut.truncate(6)
    assert cut.length == 6
    for r in rows[:6] + rows[9:]:
        k_whole = whole.append(0, r, r, keep)[0]
        whole.length += 1
    for r in rows[9:]:
        k_cut = cut.append(0, r, r, keep)[0]
        cut.length += 1
    held = k_whole.shape[2]
    assert torch.equal(k_cut[:, :, -held:], k_whole)  # the window's keys; a cut cache may hold older ones too


def test_speculate_settings_are_refused_in_one_line(tmp_path):
    build("gpt2").save_pretrained(tmp_path / "gpt2")
    config = (tmp_path / "gpt2" / "config.json").read_text()
    other = drafter("llama", 0)
    other.config.vocab_size = VOCAB + 3
    other.resize_token_embeddings(VOCAB + 3)
    other.save_pretrained(tmp_path / "other")
    target = json.loads(config)
    cases = [({"k": -1, "lookup": 2}, "speculate.k=-1 is invalid"),
             ({"k": 2}, "needs a drafter: add speculate.lookup=N"),
             ({"k": 2, "lookup": -1}, "speculate.lookup=-1 is invalid"),
             ({"k": 2, "lookup": 2, "confidence": 1.0}, "speculate.confidence=1.0 is invalid"),
             ({"k": 2, "draft": str(tmp_path)}, "no config.json there"),
             ({"k": 2, "draft": str(tmp_path / "other")}, f"a vocabulary of {VOCAB + 3} tokens, the served model")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_speculate(spec, target)
    assert check_speculate({"k": 0, "lookup": 2}, target) == {}  # k=0: off


def two_token_distribution(logits_of, prompt: list[int], vocab: int) -> torch.Tensor:
    """The exact probability of each first two tokens, (vocab, vocab), from ``logits_of(context)``."""
    first = logits_of(prompt)
    return torch.stack([first[a] * logits_of(prompt + [a]) for a in range(vocab)])


@pytest.fixture(scope="module")
def tiny_pair():
    """A 6-token vocabulary, a target and a draft model that disagree: the prompt, the sampling params, and the
    target's and the draft's filtered distributions after every context a run below can reach."""
    vocab, params = 6, SamplingParams(temperature=1.0, top_k=5)
    target, draft = (build_tiny(vocab, seed) for seed in (0, 1))
    prompt = [1, 2, 3]
    probs = {}  # context -> the target's and the draft's filtered distributions after it
    with torch.inference_mode():
        for n in range(4):  # every context a run below can reach: the prompt and up to 3 more tokens
            suffixes = list(itertools.product(range(vocab), repeat=n))
            ids = torch.tensor([prompt + list(s) for s in suffixes])
            p, q = ([filter_logits(row, params).softmax(-1) for row in m(ids).logits[:, -1]] for m in (target, draft))
            probs.update({tuple(prompt) + s: pq for s, pq in zip(suffixes, zip(p, q))})
    return vocab, params, prompt, probs


def speculative_runs(tiny_pair, generators) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first two tokens of N_SAMPLES runs of passes of 2 proposals drawn from the draft, checked by accept();
    ``generators(run)``: the run's (proposing, accepting) generators. Counts of the pairs made, of the pairs
    keeping every proposal would have made, and the target's exact distribution."""
    vocab, params, prompt, probs = tiny_pair
    exact = two_token_distribution(lambda c: probs[tuple(c)][0], prompt, vocab)
    counts, naive = torch.zeros(vocab, vocab), torch.zeros(vocab, vocab)
    for run in range(N_SAMPLES):
        propose, check = generators(run)
        out, ctx, first = [], list(prompt), None
        while len(out) < 2:
            drafts, qs = [], []
            for _ in range(2):
                qs.append(probs[tuple(ctx + drafts)][1])
                drafts.append(int(torch.multinomial(qs[-1], 1, generator=propose)))
            # accept() takes logits: log p gives back p through its filter (temperature 1, top-k 5 of 6 kept)
            logits = torch.stack([probs[tuple(ctx + drafts[:i])][0].log() for i in range(3)])
            made, _ = accept(logits, drafts, torch.stack(qs), params, check)
            out += made
            ctx += made
            first = first or drafts
        counts[out[0], out[1]] += 1
        naive[first[0], first[1]] += 1  # what keeping every proposal would have made
    assert counts[exact == 0].sum() == 0, "a pair the target never makes (top-k) was made"
    return counts, naive, exact


def test_speculative_sampling_keeps_the_targets_distribution(tiny_pair):
    """2 proposals a pass: the first two tokens made, over 4,000 seeded runs, fit the target's exact distribution
    (chi-square, p > 1e-3); keeping every proposal instead (no accept/resample) is refused by the same test, so it
    can tell."""
    gen = torch.Generator().manual_seed(0)
    counts, naive, exact = speculative_runs(tiny_pair, lambda run: (gen, gen))
    stat, df = chi_square(counts, exact)
    assert stat < chi2.ppf(1 - 1e-3, df), (stat, df)
    wrong, _ = chi_square(naive, exact)
    assert wrong > chi2.ppf(1 - 1e-3, df), wrong


def test_head_last_sampling_keeps_the_targets_distribution_only_with_the_draft_seed_split(tiny_pair):
    """As with head=last: each request (run) of its own seed s, stage 0 proposing from make_generator(draft_seed(s))
    and the last stage accepting from make_generator(s): the target's distribution. Proposing from a generator of
    s itself draws the same numbers that accept() tests the proposals with, and the test refuses it."""
    seed = lambda run: 1000 + 7 * run  # noqa: E731
    split = lambda run: (make_generator(draft_seed(seed(run))), make_generator(seed(run)))  # noqa: E731
    counts, _, exact = speculative_runs(tiny_pair, split)
    stat, df = chi_square(counts, exact)
    assert stat < chi2.ppf(1 - 1e-3, df), (stat, df)
    same = lambda run: (make_generator(seed(run)), make_generator(seed(run)))  # noqa: E731
    wrong, _ = chi_square(speculative_runs(tiny_pair, same)[0], exact)
    assert wrong > chi2.ppf(1 - 1e-3, df), wrong


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the outcomes the distribution allows (top-k leaves some at 0; none may occur)."""
    allowed = probs > 0
    expected = probs[allowed] * counts.sum()
    return float(((counts[allowed] - expected) ** 2 / expected).sum()), int(allowed.sum()) - 1


def build_tiny(vocab: int, seed: int):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    config = gpt2_config(vocab, n_layer=1, n_head=2, n_embd=16, n_positions=16)
    config.initializer_range = 0.5  # far from uniform: target and draft disagree
    return GPT2LMHeadModel(config).eval()
