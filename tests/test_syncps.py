"""SyncPS end to end: real server and worker processes on loopback."""

from __future__ import annotations

import json
import time

import pytest
from hydra import compose, initialize_config_dir

from smolcluster.algorithms.syncps import SyncServer
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.transport import ClientEndpoint, Heartbeat, wire
from tests.cluster_util import Cluster
from tests.conftest import run_cli, train
from tests.equivalence import adamw_diff, max_abs_diff

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def test_syncps_equals_local_on_the_union_of_batches_mlp(tmp_path):
    s = train(tmp_path / "ps", "algo=syncps", "cluster.workers=2", "train.batch_size=32", "train.steps=20", *FAST)
    train(tmp_path / "local", "algo=local", "train.batch_size=64", "train.steps=20")
    assert s["steps"] == 20 and s["samples"] == 20 * 64
    assert s["workers"]["0"]["applied"] == 20 and s["workers"]["1"]["applied"] == 20
    assert max_abs_diff(tmp_path / "ps", tmp_path / "local") < 1e-5


@pytest.mark.slow
def test_syncps_equals_local_gpt2_tiny(tmp_path, gpt2_common, local_gpt2):
    train(tmp_path, "algo=syncps", "cluster.workers=2", "train.batch_size=4", *gpt2_common, *FAST)
    rest, largest, count = adamw_diff(tmp_path, local_gpt2[0])
    assert rest < 1e-5 and largest < 1e-4 and count < 100, (rest, largest, count)


def test_syncps_mnist_two_workers_three_epochs_reaches_95_percent(tmp_path, mnist_root):
    s = train(tmp_path, "algo=syncps", "cluster.workers=2", "data=mnist", f"data.root={mnist_root}",
              "train.epochs=3", *FAST)
    assert s["eval_accuracy"] >= 0.95, s["eval_accuracy"]
    assert s["workers_lost"] == []


def test_sigkill_a_worker_mid_run_the_rest_finishes(tmp_path):
    # delay_s caps the workers at 20 steps/s: the kill lands before the run's end on any machine, and from then on
    # every step waits for worker 1 until it is declared lost, so the loss is surely before the end too
    with Cluster(tmp_path, "syncps", "train.steps=150", "train.log_every=5", *FAST,
                 "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05}]") as c:
        c.server()
        c.worker(0)
        c.worker(1)
        c.wait_for_step(60)
        killed_at = c.metrics()[-1]["step"]  # read before the kill: it is then surely before the loss
        c.kill("worker1")
        assert c.wait("server", timeout=240) == 0, c.output("server")[-3000:]
        assert c.wait("worker0", timeout=30) == 0
        s = c.summary()
    assert s["steps"] == 150 and s["workers_lost"] == [1]
    assert s["workers"]["1"]["lost_step"] >= killed_at
    assert s["workers"]["0"]["applied"] == 150
    losses = [r["loss"] for r in c.metrics() if r.get("loss") is not None]
    before = [r["loss"] for r in c.metrics() if r.get("loss") is not None and r["step"] <= killed_at]
    assert losses[-1] < min(before)  # still learning after the loss of a worker


