"""EDP: asynchronous, staleness-aware, elastic — real processes on loopback."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import zmq
from hydra import compose, initialize_config_dir

from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.trainer import Trainer
from smolcluster.transport import wire
from tests.cluster_util import Cluster
from tests.conftest import train

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def test_edp_mnist_two_workers_same_sample_budget_as_syncps(tmp_path, mnist_root):
    # min_workers=2: the whole run is ~2 s of updates, which one worker could make alone if the other started late
    s = train(tmp_path, "algo=edp", "cluster.workers=2", "algo.min_workers=2", "data=mnist", f"data.root={mnist_root}",
              "train.epochs=3")
    assert s["eval_accuracy"] >= 0.94, s["eval_accuracy"]
    assert s["samples"] == 3 * (19000 // 128) * 128  # the SyncPS run's budget: 3 epochs of 2 x 64
    assert s["applied"] == s["steps"] and s["workers"]["0"]["applied"] > 0 and s["workers"]["1"]["applied"] > 0


def run(run_dir, *overrides: str, workers: int = 2) -> dict:
    """Server and workers as processes; the summary once the server is done. (Not the launcher: it waits
    for a worker that was still starting when a short run ended, to retry and give up.)"""
    with Cluster(run_dir, "edp", *overrides, *FAST, workers=workers) as c:
        c.server()
        for rank in range(workers):
            c.worker(rank)
        assert c.wait("server", timeout=120) == 0, c.output("server")[-3000:]
        return c.summary()


def per_update(s: dict, key: str) -> float:
    """Bytes per gradient handled: received = gradients up; sent = weights down (a pull follows each push)."""
    return s[key] / (s["applied"] + s["dropped"])


def test_int8_with_error_feedback_matches_uncompressed_with_4x_fewer_bytes(tmp_path, mnist_root):
    common = ["algo=edp", "data=mnist", f"data.root={mnist_root}", "train.epochs=3"]
    plain = train(tmp_path / "none", *common)
    small = train(tmp_path / "int8", *common, "algo.compression=int8")
    assert small["eval_accuracy"] >= plain["eval_accuracy"] - 0.01, (small["eval_accuracy"], plain["eval_accuracy"])
    up = {s["config"]["algo"]["compression"]: per_update(s, "bytes_received") for s in (plain, small)}
    assert 3.5 < up["none"] / up["int8"] < 4.1, up
    # only the gradients: the weights still go down in float32 (algo.weights_compression=none)
    assert per_update(small, "bytes_sent") > 3.9 * small["params"], small["bytes_sent"]


def test_the_old_codec_key_still_works_and_weights_compression_is_separate(tmp_path):
    s = run(tmp_path, "train.steps=60", "algo.codec=int8", "algo.weights_compression=bf16", workers=1)
    assert per_update(s, "bytes_received") < 1.1 * s["params"]  # int8 gradients: about a byte a value
    assert 1.9 * s["params"] < per_update(s, "bytes_sent") < 2.2 * s["params"]  # bf16 weights: two bytes


@pytest.mark.slow
def test_a_worker_joining_late_trains_on_current_weights_and_killing_any_worker_never_stalls(tmp_path):
    # delay_s caps each worker at 20 steps/s whatever the machine's speed; the newcomer is started with the others
    # but held (imported, not registered) until step 40, so it joins within its set-up and the run can be short.
    # Every wait below is for a state (a step reached, a join or a loss logged), not a duration.
    n = 300
    with Cluster(tmp_path, "edp", f"train.steps={n}", "train.log_every=10", *FAST,
                 "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05}]") as c:
        c.server()
        c.worker(0)
        c.worker(1, held=True)
        c.wait_for_step(40)
        c.release("worker1")  # joins a run well under way
        c.wait_for_line("server", "worker 1 joined")
        c.wait_for_step(c.metrics()[-1]["step"] + 20)  # both push for a while
        killed_at = c.metrics()[-1]["step"]
        c.kill("worker0")  # the original worker dies; the newcomer carries on alone
        c.wait_for_line("server", "worker 0 (worker0) lost")  # (fails if the run ends first)
        assert c.wait("server", timeout=300) == 0, c.output("server")[-3000:]
        s, rows = c.summary(), c.metrics()
    w1 = s["workers"]["1"]
    assert w1["joined_step"] >= 40 and w1["applied"] > 100
    # it started from the current weights: its gradients were fresh, not joined_step (>= 40) versions old
    assert w1["staleness_max"] <= 30 and w1["staleness_mean"] < 2  # (one slow first step under load: a few)
    assert s["workers_lost"] == [0] and s["steps"] == n
    lost = s["workers"]["0"]["lost_step"]
    assert killed_at <= lost < n
    # from the loss on, every update was the newcomer's: worker 0's count stands still, worker 1's goes on to the end
    after = [r for r in rows if "applied" in r and r["step"] > lost]
    assert len(after) >= 2 and after[-1]["step"] == n, f"the loss (step {lost}) came too late to show more: {after}"
    assert {r["applied/0"] for r in after} == {s["workers"]["0"]["applied"]}
    assert after[-1]["applied/1"] == w1["applied"] > after[0]["applied/1"]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    assert losses[-1] < losses[0] / 2


def fingerprint() -> str:
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=edp"]))
    return Trainer(cfg, [64], with_optimizer=False).fingerprint


def test_training_waits_for_min_workers_and_an_early_workers_gradients_are_not_applied(tmp_path):
    # delay_s caps each worker at 50 steps/s: unthrottled, worker 0 (a few ms an update) made all the updates
    # on a slow machine before worker 1's first gradient (the slow first step of a fresh process) arrived
    with Cluster(tmp_path, "edp", "train.steps=200", "algo.min_workers=2", *FAST,
                 "cluster.nodes=[{delay_s: 0.02},{delay_s: 0.02}]") as c:
        c.server()
        c.worker(0)  # computes and pushes from its welcome on; the server must not step yet
        c.wait_for_line("server", "worker 0 joined")
        c.worker(1)  # a fresh process: worker 0 pushes dozens of gradients while it starts
        assert c.wait("server", timeout=120) == 0, c.output("server")[-3000:]
        s, log = c.summary(), c.output("server")
    w0, w1 = s["workers"]["0"], s["workers"]["1"]
    assert w0["joined_step"] == 0 and w1["joined_step"] == 0  # training began only when both were in
    first_step = re.search(r"step \d+/200", log)
    assert first_step and log.index("worker 1 joined") < first_step.start()  # no update logged before that
    assert w0["skipped"] > 10 and w0["applied"] > 0 and w1["applied"] > 0  # the early ones were not applied
    assert w0["applied"] + w1["applied"] == s["applied"] == 200  # (gradients queued before the start may arrive too stale: dropped)


class HandWorker:
    """A worker driven by hand: a raw DEALER speaking the wire protocol to a live EDP server."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{cluster.port}")
        self.send("register", {"rank": 0, "node": "probe", "device": "cpu", "batch_size": 64,
                               "protocol": wire.PROTOCOL_VERSION, "fingerprint": fingerprint(), "algo": "edp"})
        welcome = self.reply(120)  # the server may still be starting (importing torch)
        assert welcome.kind == "welcome", welcome.fields
        self.weights = welcome.tensors["float32"].copy()

    def send(self, kind, fields, tensors=None):
        self.sock.send_multipart([bytes(f) for f in wire.encode(kind, fields, tensors)])

    def reply(self, timeout_s: float = 30):
        assert self.sock.poll(int(timeout_s * 1000)), self.cluster.output("server")[-2000:]
        return wire.decode(self.sock.recv_multipart(), max_bytes=1 << 26)

    def grad(self, version: int, g: np.ndarray):
        self.send("grad", {"rank": 0, "step": 1, "version": version, "samples": 64, "loss": 1.0}, {"float32": g})

    def pull(self) -> tuple[int, np.ndarray]:
        self.send("pull", {"rank": 0})
        msg = self.reply()
        assert msg.kind == "weights"
        return msg.fields["version"], msg.tensors["float32"].copy()

    def close(self):
        self.sock.close()


