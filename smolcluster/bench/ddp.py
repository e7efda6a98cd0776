"""``python -m smolcluster.bench ddp``: SyncPS against PyTorch DDP (gloo) on this machine.

Same model, per-worker batch, world size (2) and data; both in this run. DDP runs
``world`` processes that all-reduce gradients (overlapped with backward, in buckets);
SyncPS runs a server plus ``world`` workers that push gradients and receive weights.
Samples/s is measured over the steady state (the first ``--warmup`` steps are excluded). Every
process of both runs gets the same intra-op threads, ``cores // world``: a DDP rank's share of the cores
(the SyncPS launcher would otherwise give its workers ``cores // (world + 1)``, fewer than a DDP rank).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smolcluster.bench.common import compose_config
from smolcluster.bench.report import write_report
from smolcluster.cluster import free_port

MODELS = {
    "mlp": ["model=mlp", "data=mnist", "data.root={root}", "train.batch_size=64"],
    "gpt2-tiny": ["model=gpt2-tiny", "data=text", "data.path={text}", "train.batch_size=8",
                  "train.optimizer=adamw", "train.lr=1e-3"],
}


def threads(world: int) -> int:
    """Intra-op threads of every process in both runs: a DDP rank's share of this machine's cores."""
    return max(1, (os.cpu_count() or 1) // world)


def _ddp_worker(rank: int, world: int, port: int, overrides: list[str], steps: int, warmup: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    from smolcluster.objective import loss_fn
    from smolcluster.trainer import Trainer

    cfg = compose_config(overrides)
    trainer = Trainer(cfg, [cfg.train.batch_size] * world, with_optimizer=False)
    model = DistributedDataParallel(trainer.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if cfg.train.optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        if step == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        x, y = trainer.batch(step, rank)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"samples_per_s": (steps - warmup) * cfg.train.batch_size * world / elapsed}))
    dist.destroy_process_group()


def run_ddp(overrides: list[str], world: int, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.json")
        mp.spawn(_ddp_worker, args=(world, free_port(), overrides, steps, warmup, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())["samples_per_s"]


def run_syncps(overrides: list[str], world: int, steps: int, warmup: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "ps"
        log_every = max(1, warmup)
        proc = subprocess.run([sys.executable, "-m", "smolcluster.train", "algo=syncps", *overrides,
                               f"cluster.workers={world}", f"train.steps={steps}", f"train.log_every={log_every}",
                               f"hydra.run.dir={run_dir}", "logging.level=WARNING", "train.progress=false"],
                              capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads(world))})  # the launcher keeps it
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "samples" in r]
        first = next(r for r in rows if r["step"] >= warmup)
        last = rows[-1]
        rate = (last["samples"] - first["samples"]) / (last["time"] - first["time"])
        return rate, json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench ddp", description=__doc__)
    p.add_argument("--models", default="gpt2-tiny,mlp")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: 60 for gpt2-tiny, 600 for mlp)")
    p.add_argument("--root", default="../shared/data/mnist")
    p.add_argument("--text", default="../shared/data/tinyshakespeare/input.txt")
    args = p.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        overrides = [o.format(root=args.root, text=args.text) for o in MODELS[name]]
        steps = args.steps or (60 if name == "gpt2-tiny" else 600)
        warmup = max(5, steps // 6)
        ddp = run_ddp(overrides, args.world, steps, warmup)
        ours, _ = run_syncps(overrides, args.world, steps, warmup)
        batch = next(int(o.split("=")[1]) for o in overrides if o.startswith("train.batch_size="))
        rows.append({"model": name, "world": args.world, "per_worker_batch": batch,
                     "ddp_samples_per_s": ddp, "syncps_samples_per_s": ours, "ratio": ours / ddp})
    write_report("ddp", rows, {"goal": "ratio >= 1.0 (issue 22)", "cores": os.cpu_count(),
                               "threads_per_process": threads(args.world)})
    return 0
