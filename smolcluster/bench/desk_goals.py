"""``python -m smolcluster.bench desk``: issue 23's goals for ``algo=diloco``, measured as ratios in one run on an
emulated desk (:class:`smolcluster.bench.desk.Desk`: each node a network namespace behind a tbf-shaped link, in a
cgroup v1 ``cpu`` group with a quota of ``--cpu`` cores).

For each model and link:

1. ``local``: one node trains ``--steps`` steps, evaluating every ``--eval-every``. Its final eval loss is the
   **target**, its training time T the unit of every time ratio.
2. ``--workers`` nodes of the same budget each run ``--algos`` for ``--schedule`` x ``--steps`` steps (their lr
   schedule's length; by default as many, so N times the samples): ``diloco`` (H = ``--inner-steps``, ``--codec``,
   ``--outer-lr``, ``--outer-momentum``), ``streaming`` (the same with F=4 fragments, tau=1,
   alpha=0.5), ``allreduce``, DDP-gloo and ``torchft`` (the peer: torchft's DiLoCo with diloco's H and outer
   optimizer, :mod:`smolcluster.bench.torchft_peer`). A run still going at ``--budget`` x T is stopped there.
3. On the link ``--unlike-link`` only: the nodes at ``--speeds`` x ``--cpu`` cores (unlike machines), diloco
   with fixed H (``fixed_H``) against rounds by time (``round_s``: ``--round-s``, by default H x local's seconds
   per step, so a speed-1 node takes about H steps a round and a speed-4 node about 4H).

The goals, each printed "met" or "not met" (or why it could not be measured):

- time to target: diloco's time to first reach the target over T (<= 0.4); allreduce's and DDP's beside it;
- bytes: rank 0's bytes sent per training sample, diloco over allreduce (<= 1/100: needs H >= 100 uncompressed);
- quality: diloco's eval loss over allreduce's at equal total samples, the last step both evaluated (<= 1.03);
- unlike machines: fixed_H's time to target over round_s's (>= 1.5; if one never reaches the target, the
  worst loss both reach is the target of this ratio, and the row says so);
- streaming: its peak link use over diloco's (<= 0.3), its final eval loss over diloco's (<= 1.01);
- the peer: diloco's samples/s over torchft's (>= 0.95: equal within a shared box's noise, or better) and its eval
  loss at equal samples over torchft's (<= 1.01), or the one line saying why torchft could not run.

A loss ratio's goal is a ceiling: a lower loss than the reference meets it.

How it is measured. Time is a run's training clock (metrics rows' ``time``, from the ring formed), evaluations
included: every run evaluates on rank 0 alone, every E (``--eval-every``) of rank 0's steps. An eval between
outer steps sees rank 0's own weights (E a multiple of H: right after an outer step). ``round_s`` is the exception:
a due eval waits for its round's end (the outer step's weights), at most one a round, so it evaluates less often
than fixed_H (8 evals against 20 in docs/benchmarks.md's run) and its time to target is read at round ends: later
than it was reached, so the unlike-machines ratio is conservative for round_s. Bytes are rank 0's ``bytes_sent``
(application bytes on its ring links; DDP: its namespace's eth0 TX counter). Peak link use is the most bytes
rank 0 sent within any ``--window-s`` seconds, over that window, from its per-step rows. The default window is
plain diloco's mean round time / 8, half the spacing of streaming's 4 fragment syncs (a window as long as the
spacing holds two syncs whenever jitter brings them closer). An unpaced ring sends at line rate, so where one
sync takes longer than the window (a big model, a slow link) the peak reads the link's rate for both.

Writes bench-desk.json and diloco.png (eval loss against time and against bytes sent, a line per run) to
``--out``. Needs root, iproute2, tc and cgroup v1 for the desk; without namespaces every node runs on loopback,
unshaped and unbudgeted (the smoke test's fallback), and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from smolcluster.bench.desk import PERIOD_US, Desk, cgroup_unavailable
from smolcluster.bench.lora import Loopback
from smolcluster.bench.report import markdown_table, write_report
from smolcluster.bench.scaling import MODELS, PORT, overrides_of, run_ddp, run_smolcluster
from smolcluster.bench.torchft_peer import run_torchft, unavailable
from smolcluster.cluster import free_port
from smolcluster.testing.netns import netns_unavailable, parse_rate

STEPS = {"mlp": 600, "gpt2-tiny": 600, "llama-tiny": 400}
OUTER = ["algo.codec={codec}", "algo.outer_lr={olr}", "algo.outer_momentum={om}"]
RUNS = {  # bench run -> (scaling.ALGOS name, extra overrides): `local` is allreduce on one node (algo=local)
    "local": ("allreduce", []), "allreduce": ("allreduce", []), "ddp": ("ddp", []),
    "diloco": ("diloco", ["algo.inner_steps={h}", *OUTER]),
    "streaming": ("streaming", ["algo.inner_steps={h}", *OUTER]),
    "fixed_H": ("diloco", ["algo.inner_steps={h}", *OUTER]),
    "round_s": ("timed", ["algo.round_s={t}", *OUTER]),
    "torchft": ("torchft", []),  # the peer: torchft's DiLoCo, with --inner-steps and the outer optimizer's settings
}
ALGOS = ("diloco", "streaming", "allreduce", "ddp", "torchft")
GOALS = {"time_to_target": "<= 0.4", "bytes_per_sample": "<= 0.01", "quality": "<= 1.03",
         "unlike_machines": ">= 1.5", "streaming_peak": "<= 0.3", "streaming_quality": "<= 1.01",
         "peer_speed": ">= 0.95", "peer_quality": "<= 1.01"}


def curve(rows: list[dict]) -> list[dict]:
    """The eval points of a run's rows: step, time, samples and bytes sent (the last known) at each eval loss."""
    points, sent, samples = [], 0, 0
    for r in rows:
        sent, samples = r.get("bytes_sent", sent), r.get("samples", samples)
        if "eval_loss" in r:
            points.append({"step": r["step"], "time": r["time"], "samples": samples, "bytes_sent": sent,
                           "eval_loss": r["eval_loss"]})
    return points


