"""``python -m smolcluster.bench local``: what the framework costs over a hand-written PyTorch loop.

Same model, data, batch size, optimizer and step count; both run in this process,
alternating, and the best of ``--repeats`` is compared (the least-disturbed run of each).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from smolcluster.algorithms import local
from smolcluster.bench.report import write_report
from smolcluster.data import build_data
from smolcluster.models import build_model
from smolcluster.paths import CONFIG_DIR
from smolcluster.telemetry.logging import setup_logging


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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench local", description=__doc__)
    p.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--root", default=str(Path("../shared/data/mnist")), help="MNIST IDX directory")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    setup_logging(level="WARNING")
    torch.set_num_threads(1)  # per-step overhead is what we measure; keep BLAS threads out of the noise
    overrides = [f"data={args.data}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                 "train.progress=false", "algo=local", "train.schedule=constant"]
    if args.data == "mnist":
        overrides.append(f"data.root={args.root}")
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    data = build_data(cfg.data, cfg.model)
    ours, plain = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(cfg, data, args.steps))
        with tempfile.TemporaryDirectory() as d:
            ours.append(local.run(cfg, Path(d))["samples_per_s"])
    best_ours, best_plain = max(ours), max(plain)
    rows = [
        {"loop": "hand-written PyTorch", "samples_per_s": best_plain, "ratio": 1.0},
        {"loop": "smolcluster algo=local", "samples_per_s": best_ours, "ratio": best_ours / best_plain},
    ]
    overhead = 1 - best_ours / best_plain
    write_report("local", rows, {"framework_overhead": f"{overhead:.1%}", "target": "<= 10%",
                                 "all_ours": ours, "all_plain": plain, "steps": args.steps,
                                 "batch_size": args.batch_size, "data": args.data})
    return 0
