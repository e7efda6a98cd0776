"""The pipeline runtime in one process: partition, GPT-2 stages vs transformers, weights, sampling,
checkpoint shards, and the PUB/SUB mesh over real loopback sockets (handshake, sequence gaps,
high-water-mark drops, liveness, routing, malformed input)."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from smolcluster import checkpoint
from smolcluster.errors import ConfigError, PeerError
from smolcluster.flat import FlatParams
from smolcluster.inference.sampling import SamplingParams, filter_logits, make_generator, next_token
from smolcluster.models import fingerprint
from smolcluster.models.gpt2 import build_gpt2
from smolcluster.models.mlp import MLP
from smolcluster.pipeline import shards
from smolcluster.pipeline.architectures import KVCache, family_for
from smolcluster.pipeline.architectures.gpt2 import GPT2Stage, param_shapes, shape_of
from smolcluster.pipeline.mesh import Mesh, PeerLost
from smolcluster.pipeline.partition import plan, split_blocks
from smolcluster.pipeline.quantize import FloatLinear
from smolcluster.pipeline.sequential import sequential_stage
from smolcluster.pipeline.weights import find_model, load_stage, read_tensors
from tests.conftest import wait_until

VOCAB = 300


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return build_gpt2(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=32, n_positions=64)


def stages_of(hf, cuts: list[range], head_first: bool = False) -> list[GPT2Stage]:
    """Stages holding copies of the HF model's tensors, split at ``cuts``."""
    shape = shape_of(hf.config)
    params = dict(hf.named_parameters())
    out = []
    for r, blocks in enumerate(cuts):
        head = r == 0 if head_first else r == len(cuts) - 1
        s = GPT2Stage(shape, r == 0, head, blocks)
        s.load_state_dict({n: params[n].detach().clone() for n, _ in s.named_parameters()})
        out.append(s)
    return out


# -- partition ---------------------------------------------------------------------------------
def test_split_is_even_weighted_and_minimises_the_largest_share():
    assert split_blocks([1] * 12, [1, 1]) == [6, 6]
    assert split_blocks([1] * 12, [1, 2, 1]) == [3, 6, 3]
    assert split_blocks([1] * 4, [1, 1, 1, 1]) == [1, 1, 1, 1]
    assert split_blocks([1] * 10, [1, 1], first_extra=4) == [3, 7]
    # exhaustive check against brute force on a small uneven instance
    costs, weights = [3, 1, 4, 1, 5, 9, 2, 6], [1.0, 2.0, 1.0]
    best = min(
        (max(sum(costs[a:b]) / w for (a, b), w in zip(zip((0, *cut), (*cut, len(costs))), weights)), cut)
        for cut in itertools.combinations(range(1, len(costs)), 2)
    )[0]
    counts = split_blocks(costs, weights)
    bounds = np.cumsum([0, *counts])
    got = max(sum(costs[bounds[i]:bounds[i + 1]]) / weights[i] for i in range(3))
    assert got == pytest.approx(best)


def test_split_refuses_impossible_requests():
    with pytest.raises(ConfigError, match="only 2 blocks"):
        split_blocks([1, 1], [1, 1, 1])
    with pytest.raises(ConfigError, match="positive"):
        split_blocks([1, 1, 1], [1, 0])


def test_gpt2_plan_balances_memory_and_the_ring_holds_the_tied_embedding_once():
    arch = family_for({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_head": 12,
                       "n_layer": 12})
    gpt2 = arch.shape
    last = arch.plan(2, head_first=False)
    first = arch.plan(2, head_first=True)
    assert [len(s.blocks) for s in last] == [6, 6]
    assert [len(s.blocks) for s in first] == [3, 9]
    total = sum(int(np.prod(s)) for _, s in param_shapes(gpt2, True, True, range(12)))
    assert total == 124_439_808  # GPT-2 small, tied embedding counted once

    def share(specs, head_first):
        return [sum(int(np.prod(s)) for _, s in param_shapes(gpt2, sp.first, sp.rank == (0 if head_first else 1),
                                                             sp.blocks)) / total for sp in specs]

    assert max(share(last, False)) > 0.65   # both ends hold the 38.6M-parameter embedding
    assert max(share(first, True)) < 0.52   # held once: each stage holds about half


# -- GPT-2 stages against transformers -----------------------------------------------------------
def test_param_names_and_order_are_the_hf_models(hf):
    shape = shape_of(hf.config)
    assert [n for n, _ in hf.named_parameters()] == [n for n, _ in param_shapes(shape, True, True, range(4))]
    assert [tuple(p.shape) for _, p in hf.named_parameters()] == [s for _, s in param_shapes(shape, True, True, range(4))]


