"""Speculative decoding with ``head=last``, and the draft model's KV cache in stage 0's budget.

With the LM head on the last stage, stage 0 still proposes (it holds the schedule and each request's
tokens): the proposals travel with the step, the last stage checks them and says how many it kept,
and stage 0 cuts the rest from every stage's cache. Through 2 real stage processes on loopback:
greedy output equals decoding without speculation token for token, with both drafters, batched;
sampling through a draft model that is the target keeps every proposal (so the draft's
probabilities reached the last stage intact: as point masses most would be rejected) and a seed's
tokens are its own, run after run (through 3 stages: the middle one hands the proposals on). Then
the budget: a request whose target KV fits but whose draft model's does not is refused naming the
draft (and served with lookup), one of a single new token is reserved no draft KV; two that fit
one at a time take turns, where two lookups run together; cancelling a running or waiting one makes
room; stage 0 reports the draft's caches (beacon and /metrics), with either head. After requests
end on the last stage, no stage keeps them or their KV; a draft model that fails on stage 0 fails
its requests, not the stage.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from smolcluster.inference import InferencePipeline
from smolcluster.models.gpt2 import gpt2_config
from smolcluster.pipeline.architectures import family_for
from tests.conftest import wait_until
from tests.test_architectures import VOCAB, build
from tests.test_speculate import K, both_drafters_equal_plain, drafter, repeating


def every_stage_freed(pipe: InferencePipeline) -> bool:
    """Every stage's beacon shows no request and no KV bytes left (the last stage included: with head=last it
    frees its own ended requests). Waited for: the beacons come with heartbeats."""
    beacons = lambda: [pipe.client.mesh.peers[s].info for s in pipe.client.stages]  # noqa: E731
    freed = lambda: all(b.get("requests") == 0 and b.get("kv_bytes") == 0 for b in beacons())  # noqa: E731
    return wait_until(freed, 10) or pytest.fail(f"requests or KV left on a stage: {beacons()}")


@pytest.mark.parametrize("case", ["gpt2", "llama", "mistral-window"])
def test_greedy_speculation_with_the_head_last_equals_plain_decoding(tmp_path, case):
    target, small = tmp_path / "target", tmp_path / "small"
    build(case).save_pretrained(target)
    drafter(case, 1).save_pretrained(small)
    with InferencePipeline.start_local(target, stages=2, head="last", heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "lookup": 3, "draft": str(small)}) as pipe:
        assert pipe.client.head_rank == 1
        drafted, accepted = both_drafters_equal_plain(pipe)
        every_stage_freed(pipe)
    assert 0 < accepted < drafted, (accepted, drafted)  # some kept (lookup), most cut (the 1-layer draft)


def test_sampling_with_the_head_last_keeps_a_draft_that_is_the_target_and_its_seed(tmp_path):
    model = tmp_path / "model"
    build("llama").save_pretrained(model)
    # 3 stages: the middle one hands the proposals and q on
    with InferencePipeline.start_local(model, stages=3, head="last", heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "lookup": 3, "draft": str(model)}) as pipe:
        greedy = pipe.submit(repeating(5), max_new_tokens=30)
        assert greedy.tokens() == pipe.submit(repeating(5), max_new_tokens=30, speculate="off").tokens()
        assert (greedy.drafted, greedy.accepted) == (23, 23)  # as with head=first (test_speculate)
        # Sampled: q (the draft's probabilities) equals the target's p, so every proposal is kept, u * q(d) < p(d)
        # (had q reached the last stage as point masses, q(d) = 1, a proposal would be kept with p(d) < 1 only).
        kw = dict(max_new_tokens=30, temperature=0.9, seed=11)
        first = pipe.submit(repeating(6), **kw)
        assert len(first.tokens()) == 30 and first.drafted > 10 and first.accepted == first.drafted
        assert pipe.submit(repeating(6), **kw).tokens() == first.tokens()  # a seed's tokens are its own
        looked = [pipe.submit(repeating(6), speculate="lookup", **kw) for _ in range(2)]
        assert looked[0].tokens() == looked[1].tokens() and looked[0].drafted > 0
        every_stage_freed(pipe)


def kv_bytes(model, n_stages: int, positions: int, head_first: bool) -> list[int]:
    """Each stage's KV bytes for ``positions`` of ``model`` (fp32), split as the stages split it."""
    arch = family_for(model.config.to_dict())
    return [positions * arch.kv_bytes_per_token(len(s.blocks), 4) for s in arch.plan(n_stages, head_first=head_first)]


