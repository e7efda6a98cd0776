"""A model too big for one machine, under real memory limits: the cgroup v1 memory controller.

Each "node" is a memory cgroup with ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``,
so swap cannot hide an overrun) holding one real stage process, put there before it execs
Python. The model is a random-init Llama of ~300 MB in fp32; a stage process itself is charged
~150 MB before any weight (measured: its anonymous memory), so under a 400 MB limit:

- one stage holding the whole model is killed by the kernel's OOM killer (without placement),
  and ``partition=auto`` refuses it up front, naming the cgroup limit (the launcher reads it);
- two stages, each in its own 400 MB cgroup, generate what the whole model generates in one process;
- the same model with ``quantize=int8`` fits one stage under the same limit;
- three stages under limits of 1, 2 and 3 parts of headroom get blocks in that proportion, each
  stays under its limit, and an impossible fit is refused with no process left behind.

Every stage's peak (``memory.max_usage_in_bytes``, and VmHWM, its peak RSS) is printed
(``pytest -s``). Skipped where the memory controller is not writable (not root, cgroup v2 only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smolcluster.inference.api import InferencePipeline
from smolcluster.inference.placement import MARGIN, RUNTIME_BYTES, NodeMemory, auto_weights
from smolcluster.inference.stage import ServeConfig
from smolcluster.pipeline.architectures import KVCache, family_for
from smolcluster.pipeline.launch import free_ports, stage_env
from smolcluster.pipeline.quantize import StageFormat
from smolcluster.pipeline.weights import load_stage

ROOT = Path("/sys/fs/cgroup/memory")
MB = 1 << 20
LIMIT = 400 * MB
PROMPT = [5, 17, 42, 99, 3]
TOKENS = 12


def _why_not_writable() -> str | None:
    probe = ROOT / f"smolcluster-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as e:
        return f"the cgroup v1 memory controller is not writable at {ROOT} ({e.strerror}): run as root on a " \
               "machine that mounts it"
    try:
        (probe / "memory.limit_in_bytes").write_text(str(64 * MB))
    except OSError as e:
        return f"cannot set memory.limit_in_bytes under {ROOT} ({e.strerror})"
    finally:
        probe.rmdir()
    return None


_SKIP = _why_not_writable() if ROOT.is_dir() else f"no cgroup v1 memory controller mounted at {ROOT}"
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


class Node:
    """A memory cgroup standing for one machine with ``limit`` bytes."""

    def __init__(self, name: str, limit: int):
        self.dir, self.limit = ROOT / name, limit
        self.dir.mkdir()
        (self.dir / "memory.swappiness").write_text("0")
        (self.dir / "memory.limit_in_bytes").write_text(str(limit))
        if (self.dir / "memory.memsw.limit_in_bytes").exists():  # memory + swap: an overrun cannot go to swap
            (self.dir / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def read(self, name: str) -> int:
        return int((self.dir / name).read_text())

    def oom_kills(self) -> int:
        stat = dict(line.split() for line in (self.dir / "memory.oom_control").read_text().splitlines())
        return int(stat.get("oom_kill", 0))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.dir / "cgroup.procs").read_text().split()]

    def run(self, cmd: list[str], **kw) -> subprocess.Popen:
        """``cmd`` as a process inside this cgroup from its first instruction (a shell joins, then execs it)."""
        return subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.dir), *cmd], **kw)

    def remove(self) -> None:
        for pid in self.pids():  # only processes this test started live here
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.dir.rmdir()


@pytest.fixture
def nodes():
    made: list[Node] = []

    def make(limit: int) -> Node:
        made.append(Node(f"smolcluster-test-{os.getpid()}-{len(made)}", limit))
        return made[-1]

    yield make
    for node in made:
        node.remove()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random-init Llama (12 blocks of 768, GQA 12/4, 1024-token vocabulary): 77M parameters, 308 MB in fp32,
    with a byte-level tokenizer.json so ``python -m smolcluster.infer model.pretrained=DIR`` takes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama-308MB")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a model too big for one machine"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    config = json.loads((d / "config.json").read_text())
    return d, config


_REFERENCE: dict = {}


def reference(model, fmt: StageFormat) -> list[int]:
    """Greedy tokens of the whole model in ``fmt``, in this process (the equivalence the stages must meet)."""
    if fmt in _REFERENCE:
        return _REFERENCE[fmt]
    d, config = model
    stage = load_stage(d, config, range(12), embed=True, head=True, fmt=fmt)
    cache, out = KVCache(12), []
    with torch.inference_mode():
        x = stage.run_blocks(stage.embed(torch.tensor([PROMPT]), 0), cache)
        for _ in range(TOKENS):
            out.append(int(stage.logits(x, last_only=True)[0, -1].float().argmax()))
            x = stage.run_blocks(stage.embed(torch.tensor([[out[-1]]]), cache.length), cache)
    _REFERENCE[fmt] = out
    return out


def start_stages(model, where: list[Node], weights: list[float] | None, fmt: StageFormat, tmp: Path):
    """One real stage process per node (``python -m smolcluster.inference.stage``), each inside its cgroup."""
    d, config = model
    n = len(where)
    base = free_ports("127.0.0.1", n)
    addr = [{"address": f"tcp://127.0.0.1:{base + r}", "bind": f"tcp://127.0.0.1:{base + r}"} for r in range(n)]
    procs = []
    for rank, node in enumerate(where):
        sc = ServeConfig(rank=rank, n_stages=n, weights=str(d), config=config, nodes=addr, stage_weights=weights,
                         exit_with_head=True, threads=1, heartbeat_s=0.2, liveness_s=5.0, connect_timeout_s=300,
                         kv_cache_mb=16, precision=fmt.precision, quantize=fmt.quantize)
        path = tmp / f"stage-{rank}.json"
        path.write_text(sc.dumps())
        procs.append(node.run([sys.executable, "-u", "-m", "smolcluster.inference.stage", str(path)],
                              env=stage_env(n, {"SMOLCLUSTER_LOG_LEVEL": "WARNING"})))
    return procs, [a["address"] for a in addr]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generate_under_limits(model, where: list[Node], weights, fmt: StageFormat, tmp: Path) -> list[dict]:
    """Start the stages, generate, and report each one's peak while it still runs."""
    procs, addresses = start_stages(model, where, weights, fmt, tmp)
    try:
        with InferencePipeline.connect(addresses, heartbeat_s=0.2, liveness_s=5.0, connect_timeout_s=300) as pipe:
            got = pipe.submit(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False).tokens()
            blocks = pipe.client.partition
            report = [{"stage": r, "limit_mb": node.limit / MB, "peak_charged_mb": node.read(
                "memory.max_usage_in_bytes") / MB, "peak_rss_mb": peak_rss_mb(p.pid), "oom_kills": node.oom_kills()}
                for r, (node, p) in enumerate(zip(where, procs, strict=True))]
        for p in procs:
            p.wait(timeout=30)  # they exit with their head
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"\n{fmt.precision}/{fmt.quantize}, blocks {blocks}:")
    for row in report:
        print("  " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return [{"tokens": got, "blocks": blocks}, *report]


def test_a_model_over_one_limit_is_killed_in_one_stage_refused_up_front_and_runs_in_two(model, nodes, tmp_path):
    d, config = model
    arch = family_for(config)
    fp32_mb = arch.numel(True, True, range(12)) * 4 / MB
    assert fp32_mb > LIMIT / MB - 150  # the weights alone overrun what a stage has left under the limit

    # 1. One stage holding it all, no placement: the kernel's OOM killer ends it while it loads.
    one = nodes(LIMIT)
    procs, _ = start_stages(model, [one], None, StageFormat(), tmp_path)
    code = procs[0].wait(timeout=120)
    print(f"\none fp32 stage of {fp32_mb:.0f} MB under {LIMIT // MB} MB: exit {code}, "
          f"peak charged {one.read('memory.max_usage_in_bytes') / MB:.0f} MB, OOM kills {one.oom_kills()}")
    assert code == -signal.SIGKILL and one.oom_kills() >= 1

    # 2. partition=auto, launched on that node: refused before any stage starts, naming the cgroup limit.
    there = nodes(LIMIT)
    launcher = there.run([sys.executable, "-m", "smolcluster.infer", f"model.pretrained={d}", "stages=1",
                          "partition=auto", "prompt=hello", "max_new_tokens=4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stage_env(1))
    out, err = launcher.communicate(timeout=120)
    print(err.strip())
    assert launcher.returncode == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "the model does not fit: stage 0 needs" in lines[0], err
    assert f"cgroup memory limit {LIMIT // MB} MB at {there.dir}" in lines[0], lines[0]
    assert "would help: more stages, precision=bf16" in lines[0] and "quantize=int8" in lines[0]
    assert there.pids() == [] and there.read("memory.max_usage_in_bytes") < LIMIT  # no stage was started

    # 3. Two stages, each in its own cgroup with the same limit: placed by memory, they generate what the
    #    whole model generates in one process.
    pair = [nodes(LIMIT), nodes(LIMIT)]
    weights = auto_weights(arch, [StageFormat()] * 2, [NodeMemory(LIMIT, "cgroup")] * 2, head_first=True)
    run = generate_under_limits(model, pair, weights, StageFormat(), tmp_path)
    assert run[0]["tokens"] == reference(model, StageFormat())
    for row in run[1:]:
        assert row["oom_kills"] == 0 and row["peak_charged_mb"] < LIMIT / MB


def test_the_same_model_in_int8_fits_one_stage_under_the_limit(model, nodes, tmp_path):
    arch = family_for(model[1])
    fmt = StageFormat("fp32", "int8")
    weights = auto_weights(arch, [fmt], [NodeMemory(LIMIT, "cgroup")], head_first=True)  # not refused
    run = generate_under_limits(model, [nodes(LIMIT)], weights, fmt, tmp_path)
    assert run[0]["tokens"] == reference(model, fmt)
    assert run[1]["oom_kills"] == 0 and run[1]["peak_charged_mb"] < 0.75 * LIMIT / MB


def test_partition_auto_follows_three_limits_and_refuses_an_impossible_fit(model, nodes, tmp_path):
    """Limits of 1, 2 and 3 parts of headroom above what placement counts per stage: blocks 2 / 4 / 6."""
    d, config = model
    arch = family_for(config)
    fmt = StageFormat()
    part = 2 * arch.numel(False, False, range(1)) * 4 + (32 << 20)  # two blocks' fp32 weights, and room
    ends = arch.numel(True, True, range(0)) * 4  # stage 0 holds the embedding and the head (head=first)
    limits = [int((RUNTIME_BYTES + k * part + (ends if k == 1 else 0)) / (1 - MARGIN)) for k in (1, 2, 3)]
    three = [nodes(limit) for limit in limits]
    memory = [NodeMemory(limit, f"cgroup {i}") for i, limit in enumerate(limits)]
    weights = auto_weights(arch, [fmt] * 3, memory, head_first=True)
    run = generate_under_limits(model, three, weights, fmt, tmp_path)
    assert run[0]["blocks"] == [[0, 2], [2, 6], [6, 12]], run[0]
    assert run[0]["tokens"] == reference(model, fmt)
    for row in run[1:]:
        assert row["oom_kills"] == 0 and row["peak_charged_mb"] < row["limit_mb"], row

    # Half of each: no placement fits. Refused in one line before any stage starts: no process left running.
    import psutil

    from smolcluster.errors import ConfigError
    from smolcluster.inference.from_config import pipeline_from_config
    from smolcluster.inference.settings import Links, Pipeline

    cfg = Pipeline(model={"pretrained": str(d)}, stages=3, partition="auto",
                   links=Links(nodes=[{"memory_gb": limit / 2 / 2**30} for limit in limits]))
    before = set(psutil.Process().children(recursive=True))  # (an earlier test's multiprocessing helper may live on)
    with pytest.raises(ConfigError) as refused:
        pipeline_from_config(cfg, prompt="hello")
    print(refused.value)
    assert "\n" not in str(refused.value)
    assert "does not fit" in str(refused.value) and "cluster.nodes[" in str(refused.value)
    assert set(psutil.Process().children(recursive=True)) - before == set()  # no stage was started


def test_a_node_agent_advertises_the_memory_of_its_cgroup_not_of_the_machine(nodes):
    """node/protocol.facts() (what an agent tells the coordinator, which places roles by it) reads memory as the
    preflight and partition=auto do: within the agent's cgroup limit, far below this machine's MemAvailable."""
    limit = 300 * MB
    node = nodes(limit)
    probe = node.run([sys.executable, "-c", "from smolcluster.node.protocol import facts; print(facts()['memory_gb'])"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = probe.communicate(timeout=120)
    assert probe.returncode == 0, err[-2000:]
    assert 0 < float(out) <= limit / 2**30, (out, limit)
