"""``python -m smolcluster.bench diloco-sim``: K DiLoCo workers simulated in one process, to pick a recipe.

Issue 23's time-to-target goal asks K nodes running ``algo=diloco`` to reach the eval loss one ``local`` node
reaches after N steps in <= 0.4x that node's time. With H >= 25 on a 100 Mbit/s link the sync is a small part
of a round, so whether a recipe can meet it is a question of samples, which one process answers without a desk:

1. ``local``: one model trains N = ``--steps`` steps at the bench's settings (``bench.scaling.MODELS``, batch 8,
   AdamW, cosine schedule over N), evaluating every ``--eval-every``; its final eval loss is the **target**.
2. Each config (``--configs``): K Trainers (the same seed, so the same start weights) take inner steps on their
   shards of each step's global batch (``data.sharding``, as the ranks do); every H steps the K pseudo-gradients,
   weighted by batch share, are summed and each worker applies the outer step with
   :class:`smolcluster.algorithms.diloco.Outer`, the class the ranks run, so a recipe found here is the one
   ``algo=diloco`` runs. ``warmup_sync_steps`` steps first average the gradient every step (allreduce's);
   ``w=all`` is plain allreduce. Evals see worker 0's weights, as the desk's rank 0.

For each config it reports the fraction of N per worker at which the eval loss first reaches the target (the
goal needs about <= 0.37, leaving room for syncs and outer steps), and rank 0's bytes sent per training sample
on a ring of K (uncompressed float32; a codec divides it), and plots eval loss against samples per worker.
A config is a comma-separated list of key=value: ``H`` (inner steps), ``olr`` / ``om`` (outer lr, Nesterov
momentum), ``lr`` (inner lr), ``w`` (warmup_sync_steps, or ``all``), ``s`` (the schedule's length in steps,
as a fraction of N: ``train.steps`` of the K-node run). Each run stops once it reaches the target or
``--max-frac`` x N steps. One thread (``torch.set_num_threads(1)``): the runs are cheap enough and comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from smolcluster.algorithms.diloco import Outer
from smolcluster.bench.common import compose_config
from smolcluster.bench.report import write_report
from smolcluster.bench.scaling import MODELS

# allreduce as the bound of what these samples give a data-parallel run; diloco with plain averaging and with the
# paper's outer Nesterov at H=25, each with its schedule ending at N/3 steps; bench desk's diloco (H=100, the paper's).
DEFAULT_CONFIGS = ("w=all,s=0.3334", "H=25,olr=1,om=0,s=0.3334", "H=25,olr=0.7,om=0.9,s=0.3334",
                   "H=100,olr=0.7,om=0.9")
KEYS = {"H": int, "olr": float, "om": float, "lr": float, "w": str, "s": float}


def parse_config(text: str) -> dict:
    """``H=25,olr=1,om=0`` -> the config's settings (defaults: H=100, the paper's outer 0.7 / 0.9, the bench's
    inner lr, no warmup, the schedule as long as local's)."""
    out = {"H": 100, "olr": 0.7, "om": 0.9, "lr": None, "w": "0", "s": 1.0}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS or not value or key == "w" and value != "all" and not value.isdigit():
            raise SystemExit(f"error: config {text!r}: {item!r} is not one of {', '.join(k + '=...' for k in KEYS)} "
                             "(w: a number of steps or all)")
        out[key] = KEYS[key](value)
    return out


def run_local(base: list[str], data, steps: int, every: int) -> list[dict]:
    """One node, N steps: its eval curve (step, eval loss)."""
    from smolcluster.trainer import Trainer

    cfg = compose_config([*base, f"train.steps={steps}"])
    t = Trainer(cfg, [cfg.train.batch_size], data=data)
    curve = []
    while t.step < steps:
        t.compute_gradients(t.step, 0)
        t.apply_gradients()
        if t.step % every == 0:
            curve.append({"step": t.step, "eval_loss": t.evaluate()["eval_loss"]})
            print(json.dumps({"run": "local", **curve[-1]}), flush=True)  # (a long run's progress, as it goes)
    return curve


