"""Compiled decode steps (``compile=true``, :mod:`smolcluster.inference.compiled`): the same tokens as eager.

Through 2 real stage processes on loopback, for a tiny random-init Llama (GQA): a pipeline whose
stages compile their decode step gives every greedy request the very tokens of the same model's eager
pipeline, alone and with three requests at once (two hold the compiled slots; the third finds none and decodes
eagerly, and so do the steps it shares with the others), and both stages' beacons count the compiled steps. In
process: a step of one row padded to a two-row graph after an eager prefill into the slot gives the eager tokens,
and a slot is freed for the next request; steps with a request the graph does not cover (one without a slot,
another's prompt chunk) run wholly eagerly on the slot's memory and the graph takes over again after, each
request with its eager tokens, and kv_bytes counts a slot's written positions; a GPT-2 and a Qwen3 stage's compiled decode give their eager tokens,
their blocks a group at a time, one graph per group size;
adapters and sliding windows are refused in one line (before any stage starts, too); a head
waits longer for compiling stages and says so; the bench's compile arm refuses what it cannot time.

The first run compiles (minutes on a busy 2-core machine); later runs load the graphs from inductor's disk cache.
"""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from torch._dynamo.utils import counters

from smolcluster.errors import ConfigError
from smolcluster.inference import InferencePipeline
from smolcluster.inference.api import check_compile
from smolcluster.inference.compiled import CompiledDecode, pool_tokens
from smolcluster.pipeline.architectures import KVCache
from smolcluster.pipeline.architectures.base import Batch
from tests.conftest import wait_until
from tests.test_architectures import build, stages_of
from tests.test_batching import prompt

STAGE = dict(stages=2, heartbeat_s=0.1, liveness_s=5.0, eos_ids=[], connect_timeout_s=1200.0)


# Llama (GQA, RoPE) through real stages; GPT-2 (learned positions, fused QKV) in process below: each compiled
# graph costs tens of seconds on a busy 2-core runner, so the multi-process test compiles one family's.
@pytest.fixture(scope="module", params=["llama"])
def pipes(request, tmp_path_factory):
    """(the compiled pipeline, the eager one, the vocabulary) of one tiny model."""
    d = tmp_path_factory.mktemp(request.param)
    model = build(request.param, n_layer=2)  # a block per stage: each graph is a cold compile on CI (multi-block
    # graphs are compiled in process below)
    model.save_pretrained(d)
    with InferencePipeline.start_local(d, compile=True, compile_slots=2, **STAGE) as compiled, \
            InferencePipeline.start_local(d, **STAGE) as eager:
        yield compiled, eager, model.config.vocab_size


def compiled_steps(p: InferencePipeline) -> list[int]:
    return [p.client.mesh.peers[s].info.get("compiled_steps") or 0 for s in p.client.stages]