@pytest.mark.parametrize("head", ["first", "last"])
def test_the_draft_models_kv_cache_is_in_stage_0s_budget(tmp_path, head):
    target, small = tmp_path / "target", tmp_path / "small"
    model = build("gpt2")
    model.save_pretrained(target)
    torch.manual_seed(1)
    from transformers import GPT2LMHeadModel

    draft = GPT2LMHeadModel(gpt2_config(VOCAB, n_layer=2, n_head=4, n_embd=64, n_positions=128)).eval()
    draft.save_pretrained(small)
    prompt, n = repeating(1), 100
    positions = len(prompt) + n
    t = kv_bytes(model, 2, positions, head == "first")
    d = kv_bytes(draft, 1, positions, True)[0]
    assert t[0] + d > max(t), (t, d)  # the target fits a budget of max(t); with the draft, stage 0 does not
    kw = dict(stages=2, head=head, heartbeat_s=0.05, liveness_s=30.0, eos_ids=[], prefix_cache=False,
              speculate={"k": K, "lookup": 3, "draft": str(small)})
    with InferencePipeline.start_local(target, kv_cache_mb=max(t) / 2**20, **kw) as pipe:
        with pytest.raises(Exception, match=r"on stage 0 \(.* of it the draft model's, speculate.draft"):
            pipe.submit(prompt, max_new_tokens=n, speculate="draft").tokens()
        assert len(pipe.submit(prompt, max_new_tokens=n, speculate="lookup").tokens()) == n
        # One new token leaves no room for a proposal: no draft KV is reserved for it, so as many positions fit.
        assert len(pipe.submit(repeating(1, 12, 10), max_new_tokens=1, speculate="draft").tokens()) == 1

    # One request with its draft fits, two do not (two lookups do): they take turns, the lookups run together.
    budget = max(t[0] + d, 2 * max(t))
    assert 2 * (t[0] + d) > budget
    telemetry = {"prometheus_port": 0, "run_dir": str(tmp_path / "serve"), "run_id": "draft-kv"}
    with InferencePipeline.start_local(target, kv_cache_mb=budget / 2**20, telemetry=telemetry, **kw) as pipe:
        from smolcluster.top import ClusterView

        info = lambda: pipe.client.mesh.peers[pipe.client.stages[0]].info  # noqa: E731
        view = ClusterView(run_dir=tmp_path / "serve")
        stage0 = lambda: next((x for x in view.poll() if x.up and x.labels["rank"] == "0"), None)  # noqa: E731
        seen, phase, done = {"draft": [], "cancel": [], "lookup": []}, ["draft"], threading.Event()
        gauge = []  # stage 0's /metrics draft gauge while the draft requests run

        def watch():  # stage 0's beacon as the requests run (the figures /metrics and top show)
            while not done.is_set():
                seen[phase[0]].append((info().get("draft_kv_bytes", 0), info().get("waiting", 0)))
                done.wait(0.005)

        def scrape():
            while not done.is_set() and phase[0] != "lookup":
                node = stage0()
                gauge.append(node.values.get("draft_kv_bytes", 0) if node is not None else 0)
                done.wait(0.005)

        watchers = [threading.Thread(target=f, daemon=True) for f in (watch, scrape)]
        for w in watchers:
            w.start()
        try:
            a, b = (pipe.submit(prompt, max_new_tokens=n, speculate="draft") for _ in range(2))
            assert a.tokens() == b.tokens() and len(a.tokens()) == n
            assert wait_until(lambda: info().get("draft_kv_bytes") == 0, 10), info()  # freed with them
            cancelled_draft_requests_make_room(pipe, info, phase, prompt, n, a.tokens())
            phase[0] = "lookup"
            c, e = (pipe.submit(prompt, max_new_tokens=n, speculate="lookup") for _ in range(2))
            assert c.tokens() == e.tokens() == a.tokens()
        finally:
            done.set()
            for w in watchers:
                w.join()
        # the second draft request waited for the first's KV (its draft's included); the lookups never waited
        assert max(w for _, w in seen["draft"]) == 1 and max(w for _, w in seen["lookup"]) == 0, seen
        assert 0 < max(k for k, _ in seen["draft"] + seen["cancel"]) <= d, (seen, d)  # within what was reserved
        assert max(k for k, _ in seen["lookup"]) == 0
        assert max(gauge, default=0) > 0, f"/metrics never showed the draft's KV while it ran ({len(gauge)} scrapes)"
        assert wait_until(lambda: info().get("kv_bytes") == 0, 10), info()
        assert wait_until(lambda: stage0() is not None and stage0().values.get("draft_kv_bytes") == 0, 30)


