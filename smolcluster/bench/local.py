"""``python -m smolcluster.bench local``: what the framework costs over a hand-written PyTorch loop.

Same model, data, batch size, optimizer and step count; both run in this process,
alternating, and the best of ``--repeats`` is compared (the least-disturbed run of each).
Both are timed over their training steps: ``algo=local``'s figure is the samples/s of its
last metrics row (logged at the last step), so its final evaluation and checkpoint, which
the hand-written loop does not do, count on neither side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smolcluster.algorithms import local
from smolcluster.bench.common import add_local_args, local_config
from smolcluster.bench.report import write_report
from smolcluster.data import build_data
from smolcluster.models import build_model
from smolcluster.telemetry.logging import setup_logging
from smolcluster.telemetry.run_files import read_metrics


def plain_loop(cfg, data, steps: int) -> float:
    """The loop a PyTorch user writes by hand: shuffle, slice, forward, backward, step."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.info)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    bs, n = cfg.train.batch_size, len(data.train_x)
    perm = torch.randperm(n)
    t0 = time.perf_counter()
    for step in range(steps):
        i = (step * bs) % (n - bs)
        idx = perm[i : i + bs]
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * bs / (time.perf_counter() - t0)


def training_rate(cfg) -> float:
    """``algo=local``'s samples/s over its training steps: the last logged training row's."""
    with tempfile.TemporaryDirectory() as d:
        local.run(cfg, Path(d))
        return [r for r in read_metrics(Path(d) / "metrics.jsonl") if "loss" in r][-1]["samples_per_s"]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench local", description=__doc__)
    add_local_args(p, steps=1500)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    setup_logging(level="WARNING")
    torch.set_num_threads(1)  # per-step overhead is what we measure; keep BLAS threads out of the noise
    cfg = local_config(args, "train.schedule=constant")
    # the same run with per-layer grad norms and hardware sampling off: what the telemetry defaults cost
    quiet = local_config(args, "train.schedule=constant", "logging.grad_norm_every=0", "logging.hardware_every=0")
    data = build_data(cfg.data, cfg.model)
    ours, quiet_runs, plain = [], [], []
    for _ in range(args.repeats):  # alternated, so a disturbance hits all three alike
        plain.append(plain_loop(cfg, data, args.steps))
        for config, runs in ((cfg, ours), (quiet, quiet_runs)):
            runs.append(training_rate(config))
    best_plain = max(plain)
    rows = [
        {"loop": "hand-written PyTorch", "samples_per_s": best_plain, "ratio": 1.0},
        {"loop": "smolcluster algo=local", "samples_per_s": max(ours), "ratio": max(ours) / best_plain},
        {"loop": "algo=local, grad norms + hardware sampling off", "samples_per_s": max(quiet_runs),
         "ratio": max(quiet_runs) / best_plain},
    ]
    overhead = 1 - max(ours) / best_plain
    write_report("local", rows, {"framework_overhead": f"{overhead:.1%}", "target": "<= 5%",
                                 "all_ours": ours, "all_quiet": quiet_runs, "all_plain": plain,
                                 "steps": args.steps, "batch_size": args.batch_size, "data": args.data})
    return 0
