"""The prefix cache (``serve.prefix_cache``): a prompt that starts with served tokens prefills only the rest.

Through 2 real stage processes on loopback, a tiny random-init Llama saved with ``save_pretrained``: a chat's
next turn (the first turn's prompt, its answer, a new message) reuses the cached blocks on both stages, as their
``/metrics`` count, and its greedy tokens equal the same pipeline's with the cache off and ``transformers``'
generate; requests sharing a prefix batched together each equal their reference; the same prompt through a LoRA
adapter and through the base model never shares KV (equal to ``peft``); a KV budget too small for two
conversations evicts the least recently used blocks and still answers right; ``top`` shows the hits; with the head
on the last stage the next turn reuses the answer's blocks too. In process: the block chain, a block's copy of a
cache, a store whose request is gone reported (a stage then has stage 0 forget the block), room made for a request
that cannot fit anyway evicting nothing, malformed ops, intros and senders refused with the cache unchanged.
"""

from __future__ import annotations

import json

import httpx
import pytest

from smolcluster.inference import InferencePipeline
from smolcluster.inference.prefix import chain, root_key
from tests.conftest import wait_until
from tests.test_lora_serve import ADAPTERS, base_model, peft_greedy, prompt, save_adapter

BLOCK = 16
STAGE = dict(stages=2, heartbeat_s=0.1, liveness_s=5.0, eos_ids=[], prefix_block=BLOCK)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model dir, the alpha adapter's dir)."""
    root = tmp_path_factory.mktemp("prefix")
    base_model().save_pretrained(root / "model")
    kw, seed = ADAPTERS["alpha"]
    return root / "model", save_adapter(base_model(), root / "alpha", seed, **kw)


@pytest.fixture(scope="module")
def cached(model, tmp_path_factory):
    """The pipeline with the cache on (each stage serving /metrics), and its stages' /metrics URLs."""
    run_dir = tmp_path_factory.mktemp("prefix-run")
    telemetry = {"prometheus_port": 0, "run_dir": str(run_dir), "run_id": "prefix"}
    with InferencePipeline.start_local(model[0], adapters={"alpha": str(model[1])}, telemetry=telemetry,
                                       **STAGE) as pipe:
        assert wait_until(lambda: len(list((run_dir / "endpoints").glob("*stage*.json"))) == 2, 30)
        urls = [json.loads(p.read_text())["url"] for p in sorted((run_dir / "endpoints").glob("*stage*.json"))]
        yield pipe, urls, run_dir


@pytest.fixture(scope="module")
def uncached(model):
    with InferencePipeline.start_local(model[0], prefix_cache=False, **STAGE) as pipe:
        yield pipe


def scrape(urls: list[str]) -> list[dict[str, float]]:
    """Each stage's prefix-cache figures from its /metrics."""
    names = {"smolcluster_prefix_hits_total": "hits", "smolcluster_prefix_tokens_saved_total": "saved",
             "smolcluster_prefix_cache_bytes": "bytes"}
    out = []
    for url in urls:
        lines = httpx.get(url, timeout=10).text.splitlines()
        out.append({names[ln.split("{")[0]]: float(ln.split()[-1]) for ln in lines if ln.split("{")[0] in names})
    return out


def settled(urls: list[str], want: dict) -> list[dict]:
    """Wait until every stage's /metrics shows ``want`` (hits and saved) and return what they show."""
    seen = []

    def check() -> bool:
        seen[:] = scrape(urls)
        return all(s.get("hits") == want["hits"] and s.get("saved") == want["saved"] for s in seen)

    assert wait_until(check, 30), f"the stages' /metrics never showed {want}: {seen}"
    return seen