def time_to(points: list[dict], target: float, within: float | None = None) -> float | None:
    """The time of the first eval at or below ``target`` (within ``within`` seconds); None if none."""
    return next((p["time"] for p in points if p["eval_loss"] <= target and (within is None or p["time"] <= within)),
                None)


def peak_rate(rows: list[dict], window: float) -> float:
    """The most bytes sent within any ``window`` seconds (from rows' time and cumulative bytes_sent), per second."""
    pts = [(r["time"], r["bytes_sent"]) for r in rows if "bytes_sent" in r and "time" in r]
    best, j = 0, 0
    for t, sent in pts:
        while pts[j][0] <= t - window:  # the window is (t - window, t]
            j += 1
        before = pts[j - 1][1] if j else 0  # the count just before the window opened
        best = max(best, sent - before)
    return best / window


def run_one(hosts, name: str, n: int, args, model: str, run_dir: Path, stop_after_s: float | None,
            round_s: float = 0.0) -> dict:
    """One run of bench run ``name`` on ``n`` of ``hosts``' nodes: its eval curve, rows and final figures."""
    algo, extra = RUNS[name]
    steps = args.steps or STEPS[model]
    if n > 1:  # the multi-node runs' schedule: train.steps (the lr decays to its floor by the run's end)
        steps = max(1, round(steps * args.schedule))
    model_args = overrides_of(model, args)
    t0 = time.monotonic()
    if algo == "ddp":
        got = run_ddp(hosts, n, model_args, steps, 2, run_dir, args.eval_every, args.eval_samples, stop_after_s,
                      timeout=args.timeout, trainer_optimizer=True)
    elif algo == "torchft":
        got = run_peer(hosts, n, args, model_args, steps, run_dir, stop_after_s)
    else:
        batch = int(next(o.split("=")[1] for o in model_args if o.startswith("train.batch_size=")))
        extra = [e.format(h=args.inner_steps, t=round_s, codec=args.codec, olr=args.outer_lr, om=args.outer_momentum)
                 for e in extra]
        extra += [f"train.eval_every={args.eval_every}", f"train.eval_samples={args.eval_samples}",
                  "train.log_every=1"]
        got = run_smolcluster(hosts, algo, n, model_args, steps, 2, batch, run_dir, tuple(extra),
                              port=PORT if isinstance(hosts, Desk) else free_port(), timeout=args.timeout,
                              stop_after_s=stop_after_s)
    rows = got["rows"]
    points = curve(rows)
    last = rows[-1] if rows else {}
    samples = max((r.get("samples", 0) for r in rows), default=0)
    sent = max((r.get("bytes_sent", 0) for r in rows), default=0)
    out = {"run": name, "nodes": n, "stopped": bool(got.get("stopped")), "steps": last.get("step", 0),
           "time": points[-1]["time"] if points else None, "samples": samples, "bytes_sent": sent,
           "bytes_per_sample": sent / samples if samples else None,
           "eval_loss": points[-1]["eval_loss"] if points else None, "curve": points,
           "params": got.get("params") or next((r["params"] for r in rows if "params" in r), None),
           "run_s": round(time.monotonic() - t0, 1), **({"why": got["why"]} if "why" in got else {})}
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
    return {**out, "rows": rows}


