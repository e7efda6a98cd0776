"""algo=diloco: equivalence with allreduce/local (H=1) and with DiLoCo's Algorithm 1 written plainly here (also
Streaming DiLoCo's fragments and overlap), the codec's error feedback carried across rounds and resume."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smolcluster.algorithms.diloco import check
from smolcluster.errors import ConfigError
from smolcluster.launch.local import free_ports
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.trainer import Trainer
from tests.conftest import train, train_together
from tests.equivalence import max_abs_diff

FAST = ["cluster.heartbeat_s=0.2", "cluster.liveness_s=3", "cluster.connect_timeout_s=60"]
MODEL = ["model.hidden=[64]", "train.batch_size=16", "train.steps=12", "train.log_every=2"]
ADAMW = ["train.optimizer=adamw", "train.lr=3e-3", *MODEL]
STREAM = ["algo.inner_steps=4", "algo.fragments=2", "algo.overlap_steps=1", "algo.merge_alpha=0.5"]


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return train_config(compose("config", overrides=list(overrides)))


def reference(overrides: list[str]) -> dict[str, torch.Tensor]:
    """DiLoCo (Douillard et al. 2023, Algorithm 1) and Streaming DiLoCo's fragments, plainly, in one process:
    two replicas each take inner steps on their shard; at a fragment's sync step the pseudo-gradients
    (global - local, weighted by batch share) are averaged; ``overlap_steps`` later the outer Nesterov step
    (m = mu m + g; global -= lr (g + mu m)) updates the global fragment, merged into each replica. The first
    ``warmup_sync_steps`` steps average the gradients instead; the rounds count from there."""
    cfg = compose_cfg("algo=diloco", "cluster.workers=2", *overrides)
    a = cfg.algo
    reps = [Trainer(cfg, [cfg.train.batch_size] * 2) for _ in range(2)]
    flats = [next(iter(r.flat.params.values())) for r in reps]  # the MLP: one float32 flat buffer
    n, F, H = flats[0].numel(), a.fragments, a.inner_steps
    cuts = [p * (n // F) + min(p, n % F) for p in range(F + 1)]  # F contiguous pieces, the first ones longer
    glob = flats[0].detach().clone()
    mom = torch.zeros_like(glob)
    waiting = []  # (merge step, fragment, averaged pseudo-gradient)
    with torch.no_grad():
        for _ in range(reps[0].total_steps):
            for r, rep in enumerate(reps):
                with torch.enable_grad():
                    rep.compute_gradients(rep.step, r)
            if reps[0].step < a.warmup_sync_steps:  # warmup: every replica steps on the mean gradient
                mean = sum(next(iter(rep.flat.grads.values())) * 0.5 for rep in reps)
                for rep in reps:
                    next(iter(rep.flat.grads.values())).copy_(mean)
            for rep in reps:
                rep.apply_gradients()
            s = reps[0].step
            if s == a.warmup_sync_steps:
                glob.copy_(flats[0])
            for p in range(F):
                if s > a.warmup_sync_steps and (s - a.warmup_sync_steps) % H == (p + 1) * H // F % H:
                    lo, hi = cuts[p], cuts[p + 1]
                    d = [(glob[lo:hi] - f[lo:hi]) * 0.5 for f in flats]
                    waiting.append((s + a.overlap_steps, p, d[0] + d[1]))
            due = [w for w in waiting if w[0] <= s or s == reps[0].total_steps]
            for _, p, g in due:
                lo, hi = cuts[p], cuts[p + 1]
                mom[lo:hi] = a.outer_momentum * mom[lo:hi] + g
                step = g + a.outer_momentum * mom[lo:hi] if a.outer_momentum else g
                glob[lo:hi] -= a.outer_lr * step
                for f in flats:
                    f[lo:hi] = a.merge_alpha * f[lo:hi] + (1 - a.merge_alpha) * glob[lo:hi]
            waiting = [w for w in waiting if w not in due]
    return {name: p.detach().clone() for name, p in reps[0].model.named_parameters()}


def diff_to(run_dir, weights: dict[str, torch.Tensor]) -> float:
    got = load_file(run_dir / "checkpoint.safetensors")
    return max(float((got[k] - w).abs().max()) for k, w in weights.items())


def weights_diff(a_dir, b_dir) -> float:
    """Max |a - b| over the weights (not the inner optimizer's state: a rank's own, not the union's)."""
    a, b = load_file(a_dir / "checkpoint.safetensors"), load_file(b_dir / "checkpoint.safetensors")
    keys = [k for k in a if not k.startswith("optim/")]
    assert keys and keys == [k for k in b if not k.startswith("optim/")]
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


def test_h1_outer_sgd_lr1_equals_local_on_the_union_batch(tmp_path):
    """H=1, outer lr 1, no outer momentum: global - (global - mean of the locals) = the mean of one SGD step from
    the same weights, which (SGD with momentum, weight decay: all linear in the gradient) is the step on the
    mean gradient: allreduce's, and local's on the union of the batches."""
    args = [*MODEL, "train.optimizer=sgd", "train.weight_decay=0.01", "cluster.workers=2", *FAST]
    s = train(tmp_path / "diloco", "algo=diloco", "algo.inner_steps=1", "algo.outer_lr=1", "algo.outer_momentum=0",
              *args)
    train(tmp_path / "local", "algo=local", *[a for a in args if "batch_size" not in a and "cluster" not in a],
          "train.batch_size=32")
    assert s["steps"] == 12 and s["outer_steps"] == 12 and s["samples"] == 12 * 32
    # local on the union batch is what allreduce equals (test_allreduce), so this is allreduce's result too
    assert weights_diff(tmp_path / "diloco", tmp_path / "local") < 1e-6
    ring = 2 * 1 / 2 * s["params"] * 4  # one model-sized sync a step, as allreduce: 2(N-1)/N of the float32 weights
    assert ring * 12 < s["bytes_sent"] < ring * 12 * 1.05, (s["bytes_sent"], ring)


@pytest.mark.parametrize("extra", [[], STREAM], ids=["diloco", "streaming"])
def test_two_ranks_equal_the_papers_algorithm_written_plainly(tmp_path, extra):
    over = [*ADAMW, *extra] if extra else [*ADAMW, "algo.inner_steps=4", "algo.warmup_sync_steps=2"]
    s = train(tmp_path, "algo=diloco", "cluster.workers=2", *over, *FAST)
    want = reference(over)
    d = diff_to(tmp_path, want)
    assert d < 1e-6, d
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if r.strip()]
    outer = [(r["step"], r.get("fragment"), r.get("synced_at")) for r in rows if "outer_step" in r]
    if extra:  # fragment 0 syncs at 2, 6, 10 (merged a step later), fragment 1 at 4, 8 and 12 (merged at the end)
        assert outer == [(3, 0, 2), (5, 1, 4), (7, 0, 6), (9, 1, 8), (11, 0, 10), (12, 1, 12)], outer
    else:  # 2 warmup steps with the gradient summed, then rounds of 4 from step 2
        assert outer == [(6, 0, 6), (10, 0, 10)], outer
    # a sync sends 2(N-1)/N of the (fragment of the) model: 3 model-sized syncs in 12 steps (and 2 warmup
    # steps + 2 rounds), allreduce's 12
    model = 2 * 1 / 2 * s["params"] * 4
    assert model * 3 < s["bytes_sent"] < model * 4 * 1.1, (s["bytes_sent"], model)
    assert s["final_loss"] < rows[0]["loss"]  # it learns


