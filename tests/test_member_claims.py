"""A paired member's claims are bounded (issue 21, hole 5): sample counts come from assignment, the norm guard has
an absolute cap and a bound one worker cannot move, allreduce checks the norms ranks report, rank N is tied to
client key N. Real server and worker processes on loopback; the rogue is tests/rogue_worker.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from smolcluster.algorithms.guard import GradientGuard
from smolcluster.algorithms.ps import rank_keys
from smolcluster.algorithms.syncps import SyncServer
from smolcluster.errors import ConfigError
from smolcluster.keys import main as keys_main
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.transport import client_key_name, client_ranks, make_keys, wire
from tests.cluster_util import Cluster, register_with
from tests.conftest import MNIST, REPO, train

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=5", "cluster.connect_timeout_s=90"]


def rogue(c: Cluster, rank: int, mode: str, *overrides: str, keys=None) -> subprocess.Popen:
    """tests/rogue_worker.py as rank ``rank`` of the cluster (its output in the run dir)."""
    log = c.run_dir / f"rogue{rank}.out"
    c.logs[f"rogue{rank}"] = log
    args = [str(c.port), str(rank), mode, *([str(keys)] if keys else []), "--", *c.common[:2], *overrides]
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "rogue_worker.py"), *args], cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    c.procs[f"rogue{rank}"] = proc
    return proc


# -- sample counts come from assignment (and the cap holds from step 0) --------------------------------------

def syncps_mnist(c: Cluster, data: list[str], attacked: bool) -> None:
    """Start a server and three workers, the third a rogue forging its sample counts if ``attacked``."""
    c.server()
    c.worker(0)
    c.worker(1)
    if attacked:
        rogue(c, 2, "forge", *data)
    else:
        c.worker(2)


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    """An honest and an attacked run, at once (on two cores, one's start-up overlaps the other's)."""
    mnist_root = MNIST
    if not (mnist_root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found in {mnist_root} (set SMOLCLUSTER_SHARED_DATA)")
    d = tmp_path_factory.mktemp("forged")
    data = ["data=mnist", f"data.root={mnist_root}", "data.download=false", "model.hidden=[32]"]
    runs = ["train.steps=150", "train.log_every=50", *FAST, *data]
    with Cluster(d / "honest", "syncps", *runs, workers=3) as honest, \
            Cluster(d / "attacked", "syncps", *runs, workers=3) as attacked:
        syncps_mnist(honest, data, False)
        syncps_mnist(attacked, data, True)
        for c in (honest, attacked):
            assert c.wait("server", timeout=300) == 0, c.output("server")[-3000:]
        assert attacked.procs["rogue2"].wait(timeout=60) == 0, attacked.output("rogue2")[-3000:]
        return tuple({**c.summary(), "rows": c.metrics()} for c in (honest, attacked))


def test_forged_sample_counts_are_rejected_and_the_run_is_as_accurate_as_an_honest_one(forged):
    """The issue's attack: a third worker sends tiny gradients with counts -129, 10^9, -128. Each is rejected
    (counted per worker and in rejected_messages), the two honest workers' gradients are weighted by their
    assigned batches, and the run ends within 1 point of an honest 3-worker run; the sample figures are the
    assigned ones (no 10^9 anywhere)."""
    honest, attacked = forged
    rogue_ = attacked["workers"]["2"]
    assert rogue_["bad_samples"] == 149 and rogue_["applied"] == 0, rogue_  # every step after the first
    assert attacked["bad_samples"] == 149 and attacked["rejected_messages"]["bad_samples"] == 149
    assert abs(attacked["eval_accuracy"] - honest["eval_accuracy"]) <= 0.01, (attacked["eval_accuracy"],
                                                                              honest["eval_accuracy"])
    assert honest["eval_accuracy"] >= 0.9, honest["eval_accuracy"]
    assert attacked["samples"] == 150 * 2 * 64 and honest["samples"] == 150 * 3 * 64
    assert max(r["samples"] for r in attacked["rows"] if "samples" in r) == 150 * 2 * 64
    assert rogue_["samples"] == 0 and attacked["workers"]["0"]["samples"] == 150 * 64


def test_the_absolute_cap_holds_from_the_first_step(forged):
    """The rogue's first gradient (step 0, an honest count) has norm 1e30: rejected by train.max_grad_norm before
    any warm-up, counted once; honest runs reject and clip nothing."""
    honest, attacked = forged
    assert attacked["gradients_rejected"] == 1 and attacked["workers"]["2"]["rejected"] == 1, attacked
    assert attacked["rows"][0]["gradients_rejected"] == 1  # already in the first logged row
    assert honest["gradients_rejected"] == honest["gradients_clipped"] == honest["bad_samples"] == 0


def test_the_guard_rejects_above_the_cap_and_clips_above_the_robust_bound():
    g = GradientGuard(ratio=10, window=5, warmup=3, cap=1e4)
    assert g.check(1e30) == 0.0 and g.bound() is None  # the cap, from the first gradient
    assert g.check(1e3) == g.check(1.0) == g.check(1.0) == 1.0  # warm-up: under the cap is enough
    assert g.bound() == 10.0  # the median of [1e3, 1, 1]: one large norm does not move it
    assert g.check(20.0) == 0.5 and g.check(9.0) == 1.0 and g.check(float("nan")) == 0.0
    assert (g.rejected, g.clipped) == (2, 1)
    off = GradientGuard(ratio=0, cap=0)
    assert off.check(1.0) == off.check(1e12) == 1.0 and off.check(float("inf")) == 0.0


def test_one_source_cannot_drag_the_bound_up_by_sending_more_or_larger_gradients():
    """edp's drift attack, on the guard alone: source 1 sends 3 gradients per honest one, each claiming its own
    version and 10x the last (up to 1e3, under the cap). The old guard's bound went from 10 to 7e36 in 300 steps;
    here it stays within 10x the honest norms, and the attacker's gradients are clipped, not applied whole."""
    rng = np.random.default_rng(0)
    g, norm, version = GradientGuard(ratio=10, window=50, warmup=5, cap=1e4), 1.0, 0
    for _ in range(300):
        assert g.check(float(rng.uniform(0.5, 1.5)), source="0", version=version) == 1.0
        version += 1
        for _ in range(3):
            g.check(norm, source="1", version=version)
            norm, version = min(norm * 10, 1e3), version + 1
    assert g.bound() <= 15.0, g.bound()
    assert g.clipped >= 3 * 300 - 10, g.clipped


