"""The SSH launcher against a real OpenSSH server that the test starts on loopback.

The test makes a host key and a client key in a tmp dir, runs ``/usr/sbin/sshd -D`` on a free
port with a config that trusts only that key, and points a cluster file's three nodes at it.
Every role then really starts through ``ssh``: the preflight, a SyncPS run, an allreduce LoRA
fine-tune on chat data, a failing worker that must stop the rest, and SIGTERM to the launcher that
must stop every node.

Needs root (sshd) and Debian's openssh-server (`apt-get install -y openssh-server`); skips
with the reason otherwise.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from smolcluster.cluster import free_port
from smolcluster.transport import make_keys
from tests.conftest import REPO

SSHD = "/usr/sbin/sshd"


def _sshd_unavailable() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to run sshd"
    if not os.path.exists(SSHD):
        return "needs OpenSSH's server: apt-get install -y openssh-server"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool} (openssh-client)"
    return None


class Sshd:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.client_key = root / "client_key"
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sshd:
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / key)],
                           check=True, timeout=30)
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        config = self.root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.root / 'host_key'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}", f"PidFile {self.root / 'sshd.pid'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "MaxStartups 50",
            "MaxSessions 50", "LogLevel VERBOSE", ""]))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation dir (absent in slim images)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not listen on {self.port}: {self.log.read_text()}") from None
                time.sleep(0.1)

    def logins(self) -> int:
        return self.log.read_text().count("Accepted publickey")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = _sshd_unavailable()
    if reason:
        pytest.skip(reason)
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server.start()
    finally:
        server.stop()


def cluster_file(path: Path, sshd: Sshd, port: int | None = None, keys: Path | None = None,
                 node1_ssh: dict | None = None) -> Path:
    """Three nodes (server + 2 workers), all on 127.0.0.1, each reached through the test's sshd;
    ``node1_ssh`` overrides worker 1's SSH settings (to break it)."""
    cluster = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "cluster" / "local.yaml"))
    cluster.update({
        "name": "sshtest", "host": "127.0.0.1", "bind": "127.0.0.1", "port": port, "workers": 2,
        "heartbeat_s": 0.5, "liveness_s": 5.0, "connect_timeout_s": 60.0, "keys": str(keys) if keys else None,
        "ssh": {"user": getpass.getuser(), "port": sshd.port, "identity": str(sshd.client_key),
                "options": ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"],
                "python": sys.executable, "workdir": str(REPO)},
        "server": {"name": "alpha"},
        "nodes": [{"name": "bravo", "host": "127.0.0.1", "batch_size": 32},
                  {"name": "charlie", "host": "127.0.0.1", "batch_size": 16, "ssh": node1_ssh}],
    })
    OmegaConf.save(OmegaConf.create(cluster), path)
    return path


def rows_port(rows: list[str]) -> str:
    """The port the preflight found free on the server (the cluster file says port: null)."""
    return next(r for r in rows if "| port | ok |" in r).split("would be used")[0].split()[-1]


