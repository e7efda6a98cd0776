"""``python -m smolcluster.bench local``: what the framework costs over a hand-written PyTorch loop.

Same model, data, batch size, optimizer and step count; all run in this process after a warm-up
run of each, in ``--repeats`` rounds of one run per loop (alternating order). Each round gives a
ratio to its own hand-written run, and the median of the rounds' ratios is reported: a disturbance
(the machine is often shared) moves one round, not the figure.
Both are timed over their training steps: ``algo=local``'s figure is the samples/s of its
last metrics row (logged at the last step), so its final evaluation and checkpoint, which
the hand-written loop does not do, count on neither side.

Each loop's CPU time over the same steps (this thread's, ``time.thread_time``) is reported too: on a
shared machine, other processes stretch the wall clock of whichever loop they land on, but hardly
its CPU time, so the CPU-time ratio is the steadier figure there.
"""

from __future__ import annotations

import argparse
import contextlib
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
from smolcluster.trainer import Trainer


def plain_loop(cfg, data, steps: int) -> tuple[float, float]:
    """The loop a PyTorch user writes by hand: shuffle, slice, forward, backward, step.
    Returns its samples/s and CPU seconds over the steps."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.info)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    bs, n = cfg.train.batch_size, len(data.train_x)
    perm = torch.randperm(n)
    t0, c0 = time.perf_counter(), time.thread_time()
    for step in range(steps):
        i = (step * bs) % (n - bs)
        idx = perm[i : i + bs]
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cpu_s = time.thread_time() - c0
    return steps * bs / (time.perf_counter() - t0), cpu_s


@contextlib.contextmanager
def cpu_clock(marks: dict[str, float]):
    """Mark ``algo=local``'s CPU time (``t0``, ``t1``) at :meth:`Trainer.start_clock` (where its samples/s
    clock starts) and at its final evaluation, the first after the loop (train.eval_every=0): measuring
    instrumentation, undone on exit."""
    start, evaluate = Trainer.start_clock, Trainer.evaluate

    def timed_start(self, recorder=None):
        start(self, recorder)
        marks["t0"] = time.thread_time()

    def timed_evaluate(self):
        if "t0" in marks and "t1" not in marks:
            marks["t1"] = time.thread_time()
        return evaluate(self)

    Trainer.start_clock, Trainer.evaluate = timed_start, timed_evaluate
    try:
        yield
    finally:
        Trainer.start_clock, Trainer.evaluate = start, evaluate


def training_rate(cfg) -> tuple[float, float]:
    """``algo=local``'s samples/s over its training steps (the last logged training row's) and its CPU
    seconds over them."""
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d, cpu_clock(marks):
        local.run(cfg, Path(d))
        rate = [r for r in read_metrics(Path(d) / "metrics.jsonl") if "loss" in r][-1]["samples_per_s"]
    return rate, marks["t1"] - marks["t0"]


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
    cpu_us: dict[str, list[float]] = {k: [] for k in loops}  # CPU microseconds per step
    for r in range(args.repeats):
        # one round runs the three loops back to back, in alternating order, so a disturbance that lasts
        # about a round hits a round's three alike, and neither side always runs first
        for name in (list(loops) if r % 2 == 0 else list(reversed(loops))):
            rate, cpu_s = loops[name]()
            rates[name].append(rate)
            cpu_us[name].append(cpu_s / args.steps * 1e6)
    ratios = {k: [v / p for v, p in zip(rates[k], rates["plain"])] for k in ("ours", "quiet")}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    # CPU-time overhead per round (ours' CPU per step over the plain loop's, minus 1), median of rounds
    cpu_over = {k: statistics.median(c / p - 1 for c, p in zip(cpu_us[k], cpu_us["plain"])) for k in ("ours", "quiet")}
    cpu = {k: round(statistics.median(v), 1) for k, v in cpu_us.items()}
    rows = [
        {"loop": "hand-written PyTorch", "samples_per_s": statistics.median(rates["plain"]), "ratio": 1.0,
         "cpu_us_per_step": cpu["plain"], "cpu_overhead": "0"},
        {"loop": "smolcluster algo=local", "samples_per_s": statistics.median(rates["ours"]), "ratio": ratio["ours"],
         "cpu_us_per_step": cpu["ours"], "cpu_overhead": f"{cpu_over['ours']:.1%}"},
        {"loop": "algo=local, grad norms + hardware sampling off", "samples_per_s": statistics.median(rates["quiet"]),
         "ratio": ratio["quiet"], "cpu_us_per_step": cpu["quiet"], "cpu_overhead": f"{cpu_over['quiet']:.1%}"},
    ]
    write_report("local", rows, {"framework_overhead": f"{1 - ratio['ours']:.1%}", "target": "<= 5%",
                                 "cpu_overhead": f"{cpu_over['ours']:.1%}",
                                 "all_cpu_us": {k: [round(x, 1) for x in v] for k, v in cpu_us.items()},
                                 "round_ratios": [round(x, 4) for x in ratios["ours"]],
                                 "round_ratios_quiet": [round(x, 4) for x in ratios["quiet"]],
                                 "all_ours": rates["ours"], "all_quiet": rates["quiet"], "all_plain": rates["plain"],
                                 "steps": args.steps, "batch_size": args.batch_size, "data": args.data})
    return 0
