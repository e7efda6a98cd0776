"""``python -m smolcluster.chat replicas=2``: two pipelines of two stage processes behind one head, on loopback.

A tiny random-init GPT-2 saved with ``save_pretrained``. Concurrent greedy completions each equal
``transformers``' greedy tokens and both replicas serve some (the head's per-replica counters in ``/health``);
a conversation's next turn goes to the replica that served its first turn, whose stage 0 counts a prefix-cache
hit; a replica whose stage is killed fails its request in flight naming the replica and the stage, the other
replica answers the next request, and the lost one is rebuilt. The head's /metrics and ``top`` show each replica.
Sessions closed while they rebuild a lost pipeline wait for the rebuild and leave none of its stages running.
In process: the router's rule; each replica's share of the cluster (head ports; shared stage addresses refused); bad
replica counts refused in one line; replicas resolving one random init at once get the same weights.
With ``cluster=auto``: two replicas of one stage on two real agents, their weights sent, equal to
``transformers``; a killed stage started again on its agent, its replica back and equal to ``transformers``, its
agent killed: the replica stays down in one line; more replicas than the agents hold refused in one line. The
restart policy through the real coordinator Run and two agents: a refused restart (weights not in the agent's cache)
gives up in one line and stops the replica's other stage, an unanswered one ends after connect_timeout_s (its role
failed), and no heartbeat round waits on an agent (the other agent stays alive); a stage that exits after an
``error:`` line is counted and given up in one line on the real heartbeat thread, a restart's late ``running`` is
adopted, and an agent stopping a frozen stage goes on answering.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest
import torch

from smolcluster.bench.common import write_tokenizer
from smolcluster.serving.router import STICKY_SLACK, Router
from tests import test_node_agent
from tests.conftest import wait_until
from tests.test_chat_head import start_chat_head
from tests.test_lora_serve import peft_greedy

procs = test_node_agent.procs  # the fixture: every process a test starts is stopped after it

VOCAB, BLOCK = 500, 16


def tiny_gpt2(d):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                        initializer_range=0.2)  # far from uniform logits, so greedy decoding tests something
    GPT2LMHeadModel(config).eval().save_pretrained(d)
    write_tokenizer(d, VOCAB)
    return d


def hf_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    return peft_greedy(model_dir, None, ids, n)  # transformers' generate, greedy (no adapter)


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(base URL, the chat process, the model dir, its tokenizer, its run dir) of a chat serving 2 replicas x 2
    stages, each node announcing its /metrics."""
    from smolcluster.data.text import TextTokenizer

    root = tmp_path_factory.mktemp("replicas")
    model = tiny_gpt2(root / "model")
    log = (root / "chat.log").open("w")
    proc, url = start_chat_head(["role=launch", f"model.pretrained={model}", "stages=2", "replicas=2",
                                 "serve.port=0", "serve.ui=false", f"serve.prefix_block={BLOCK}",
                                 "cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "logging.prometheus.port=0",
                                 f"logging.run_dir={root / 'run'}"], log)
    try:
        yield url, proc, model, TextTokenizer.load(model / "tokenizer.json"), root / "run"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def complete(url: str, prompt: list[int], n: int) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "model", "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def equal_transformers_at_once(url: str, model, tok, prompts: list[list[int]], n: int) -> None:
    """Greedy completions of ``prompts``, all sent at once, each equal to ``transformers``' greedy tokens."""
    out: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, complete(url, prompts[i], n)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(out) == list(range(len(prompts))), "a request did not answer"
    for i, p in enumerate(prompts):
        assert out[i]["choices"][0]["text"] == tok.decode(hf_greedy(model, p, n)), f"prompt {i}"


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/health", timeout=30).json()["replicas"]


def head_metric(run_dir, name: str) -> list[float]:
    """The head's /metrics values of ``name`` per replica (its URL from RUN_DIR/endpoints/, as top finds it)."""
    (head,) = [json.loads(p.read_text())["url"] for p in (run_dir / "endpoints").glob("*head*.json")]
    return [float(ln.split()[-1]) for ln in httpx.get(head, timeout=10).text.splitlines()
            if ln.startswith(name + "{") and 'replica="' in ln]