def test_two_stages_give_bit_identical_loss_and_gradients(hf):
    hf.train()
    torch.manual_seed(1)
    x, y = torch.randint(0, VOCAB, (3, 20)), torch.randint(0, VOCAB, (3, 20))
    hf.zero_grad()
    ref = F.cross_entropy(hf(x).logits.reshape(-1, VOCAB), y.reshape(-1))
    ref.backward()
    s0, s1 = stages_of(hf, [range(0, 1), range(1, 4)])
    h = s0(x)
    h_in = h.detach().requires_grad_()
    loss = F.cross_entropy(s1(h_in).reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    h.backward(h_in.grad)
    assert torch.equal(loss, ref)
    grads = dict((n, p.grad) for n, p in hf.named_parameters())
    for stage in (s0, s1):
        for name, p in stage.named_parameters():
            if name != "transformer.wte.weight":
                assert torch.equal(p.grad, grads[name]), name
    tied = s0.transformer.wte.weight.grad + s1.transformer.wte.weight.grad
    assert torch.equal(tied, grads["transformer.wte.weight"])


@pytest.mark.parametrize("cuts,head_first", [([range(0, 2), range(2, 4)], False),
                                             ([range(0, 1), range(1, 3), range(3, 4)], True)])
def test_kv_cached_greedy_decoding_matches_hf_generate(hf, cuts, head_first):
    hf.eval()
    stages = stages_of(hf, cuts, head_first)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=0, eos_token_id=None)[0, 7:]
    caches = [KVCache(len(c)) for c in cuts]
    ids, out = prompt, []
    with torch.inference_mode():
        for _ in range(25):
            x = stages[0].embed(ids, caches[0].length)
            for s, c in zip(stages, caches):
                x = s.run_blocks(x, c)
            head = stages[0] if head_first else stages[-1]
            token = next_token(head.logits(x, last_only=True)[0, -1], SamplingParams(), None)
            out.append(token)
            ids = torch.tensor([[token]])
    assert out == ref.tolist()
    assert caches[1].length == 7 + 24 and caches[1].nbytes() > 0


# -- weights -------------------------------------------------------------------------------------
def test_stage_reads_only_its_own_tensors_and_they_match_the_checkpoint(hf, tmp_path):
    checkpoint.save(tmp_path, hf, None, 0)
    w = find_model(tmp_path / "checkpoint.safetensors", n_head=4)
    assert family_for(w.config).shape == shape_of(hf.config)
    stage = load_stage(w.weights, w.config, range(2, 4), embed=False, head=True)
    names = {n for n, _ in stage.named_parameters()}
    assert "transformer.wpe.weight" not in names and "transformer.h.0.ln_1.weight" not in names
    whole = load_file(tmp_path / "checkpoint.safetensors")
    assert names <= set(whole)
    # GPT-2's Conv1D weights, stored (in, out), are held (out, in) where the CPU kernel runs them (FloatLinear)
    held_transposed = {f"{m}.weight" for m, module in stage.named_modules()
                       if type(module) is FloatLinear}
    for n, p in stage.named_parameters():
        assert torch.equal(p, whole[n].t() if n in held_transposed else whole[n]) and not p.requires_grad
    assert read_tensors(tmp_path / "checkpoint.safetensors", {"a": "transformer.ln_f.bias"})["a"].shape == (32,)


def test_truncated_or_foreign_weights_fail_clearly(hf, tmp_path):
    checkpoint.save(tmp_path, hf, None, 0)
    path = tmp_path / "checkpoint.safetensors"
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConfigError, match="truncated"):
        cut = find_model(tmp_path / "cut.safetensors", 4)
        load_stage(cut.weights, cut.config, range(3, 4), embed=False, head=True)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        find_model(tmp_path / "junk.safetensors", 4)
    with pytest.raises(ConfigError, match="not divisible"):
        family_for(find_model(path, n_head=5).config)


# -- sampling ------------------------------------------------------------------------------------
def test_sampling_filters_and_seeds():
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5])
    assert next_token(logits, SamplingParams(), None) == 1
    assert next_token(logits, SamplingParams(1.0, top_k=1), make_generator(0)) == 1
    kept = filter_logits(logits, SamplingParams(1.0, top_k=2)).isfinite().nonzero().flatten().tolist()
    assert kept == [1, 4]
    # top_p keeps the smallest set reaching p: softmax of [3, 2.5, 2, ...] ~ [0.50, 0.30, 0.18, ...]
    kept = filter_logits(logits, SamplingParams(1.0, top_p=0.7)).isfinite().nonzero().flatten().tolist()
    assert kept == [1, 4]
    p = SamplingParams(0.8, top_k=4, seed=5)
    a = [next_token(logits, p, g) for g in [make_generator(5)] for _ in range(50)]
    b = [next_token(logits, p, g) for g in [make_generator(5)] for _ in range(50)]
    assert a == b and len(set(a)) > 1 and 3 not in a
    with pytest.raises(ConfigError):
        SamplingParams(top_p=0.0).check()


