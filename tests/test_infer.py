"""Streaming inference through real stage processes on loopback, against Hugging Face ``generate``."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from tokenizers import Tokenizer

from smolcluster import checkpoint
from smolcluster.bench.common import write_tiny_run
from smolcluster.errors import ConfigError, PeerError
from smolcluster.inference import InferencePipeline
from smolcluster.inference.sampling import SamplingParams
from smolcluster.models.gpt2 import build_gpt2
from tests.conftest import run_cli, wait_until

VOCAB, CONTEXT = 500, 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A seeded random GPT-2 (4 layers) saved as a run directory, with a BPE tokenizer of its vocabulary."""
    d = write_tiny_run(tmp_path_factory.mktemp("model"), CONTEXT, vocab=VOCAB, n_layer=4)
    hf = build_gpt2(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=64, n_positions=CONTEXT).eval()
    checkpoint.load(d, hf)
    return d, hf


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stage_requests(pipe: InferencePipeline) -> list[int]:
    return [pipe.client.mesh.peers[s].info.get("requests") for s in pipe.client.stages]


@pytest.fixture(scope="module")
def two_stages(model_dir):
    d, _ = model_dir
    with InferencePipeline.start_local(d, n_head=4, stages=2, head="first", heartbeat_s=0.2, liveness_s=5.0) as pipe:
        yield pipe


def test_two_stages_greedy_equals_hf_generate_with_requests_in_flight_together(two_stages, model_dir):
    _, hf = model_dir
    prompts = [prompt(s, n) for s, n in ((1, 5), (2, 17), (3, 1), (4, 40))]
    reqs = [two_stages.submit(p, max_new_tokens=30, stop_at_eos=False) for p in prompts]  # all in flight at once
    for p, r in zip(prompts, reqs):
        assert r.tokens() == hf_greedy(hf, p, 30)
        assert r.finish_reason == "length" and r.first_token_at is not None
    assert two_stages.client.partition == [[0, 2], [2, 4]] and two_stages.client.head_rank == 0