def test_int4_error_feedback_is_carried_across_rounds_and_resume(tmp_path):
    """A stopped and resumed int4 run equals the uninterrupted one to the bit, with a fragment's sum still
    pending at the stop; resumed without its error-feedback residuals it does not (they matter, and are carried)."""
    args = ["algo=diloco", "cluster.workers=2", *ADAMW, *STREAM, "algo.codec=int4", "algo.overlap_steps=2", *FAST]
    port = free_ports("127.0.0.1", 8)  # two rings at a time (the independent runs at once), each on its own ports
    ports = [f"cluster.port={port + 2 * i}" for i in range(4)]
    whole, first = train_together((tmp_path / "whole", [*args, ports[0]]),  # fragment 0 synced at 6, merged at 8:
                                  (tmp_path / "run", [*args, ports[1], "train.stop_after=7"]))  # pending at 7
    state = load_file(tmp_path / "run" / "diloco-rank1.safetensors")
    ef = [v for k, v in state.items() if k.startswith("ef/")]
    assert ef and all(float(v.abs().max()) > 0 for v in ef)  # what int4 rounding left out, per bucket and hop
    assert "pending/0" in state and first["outer_steps"] == 2
    shutil.copytree(tmp_path / "run", tmp_path / "dropped")
    for r in range(2):  # the same run without the residuals: the next rounds send other values
        path = tmp_path / "dropped" / f"diloco-rank{r}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        kept = {k: v for k, v in load_file(path).items() if not k.startswith("ef/")}
        save_file(kept, str(path), metadata=meta)
    s, _ = train_together((tmp_path / "run", [*args, ports[2], f"resume={tmp_path / 'run'}"]),
                          (tmp_path / "dropped", [*args, ports[3], f"resume={tmp_path / 'dropped'}"]))
    assert s["steps"] == 12 and s["outer_steps"] == whole["outer_steps"] == 6
    assert max_abs_diff(tmp_path / "run", tmp_path / "whole") == 0.0
    assert s["bytes_sent"] == pytest.approx(whole["bytes_sent"], rel=0.02)  # counted from step 0
    assert max_abs_diff(tmp_path / "dropped", tmp_path / "whole") > 1e-6