def test_a_chats_next_turn_reuses_the_cached_prefix_with_the_same_tokens(cached, uncached, model):
    from smolcluster.top import SERVING_COLUMNS, ClusterView, serving_row_of

    pipe, urls, run_dir = cached
    first = prompt(1, 70)
    answer = pipe.submit(first, max_new_tokens=10).tokens()
    assert answer == uncached.submit(first, max_new_tokens=10).tokens()
    settled(urls, {"hits": 0, "saved": 0})  # nothing to reuse yet
    # The next turn: the first prompt, its answer and a new message (92 tokens). 79 positions of the first were
    # cached (its last token is never fed back): 4 whole blocks of 16, 64 tokens, on each stage.
    turn = first + answer + prompt(2, 12)
    again = pipe.submit(turn, max_new_tokens=12).tokens()
    assert again == uncached.submit(turn, max_new_tokens=12).tokens() == peft_greedy(model[0], None, turn, 12)
    stages = settled(urls, {"hits": 1, "saved": 64})
    assert all(s["bytes"] > 0 for s in stages), stages
    # Batched together, prompts sharing the next turn's prefix each equal their uncached run.
    prompts = [turn + again + prompt(10 + i, 3 + 5 * i) for i in range(3)]
    reqs = [pipe.submit(p, max_new_tokens=6) for p in prompts]
    assert [r.tokens() for r in reqs] == [uncached.submit(p, max_new_tokens=6).tokens() for p in prompts]
    # each reused the 103 positions of the turn it continues: 6 blocks, 96 tokens
    settled(urls, {"hits": 4, "saved": 64 + 3 * 96})
    view, rows = ClusterView(run_dir=run_dir), []

    def hits_in_top() -> list[str]:  # top's column, per stage
        rows[:] = [dict(zip(SERVING_COLUMNS, serving_row_of(n))) for n in view.poll() if n.up]
        return [r["prefix hits"] for r in rows]

    assert wait_until(lambda: hits_in_top() == ["4", "4"], 30), rows


def test_with_the_head_on_the_last_stage_the_next_turn_reuses_the_answers_blocks_too(model, uncached):
    # head=last: the tokens are picked on the last stage, and stage 0 (which keys the blocks) learns them from
    # each step's results. 40 prompt tokens and a 40-token answer leave 79 positions cached: 4 blocks, 64 tokens
    # (the prompt's alone would be 2 blocks, 32), each keyed by the tokens it really holds.
    first = prompt(1, 40)
    with InferencePipeline.start_local(model[0], head="last", **STAGE) as pipe:
        info = lambda key: [pipe.client.mesh.peers[s].info.get(key) for s in pipe.client.stages]  # noqa: E731
        answer = pipe.submit(first, max_new_tokens=40).tokens()
        turn = first + answer + prompt(2, 5)
        again = pipe.submit(turn, max_new_tokens=4).tokens()
        assert wait_until(lambda: info("prefix_hits") == [1, 1], 10), info("prefix_hits")
        assert info("prefix_tokens") == [64, 64]
    assert [answer, again] == [uncached.submit(first, max_new_tokens=40).tokens(),
                               uncached.submit(turn, max_new_tokens=4).tokens()]


def test_an_adapter_and_the_base_model_never_share_kv(cached, model):
    pipe, urls, _ = cached
    before = scrape(urls)[0]
    ids = prompt(3, 50)
    base = pipe.submit(ids, max_new_tokens=8).tokens()
    alpha = pipe.submit(ids, max_new_tokens=8, adapter="alpha").tokens()
    assert base == peft_greedy(model[0], None, ids, 8)
    assert alpha == peft_greedy(model[0], model[1], ids, 8) != base
    # neither found the other's blocks: no hit (a shared key would have been one, and alpha's tokens wrong)
    settled(urls, {"hits": before["hits"], "saved": before["saved"]})
    assert pipe.submit(ids, max_new_tokens=8, adapter="alpha").tokens() == alpha  # its own blocks: a hit
    settled(urls, {"hits": before["hits"] + 1, "saved": before["saved"] + 48})