def test_gradients_beyond_max_staleness_are_provably_not_applied(tmp_path):
    """A hand-driven worker: fresh gradients move the weights, one too stale does not move them at all."""
    with Cluster(tmp_path, "edp", "train.steps=20", "algo.max_staleness=3", *FAST, workers=1) as c:
        c.server()
        w = HandWorker(c)
        n = w.weights.size
        rng = np.random.default_rng(0)

        def grad(version, scale):
            w.grad(version, (rng.normal(size=n) * scale).astype(np.float32))

        for v in range(5):  # five fresh gradients: each applied, the version advances
            grad(v, 1e-3)
            version, weights = w.pull()
            assert version == v + 1
        grad(0, 1e6)  # staleness 5 > max_staleness 3, and huge: applying it would wreck the model
        version, after = w.pull()
        assert version == 5 and np.array_equal(after, weights)
        grad(5, 1e-3)  # a fresh one is applied again
        version, moved = w.pull()
        assert version == 6 and not np.array_equal(moved, weights)
        for v in range(6, 19):
            grad(v, 1e-3)
            w.pull()
        grad(19, 1e-3)  # the last update: the server finishes and tells us to stop
        assert w.reply().kind == "stop"
        assert c.wait("server", timeout=60) == 0
        w.close()
        s = c.summary()
    assert s["dropped"] == 1 and s["applied"] == 20
    assert s["workers"]["0"]["staleness_max"] == 5