def test_concurrent_requests_spread_over_both_replicas_and_equal_transformers(chat):
    url, _, model, tok, run_dir = chat
    equal_transformers_at_once(url, model, tok, [ids(i, 5 + 3 * i) for i in range(6)], 12)
    served = [r["served"] for r in replicas(url)]
    assert sum(served) >= 6 and min(served) >= 2, served  # both replicas took their share
    # the head's /metrics has the same per replica; top has a line per replica's stage
    metric = lambda name: head_metric(run_dir, name)  # noqa: E731
    assert wait_until(lambda: metric("smolcluster_replica_requests_served") == served, 30), metric(
        "smolcluster_replica_requests_served")
    assert metric("smolcluster_replica_up") == [1.0, 1.0]
    from smolcluster.top import ClusterView

    def stage_lines() -> list[str]:  # top's rows of the stages that answer, e.g. "HOST-r0 stage1"
        return sorted(n.name for n in ClusterView(run_dir=run_dir).poll() if n.up and n.labels.get("role") == "stage")

    assert wait_until(lambda: len(stage_lines()) == 4, 30), stage_lines()
    stages = stage_lines()
    assert [s.split("-")[-1] for s in stages] == ["r0 stage0", "r0 stage1", "r1 stage0", "r1 stage1"], stages


def test_a_conversations_next_turn_goes_to_the_replica_holding_its_prefix(chat):
    url, _, model, tok, _ = chat
    first = ids(100, 3 * BLOCK + 5)
    before = replicas(url)
    answer = complete(url, first, 20)["choices"][0]["text"]
    after = replicas(url)
    (held,) = [r for r in range(2) if after[r]["served"] == before[r]["served"] + 1]
    hits = after[held]["prefix_hits"]
    # the next turn re-sends the first prompt and its answer, then a new message
    turn = first + tok.encode(answer) + ids(101, 7)
    assert tok.decode(turn[len(first):len(first) + len(tok.encode(answer))]) == answer
    again = complete(url, turn, 10)["choices"][0]["text"]
    assert again == tok.decode(hf_greedy(model, turn, 10))
    now = replicas(url)
    assert [r["served"] for r in now] == [a["served"] + (r == held) for r, a in enumerate(after)], now
    assert wait_until(lambda: replicas(url)[held]["prefix_hits"] == hits + 1, 30), replicas(url)


def stage_pid(chat_proc: subprocess.Popen, replica: int, rank: int) -> int:
    """The pid of one replica's stage ``rank`` (a chat's replica r runs its stages as node NAME-rR)."""
    found = []
    for p in psutil.Process(chat_proc.pid).children(recursive=True):
        try:
            if p.environ().get("SMOLCLUSTER_NODE", "").endswith(f"-r{replica}") and \
                    p.cmdline()[-1].endswith(f"stage-{rank}.json"):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    assert len(found) == 1, f"replica {replica}'s stage {rank}: {found}"
    return found[0]