def launcher(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.ssh", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def wait_until_gone(text: str, timeout: float = 30) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_check_names_the_node_that_cannot_run(sshd, tmp_path):
    path = cluster_file(tmp_path / "c.yaml", sshd, node1_ssh={"python": "/nonexistent/bin/python"})
    got = launcher("check", "--cluster", str(path))
    assert got.returncode == 2
    rows = [line for line in got.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| worker 1 (charlie") and "| python | FAIL | python /nonexistent/bin/python not found"
               in r for r in rows), rows
    # the healthy nodes pass, and the workers could open a TCP connection to the server's port
    assert any(r.startswith("| server (alpha") and "| port | ok |" in r for r in rows), rows
    assert any(r.startswith("| worker 0 (bravo") and "| reach | ok | connected to 127.0.0.1:" in r for r in rows)
    assert "preflight FAILED on worker 1 (charlie" in got.stdout
    assert "error: preflight failed on worker 1" in got.stderr


@pytest.mark.slow
def test_launch_trains_syncps_through_ssh(sshd, tmp_path):
    run_dir, keys = tmp_path / "run", tmp_path / "keys"
    make_keys(keys)  # CURVE on: every node must find its keys, and the run is encrypted end to end
    before = sshd.logins()
    got = launcher("launch", "--cluster", str(cluster_file(tmp_path / "c.yaml", sshd, keys=keys)),
                   "--run-dir", str(run_dir), "algo=syncps", "train.steps=12", "train.log_every=2")
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-4000:]
    # the preflight ran first: every node passed every check, over SSH
    rows = [line for line in got.stdout.splitlines() if line.startswith("| ")]
    for node in ("server (alpha", "worker 0 (bravo", "worker 1 (charlie"):
        mine = [r for r in rows if r.startswith(f"| {node}")]
        assert {r.split(" | ")[1] for r in mine} >= {"ssh", "python", "packages", "device", "clock", "keys"}, mine
        assert all(r.split(" | ")[2] == "ok" for r in mine), mine
    assert sum("| reach | ok | connected to 127.0.0.1:" in r for r in rows) == 2
    assert "preflight ok: 3 nodes ready" in got.stdout
    # every node's output came back through its SSH session, prefixed with its role
    for prefix in ("[server] ", "[worker 0] ", "[worker 1] "):
        assert any(line.startswith(prefix) for line in got.stdout.splitlines()), prefix
    assert "worker 1 registered" in (run_dir / "launch" / "worker1.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "syncps" and summary["steps"] == 12
    assert {w["node"] for w in summary["workers"].values()} == {"bravo", "charlie"}
    assert [summary["workers"][r]["batch_size"] for r in ("0", "1")] == [32, 16]
    assert summary["samples"] == 12 * (32 + 16)
    shipped = OmegaConf.load(next((run_dir / ".launch" / "cluster").glob("launch-*.yaml")))
    assert shipped["keys"] == str(keys)
    # the preflight's free port, unless another process took it meanwhile and the launcher retried
    assert shipped["port"] == int(rows_port(rows)) or f"retrying on port {shipped['port']}" in got.stderr + got.stdout
    launch = json.loads((run_dir / "launch" / "launch.json").read_text())
    assert [n["label"] for n in launch["nodes"]] == ["server", "worker 0", "worker 1"]
    assert all(n["command"].startswith("ssh ") for n in launch["nodes"])
    # 3 preflight probes + 3 roles + fetching summary.json, each its own SSH login; a port retry
    # costs one more probe (for a free port) and three more roles
    retries = (got.stderr + got.stdout).count("retrying on port")
    assert sshd.logins() - before == 7 + 4 * retries
    assert not wait_until_gone(str(run_dir), timeout=10)


@pytest.mark.parametrize("broken, why, algo", [
    ({"python": "/nonexistent/bin/python"}, "python /nonexistent/bin/python not found", "syncps"),
    ({"port": "closed"}, "Connection refused (try: ssh -p ", "syncps"),
    ({"python": "/nonexistent/bin/python"}, "python /nonexistent/bin/python not found", "allreduce"),  # no server
])
def test_a_failing_worker_stops_the_whole_cluster(sshd, tmp_path, broken, why, algo):
    run_dir = tmp_path / "run"
    if broken.get("port") == "closed":
        broken = {"port": free_port()}  # nothing listens there: worker 1's SSH login fails
    path = cluster_file(tmp_path / "c.yaml", sshd, port=free_port(), node1_ssh=broken)
    got = launcher("launch", "--cluster", str(path), "--no-check", "--run-dir", str(run_dir),
                   f"algo={algo}", "train.steps=1000")
    assert got.returncode == 2
    error = got.stderr.strip().splitlines()[-1]
    assert error.startswith("error: worker 1 (charlie, root@127.0.0.1:") and why in error, got.stderr
    assert "stopped the other nodes" in error
    # the server (syncps) and worker 0 had started over SSH; none of them is left running
    assert not wait_until_gone(str(run_dir), timeout=30)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_node(sshd, tmp_path):
    run_dir = tmp_path / "run"
    out = (tmp_path / "launcher.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "launchers.ssh", "launch", "--no-check", "--cluster",
                             str(cluster_file(tmp_path / "c.yaml", sshd, port=free_port())),
                             "--run-dir", str(run_dir), "algo=syncps", "train.steps=100000", "train.log_every=1"],
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert proc.poll() is None, (tmp_path / "launcher.out").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "launcher.out").read_text()[-4000:]
            time.sleep(0.2)
        roles = processes_mentioning(str(run_dir))
        assert len([p for p in roles if "smolcluster.train" in " ".join(p.cmdline())]) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert not wait_until_gone(str(run_dir), timeout=30)
        assert "stopping server" in (tmp_path / "launcher.out").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_launch_trains_allreduce_ranks_through_ssh_as_a_lora_fine_tune_on_chat_data(sshd, tmp_path):
    """algo=allreduce: no server; each rank starts over SSH on cluster.nodes[r] and the ring finishes the run. It is
    a LoRA fine-tune on chat data: ``train.lora.*`` and ``data.path`` reach both ranks word for word (a list value
    included, through the remote shell), only the adapters train, and rank 0 writes RUN_DIR/adapter/."""
    from tests.test_chat_data import instruct_dir, write_chat

    run_dir = tmp_path / "run"
    # 54 training conversations: the global batch is the nodes' 32 + 16
    base, jsonl = instruct_dir(tmp_path / "instruct"), write_chat(tmp_path / "chat me.jsonl", copies=30)
    lora = [f"model.pretrained={base}", f"data.path={jsonl}", "train.lora.enabled=true", "train.lora.r=4",
            "train.lora.target_modules=[q_proj,v_proj]"]
    before = sshd.logins()
    got = launcher("launch", "--cluster", str(cluster_file(tmp_path / "c.yaml", sshd)), "--run-dir", str(run_dir),
                   "algo=allreduce", "train.steps=6", "train.log_every=2", "model=llama-tiny", "model.block_size=48",
                   "data=chat", *lora)
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-4000:]
    rows = [line for line in got.stdout.splitlines() if line.startswith("| ")]
    # the ranks' layout: each rank listens on its own port, and the other reached it
    for rank in (0, 1):
        mine = [r for r in rows if r.startswith(f"| worker {rank} (")]
        assert all(r.split(" | ")[2] == "ok" for r in mine), mine
        assert {r.split(" | ")[1] for r in mine} >= {"ssh", "port", "reach", "memory", "speed"}, mine
    assert not any(r.startswith("| server") for r in rows)
    assert {p for p in ("[worker 0] ", "[worker 1] ", "[server] ") if p in got.stdout} == {"[worker 0] ", "[worker 1] "}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "allreduce" and summary["steps"] == 6
    assert summary["samples"] == 6 * (32 + 16)  # both ranks' batches (cluster.nodes[r].batch_size) every step
    adapter_numel = 2 * 4 * (32 + 32)  # one layer: q_proj and v_proj (32 -> 32), A and B of rank 4
    assert summary["trainable_params"] == adapter_numel < summary["params"] / 20, summary
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"], ["v_proj", "q_proj"])
    launch = json.loads((run_dir / "launch" / "launch.json").read_text())
    assert [(n["label"], [a for a in n["args"] if a.startswith(("role=", "rank="))]) for n in launch["nodes"]] == [
        ("worker 0", ["role=worker", "rank=0"]), ("worker 1", ["role=worker", "rank=1"])]
    assert all([a for a in n["args"] if a.startswith(("model.pretrained=", "data.path=", "train.lora."))] == lora
               for n in launch["nodes"])
    # 2 preflight probes + 1 for a free port range + 2 ranks + fetching summary.json
    retries = (got.stderr + got.stdout).count("retrying on port")
    assert sshd.logins() - before == 6 + 3 * retries
    assert not wait_until_gone(str(run_dir), timeout=10)


