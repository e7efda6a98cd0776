"""``python -m launchers.ssh serve --weights``: each stage's share of the weights travels over SSH into its host's cache.

The real sshd of test_ssh_launcher.py on loopback. Every stage host's Python (``ssh.python``) is a wrapper that
runs it in its own mount namespace with a tmpfs over the model's directory, so neither the receiver nor the
stages on either "host" can read the model's files: only the launcher and the head (this test's children) can.
Each host caches in its own ``ssh.state_dir``. One sequence of runs:

1. first run: every byte of both stages' shares is sent; each cache holds exactly its stage's tensors (stage 0
   the embedding and the tokenizer), and a head attached to the stages answers ``transformers``' greedy text;
2. second run: 0 bytes sent;
3. a byte flipped in one cached tensor: exactly that entry is sent again (and hashes right there);
4. a host whose cache sits on a 1 MB tmpfs is refused in one line before anything is sent.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO
from tests.test_ssh_launcher import cluster_file, sshd, wait_until_gone  # noqa: F401 (sshd: a fixture)
from tests.test_weights_travel import cached_keys

SENT = re.compile(r"weights: sent (\d+) bytes in all")


def hidden_python(path: Path, hide: Path, tiny: Path | None = None) -> Path:
    """A python for ``ssh.python`` that cannot see ``hide`` (and whose ``tiny`` dir is a 1 MB tmpfs)."""
    mounts = f"mount -t tmpfs none {hide}" + (f" && mount -t tmpfs -o size=1m none {tiny}" if tiny else "")
    path.write_text("#!/bin/sh\nexec unshare --mount --propagation private sh -c "
                    f"'{mounts} && exec \"$@\"' sh {sys.executable} \"$@\"\n")
    path.chmod(0o755)
    return path


def stage_cluster(tmp: Path, server, model: Path, tiny: bool = False) -> tuple[Path, list[Path]]:
    """The test's cluster file, its two stage hosts each with a hidden-model python and its own cache."""
    path = cluster_file(tmp / "c.yaml", server)
    c = OmegaConf.to_container(OmegaConf.load(path))
    states = [tmp / "state-bravo", tmp / "state-charlie"]
    for node, state in zip(c["nodes"], states, strict=True):
        (state / "weights").mkdir(parents=True, exist_ok=True)
        python = hidden_python(tmp / f"python-{node['name']}", model, state / "weights" if tiny else None)
        node["ssh"] = {"python": str(python), "state_dir": str(state)}
    OmegaConf.save(OmegaConf.create(c), path)
    return path, states


