"""Secure by default (issue 15): keyless non-loopback binds refuse, live ranks are not taken over, outlier
gradients are rejected and counted. Real processes and sockets; a non-loopback address of this machine where
the exposure is the point."""

from __future__ import annotations

import ipaddress
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
import zmq
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from smolcluster.algorithms.guard import GradientGuard, grad_norm
from smolcluster.algorithms.syncps import SyncServer
from smolcluster.errors import ConfigError
from smolcluster.inference.from_config import serve_config_from
from smolcluster.inference.settings import infer_settings
from smolcluster.paths import CONFIG_DIR
from smolcluster.security import check_api, is_loopback
from smolcluster.serving.config import serve
from smolcluster.serving.settings import chat_settings
from smolcluster.train_settings import train_config
from smolcluster.trainer import Trainer
from smolcluster.transport import make_keys, wire
from tests.cluster_util import Cluster, register_with
from tests.conftest import ATTACKED_SYNCPS as ARGS
from tests.conftest import run_cli, train

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def lan_address() -> str:
    """An IPv4 address of this machine beyond loopback, or skip."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    for a in out:
        try:
            if ipaddress.ip_address(a).version == 4 and not ipaddress.ip_address(a).is_loopback:
                return a
        except ValueError:
            continue
    pytest.skip("this machine has no IPv4 address beyond loopback")


def test_loopback_is_told_from_everything_else():
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost", "tcp://127.0.0.1:5555", "tcp://[::1]:80"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "*", "192.168.1.10", "tcp://0.0.0.0:5555", "::", "tcp://*:5555"):
        assert not is_loopback(host), host


def test_a_non_loopback_bind_without_keys_refuses_with_one_line_naming_the_fix(tmp_path):
    ip = lan_address()
    p = run_cli("smolcluster.train", "algo=syncps", "role=server", f"cluster.bind={ip}", f"cluster.host={ip}",
                "cluster.port=0", f"hydra.run.dir={tmp_path}", check=False, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    line = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1, p.stderr[-2000:]
    for words in (ip, "without keys", "python -m smolcluster.keys", "cluster.keys=", "cluster.insecure=true"):
        assert words in line[0], line[0]
    # an inference stage refuses the same way, before it loads any weights
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("infer", overrides=["role=stage", "rank=1", f"cluster.bind={ip}", "cluster.port=6000"])
    with pytest.raises(ConfigError, match=r"stage 1 would listen on .* without keys: .*cluster.insecure=true"):
        serve_config_from(infer_settings(cfg).pipeline)


def test_with_insecure_true_a_keyless_lan_run_trains_and_every_node_warns(tmp_path):
    ip = lan_address()
    with Cluster(tmp_path, "syncps", "train.steps=30", *FAST, f"cluster.bind={ip}", f"cluster.host={ip}",
                 "cluster.insecure=true", workers=1) as c:
        c.server()
        c.worker(0)
        assert c.wait("server") == 0, c.output("server")[-3000:]
        assert c.wait("worker0") == 0, c.output("worker0")[-3000:]
        assert c.summary()["steps"] == 30
        for role in ("server", "worker0"):
            assert "cluster.insecure=true" in c.output(role) and "without keys" in c.output(role)


def test_chat_on_a_non_loopback_host_without_an_api_key_refuses():
    ip = lan_address()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("chat", overrides=[f"serve.host={ip}", "serve.port=0"])
    with pytest.raises(ConfigError, match=r"serve.host=.* serve.api_key is not set: .*serve.insecure=true"):
        serve(chat_settings(cfg))  # refused before binding or starting any stage
    check_api(ip, "secret", insecure=False)  # a key, or the explicit switch, lets it serve
    check_api(ip, None, insecure=True)
    check_api("127.0.0.1", None, insecure=False)  # loopback: keyless as before


def fingerprint(algo: str) -> str:
    """The model fingerprint a stranger computes from the public model definition (names and shapes)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=[f"algo={algo}"]))
    return Trainer(cfg, [64], with_optimizer=False).fingerprint


