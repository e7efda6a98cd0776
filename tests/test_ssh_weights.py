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
def local_stages(tmp: Path, model: Path, monkeypatch) -> tuple:
    from launchers.cluster_file import Node, SshSpec
    from launchers.ssh import compose_settings

    monkeypatch.setattr("launchers.ssh_weights.BOOK", tmp / "launcher" / "weight-hashes.json")
    spec, _, p = compose_settings("local", [f"checkpoint={model}", "stages=2"], config="infer")
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

    # auto: these hosts read the launcher's very files (this machine): nothing sent, the stages read them
    assert send_weights(p, nodes, entries, "auto") == [[], []]
    err = capfd.readouterr().err
    assert err.count("reads the model files itself: nothing to send") == 2 and "weights: sent 0 bytes in all" in err


def test_the_receiver_refuses_a_bad_message_in_one_line(tmp_path):
    got = subprocess.run([sys.executable, "-m", "smolcluster.node.weightrecv", "--state-dir", str(tmp_path)],
                         input=b'{"op": "chunk", "sha": "' + b"0" * 64 + b'", "size": 4, "offset": 0, "n": 9}\nabc',
                         capture_output=True, timeout=60, cwd=REPO)
    assert got.returncode == 2
    assert json.loads(got.stdout) == {"error": "CacheError: entry 000000000000: a chunk ends at byte 9, past its "
                                               "size 4"} or b"session ended inside a chunk" in got.stdout