def test_a_budget_too_small_for_two_conversations_evicts_the_least_recently_used(model, uncached):
    a, b = prompt(4, 80), prompt(5, 80)
    # The fullest stage holds 2 of the 3 blocks at 256 bytes a position: 0.05 MB is 204 positions. A request of
    # 80 + 8 reserves 88 and leaves 79 positions cached (4 blocks); b then evicts a's blocks, the deepest first,
    # to fit beside its request, and again for each of its own 5 blocks: 2 of a's (32 tokens) stay.
    budget = 0.05
    with InferencePipeline.start_local(model[0], kv_cache_mb=budget, **STAGE) as pipe:
        info = lambda key: [pipe.client.mesh.peers[s].info.get(key) for s in pipe.client.stages]  # noqa: E731
        want = [uncached.submit(p, max_new_tokens=8).tokens() for p in (a, b, a)]
        assert [pipe.submit(p, max_new_tokens=8).tokens() for p in (a, b, a)] == want
        # a again found its first 2 blocks, not the 64 tokens it would reuse were nothing evicted
        assert wait_until(lambda: info("prefix_tokens") == [32, 32], 10), info("prefix_tokens")
        assert info("prefix_hits") == [1, 1]
        assert all(0 < n <= budget * 2**20 for n in info("prefix_bytes")), info("prefix_bytes")


def test_block_keys_chain_the_prefix_and_the_adapter():
    root, other = root_key({"weights": "w"}, ""), root_key({"weights": "w"}, "alpha")
    ids = list(range(32))
    k1 = chain(root, ids[:16])
    assert chain(root, ids[:16]) == k1 != chain(other, ids[:16])  # the same tokens through an adapter: another key
    assert chain(k1, ids[16:]) != chain(root, ids[16:])  # a block's key depends on every block before it


def test_blocks_copy_a_caches_positions_and_a_store_for_a_request_gone_is_reported():
    import torch

    from smolcluster.inference.prefix import PrefixCache
    from smolcluster.pipeline.architectures import KVCache

    cache, kv = KVCache(2), torch.randn(2, 1, 2, 40, 8)  # 2 blocks, 40 positions of (1, heads 2, n, 8)
    for j in range(2):
        cache.append(j, kv[j].clone(), kv[1 - j].clone())
    cache.length = 40
    prefix = PrefixCache(16)
    assert prefix.apply([["s", "k0", "r", 0], ["s", "k1", "r", 1], ["s", "k2", "gone", 2]], {"r": cache}) == ["k2"]
    assert prefix.nbytes == 2 * 2 * 2 * (16 * 2 * 8 * 4)  # 2 blocks x 2 layers x (keys, values)
    fresh = KVCache(2)
    prefix.load(["k0", "k1"], fresh)
    assert fresh.length == 32 and (prefix.hits, prefix.saved) == (1, 32)
    for (k, v), (k0, v0) in zip(fresh.layers, cache.layers):
        assert torch.equal(k, k0[:, :, :32]) and torch.equal(v, v0[:, :, :32])
    prefix.apply([["e", "k1"]], {})
    assert prefix.match(["k0", "k1"]) == 1 and prefix.nbytes == 2 * 2 * (16 * 2 * 8 * 4)
    prefix.clear()  # (a stage was lost): empty, its totals kept
    assert (len(prefix.blocks), prefix.nbytes, prefix.hits, prefix.saved) == (0, 0, 1, 32)


def stage0(budget: int, reserved: int, blocks: int):
    """Stage 0's admission state in process (1 byte a position, one stage) with ``blocks`` blocks of 16 cached,
    their keys k0, k1, ..."""
    import types

    import torch

    from smolcluster.inference.prefix import PrefixCache
    from smolcluster.inference.stage import StageServer
    from smolcluster.pipeline.architectures import KVCache

    s = types.SimpleNamespace(kv_budget=budget, reserved=[reserved], kv_per_token=[1], requests={},
                              prefix=PrefixCache(16))
    s.kv_fits = types.MethodType(StageServer.kv_fits, s)
    s.make_room = types.MethodType(StageServer.make_room, s)
    cache = KVCache(1)
    cache.append(0, torch.randn(1, 1, 16 * blocks, 4), torch.randn(1, 1, 16 * blocks, 4))
    cache.length = 16 * blocks
    for i in range(blocks):
        s.prefix.store(f"k{i}", cache, i)
    return s