@pytest.mark.slow
def test_launch_trains_mp_stages_through_ssh_and_merges_their_shards(sshd, tmp_path):
    run_dir = tmp_path / "run"
    got = launcher("launch", "--no-check", "--cluster", str(cluster_file(tmp_path / "c.yaml", sshd)),
                   "--run-dir", str(run_dir), "algo=mp", "algo.stages=2", "train.steps=4", "train.log_every=2")
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "mp" and summary["steps"] == 4 and summary["stages"] == 2
    for rank in (0, 1):  # each stage ran on its node and saved its shard; the launcher merged them
        assert (run_dir / f"stage-{rank}-of-2.safetensors").is_file()
        assert "linked with" in (run_dir / "launch" / f"stage{rank}.log").read_text()
    assert (run_dir / "checkpoint.safetensors").is_file() and "merged the stages' shards" in got.stderr
    assert not wait_until_gone(str(run_dir), timeout=10)


def test_serve_starts_inference_stages_a_chat_head_attaches_and_stopping_stops_them(sshd, tmp_path):
    """``serve``: mp inference stages over SSH, placed by partition=auto on the memory and speed each node's
    preflight measured; ``chat role=head`` attaches with the printed command and answers exactly transformers' greedy
    text; SIGTERM to the launcher leaves nothing running."""
    import httpx
    import torch

    from smolcluster import checkpoint
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.models.gpt2 import build_gpt2
    from tests.test_infer import hf_greedy

    model = write_tiny_run(tmp_path / "model", n_positions=256)
    run_dir = tmp_path / "serve"
    out = (tmp_path / "launcher.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "launchers.ssh", "serve", "--cluster",
                             str(cluster_file(tmp_path / "c.yaml", sshd)), "--run-dir", str(run_dir),
                             f"checkpoint={model}", "stages=2", "partition=auto"],
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = None
    try:
        text = lambda: (tmp_path / "launcher.out").read_text()  # noqa: E731
        deadline = time.monotonic() + 150
        while "stages ready" not in text():
            assert proc.poll() is None and time.monotonic() < deadline, text()[-4000:]
            time.sleep(0.2)
        attach = text().split("attach a head with\n")[1].splitlines()[0].split()
        assert attach[:5] == ["python", "-m", "smolcluster.chat", f"--config-dir={run_dir}/.launch", "role=head"]
        # partition=auto: each stage planned with the usable memory its node's preflight measured
        shipped = OmegaConf.load(next((run_dir / ".launch" / "cluster").glob("launch-*.yaml")))
        assert all(0 < n["memory_gb"] < 10_000 and n["gflops"] > 0 for n in shipped["nodes"]), shipped["nodes"]
        head_log = (tmp_path / "head.log").open("w")
        head = subprocess.Popen([sys.executable, *attach[1:], "serve.port=0", "serve.ui=false"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=head_log, text=True)
        url = None
        for line in iter(head.stdout.readline, ""):
            if "smolcluster chat: http://" in line:
                url = line.split("smolcluster chat: ")[1].split()[0].rstrip("/")
                break
        assert url, (tmp_path / "head.log").read_text()[-3000:]
        prompt, n = "The meaning of life is", 12
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": model.name, "prompt": prompt, "max_tokens": n, "temperature": 0})
        assert r.status_code == 200, r.text
        hf = build_gpt2(vocab_size=500, n_layer=2, n_head=4, n_embd=64, n_positions=256).eval()
        checkpoint.load(model, hf)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model / "tokenizer.json"))
        with torch.no_grad():
            want = tok.decode(hf_greedy(hf, tok.encode(prompt).ids, n))
        assert r.json()["choices"][0]["text"] == want and r.json()["usage"]["completion_tokens"] == n
        head.send_signal(signal.SIGINT)
        assert head.wait(timeout=30) == 0
        assert len(processes_mentioning(f"{run_dir}/.launch")) >= 2  # the stages outlive the head
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert not wait_until_gone(str(run_dir), timeout=30)
    finally:
        for p in (head, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