class Stranger:
    """A raw DEALER on the server's port, speaking the wire protocol with the right model fingerprint."""

    def __init__(self, port: int):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    def send(self, kind, fields, tensors=None):
        self.sock.send_multipart([bytes(f) for f in wire.encode(kind, fields, tensors)])

    def register(self, rank: int, algo: str):
        self.send("register", {"rank": rank, "node": "stranger", "device": "cpu", "batch_size": 64,
                               "protocol": wire.PROTOCOL_VERSION, "fingerprint": fingerprint(algo), "algo": algo})
        return self.reply()

    def reply(self, timeout_s: float = 60):
        assert self.sock.poll(int(timeout_s * 1000))
        return wire.decode(self.sock.recv_multipart(), max_bytes=1 << 26)

    def close(self):
        self.sock.close()


def test_a_stranger_registering_as_a_live_rank_is_refused_and_changes_nothing(tmp_path, clean_syncps_weights):
    reference = clean_syncps_weights
    with Cluster(tmp_path / "attacked", "syncps", *ARGS, workers=1) as c:
        c.server()
        c.worker(0)
        c.wait_for_step(10)
        stranger = Stranger(c.port)
        refused = stranger.register(0, "syncps")
        assert refused.kind == "refuse" and refused.fields.get("retry"), refused.fields
        assert "connected and alive" in refused.fields["reason"]
        stranger.send("grad", {"rank": 0, "step": 12, "version": 12, "samples": 64, "loss": 0.1},
                      {"float32": np.full(17226, 1e6, np.float32)})
        assert stranger.reply().kind == "error"  # not registered: nothing of it reaches the model
        stranger.close()
        assert c.wait("server") == 0, c.output("server")[-3000:]
        s = c.summary()
    assert s["rejected_messages"].get("refused_takeover") == 1, s["rejected_messages"]
    assert s["workers"]["0"]["applied"] == 100 and s["workers"]["0"]["rejoins"] == 0
    attacked = load_file(tmp_path / "attacked" / "checkpoint.safetensors")
    assert attacked.keys() == reference.keys() and all(bool((attacked[k] == reference[k]).all()) for k in attacked)


def test_a_rogue_pushing_huge_gradients_has_them_rejected_and_counted(tmp_path):
    """The issue's scenario, on the digits MLP: a process registers with the model fingerprint (as a free rank of
    an EDP run) and pushes gradients of 1e6 per value on the current weights. Each is rejected, counted, and
    the run ends as accurate as without it."""
    steps, pushes = 300, 25
    with Cluster(tmp_path, "edp", f"train.steps={steps}", "train.log_every=10", "algo.min_workers=1", *FAST,
                 "cluster.nodes=[{delay_s: 0.01}]") as c:
        c.server()
        c.worker(0)
        c.wait_for_step(20)  # past the warm-up: the rule has a range to judge by
        rogue = Stranger(c.port)
        welcome = rogue.register(1, "edp")
        assert welcome.kind == "welcome", welcome.fields
        n = welcome.tensors["float32"].size
        version = welcome.fields["version"]
        for _ in range(pushes):
            rogue.send("grad", {"rank": 1, "step": 1, "version": version, "samples": 64, "loss": 0.1},
                       {"float32": np.full(n, 1e6, np.float32)})
            rogue.send("pull", {"rank": 1})
            msg = rogue.reply()
            assert msg.kind in ("weights", "stop")
            if msg.kind == "stop":
                break
            version = msg.fields["version"]
        rogue.close()
        assert c.wait("server", timeout=240) == 0, c.output("server")[-3000:]
        s = c.summary()
    assert s["gradients_rejected"] == s["workers"]["1"]["rejected"] >= 20, s
    assert s["workers"]["1"]["applied"] == 0
    assert s["eval_accuracy"] >= 0.85, s["eval_accuracy"]