# -- MLP stages and checkpoint shards ----------------------------------------------------------
def test_mlp_stages_compose_to_the_model_and_shards_merge_into_a_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    full = MLP(64, 10, [32, 16])
    x = torch.randn(5, 64)
    specs = plan([1, 1, 1], 2)
    stages = [sequential_stage(full, s.blocks, s.first, s.last) for s in specs]
    assert torch.equal(stages[1](stages[0](x)), full(x))
    opts = []
    for rank, stage in enumerate(stages):
        flat = FlatParams(stage)
        opt = torch.optim.AdamW(list(flat.params.values()), lr=0.01)
        stage(x if rank == 0 else torch.randn(5, 32)).sum().backward()
        opt.step()
        opts.append(opt)
        shards.save_shard(tmp_path, rank, 2, stage, opt, step=1)
    merged = shards.merge(tmp_path)
    fresh = MLP(64, 10, [32, 16])
    flat = FlatParams(fresh)
    opt = torch.optim.AdamW(list(flat.params.values()), lr=0.01)
    meta = checkpoint.load(merged, fresh, opt)
    assert meta["step"] == 1 and meta["fingerprint"] == fingerprint(fresh)
    for name, p in fresh.named_parameters():
        owner = next(s for s in stages if name in dict(s.named_parameters()))
        assert torch.equal(p, dict(owner.named_parameters())[name])
    # and the flat optimizer state slices back to each stage's own
    layout = [(n, p.numel()) for n, p in fresh.named_parameters()]
    for stage, own in zip(stages, opts):
        names = [n for n, _ in stage.named_parameters()]
        st = shards.stage_optimizer_state(merged, layout, names, checkpoint.load_meta(merged))
        assert torch.equal(st["state"][0]["exp_avg"], own.state_dict()["state"][0]["exp_avg"])


# -- the mesh ------------------------------------------------------------------------------------
def mesh_pair(**kw):
    a = Mesh("s0", "tcp://127.0.0.1:0", heartbeat_s=0.1, liveness_s=kw.pop("liveness_s", 5.0), **kw)
    b = Mesh("s1", "tcp://127.0.0.1:0", heartbeat_s=0.1, liveness_s=5.0, **kw)
    a.add_peer("s1", b.address)
    b.add_peer("s0", a.address)
    handshake((a, "s1"), (b, "s0"))
    return a, b


