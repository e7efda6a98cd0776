"""Weights that travel: ``infer cluster=auto`` sends each stage its share of the model into its agent's cache.

Real agents on loopback. As root, each agent runs in its own mount namespace where a tmpfs hides the
directory holding the model, so no agent (nor the stages it starts) can read the model's files: only the
head, this process's child, can. (Without root the agents could read them, and ``cluster.weights=send``
makes the head send all the same.) One sequence of runs on one pair of agents:

1. first run: every stage's cache holds exactly its own tensors (the stage-0 node: the embedding and the
   tokenizer; the other: the blocks), and the greedy text is ``transformers``' generate of the same weights;
2. second run: 0 bytes of weights sent (the log line the head prints), the same text;
3. a byte flipped in one cached tensor on one node and another tensor cut to a partial entry on the other:
   exactly the flipped entry's bytes plus the partial's rest are sent, and the text is the same;
4. a third agent whose cache sits on a 1 MB tmpfs is refused in one line before anything is sent.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path

import pytest

from smolcluster.pipeline.weights import read_header
from tests import test_node_agent
from tests.test_lora_serve import save_adapter
from tests.test_node_agent import Proc, listening, prepare, role_pids, wait_gone

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
procs = test_node_agent.procs  # the fixture: every process a test starts is stopped after it


def hidden_agent(tmp: Path, name: str, hide: Path, tiny_cache: bool = False) -> Proc:
    """An agent (``--state-dir tmp/name``) that cannot see ``hide`` (a tmpfs over it, in its own mount namespace)."""
    cmd = [sys.executable, "-u", "-m", "smolcluster.node", "--state-dir", str(tmp / name), "--name", name,
           "--port", "0", "--bind", "127.0.0.1", "--ready-file", str(tmp / f"{name}.ready"), "--no-mdns"]
    if not ROOT:
        return Proc(cmd)
    mounts = f"mount -t tmpfs none {hide}"
    if tiny_cache:
        (tmp / name / "weights").mkdir(parents=True, exist_ok=True)
        mounts += f" && mount -t tmpfs -o size=1m none {tmp / name / 'weights'}"
    return Proc(["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd])


def cached_keys(state: Path) -> dict[str, Path]:
    """{tensor key: blob} of the one-tensor safetensors entries in an agent's cache."""
    out = {}
    for blob in (state / "weights" / "blobs").iterdir():
        if blob.read_bytes()[:1] != b"{":  # (config.json and the tokenizer's files are JSON)
            header, _ = read_header(blob)
            out.update(dict.fromkeys(header, blob))
    return out