def test_server_killed_and_restarted_with_resume_reads_as_one_run_and_ends_like_local(tmp_path):
    """SIGKILL the server between checkpoints, restart it with resume: the run's files read as one run, the
    workers find the new server by their ping (not by waiting out their longest wait), and the weights end as an
    uninterrupted run's."""
    n = 150
    # straggler_timeout=20: without the ping, a worker would wait 23 s for weights and then log "no weights for"
    args = [f"train.steps={n}", "train.checkpoint_every=25", "train.log_every=5", "algo.straggler_timeout=20",
            *FAST, "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05}]"]
    with Cluster(tmp_path / "run", "syncps", *args) as c:
        c.server()
        c.worker(0)
        c.worker(1)
        # the new server: started now, held (imported) until the old one is killed, so it is up within its set-up
        c.server(f"resume={tmp_path / 'run'}", name="new server", held=True)
        c.wait_for_step(60)
        c.kill("server")
        ckpt_step = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"]
        assert ckpt_step >= 50 and ckpt_step % 25 == 0
        replayed = [r for r in c.metrics() if r["step"] > ckpt_step]  # logged, then lost with the server
        c.release("new server")
        for w in ("worker0", "worker1"):
            c.wait_for_line(w, "re-registering", timeout=240)
        assert c.wait("new server", timeout=240) == 0, c.output("new server")[-3000:]
        for w in ("worker0", "worker1"):
            assert c.wait(w, timeout=30) == 0, c.output(w)[-2000:]
        s, rows, log = c.summary(), c.metrics(), c.output("new server").splitlines()
        workers = [c.output(w) for w in ("worker0", "worker1")]
    assert s["steps"] == n
    assert f"resumed from {tmp_path / 'run'}/checkpoint.safetensors at step {ckpt_step}" in "\n".join(log)

    # metrics.jsonl: each step logged once, counters cumulative, the restart one event row
    events = [r for r in rows if "event" in r]
    assert len(events) == 1 and events[0]["event"] == "resumed" and events[0]["step"] == ckpt_step
    assert events[0]["dropped_rows"] == len(replayed)
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, n + 1, 5))
    assert s["straggler_skips"] == 0
    assert all(r["samples"] == 128 * r["step"] for r in logged)  # two workers x 64, from step 0
    times = [r["time"] for r in rows]
    assert times == sorted(times)  # the clock goes on from the checkpoint's, it does not restart at 0
    # summary.json: the whole run
    assert s["samples"] == 128 * n and s["resumed_from"].endswith("checkpoint.safetensors")
    assert s["wall_s"] >= logged[-1]["time"] * 0.99 and s["samples_per_s"] == pytest.approx(s["samples"] / s["wall_s"], rel=0.01)
    for rank in ("0", "1"):  # each worker's history carried across the restart
        w = s["workers"][rank]
        assert w["applied"] == n and w["samples"] == 64 * n and w["rejoins"] == 1 and w["joined_step"] == ckpt_step
    assert s["bytes_received"] > sum(w["bytes_received"] for w in s["workers"].values()) * 0.99
    assert s["bytes_received"] >= n * 2 * 4 * 0.99 * s["params"]  # n steps x 2 workers x fp32 gradients

    # each worker re-registered because the new server answered its ping with "unregistered"
    assert len([x for x in log if " joined from node " in x]) == 2
    for out in workers:
        assert "the server does not know us (restarted?); re-registering" in out, out[-3000:]
        assert "no weights for" not in out, out[-3000:]

    # and it ends where an uninterrupted run on the union of the batches does
    train(tmp_path / "local", "algo=local", "train.batch_size=128", f"train.steps={n}")
    assert max_abs_diff(tmp_path / "run", tmp_path / "local") < 1e-5


def test_worker_with_a_foreign_model_is_refused_on_both_sides(tmp_path):
    with Cluster(tmp_path, "syncps", "train.steps=30", *FAST, workers=1) as c:
        c.server()
        c.worker(0, "model.hidden=[32]")
        assert c.wait("worker0", timeout=60) == 2
        assert "refused worker 0: model fingerprint" in c.output("worker0")
        c.worker(0)  # the right model is let in and the run completes
        assert c.wait("server", timeout=120) == 0
    assert "refused a worker: model fingerprint" in c.output("server")


def test_worker_without_a_server_gives_up_with_a_clear_error(tmp_path):
    proc = run_cli("smolcluster.train", "algo=syncps", "role=worker", "rank=0", "cluster.port=1",
                   "cluster.connect_timeout_s=3", f"hydra.run.dir={tmp_path}", check=False, timeout=120)
    assert proc.returncode == 2
    assert "could not reach the server at tcp://127.0.0.1:1 for cluster.connect_timeout_s=3" in proc.stderr


def test_launcher_stops_everything_and_names_the_failed_child(tmp_path):
    proc = run_cli("smolcluster.train", "algo=syncps", f"hydra.run.dir={tmp_path}", "train.steps=50",
                   "cluster.nodes=[{},{device: cuda:7}]", *FAST, check=False, timeout=120)
    assert proc.returncode == 2
    assert "worker 1 exited with code 2" in proc.stderr
    assert "[worker 1]" in proc.stderr and "CUDA is not available" in proc.stderr


def test_heterogeneous_batch_sizes_are_weighted_by_samples_and_ema_is_evaluated(tmp_path):
    s = train(tmp_path / "ps", "algo=syncps", "cluster.workers=2", "train.steps=15", "algo.ema=0.9",
              "cluster.nodes=[{batch_size: 48},{batch_size: 16}]", *FAST)
    train(tmp_path / "local", "algo=local", "train.batch_size=64", "train.steps=15")
    assert s["workers"]["0"]["samples"] == 15 * 48 and s["workers"]["1"]["samples"] == 15 * 16
    assert max_abs_diff(tmp_path / "ps", tmp_path / "local") < 1e-5
    # the EMA weights trail the trained ones: evaluated separately, a different (worse, early on) loss
    assert s["ema_eval_loss"] > s["eval_loss"]