def test_sampling_is_seeded_per_request_and_filters_apply(two_stages, model_dir):
    _, hf = model_dir
    p = prompt(5, 10)
    a = two_stages.submit(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    b = two_stages.submit(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    c = two_stages.submit(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=8, stop_at_eos=False)
    k1 = two_stages.submit(p, max_new_tokens=20, temperature=0.7, top_k=1, seed=9, stop_at_eos=False)
    # a SamplingParams is the same request as its fields; an unset seed is drawn once and repeats the answer
    d = two_stages.submit(p, max_new_tokens=20, sampling=SamplingParams(1.0, top_p=0.9, seed=7), stop_at_eos=False)
    fresh = two_stages.submit(p, max_new_tokens=20, sampling=SamplingParams(1.0, top_p=0.9), stop_at_eos=False)
    again = two_stages.submit(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=fresh.seed, stop_at_eos=False)
    assert a.tokens() == b.tokens() == d.tokens() != c.tokens()
    assert isinstance(fresh.seed, int) and fresh.tokens() == again.tokens()
    assert k1.tokens() == hf_greedy(hf, p, 20)  # top_k=1 leaves only the argmax
    with pytest.raises(ConfigError, match=r"^top_p=1\.5 is invalid"):
        two_stages.submit(p, top_p=1.5)
    with pytest.raises(ConfigError, match=r"submit\(\) got \['temprature'\]: the sampling keywords are"):
        two_stages.submit(p, temprature=1.0)


def test_text_prompts_stream_decoded_text(two_stages, model_dir):
    _, hf = model_dir
    req = two_stages.submit("def main():", max_new_tokens=12, stop_at_eos=False)
    pieces = list(req)
    ids = two_stages.tokenizer.encode("def main():")
    assert [t.id for t in pieces if t.id >= 0] == hf_greedy(hf, ids, 12)
    assert "".join(t.text for t in pieces) == two_stages.tokenizer.decode(req.ids)


def test_eos_context_and_long_prompts(two_stages, model_dir):
    _, hf = model_dir
    p = prompt(6, 8)
    first = hf_greedy(hf, p, 1)[0]
    r = two_stages.client.submit(p, max_new_tokens=50, eos=first)
    assert r.tokens() == [first] and r.finish_reason == "eos"
    near = prompt(7, CONTEXT - 2)  # room for 2 more positions: 3 tokens (the last is never fed back)
    r = two_stages.submit(near, max_new_tokens=50, stop_at_eos=False)
    assert r.tokens() == hf_greedy(hf, near, 3) and r.finish_reason == "context"
    with pytest.raises(ConfigError, match=f"prompt is {CONTEXT + 1} tokens, longer than the model's context of {CONTEXT}"):
        two_stages.submit(prompt(8, CONTEXT + 1), max_new_tokens=5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        two_stages.submit(p, max_new_tokens=0)


def test_cancel_frees_every_stages_cache(two_stages):
    reqs = [two_stages.submit(prompt(10 + i, 4), max_new_tokens=120, stop_at_eos=False) for i in range(12)]
    for r in reqs:
        r.cancel()
    assert all(r.finish_reason == "cancelled" for r in reqs)
    assert sum(len(r.tokens()) for r in reqs) < 12 * 120  # stopped part-way
    assert wait_until(lambda: stage_requests(two_stages) == [0, 0]), stage_requests(two_stages)
    assert two_stages.client.in_flight() == 0
    assert len(two_stages.submit(prompt(1, 3), max_new_tokens=4, stop_at_eos=False).tokens()) == 4  # still serves


def test_three_stages_with_the_head_on_the_last_stage_equal_hf_generate(model_dir):
    d, hf = model_dir
    with InferencePipeline.start_local(d, n_head=4, stages=3, head="last", heartbeat_s=0.2, liveness_s=5.0) as pipe:
        assert pipe.client.partition == [[0, 1], [1, 3], [3, 4]] and pipe.client.head_rank == 2
        prompts = [prompt(20, 9), prompt(21, 3)]
        reqs = [pipe.submit(p, max_new_tokens=40, stop_at_eos=False) for p in prompts]
        assert [r.tokens() for r in reqs] == [hf_greedy(hf, p, 40) for p in prompts]


def test_a_stage_killed_mid_generation_raises_peer_error_and_nothing_hangs(model_dir):
    d, _ = model_dir
    pipe = InferencePipeline.start_local(d, n_head=4, stages=2, heartbeat_s=0.2, liveness_s=1.5)
    procs = list(pipe._children.procs.values())
    try:
        reqs = [pipe.submit(prompt(30 + i, 4), max_new_tokens=120, stop_at_eos=False) for i in range(16)]
        stream = iter(reqs[-1])
        next(stream)  # generation is under way
        os.kill(procs[1].pid, signal.SIGKILL)
        with pytest.raises(PeerError, match=r"pipeline stage lost: .*s1 at tcp://127\.0\.0\.1:\d+ sent nothing"):
            for _ in stream:
                pass
        with pytest.raises(PeerError, match="stage lost"):
            pipe.submit(prompt(1, 3), max_new_tokens=3)
        assert all(r.done for r in reqs)
        assert any(r.finish_reason == "error" for r in reqs)
    finally:
        pipe.close()
    assert all(p.poll() is not None for p in procs)  # the surviving stage was shut down too


def test_the_head_hears_of_a_lost_stage_from_the_stage_that_noticed(model_dir):
    """The head's own watch is made too slow to matter: stage 0 notices stage 1 is gone and tells it."""
    d, _ = model_dir
    pipe = InferencePipeline.start_local(d, n_head=4, stages=2, heartbeat_s=0.2, liveness_s=1.5)
    pipe.client.mesh.liveness_s = 600.0
    procs = list(pipe._children.procs.values())
    try:
        req = pipe.submit(prompt(50, 4), max_new_tokens=120, stop_at_eos=False)
        stream = iter(req)
        next(stream)
        os.kill(procs[1].pid, signal.SIGKILL)
        with pytest.raises(PeerError, match=r"pipeline stage lost: s0: s1 at tcp://127\.0\.0\.1:\d+ sent nothing"):
            for _ in stream:
                pass
        with pytest.raises(PeerError, match="stage lost"):  # the whole pipeline is down, not just that request
            pipe.submit(prompt(1, 3), max_new_tokens=3)
    finally:
        pipe.close()


def test_infer_cli_streams_the_greedy_text(model_dir):
    d, hf = model_dir
    p = run_cli("smolcluster.infer", f"checkpoint={d}", "prompt=class Foo", "max_new_tokens=10",
                "stop_at_eos=false", "cluster.heartbeat_s=0.2", timeout=180)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = tok.encode("class Foo").ids
    assert p.stdout == "class Foo" + tok.decode(hf_greedy(hf, ids, 10)) + "\n"
    assert "10 tokens in" in p.stderr and "finished: length" in p.stderr
    bad = run_cli("smolcluster.infer", f"checkpoint={d}", "prompt=" + "x " * 400, check=False, timeout=180)
    assert bad.returncode == 2 and "longer than the model's context of 128" in bad.stderr
    many = run_cli("smolcluster.infer", f"checkpoint={d}", "prompt=x", "stages=5", check=False, timeout=180)
    assert many.returncode == 2 and many.stderr.strip().splitlines()[-1] == (  # refused before any stage starts
        "error: stages=5 but the model has 4 blocks: use at most stages=4 (each stage holds one block or more)")
    assert "exited" not in many.stderr and many.stderr.count("error:") == 1, many.stderr


def test_heads_come_and_go_on_stages_started_as_cluster_nodes(model_dir, tmp_path):
    """role=stage processes serve any head that connects; a head leaving does not stop them."""
    import subprocess
    import sys

    from smolcluster.pipeline.launch import free_ports
    from tests.conftest import REPO

    d, hf = model_dir
    port = free_ports("127.0.0.1", 2)
    common = [f"checkpoint={d}", "stages=2", f"cluster.port={port}", "cluster.heartbeat_s=0.2",
              "cluster.liveness_s=3"]
    stages = [subprocess.Popen([sys.executable, "-m", "smolcluster.infer", "role=stage", f"rank={r}", *common],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(2)]
    try:
        addresses = [f"tcp://127.0.0.1:{port + r}" for r in range(2)]
        for seed in (40, 41):  # two heads, one after the other
            with InferencePipeline.connect(addresses, heartbeat_s=0.2, liveness_s=3.0) as pipe:
                p = prompt(seed, 6)
                assert pipe.submit(p, max_new_tokens=15).tokens() == hf_greedy(hf, p, 15)
        assert all(s.poll() is None for s in stages)  # still serving
    finally:
        for s in stages:
            s.terminate()
        for s in stages:
            s.wait(timeout=20)


def test_a_prompt_with_commas_comes_on_stdin_or_quoted_twice(model_dir):
    """Prompts are prose: a comma is Hydra's list syntax, so without prompt= the prompt is read from stdin."""
    import pty
    import subprocess
    import sys

    from tests.conftest import REPO

    d, _ = model_dir
    common = [sys.executable, "-m", "smolcluster.infer", f"checkpoint={d}", "max_new_tokens=8", "stop_at_eos=false",
              "cluster.heartbeat_s=0.2"]
    piped = subprocess.run(common, input="To be, or not to be\n", cwd=REPO, capture_output=True, text=True,
                           timeout=180)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("To be, or not to be") and "8 tokens in" in piped.stderr
    quoted = run_cli("smolcluster.infer", f"checkpoint={d}", "prompt='To be, or not to be'", "max_new_tokens=8",
                     "stop_at_eos=false", "cluster.heartbeat_s=0.2", timeout=180)
    assert quoted.stdout == piped.stdout  # greedy: the same prompt gives the same text either way

    primary, secondary = pty.openpty()  # a terminal on stdin and no prompt=: a clear error, no waiting
    try:
        tty = subprocess.run(common, stdin=secondary, cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)
    assert tty.returncode == 2 and "no prompt" in tty.stderr and "echo" in tty.stderr
    assert "[" not in tty.stderr  # refused before any stage started (their log lines start with "[stage")
    empty = subprocess.run(common, input="", cwd=REPO, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no prompt" in empty.stderr

    help_text = run_cli("smolcluster.infer", "--help", timeout=60).stdout
    assert """prompt="'To be, or not to be'\"""" in help_text and 'echo "To be, or not to be" |' in help_text


def test_overrides_are_type_checked_before_anything_starts():
    """conf/infer.yaml and conf/chat.yaml are checked against typed schemas (inference/settings.py, serving/settings.py)."""
    for module, override, says in (("smolcluster.infer", "max_new_tokens=abc", "could not be converted to Integer"),
                                   ("smolcluster.infer", "head=middle", "expected one of [first, last]"),
                                   ("smolcluster.chat", "serve.max_active=lots", "could not be converted to Integer"),
                                   ("smolcluster.chat", "serve.ui=perhaps", "serve.ui")):
        p = run_cli(module, override, check=False, timeout=120)
        assert p.returncode != 0 and says in p.stderr and override.split("=")[0] in p.stderr, (override, p.stderr)