@pytest.mark.parametrize("rule", ["inverse", "constant", "dc"])
def test_a_stale_gradient_moves_the_weights_by_exactly_what_the_rule_says(tmp_path, rule):
    """Plain SGD at a constant lr, so a step is exactly w -= lr * scale * g: the staleness rule is all that varies."""
    lr, lam = 0.05, 0.5
    with Cluster(tmp_path, "edp", "train.steps=4", "train.momentum=0", "train.schedule=constant", f"train.lr={lr}",
                 f"algo.staleness_rule={rule}", f"algo.dc_lambda={lam}", *FAST, workers=1) as c:
        c.server()
        w = HandWorker(c)
        w0 = w.weights
        g1, g2, g = np.random.default_rng(0).normal(size=(3, w0.size)).astype(np.float32)
        w.grad(0, g1)
        version, w1 = w.pull()
        assert version == 1
        np.testing.assert_allclose(w1, w0 - lr * g1, rtol=0, atol=1e-6)  # fresh: a full step under every rule
        w.grad(1, g2)
        version, w2 = w.pull()
        assert version == 2
        w.grad(0, g)  # computed on version 0, applied to version 2: staleness 2
        version, w3 = w.pull()
        assert version == 3
        step = {"inverse": g / 3, "constant": g, "dc": (g + lam * g * g * (w2 - w0)) / 3}[rule]
        np.testing.assert_allclose(w3, w2 - lr * step, rtol=0, atol=1e-6)
        w.grad(3, g1)  # the last update: the server finishes
        assert w.reply().kind == "stop"
        assert c.wait("server", timeout=60) == 0
        w.close()
    assert c.summary()["workers"]["0"]["staleness_hist"] == [3, 0, 1]


def test_per_worker_metrics_show_which_worker_is_slow(tmp_path):
    s = run(tmp_path, "train.steps=150", "train.log_every=10", "algo.min_workers=2", "algo.max_staleness=100",
            "cluster.nodes=[{delay_s: 0.02},{delay_s: 0.5}]")  # both in from the start; slow: <= 128 samples/s
    fast, slow = s["workers"]["0"], s["workers"]["1"]
    assert slow["samples_per_s"] < fast["samples_per_s"] / 2, (slow["samples_per_s"], fast["samples_per_s"])
    # the slow worker computes while the fast one moves the weights on: its gradients are the staler
    assert slow["staleness_mean"] > fast["staleness_mean"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "applied" in r]
    assert len(logged) == 15
    for r in logged:  # each update is one worker's: the per-rank counts add up to the total
        assert sum(r.get(f"applied/{k}", 0) for k in (0, 1)) == r["applied"], r
    last = logged[-1]
    assert last["applied/0"] == fast["applied"] and last["applied/1"] == slow["applied"]
    assert last["samples_per_s/1"] < last["samples_per_s/0"] / 2
    assert any("staleness/0" in r for r in logged) and any("staleness/1" in r for r in logged)


