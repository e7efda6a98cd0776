"""``python -m smolcluster.bench edp``: EDP vs SyncPS with one worker 3x slower than the other.

Both algorithms train the MNIST MLP (or the digits MLP when the MNIST files are not
found) in the same run, with the same two workers: worker 1 gets an injected per-step
delay three times worker 0's (``cluster.nodes[i].delay_s``, the test knob). We report
the wall time, from the start of training, until the eval loss first reaches a fixed
target. SyncPS waits for the slow worker at every step; EDP does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from smolcluster.bench.report import write_report


def time_to_target(run_dir: Path, target: float) -> tuple[float | None, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    hit = next((r["time"] for r in evals if r["eval_loss"] <= target), None)
    return hit, min(r["eval_loss"] for r in evals)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench edp", description=__doc__)
    p.add_argument("--root", default="../shared/data/mnist", help="MNIST IDX directory")
    p.add_argument("--delay", type=float, default=0.01, help="fast worker's injected delay per step (s)")
    p.add_argument("--slowdown", type=float, default=3.0, help="slow worker's delay = slowdown x fast delay")
    p.add_argument("--target", type=float, default=0.20, help="eval loss to reach")
    p.add_argument("--samples", type=int, default=64_000, help="sample budget of each run")
    args = p.parse_args(argv)
    data = ["data=mnist", f"data.root={args.root}"] if (Path(args.root) / "t10k-images-idx3-ubyte.gz").is_file() \
        else ["data=digits"]
    steps_sync = args.samples // 128
    common = [*data, "train.batch_size=64", "train.eval_samples=2000", "cluster.workers=2",
              f"cluster.nodes=[{{delay_s: {args.delay}}},{{delay_s: {args.delay * args.slowdown}}}]",
              "train.progress=false", "logging.level=WARNING"]
    runs = {
        "syncps": ["algo=syncps", f"train.steps={steps_sync}", "train.eval_every=10"],
        "edp": ["algo=edp", f"train.steps={2 * steps_sync}", "train.eval_every=20"],
    }
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo, extra in runs.items():
            run_dir = Path(tmp) / algo
            proc = subprocess.run([sys.executable, "-m", "smolcluster.train", *common, *extra,
                                   f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            summary = json.loads((run_dir / "summary.json").read_text())
            hit, best = time_to_target(run_dir, args.target)
            raw[algo] = {"summary": {k: summary.get(k) for k in ("steps", "samples", "wall_s", "samples_per_s",
                                                                 "eval_loss", "eval_accuracy", "dropped")},
                         "time_to_target_s": hit, "best_eval_loss": best,
                         "workers": summary.get("workers")}
            rows.append({"algo": algo, "time_to_target_s": hit, "best_eval_loss": best,
                         "samples_per_s": summary["samples_per_s"], "final_accuracy": summary.get("eval_accuracy")})
    t_sync, t_edp = raw["syncps"]["time_to_target_s"], raw["edp"]["time_to_target_s"]
    ratio = t_edp / t_sync if t_sync and t_edp else None
    for r in rows:
        r["ratio_vs_syncps"] = (r["time_to_target_s"] / t_sync) if t_sync and r["time_to_target_s"] else None
    write_report("edp", rows, {"target_eval_loss": args.target, "edp_over_syncps_time": ratio,
                               "goal": "<= 0.7", "slowdown": args.slowdown, "fast_delay_s": args.delay,
                               "data": data[0], "runs": raw})
    return 0
