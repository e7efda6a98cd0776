"""Weights that travel: how fast the head fills two agents' caches over shaped links.

    sudo python -m smolcluster.bench weights                 # ~500 MB GPT-2-shaped model, 1 Gbit/s links
    sudo python -m smolcluster.bench weights --mb 60         # a quick look

Three hosts on a bridge (network namespaces, every link shaped with tbf to ``--rate`` both ways: testing/netns.py):
the head and two agents (``python -m smolcluster.node``) paired with it. ``infer cluster=auto
cluster.weights=send`` sends each of the two stages its share of a random-init model (``--mb`` of float32
weights), then generates one token; the head's own line ``weights: sent N bytes in all (... in T s ...)``
gives the bytes and the time from the first chunk to the last acknowledgement. Both agents are fed through
the head's one link, so the figure is the bytes per second of that link used: ``link_ratio`` = bits sent
per second / ``--rate`` (goal >= 0.8). A second run with the same weights must send 0 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smolcluster.bench.report import write_report
from smolcluster.errors import ConfigError
from smolcluster.testing.netns import Lan, netns_unavailable, parse_rate

PORT = 5660
AGENTS = ("a", "b")


def pair(tmp: Path) -> None:
    """The coordinator and both agents hold each other's keys, as confirming the pairing code on both does."""
    from smolcluster.node.pairing import AgentStore, Allowlist, identity, public_key

    coord = public_key(identity(tmp / "coord" / "coordinator" / "identity") / "client.key")
    store = AgentStore(tmp / "coord" / "coordinator")
    for n in AGENTS:
        Allowlist(tmp / n).add(coord)
        store.add(n, public_key(identity(tmp / n / "identity") / "server.key"))


def start_agents(lan: Lan, tmp: Path, procs: list[subprocess.Popen]) -> None:
    """Every agent in its namespace, appended to ``procs`` as it starts (the caller stops them, also when one
    fails to start); returns once each has written its ready file."""
    for n in AGENTS:
        log = open(tmp / f"{n}.log", "w")  # noqa: SIM115 (the agent writes it until it is stopped)
        procs.append(subprocess.Popen(
            [*lan.exec(n), sys.executable, "-u", "-m", "smolcluster.node", "--state-dir", str(tmp / n), "--name", n,
             "--port", str(PORT), "--bind", "0.0.0.0", "--ready-file", str(tmp / f"{n}.ready"), "--no-mdns"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 120
    for n, p in zip(AGENTS, procs, strict=True):
        while not (tmp / f"{n}.ready").is_file():
            if p.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"agent {n} did not start: {(tmp / f'{n}.log').read_text()[-2000:]}")
            time.sleep(0.1)


def head_run(lan: Lan, tmp: Path, model: Path) -> tuple[int, float, str]:
    """(bytes sent, seconds, the head's output) of one ``infer cluster=auto cluster.weights=send``."""
    peers = ",".join(f"{lan.ip[n]}:{PORT}" for n in AGENTS)
    out = subprocess.run(
        [*lan.exec("head"), sys.executable, "-u", "-m", "smolcluster.infer", "cluster=auto", "cluster.mdns=false",
         f"cluster.peers=[{peers}]", f"cluster.state_dir={tmp / 'coord'}", "cluster.weights=send",
         f"checkpoint={model}", "prompt=x", "max_new_tokens=1", "stop_at_eos=false"],
        capture_output=True, text=True, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = out.stdout + out.stderr
    m = re.search(r"weights: sent (\d+) bytes in all \(.* in ([\d.]+)s", text)
    if out.returncode != 0 or m is None:
        raise ConfigError(f"the head failed (exit {out.returncode}):\n{text[-3000:]}")
    return int(m.group(1)), float(m.group(2)), text


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=500, help="the model's float32 weights in MB (default 500)")
    p.add_argument("--rate", default="1gbit", help="every link's rate, both ways (default 1gbit)")
    args = p.parse_args(argv)
    why = netns_unavailable(shaping=True)
    if why:
        raise ConfigError(f"bench weights {why}")
    from smolcluster.bench.common import write_tiny_run

    n_embd = 1024 if args.mb >= 200 else 512  # a block: ~12.6M parameters (~50 MB) or ~3.1M (~12.6 MB)
    n_layer = max(2, round(args.mb * 1e6 / 4 / (12 * n_embd * n_embd)))  # (two stages need two blocks)
    lan, procs = Lan(["head", *AGENTS], rate=args.rate).build(), []
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-weights-") as d:
        tmp = Path(d)
        try:
            model = write_tiny_run(tmp / "model", 128, vocab=500, n_layer=n_layer, n_embd=n_embd)
            pair(tmp)
            start_agents(lan, tmp, procs)
            sent, took, _ = head_run(lan, tmp, model)
            again, _, _ = head_run(lan, tmp, model)
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):  # (one that already exited)
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            lan.close()
    bits_per_s = sent * 8 / took
    ratio = bits_per_s / parse_rate(args.rate)
    rows = [{"model_MB": round(sent / 1e6, 1), "layers": n_layer, "rate": args.rate, "seconds": round(took, 2),
             "MB_per_s": round(sent / 1e6 / took, 1), "link_ratio": round(ratio, 3), "second_run_bytes": again}]
    write_report("weights", rows, {"goal": "link_ratio >= 0.8 and 0 bytes on the second run",
                                   "met": ratio >= 0.8 and again == 0})
    return 0