def test_a_source_that_arrives_first_alone_does_not_set_the_bound():
    """The drift attacker reaches the server before the honest worker's first gradient (CI's loaded machine did
    this): its 1, 10, 100, 1e3, 1e3 filled the warmup alone and set the bound to 1e4. A server that waits for
    two workers gives no bound until both have sent one, and then the honest norms bound it."""
    alone, waits = GradientGuard(ratio=10, warmup=5, cap=1e4), GradientGuard(ratio=10, warmup=5, cap=1e4,
                                                                                min_sources=2)
    for g in (alone, waits):
        for version, norm in enumerate([1, 10, 100, 1e3, 1e3, 1e3]):
            g.check(norm, source="1", version=version)
    assert alone.bound() == 1e4 and waits.bound() is None
    assert waits.check(1e3, source="1", version=6) == 1.0  # still under the cap, as before any bound
    assert waits.check(1.2, source="0", version=7) == 1.0
    assert waits.bound() == 12.0  # the lower of the sources' medians, x 10
    assert waits.check(1e3, source="1", version=8) == 12.0 / 1e3


def test_an_honest_source_heard_only_through_stale_gradients_still_bounds_a_flood():
    """edp drops a gradient staler than algo.max_staleness before applying it. A flood of no-compute updates can
    make every honest gradient stale: the guard still hears their norms (``observe``), so the bound forms from the
    honest source and the flood is clipped, not held to the absolute cap alone."""
    g = GradientGuard(ratio=10, warmup=5, cap=1e4, min_sources=2)
    for version, norm in enumerate([1, 10, 100, 1e3, 1e3, 1e3]):
        g.check(norm, source="1", version=version)
    assert g.bound() is None
    g.observe(1.2, source="0", version=0)  # stale: not applied, but heard
    g.observe(float("nan"), source="0", version=1)  # (nothing non-finite or over the cap is recorded)
    g.observe(1e30, source="0", version=2)
    assert g.bound() == 12.0 and (g.rejected, g.clipped) == (0, 0)
    assert g.check(1e3, source="1", version=8) == 12.0 / 1e3


def test_edp_drift_attack_leaves_the_bound_near_honest_norms(tmp_path, mnist_root):
    """The same attack by a real rogue process against an edp server: 300 updates later the bound that the
    server logs is still near honest norms (an MLP's gradient norms are O(1); the old guard's reached 7e36) and
    the attacker's gradients were clipped, each counted. (Its in-bound gradients still land, more often than an
    honest worker's: the guard bounds each gradient's size, not its direction; docs/setup_cluster.md.)"""
    data = ["data=mnist", f"data.root={mnist_root}", "data.download=false"]
    with Cluster(tmp_path, "edp", "train.steps=300", "train.log_every=10", "algo.min_workers=2", *FAST, *data,
                 "cluster.nodes=[{delay_s: 0.01}]", workers=2) as c:
        c.server()
        c.worker(0)
        rogue(c, 1, "drift", *data)
        assert c.wait("server", timeout=300) == 0, c.output("server")[-3000:]
        rows, s = c.metrics(), c.summary()
    bounds = [r["grad_norm_bound"] for r in rows if "grad_norm_bound" in r]
    assert len(bounds) >= 20 and max(bounds) < 20, bounds
    assert s["workers"]["1"]["clipped"] >= 100 and s["gradients_clipped"] == sum(
        w["clipped"] for w in s["workers"].values()), s["workers"]