def test_allreduce_skips_a_step_whose_reduced_gradient_blew_up_on_every_rank(tmp_path):
    """A buggy rank (an fp16 overflow) sends its gradient x 1e6 every 10th step: those steps are skipped (or
    clipped) on every rank alike (the ring stays in lockstep and finishes), counted, and the model trains as without them."""
    common = ["algo=allreduce", "cluster.workers=2", "train.steps=60", "train.log_every=10",
              "cluster.nodes=[{},{blowup_every: 10}]"]
    s = train(tmp_path / "guarded", *common)
    # steps 9, 19, ..., 59: rejected above train.max_grad_norm, else clipped to the robust bound
    assert s["steps"] == 60 and s["gradients_rejected"] + s["gradients_clipped"] == 6, s
    assert s["eval_accuracy"] >= 0.85, s["eval_accuracy"]
    # the norm guard off (its robust bound and its absolute cap): the blow-ups land
    off = train(tmp_path / "off", *common, "train.max_grad_norm_ratio=0", "train.max_grad_norm=0")
    # (and the wrecked model's next gradients are not even finite: those are still rejected)
    assert off["eval_accuracy"] < 0.5, off["eval_accuracy"]


def test_the_guard_is_a_robust_bound_with_a_warm_up_and_an_off_switch():
    g = GradientGuard(ratio=10, window=5, warmup=3, cap=0)  # the absolute cap: tests/test_member_claims.py
    assert g.check(1e9) == g.check(1.0) == g.check(1.0) == 1.0  # warm-up: finite is enough
    assert g.bound() == 10.0  # the median of [1e9, 1, 1]: one huge norm does not move it
    assert g.check(11.0) == 10 / 11 and g.check(9.0) == 1.0 and g.check(float("nan")) == 0.0  # clipped; rejected
    assert (g.clipped, g.rejected) == (1, 1)
    off = GradientGuard(ratio=0, cap=0)
    assert off.check(1.0) == off.check(1e12) == 1.0 and off.check(float("inf")) == 0.0


def test_with_curve_a_live_rank_is_taken_over_only_by_its_own_client_key(tmp_path):
    """With keys the server knows which client key each connection used (ZAP's User-Id): the same key (a
    restarted worker) takes its live rank over; another authorized key is refused (it is rank 1's: rank N
    registers only with authorized/clientN.key)."""
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_keys(keys, clients=2)  # client and client1, both in authorized/
    other.mkdir()
    shutil.copy(keys / "server.key", other / "server.key")
    shutil.copy(keys / "client1.key_secret", other / "client.key_secret")
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=syncps", "cluster.workers=1", f"cluster.keys={keys}", "run_id=k"]))
    server = SyncServer(cfg, tmp_path)
    hello = {"rank": 0, "node": "n", "device": "cpu", "batch_size": 64, "protocol": wire.PROTOCOL_VERSION,
             "fingerprint": server.trainer.fingerprint, "algo": "syncps"}

    def register(curve_dir):
        return register_with(server, hello, curve_dir)

    try:
        assert register(keys).kind == "welcome"
        first = server.workers[0]
        assert first.key is not None and first.alive
        refused = register(other)  # authorized, but not the key rank 0 registered with
        assert refused.kind == "refuse" and not refused.fields.get("retry"), refused.fields
        assert server.workers[0] is first and server.endpoint.rejected["refused_rank_key"] == 1
        assert register(keys).kind == "welcome"  # its own key: a restarted worker takes its rank back
        assert server.workers[0] is not first and server.workers[0].rejoins == 1
    finally:
        server.endpoint.close()
        server.recorder.finish(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_guards_norm_equals_float64s_also_where_float32_overflows_or_underflows(dtype):
    def exact(ts):
        return float(torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in ts])))

    big = {torch.float32: 1e20, torch.bfloat16: 1e30, torch.float16: 6e4}[dtype]
    tiny = {torch.float32: 1e-23, torch.bfloat16: 1e-23, torch.float16: 1e-7}[dtype]
    cases = [[torch.randn(1000).to(dtype), torch.randn(7, 3).to(dtype)],  # ordinary
             [torch.full((1000,), big, dtype=dtype)],                       # squares overflow float32
             [torch.full((1000,), tiny, dtype=dtype), torch.zeros(4, dtype=dtype)]]  # squares underflow
    for ts in cases:
        assert grad_norm(ts) == pytest.approx(exact(ts), rel=1e-5)
    assert grad_norm([torch.full((1000,), tiny, dtype=dtype)]) > 0
    assert math.isinf(grad_norm([torch.tensor([1.0, float("inf")], dtype=dtype)]))
    assert math.isnan(grad_norm([torch.tensor([1.0, float("nan")], dtype=dtype)]))
