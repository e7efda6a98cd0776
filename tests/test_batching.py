"""Continuous batching: requests share each stage's forward, and none can tell.

In process, every family: requests of different prompt lengths prefilled (in chunks) and decoded
in shared steps (:class:`Batch`), joining and leaving at different steps, give each request's solo greedy
tokens, token for token, and logits within 1e-4 of its solo run. Through real stage processes on
loopback (GPT-2, 2 stages, and Qwen3 with the head on the last stage): 8 concurrent greedy
requests equal their solo runs; seeded sampling is
the same alone and in a batch; a request cancelled mid-batch leaves every stage's active set while
the others go on and finish unchanged; the KV-cache budget full -> requests wait, then run.
"""

from __future__ import annotations

import time

import pytest
import torch

from smolcluster import checkpoint
from smolcluster.inference import InferencePipeline
from smolcluster.inference.sampling import SamplingParams, next_token
from smolcluster.models.gpt2 import build_gpt2
from smolcluster.pipeline.architectures import KVCache
from smolcluster.pipeline.architectures.base import Batch
from tests.conftest import wait_until
from tests.test_architectures import CASES, build, stages_of

VOCAB, CONTEXT = 500, 1024


def prompt(seed: int, n: int, vocab: int = VOCAB) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def solo(stage, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    cache, x, out, logits = KVCache(len(stage.blocks)), torch.tensor([ids]), [], []
    for _ in range(n):
        h = stage.run_blocks(stage.embed(x, cache.length), cache)
        logits.append(stage.logits(h, last_only=True)[0, -1])
        out.append(next_token(logits[-1], SamplingParams(), None))
        x = torch.tensor([[out[-1]]])
    return out, logits


def batched(stage, prompts: list[list[int]], lengths: list[int], joins: list[int], chunk: int = 4):
    """Request i joins at step joins[i], feeds its prompt ``chunk`` tokens a step (chunked prefill) and
    leaves after lengths[i] tokens; every step is one forward over the rows of every request running."""
    caches = [KVCache(len(stage.blocks)) for _ in prompts]
    pending = {i: list(p) for i, p in enumerate(prompts)}  # the rows each request has still to feed
    out = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    step = 0
    while any(len(o) < n for o, n in zip(out, lengths)):
        running = [i for i in range(len(prompts)) if joins[i] <= step and len(out[i]) < lengths[i]]
        step += 1
        if not running:
            continue
        rows = {i: pending[i][:chunk] for i in running}
        batch = Batch([caches[i] for i in running], [len(rows[i]) for i in running])
        ids = torch.tensor([[t for i in running for t in rows[i]]])
        h = stage.run_blocks(stage.embed(ids, batch.positions()), batch)
        last = stage.logits(h[:, batch.last_rows(), :])[0]
        for k, i in enumerate(running):
            pending[i] = pending[i][chunk:]
            if pending[i]:
                continue  # more of its prompt to feed: no token yet
            logits[i].append(last[k])
            out[i].append(next_token(last[k], SamplingParams(), None))
            pending[i] = [out[i][-1]]
    return out, logits


@pytest.mark.parametrize("case", list(CASES))
def test_every_family_decodes_a_batch_as_each_request_alone(tmp_path, case):
    model = build(case)
    model.save_pretrained(tmp_path)
    (stage,), _ = stages_of(tmp_path, 1)
    vocab = model.config.vocab_size
    prompts = [prompt(i, n, vocab) for i, n in enumerate([3, 17, 9, 1, 25])]
    lengths, joins = [12, 5, 20, 9, 14], [0, 0, 2, 3, 7]  # join and leave at different steps
    with torch.inference_mode():
        alone = [solo(stage, p, n) for p, n in zip(prompts, lengths)]
        together = batched(stage, prompts, lengths, joins)
    assert together[0] == [a[0] for a in alone]
    worst = max((b - a).abs().max().item() for (_, la), lb in zip(alone, together[1]) for a, b in zip(la, lb))
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """GPT-2 (4 layers, 1024 positions) over 2 stage processes; 1 KB of KV cache per position on each
    stage, and a 2 MB budget: 2 requests of 708 positions fit at once, not 3."""
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    hf = build_gpt2(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=64, n_positions=CONTEXT).eval()
    checkpoint.save(d, hf, None, 0)
    with InferencePipeline.start_local(d, n_head=4, stages=2, head="first", heartbeat_s=0.1, liveness_s=5.0,
                                       eos_ids=[], kv_cache_mb=2, prefill_chunk=16) as p:
        yield p


def beacons(p: InferencePipeline, key: str) -> list:
    return [p.client.mesh.peers[s].info.get(key) for s in p.client.stages]


def test_eight_concurrent_greedy_requests_each_equal_their_solo_run(pipe):
    # Prompts of 3..38 tokens (the longer ones prefill in chunks of 16 between decode steps).
    prompts = [prompt(i, 3 + 5 * i) for i in range(8)]
    lengths = [5 + 3 * i for i in range(8)]
    alone = [pipe.submit(p, max_new_tokens=n).tokens() for p, n in zip(prompts, lengths)]
    reqs = [pipe.submit(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
    assert [r.tokens() for r in reqs] == alone
    assert [len(a) for a in alone] == lengths
    # Seeded sampling: the request's own generator, whatever else is in the batch.
    kw = dict(temperature=0.9, top_k=50, top_p=0.95)
    sampled = [pipe.submit(p, max_new_tokens=12, seed=100 + i, **kw).tokens() for i, p in enumerate(prompts[:4])]
    mixed = [pipe.submit(p, max_new_tokens=12, seed=100 + i, **kw) for i, p in enumerate(prompts[:4])]
    mixed += [pipe.submit(p, max_new_tokens=9) for p in prompts[4:]]  # greedy neighbours
    assert [r.tokens() for r in mixed[:4]] == sampled
    assert len({tuple(s) for s in sampled}) == 4


def test_a_request_cancelled_mid_batch_frees_every_stage_while_the_others_finish_unchanged(pipe):
    prompts = [prompt(50 + i, 6 + i) for i in range(2)]
    alone = [pipe.submit(p, max_new_tokens=700).tokens() for p in prompts]
    reqs = [pipe.submit(p, max_new_tokens=700) for p in prompts]
    victim = pipe.submit(prompt(60, 8), max_new_tokens=300)
    for i, _ in enumerate(victim):
        if i == 4:
            break
    victim.cancel()
    others = {r.id for r in reqs}

    def freed() -> bool:  # gone from every stage while the others still run there
        active = beacons(pipe, "active")
        return all(a is not None and victim.id not in a and others & set(a) for a in active)

    assert wait_until(freed, 30.0), beacons(pipe, "active")
    assert [r.tokens() for r in reqs] == alone
    assert wait_until(lambda: beacons(pipe, "kv_bytes") == [0, 0]), beacons(pipe, "kv_bytes")


def test_a_full_kv_budget_queues_requests_and_serves_them_later(pipe):
    # 4 requests of 8 + 700 positions: 2 fit the 2 MB budget, 2 wait for room.
    reqs = [pipe.submit(prompt(70 + i, 8), max_new_tokens=700) for i in range(4)]
    assert all(len(r.tokens()) == 700 for r in reqs)
    first_done = min(r.finished_at for r in reqs[:2])
    assert all(r.first_token_at >= first_done for r in reqs[2:])  # they started once one had left
    assert wait_until(lambda: beacons(pipe, "kv_bytes") == [0, 0] and beacons(pipe, "waiting")[0] == 0)


def test_a_stage_streams_tokens_held_back_together_each_with_the_time_it_was_made(tmp_path):
    torch.manual_seed(1)
    hf = build_gpt2(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=128).eval()
    checkpoint.save(tmp_path, hf, None, 0)
    ids = prompt(7, 5)
    with InferencePipeline.start_local(tmp_path, n_head=2, stages=2, eos_ids=[], heartbeat_s=0.1,
                                       stream_interval_ms=0) as p:
        alone = p.submit(ids, max_new_tokens=40).tokens()
    # An interval longer than the request: the first token comes at once, the other 39 with the last.
    with InferencePipeline.start_local(tmp_path, n_head=2, stages=2, eos_ids=[], heartbeat_s=0.1,
                                       stream_interval_ms=60_000) as p:
        r = p.submit(ids, max_new_tokens=40)
        seen = [(tok.id, time.perf_counter()) for tok in r]
    assert [t for t, _ in seen] == alone and r.finish_reason == "length"
    # Token 1 travelled with token 39, so it was seen only once that one had been made ...
    assert seen[1][1] >= r.token_at[-1]
    # ... yet each keeps its own time: made one after another, not all at the moment they arrived. (Only within
    # the one message: the head dates a message's tokens from its own arrival, so token 0, alone in an earlier
    # message, carries that message's delivery delay; under load it can date after tokens 1-5 were made.)
    assert r.token_at[1:] == sorted(r.token_at[1:]) and len(set(r.token_at[1:])) == 39


@pytest.mark.parametrize(("turns", "head"), [(True, "first"), (True, "last"), (False, "first")])
def test_stages_taking_turns_run_one_step_of_every_request_else_one_group_per_stage(tmp_path, turns, head):
    """Co-located stages of a large model take turns (forced here on a small one): each step carries every
    running request. Otherwise stage 0 sends them round as one group per stage, so both stages work at
    once. Either way each request equals its solo run."""
    torch.manual_seed(2)
    hf = build_gpt2(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=128).eval()
    checkpoint.save(tmp_path, hf, None, 0)
    prompts = [prompt(120 + i, 3) for i in range(8)]
    with InferencePipeline.start_local(tmp_path, n_head=2, stages=2, head=head, eos_ids=[], heartbeat_s=0.1,
                                       turns=turns) as p:
        rows = 8 * (3 + 40 - 1)  # 8 requests' prompt tokens and fed-back tokens, each once through stage 1

        def stage1_steps(total_rows: int) -> int:  # stage 1's steps, once its heartbeat shows all those rows
            assert wait_until(lambda: beacons(p, "rows")[1] == total_rows), beacons(p, "rows")
            return beacons(p, "steps")[1]

        alone = [p.submit(q, max_new_tokens=40).tokens() for q in prompts]
        steps_alone = stage1_steps(rows)
        reqs = [p.submit(q, max_new_tokens=40) for q in prompts]
        assert [r.tokens() for r in reqs] == alone
        steps = stage1_steps(2 * rows)
    per_step = rows / (steps - steps_alone)
    # 8 decodes a step (the first steps may carry fewer, as requests arrive), or at most ceil(8 / 2) = 4
    # (plus the prompts' rows, once each)
    assert (per_step > 6) if turns else (per_step < 4.5), per_step


def test_a_llama_pipeline_with_the_head_last_batches_eight_requests_as_each_alone(tmp_path):
    model = build("qwen3")  # Llama-shaped, with grouped-query heads and q/k norms; untied head on the last stage
    model.save_pretrained(tmp_path)
    vocab = model.config.vocab_size
    prompts = [prompt(90 + i, 2 + 4 * i, vocab) for i in range(8)]
    lengths = [4 + 2 * i for i in range(8)]
    with InferencePipeline.start_local(tmp_path, stages=2, head="last", heartbeat_s=0.1, liveness_s=5.0, eos_ids=[],
                                       prefill_chunk=8) as p:
        alone = [p.submit(q, max_new_tokens=n).tokens() for q, n in zip(prompts, lengths)]
        reqs = [p.submit(q, max_new_tokens=n) for q, n in zip(prompts, lengths)]
        assert [r.tokens() for r in reqs] == alone
        # Ended on the last stage (length): it freed them too, no stage keeps their caches
        assert wait_until(lambda: beacons(p, "requests") == [0, 0] and beacons(p, "kv_bytes") == [0, 0], 10), \
            (beacons(p, "requests"), beacons(p, "kv_bytes"))


@pytest.mark.parametrize("keep", [None, 5])
def test_the_kv_cache_grows_by_doubling_to_its_limit_and_attends_over_exactly_what_a_cat_would_keep(keep):
    g = torch.Generator().manual_seed(3)
    cache = KVCache(1, limit=100)
    ks, vs, capacities = [], [], []
    for n in [7] + [1] * 92:  # a 7-token prompt, then decodes: 99 positions, within the limit
        k, v = torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)
        k_all, v_all = cache.append(0, k, v, keep=keep)
        held_before = sum(t.shape[2] for t in ks)
        ks.append(k), vs.append(v)
        want_k, want_v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        if keep is not None:  # the window: the `keep` latest earlier keys, then the new ones
            first = max(0, held_before - keep)
            want_k, want_v = want_k[:, :, first:], want_v[:, :, first:]
        assert torch.equal(k_all, want_k) and torch.equal(v_all, want_v)
        capacities.append(cache.keys[0].shape[2])
        assert cache.nbytes() == 2 * capacities[-1] * 2 * 4 * 4  # reported: the capacity held, K and V
    if keep is None:
        assert sorted(set(capacities)) == [32, 64, 100]  # doubled, then capped at the reserved positions
    else:
        assert max(capacities) <= 32 and cache.held(0) == keep
