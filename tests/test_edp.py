"""EDP: asynchronous, staleness-aware, elastic — real processes on loopback."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from hydra import compose, initialize_config_dir

from smolcluster.paths import CONFIG_DIR
from smolcluster.trainer import Trainer
from smolcluster.transport import wire
from tests.cluster_util import Cluster
from tests.conftest import train

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def test_edp_mnist_two_workers_same_sample_budget_as_syncps(tmp_path, mnist_root):
    s = train(tmp_path, "algo=edp", "cluster.workers=2", "data=mnist", f"data.root={mnist_root}", "train.epochs=3")
    assert s["eval_accuracy"] >= 0.94, s["eval_accuracy"]
    assert s["samples"] == 3 * (19000 // 128) * 128  # the SyncPS run's budget: 3 epochs of 2 x 64
    assert s["applied"] == s["steps"] and s["workers"]["0"]["applied"] > 0 and s["workers"]["1"]["applied"] > 0


def test_int8_with_error_feedback_matches_uncompressed_with_4x_fewer_bytes(tmp_path, mnist_root):
    common = ["algo=edp", "data=mnist", f"data.root={mnist_root}", "train.epochs=3"]
    plain = train(tmp_path / "none", *common)
    small = train(tmp_path / "int8", *common, "algo.codec=int8")
    assert small["eval_accuracy"] >= plain["eval_accuracy"] - 0.01, (small["eval_accuracy"], plain["eval_accuracy"])
    per_update = {s["config"]["algo"]["codec"]: s["bytes_received"] / (s["applied"] + s["dropped"]) for s in (plain, small)}
    assert 3.5 < per_update["none"] / per_update["int8"] < 4.1, per_update


@pytest.mark.slow
def test_a_worker_joining_30s_late_trains_on_current_weights_and_killing_any_worker_never_stalls(tmp_path):
    # delay_s caps each worker at 10 steps/s whatever the machine's speed, so the kill below lands
    # near step 500 at the latest (30 s + start-up + 5 s) and the newcomer still has steps to do alone.
    with Cluster(tmp_path, "edp", "train.steps=900", "train.log_every=20", *FAST,
                 "cluster.nodes=[{delay_s: 0.1},{delay_s: 0.1}]") as c:
        c.server()
        c.worker(0)
        time.sleep(30)
        c.worker(1)  # joins a run that has been going for 30 s
        deadline = time.monotonic() + 120
        while "worker 1 joined" not in c.output("server") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)
        killed_at = c.metrics()[-1]["step"]
        c.kill("worker0")  # the original worker dies; the newcomer carries on alone
        assert c.wait("server", timeout=300) == 0, c.output("server")[-3000:]
        s = c.summary()
    w1 = s["workers"]["1"]
    assert w1["joined_step"] > 100 and w1["applied"] > 100
    # it started from the current weights: its gradients were fresh, not hundreds of versions old
    assert w1["staleness_max"] <= 8 and w1["staleness_mean"] < 2
    assert killed_at < 800, f"the kill came at step {killed_at}: too late to show the newcomer carrying on alone"
    assert s["workers_lost"] == [0] and s["steps"] == 900
    assert s["workers"]["0"]["lost_step"] >= killed_at
    losses = [r["loss"] for r in c.metrics() if r.get("loss") is not None]
    assert losses[-1] < losses[0] / 2


def fingerprint() -> str:
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["algo=edp"])
    return Trainer(cfg, [64], with_optimizer=False).fingerprint


def test_gradients_beyond_max_staleness_are_provably_not_applied(tmp_path):
    """A hand-driven worker: fresh gradients move the weights, one too stale does not move them at all."""
    with Cluster(tmp_path, "edp", "train.steps=20", "algo.max_staleness=3", *FAST, workers=1) as c:
        c.server()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{c.port}")

        def send(kind, fields, tensors=None):
            sock.send_multipart([bytes(f) for f in wire.encode(kind, fields, tensors)])

        def reply():
            assert sock.poll(30_000), c.output("server")[-2000:]
            return wire.decode(sock.recv_multipart(), max_bytes=1 << 26)

        send("register", {"rank": 0, "node": "probe", "device": "cpu", "batch_size": 64, "protocol": 1,
                          "fingerprint": fingerprint(), "algo": "edp"})
        welcome = reply()
        assert welcome.kind == "welcome", welcome.fields
        n = welcome.tensors["float32"].size
        rng = np.random.default_rng(0)

        def grad(version, scale):
            send("grad", {"rank": 0, "step": 1, "version": version, "samples": 64, "loss": 1.0},
                 {"float32": (rng.normal(size=n) * scale).astype(np.float32)})

        def pull():
            send("pull", {"rank": 0})
            msg = reply()
            assert msg.kind == "weights"
            return msg.fields["version"], msg.tensors["float32"].copy()

        for v in range(5):  # five fresh gradients: each applied, the version advances
            grad(v, 1e-3)
            version, weights = pull()
            assert version == v + 1
        grad(0, 1e6)  # staleness 5 > max_staleness 3, and huge: applying it would wreck the model
        version, after = pull()
        assert version == 5 and np.array_equal(after, weights)
        grad(5, 1e-3)  # a fresh one is applied again
        version, moved = pull()
        assert version == 6 and not np.array_equal(moved, weights)
        for v in range(6, 19):
            grad(v, 1e-3)
            pull()
        grad(19, 1e-3)  # the last update: the server finishes and tells us to stop
        assert reply().kind == "stop"
        assert c.wait("server", timeout=60) == 0
        sock.close()
        s = c.summary()
    assert s["dropped"] == 1 and s["applied"] == 20
    assert s["workers"]["0"]["staleness_max"] == 5