def test_compiled_stages_decode_the_eager_tokens_alone_and_batched(pipes):
    compiled, eager, vocab = pipes
    prompts = [prompt(i, n, vocab) for i, n in enumerate([1, 5, 12])]
    lengths = [20, 31, 9]
    want = [eager.submit(p, max_new_tokens=n).tokens() for p, n in zip(prompts, lengths)]
    assert [compiled.submit(p, max_new_tokens=n).tokens() for p, n in zip(prompts, lengths)] == want
    # Every step of one row per request ran compiled on each stage: the decodes after each first token
    # (19 + 30 + 8) and the one-token prompt's prefill.
    assert wait_until(lambda: compiled_steps(compiled) == [58, 58], 10), compiled_steps(compiled)
    before = compiled_steps(compiled)[0]
    together = [compiled.submit(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
    assert [r.tokens() for r in together] == want
    # The 31-token request holds a slot: its decodes ran compiled but for the steps it shared with the slotless
    # third (9 tokens: at most its prefill and 8 decodes), which ran eagerly. (In process: mixed steps.)
    assert wait_until(lambda: compiled_steps(compiled)[0] >= before + 30 - 9, 10), (before, compiled_steps(compiled))
    assert compiled_steps(eager) == [0, 0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-one")
    build("llama", n_layer=2).save_pretrained(d)  # two blocks: a graph over several, at the least compile time
    return d


@pytest.fixture(scope="module")
def llama_stage(llama_dir):
    (stage,), _ = stages_of(llama_dir, 1)
    return stage


def greedy(stage, ids: list[int], n: int, cache: KVCache, compiled: CompiledDecode | None) -> list[int]:
    x = stage.run_blocks(stage.embed(torch.tensor([ids]), 0), cache)  # the prefill: eager on either path
    out = [int(stage.logits(x)[0, -1].argmax())]
    for _ in range(n - 1):
        batch = Batch([cache], [1])
        x = stage.embed(torch.tensor([[out[-1]]]), batch.positions())
        x = compiled.run(x, batch) if compiled is not None else stage.run_blocks(x, batch)
        out.append(int(stage.logits(x)[0, -1].argmax()))
    return out


def test_a_padded_step_and_a_reused_slot_decode_the_eager_tokens(llama_stage):
    stage = llama_stage
    with torch.inference_mode():
        compiled = CompiledDecode(stage, 1, 64, torch.float32, "cpu", buckets=[2])  # 1 row: padded to 2
        compiled.warm("test")
        for seed in (1, 2):  # the second request gets the slot the first freed
            ids = prompt(seed, 7, stage.shape.vocab_size)
            want = greedy(stage, ids, 24, KVCache(len(stage.blocks), 64), None)
            cache = compiled.cache(len(stage.blocks), 64, 0)
            assert cache is not None and compiled.cache(len(stage.blocks), 64, 0) is None  # one slot only
            assert greedy(stage, ids, 24, cache, compiled) == want
            compiled.release(cache)
        assert compiled.steps == 2 * 23
        assert compiled.cache(len(stage.blocks), 65, 0) is None  # longer than the slots' positions: eager
        # A request to the slot's last position: the steps attend over 8 positions up to all 64 (the graph's one
        # dynamic size), through the one graph.
        ids = prompt(3, 7, stage.shape.vocab_size)
        want = greedy(stage, ids, 58, KVCache(len(stage.blocks), 64), None)
        cache = compiled.cache(len(stage.blocks), 64, 0)
        graphs = counters["stats"]["unique_graphs"]
        assert greedy(stage, ids, 58, cache, compiled) == want and cache.length == 64
        assert compiled.steps == 2 * 23 + 57 and counters["stats"]["unique_graphs"] == graphs
        compiled.release(cache)
        # A shape the warm-up did not compile (1 row; run() pads it to 2) is compiled when it comes, through dynamo
        # (with a warning), and gives the eager rows.
        cache, ref = compiled.cache(len(stage.blocks), 64, 0), KVCache(len(stage.blocks), 64)
        x = stage.embed(torch.tensor([ids]), 0)
        stage.run_blocks(x, cache)
        stage.run_blocks(x, ref)
        x = stage.embed(torch.tensor([[5]]), 7)
        got = compiled.step(x, torch.tensor([7]), torch.tensor([cache.slot]), 8)
        assert torch.allclose(got, stage.run_blocks(x, Batch([ref], [1])), atol=1e-5)
        assert compiled.warmed and compiled.missed == 1 and counters["stats"]["unique_graphs"] == graphs + 1
        compiled.release(cache)
        mixed_steps_run_eagerly_on_the_slot(stage, compiled)


def mixed_steps_run_eagerly_on_the_slot(stage, compiled: CompiledDecode):
    """Request a holds the one slot, b none: b's prompt is prefilled in a's first decode step, then both decode
    in the same steps, wholly eagerly (a's rows in its slot's memory); once b is gone, a's steps go through the
    graph again. Each request gets its eager tokens."""
    n, vocab = len(stage.blocks), stage.shape.vocab_size
    ids = [prompt(4, 6, vocab), prompt(5, 9, vocab)]
    want = [greedy(stage, p, 17, KVCache(n, 64), None) for p in ids]
    a, b = compiled.cache(n, 64, 0), KVCache(n, 64)
    x = stage.run_blocks(stage.embed(torch.tensor([ids[0]]), 0), a)
    got = [[int(stage.logits(x)[0, -1].argmax())], []]
    before = compiled.steps
    batch = Batch([a, b], [1, len(ids[1])])  # a's decode beside b's whole prompt
    x = stage.embed(torch.tensor([[got[0][-1], *ids[1]]]), batch.positions())
    logits = stage.logits(compiled.run_step(x, batch, stage.run_blocks))[0]
    got[0].append(int(logits[0].argmax()))
    got[1].append(int(logits[-1].argmax()))
    for _ in range(10):
        batch = Batch([a, b], [1, 1])
        x = stage.embed(torch.tensor([[got[0][-1], got[1][-1]]]), batch.positions())
        logits = stage.logits(compiled.run_step(x, batch, stage.run_blocks))[0]
        for g, row in zip(got, logits):
            g.append(int(row.argmax()))
    assert got[1] == want[1][:11] and compiled.steps == before  # (no step was split between the two paths)
    for _ in range(5):  # b is done: a alone, through the graph, from what the eager steps wrote into its slot
        batch = Batch([a], [1])
        x = stage.embed(torch.tensor([[got[0][-1]]]), batch.positions())
        got[0].append(int(stage.logits(compiled.run_step(x, batch, stage.run_blocks))[0, -1].argmax()))
    assert got[0] == want[0] and compiled.steps == before + 5
    # kv_bytes counts a slotted request's positions (22 written), not its slot's 64, and b's own buffers.
    slot_bytes = compiled.nbytes // (compiled.slots + 1)
    assert compiled.nbytes == pool_tokens(compiled.slots, compiled.positions) * compiled.per_token  # (placement's)
    assert compiled.cache_bytes(a) == 22 * compiled.per_token == 22 * slot_bytes // 65  # (64 and a spare)
    assert compiled.cache_bytes(b) == b.nbytes() > 0
    # A cache whose buffers left the slot (a reallocation) is no longer the graph's to write.
    assert compiled.fits(a, 1) and not compiled.fits(a, 2)
    a.keys[0] = a.keys[0].clone()
    assert not compiled.fits(a, 1) and compiled.cache_bytes(a) == a.nbytes()
    compiled.release(a)


# GPT-2: learned positions, fused QKV; Qwen3: q_norm/k_norm and head_dim != hidden / heads (llama_blocks' branches).
# Compiled in groups: Qwen3's 2 blocks a block at a time through one graph; GPT-2's 5 blocks, at most 4 a group,
# as 3 + 2 through two graphs. Each group with its own weights, and no recompile while decoding (the warm-up's
# inputs are inference tensors, as serving's are: a guard on the dispatch keys would recompile at the first step).
@pytest.mark.parametrize("family,blocks,group,groups", [("gpt2", 5, 4, [3, 2]), ("qwen3", 2, 1, [1, 1])])
def test_a_stage_of_another_family_compiled_decodes_the_eager_tokens(family, blocks, group, groups, tmp_path,
                                                                      monkeypatch):
    from smolcluster.inference import compiled as compiled_module

    build(family, n_layer=blocks).save_pretrained(tmp_path)
    (stage,), _ = stages_of(tmp_path, 1)
    monkeypatch.setattr(compiled_module, "GROUP_BLOCKS", group)
    compiled = CompiledDecode(stage, 1, 64, torch.float32, "cpu", buckets=[1])
    graphs = counters["stats"]["unique_graphs"]
    compiled.warm("test")  # outside inference mode, as a stage warms before it serves (in inference mode)
    assert compiled.groups == groups and counters["stats"]["unique_graphs"] == graphs + len(set(groups))
    # Once warm, every group is called without dynamo: its graph, with this group's weights and caches in place.
    entered, through_dynamo = [], compiled.fn
    compiled.fn = lambda *args: entered.append(args) or through_dynamo(*args)
    assert sorted(compiled.graphs) == sorted((1, g) for g in set(groups))
    with torch.inference_mode():
        ids = prompt(3, 5, stage.shape.vocab_size)
        want = greedy(stage, ids, 20, KVCache(len(stage.blocks), 64), None)
        assert greedy(stage, ids, 20, compiled.cache(len(stage.blocks), 64, 0), compiled) == want
        assert compiled.steps == 19 and counters["stats"]["unique_graphs"] == graphs + len(set(groups))
        assert entered == [] and compiled.missed == 0


def test_a_graph_whose_inputs_cannot_be_placed_is_called_through_dynamo(llama_stage, monkeypatch):
    """Should dynamo pass a graph an input that is not one of the call's (a torch that lifts something else), the
    stage says so and calls that graph through dynamo, as before graphs were called directly: the same tokens."""
    from smolcluster.inference.compiled import Graph

    monkeypatch.setattr(Graph, "order_of", staticmethod(lambda *args: None))
    stage, said = llama_stage, []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="WARNING")
    with torch.inference_mode():
        compiled = CompiledDecode(stage, 1, 32, torch.float32, "cpu", buckets=[1])
        try:
            compiled.warm("test")
        finally:
            logger.remove(sink)
        assert compiled.graphs == {(1, 2): None} and any("called through dynamo" in s for s in said), said
        entered, through_dynamo = [], compiled.fn
        compiled.fn = lambda *args: entered.append(args) or through_dynamo(*args)
        ids = prompt(7, 5, stage.shape.vocab_size)
        want = greedy(stage, ids, 8, KVCache(len(stage.blocks), 32), None)
        assert greedy(stage, ids, 8, compiled.cache(len(stage.blocks), 32, 0), compiled) == want
        assert len(entered) == 7 and compiled.missed == 0  # (every step through dynamo, none a miss)


def test_weights_folded_into_a_graph_are_not_run_for_another_group(llama_stage, monkeypatch):
    """With inductor's freezing (a user's TORCHINDUCTOR_FREEZING=1, or a bench that set it), dynamo folds a group's
    weights into its graph: called directly for the next group, that graph would run the first group's weights.
    Such a graph is called through dynamo, whose guards on the weights give each group its own: the eager tokens."""
    from smolcluster.inference import compiled as compiled_module

    stage = llama_stage
    monkeypatch.setattr(compiled_module, "GROUP_BLOCKS", 1)  # 2 groups of 1 block: one graph size, two groups
    compiled = CompiledDecode(stage, 1, 32, torch.float32, "cpu", buckets=[1])
    monkeypatch.setattr(torch._inductor.config, "freezing", True)  # (after the stage set it off, as a bench might)
    with torch.inference_mode():
        compiled.warm("test")
        assert compiled.groups == [1, 1] and compiled.graphs == {(1, 1): None}
        ids = prompt(8, 5, stage.shape.vocab_size)
        want = greedy(stage, ids, 8, KVCache(len(stage.blocks), 32), None)
        assert greedy(stage, ids, 8, compiled.cache(len(stage.blocks), 32, 0), compiled) == want


def test_two_compiled_stages_in_one_process_keep_their_own_graphs(llama_stage, tmp_path):
    """A test's or a bench's process may hold stages of two models: each CompiledDecode's graphs are its own
    (isolate_recompiles), each called with its own stage's weights."""
    build("qwen2", n_layer=2).save_pretrained(tmp_path)
    (qwen,), _ = stages_of(tmp_path, 1)
    with torch.inference_mode():
        pairs = [(stage, CompiledDecode(stage, 1, 32, torch.float32, "cpu", buckets=[1])) for stage in (llama_stage, qwen)]
        for _, compiled in pairs:
            compiled.warm("test")
        for stage, compiled in pairs + pairs[::-1]:
            ids = prompt(6, 5, stage.shape.vocab_size)
            want = greedy(stage, ids, 8, KVCache(len(stage.blocks), 32), None)
            cache = compiled.cache(len(stage.blocks), 32, 0)
            assert greedy(stage, ids, 8, cache, compiled) == want and compiled.missed == 0
            compiled.release(cache)


def test_a_stage_is_compiled_in_few_groups_of_few_sizes():
    from smolcluster.inference.compiled import GROUP_BLOCKS, group_sizes

    assert GROUP_BLOCKS == 8
    # SmolLM2-135M's 30 blocks in 5 calls of a 6-block graph; its 2-stage split's 11 and 19 in groups of two sizes
    assert [group_sizes(n) for n in (0, 1, 7, 8, 12, 16, 30)] == [[], [1], [7], [8], [6, 6], [8, 8], [6] * 5]
    assert group_sizes(11) == [6, 5] and group_sizes(19) == [7, 7, 5] and group_sizes(13) == [7, 6]
    for n in range(1, 100):
        got = group_sizes(n)
        assert sum(got) == n and max(got) <= 8 and len(set(got)) <= 2 and len(got) <= 2 * -(-n // 8)


def test_what_is_not_compiled_is_refused_in_one_line(llama_dir, tmp_path):
    # Adapters are refused before any stage starts; quantized stages compile (tests/test_compiled_quant.py).
    with pytest.raises(ConfigError, match="this pipeline has LoRA adapters: set compile=false"):
        check_compile(True, {"a": "DIR"})
    from smolcluster.inference.from_config import stage_formats
    from smolcluster.inference.settings import Pipeline
    from smolcluster.train_settings import ClusterSpec

    cfg = Pipeline(stages=2, compile=True, links=ClusterSpec(nodes=[None, {"quantize": "int8"}]))  # one node's
    assert [f["quantize"] for f in stage_formats(cfg)] == ["none", "int8"]
    build("mistral-window").save_pretrained(tmp_path)
    (stage,), _ = stages_of(tmp_path, 1)
    with pytest.raises(ConfigError, match="sliding-window attention"):
        CompiledDecode(stage, 1, 64, torch.float32, "cpu")
    (llama,), _ = stages_of(llama_dir, 1)
    with pytest.raises(ConfigError, match=r"buckets \[1\]: the largest must be at least compile_slots=2"):
        CompiledDecode(llama, 2, 64, torch.float32, "cpu", buckets=[1])


def test_compile_auto_compiles_only_a_cpu_stage_large_enough_that_can_and_says_why_not(llama_stage, tmp_path):
    from smolcluster.inference.compiled import AUTO_MIN_PARAMS, block_mb, eager_reason
    from smolcluster.inference.settings import compile_mode

    assert [compile_mode(v) for v in (True, False, "True", "false", "AUTO")] == ["true", "false", "true", "false",
                                                                                 "auto"]
    with pytest.raises(ConfigError, match="compile=maybe is invalid: choose auto"):
        compile_mode("maybe")
    big, budget = AUTO_MIN_PARAMS, 1 << 30
    # A stage of the size where it pays, on this machine (g++, torch.compile's isolate_recompiles): it compiles.
    assert eager_reason(llama_stage, big, 1 << 20, budget, {}) is None
    # Each reason to stay eager, in words a user reads in the stage's startup line and /v1/models.
    assert eager_reason(llama_stage, 123_456, 1 << 20, budget, {}) == (
        "its blocks hold 0.1M parameters, under 10M: its eager step is already cheap")
    assert eager_reason(llama_stage, big, 1 << 20, budget, {"sql": "DIR"}) == "it serves LoRA adapters"
    assert "speculated rows (speculate.k)" in eager_reason(llama_stage, big, 1 << 20, budget, {}, speculates=True)
    assert "KV slots (600 MB) would take over half the KV budget (1024 MB" in eager_reason(
        llama_stage, big, 600 << 20, budget, {})
    build("mistral-window").save_pretrained(tmp_path / "window")
    (window,), _ = stages_of(tmp_path / "window", 1)
    assert eager_reason(window, big, 1 << 20, budget, {}) == "sliding-window attention (Mistral) is not compiled"
    # Heavy blocks (one GPT-2 block 1024 wide: 12 x 1024^2 weights, 48 MB in fp32) stay eager; the same block in
    # int8 (a quarter of that, and its scales) compiles.
    build("gpt2", n_layer=1, n_embd=1024, n_head=4).save_pretrained(tmp_path / "wide")
    (wide,), _ = stages_of(tmp_path / "wide", 1)
    assert 48 < block_mb(wide) < 48.1
    assert eager_reason(wide, big, 1 << 20, budget, {}) == (
        "its blocks are 48 MB each, over 16 MB: reading their weights outweighs the small ops a compile saves "
        "(quantize=int8 makes them lighter)")
    from smolcluster.pipeline.quantize import StageFormat
    from smolcluster.pipeline.weights import find_model, load_stage

    source = find_model(tmp_path / "wide")
    wide8 = load_stage(source.weights, source.config, range(1), embed=True, head=True,
                       fmt=StageFormat("fp32", "int8", 64))
    assert block_mb(wide8) < 16 and eager_reason(wide8, big, 1 << 20, budget, {}) is None
    # compile=auto with adapters is no error (those stages stay eager); true still is.
    check_compile("auto", {"a": "DIR"})
    with pytest.raises(ConfigError, match="set compile=false"):
        check_compile("True", {"a": "DIR"})


def test_compile_auto_stages_of_a_tiny_model_decode_eagerly_and_say_why(llama_dir):
    with InferencePipeline.start_local(llama_dir, compile="auto", **STAGE) as pipe:
        assert all(d.startswith("compiled decode: off (compile=auto: eager, its blocks hold ") for d in
                   pipe.model_info["decode"]), pipe.model_info
        assert len(pipe.submit(prompt(0, 4, 101), max_new_tokens=6, stop_at_eos=False).tokens()) == 6
        assert compiled_steps(pipe) == [0, 0]


def test_a_head_waits_longer_for_compiling_stages_and_says_why(monkeypatch):
    from smolcluster.errors import PeerError
    from smolcluster.inference import client
    from smolcluster.inference.api import COMPILE_CONNECT_S, connect_wait
    from smolcluster.inference.client import PipelineClient

    assert connect_wait(60.0, False) == (60.0, "") and connect_wait(60.0, True)[0] == COMPILE_CONNECT_S
    assert connect_wait(60.0, "auto")[0] == COMPILE_CONNECT_S  # a stage decides for itself: any may compile
    assert connect_wait(2000.0, True)[0] == 2000.0  # a longer wait the user gave is kept
    _, hint = connect_wait(0.3, True)
    monkeypatch.setattr(client, "WAIT_NOTICE_S", 0.2)  # (10 s in use)
    said: list[str] = []
    sink = logger.add(lambda m: said.append(m.record["message"]), level="INFO")
    try:
        with pytest.raises(PeerError, match="compile=true .*raise cluster.connect_timeout_s"):
            PipelineClient(["tcp://127.0.0.1:9"], connect_timeout_s=0.6, hint=hint)
    finally:
        logger.remove(sink)
    # while it waits, the head says once what it waits for and why that may take long
    assert [s.split(": ", 1)[1] for s in said if "still waiting" in s] == [
        "still waiting for s0 (tcp://127.0.0.1:9) after 0s (up to 1s): stages that compile their decode step "
        "answer once compiled (minutes the first time)"]


def test_the_bench_compile_arm_refuses_what_it_cannot_time_in_one_line():
    from smolcluster.bench.quantize import check_decode_formats

    check_decode_formats(["fp32/none", "fp32/none/compile", "fp32/int8", "fp32/int8/compile"], 496)
    for formats, tokens, match in ((["fp32/none/compil"], 8, "PRECISION/QUANTIZE/compile"),
                                   (["fp32/none/compile"], 497, "use --tokens at most 496")):
        with pytest.raises(ConfigError, match=match):
            check_decode_formats(formats, tokens)