def test_a_straggler_is_skipped_and_the_others_apply_every_step(tmp_path):
    # worker 1 needs 1 s a step, the server waits 0.2 s: it is late at (nearly) every step
    with Cluster(tmp_path, "syncps", "train.steps=20", "algo.straggler_timeout=0.2", *FAST,
                 "cluster.nodes=[{},{delay_s: 1.0}]") as c:
        c.server()
        c.worker(0)
        c.worker(1)
        assert c.wait("server", timeout=120) == 0, c.output("server")[-3000:]
        assert c.wait("worker1", timeout=60) == 0, c.output("worker1")[-2000:]
        s = c.summary()
    w0, w1 = s["workers"]["0"], s["workers"]["1"]
    assert s["steps"] == 20 and s["workers_lost"] == []
    assert w0["applied"] == 20 and w0["skipped"] == 0
    # every step is either applied or skipped for the straggler, each skip counted once
    assert w1["applied"] + w1["skipped"] == 20 and s["straggler_skips"] == w1["skipped"] >= 15
    assert s["samples"] == 64 * (20 + w1["applied"])  # the skipped steps averaged worker 0's batch alone


def test_a_killed_worker_restarted_with_its_rank_rejoins_on_current_weights(tmp_path):
    # delay_s caps the workers at 16 steps/s; the new process for rank 1 is started with the others but held
    # (imported, not registered) until the old one is declared lost, so it rejoins within its set-up, mid-run
    n = 140
    with Cluster(tmp_path, "syncps", f"train.steps={n}", "train.log_every=5", "algo.straggler_timeout=3", *FAST,
                 "cluster.nodes=[{delay_s: 0.06},{delay_s: 0.06}]") as c:
        c.server()
        c.worker(0)
        c.worker(1)
        c.worker(1, name="new worker1", held=True)  # a new process with the same rank
        c.wait_for_step(40)  # trained far enough that its weights are told from the initial ones by the loss
        killed_at = c.metrics()[-1]["step"]  # read before the kill: it is then surely before the loss
        c.kill("worker1")
        c.wait_for_line("server", "worker 1 (worker1) lost")
        c.release("new worker1")
        assert c.wait("server", timeout=240) == 0, c.output("server")[-3000:]
        for w in ("worker0", "new worker1"):
            assert c.wait(w, timeout=30) == 0, c.output(w)[-2000:]
        s = c.summary()
        rows = c.metrics()
    w1 = s["workers"]["1"]
    assert s["steps"] == n and s["workers_lost"] == [] and w1["alive"] and w1["rejoins"] == 1
    assert s["workers"]["0"]["applied"] == n
    assert killed_at <= w1["lost_step"] < w1["joined_step"] < n
    # its history was kept: each step applied (before the kill, after the rejoin), skipped (between the kill
    # and being declared lost) or missed (while away), and every step since the rejoin applied
    assert w1["applied"] + w1["skipped"] + (w1["joined_step"] - w1["lost_step"]) == n
    assert w1["applied"] >= killed_at + (n - w1["joined_step"]) - w1["skipped"]
    # on the current weights: its first loss after the rejoin is the trained model's, not the initial one's
    first_back = next(r for r in rows if r["step"] > w1["joined_step"] and "loss/1" in r)
    assert first_back["loss/1"] < rows[0]["loss/1"] / 2


def test_a_server_busy_longer_than_liveness_keeps_workers_whose_heartbeats_wait_in_its_queue(tmp_path):
    """An eval or a checkpoint save can outlast cluster.liveness_s: workers that beat all along are not lost."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=syncps", "cluster.liveness_s=1", "run_id=busy"]))
    server = SyncServer(cfg, tmp_path)
    workers, beats = [], []
    try:
        for rank in (0, 1):  # registered as real workers do, then beating from a thread of their own
            w = ClientEndpoint(server.endpoint.address, max_bytes=cfg.cluster.max_bytes)
            w.send("register", {"rank": rank, "node": f"n{rank}", "device": "cpu", "batch_size": 64,
                                "protocol": wire.PROTOCOL_VERSION, "fingerprint": server.trainer.fingerprint,
                                "algo": "syncps"})
            workers.append(w)
            beats.append(Heartbeat(server.endpoint.address, rank=rank, interval_s=0.1,
                                   max_bytes=cfg.cluster.max_bytes).start())
        deadline = time.monotonic() + 30
        while len(server.live()) < 2 and time.monotonic() < deadline:
            server.poll(0.1)
        assert [w.rank for w in server.live()] == [0, 1]

        time.sleep(2.5)  # busy (an eval, a checkpoint save): it reads nothing for longer than liveness_s, while
        # ~25 beats from each worker queue up; then it judges silence after each message, as its loop does
        while True:
            server.poll(0.01)
            server.check_liveness()
            assert [w.rank for w in server.live()] == [0, 1]  # a queued beat is not silence
            if not server.endpoint.pending():
                break

        beats[1].stop()  # and a worker that really falls silent is still lost, while the one that beats is not
        deadline = time.monotonic() + 30
        while 1 in [w.rank for w in server.live()]:
            assert time.monotonic() < deadline, "worker 1 fell silent but was not declared lost within 30 s"
            server.poll(0.01)
            server.check_liveness()
        assert [w.rank for w in server.live()] == [0]
    finally:
        for b in beats:
            b.stop()
        for w in workers:
            w.close()
        server.endpoint.close()