def test_edp_stop_after_then_resume_continues_to_the_end(tmp_path):
    # min_workers=2: both workers are in both runs from the first update (one alone could make all 60)
    common = ["train.steps=120", "train.log_every=10", "algo.min_workers=2"]
    first = run(tmp_path, *common, "train.stop_after=60")
    assert first["steps"] == 60 and first["applied"] == 60
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 60
    resumed = run(tmp_path, *common, f"resume={tmp_path}")
    assert resumed["steps"] == 120 and resumed["applied"] == 120  # the whole run's: 60 before, the remaining 60 after
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(10, 121, 10))  # appended: 10..60, then 70..120
    # it went on from the trained weights and schedule: the first resumed loss is far below the first one,
    # and step 70's lr is the 120-step cosine's (0.05 decaying to 0.005), not a fresh schedule's
    assert logged[6]["loss"] < logged[0]["loss"] / 2
    assert logged[6]["lr"] == pytest.approx(0.005 + 0.0225 * (1 + math.cos(math.pi * 69 / 120)))
    # one run's files: counters go on from the checkpoint's, the restart is an event, worker history is kept
    assert [r["event"] for r in rows if "event" in r] == ["resumed"]
    assert all(r["samples"] == 64 * r["step"] for r in logged)  # an EDP update is one worker's batch
    assert resumed["samples"] == 64 * 120 and resumed["wall_s"] > first["wall_s"]
    assert sum(w["applied"] for w in resumed["workers"].values()) == 120
    assert all(w["rejoins"] == 1 and w["joined_step"] == 60 for w in resumed["workers"].values())
    # each worker's counters went on from the checkpoint's (gradients skipped as stale make bytes vary run to run)
    for rank, before in first["workers"].items():
        after = resumed["workers"][rank]
        assert all(after[k] >= before[k] for k in ("applied", "skipped", "samples", "bytes_received")), (before, after)
    assert resumed["bytes_received"] == sum(w["bytes_received"] for w in resumed["workers"].values())
    assert resumed["bytes_received"] > first["bytes_received"]


def test_a_killed_edp_server_resumed_keeps_every_count_and_its_workers_rejoin(tmp_path):
    n = 300
    with Cluster(tmp_path, "edp", f"train.steps={n}", "train.checkpoint_every=25", "train.log_every=5", *FAST,
                 "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05}]") as c:
        c.server()
        c.worker(0)
        c.worker(1)
        # the new server: started now, held (imported) until the old one is killed, so it is up within its set-up
        c.server(f"resume={tmp_path}", name="new server", held=True)
        c.wait_for_step(60)
        c.kill("server")
        ckpt_step = json.loads((tmp_path / "checkpoint.json").read_text())["step"]
        c.release("new server")
        assert c.wait("new server", timeout=240) == 0, c.output("new server")[-3000:]
        for w in ("worker0", "worker1"):
            assert c.wait(w, timeout=30) == 0, c.output(w)[-2000:]
        s, rows, log = c.summary(), c.metrics(), c.output("new server").splitlines()
        workers = [c.output(w) for w in ("worker0", "worker1")]
    assert s["steps"] == n and ckpt_step >= 50
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, n + 1, 5))  # each update logged once
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(ckpt_step, "resumed")]
    assert all(r["samples"] == 64 * r["step"] for r in logged) and s["samples"] == 64 * n
    # every update applied is one worker's, counted across the restart: the per-worker counts add up to the run's
    assert s["applied"] == n and sum(w["applied"] for w in s["workers"].values()) == n
    assert all(w["rejoins"] == 1 and w["joined_step"] >= ckpt_step for w in s["workers"].values())
    # both workers registered again, with the new server, which welcomed each once
    assert len([x for x in log if " joined from node " in x]) == 2
    for out in workers:
        assert len(re.findall(r"worker \d registered with ", out)) == 2, out[-3000:]


def test_min_workers_is_edps_key_in_1_to_cluster_workers_and_not_syncps():
    """syncps waits for every worker (its gradient guard's quorum too): algo.min_workers there would have turned
    the guard's robust clip off silently, so it is not a syncps setting; edp's is checked against the cluster."""
    from hydra.errors import ConfigCompositionException

    from smolcluster.config import validate
    from smolcluster.errors import ConfigError

    def composed(*overrides: str):
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            return compose("config", overrides=["cluster.workers=2", *overrides])

    validate(train_config(composed("algo=edp", "algo.min_workers=2")))
    assert train_config(composed("algo=edp")).algo.min_workers == 1
    for bad in ("0", "3"):
        with pytest.raises(ConfigError, match=rf"^algo.min_workers={bad} is invalid: "
                                              r".*between 1 and cluster.workers \(2\)"):
            validate(train_config(composed("algo=edp", f"algo.min_workers={bad}")))
    for refused in (("algo=edp", "algo.min_workers=null"), ("algo=syncps", "algo.min_workers=5")):
        with pytest.raises(ConfigCompositionException, match="algo.min_workers"):  # the schema types it (or not)
            composed(*refused)
