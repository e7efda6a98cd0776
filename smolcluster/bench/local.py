"""``python -m smolcluster.bench local``: what the framework costs over a hand-written PyTorch loop.

Same model, data, batch size, optimizer and step count; all run in this process after a warm-up
run of each, in ``--repeats`` rounds of one run per loop (alternating order). Each round gives a
ratio to its own hand-written run, and the median of the rounds' ratios is reported: a disturbance
(the machine is often shared) moves one round, not the figure.
Both are timed over their training steps: ``algo=local``'s figure is the samples/s of its
last metrics row (logged at the last step), so its final evaluation and checkpoint, which
the hand-written loop does not do, count on neither side.
"""

from __future__ import annotations

import argparse
import statistics
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
    p.add_argument("--repeats", type=int, default=7, help="rounds; each runs all three loops once")
    args = p.parse_args(argv)
    setup_logging(level="WARNING")
    torch.set_num_threads(1)  # per-step overhead is what we measure; keep BLAS threads out of the noise
    cfg = local_config(args, "train.schedule=constant")
    # the same run with per-layer grad norms and hardware sampling off: what the telemetry defaults cost
    quiet = local_config(args, "train.schedule=constant", "logging.grad_norm_every=0", "logging.hardware_every=0")
    data = build_data(cfg.data, cfg.model)
    loops = {"plain": lambda: plain_loop(cfg, data, args.steps), "ours": lambda: training_rate(cfg),
             "quiet": lambda: training_rate(quiet)}
    for run in loops.values():  # warm-up: first-call costs (allocator, lazy imports) count on neither side
        run()
    rates: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(args.repeats):
        # one round runs the three loops back to back, in alternating order, so a disturbance that lasts
        # about a round hits a round's three alike, and neither side always runs first
        for name in (list(loops) if r % 2 == 0 else list(reversed(loops))):
            rates[name].append(loops[name]())
    ratios = {k: [v / p for v, p in zip(rates[k], rates["plain"])] for k in ("ours", "quiet")}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    rows = [
        {"loop": "hand-written PyTorch", "samples_per_s": statistics.median(rates["plain"]), "ratio": 1.0},
        {"loop": "smolcluster algo=local", "samples_per_s": statistics.median(rates["ours"]), "ratio": ratio["ours"]},
        {"loop": "algo=local, grad norms + hardware sampling off", "samples_per_s": statistics.median(rates["quiet"]),
         "ratio": ratio["quiet"]},
    ]
    write_report("local", rows, {"framework_overhead": f"{1 - ratio['ours']:.1%}", "target": "<= 5%",
                                 "round_ratios": [round(x, 4) for x in ratios["ours"]],
                                 "round_ratios_quiet": [round(x, 4) for x in ratios["quiet"]],
                                 "all_ours": rates["ours"], "all_quiet": rates["quiet"], "all_plain": rates["plain"],
                                 "steps": args.steps, "batch_size": args.batch_size, "data": args.data})
    return 0