def test_weights_travel_to_agents_that_cannot_read_the_model(tmp_path, procs):
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer

    from smolcluster import checkpoint
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.models.gpt2 import build_gpt2

    d = write_tiny_run(tmp_path / "models" / "tiny", 128, vocab=500, n_layer=4)
    hf = build_gpt2(vocab_size=500, n_layer=4, n_head=4, n_embd=64, n_positions=128).eval()
    checkpoint.load(d, hf)
    adapter = save_adapter(copy.deepcopy(hf), tmp_path / "models" / "lora", 1, r=4, lora_alpha=8,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = tok.encode("class Foo").ids

    def greedy(model) -> str:
        want = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
        return "class Foo" + tok.decode(want[0, len(ids):].tolist())

    text, tuned = greedy(hf), greedy(PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval())
    assert tuned != text  # (the adapter changes the answer: the run through it proves it was applied)

    prepare(tmp_path, ["a", "b", "c"])
    started = {n: hidden_agent(tmp_path, n, tmp_path / "models", tiny_cache=n == "c") for n in ("a", "b", "c")}
    procs += started.values()
    ports = {n: listening(tmp_path, n, p) for n, p in started.items()}

    def infer(*names: str) -> Proc:
        extra = [n for n in names if "=" in n]
        names = tuple(n for n in names if "=" not in n)
        peers = ",".join(f"127.0.0.1:{ports[n]}" for n in names)
        c = Proc([sys.executable, "-u", "-m", "smolcluster.infer", "cluster=auto", f"cluster.peers=[{peers}]",
                  f"cluster.state_dir={tmp_path / 'coord'}", "cluster.mdns=false", f"checkpoint={d}",
                  "prompt=class Foo", "max_new_tokens=8", "stop_at_eos=false", "cluster.heartbeat_s=0.2",
                  *([] if ROOT else ["cluster.weights=send"]), *extra])
        procs.append(c)
        return c

    def run_ok(*extra: str, want: str = text) -> int:
        c = infer("a", "b", *extra)
        assert c.wait(timeout=180) == 0, c.text()[-4000:]
        assert want in c.text(), c.text()[-3000:]
        return int(re.search(r"weights: sent (\d+) bytes in all", c.text()).group(1))

    lora = f"adapters={{tuned:{adapter}}}"  # the LoRA adapter travels with the weights: each stage applies it
    sent = run_ok(lora)
    first = next(n for n in ("a", "b") if list((tmp_path / n / "runs").glob("*/stage_0")))
    other = "b" if first == "a" else "a"
    everything = {n: cached_keys(tmp_path / n) for n in ("a", "b")}
    keys = {n: {k: b for k, b in got.items() if ".lora_" not in k} for n, got in everything.items()}
    header, _ = read_header(d / "checkpoint.safetensors")
    assert set(keys[first]) | set(keys[other]) == set(header) and not set(keys[first]) & set(keys[other])
    lora_keys = set(read_header(adapter / "adapter_model.safetensors")[0]) - {"__metadata__"}
    assert all(lora_keys == set(everything[n]) - set(keys[n]) for n in ("a", "b"))  # both stages hold it whole
    assert "transformer.wte.weight" in keys[first]
    assert {"transformer.h.3.attn.c_attn.weight", "transformer.h.2.mlp.c_fc.weight"} <= set(keys[other])
    assert sent == sum(b.stat().st_size for n in ("a", "b") for b in (tmp_path / n / "weights" / "blobs").iterdir())
    assert len(list((tmp_path / first / "runs").glob("*/stage_0/model/tokenizer.json"))) == 1
    assert not list((tmp_path / other / "runs").glob("*/stage_*/model/tokenizer.json"))

    assert run_ok(lora, "adapter=tuned", want=tuned) == 0  # the same weights again: nothing sent; the adapter's text

    flipped = keys[first]["transformer.wte.weight"]  # one byte flipped on disk, amid the embedding's bytes
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(raw)
    cut = keys[other]["transformer.h.3.mlp.c_fc.weight"]  # an interrupted transfer: 1000 bytes arrived
    whole = cut.stat().st_size
    (tmp_path / other / "weights" / "partial" / cut.name).write_bytes(cut.read_bytes()[:1000])
    cut.unlink()
    assert run_ok() == len(raw) + whole - 1000
    assert flipped.read_bytes() != bytes(raw) and cut.is_file()

    if ROOT:  # a node without the disk for its share: one line, and nothing sent to any node
        c = infer("c")
        assert c.wait(timeout=120) == 2, c.text()[-3000:]
        last = c.text().strip().splitlines()[-1]
        assert re.fullmatch(r"error: node c \(.*\) has \d+ [MG]B free for its weight cache, its stages' weights "
                            r"need .* more: .*", last), last
        assert "weights: sent" not in c.text() and "weights:" not in c.text().replace(last, "")
    wait_gone([pid for p in started.values() for pid in role_pids(p)])
    assert json.loads((tmp_path / "coord" / "coordinator" / "weight-hashes.json").read_text())


def test_the_cache_keeps_what_hashes_right_resumes_a_partial_entry_and_drops_a_corrupt_one(tmp_path):
    import hashlib

    from smolcluster.node.weightcache import CacheError, WeightCache

    data = bytes(range(256)) * 40
    sha, cache = hashlib.sha256(data).hexdigest(), WeightCache(tmp_path / "w")
    assert cache.status({sha: len(data)}) == {sha: 0}
    assert not cache.write(sha, len(data), 0, data[:3000])
    assert WeightCache(tmp_path / "w").status({sha: len(data)}) == {sha: 3000}  # what arrived stays
    with pytest.raises(CacheError, match="at byte 0, but 3000 bytes are here"):
        cache.write(sha, len(data), 0, data[:10])
    assert cache.write(sha, len(data), 3000, data[3000:])
    assert cache.path(sha).read_bytes() == data and cache.status({sha: len(data)}) == {sha: len(data)}
    cache.path(sha).write_bytes(data[:-1] + b"x")  # flipped on disk: dropped, to be fetched again
    assert cache.status({sha: len(data)}) == {sha: 0} and not cache.path(sha).exists()
    with pytest.raises(CacheError, match="hashes to"):  # arrived whole but wrong: discarded
        cache.write(sha, len(data), 0, data[:-1] + b"x")
    assert cache.status({sha: len(data)}) == {sha: 0}
    # an agent stopped between the last write and the move leaves a whole partial entry: moved in if right
    (cache.partial / sha).write_bytes(data)
    assert WeightCache(tmp_path / "w").status({sha: len(data)}) == {sha: len(data)} and cache.path(sha).is_file()
    cache.path(sha).unlink()
    (cache.partial / sha).write_bytes(data[:-1] + b"x")  # ... and dropped if not
    assert cache.status({sha: len(data)}) == {sha: 0} and not (cache.partial / sha).exists()
    with pytest.raises(CacheError, match="not a sha256"):
        cache.path("../../etc/passwd")


def test_the_cache_prunes_least_recently_used_entries_of_other_models_and_matches_files_by_content(tmp_path):
    import hashlib

    from smolcluster.node.weightcache import DISK_MARGIN, WeightCache

    cache = WeightCache(tmp_path / "w", cap_bytes=3000)
    blobs = [bytes([i]) * 1000 for i in range(4)]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    for i, (sha, b) in enumerate(zip(shas[:3], blobs[:3])):
        assert cache.write(sha, 1000, 0, b)
        os.utime(cache.path(sha), ns=(i * 10**9, i * 10**9))  # written oldest first: 0, 1, 2
    assert cache.status({shas[0]: 1000}) == {shas[0]: 1000}  # asked for: 0 is now the most recently used
    # a run needing 0 and a new 1000-byte entry, under a 3000-byte cap: one of 1 and 2 must go, the older (1)
    assert cache.make_room({shas[0], shas[3]}, 1000) == 1000
    assert [cache.path(s).is_file() for s in shas[:3]] == [True, False, True]
    assert cache.make_room({shas[0], shas[3]}, 1000) == 0 and cache.used_bytes() == 2000  # it fits now
    assert cache.room() == 1000 + DISK_MARGIN  # what a head may count on here: the cap's rest (the disk has more)
    # an ask that cannot fit whatever is pruned prunes nothing (the head refuses the node; other models stay)
    assert cache.make_room({shas[0]}, 10**15) == 0 and cache.path(shas[2]).is_file()
    # an entry used in the last IN_USE_S (another head's stage about to load it) is never pruned
    os.utime(cache.path(shas[2]))
    assert cache.make_room({shas[0]}, 2000) == 0 and cache.path(shas[2]).is_file()
    # without a cap, only the disk bounds the cache: nothing is pruned while the disk has room
    assert WeightCache(tmp_path / "w").make_room(set(), 1000 - DISK_MARGIN) == 0

    model, other = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    for f, b in ((model, blobs[0]), (other, blobs[1])):  # same size, different bytes (another checkpoint)
        f.parent.mkdir()
        f.write_bytes(b)
    assert cache.file_matches(str(model), 1000, shas[0])
    assert not cache.file_matches(str(other), 1000, shas[0])  # same path and size elsewhere is not enough
    assert not cache.file_matches(str(model), 999, shas[0]) and not cache.file_matches(str(tmp_path / "x"), 1, "")
    assert json.loads((tmp_path / "w" / "files.json").read_text())  # hashed once, remembered per size and mtime