def test_a_lost_replica_fails_its_requests_clearly_while_the_other_serves(chat):
    url, proc, model, tok, _ = chat
    body = {"model": "model", "prompt": ids(200, 8), "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # it is answering
        (busy,) = [x["replica"] for x in replicas(url) if x["load"] == 1]
        psutil.Process(stage_pid(proc, busy, 1)).send_signal(signal.SIGKILL)
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    message = events[-1]["error"]["message"]
    assert f"replica {busy}'s pipeline is down" in message and "s1 at tcp://127.0.0.1:" in message, message
    other = 1 - busy
    served = replicas(url)[other]["served"]
    prompt = ids(201, 9)
    assert complete(url, prompt, 8)["choices"][0]["text"] == tok.decode(hf_greedy(model, prompt, 8))
    assert replicas(url)[other]["served"] == served + 1
    # the lost replica is rebuilt (its stages started again) while the other kept serving
    assert wait_until(lambda: replicas(url)[busy]["status"] == "ok", 120), replicas(url)
    assert httpx.get(f"{url}/health", timeout=30).json()["reconnects"] == 1


def test_the_router_prefers_the_prefix_holder_unless_it_is_much_busier():
    router = Router(block=4)
    conv = router.keys(list(range(10)))
    assert len(conv) == 2 and router.keys(list(range(10)), adapter="a")[0] != conv[0]  # an adapter's own chain
    assert router.pick(conv, [0, 0], [True, True], [3, 1]) == 1      # nobody holds it: least loaded, least served
    router.remember(conv, 0)
    turn = router.keys(list(range(10)) + [7, 7, 7, 7])
    assert turn[:2] == conv and router.pick(turn, [2, 0], [True, True], [0, 0]) == 0
    assert router.pick(turn, [STICKY_SLACK + 1, 0], [True, True], [0, 0]) == 1  # much busier: spread
    assert router.pick(turn, [0, 5], [False, True], [0, 0]) == 1                 # the holder is down
    assert router.pick(turn, [0, 0], [False, False], [0, 0]) is None
    router.forget(0)
    assert router.holding(turn, [True, True]) == (None, 0)


def test_replica_settings_split_the_cluster_and_bad_counts_are_refused_in_one_line():
    from hydra import compose, initialize_config_dir

    from smolcluster.errors import ConfigError
    from smolcluster.inference.from_config import replica_settings
    from smolcluster.inference.settings import infer_settings
    from smolcluster.launch.nodes import stage_nodes
    from smolcluster.paths import CONFIG_DIR
    from smolcluster.serving.settings import chat_settings

    def settings(name: str, *overrides: str):
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose(name, overrides=list(overrides))
        return (chat_settings if name == "chat" else infer_settings)(cfg)

    nodes = "++cluster.nodes=[{host:a},{host:b},{host:c},{host:d}]"
    head = settings("chat", "role=head", "replicas=2", "cluster.port=7000", nodes).pipeline
    assert [[n["host"] for n in replica_settings(head, r).links.nodes] for r in (0, 1)] == [["a", "b"], ["c", "d"]]
    by_port = settings("chat", "role=head", "replicas=2", "cluster.port=7000").pipeline
    assert [replica_settings(by_port, r).links.port for r in (0, 1)] == [7000, 7002]
    assert [replica_settings(by_port, r).head_port for r in (0, 1)] == [0, 0]  # any free port, each its own
    fixed = settings("chat", "role=head", "replicas=3", "cluster.port=7000", "head_port=6000").pipeline
    assert [replica_settings(fixed, r).head_port for r in range(3)] == [6000, 6001, 6002]
    launch = settings("chat", "replicas=3", "logging.prometheus.port=9400").pipeline
    assert [replica_settings(launch, r).telemetry["prometheus_port"] for r in range(3)] == [9400, 9402, 9404]
    with pytest.raises(ConfigError, match=r"replicas=3 x stages=2 needs 6 cluster.nodes, the cluster lists 4.*"
                                          r"replicas=2"):
        replica_settings(settings("chat", "role=head", "replicas=3", "cluster.port=7000", nodes).pipeline, 0)
    same = "++cluster.nodes=[{host:a},{host:b},{host:a},{host:b}]"  # no ports: both replicas on a:7000, b:7001
    with pytest.raises(ConfigError, match=r"replicas 0 and 1 both reach a stage at tcp://a:7000.*"
                                          r"cluster.nodes\[i\].port"):
        replica_settings(settings("chat", "role=head", "replicas=2", "cluster.port=7000", same).pipeline, 1)
    ported = "++cluster.nodes=[{host:a},{host:b},{host:a,port:7100},{host:b,port:7101}]"
    assert [n.address for n in stage_nodes(replica_settings(settings(
        "chat", "role=head", "replicas=2", "cluster.port=7000", ported).pipeline, 1).links, 2)] == [
        "tcp://a:7100", "tcp://b:7101"]
    for name, bad, message in (("chat", "replicas=0", "replicas=0 is invalid"),
                               ("chat", "replicas=-1", "replicas=-1 is invalid"),
                               ("infer", "replicas=2", "is for the chat server")):
        with pytest.raises(ConfigError, match=message):
            settings(name, bad)


def test_cluster_auto_serves_two_replicas_from_two_agents_equal_to_transformers(tmp_path, procs):
    """``chat cluster=auto replicas=2 stages=1``: each replica's stage on an agent of its own, its weights sent to
    that agent's cache (``cluster.weights=send``), its own run keys; concurrent greedy completions equal
    ``transformers`` and both replicas serve some; one agent's stage killed downs its replica alone, the other
    answers, and the coordinator starts that stage again on its agent, at its port: the replica comes back
    (``smolcluster_replica_up`` 1 again) and serves a request equal to ``transformers``. That agent killed: the
    replica stays down, one line saying why, the other serves. Ctrl-C stops every stage on both agents."""
    import sys

    from smolcluster.data.text import TextTokenizer
    from tests.test_node_agent import Proc, agents, prepare, role_pids, wait_gone

    model = tiny_gpt2(tmp_path / "model")
    tok = TextTokenizer.load(model / "tokenizer.json")
    started = agents(tmp_path, prepare(tmp_path, ["a", "b"]), procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())
    chat = Proc([sys.executable, "-u", "-m", "smolcluster.chat", "cluster=auto", "cluster.mdns=false",
                 f"cluster.peers=[{peers}]", f"cluster.state_dir={tmp_path / 'coord'}", "cluster.weights=send",
                 "cluster.heartbeat_s=0.2", "cluster.liveness_s=5", "cluster.connect_timeout_s=30",
                 f"model.pretrained={model}", "stages=1", "replicas=2", "serve.port=0", "serve.ui=false",
                 "logging.prometheus.port=0", f"logging.run_dir={tmp_path / 'run'}"])
    procs.append(chat)
    _, m = chat.wait_for(r"smolcluster chat: (http://\S+)/ ", timeout=180)
    url = m.group(1)
    assert "1 stages x 2 replicas" in chat.text()
    equal_transformers_at_once(url, model, tok, [ids(300 + i, 4 + 3 * i) for i in range(4)], 10)
    served = [r["served"] for r in replicas(url)]
    assert sum(served) == 4 and min(served) >= 1, served  # both replicas took their share
    # one replica's stage on each agent, each sent its weights, each with its own run keys
    held = {n: sorted(x.name for x in (tmp_path / n / "runs").glob("*/r*_stage_0")) for n in ("a", "b")}
    assert sorted(held["a"] + held["b"]) == ["r0_stage_0", "r1_stage_0"], held
    keys = [(tmp_path / n / "runs").glob("*/r*_stage_0/keys/server.key") for n in ("a", "b")]
    assert len({k.read_text() for found in keys for k in found}) == 2
    assert chat.text().count("entries to send") == 2, chat.text()[-3000:]
    # b's stage killed: its replica is down, a's keeps serving (the coordinator stops nothing)
    lost = int(held["b"][0][1])
    (pid,) = role_pids(started["b"][0])
    psutil.Process(pid).send_signal(signal.SIGKILL)
    assert wait_until(lambda: replicas(url)[lost]["status"] == "down", 60), replicas(url)
    before = replicas(url)[1 - lost]["served"]
    equal_transformers_at_once(url, model, tok, [ids(310, 6)], 8)
    assert replicas(url)[1 - lost]["served"] == before + 1
    assert chat.p.poll() is None and "stopped the run everywhere" not in chat.text(), chat.text()[-3000:]
    # the coordinator starts it again on b, where the head finds it: the replica is back
    assert wait_until(lambda: replicas(url)[lost]["status"] == "ok", 120), (replicas(url), chat.text()[-3000:])
    assert f"replica {lost}: starting its stage 0 again on node b" in chat.text(), chat.text()[-3000:]
    assert len(role_pids(started["b"][0])) == 2 and psutil.pid_exists(role_pids(started["b"][0])[-1])
    assert wait_until(lambda: head_metric(tmp_path / "run", "smolcluster_replica_up") == [1.0, 1.0], 30)
    served = replicas(url)[lost]["served"]
    for i in range(4):  # one at a time, each to the least-served live replica: soon the one come back
        equal_transformers_at_once(url, model, tok, [ids(320 + i, 5 + i)], 8)
        if replicas(url)[lost]["served"] > served:
            break
    assert replicas(url)[lost]["served"] == served + 1, replicas(url)
    # b's agent killed (its stage dies with it): nothing to start it on, the replica stays down in one line
    started["b"][0].p.kill()
    assert wait_until(lambda: "stays down" in (replicas(url)[lost]["message"] or ""), 120), replicas(url)
    assert chat.text().count(f"replica {lost} stays down: node b") == 1, chat.text()[-3000:]
    equal_transformers_at_once(url, model, tok, [ids(330, 6)], 8)
    assert head_metric(tmp_path / "run", "smolcluster_replica_up")[lost] == 0.0
    chat.p.send_signal(signal.SIGINT)
    assert chat.wait(timeout=60) == 0, chat.text()[-3000:]
    wait_gone(role_pids(started["a"][0]) + role_pids(started["b"][0]))


def test_cluster_auto_refuses_more_replicas_than_its_agents_hold_in_one_line():
    from smolcluster.errors import ConfigError
    from smolcluster.node.coordinator import place_replicas
    from smolcluster.node.discovery import NodeInfo

    def node(name: str, gb: float) -> NodeInfo:
        return NodeInfo(name=name, host="127.0.0.1", port=5660, key="k", fingerprint=name, version="v",
                        protocol=1, device="cpu", cores=1, memory_gb=gb)

    nodes = [node("a", 4), node("b", 16), node("c", 8), node("d", 2), node("e", 1)]
    # stage 0 of both replicas on the two largest nodes, stage 1 on the next two; one node per stage
    assert [[n.name for n in r] for r in place_replicas(nodes, 2, 2)] == [["b", "a"], ["c", "d"]]
    assert [n.name for n in place_replicas(nodes[:1], 2, 1)[0]] == ["a", "a"]  # one replica cycles, as before
    with pytest.raises(ConfigError, match=r"^replicas=3 x stages=2 needs 6 agents \(a node per stage\), found 5: "
                                          r"2 replicas fit: use replicas=2, or start more agents$"):
        place_replicas(nodes, 2, 3)
    with pytest.raises(ConfigError, match=r"found 3: use replicas=1 \(one pipeline may share nodes\)"):
        place_replicas(nodes[:3], 2, 2)


def test_replicas_resolved_at_once_from_a_random_init_serve_the_same_weights():
    """Sessions.start builds replicas in parallel threads: each random init must be the same weights, not draws from
    one global generator racing another."""
    import shutil

    from hydra import compose, initialize_config_dir
    from safetensors.torch import load

    from smolcluster.inference.from_config import replica_settings, resolve_model
    from smolcluster.paths import CONFIG_DIR
    from smolcluster.serving.settings import chat_settings

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = chat_settings(compose("chat", overrides=["replicas=3", "seed=5"])).pipeline
    start, out = threading.Barrier(3), [None] * 3

    def resolve(r: int) -> None:
        start.wait(timeout=60)
        out[r] = resolve_model(replica_settings(cfg, r))

    threads = [threading.Thread(target=resolve, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(o is not None for o in out), "a replica's resolve_model failed (see the thread's traceback)"
    try:
        files = [sorted(tmp.glob("*.safetensors")) for _, _, tmp in out]
        assert files[0] and [f.name for f in files[0]] == [f.name for f in files[1]] == [f.name for f in files[2]]
        weights = [{k: v for f in fs for k, v in load(f.read_bytes()).items()} for fs in files]
        assert weights[0].keys() == weights[1].keys() == weights[2].keys()
        for name, w in weights[0].items():
            assert torch.equal(w, weights[1][name]) and torch.equal(w, weights[2][name]), name
    finally:
        for _, _, tmp in out:
            shutil.rmtree(tmp, ignore_errors=True)


def own_stages() -> list[psutil.Process]:
    """This test process's own stage children (a chat fixture's stages are its grandchildren)."""
    out = []
    for p in psutil.Process().children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "stage-" in p.cmdline()[-1]:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return out


def test_closing_the_sessions_waits_for_a_reconnect_in_progress_and_closes_what_it_built(tmp_path):
    from smolcluster.inference import InferencePipeline
    from smolcluster.serving.sessions import Sessions

    model = tiny_gpt2(tmp_path / "model")
    connects: list[int] = []

    def connect():
        connects.append(1)
        return InferencePipeline.start_local(model, stages=2, heartbeat_s=0.2, liveness_s=3)

    sessions = Sessions(connect, watch_s=0.1).start()
    sessions.REBUILD_JOIN_S = 300.0  # a loaded machine starts stages slowly; the join must outlast the start
    try:
        (stage1,) = [p for p in own_stages() if p.cmdline()[-1].endswith("stage-1.json")]
        stage1.send_signal(signal.SIGKILL)
        assert wait_until(lambda: len(connects) == 2, 120), "the lost pipeline was never rebuilt"
    finally:
        sessions.close()  # while the rebuild is starting its stages
    assert [t.name for t in threading.enumerate() if t.name.startswith("serving-rebuild")] == []
    assert wait_until(lambda: not own_stages(), 60), f"the rebuilt pipeline's stages outlived close(): {own_stages()}"


def _beat_until(restarts, cond, timeout_s: float, before=None) -> list[float]:
    """What the coordinator's heartbeat thread does (Restarts.beat every 0.05 s), until ``cond()``: each beat's
    seconds. ``before()``: called before each beat."""
    import time

    took, deadline = [], time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not reached in {timeout_s}s: {[(x.name, x.state) for x in restarts.stages]}"
        if before is not None:
            before()
        t0 = time.monotonic()
        restarts.beat()
        took.append(time.monotonic() - t0)
        time.sleep(0.05)
    return took


def test_restarts_through_real_agents_give_up_in_one_line_and_never_stall_the_heartbeat(tmp_path, procs, monkeypatch):
    """Restarts (node/restarts.py) with the real Run and two real agents (no stage process: each start fails at once).
    Replica 1's stage is started on agent b with weights its cache does not hold (as after the cache pruned them):
    b answers each start ``failed`` naming that; it is started again at most RESTARTS times, then the replica stays
    down in one line, its other stage (on agent a) is stopped (the port held for it let go), and the head's revive
    says why. Then b stops answering (SIGSTOP) just as a restart asks it for the stage's port: no beat waits for it,
    agent a stays alive and its replica up, the restart ends after cluster.connect_timeout_s in one line, and b is
    declared gone. Closed, nothing is restarted and a head waiting in revive is let go."""
    import os
    import time

    from loguru import logger

    from smolcluster.errors import ReplicaGone
    from smolcluster.node import restarts as restarts_mod
    from smolcluster.node.coordinator import Run
    from smolcluster.node.restarts import Restarts
    from smolcluster.train_settings import ClusterSpec
    from tests.test_node_agent import agents, paired_link, prepare

    monkeypatch.setattr(restarts_mod, "RESTARTS", 2)  # (each try waits liveness_s: the test stays short)
    found = agents(tmp_path, prepare(tmp_path, ["a", "b"]), procs)
    links = {n: paired_link(tmp_path, n, port) for n, (_, port) in found.items()}
    c = ClusterSpec(heartbeat_s=0.2, liveness_s=2.0, connect_timeout_s=0.5)
    run = Run("inference", "rf1", c, links)
    pruned = {"config_files": {"config.json": "0" * 64}, "tensors": {}}  # b's cache holds none of it
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    node = {n: type("Node", (), {"name": n})() for n in "ab"}
    b = found["b"][0]
    try:
        held = run.reserve(links["a"], "r1 stage 1", "127.0.0.1")  # replica 1's stage 1, never started
        run.reserve(links["b"], "r1 stage 0", "127.0.0.1")
        run.start(links["b"], "r1 stage 0", "stage", 0, [], {}, "infer", pruned)
        restarts = Restarts(run, [[node["a"]], [node["b"], node["a"]]])
        assert not _bindable(held)
        _beat_until(restarts, lambda: restarts.stages[1].state == "gone", 30)
        with pytest.raises(ReplicaGone, match=r"^replica 1 stays down: its stage 0 on node b \(127.0.0.1:\d+\) failed "
                                              r"\(its weights are not all in this agent's cache \(cache entry 0{12} is "
                                              r"not here.*the cache may have pruned them.*started again 2 times in a row"):
            restarts.revive(1, timeout_s=5)
        assert sum("stays down" in ln for ln in lines) == 1, lines
        assert restarts.stages[2].state == "gone"  # its other stage: stopped, the port held for it let go
        assert wait_until(lambda: _bindable(held), 10)
        restarts.revive(0, timeout_s=5)  # the other replica: untouched

        # b stops answering as the restart asks it for the port: the heartbeat thread must not wait for it
        restarts = Restarts(run, [[node["a"]], [node["b"]]])  # (b's stage is "failed": noticed at once)
        st = restarts.stages[1]
        stopped: list[int] = []

        def stop_b_when_due() -> None:
            if not stopped and st.state == "waiting" and time.monotonic() - st.ended_at >= c.liveness_s:
                os.kill(b.p.pid, signal.SIGSTOP)
                stopped.append(b.p.pid)

        lines.clear()
        took = _beat_until(restarts, lambda: st.state == "gone", 30, before=stop_b_when_due)
        assert stopped and links["a"].alive and not links["b"].alive
        assert max(took) < 0.5, f"a beat waited {max(took):.2f}s on an agent"
        assert any(f"did not start within cluster.connect_timeout_s={c.connect_timeout_s:g}s" in ln for ln in lines)
        assert links["b"].roles["r1 stage 0"]["state"] == "failed"  # not "starting" forever (stop_everywhere waits)
        with pytest.raises(ReplicaGone, match=r"^replica 1 stays down: node b \(127.0.0.1:\d+\) is gone with its stage 0"):
            restarts.revive(1, timeout_s=5)
        restarts.revive(0, timeout_s=5)

        _closing_lets_a_waiting_head_go(run, links["a"], node["a"], pruned)
        _an_error_line_is_counted_a_late_start_adopted_and_a_stop_blocks_no_agent(links["a"], found["a"][0],
                                                                                  node["a"], lines)
    finally:
        logger.remove(sink)
        if b.p.poll() is None:
            os.kill(b.p.pid, signal.SIGCONT)
        for link in links.values():
            link.close()


def _closing_lets_a_waiting_head_go(run, link, node, model: dict) -> None:
    """Restarts closed while a head waits for a restart: it is let go, and nothing is started again."""
    from smolcluster.errors import ReplicaGone
    from smolcluster.node.restarts import Restarts

    run.reserve(link, "r0 stage 0", "127.0.0.1")
    run.start(link, "r0 stage 0", "stage", 0, [], {}, "infer", model)  # fails at once: its stage is waiting
    closing = Restarts(run, [[node]])
    _beat_until(closing, lambda: closing.stages[0].state == "waiting", 10)
    out: list = []
    waiter = threading.Thread(target=lambda: out.append(pytest.raises(ReplicaGone, closing.revive, 0, 60)))
    waiter.start()
    closing.close()
    waiter.join(timeout=10)
    assert "the coordinator is stopping the stages" in str(out[0].value)
    closing.stages[0].ended_at -= run.c.liveness_s  # due now: a tick would restart it, were it not closed
    closing.beat()
    assert closing.stages[0].state == "waiting" and not run.restarting


def _an_error_line_is_counted_a_late_start_adopted_and_a_stop_blocks_no_agent(link, agent, node, lines) -> None:
    """Replica 0 on agent a, two real stage processes: stage 0 prints ``error: cluster.port is not set ...`` and
    exits 2 each time it starts; stage 1 is frozen (SIGSTOP) as it starts. Stage 0's exit (an ``error`` line, no
    ``detail``) is counted, not fatal to a beat. Its restart's ``running``, held back past the deadline, leaves the
    role failed (not starting); arriving then, it is adopted as up (started again, it would find its port taken).
    On the real heartbeat thread (``_keep``) the replica is then given up in one line naming the error, and stage 1
    stopped: the agent answers ``status`` while that frozen process ignores its SIGTERM, then reports it stopped
    (continued, the SIGTERM ends it) and lets its port go."""
    import contextlib
    import os
    import re

    from smolcluster.node.coordinator import Run, _keep
    from smolcluster.node.restarts import Restarts
    from smolcluster.train_settings import ClusterSpec

    c = ClusterSpec(heartbeat_s=0.2, liveness_s=2.0, connect_timeout_s=30.0)  # (late: when the test says so)
    run = Run("inference", "rf2", c, {"a": link})
    ports = [run.reserve(link, f"r0 stage {i}", "127.0.0.1") for i in (0, 1)]
    run.start(link, "r0 stage 1", "stage", 1, [], {}, "infer")
    frozen = int(agent.wait_for(r"started r0 stage 1 \(stage\) for run rf2: pid (\d+)", timeout=30)[1].group(1))
    os.kill(frozen, signal.SIGSTOP)  # (it imports for seconds before it could exit)
    try:
        run.start(link, "r0 stage 0", "stage", 0, [], {}, "infer")
        restarts = Restarts(run, [[node, node]])
        st = restarts.stages[0]
        lines.clear()
        _beat_until(restarts, lambda: st.state == "waiting", 60)
        assert any(re.search(r"^replica 0: its stage 0 on node a \(127.0.0.1:\d+\) exited with code 2 \(cluster.port "
                             r"is not set: .*; starting it again in 2s", ln) for ln in lines), lines

        # the restart's start_role sent; the agent's answers held back until the restart is past its deadline
        _beat_until(restarts, lambda: st.state == "starting" and "r0 stage 0" not in run.restarting, 30)
        held: list = []
        while not any(m.kind == "role_state" and m.fields["name"] == "r0 stage 0" for m in held):
            held.append(link.ep.recv(30_000))
            assert held[-1] is not None, "the agent did not answer start_role within 30s"
        assert held[-1].fields["state"] == "running"
        st.started_at -= c.connect_timeout_s
        restarts.tick()
        assert st.state == "waiting" and link.roles["r0 stage 0"]["state"] == "failed"
        for msg in held:
            run.handle(link, msg)
        restarts.tick()
        assert st.state == "up" and not run.restarting  # adopted: nothing started again

        stop = threading.Event()
        keeper = threading.Thread(target=_keep, args=(run, restarts, stop), daemon=True)
        keeper.start()
        try:
            assert wait_until(lambda: st.state == "gone", 120), [(x.name, x.state) for x in restarts.stages]
            assert keeper.is_alive()
        finally:
            stop.set()
            keeper.join(10)
        gone = [ln for ln in lines if "stays down" in ln]
        assert len(gone) == 1 and re.search(r"^replica 0 stays down: its stage 0 on .* exited with code 2 \(cluster.port"
                                            r" is not set: .*started again 2 times in a row", gone[0]), lines
        agent.wait_for(r"stopping r0 stage 1", timeout=10)
        # The agent answers at once (before: 10 s deaf). The first answer read may be to a status the heartbeat
        # thread sent before it stopped: the state is the one a fresh answer holds, within the same 5 s.
        deadline, state = time.monotonic() + 5, None
        while state != "stopping" and time.monotonic() < deadline:
            answer = link.request("status", {}, "node_status", 5, on_other=run.handle)
            state = answer.fields["roles"]["r0 stage 1"]
        assert state == "stopping" and link.alive, state
        assert psutil.Process(frozen).status() == psutil.STATUS_STOPPED
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)  # its pending SIGTERM ends it
    _beat_until(restarts, lambda: link.roles["r0 stage 1"].get("state") == "stopped", 30)
    assert wait_until(lambda: _bindable(ports[1]), 10)


def _bindable(port: int) -> bool:
    """A plain bind (no SO_REUSEADDR) gets the port: no agent holds it any more."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