def run_config(base: list[str], data, name: str, c: dict, k: int, n: int, every: int, target: float,
               max_frac: float) -> dict:
    """K simulated diloco workers until worker 0's eval reaches ``target`` or ``max_frac`` x N steps."""
    from smolcluster.trainer import Trainer

    sched = max(1, round(c["s"] * n))
    cfg = compose_config([*base, f"train.steps={sched}", *([f"train.lr={c['lr']}"] if c["lr"] else [])])
    b = cfg.train.batch_size
    workers = [Trainer(cfg, [b] * k, data=data) for _ in range(k)]
    outers = [Outer(w.flat.params, 1, c["olr"], c["om"]) for w in workers]
    warmup = sched if c["w"] == "all" else int(c["w"])
    stop, curve, syncs, reached = min(sched, round(max_frac * n)), [], 0, None
    for step in range(stop):
        for r, w in enumerate(workers):
            w.compute_gradients(step, r)
        if step < warmup:  # allreduce's step: every worker applies the mean gradient
            grads = [list(w.flat.grads.values()) for w in workers]
            for parts in zip(*grads):
                mean = torch.stack(parts).mean(0)
                for g in parts:
                    g.copy_(mean)
        for w in workers:
            w.apply_gradients()
        s = step + 1
        if s == warmup:
            for o in outers:
                o.reset()
        elif s > warmup and (s - warmup) % c["H"] == 0:  # the ring's sum of share-weighted pseudo-gradients
            summed = sum(o.pseudo_gradient(0, 1 / k) for o in outers)
            for o in outers:
                o.step(0, summed.clone(), 0.0)
            syncs += 1
        if s % every == 0 or s == stop:
            loss = workers[0].evaluate()["eval_loss"]
            curve.append({"step": s, "eval_loss": loss})
            print(json.dumps({"run": name, **curve[-1]}), flush=True)
            if loss <= target:
                reached = s
                break
    params = sum(t.numel() for t in workers[0].flat.params.values())
    ring = 2 * (k - 1) / k * params * 4  # bytes rank 0 sends per all-reduce of the float32 model
    samples = len(curve) and curve[-1]["step"] * b * k
    return {"curve": curve, "reached_step": reached, "frac": reached and reached / n, "syncs": syncs,
            "bytes_per_sample": round((min(warmup, curve[-1]["step"]) + syncs) * ring / samples, 1) if samples else None,
            "final": curve[-1]["eval_loss"] if curve else None}


def plot(local: list[dict], results: dict, n: int, target: float, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([p["step"] / n for p in local], [p["eval_loss"] for p in local], "k-", label="local (1 node)")
    for i, (name, r) in enumerate(results.items()):
        ax.plot([p["step"] / n for p in r["curve"]], [p["eval_loss"] for p in r["curve"]], ".-", color=f"C{i}",
                label=name)
    ax.axhline(target, color="grey", ls=":", lw=1)
    ax.axvline(0.37, color="grey", ls="--", lw=1)
    ax.set_xlabel("steps (samples) per worker / N")
    ax.set_ylabel("eval loss")
    ax.set_ylim(top=min(6.5, max(p["eval_loss"] for p in local[len(local) // 5:]) + 0.4))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench diloco-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-tiny", choices=sorted(m for m in MODELS if m != "mlp"))
    p.add_argument("--steps", type=int, default=600, help="N: the lone node's steps (bench desk's default)")
    p.add_argument("--workers", type=int, default=4, help="K simulated workers")
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                   help="';'-separated configs, each key=value,...: H, olr, om, lr, w (number or all), s")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--max-frac", type=float, default=0.5, help="stop a config at this fraction of N per worker")
    p.add_argument("--target", type=float, default=0.0, help="skip the local run: this eval loss is the target")
    shared = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", "../shared/data"))
    p.add_argument("--text", default=str(shared / "tinyshakespeare" / "input.txt"))
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    args.configs = {c: parse_config(c) for c in args.configs.split(";") if c}
    if args.workers < 2 or args.steps < args.eval_every:
        p.error("--workers must be at least 2 and --steps at least --eval-every")
    return args


def main(argv: list[str]) -> int:
    from smolcluster.data import build_data

    args = parse(argv)
    torch.set_num_threads(1)
    base = [o.format(root="", text=Path(args.text).resolve()) for o in MODELS[args.model]]
    base += [f"train.eval_samples={args.eval_samples}", "logging.grad_norm_every=0"]
    cfg = compose_config(base)
    data = build_data(cfg.data, cfg.model)
    started, out = time.monotonic(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    local = run_local(base, data, args.steps, args.eval_every) if not args.target else []
    target = args.target or local[-1]["eval_loss"]
    print(json.dumps({"run": "local", "steps": args.steps, "target": round(target, 4)}), flush=True)
    results, rows = {}, []
    for name, c in args.configs.items():
        t0 = time.monotonic()
        r = results[name] = run_config(base, data, name, c, args.workers, args.steps, args.eval_every, target,
                                       args.max_frac)
        rows.append({"config": name, "frac_of_N_to_target": r["frac"] and round(r["frac"], 3),
                     "last_eval_loss": r["final"] and round(r["final"], 4), "outer_steps": r["syncs"],
                     "bytes_per_sample": r["bytes_per_sample"], "run_s": round(time.monotonic() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\ntarget {target:.4f} (local, {args.steps} steps); goal: frac <= ~0.37")
    png = plot(local, results, args.steps, target, out / "diloco-sim.png") if local else None
    write_report("diloco-sim", rows, {"target": target, "local": local, "curves": {k: v["curve"] for k, v in
                 results.items()}, "steps": args.steps, "workers": args.workers, "plot": str(png),
                 "wall_s": round(time.monotonic() - started, 1)}, out)
    return 0