def run_peer(hosts, n: int, args, model_args: list[str], steps: int, run_dir: Path,
             stop_after_s: float | None) -> dict:
    """torchft's DiLoCo with diloco's H and outer optimizer; where it cannot run, no rows and ``why`` (one line):
    the peer failing is a finding of the bench, not its failure."""
    why = unavailable()
    if why is None:
        try:
            return run_torchft(hosts, n, model_args, steps, run_dir, inner_steps=args.inner_steps,
                               outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, eval_every=args.eval_every,
                               eval_samples=args.eval_samples, stop_after_s=stop_after_s, timeout=args.timeout)
        except RuntimeError as e:
            why = f"torchft {one_line(str(e))}"
    print(f"torchft did not run: {why}", flush=True)
    return {"stopped": False, "rows": [], "why": why}


def one_line(failure: str) -> str:
    """wait_all's "HOST exited N:\nLOG TAIL" as one line: the host, and the tail's last exception line (else its
    last line)."""
    head, *tail = failure.strip().splitlines() or [""]
    error = [x for x in tail if re.match(r"[\w.]*(Error|Exception)\b", x)] or [x for x in tail if x.strip()]
    return f"{head.rstrip(':')}: {error[-1] if error else ''}"[:300]


def hosts_for(args, link: str, speeds: list[float] | None):
    """A Desk of ``--workers`` nodes (CPU budgets at ``--cpu`` x speeds) on ``link``, or Loopback where
    namespaces are not available."""
    if args.unshaped:
        return Loopback()
    names = [f"w{r}" for r in range(args.workers)]
    speeds = speeds or [1.0]
    cpus = {h: args.cpu * speeds[r % len(speeds)] for r, h in enumerate(names)} if args.cpu else {}
    return Desk(["srv", *names], rate=link, cpus=cpus).build()


def measure(args, base: Path, model: str, link: str) -> dict:
    """Every run of one model on one link: name -> run (see run_one)."""
    runs: dict[str, dict] = {}
    hosts = hosts_for(args, link, None)
    try:
        runs["local"] = run_one(hosts, "local", 1, args, model, base / f"{model}-{link}-local", None)
        if runs["local"]["time"] is None:
            raise RuntimeError(f"local run of {model} wrote no eval loss: is --eval-every a divisor of --steps?")
        budget = args.budget * runs["local"]["time"]
        for name in args.algos:
            runs[name] = run_one(hosts, name, args.workers, args, model, base / f"{model}-{link}-{name}",
                                 budget + args.startup_s)
    finally:
        hosts.close()
    if link == args.unlike_link:
        local = runs["local"]
        round_s = args.round_s or args.inner_steps * local["time"] / max(1, local["steps"])
        if args.cpu and not args.unshaped and round_s < 5 * PERIOD_US / 1e6:
            # a quota is granted per CFS period: a round of a few periods sees a node's budget arrive in bursts, and
            # the rate it measures (its next round's steps) is noise
            print(f"warning: round_s {round_s:.3g} s is under 5 CFS periods ({PERIOD_US / 1e3:g} ms each): the "
                  "nodes' rates are noise; raise --inner-steps or --round-s", flush=True)
        hosts = hosts_for(args, link, args.speeds)
        try:
            for name in ("fixed_H", "round_s"):
                runs[name] = run_one(hosts, name, args.workers, args, model, base / f"{model}-{link}-{name}",
                                     budget + args.startup_s, round_s)
                runs[name]["round_s"] = round_s if name == "round_s" else None
        finally:
            hosts.close()
    return runs