# -- allreduce: norms computed by the receiver -------------------------------------------------------------

def test_allreduce_catches_a_rank_that_lies_about_its_chunks_norm(tmp_path):
    """Every 10th step rank 1 blows up the reduced chunks it owns (x 1e6) and reports their honest norm. The
    table of reports alone would pass those steps; each rank computes the norms of the chunks it received
    instead, finds the lie, and skips the step on every rank alike."""
    s = train(tmp_path, "algo=allreduce", "cluster.workers=2", "train.steps=60", "train.log_every=10",
              "cluster.nodes=[{},{lie_norm_every: 10}]")
    assert s["steps"] == 60 and s["gradients_rejected"] == 6, s  # steps 9, 19, ..., 59
    assert s["eval_accuracy"] >= 0.85, s["eval_accuracy"]
    for rank in (0, 1):  # each rank found the lie itself, at each of those steps
        lines = next(tmp_path.glob(f"node-*-worker{rank}.log.jsonl")).read_text().splitlines()
        assert sum("rank(s) [1] reported a norm of their chunks" in line for line in lines) == 6, rank


# -- rank N is tied to client key N -------------------------------------------------------------------------

def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return train_config(compose("config", overrides=["algo=syncps", "run_id=k", *overrides]))


def test_a_worker_key_claiming_another_rank_is_refused(tmp_path):
    """Rank 0's key claiming rank 1 is refused (naming the key rank 1 needs); so is rank 0's own key with a batch
    the server did not assign; each key then registers as its own rank."""
    keys = tmp_path / "keys"
    make_keys(keys, clients=2)
    cfg = compose_cfg("cluster.workers=2", f"cluster.keys={keys}")
    server = SyncServer(cfg, tmp_path)
    fp = server.trainer.fingerprint

    def register(rank: int, key: str, batch: int = 64):
        return register_with(server, {"rank": rank, "node": "n", "device": "cpu", "batch_size": batch,
                                      "fingerprint": fp, "protocol": wire.PROTOCOL_VERSION, "algo": "syncps"}, keys, key)

    try:
        refused = register(1, "client")  # rank 0's key claims rank 1
        assert refused.kind == "refuse" and not refused.fields.get("retry"), refused.fields
        assert "authorized/client1.key" in refused.fields["reason"] and "rank 0's" in refused.fields["reason"]
        bigger = register(0, "client", batch=128)  # its own key, but a batch the server did not assign
        assert bigger.kind == "refuse" and "assigns it 64" in bigger.fields["reason"], bigger.fields
        assert register(1, "client1").kind == "welcome" and register(0, "client").kind == "welcome"
        assert server.endpoint.rejected["refused_rank_key"] == server.endpoint.rejected["refused_batch"] == 1
        assert sorted(server.workers) == [0, 1]
    finally:
        server.endpoint.close()
        server.recorder.finish(None)


def test_one_shared_client_key_is_refused_off_loopback_only(tmp_path):
    make_keys(tmp_path, clients=1)
    on_lan = compose_cfg("cluster.workers=2", f"cluster.keys={tmp_path}", "cluster.bind=0.0.0.0")
    with pytest.raises(ConfigError, match=r"one client key for 2 workers.*--workers 2"):
        rank_keys(on_lan.cluster)
    assert rank_keys(compose_cfg("cluster.workers=2", f"cluster.keys={tmp_path}").cluster) is None  # loopback
    make_keys(tmp_path, clients=2)
    assert sorted(rank_keys(on_lan.cluster).values()) == [0, 1]


def test_keys_cli_makes_one_private_pair_per_worker_and_never_writes_through_a_symlink(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (keys / "client1.key_secret").symlink_to(target)  # planted before the keys are made
    assert keys_main(["--dir", str(keys), "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank 2: " in out and "client2.key_secret" in out
    assert target.read_text() == "untouched" and not (keys / "client1.key_secret").is_symlink()
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == ["client.key", "client1.key", "client2.key"]
    for d in (keys, keys / "authorized"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for secret in keys.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert sorted(client_ranks(keys).values()) == [0, 1, 2]
    assert client_key_name(0) == "client" and client_key_name(2) == "client2"
    assert keys_main(["--dir", str(keys)]) == 2  # keys exist: --force to replace them