def test_timed_rounds_let_the_fast_rank_step_more_and_weigh_each_by_its_samples(tmp_path):
    """algo.round_s: rank 1 is slower (cluster.nodes[r].delay_s), so within the same round time it takes fewer
    inner steps; the weights equal a plain replay of the logged rounds: each rank's steps (at the lr of the ring's
    samples so far), its pseudo-gradient weighted by its samples, the outer Nesterov step."""
    # the delays cap each rank's rate (rank 0 <= 40 steps a 0.2 s round, rank 1 <= 4), so the global budget of
    # 60 x 32 samples takes at least 3 rounds on any machine
    over = [*ADAMW, "train.steps=60", "algo.round_s=0.2", "train.eval_every=10"]
    s = train(tmp_path, "algo=diloco", "cluster.workers=2", *over, "cluster.nodes=[{delay_s: 0.005},{delay_s: 0.05}]",
              *FAST)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if r.strip()]
    rounds = [(r["round_steps/rank0"], r["round_steps/rank1"]) for r in rows if "outer_step" in r]
    assert len(rounds) == s["outer_steps"] >= 3
    fast, slow = (sum(n[i] for n in rounds[1:]) for i in (0, 1))  # rounds after the first: steps from the rate
    assert fast > slow, rounds
    assert s["samples"] == 16 * sum(a + b for a, b in rounds) >= 60 * 32  # ends once the global budget is met
    evals = [r for r in rows if "eval_loss" in r]  # each at a round's end (the outer step's weights), the last too
    assert len(evals) >= 2 and all("outer_step" in r for r in evals[:-1]) and evals[-1]["step"] == rows[-1]["step"]
    cfg = compose_cfg("algo=diloco", "cluster.workers=2", *over)
    a = cfg.algo
    reps = [Trainer(cfg, [16, 16]) for _ in range(2)]
    flats = [next(iter(r.flat.params.values())) for r in reps]
    glob, mom = flats[0].detach().clone(), torch.zeros_like(flats[0])
    before, per_step = 0, [32.0, 32.0]  # the ring's samples so far; its samples per inner step of each rank
    with torch.no_grad():
        for steps in rounds:
            for r, rep in enumerate(reps):
                for j in range(steps[r]):
                    with torch.enable_grad():
                        rep.compute_gradients(rep.step, r)
                    rep.lr_step = (before + j * per_step[r]) / 32  # the lr schedule follows the ring's samples
                    rep.apply_gradients()
            before += 16 * sum(steps)
            per_step = [16.0 * sum(steps) / n for n in steps]
            g = sum((glob - f) * (16 * n / (16 * sum(steps))) for f, n in zip(flats, steps))
            mom = a.outer_momentum * mom + g
            glob -= a.outer_lr * (g + a.outer_momentum * mom)
            for f in flats:
                f.copy_(glob)
    want = {name: p.detach().clone() for name, p in reps[0].model.named_parameters()}
    assert diff_to(tmp_path, want) < 1e-6, diff_to(tmp_path, want)


def test_timed_rounds_evaluate_warmup_steps_at_their_step_then_at_round_ends(tmp_path):
    """algo.round_s with algo.warmup_sync_steps: warmup's steps are allreduce's (every rank's weights the same), so
    its due evaluations come at their step; after warmup, at most one a round, at its end."""
    over = [*ADAMW, "train.steps=12", "algo.round_s=0.2", "algo.warmup_sync_steps=4", "train.eval_every=2"]
    train(tmp_path, "algo=diloco", "cluster.workers=2", *over, "cluster.nodes=[{delay_s: 0.005},{delay_s: 0.05}]",
          *FAST)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if r.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals if r["step"] <= 4] == [2, 4], evals  # none dropped during warmup
    after = [r for r in evals if r["step"] > 4]
    assert after and all("outer_step" in r for r in after[:-1]) and after[-1]["step"] == rows[-1]["step"]


