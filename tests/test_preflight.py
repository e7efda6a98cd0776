"""What the preflight measures on a node: memory (RAM, the cgroup's limit, VRAM) and a matmul speed.

The cgroup test puts a real process under a real cgroup v1 memory limit (root only) and checks
that ``python -m launchers.preflight --local`` reports that limit and never offers more than it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launchers import resources
from tests.conftest import REPO

V1 = Path("/sys/fs/cgroup/memory")


def local_facts(prefix: str = "") -> dict:
    cmd = f"{prefix}exec {sys.executable} -m launchers.preflight --local --json"
    got = subprocess.run(["sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)


def test_local_probe_reports_ram_and_a_measured_speed():
    facts = local_facts()
    ram = facts["ram"]
    assert 0 < ram["available"] <= ram["total"]
    assert 0 < facts["usable_bytes"] <= ram["available"] * 1.5  # available RAM drifts between reads
    assert facts["gflops"]["cpu"] > 0.05  # a real 512x512 fp32 matmul rate, not a constant


@pytest.mark.skipif(os.geteuid() != 0 or not (V1 / "memory.limit_in_bytes").is_file(),
                    reason="needs root and the cgroup v1 memory controller")
def test_a_cgroup_v1_limit_caps_what_the_node_offers(tmp_path):
    group = V1 / f"smolcluster-preflight-{os.getpid()}"
    group.mkdir()
    try:
        limit = 700 << 20
        (group / "memory.limit_in_bytes").write_text(str(limit))
        facts = local_facts(f"echo $$ > {group}/cgroup.procs && ")
        cg = facts["cgroup"]
        assert cg["version"] == 1 and cg["limit"] == limit and cg["path"] == str(group)
        assert 0 < cg["held"] <= cg["usage"] < limit
        assert facts["usable_bytes"] == limit - cg["held"] < facts["ram"]["available"]
    finally:
        group.rmdir()  # its one process has exited


def test_cgroup_v2_the_tightest_limit_of_the_process_and_its_ancestors(tmp_path):
    """v2 (no v2 memory controller on these machines): the same walk over a cgroupfs-shaped tree."""
    (tmp_path / "proc").write_text("0::/a/b\n")
    b = tmp_path / "fs" / "a" / "b"
    b.mkdir(parents=True)
    (b / "memory.max").write_text("max\n")             # the process's own cgroup: no limit
    (b.parent / "memory.max").write_text(str(3 << 30))  # its parent's binds it
    (b.parent / "memory.current").write_text(str(3 << 29))
    (b.parent / "memory.stat").write_text(f"anon {1 << 30}\nfile {1 << 29}\n")  # page cache: reclaimable
    (tmp_path / "fs" / "memory.max").write_text("max\n")
    cg = resources.cgroup_memory(str(tmp_path / "proc"), str(tmp_path / "fs"))
    assert cg == {"version": 2, "path": str(b.parent), "limit": 3 << 30, "usage": 3 << 29, "held": 1 << 30}
    facts = {"ram": {"total": 8 << 30, "available": 6 << 30}, "cgroup": cg,
             "vram": [{"device": "cuda:0", "name": "x", "free": 5 << 30, "total": 8 << 30}]}
    assert resources.usable_bytes(facts) == 2 << 30            # limit less what is held, under available RAM
    assert resources.usable_bytes(facts, "cuda") == 5 << 30    # a cuda stage: the GPU's free memory
    (tmp_path / "proc").write_text("0::/\n")
    assert resources.cgroup_memory(str(tmp_path / "proc"), str(tmp_path / "fs")) is None


def test_partition_auto_prefers_the_faster_node_when_its_share_fits():
    """With every node's measured speed (cluster.nodes[i].gflops), blocks go by speed unless that split
    overflows a node's memory; then the split by memory stands."""
    from smolcluster.inference.placement import MARGIN, auto_weights, prefer_faster, stage_bytes
    from smolcluster.pipeline.architectures import family_for
    from smolcluster.pipeline.quantize import StageFormat

    arch = family_for({"model_type": "gpt2", "n_layer": 8, "n_embd": 1024, "n_head": 8, "vocab_size": 500,
                       "n_positions": 128})  # ~50 MB of fp32 weights per block
    fmts = [StageFormat("fp32", "none", 64)] * 2
    speed = [10.0, 30.0]
    roomy = [4 << 30, 4 << 30]
    weights = prefer_faster(arch, fmts, roomy, speed, True, 1, auto_weights(arch, fmts, roomy, True, 1))
    assert weights == speed
    blocks = [len(s.blocks) for s in arch.plan(2, weights, head_first=True)]
    assert blocks[1] > blocks[0]  # the 3x faster node takes most blocks (stage 0 also holds embedding + head)
    # the fast node's memory just short of its speed share (its blocks, KV and runtime, plus the margin)
    fast = arch.plan(2, speed, head_first=True)[1]
    tight = [4 << 30, int(stage_bytes(arch, fmts[1], fast.blocks, fast.first, False, 1) / (1 - MARGIN)) - (4 << 20)]
    by_memory = auto_weights(arch, fmts, tight, True, 1)
    assert prefer_faster(arch, fmts, tight, speed, True, 1, by_memory) == by_memory
    assert [len(s.blocks) for s in arch.plan(2, by_memory, head_first=True)][1] < blocks[1]