def sig(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def verdict(goal: str, value: float | None, why: str = "") -> str:
    if value is None:
        return f"not measured ({why})" if why else "not measured"
    op, bound = GOALS[goal].split()
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return "met" if ok else "not met"


def at_equal_samples(a: dict, b: dict) -> tuple[float, float, int] | None:
    """a's and b's eval losses at the last step both evaluated (same nodes and batch: same samples)."""
    steps = {p["step"]: p["eval_loss"] for p in b["curve"]}
    common = [p for p in a["curve"] if p["step"] in steps and p["step"] > 0]
    if not common:
        return None
    p = common[-1]
    return p["eval_loss"], steps[p["step"]], p["step"]


def goals(runs: dict, args, model: str, link: str) -> list[dict]:
    """A row per measured figure: its value, the goal (if it has one) and met / not met."""
    local = runs["local"]
    target, unit, within = local["eval_loss"], local["time"], args.budget * local["time"]
    out = []

    def row(goal: str, measure: str, value: float | None, why: str = "", note: str = "") -> None:
        out.append({"model": model, "link": link, "measure": measure,
                    "value": sig(value), "goal": GOALS.get(goal, ""),
                    "status": verdict(goal, value, why) if goal in GOALS else why if value is None else "reported",
                    "note": note})

    for name in ALGOS:
        if name in runs and "why" not in runs[name]:
            t = time_to(runs[name]["curve"], target, within)
            row("time_to_target" if name == "diloco" else "", f"{name} time to target / local's", t and t / unit,
                f"not reached within {args.budget:g}x local's time", f"target eval loss {target:.4f} in {unit:.3g} s")
    d, a = runs.get("diloco"), runs.get("allreduce")
    if d and a:
        ratio = d["bytes_per_sample"] / a["bytes_per_sample"] if a["bytes_per_sample"] and d["bytes_per_sample"] \
            else None
        row("bytes_per_sample", "bytes per sample, diloco / allreduce", ratio, "no bytes",
            f"H={args.inner_steps}, codec {args.codec}")
        both = at_equal_samples(d, a)
        row("quality", "eval loss at equal samples, diloco / allreduce", both and both[0] / both[1],
            "no common eval step", both and f"step {both[2]}: {both[0]:.4f} vs {both[1]:.4f}")
    s = runs.get("streaming")
    if d and s and d["time"]:  # (no time: diloco wrote no row)
        window = args.window_s or args.inner_steps * d["time"] / max(1, d["steps"]) / 8
        peak_d, peak_s = peak_rate(d["rows"], window), peak_rate(s["rows"], window)
        row("streaming_peak", "peak link use, streaming / diloco", peak_s / peak_d if peak_d else None, "no bytes",
            f"window {window:.3g} s: {peak_s / 1e6:.3g} vs {peak_d / 1e6:.3g} MB/s")
        both = at_equal_samples(s, d)
        row("streaming_quality", "eval loss, streaming / diloco", both and both[0] / both[1], "no common eval step",
            both and f"step {both[2]}: {both[0]:.4f} vs {both[1]:.4f}")
    if d and "torchft" in runs:
        out += peer_rows(d, runs["torchft"], model, link, args)
    if "fixed_H" in runs:
        out.append(unlike_row(runs, target, within, model, link, args))
    return out


def peer_rows(d: dict, t: dict, model: str, link: str, args) -> list[dict]:
    """diloco against torchft's DiLoCo: samples/s to each one's last eval, eval loss at equal samples; where
    torchft could not run, both rows say why."""
    def rate(run: dict) -> float | None:
        last = run["curve"][-1] if run["curve"] else None
        return last["samples"] / last["time"] if last and last["time"] else None

    rd, rt = rate(d), rate(t)
    both = at_equal_samples(d, t)
    why = t.get("why") or "no eval"
    note = f"H={args.inner_steps}" + (f"; torchft uncompressed (its quantization needs CUDA), diloco {args.codec}"
                                      if args.codec != "none" else "")
    rows = [("peer_speed", "the peer: samples/s, diloco / torchft", rd / rt if rd and rt else None,
             rd and rt and f"{rd:.4g} vs {rt:.4g} samples/s; {note}"),
            ("peer_quality", "the peer: eval loss at equal samples, diloco / torchft", both and both[0] / both[1],
             both and f"step {both[2]}: {both[0]:.4f} vs {both[1]:.4f}")]
    return [{"model": model, "link": link, "measure": m, "value": sig(v), "goal": GOALS[g],
             "status": verdict(g, v, why), "note": n or (why if "why" in t else note)} for g, m, v, n in rows]


def unlike_row(runs: dict, target: float, within: float, model: str, link: str, args) -> dict:
    """fixed_H's time to target over round_s's; where one never reaches local's target, the worst eval loss
    both reach is this ratio's target."""
    f, r = runs["fixed_H"]["curve"], runs["round_s"]["curve"]
    note = f"speeds {','.join(f'{x:g}' for x in args.speeds)}, round_s {runs['round_s']['round_s']:.3g} s"
    tf, tr = time_to(f, target, within), time_to(r, target, within)
    if (tf is None or tr is None) and f and r:
        target = max(min(p["eval_loss"] for p in f), min(p["eval_loss"] for p in r))
        tf, tr = time_to(f, target), time_to(r, target)
        note += f"; local's target not reached by both: the loss both reach, {target:.4f}"
    value = tf / tr if tf and tr else None
    return {"model": model, "link": link, "measure": "unlike machines, fixed_H time to target / round_s's",
            "value": sig(value), "goal": GOALS["unlike_machines"],
            "status": verdict("unlike_machines", value, "no eval"), "note": note}


def plot(results: dict, path: Path) -> Path | None:
    """Eval loss against training time and against rank 0's bytes sent: a panel pair per (model, link)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for i, (key, runs) in enumerate(results.items()):
        for j, (x, label) in enumerate((("time", "training time, s"), ("bytes_sent", "MB sent by rank 0"))):
            ax = axes[i][j]
            for k, (name, run) in enumerate(runs.items()):
                pts = [(p[x] / (1e6 if j else 1), p["eval_loss"]) for p in run["curve"]]
                if pts and not (j and name == "local"):  # (one node sends nothing)
                    ax.plot(*zip(*pts), marker=".", label=name, color=f"C{k}")
            ax.axhline(runs["local"]["eval_loss"], color="grey", ls=":", lw=1)  # the target
            ax.set_title(key)
            ax.set_xlabel(label)
            ax.set_ylabel("eval loss")
            if j:
                ax.set_xscale("symlog", linthresh=0.1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench desk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2-tiny", help=f"comma-separated, any of {', '.join(MODELS)}")
    p.add_argument("--links", default="100mbit,20mbit", help="tbf rates of every node's link, e.g. 100mbit,20mbit")
    p.add_argument("--algos", default=",".join(ALGOS),
                   help=f"the N-node runs beside local: any of {', '.join(ALGOS)} (torchft: the peer, torchft's DiLoCo)")
    p.add_argument("--workers", type=int, default=4, help="N, the nodes of each multi-node run")
    p.add_argument("--cpu", type=float, default=0.45, help="cores per node (cgroup cfs quota); 0: no budgets")
    p.add_argument("--speeds", default="1,1,2,4", help="unlike machines: node r gets speeds[r mod len] x --cpu")
    p.add_argument("--unlike-link", default="100mbit", help="the link (one of --links) of the fixed_H / round_s runs ('' skips them)")
    p.add_argument("--steps", type=int, default=0, help="steps of every run (default: " +
                   ", ".join(f"{k} {v}" for k, v in STEPS.items()) + ")")
    p.add_argument("--eval-every", type=int, default=25, help="rank 0's steps between evals (a multiple of H sees the "
                   "outer step's weights; round_s: at the end of the round a due eval falls in, at most one a round); "
                   "must divide --steps")
    p.add_argument("--eval-samples", type=int, default=256, help="test samples (LMs: blocks) of each eval")
    p.add_argument("--inner-steps", type=int, default=100, help="H, diloco's inner steps per round")
    p.add_argument("--outer-lr", type=float, default=0.7, help="diloco's algo.outer_lr")
    p.add_argument("--outer-momentum", type=float, default=0.9, help="diloco's algo.outer_momentum (Nesterov)")
    p.add_argument("--schedule", type=float, default=1.0,
                   help="the multi-node runs' steps (their lr schedule's length) as a fraction of --steps")
    p.add_argument("--codec", default="none", help="diloco's outer-gradient codec: none, fp16, bf16, int8, int4")
    p.add_argument("--round-s", type=float, default=0.0,
                   help="round_s's rounds in seconds (default 0: H x local's measured seconds per step)")
    p.add_argument("--budget", type=float, default=2.5,
                   help="a multi-node run is stopped at this many times local's training time")
    p.add_argument("--startup-s", type=float, default=60.0,
                   help="time allowed on top of the budget for a run's processes to start and form the ring")
    p.add_argument("--window-s", type=float, default=0.0,
                   help="peak link use window (default 0: diloco's mean round time / 8)")
    p.add_argument("--timeout", type=float, default=7200.0, help="a run that takes longer fails the bench")
    shared = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", "../shared/data"))
    p.add_argument("--root", default=str(shared / "mnist"), help="MNIST IDX directory (model mlp)")
    p.add_argument("--text", default=str(shared / "tinyshakespeare" / "input.txt"), help="text of the LMs")
    p.add_argument("--out", default=".", help="directory of bench-desk.json and diloco.png")
    p.add_argument("--keep", default=None, help="keep every run's directory under this path")
    args = p.parse_args(argv)
    args.root, args.text = str(Path(args.root).resolve()), str(Path(args.text).resolve())  # the runs' cwd differs
    args.models, args.links, args.algos = args.models.split(","), args.links.split(","), args.algos.split(",")
    args.speeds = [float(x) for x in args.speeds.split(",")]
    for what, got, known in (("model", args.models, MODELS), ("algo", args.algos, ALGOS)):
        bad = [x for x in got if x not in known]
        if bad:
            p.error(f"unknown {what} {bad}: choose from {', '.join(known)}")
    for link in args.links:
        try:
            parse_rate(link)
        except ValueError as e:
            p.error(str(e))
    if args.workers < 2 or args.inner_steps < 1 or args.eval_every < 1:
        p.error("--workers must be at least 2, --inner-steps and --eval-every at least 1")
    args.unshaped = netns_unavailable(shaping=True) or (args.cpu and cgroup_unavailable())
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the runs and removes the desk
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="desk-") as tmp:  # the runs' directories, unless --keep
        base = Path(args.keep or tmp)
        for model in args.models:
            for link in args.links:
                runs = measure(args, base, model, link)
                results[f"{model}, {link}"] = runs
                rows += goals(runs, args, model, link)
    print("\n## runs\n")
    print(markdown_table([{"model, link": k, **{c: r[c] for c in ("run", "nodes", "steps", "time", "eval_loss",
                                                                    "bytes_per_sample", "stopped", "run_s")}}
                          for k, runs in results.items() for r in runs.values()]))
    png = plot(results, out / "diloco.png")
    runs = {k: {name: {c: v for c, v in r.items() if c != "rows"} for name, r in rs.items()}
            for k, rs in results.items()}
    write_report("desk", rows, {
        "runs": runs, "plot": str(png), "links": "unshaped loopback" if args.unshaped else "tbf shaped",
        "unshaped_because": args.unshaped or None, "cpu_per_node": args.cpu, "workers": args.workers,
        "inner_steps": args.inner_steps, "codec": args.codec, "eval_every": args.eval_every,
        "cores": os.cpu_count(), "wall_s": round(time.monotonic() - started, 1)}, out)
    return 0