class Serve:
    """``launchers.ssh serve`` running until stopped; its output in a file."""

    def __init__(self, tmp: Path, cluster: Path, model: Path, tag: str, *extra: str):
        self.out_path, self.run_dir = tmp / f"launcher-{tag}.out", tmp / f"serve-{tag}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launchers.ssh", "serve", "--no-check", "--cluster", str(cluster), "--run-dir",
             str(self.run_dir), *extra, f"checkpoint={model}", "stages=2"],
            cwd=REPO, stdout=self.out_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(tmp / "home")})  # (the launcher's hash book)

    def text(self) -> str:
        return self.out_path.read_text()

    def wait_for(self, what: str, timeout: float = 150) -> str:
        deadline = time.monotonic() + timeout
        while what not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()[-4000:]
            time.sleep(0.2)
        return self.text()

    def sent(self) -> int:
        return int(SENT.search(self.wait_for(" bytes in all")).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        assert not wait_until_gone(str(self.run_dir), timeout=30)


def head_text(tmp: Path, serve: Serve, prompt: str, n: int) -> str:
    """Attach a chat head with the command the launcher printed; its greedy completion of ``prompt``."""
    import httpx

    attach = serve.wait_for("stages ready").split("attach a head with\n")[1].splitlines()[0].split()
    head = subprocess.Popen([sys.executable, *attach[1:], "serve.port=0", "serve.ui=false"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=(tmp / "head.log").open("w"), text=True)
    try:
        url = next((line.split("smolcluster chat: ")[1].split()[0].rstrip("/")
                    for line in iter(head.stdout.readline, "") if "smolcluster chat: http://" in line), None)
        assert url, (tmp / "head.log").read_text()[-3000:]
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "run", "prompt": prompt, "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    finally:
        head.send_signal(signal.SIGINT)
        head.wait(timeout=30)


def transformers_text(model: Path, prompt: str, n: int) -> str:
    import torch
    from tokenizers import Tokenizer

    from smolcluster import checkpoint
    from smolcluster.models.gpt2 import build_gpt2
    from tests.test_infer import hf_greedy

    hf = build_gpt2(vocab_size=500, n_layer=2, n_head=4, n_embd=64, n_positions=256).eval()
    checkpoint.load(model, hf)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    with torch.no_grad():
        return tok.decode(hf_greedy(hf, tok.encode(prompt).ids, n))


def test_serve_sends_each_stage_its_weights_over_ssh(sshd, tmp_path):  # noqa: F811 (sshd: the fixture)
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.node.weightcache import file_sha256
    from smolcluster.pipeline.weights import read_header

    if os.geteuid() != 0:
        pytest.skip("needs root (sshd, and a mount namespace to hide the model)")
    model = write_tiny_run(tmp_path / "model" / "run", n_positions=256)
    hide = tmp_path / "model"
    cluster, states = stage_cluster(tmp_path, sshd, hide)
    prompt, n = "The meaning of life is", 10
    want = transformers_text(model, prompt, n)
    all_keys = set(read_header(model / "checkpoint.safetensors")[0]) - {"__metadata__"}

    first = Serve(tmp_path, cluster, hide / "run", "1")  # --weights auto: neither host reads the model files
    try:
        assert first.sent() > 0
        assert head_text(tmp_path, first, prompt, n) == want
    finally:
        first.stop()
    # each stage's cache: exactly its own tensors (stage 0 the embedding and the tokenizer; stage 1 block 1)
    keys = [set(cached_keys(s)) for s in states]
    assert keys[0] | keys[1] == all_keys and not keys[0] & {k for k in all_keys if ".h.1." in k}
    assert not keys[1] & {k for k in all_keys if ".h.0." in k} and any("wte" in k for k in keys[0])
    tokenizers = [any(b'"model"' in b.read_bytes()[:4096] and b"merges" in b.read_bytes() for b in
                      (s / "weights" / "blobs").iterdir()) for s in states]
    assert tokenizers == [True, False]
    assert first.sent() == sum(b.stat().st_size for s in states for b in (s / "weights" / "blobs").iterdir())

    second = Serve(tmp_path, cluster, hide / "run", "2")
    try:
        assert second.sent() == 0
        second.wait_for(" roles, run dir ")  # (the stages start; stopped as they do)
    finally:
        second.stop()

    blob = cached_keys(states[1])[next(k for k in sorted(keys[1]) if ".h.1." in k)]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    third = Serve(tmp_path, cluster, hide / "run", "3", "--weights", "send")
    try:
        assert third.sent() == len(data)  # exactly the flipped entry again, whole and right this time
        assert "; 1 of " in third.text() and "; 0 of " in third.text() and file_sha256(blob) == blob.name
        third.wait_for(" roles, run dir ")
    finally:
        third.stop()


def test_a_host_without_room_is_refused_before_anything_is_sent(sshd, tmp_path):  # noqa: F811
    from smolcluster.bench.common import write_tiny_run

    if os.geteuid() != 0:
        pytest.skip("needs root (sshd, and a mount namespace for the tiny disk)")
    model = write_tiny_run(tmp_path / "model" / "run", n_positions=256)
    cluster, _ = stage_cluster(tmp_path, sshd, tmp_path / "model", tiny=True)
    got = subprocess.run([sys.executable, "-m", "launchers.ssh", "serve", "--no-check", "--cluster", str(cluster),
                          "--run-dir", str(tmp_path / "serve"), "--weights", "send", f"checkpoint={model}",
                          "stages=2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path / "home")})
    assert got.returncode == 2, got.stdout[-3000:] + got.stderr[-3000:]
    error = got.stderr.strip().splitlines()[-1]
    assert error.startswith("error: host root@127.0.0.1:") and "free for its weight cache" in error, error
    assert "point ssh.state_dir at a disk with room" in error
    assert "weights: sent" not in got.stderr and "[stage" not in got.stdout  # nothing sent, no stage started


# -- the same path without sshd: ssh.local nodes run the receiver here (sh -c), each with its own cache ------------
def local_stages(tmp: Path, model: Path | str, monkeypatch, key: str = "checkpoint") -> tuple:
    from launchers.cluster_file import Node, SshSpec
    from launchers.ssh import compose_settings

    monkeypatch.setattr("launchers.ssh_weights.BOOK", tmp / "launcher" / "weight-hashes.json")
    spec, _, p = compose_settings("local", [f"{key}={model}", "stages=2"], config="infer")
    nodes = [Node("stage", r, f"s{r}", SshSpec(host="localhost", local=True, python=sys.executable,
                                                workdir=str(REPO), state_dir=str(tmp / f"state{r}")))
             for r in range(2)]
    return p, nodes, list(spec.cluster.nodes)


def top_lines(run_dir: Path) -> dict:
    """``{(stage, peer): gauges}`` of the weights endpoint announced in ``run_dir``, as ``smolcluster.top`` reads it."""
    from smolcluster.top import ClusterView

    view = ClusterView(run_dir=run_dir)
    try:
        node = next(n for n in view.poll() if n.weights and n.up)
    finally:
        view.close()
    return node.values["weights"]


def test_send_weights_to_local_hosts_resumes_a_partial_entry(tmp_path, monkeypatch, capfd):
    from launchers.ssh_weights import send_weights
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.telemetry.weights import WeightsMetrics

    model = write_tiny_run(tmp_path / "model", n_positions=64)
    p, nodes, entries = local_stages(tmp_path, model, monkeypatch)
    watch = WeightsMetrics({"run_id": "w", "node": "here"}, tmp_path / "top")  # what top reads: a line per host
    args = send_weights(p, nodes, entries, "send", progress=watch)
    first = int(SENT.search(capfd.readouterr().err).group(1))
    lines = top_lines(tmp_path / "top")
    assert sorted(stage for stage, _ in lines) == ["0", "1"]
    assert all(w["need"] == w["done"] == w["total"] > 0 for w in lines.values())
    assert sum(w["done"] for w in lines.values()) == first
    blobs = [sorted((tmp_path / f"state{r}" / "weights" / "blobs").iterdir()) for r in range(2)]
    assert first == sum(b.stat().st_size for bs in blobs for b in bs)
    maps = []
    for r, a in enumerate(args):  # each stage: checkpoint= its own directory of links into its own cache
        assert a[0].startswith("checkpoint=") and str(tmp_path / f"state{r}" / "ssh") in a[0]
        d = Path(a[0].split("=", 1)[1])
        maps.append(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
        assert all((d / f).resolve().parent == tmp_path / f"state{r}" / "weights" / "blobs" for f in maps[r].values())
    assert maps[0].keys() != maps[1].keys() and not {k for k in maps[0] if ".h.1." in k}

    # an interrupted transfer: half of one entry arrived; the next run sends exactly the other half
    blob = max(blobs[1], key=lambda b: b.stat().st_size)
    half = blob.read_bytes()[: blob.stat().st_size // 2]
    (blob.parent.parent / "partial" / blob.name).write_bytes(half)
    size = blob.stat().st_size
    blob.unlink()
    try:
        assert send_weights(p, nodes, entries, "send", progress=watch) == args
        lines = {stage: w for (stage, _), w in top_lines(tmp_path / "top").items()}
    finally:
        watch.close()
    assert int(SENT.search(capfd.readouterr().err).group(1)) == size - len(half) == lines["1"]["done"]
    assert lines["1"]["need"] == size - len(half) and lines["0"]["need"] == lines["0"]["done"] == 0  # "cached" in top
    assert blob.is_file() and not (blob.parent.parent / "partial" / blob.name).exists()

    # auto: these hosts read the launcher's very files (this machine): nothing sent, and each stage reads them
    # where the launcher found them (a relative checkpoint= made absolute, not left to the host's workdir)
    monkeypatch.chdir(tmp_path)
    p, nodes, entries = local_stages(tmp_path, model.name, monkeypatch)
    assert send_weights(p, nodes, entries, "auto") == [[f"checkpoint={model}"]] * 2
    err = capfd.readouterr().err
    assert err.count("reads the model files itself: nothing to send") == 2 and "weights: sent 0 bytes in all" in err


def test_auto_gives_a_host_that_reads_a_hub_model_the_directory_it_was_found_in(tmp_path, monkeypatch, capfd):
    from launchers.ssh_weights import send_weights
    from smolcluster.bench.common import write_tiny_run

    # a Hugging Face cache holding org/tiny (as huggingface-cli download leaves it), here only
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = write_tiny_run(repo / "snapshots" / "abc123", n_positions=64)
    (snapshot / "config.json").write_text("{}")  # (what the hub lookup asks the cache for)
    (snapshot / "checkpoint.json").write_text(json.dumps({"model": {"n_head": 4}}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # (where a hub id made a path would point: tmp_path/org/tiny, not there)
    p, nodes, entries = local_stages(tmp_path, "org/tiny", monkeypatch, key="model.pretrained")
    assert send_weights(p, nodes, entries, "auto") == [[f"model.pretrained={snapshot}"]] * 2
    assert capfd.readouterr().err.count("reads the model files itself: nothing to send") == 2


def receiver(state: Path, data: bytes, monkeypatch) -> tuple[int, bytes]:
    """The receiver's exit code and what it answered to ``data`` (run here: its process imports torch, slow)."""
    import io
    from types import SimpleNamespace

    from smolcluster.node.weightrecv import main

    out = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(data)))
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(buffer=out))
    code = main(["--state-dir", str(state)])
    monkeypatch.undo()
    return code, out.getvalue()


def chunk(sha: str, size: int, offset: int, data: bytes, n: int | None = None) -> bytes:
    return json.dumps({"op": "chunk", "sha": sha, "size": size, "offset": offset, "n": n or len(data)}).encode() + \
        b"\n" + data


def test_the_receiver_answers_a_chunk_past_its_entry_bad_with_why_and_goes_on(tmp_path, monkeypatch):
    import hashlib

    good = b"four"
    sha = hashlib.sha256(good).hexdigest()
    code, out = receiver(tmp_path, chunk(sha, 4, 0, b"ninebytes") + chunk(sha, 4, 0, good) + b'{"op": "bye"}\n',
                         monkeypatch)
    assert code == 0
    answers = [json.loads(line) for line in out.splitlines()]
    assert answers == [{"sha": sha, "offset": 0, "n": 9, "state": "bad",
                        "error": f"entry {sha[:12]}: a chunk ends at byte 9, past its size 4"},
                       {"sha": sha, "offset": 0, "n": 4, "state": "done"}]
    assert (tmp_path / "weights" / "blobs" / sha).read_bytes() == good


@pytest.mark.parametrize("data, error", [
    (b"[1, 2]\n", "CacheError: a message is a JSON object, not list"),
    (b'{"op": "chunk", "sha": "x", "size": 4, "offset": 0, "n": 1e999}\n', "OverflowError: "),
    (b"[" * 100_000 + b"\n", "RecursionError: "),
    (b"not json\n", "JSONDecodeError: "),
])
def test_the_receiver_refuses_a_bad_message_in_exactly_one_line(tmp_path, monkeypatch, data, error):
    code, out = receiver(tmp_path, data, monkeypatch)
    [line] = out.splitlines()
    assert code == 2 and json.loads(line)["error"].startswith(error), line


def test_the_receiver_refuses_a_symlinked_state_dir_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, out = receiver(tmp_path / "link", b'{"op": "bye"}\n', monkeypatch)
    [line] = out.splitlines()
    assert code == 2 and "is not a directory (a symlink?)" in json.loads(line)["error"]


def test_a_receiver_whose_input_ends_inside_a_chunk_says_so_in_exactly_one_line(tmp_path):
    got = subprocess.run([sys.executable, "-m", "smolcluster.node.weightrecv", "--state-dir", str(tmp_path)],
                         input=chunk("0" * 64, 9, 0, b"abc", n=9), capture_output=True, timeout=60, cwd=REPO)
    assert got.returncode == 2 and b"Traceback" not in got.stderr, got.stderr.decode()[-2000:]
    [line] = got.stdout.splitlines()
    assert json.loads(line) == {"error": "CacheError: the session ended inside a chunk (3 of 9 bytes)"}


def test_build_reuses_a_whole_stage_directory_and_rebuilds_a_broken_one(tmp_path):
    import hashlib

    from smolcluster.node.weightcache import WeightCache
    from smolcluster.node.weightrecv import build

    cache, blobs = WeightCache(tmp_path / "weights"), {}
    for data in (b'{"model_type": "gpt2"}', b"tensor bytes"):
        blobs[data] = hashlib.sha256(data).hexdigest()
        cache.write(blobs[data], len(data), 0, data)
    manifest = {"config_files": {"config.json": blobs[b'{"model_type": "gpt2"}']},
                "tensors": {"w": blobs[b"tensor bytes"]}, "adapters": {}}
    [arg] = build(cache, tmp_path, {"stage0": manifest})["stage0"]
    d = Path(arg.split("=", 1)[1])
    inode = d.stat().st_ino
    (d / "read-by-a-stage").touch()  # (what a running stage sees there: it must survive)
    # a second serve of the same model while a stage reads d: the very same directory, untouched
    assert build(cache, tmp_path, {"stage1": manifest}) == {"stage1": [arg]} and d.stat().st_ino == inode
    assert (d / "read-by-a-stage").is_file()
    assert (d / "config.json").read_bytes() == b'{"model_type": "gpt2"}'
    cache.path(blobs[b"tensor bytes"]).unlink()  # pruned since: rebuilt (and refused: the entry is not here)
    with pytest.raises(ValueError, match="is not here: send the weights first"):
        build(cache, tmp_path, {"stage0": manifest})
    assert sorted(p.name for p in (tmp_path / "ssh").iterdir()) == [d.parent.name]  # no temp left behind


def test_a_long_ask_says_busy_until_it_answers(tmp_path, monkeypatch):
    from smolcluster.node.weightcache import DISK_MARGIN, WeightCache

    e = big_entry(16)  # re-hashed at the ask: longer than the (shortened) keep-alive period
    WeightCache(tmp_path / "weights").write(e.sha, e.size, 0, e.prefix)
    monkeypatch.setattr("smolcluster.node.weightrecv.KEEPALIVE_S", 0.001)
    ask = json.dumps({"op": "ask", "entries": {e.sha: e.size}, "files": {}}).encode() + b"\n"
    code, out = receiver(tmp_path, ask + ask, monkeypatch)
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and answers[0]["busy"] == "re-hashing the cached weights" and answers[0]["hashed"] >= 0
    assert [a["have"] for a in answers if "busy" not in a] == [{e.sha: e.size}] * 2
    hashed = [a["hashed"] for a in answers if "busy" in a]
    assert hashed == sorted(hashed) and hashed[-1] <= 2 * e.size  # the bytes hashed so far, as they grow
    assert int((tmp_path / "weights" / ".lock").read_bytes()) == 2 * e.size  # (each ask re-hashed the entry)

    # the launcher waits through them: its answer is the real one (and ssh.weights_cache_gb caps the room there)
    monkeypatch.setattr("launchers.ssh_weights.RECEIVER", "import sys; import smolcluster.node.weightrecv as w; "
                        "w.KEEPALIVE_S = 0.001; sys.exit(w.main())")
    s = session(tmp_path, ".", weights_cache_gb=1)
    try:
        s.send(json.loads(ask))
        a = s.answer(60)
    finally:
        s.close()
    assert a["have"] == {e.sha: e.size} and a["free"] <= 2**30 - e.size + DISK_MARGIN


# -- the launcher's side of a session: a host that fails, stalls or answers as chunks arrive ------------------------
FAKE = """import sys, json, time
line = sys.stdin.readline()
if "stall" in sys.argv[-1]:
    print(json.dumps({"have": {}, "free": 1 << 40, "readable": False}), flush=True)
    time.sleep(600)  # reads nothing more
print(json.dumps({"error": "CacheError: the disk broke"}), flush=True)
"""


def session(tmp: Path, name: str, workdir: Path = REPO, weights_cache_gb: float | None = None):
    from launchers.cluster_file import Node, SshSpec
    from launchers.ssh_weights import Session

    spec = SshSpec(host="localhost", local=True, python=sys.executable, workdir=str(workdir),
                   state_dir=str(tmp / name), weights_cache_gb=weights_cache_gb)
    s = Session([Node("stage", 0, name, spec)], [0])
    s.start()
    return s


def big_entry(mib: int):
    import hashlib

    from smolcluster.node.weightsend import Entry

    e = Entry(os.urandom(mib << 20))
    e.sha = hashlib.sha256(e.prefix).hexdigest()
    return e


def test_a_host_setup_error_is_answered_at_once_with_its_line(tmp_path):
    from smolcluster.errors import PeerError

    s = session(tmp_path, "h", workdir=tmp_path / "nowhere")
    try:
        s.send({"op": "ask", "entries": {}, "files": {}})
        with pytest.raises(PeerError, match=r"failed: smolcluster-launch: no directory .*nowhere: set ssh.workdir"):
            s.answer(600)
    finally:
        s.close(done=False)


def test_the_bar_moves_as_the_host_answers(tmp_path):
    from launchers.ssh_weights import _send_entries

    s, e = session(tmp_path, "h"), big_entry(6)
    written, seen = [], []
    send = s.send
    s.send = lambda fields, data=b"": (send(fields, data), written.append(fields))
    s.entries = {e.sha: e}
    try:
        s.send({"op": "ask", "entries": {e.sha: e.size}, "files": {}})
        assert s.answer(60)["have"] == {e.sha: 0}
        written.clear()
        _send_entries(s, [(e, 0)], lambda n: seen.append((n, len(written))), 60)
    finally:
        s.close()
    assert sum(n for n, _ in seen) == e.size == s.sent and [f["op"] for f in written] == ["chunk"] * 6 + ["bye"]
    assert seen[0][1] < 6, seen  # the first answer counted before the last chunk was written


def test_a_host_that_stops_reading_is_ended_and_a_failed_host_stops_the_others(tmp_path, monkeypatch):
    from launchers.ssh_weights import stream
    from smolcluster.errors import PeerError

    monkeypatch.setattr("launchers.ssh_weights.RECEIVER", FAKE)
    stall = session(tmp_path, "stall")
    stall.send({"op": "ask", "entries": {}, "files": {}})
    stall.answer(60)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"owed 1 answers and said nothing for 2s: stopped sending"):
        stream([(stall, [(big_entry(8), 0)])], 2)  # its pipe fills: the write blocks until the session ends
    assert time.monotonic() - t0 < 30

    stall, broken = session(tmp_path, "stall2"), session(tmp_path, "broken")
    stall.send({"op": "ask", "entries": {}, "files": {}})
    stall.answer(60)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"\(stage 0, ssh.state_dir .*broken\).*: CacheError: the disk broke"):
        stream([(stall, [(big_entry(8), 0)]), (broken, [(big_entry(1), 0)])], 300)
    assert time.monotonic() - t0 < 30 and stall.proc.poll() is not None


# -- two receivers on one host's cache: turns, and an entry one of them is writing --------------------------------
class Lines:
    """A receiver's stdout, read as it writes (from another thread)."""

    def __init__(self):
        self.data = b""

    def write(self, b: bytes) -> None:
        self.data += b

    def flush(self) -> None:
        pass

    def wait_for(self, test, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not any(test(a) for a in self.answers()):
            assert time.monotonic() < deadline, self.answers()
            time.sleep(0.01)
        return self.answers()

    def answers(self) -> list[dict]:
        return [json.loads(line) for line in self.data.splitlines()]


def count(state: Path, n: int) -> None:
    """What a receiver holding the cache's lock writes there: the bytes hashed on the cache so far."""
    fd = os.open(state / "weights" / ".lock", os.O_WRONLY)
    os.pwrite(fd, b"%020d" % n, 0)
    os.close(fd)


def test_a_receiver_waiting_for_its_turn_says_busy_with_the_holders_progress(tmp_path, monkeypatch):
    import fcntl
    import threading

    from smolcluster.node import weightrecv

    monkeypatch.setattr(weightrecv, "KEEPALIVE_S", 0.01)
    (tmp_path / "weights").mkdir()
    holder = open(tmp_path / "weights" / ".lock", "a+b")  # another receiver's turn, 5 bytes hashed so far
    fcntl.flock(holder, fcntl.LOCK_EX)
    count(tmp_path, 5)
    out = Lines()
    ask = json.dumps({"op": "ask", "entries": {}, "files": {}}).encode() + b"\n"
    t = threading.Thread(target=weightrecv.serve, args=(tmp_path, io.BytesIO(ask + b'{"op": "bye"}\n'), out))
    t.start()
    try:
        out.wait_for(lambda a: a.get("hashed") == 5)
        count(tmp_path, 9)  # the holder gets on
        out.wait_for(lambda a: a.get("hashed") == 9)
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        t.join(30)
    answers = out.answers()
    # Waiting lines while the holder has the turn; once it is this receiver's, its own re-hash may say so too
    # (keepalives every 10 ms here: a slow machine's re-hash of an empty cache can take longer than that).
    busy = [a["busy"] for a in answers[:-1]]
    waiting = "waiting for another receiver's turn on this cache"
    turn = busy.index("re-hashing the cached weights") if "re-hashing the cached weights" in busy else len(busy)
    assert turn > 0 and set(busy[:turn]) == {waiting}, busy
    assert set(busy[turn:]) <= {"re-hashing the cached weights"}, busy
    assert answers[-1]["have"] == {} and not t.is_alive()


FAKE_BUSY = """import sys, json, time
sys.stdin.readline()
grows = "grows" in sys.argv[-1]
for i in range(30 if grows else 10**6):  # 3 s of busy lines: the hashed count grows, or stays put (a hung disk)
    print(json.dumps({"busy": "re-hashing the cached weights", "hashed": i if grows else 7}), flush=True)
    time.sleep(0.1)
print(json.dumps({"have": {}, "free": 1, "readable": False}), flush=True)
"""


def test_the_launcher_waits_while_a_busy_host_gets_on_and_not_while_it_is_stuck(tmp_path, monkeypatch):
    from smolcluster.errors import PeerError

    monkeypatch.setattr("launchers.ssh_weights.RECEIVER", FAKE_BUSY)
    grows, stuck = session(tmp_path, "grows"), session(tmp_path, "stuck")
    try:
        for s in (grows, stuck):
            s.send({"op": "ask", "entries": {}, "files": {}})
        assert grows.answer(1)["have"] == {}  # 3 s of busy lines, each with more hashed: waited through
        t0 = time.monotonic()
        with pytest.raises(PeerError, match=r"stuck.*answered nothing \(nor got on\) within 1s"):
            stuck.answer(1)
        assert time.monotonic() - t0 < 10
    finally:
        grows.close(done=False)
        stuck.close(done=False)


def test_a_second_transfer_of_an_entry_being_written_is_refused_in_one_line(tmp_path, monkeypatch):
    import hashlib
    import threading

    from smolcluster.errors import PeerError
    from smolcluster.node.weightrecv import serve

    data = os.urandom(100)
    sha = hashlib.sha256(data).hexdigest()
    ask = json.dumps({"op": "ask", "entries": {sha: 100}, "files": {}}).encode() + b"\n"
    r, w = os.pipe()
    out, feed = Lines(), os.fdopen(w, "wb", buffering=0)
    first = threading.Thread(target=serve, args=(tmp_path, os.fdopen(r, "rb"), out))
    first.start()
    try:
        feed.write(ask + chunk(sha, 100, 0, data[:60]))  # the first serve: 60 of 100 bytes arrived
        out.wait_for(lambda a: a.get("state") == "partial")
        code, said = receiver(tmp_path, ask + b'{"op": "bye"}\n', monkeypatch)  # a second serve meanwhile
        assert code == 0 and [json.loads(line) for line in said.splitlines()] == [{"taken": 1}]
        s = session(tmp_path, ".")  # the launcher says it in one line
        try:
            s.send(json.loads(ask))
            with pytest.raises(PeerError, match=r"^weights: another transfer of this model to .* is in progress: "
                                                r"wait for it or run again$"):
                s.answer(60)
        finally:
            s.close(done=False)
        feed.write(chunk(sha, 100, 60, data[60:]) + b'{"op": "bye"}\n')  # the first finishes, whole and right
    finally:
        feed.close()
        first.join(30)
    assert [a.get("state") for a in out.answers()[1:]] == ["partial", "done"]
    code, said = receiver(tmp_path, ask + b'{"op": "bye"}\n', monkeypatch)  # and then the entry is simply here
    assert code == 0 and json.loads(said.splitlines()[-1])["have"] == {sha: 100}