def cancelled_draft_requests_make_room(pipe, info, phase, prompt, n, tokens):
    """With room for one draft request: x runs, y and z wait. Cancelling z (waiting) leaves y waiting; cancelling x
    (running, its draft cache made) admits y, which makes the same tokens; then no draft KV is left (x's went)."""
    phase[0] = "cancel"
    stage1 = pipe._children.procs["stage 1"].pid
    for _attempt in range(3):
        x, y, z = (pipe.submit(prompt, max_new_tokens=n, speculate="draft") for _ in range(3))
        for i, _ in enumerate(x):
            if i == 2:  # tokens 1 and 2 came from steps that proposed: x's draft cache is made
                break
        # Stage 1 frozen holds x where it is (a pass needs both stages): on a busy machine x could otherwise finish
        # before z's cancel is seen, admitting y, and "y still waits" would never be observed. Stage 0, which keeps
        # the queue and answers the beacon, runs on.
        os.kill(stage1, signal.SIGSTOP)
        try:
            # The premise: x still runs. The stages may have finished it while this client read token 2 (a busy
            # machine schedules the reader late); then x's end arrives here, and the scene is set again.
            assert wait_until(lambda x=x: info().get("waiting") == 2 or x.finished_at is not None, 10), info()
            held = x.finished_at is None
            if held:
                z.cancel()
                assert wait_until(lambda: info().get("waiting") == 1, 10), info()
                x.cancel()
                assert len(x.ids) < n, "x ended before its cancel: nothing here was cancelled while it ran"
        finally:
            os.kill(stage1, signal.SIGCONT)
        if held:
            break
        assert y.tokens() == z.tokens() == tokens  # (all three ran to their end)
    else:
        pytest.fail("in 3 attempts x finished before stage 1 could be frozen")
    assert wait_until(lambda: info().get("waiting") == 0 and x.id not in info().get("active", []), 10), info()
    assert y.tokens() == tokens
    assert wait_until(lambda: info().get("draft_kv_bytes") == 0, 10), info()


def test_a_draft_model_that_fails_fails_its_requests_and_the_stage_goes_on(tmp_path):
    """A draft model of NaN weights: sampling its proposals raises on stage 0 (torch.multinomial refuses NaN).
    The speculating request fails with a one-line error naming it; a request beside it that does not speculate
    finishes as alone, the stage serves on (lookup), and no stage keeps a request or its KV."""
    target, small = tmp_path / "target", tmp_path / "small"
    build("gpt2").save_pretrained(target)
    broken = drafter("gpt2", 1)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    broken.save_pretrained(small)
    with InferencePipeline.start_local(target, stages=2, head="last", heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       speculate={"k": K, "lookup": 3, "draft": str(small)}) as pipe:
        alone = pipe.submit(repeating(2), max_new_tokens=30, speculate="off").tokens()
        bad = pipe.submit(repeating(1), max_new_tokens=30, temperature=0.9, seed=3, speculate="draft")
        beside = pipe.submit(repeating(2), max_new_tokens=30, speculate="off")
        with pytest.raises(Exception, match="failed proposing \\(speculate\\): RuntimeError"):
            bad.tokens()
        assert beside.tokens() == alone
        assert len(pipe.submit(repeating(1), max_new_tokens=30, speculate="lookup").tokens()) == 30
        every_stage_freed(pipe)
