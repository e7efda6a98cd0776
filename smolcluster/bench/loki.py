"""``python -m smolcluster.bench loki``: does shipping logs to Loki slow training down?

The same ``algo=local`` run, in this process, in three configurations alternated over
``--repeats`` rounds (medians reported): logging to Loki off; on, pushing to a local
receiver that accepts everything (in another process, as a real Loki would be); on,
with an unreachable URL (a closed port: every push fails, the queue fills, lines are
dropped). The issue's target: training time within noise of logging off.

``algo=local`` records its steps in metrics.jsonl but writes no log line per step, so
the bench adds one INFO line per logged step (like the parameter server's ``step N/M
loss ...``) with ``train.log_every=1``. The console handler stays on at INFO (it formats
every line, as on a real node) but writes to /dev/null, so the terminal is not flooded.
Besides the loop's wall time: the process's CPU time over the run (the pusher thread's
work included; less sensitive to other jobs on the machine than wall time), and the cost
of one ``logger.info`` call in a tight loop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from loguru import logger

from smolcluster.algorithms import local
from smolcluster.bench.common import add_local_args, local_config
from smolcluster.bench.report import write_report
from smolcluster.cluster import free_port
from smolcluster.telemetry.logging import loki_sink, setup_logging


class _Accept(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve_receiver(conn) -> None:
    """A Loki stand-in that accepts every push (run in a child process; sends back its port)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    conn.send(server.server_address[1])
    server.serve_forever()


class StepLines:
    """A metrics sink that logs each recorded step as one INFO line, as the parameter server does."""

    def log(self, step: int, metrics: dict) -> None:
        if "loss" in metrics:
            logger.info(f"step {step} loss {metrics['loss']:.4f} lr {metrics['lr']:.4g} "
                        f"samples/s {metrics['samples_per_s']:,.0f}")

    def close(self, summary, exit_code: int = 0) -> None:
        pass


def _with_step_lines(open_recorder):
    def opened(*args, **kwargs):
        recorder = open_recorder(*args, **kwargs)
        recorder.sinks.append(StepLines())
        return recorder
    return opened


def timed_run(cfg, loki: dict | None, devnull) -> dict:
    """One training run with the given ``logging.loki`` settings; its loop time and the sink's counts."""
    with contextlib.redirect_stderr(devnull):  # the console handler binds to sys.stderr as it is now
        setup_logging(role="main", algo="local", run_id="bench-loki", level="INFO", loki=loki)
    sink = loki_sink()
    cpu0 = time.process_time()  # every thread of this process: the pusher's work counts too
    with tempfile.TemporaryDirectory() as d:
        summary = local.run(cfg, Path(d))
    cpu_s = time.process_time() - cpu0
    setup_logging(level="WARNING")  # closes the sink: a bounded flush, then its final counts
    return {"train_s": summary["wall_s"], "cpu_s": cpu_s, **(sink.stats() if sink else {})}


def call_cost_us(loki: dict | None, devnull, calls: int) -> float:
    """Microseconds per ``logger.info`` call in a tight loop (more calls than the queue holds:
    with an unreachable URL this times the drop path too)."""
    with contextlib.redirect_stderr(devnull):
        setup_logging(role="main", algo="local", run_id="bench-loki", level="INFO", loki=loki)
    t0 = time.perf_counter()
    for i in range(calls):
        logger.info("step {} loss {:.4f}", i, 0.5)
    elapsed = time.perf_counter() - t0
    setup_logging(level="WARNING")
    return elapsed / calls * 1e6


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench loki", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_local_args(p, steps=10000)  # --steps: optimizer steps per run, one log line each
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs the three configurations")
    p.add_argument("--calls", type=int, default=20000, help="logger.info calls timed per configuration and round")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # keep BLAS threads out of the noise; the pusher thread competes for the GIL
    cfg = local_config(args, "train.log_every=1")
    loki_defaults = dataclasses.asdict(cfg.logging.loki)

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    receiver = ctx.Process(target=serve_receiver, args=(child,), daemon=True)
    receiver.start()
    configs = {"off": None,
               "on, receiver accepts all": {**loki_defaults, "url": f"http://127.0.0.1:{parent.recv()}"},
               "on, unreachable URL": {**loki_defaults, "url": f"http://127.0.0.1:{free_port()}"}}
    plain_recorder, local.open_recorder = local.open_recorder, _with_step_lines(local.open_recorder)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    call_us: dict[str, list[float]] = {name: [] for name in configs}
    try:
        with open(os.devnull, "w") as devnull:
            timed_run(cfg, None, devnull)  # warm-up (allocator, caches), not counted
            for r in range(args.repeats):
                names = list(configs)
                for name in names[r % 3:] + names[: r % 3]:  # rotate the order: no config always goes first
                    runs[name].append(timed_run(cfg, configs[name], devnull))
                    call_us[name].append(call_cost_us(configs[name], devnull, args.calls))
    finally:
        local.open_recorder = plain_recorder
        receiver.terminate()
    def median(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    rows = []
    for name, xs in runs.items():
        t, cpu = median(name, "train_s"), median(name, "cpu_s")
        row = {"logging to Loki": name, "train_s (median)": t, "ratio to off": t / median("off", "train_s"),
               "train_s (best)": min(x["train_s"] for x in xs), "cpu_s (median)": cpu,
               "cpu ratio to off": cpu / median("off", "cpu_s"),
               "µs per logger.info": statistics.median(call_us[name])}
        if configs[name]:
            row |= {"lines sent / run": sum(x["sent"] for x in xs) // len(xs),
                    "lines dropped / run": sum(x["dropped"] for x in xs) // len(xs)}
        rows.append(row)
    write_report("loki", rows, {"per_run_train_s": {k: [x["train_s"] for x in v] for k, v in runs.items()},
                                "per_run_cpu_s": {k: [round(x["cpu_s"], 3) for x in v] for k, v in runs.items()},
                                "per_round_call_us": {k: [round(x, 2) for x in v] for k, v in call_us.items()},
                                "steps": args.steps, "log_lines_per_run": f"~{args.steps} (one per step)",
                                "repeats": args.repeats, "data": args.data, "loki": loki_defaults})
    return 0