def test_make_room_evicts_nothing_for_a_request_that_cannot_fit_anyway():
    # 1000 positions, 900 reserved by a running request, 3 blocks (48) cached: 200 more never fit
    s = stage0(1000, 900, 3)
    assert not s.make_room([200])
    assert list(s.prefix.blocks) == ["k0", "k1", "k2"] and s.prefix.ops == []
    # 60 fit once 1 block is gone (52 free + 16): the least recently used one, k0, and only it
    assert s.make_room([60])
    assert list(s.prefix.blocks) == ["k1", "k2"] and s.prefix.ops == [["e", "k0"]]
    # kept blocks are never evicted: 90 would need all 2, but k2 is kept
    assert not s.make_room([90], {"k2"}) and list(s.prefix.blocks) == ["k1", "k2"]


def test_malformed_prefix_ops_intros_and_senders_are_refused_and_the_cache_is_unchanged():
    import types

    import torch

    from smolcluster.errors import PeerError
    from smolcluster.inference.prefix import PrefixCache
    from smolcluster.inference.stage import StageServer, check_intro
    from smolcluster.pipeline.architectures import KVCache

    cache = KVCache(1)
    cache.append(0, torch.randn(1, 1, 48, 4), torch.randn(1, 1, 48, 4))
    cache.length = 48  # 3 whole blocks of 16
    prefix = PrefixCache(16)
    prefix.apply([["s", "k0", "r", 0]], {"r": cache})
    one = prefix.nbytes
    prefix.store("k0", cache, 0)  # stored again: replaced, counted once
    assert prefix.nbytes == one == 16 * 4 * 4 * 2
    for bad in (["s", "k3", "r", 3], ["s", "k9", "r", -1], ["s", "k1", "r", True], ["s", "k1", 7, 1],
                ["s", "k1", "r"], ["e", ["k0"]], ["e", "k0", 1], ["x", "k0"], "e", None):
        with pytest.raises(PeerError, match="malformed"):
            prefix.apply([["e", "k0"], ["s", "k2", "r", 2], bad], {"r": cache})  # good ops first, the bad one last
        assert list(prefix.blocks) == ["k0"] and prefix.nbytes == one, bad
    # an intro naming keys that are not str, or blocks reaching its prompt's last token
    good = {"head": "h", "max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "eos": [],
            "prompt_len": 33, "adapter": "", "prefix": ["a", "b"]}
    check_intro("r1", good, "stage-0", 16)
    for keys in (["a", 5], ["a", "b", "c"]):
        with pytest.raises(PeerError, match="prefix="):
            check_intro("r1", {**good, "prefix": keys}, "stage-0", 16)
    # ops only from the previous stage, forgets only from a stage
    s = types.SimpleNamespace(me="s1", names=["s0", "s1", "s2"], sc=types.SimpleNamespace(rank=1, n_stages=3),
                              prefix=prefix)
    for kind, src, fields in (("mp.prefix", "s2", {"ops": [["e", "k0"]]}), ("mp.prefix", "h1", {"ops": [["e", "k0"]]}),
                              ("mp.forget", "h1", {"keys": ["k0"]}), ("mp.forget", "s2", {"keys": [["k0"]]})):
        with pytest.raises(PeerError, match=src):
            StageServer.handle(s, types.SimpleNamespace(kind=kind, src=src, fields=fields))
        assert list(prefix.blocks) == ["k0"], (kind, src)