def handshake(*pairs):
    """Both ends must be receiving for a handshake to finish: run each side in its own thread."""
    threads = [threading.Thread(target=m.wait_ready, args=([peer], 10)) for m, peer in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m, peer in pairs:
        assert m.ready([peer])


def recv_one(mesh, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        env = mesh.recv(0.1)
        if env is not None:
            return env
    raise AssertionError("nothing arrived")


def test_mesh_delivers_tensors_zero_copy_in_order_and_routes_by_topic():
    a, b = mesh_pair()
    c = Mesh("s2", "tcp://127.0.0.1:0", heartbeat_s=0.1, liveness_s=5.0)
    try:
        a.add_peer("s2", c.address)
        c.add_peer("s0", a.address)
        handshake((a, "s2"), (c, "s0"))
        x = torch.randn(4, 8)
        for i in range(20):
            a.send("s1", "mp.act", {"step": i, "mb": 0, "phase": "train"}, {"x": (x + i).numpy()}, tag=f"{i}.0")
        got = [recv_one(b) for _ in range(20)]
        assert [e.fields["step"] for e in got] == list(range(20))
        assert got[3].topic == "s1/3.0" and got[3].src == "s0"
        arr = got[5].tensors["x"]
        assert not arr.flags.owndata  # a view of the received frame, not a copy
        assert torch.equal(torch.from_numpy(arr.copy()), x + 5)
        assert c.recv(0.3) is None  # s2 subscribed only to its own topic: it saw none of s1's messages
    finally:
        for m in (a, b, c):
            m.close()


def test_a_sequence_gap_is_an_error_not_a_silent_loss():
    a, b = mesh_pair()
    try:
        a.send("s1", "mp.grad", {"step": 0, "mb": 0}, {"g": np.zeros(3, np.float32)})
        recv_one(b)
        a.peers["s1"].sent_seq += 2  # as if two messages had been dropped on the way
        a.send("s1", "mp.grad", {"step": 3, "mb": 0}, {"g": np.zeros(3, np.float32)})
        with pytest.raises(PeerError, match=r"message 3 from s0 arrived but 1 was next: 2 message\(s\) lost"):
            recv_one(b)
    finally:
        a.close()
        b.close()


def test_a_lost_last_message_is_caught_by_the_next_heartbeat():
    a, b = mesh_pair()
    try:
        with a.outbox.lock:
            a.peers["s1"].sent_seq += 1  # "sent" one that never arrives, and nothing follows it
        with pytest.raises(PeerError, match=r"messages 0..0 from s0 were lost"):
            for _ in range(50):
                b.recv(0.1)
    finally:
        a.close()
        b.close()


def test_a_restarted_peer_is_not_charged_with_what_its_previous_incarnation_received():
    """s1 restarts while s0 runs on: s0's next heartbeat still counts the messages it sent the old s1. s0 is told
    once (on_restarted: an inference stage treats it as a loss, its KV and prefix caches gone with the old s1)."""
    a, b = mesh_pair()
    b2 = None
    restarted: list[tuple[str, str]] = []
    a.on_restarted = lambda src, message: restarted.append((src, message))
    try:
        for i in range(10):
            a.send("s1", "mp.grad", {"step": i, "mb": 0}, {"g": np.zeros(3, np.float32)})
        assert [recv_one(b).fields["step"] for _ in range(10)] == list(range(10))
        address, old_inc = b.address, b.incarnation
        b.close()
        deadline = time.monotonic() + 10
        while b2 is None:  # the same node, a new process (zmq frees the old port asynchronously)
            try:
                b2 = Mesh("s1", address, heartbeat_s=0.1, liveness_s=5.0)
            except PeerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        b2.add_peer("s0", a.address)
        stop = threading.Event()
        s0 = threading.Thread(target=lambda: [a.recv(0.05) for _ in iter(stop.is_set, True)])  # s0 runs on
        s0.start()
        try:
            b2.wait_ready(["s0"], 10)  # raised "messages 0..9 from s0 were lost" before the fix
            for _ in range(10):  # several of s0's heartbeats, before and after it hears the new s1
                b2.recv(0.05)
            assert wait_until(lambda: a.peers["s1"].incarnation == b2.incarnation != old_inc)
        finally:
            stop.set()
            s0.join()
        assert len(restarted) == 1 and restarted[0][0] == "s1", restarted  # (within liveness_s: never lost)
        assert "s1 at tcp://127.0.0.1" in restarted[0][1] and "before it was noticed lost" in restarted[0][1]
        for i in range(5):  # the link starts afresh: exact sequence numbers from 0 again
            a.send("s1", "mp.grad", {"step": i, "mb": 0}, {"g": np.zeros(3, np.float32)})
        assert [recv_one(b2).fields["step"] for _ in range(5)] == list(range(5))
        with a.outbox.lock:
            a.peers["s1"].sent_seq += 1  # and a real loss to the new incarnation is still caught
        with pytest.raises(PeerError, match=r"messages 5..5 from s0 were lost"):
            for _ in range(50):
                b2.recv(0.1)
    finally:
        for m in (a, b, b2):
            if m is not None:
                m.close()


def test_real_high_water_mark_drops_are_detected():
    a, b = mesh_pair(hwm=4)
    try:
        blob = np.zeros(256 * 1024, np.float32)  # 1 MiB each: the socket buffers fill quickly
        for i in range(300):
            a.send("s1", "mp.act", {"step": i, "mb": 0, "phase": "train"}, {"x": blob})
        with pytest.raises(PeerError, match="lost"):
            for _ in range(300):
                recv_one(b)
    finally:
        a.close()
        b.close()


def test_a_node_busy_longer_than_liveness_does_not_blame_a_peer_whose_heartbeats_wait_in_its_inbox():
    a, b = mesh_pair(liveness_s=1.0)
    try:
        time.sleep(2.5)  # a computes (a long prefill): it reads nothing while b's heartbeat thread beats on
        assert a.recv(0.2) is None  # not PeerLost: the queued heartbeats are read before silence is judged
        assert not a.peers["s1"].lost
    finally:
        a.close()
        b.close()


def test_a_silent_peer_is_reported_lost_and_malformed_input_is_dropped():
    a, b = mesh_pair(liveness_s=1.0)
    try:
        b.outbox.send("s0/", [b"\x93garbage"])             # not msgpack
        b.outbox.send("s0/", [b"\x81\xa1v\x01"])           # msgpack, but no kind
        b.send("s0", "mp.bye", {})
        assert recv_one(a).kind == "mp.bye"                # the receiver survived both
        b.peers["s0"].said_bye = False
        a.peers["s1"].said_bye = False
        b.close()
        with pytest.raises(PeerLost, match="s1 at tcp://127.0.0.1:.* sent nothing for"):
            for _ in range(100):
                a.recv(0.1)
    finally:
        a.close()
