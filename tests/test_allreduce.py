"""algo=allreduce: the ring's collectives, equivalence with algo=local (also with ZeRO-1), codecs, failure, CURVE."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import torch
import zmq
from hydra import compose, initialize_config_dir

from smolcluster.algorithms.allreduce import check
from smolcluster.algorithms.membership import Agreement, check_quorum
from smolcluster.errors import ConfigError
from smolcluster.launch.local import free_ports
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.transport import make_keys, wire
from smolcluster.transport.ring import RingLink
from tests.cluster_util import Cluster
from tests.conftest import train, train_together
from tests.equivalence import adamw_diff, max_abs_diff

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]


def ring_threads(world: int, fn, **kw) -> dict:
    """Run ``fn(link)`` on ``world`` RingLinks in threads of this process (one zmq socket set each)."""
    base = free_ports("127.0.0.1", world)
    addrs = [f"tcp://127.0.0.1:{base + r}" for r in range(world)]
    out, errors = {}, []

    def one(rank):
        link = RingLink(rank, addrs, addrs[rank], max_bytes=1 << 30, heartbeat_s=0.1, liveness_s=5, **kw)
        try:
            Agreement(link).reform(0, "model", 30, min_members=world)
            out[rank] = fn(link)
        except Exception as e:  # reported by the main thread
            errors.append(e)
        finally:
            link.close()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
@pytest.mark.parametrize("n,bucket", [(10_007, 4000), (600_011, 1_000_000)])
def test_ring_allreduce_sums_and_every_rank_ends_with_the_same_bytes(codec, n, bucket):
    # n not a multiple of the world size; 4000-byte buckets: 11 of them, each chunk one message; 1 MB buckets:
    # 3 of them, chunks of 333 kB sent as 2 segments (ring.SEGMENTS), the last bucket's of 133 kB whole
    world = 3
    data = [torch.randn(n, generator=torch.Generator().manual_seed(r)) for r in range(world)]

    def fn(link):
        x = data[link.rank].clone()
        link.allreduce(x, codec)
        return x, link.bytes_sent

    out = ring_threads(world, fn, bucket_bytes=bucket)
    want = sum(data)
    tol = {"none": 1e-6, "fp16": 1e-2, "int8": 0.1}[codec]
    for r in range(world):
        assert torch.equal(out[r][0], out[0][0])  # replicas identical, also under a lossy codec
        assert float((out[r][0] - want).abs().max()) < tol
    if codec == "none":  # each rank sends 2(N-1)/N of the buffer (+ a small header per message)
        payload = 2 * (world - 1) / world * n * 4
        assert payload < out[0][1] < payload * 1.1, out[0][1]


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_stats_rows_ride_on_the_last_bucket_with_no_message_of_their_own(codec):
    """allreduce(row=...) brings every member's row (the per-step stats table) on the last bucket's all-gather:
    the same table as a gather_scalars round, exact (float64, never through the codec), in ring order, and the
    same sums and message count as an allreduce without rows."""
    world, n = 3, 600_011  # 3 buckets: 2 of 1 MB (chunks of 333 kB, 2 segments), a last of 0.4 MB (133 kB, whole)

    def fn(link):
        sent = []
        real = link._send_frames
        link._send_frames = lambda frames: (sent.append(1), real(frames))  # count the messages, send them
        x, y = (torch.randn(n, generator=torch.Generator().manual_seed(link.rank)) for _ in range(2))
        y.copy_(x)
        link.allreduce(x, codec)
        plain = len(sent)
        mine = [float(link.rank), 1 / 3 + link.rank, 1e-12 * (link.rank + 1)]
        table = link.allreduce(y, codec, row=lambda: mine)
        return x, y, table, len(sent) - plain, plain, link.gather_scalars(mine), len(sent) - 2 * plain

    out = ring_threads(world, fn, bucket_bytes=1_000_000)
    want = torch.tensor([[float(r), 1 / 3 + r, 1e-12 * (r + 1)] for r in range(world)], dtype=torch.float64)
    for r in range(world):
        x, y, table, with_rows, plain, gathered, gather_msgs = out[r]
        assert torch.equal(table, want) and torch.equal(gathered, want)  # exact, rank r's row at position r
        if codec == "none":  # (lossy: the second allreduce's error feedback differs, as for any second call)
            assert torch.equal(x, y)
        assert with_rows == plain == (2 * 2 + 1) * 2 * (world - 1)  # segments x (rs + ag) x hops
        assert gather_msgs == world - 1  # a table round of its own (ZeRO-1's): one all-gather


def test_ring_error_feedback_keeps_int8_rounding_from_adding_up():
    """The same int8 all-reduce 8 times: without error feedback the same rounding error would come back each
    time (8x one step's over the 8 sums); with it, each step makes up what the last one lost."""
    world, n, k = 2, 4096, 8
    data = [torch.randn(n, generator=torch.Generator().manual_seed(10 + r)) * (1 + r) for r in range(world)]

    def fn(link):
        outs = []
        for _ in range(k):
            x = data[link.rank].clone()
            link.allreduce(x, "int8")
            outs.append(x)
        return outs

    outs = ring_threads(world, fn)[0]
    want = sum(data)
    one = float((outs[0] - want).abs().sum())
    together = float((sum(outs) - k * want).abs().sum())
    assert one > 0 and together < 2 * one, (one, together)


@pytest.mark.parametrize("workers,zero", [(2, 0), (3, 1)])  # (ZeRO and the uneven batches share the ring's code)
def test_allreduce_equals_local_gpt2_tiny_adamw(tmp_path, gpt2_common, local_gpt2, workers, zero):
    # 3 workers with batches 4+2+2: the same global batch of 8 as 2 x 4, the ranks weighted by samples (weights
    # that are powers of two: with 3+3+2, syncps and allreduce alike are off by 2e-4 in a few AdamW-amplified values)
    nodes = "cluster.nodes=[{batch_size: 4},{batch_size: 2},{batch_size: 2}]" if workers == 3 else "train.batch_size=4"
    s = train(tmp_path, "algo=allreduce", f"cluster.workers={workers}", f"algo.zero={zero}", nodes, *gpt2_common,
              *FAST, "algo.bucket_mb=0.25")  # several buckets
    local_dir, local = local_gpt2
    assert s["steps"] == 20 and s["samples"] == 20 * 8 and s["ring"] == workers
    rest, largest, count = adamw_diff(tmp_path, local_dir)
    assert rest < 1e-5 and largest < 1e-4 and count < 100, (rest, largest, count)
    assert abs(s["final_loss"] - local["final_loss"]) < 1e-4
    # each rank sends 2(N-1)/N of the float32 gradient per step (+ headers, the loss, and ZeRO's parameters
    # instead of the gradients' all-gather: the same size)
    payload = 2 * (workers - 1) / workers * s["params"] * 4
    assert payload < s["bytes_sent_per_step"] < payload * 1.1, (s["bytes_sent_per_step"], payload)
    ratio = s["optimizer_state_bytes"] / local["optimizer_state_bytes"]
    if zero:  # this rank's 1/N of AdamW's two moments (+ a step counter per owned range)
        assert abs(ratio - 1 / workers) < 0.01, ratio
    else:
        assert ratio == 1.0


def test_overlapping_backward_gives_the_same_bits_as_waiting_for_it(tmp_path):
    model = ["model.hidden=[512,512]", "train.steps=20", "train.optimizer=adamw", "train.lr=1e-3"]  # 301k params
    args = ["algo=allreduce", "cluster.workers=3", "train.batch_size=32", "algo.bucket_mb=0.2", *model, *FAST]
    port = free_ports("127.0.0.1", 6)  # the two rings at once, each on its own ports
    over, wait = train_together((tmp_path / "overlap", [*args, f"cluster.port={port}"]),
                                (tmp_path / "wait", [*args, f"cluster.port={port + 3}", "algo.overlap=false"]))
    # (and both equal local: test_allreduce_equals_local_gpt2_tiny_adamw runs the default, overlapped, ring)
    assert max_abs_diff(tmp_path / "overlap", tmp_path / "wait") == 0.0
    assert over["buckets"] == 6
    # with overlap some buckets go round the ring while backward still runs (how many depends on the
    # machine: 16% on 2 busy cores, where backward takes a few ms); without, none
    assert over["buckets_during_backward"] > 0 and wait["buckets_during_backward"] == 0
    t = over["seconds_per_step"]  # where rank 0's steps went: waiting for chunks is part of the ring's work
    assert t["compute"] > 0 and 0 < t["ring_waiting"] <= t["ring"] and t["optimizer"] > 0, t


def test_auto_buckets_cut_the_gradient_in_about_8_between_1_and_25_mb():
    from smolcluster.algorithms.allreduce import bucket_bytes

    def auto(mb):
        return bucket_bytes("auto", {"float32": torch.empty(int(mb * 2**20) // 4)}) / 2**20

    assert auto(0.4) == 1 and auto(5.4) == 1 and auto(16) == 2 and auto(500) == 25  # MLP, gpt2-tiny, GPT-2 small
    assert bucket_bytes(0.25, {}) == 2**18  # a number is the size


def test_fp16_ring_trains_and_sends_half_the_bytes(tmp_path):
    args = ["algo=allreduce", "cluster.workers=2", "train.batch_size=32", "train.steps=30", *FAST]
    port = free_ports("127.0.0.1", 4)  # the two rings at once, each on its own ports
    plain, half = train_together((tmp_path / "none", [*args, f"cluster.port={port}"]),
                                 (tmp_path / "fp16", [*args, f"cluster.port={port + 2}", "algo.compression=fp16"]))
    assert half["final_loss"] < 0.8 * 2.3  # learning: digits start at ln(10) = 2.30
    assert abs(half["final_loss"] - plain["final_loss"]) < 0.01
    assert 0.45 < half["bytes_sent_per_step"] / plain["bytes_sent_per_step"] < 0.6


def test_zero1_ring_stops_on_a_lost_rank_naming_it(tmp_path):
    # ZeRO-1 is not elastic (a lost rank takes its optimizer shard along): the survivors stop, naming it.
    # delay_s caps the ring at ~20 steps/s: the kill lands long before the run's end
    with Cluster(tmp_path, "allreduce", "algo.zero=1", "train.steps=2000", "train.log_every=5", *FAST,
                 "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05},{delay_s: 0.05}]", workers=3,
                 port=free_ports("127.0.0.1", 3)) as c:
        for r in range(3):
            c.worker(r)
        c.wait_for_step(10)
        c.kill("worker1")
        for name in ("worker0", "worker2"):  # (a hang fails the wait)
            assert c.wait(name, timeout=60) == 2, c.output(name)[-3000:]
            assert "rank 1 lost: silent for more than cluster.liveness_s=3" in c.output(name)
    assert c.metrics()[-1]["step"] < 2000


def test_sigterm_stops_a_rank_still_waiting_for_its_ring(tmp_path):
    # Seen on CI: a launcher retried on another port and stopped its first attempt, but rank 1, forming a ring
    # with a rank 0 that had failed, ignored SIGTERM until cluster.connect_timeout_s and outlived the launcher.
    with Cluster(tmp_path, "allreduce", "train.steps=20", "cluster.heartbeat_s=0.2", "cluster.liveness_s=3",
                 "cluster.connect_timeout_s=600", workers=2, port=free_ports("127.0.0.1", 2)) as c:
        c.worker(1)  # rank 0 never comes
        deadline = time.monotonic() + 120
        while "allreduce rank 1/2 on" not in c.output("worker1"):  # it is forming the ring
            assert c.procs["worker1"].poll() is None and time.monotonic() < deadline, c.output("worker1")[-3000:]
            time.sleep(0.1)
        c.procs["worker1"].send_signal(signal.SIGTERM)
        assert c.wait("worker1", timeout=60) == 130, c.output("worker1")[-3000:]  # not after 600 s
        assert "Traceback" not in c.output("worker1")


def events(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("event") == "membership"]


MNIST_ARGS = ["train.batch_size=32", "train.steps=120", "train.log_every=5", "train.lr=0.05"]


@pytest.fixture(scope="module")
def local_mnist(tmp_path_factory):
    from tests.conftest import MNIST
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST subset not found in {MNIST} (set SMOLCLUSTER_SHARED_DATA)")
    run = tmp_path_factory.mktemp("local_mnist")
    data = ["data=mnist", f"data.root={MNIST}", "data.download=false"]
    return run, data, train(run, "algo=local", *data, *MNIST_ARGS[1:], "train.batch_size=96")


def test_a_sigkilled_worker_leaves_a_2_ring_that_finishes_like_local(tmp_path, local_mnist):
    """3 ranks on MNIST, rank 0 (the coordinator and the run files' writer) SIGKILLed mid-run: ranks 1 and 2 agree
    on epoch 1 from the last completed step, split the global batch of 96 between them (48 each) and finish, rank
    1 writing the files on. Every step trained on local's batch, so the result is local's (batch 96) up to
    summation order; the partial step the kill interrupted is trained once."""
    local_dir, data, local = local_mnist
    with Cluster(tmp_path, "allreduce", *data, *MNIST_ARGS, *FAST,
                 "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05},{delay_s: 0.05}]", workers=3,
                 port=free_ports("127.0.0.1", 3)) as c:
        for r in range(3):
            c.worker(r)
        c.wait_for_step(20)
        c.kill("worker0")
        for name in ("worker1", "worker2"):
            assert c.wait(name, timeout=120) == 0, c.output(name)[-3000:]
        # one survivor finds rank 0 silent; the other may hear first that the ring is being re-formed
        assert any("rank 0 lost: silent for more than cluster.liveness_s=3" in c.output(n) for n in ("worker1", "worker2"))
        s, rows = c.summary(), c.metrics()
    [ev] = events(rows)
    assert ev["left"] == [0] and ev["members"] == [1, 2] and ev["epoch"] == 1 and 20 <= ev["step"] < 120
    assert s["steps"] == 120 and s["ring"] == 2 and s["samples"] == 120 * 96
    assert s["membership"][-1]["left"] == [0]
    w = s["workers"]
    assert w["0"]["left_step"] == ev["step"] and w["0"]["steps"] == ev["step"]
    assert w["1"]["steps"] == w["2"]["steps"] == 120 and w["1"]["left_step"] is None
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 120  # each step logged once, in order
    assert s["eval_accuracy"] > 0.85 and abs(s["eval_accuracy"] - local["eval_accuracy"]) < 0.005
    assert max_abs_diff(tmp_path, local_dir) < 1e-4


def test_a_late_joiner_starts_from_the_rings_weights(tmp_path):
    """min_workers=2: ranks 0 and 1 start the ring; rank 2, let in after step 5, joins at a step boundary with
    the ring's weights and optimizer state (the same sha256 as the ring's at that step) and the run ends like local."""
    n = 100
    args = ["train.batch_size=32", f"train.steps={n}", "train.log_every=5", "train.optimizer=adamw", "train.lr=1e-3"]
    # delay_s caps ranks 0 and 1 at 10 steps/s; rank 2 is started with them but held (imported, not registered)
    # until step 5, so it joins within its set-up, mid-run
    with Cluster(tmp_path, "allreduce", *args, *FAST, "algo.min_workers=2",
                 "cluster.nodes=[{delay_s: 0.1},{delay_s: 0.1},{delay_s: 0}]", workers=3,
                 port=free_ports("127.0.0.1", 3)) as c:
        c.worker(0)
        c.worker(1)
        c.worker(2, held=True)
        c.wait_for_step(5)
        c.release("worker2")
        for name in ("worker0", "worker1", "worker2"):
            assert c.wait(name, timeout=180) == 0, c.output(name)[-3000:]
        s, rows = c.summary(), c.metrics()
        joiner = c.output("worker2")
    [ev] = events(rows)
    assert ev["joined"] == [2] and ev["members"] == [0, 1, 2] and 5 <= ev["step"] < n
    assert f"from step {ev['step']} (joined [2], left []); batch share 32; weights sha256 {ev['weights_sha']}" in joiner
    assert f"took the weights and optimizer state of step {ev['step']} from rank 0" in joiner
    assert s["ring"] == 3 and s["workers"]["2"]["joined_step"] == ev["step"]
    assert s["workers"]["2"]["steps"] == n - ev["step"] and s["workers"]["0"]["steps"] == n
    # before the join 2 ranks took 48 samples each of every step's 96, after it 3 took 32: local's batches
    local = train(tmp_path / "local", "algo=local", *args, "train.batch_size=96")
    assert max_abs_diff(tmp_path, tmp_path / "local") < 1e-4
    assert abs(s["final_loss"] - local["final_loss"]) < 1e-3


def test_bounded_staleness_lets_the_fast_rank_run_at_most_k_ahead(tmp_path):
    """max_staleness=2, rank 1 throttled: rank 0 computes its gradients on weights up to 2 updates old (it runs
    ahead), never more; the slow rank's are fresher; every rank applies the same reduced gradients, so it learns."""
    rows_args = ["algo=allreduce", "cluster.workers=2", "train.batch_size=32", "train.steps=40", "train.log_every=1",
                 "algo.max_staleness=2", "cluster.nodes=[{delay_s: 0},{delay_s: 0.05}]", *FAST]
    s = train(tmp_path, *rows_args)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if r.strip()]
    fast = [r["staleness/rank0"] for r in rows if "staleness/rank0" in r]
    slow = [r["staleness/rank1"] for r in rows if "staleness/rank1" in r]
    assert len(fast) == len(slow) == 40
    assert max(fast) == 2 and min(fast) >= 0 and max(slow) <= 2
    # measured: fast 1.9 (0, 1, then 2 from step 2 on), slow about 1 (it waits less long for what is on the ring)
    assert sum(fast) / 40 > 1.5 and sum(fast) / 40 > sum(slow) / 40 + 0.5, (fast, slow)
    w = s["workers"]
    assert w["0"]["staleness_max"] == 2 and w["0"]["staleness_mean"] == pytest.approx(sum(fast) / 40)
    assert set(w["0"]["staleness"]) <= {"0", "1", "2"} and sum(w["0"]["staleness"].values()) == 40
    assert s["max_staleness"] == 2 and s["final_loss"] < 0.8 * 2.3  # digits start at ln(10) = 2.30


def test_with_curve_a_stranger_without_the_key_gets_nothing_through(tmp_path, monkeypatch):
    # One thread in both runs: the launcher gives each of 2 co-located ranks 1, Cluster's processes would take
    # the machine's default, and on some CPUs (an AVX2 EPYC) the kernels round differently per thread count.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_keys(tmp_path / "keys")
    port = free_ports("127.0.0.1", 2)
    args = ["train.steps=60", *FAST, "cluster.nodes=[{delay_s: 0.02},{delay_s: 0.02}]"]
    clean = train(tmp_path / "clean", "algo=allreduce", "cluster.workers=2", *args)
    with Cluster(tmp_path / "curve", "allreduce", *args, f"cluster.keys={tmp_path / 'keys'}", port=port) as c:
        c.worker(0)
        c.worker(1)
        c.wait_for_step(10)
        raw = zmq.Context.instance().socket(zmq.DEALER)  # no CURVE keys at all
        raw.setsockopt(zmq.LINGER, 0)
        # The refused handshake drops the connection: a send then finds no peer and would block until one
        # comes (never); it gives up after a second instead, which is itself nothing getting through.
        raw.setsockopt(zmq.SNDTIMEO, 1000)
        raw.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(3):  # a heartbeat and a chunk claiming to be rank 1's (which would be a protocol error)
            try:
                raw.send_multipart(wire.encode("heartbeat", {"rank": 1}))
                raw.send_multipart(wire.encode("ring", {"rank": 1, "step": 0, "op": "rs", "bucket": 0, "hop": 0},
                                               {"x": torch.full((10,), 1e6)}))
            except zmq.Again:
                pass
        assert not raw.poll(1000)  # no answer: the handshake never completed
        raw.close()
        assert c.wait("worker0") == 0, c.output("worker0")[-3000:]
        assert c.wait("worker1") == 0, c.output("worker1")[-3000:]
        s = c.summary()
    assert s["rejected_messages"] == {}  # nothing even reached the decoder
    assert max_abs_diff(tmp_path / "curve", tmp_path / "clean") == 0.0
    assert s["final_loss"] == clean["final_loss"]


@pytest.mark.parametrize("override,message", [
    ("algo.zero=2", "algo.zero=2 is invalid"),
    ("algo.bucket_mb=0", "algo.bucket_mb=0 is invalid"),
    ("algo.compression=gzip", "codec 'gzip' is unknown"),
    ("algo.max_staleness=-1", "algo.max_staleness=-1 is invalid"),
    ("algo.min_workers=9", "algo.min_workers=9 is invalid"),
])
def test_bad_allreduce_settings_are_one_line_errors(override, message):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=allreduce", override]))
    with pytest.raises(ConfigError, match=message):
        check(cfg)


def test_stopped_and_resumed_ring_ends_like_local_and_reads_as_one_run(tmp_path):
    args = ["algo=allreduce", "cluster.workers=2", "train.batch_size=32", "train.steps=20", "train.log_every=5", *FAST]
    first = train(tmp_path / "run", *args, "train.stop_after=10")
    s = train(tmp_path / "run", *args, f"resume={tmp_path / 'run'}")
    train(tmp_path / "local", "algo=local", "train.batch_size=64", "train.steps=20")
    assert first["steps"] == 10 and s["steps"] == 20
    assert max_abs_diff(tmp_path / "run", tmp_path / "local") < 1e-5
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if r.strip()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(10, "resumed")]
    assert s["samples"] == 20 * 64 and all(r["samples"] == 64 * r["step"] for r in rows if "loss" in r)
    assert s["bytes_sent"] == pytest.approx(2 * first["bytes_sent"], rel=0.05)  # counted from step 0, not from 10


@pytest.mark.parametrize("old, new, goes_on", [
    ([0, 1, 2], [0, 1], True), ([0, 1, 2], [1, 2], True), ([0, 1, 2], [2], False),   # 3 -> 2 goes on, 1 stops
    ([0, 1], [0], True), ([0, 1], [1], False),                                       # a tie: the side with rank 0
    ([0, 1, 2, 3], [2, 3], False), ([0, 1, 2, 3], [0, 1], True),
    ([0, 1], [0, 1, 2], True), ([], [2], True),                                      # a joiner; the first ring
])
def test_only_the_side_of_a_cut_ring_holding_a_majority_goes_on(old, new, goes_on):
    from smolcluster.errors import PeerError

    if goes_on:
        check_quorum(new[0], old, new)
    else:
        with pytest.raises(PeerError, match="not a majority"):
            check_quorum(new[0], old, new)