@pytest.mark.parametrize("override,message", [
    ("algo.inner_steps=0", "algo.inner_steps=0 is invalid"),
    ("algo.fragments=8", "exceeds algo.inner_steps"),
    ("algo.overlap_steps=50", "must be below algo.inner_steps"),
    ("algo.outer_momentum=1.5", "algo.outer_momentum=1.5 is invalid"),
    ("algo.codec=int3", "codec 'int3' is unknown"),
    ("algo.round_s=0", "algo.round_s=0 is invalid"),
    ("algo.bucket_mb=0", "algo.bucket_mb=0 is invalid"),
    ("algo.min_workers=9", "algo.min_workers=9 is invalid"),
    ("algo.fragments=2 algo.min_workers=1", "needs an elastic ring"),
])
def test_bad_diloco_settings_are_one_line_errors(override, message):
    cfg = compose_cfg("algo=diloco", "algo.inner_steps=4" if "inner" not in override else override, *override.split())
    with pytest.raises(ConfigError, match=message):
        check(cfg)


def test_the_desk_puts_each_nodes_processes_in_its_cpu_budget_and_namespace():
    """bench/desk.py: a command started through Desk.exec runs in its host's cgroup (with the quota asked for)
    and network namespace (its own address), and the groups are gone after close."""
    from smolcluster.bench.desk import Desk, cgroup_unavailable
    from smolcluster.testing.netns import netns_unavailable

    reason = netns_unavailable(shaping=True) or cgroup_unavailable()
    if reason:
        pytest.skip(reason)
    desk = Desk(["a", "b"], rate="20mbit", cpus={"a": 0.45, "b": 0.9}).build()
    try:
        for host, cores in (("a", 0.45), ("b", 0.9)):
            out = subprocess.run([*desk.exec(host), "sh", "-c", "cat /proc/self/cgroup; ip -4 -o addr show eth0"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            cpu_line = next(line for line in out.splitlines() if ":cpu," in line or ":cpu:" in line)
            assert cpu_line.endswith("/" + desk.groups[host].name), cpu_line
            assert desk.ip[host] in out and desk.quota(host) == cores
    finally:
        desk.close()
    assert not any(g.exists() for g in desk.groups.values())


def test_the_launchers_start_diloco_as_a_ring_of_workers():
    from launchers.slurm import lead_task, roles
    from launchers.ssh import compose_config

    cfg, _ = compose_config("local", ["algo=diloco", "cluster.workers=3"])  # refused before for an unknown algo
    assert roles(cfg) == [("worker", 0), ("worker", 1), ("worker", 2)] and lead_task(cfg) == 0


def test_fine_tuning_a_pretrained_directory_at_h1_equals_local(tmp_path):
    """``model.pretrained=``: both ranks start from the Hugging Face directory's weights, and at H=1, outer lr 1,
    no momentum and SGD inner (the equivalence above) the fine-tuned weights are local's on the union batch."""
    from tests.test_hf_training import FAST as HF_FAST
    from tests.test_hf_training import SMALL, hf_logits, pretrained_dir

    src = pretrained_dir(tmp_path / "llama", "llama")
    common = ["model=llama-tiny", f"model.pretrained={src}", *SMALL, "train.steps=6"]
    s = train(tmp_path / "diloco", "algo=diloco", "cluster.workers=2", "train.batch_size=4", "algo.inner_steps=1",
              "algo.outer_lr=1", "algo.outer_momentum=0", *common, *HF_FAST)
    train(tmp_path / "local", "algo=local", "train.batch_size=8", *common)
    assert s["steps"] == 6 and s["outer_steps"] == 6
    d = weights_diff(tmp_path / "diloco", tmp_path / "local")  # (the SGD momentum is each rank's own)
    assert d < 1e-5, d
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(tmp_path / "diloco" / "hf", x) - hf_logits(src, x)).abs().max() > 1e-4  # fine-tuned


def test_metrics_and_the_loss_plot_mark_every_outer_step(tmp_path):
    """Each outer step is a row of metrics.jsonl (its fragment, the step it synced at, the round's figures at a
    round's end), and the loss plot draws a tick at each of those steps."""
    from matplotlib.collections import LineCollection

    from smolcluster.telemetry.run_files import loss_figure, read_metrics

    s = train(tmp_path, "algo=diloco", "cluster.workers=2", *ADAMW, "train.steps=9", "train.log_every=2",
              "algo.inner_steps=3", *FAST)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    outer = [r for r in rows if "outer_step" in r]
    assert [(r["step"], r["outer_step"], r["rounds"], r["round_inner_steps"]) for r in outer] == [
        (3, 1, 1, 3), (6, 2, 2, 3), (9, 3, 3, 3)] and s["rounds"] == 3
    assert (tmp_path / "loss.png").stat().st_size > 0
    ax = loss_figure(rows).axes[0]
    ticks = [c for c in ax.collections if isinstance(c, LineCollection) and c.get_label() == "outer step"]
    assert len(ticks) == 1 and sorted(seg[0][0] for seg in ticks[0].get_segments()) == [3, 6, 9]


def test_a_late_joiner_takes_the_outer_momentum_and_a_lost_rank_leaves_the_run_going(tmp_path):
    """3 slots, algo.min_workers=2: ranks 0 and 1 start the ring; rank 2, started after the first round, joins
    between rounds with rank 0's weights and outer state; then rank 1 is killed mid-round and 0 and 2 finish. The
    round it broke is synced again by the two (no outer step lost or doubled), and at the end the joiner's outer
    weights and Nesterov momentum are rank 0's, bit for bit (a fresh momentum would differ in every later step)."""
    from smolcluster.launch.local import free_ports
    from smolcluster.telemetry.run_files import read_metrics
    from tests.cluster_util import Cluster
    from tests.conftest import wait_until

    # rank 1 sets the ring's pace (0.2 s a step) while it is in it: time for rank 2, a new process, to join
    # before the end; without it the run goes at rank 0's 0.05 s
    args = [*ADAMW, "train.steps=200", "train.log_every=4", "algo.inner_steps=4", "algo.min_workers=2", *FAST,
            "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.2},{delay_s: 0}]"]
    with Cluster(tmp_path, "diloco", *args, workers=3, port=free_ports("127.0.0.1", 3)) as c:
        def outer_rows(after: int = 0) -> list:
            return [r for r in c.metrics() if "outer_step" in r and r["step"] > after]

        c.worker(0)
        c.worker(1)
        assert wait_until(lambda: outer_rows(), 120), c.output("worker0")[-3000:]
        c.worker(2)
        took = "took the weights, inner optimizer and outer state (momentum included) of step "
        assert wait_until(lambda: took in c.output("worker2"), 120), c.output("worker2")[-3000:]
        joined = int(c.output("worker2").split(took)[1].split()[0])
        assert wait_until(lambda: outer_rows(joined), 60), c.output("worker0")[-3000:]  # a round of three
        c.kill("worker1")
        for name in ("worker0", "worker2"):
            assert c.wait(name, timeout=180) == 0, c.output(name)[-3000:]
        s = c.summary()
    events = [(e["step"], e["members"], e["joined"], e["left"]) for e in s["membership"][1:]]
    assert len(events) == 2 and events[0] == (joined, [0, 1, 2], [2], []), events
    left_at = events[1][0]
    assert events[1][1:] == ([0, 2], [], [1]) and joined < left_at < 200 and left_at % 4 == 0, events
    assert s["steps"] == 200 and s["outer_steps"] == s["rounds"] == 50 and s["ring"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "outer_step" in r] == list(range(4, 201, 4))
    lead, joiner = (load_file(tmp_path / f"diloco-rank{r}.safetensors") for r in (0, 2))
    for key in ("momentum/0", "outer/0", *(k for k in lead if k.startswith("param/"))):
        assert torch.equal(lead[key], joiner[key]), key
    assert float(lead["momentum/0"].abs().max()) > 0 and s["final_loss"] < 2.0


@pytest.mark.parametrize("override,message", [
    ("algo.min_workers=3", "algo.min_workers=3 is invalid"),
    ("algo.fragments=2", "algo.min_workers below cluster.workers needs an elastic ring"),
])
def test_joining_later_needs_an_elastic_ring(override, message):
    cfg = compose_cfg("algo=diloco", "cluster.workers=2", "algo.inner_steps=4", "algo.min_workers=1", override)
    with pytest.raises(ConfigError, match=message):
        check(cfg)
