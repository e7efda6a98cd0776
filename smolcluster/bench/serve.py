"""``python -m smolcluster.bench serve``: a load test of the OpenAI API over a batching pipeline.

``--clients`` (64) concurrent streaming clients (an ``asyncio`` + ``httpx`` client written for
it) post ``/v1/completions`` with ``stream: true`` for ``--seconds`` on loopback, each a new
request as soon as its last one ended, against a random-init gpt2-tiny served by 2 stage
processes (``serve.max_active`` and ``serve.max_waiting`` as given). Every request must either
complete (its stream ends with ``[DONE]`` after exactly ``max_tokens`` tokens, as
``usage.completion_tokens`` says) or get a 429; none may be lost or answered twice (each
carries its own ``user`` + index, checked against the answers). Reported: requests completed
and refused, p50/p95 time to first token, aggregate tokens/s, and the stages' RSS.

Memory is bounded: each stage's RSS, sampled (``psutil``) every 50 ms during the load, must stay
under its *baseline* (its RSS once serving, after a warm-up request: weights, code, allocator)
plus the KV-cache budget plus ``--rss-slack-mb`` (per-step activations and allocator slack, which
the budget does not count); the bench fails (exit 1) otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from smolcluster.bench.common import write_tiny_run
from smolcluster.bench.report import write_report
from smolcluster.telemetry.logging import setup_logging

MODEL = "tiny"


def write_run(d: Path, vocab: int = 512, context: int = 256) -> Path:
    return write_tiny_run(d, context, vocab=vocab)


async def one_client(http, user: int, deadline: float, max_tokens: int, log: list) -> None:
    i = 0
    while time.perf_counter() < deadline:
        tag = f"u{user}-{i}"
        i += 1
        body = {"model": MODEL, "prompt": f"Request {tag}: the", "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "user": tag, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, tokens, done, status = None, None, False, None
        try:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                if status == 200:
                    async for line in r.aiter_lines():
                        if not line:
                            continue
                        data = line[len("data: "):]
                        if data == "[DONE]":
                            done = True
                            continue
                        event = json.loads(data)
                        if first is None and event.get("choices") and event["choices"][0].get("text"):
                            first = time.perf_counter()
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
                else:
                    await r.aread()
        except Exception as e:  # counted as lost: the load test's point is that none are
            status = f"{type(e).__name__}"
        log.append({"tag": tag, "status": status, "done": done, "tokens": tokens, "t0": t0, "first": first,
                    "end": time.perf_counter()})
        if status == 429:
            await asyncio.sleep(0.05)  # a client told to retry in a moment does so


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> list[dict]:
    import httpx

    log: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(one_client(http, u, deadline, max_tokens, log) for u in range(clients)))
    return log


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


class RssSampler:
    """The peak RSS of some processes, sampled every ``every_s`` by a thread (VmHWM would include startup)."""

    def __init__(self, pids: list[int], every_s: float = 0.05):
        import psutil

        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak_mb = [0.0] * len(pids)
        self.every_s, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> list[float]:
        return [p.memory_info().rss / 2**20 for p in self.procs]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mb = [max(a, b) for a, b in zip(self.peak_mb, self.now_mb())]
            except Exception:  # a stage gone mid-load: the request log says so
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-active", type=int, default=16)
    p.add_argument("--max-waiting", type=int, default=32)
    p.add_argument("--kv-cache-mb", type=float, default=64.0)
    p.add_argument("--rss-slack-mb", type=float, default=64.0,
                   help="allowed over baseline + KV budget per stage (activations, allocator)")
    args = p.parse_args(argv)
    setup_logging(level="WARNING")
    from smolcluster.bench.pipeline import stage_peaks_mb
    from smolcluster.inference import InferencePipeline
    from smolcluster.serving.app import WebServer, build_app
    from smolcluster.serving.sessions import Sessions

    with tempfile.TemporaryDirectory() as tmp:
        run = write_run(Path(tmp))
        sessions = Sessions(lambda: InferencePipeline.start_local(run, stages=2, n_head=4, kv_cache_mb=args.kv_cache_mb,
                                                              env={"SMOLCLUSTER_LOG_LEVEL": "WARNING"}),
                        max_active=args.max_active, max_waiting=args.max_waiting).start()
        try:
            server = WebServer(build_app(sessions, MODEL, ui=False)).start()
            try:
                asyncio.run(load(server.url, 1, 0.01, args.max_tokens))  # warm-up: one request through
                pids = [p.pid for p in sessions.replicas[0].pipe._children.procs.values()]
                with RssSampler(pids) as rss:
                    baseline = rss.now_mb()
                    t = time.perf_counter()
                    log = asyncio.run(load(server.url, args.clients, args.seconds, args.max_tokens))
                    wall = time.perf_counter() - t
                peaks = stage_peaks_mb(sessions.replicas[0].pipe) if sessions.replicas[0].pipe is not None else []
            finally:
                server.stop()
        finally:
            sessions.close()
    ok = [e for e in log if e["status"] == 200 and e["done"] and e["tokens"] == args.max_tokens]
    refused = [e for e in log if e["status"] == 429]
    lost = [e for e in log if e not in ok and e not in refused]
    tags = [e["tag"] for e in log]
    ttft = [1000 * (e["first"] - e["t0"]) for e in ok if e["first"]]
    rows = [
        {"metric": "requests completed / refused (429) / lost", "model": f"{args.clients} clients, {args.seconds:.0f} s",
         "value": f"{len(ok)} / {len(refused)} / {len(lost)}"},
        {"metric": "answers duplicated", "model": "-", "value": len(tags) - len(set(tags))},
        {"metric": "time to first token p50 / p95, ms", "model": "completed", "value": f"{pct(ttft, 0.5):.0f} / "
                                                                                      f"{pct(ttft, 0.95):.0f}"},
        {"metric": "aggregate tokens/s", "model": f"max_tokens {args.max_tokens}",
         "value": round(sum(e["tokens"] for e in ok) / wall, 1)},
    ]
    bound = [b + args.kv_cache_mb + args.rss_slack_mb for b in baseline]
    over = [r for r, (m, b) in enumerate(zip(rss.peak_mb, bound)) if m > b]
    rows.append({"metric": "stage RSS during the load, MB: baseline -> peak (bound)", "model": "per stage",
                 "value": ", ".join(f"{b:.0f} -> {m:.0f} ({c:.0f})" for b, m, c in zip(baseline, rss.peak_mb, bound))})
    write_report("serve", rows, {"cpu_count": os.cpu_count(), "stage_peak_rss_mb": peaks,
                                 "stage_baseline_rss_mb": baseline, "stage_load_peak_rss_mb": rss.peak_mb,
                                 "rss_slack_mb": args.rss_slack_mb,
                                 "max_active": args.max_active, "max_waiting": args.max_waiting,
                                 "kv_cache_mb": args.kv_cache_mb, "lost": lost[:5]})
    if over:
        print(f"FAIL: stage(s) {over} went over baseline + kv_cache_mb={args.kv_cache_mb:g} + "
              f"rss_slack_mb={args.rss_slack_mb:g}")
    return 1 if lost or len(tags) != len(set(tags)) or over else 0
