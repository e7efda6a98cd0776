"""``python -m smolcluster.bench replicas``: the chat's ``replicas=2`` (2 pipelines of 2 stages) against
``replicas=1`` (one pipeline of 2 stages), behind one head, at ``--requests`` concurrent requests.

    sudo python -m smolcluster.bench replicas                                  # 4 nodes of 0.45 core, head 0.5, 3 rounds
    sudo python -m smolcluster.bench replicas --cpu 0.3 --rounds 1 --tokens 16   # a quick look

A Desk (bench/desk.py): a head and 4 nodes, each a network namespace on a ``--rate`` bridge, each node under a
CPU budget of ``--cpu`` cores, the head under ``--head-cpu`` (a machine of its own, which the budget's top weight
keeps from losing its share to other load on the box). Every node runs one stage (``python -m smolcluster.infer role=stage``, one
thread) of a random-init GPT-2 (``--layers`` blocks of ``--embd``) written as ``train`` writes a run: nodes 0, 1
are the first pipeline, nodes 2, 3 the second. In the head's namespace a driver (this module, ``--drive``)
builds the chat's sessions as ``python -m smolcluster.chat role=head replicas=R`` does (its config composed with
the nodes listed, replica r's stage i being node r*2+i), warms each replica with one request, then submits
``--requests`` greedy requests at once (``--prompt`` random tokens each, ``--tokens`` new tokens, EOS off).
tokens/s = tokens made / the time from the first submit to the last token. Each round measures replicas=1 (on
nodes 0, 1) and then replicas=2 (all four), fresh prompts each (so no prefix-cache hit helps either). The
reported ratio is the median round's; goal >= 1.8. Beside it, each run's (replicas=1 / replicas=2), over the
timed part: the head's CPU in cores; the rows a stage step carried (each stage's beacon; prefill chunks included);
the nodes' CPU ms per step and their CPU over their budget (``node_busy``); the host's busy share (1: the box itself
is full); and the share of CFS periods in which the stage nodes ran out of their budget (near 1: the stages' CPU is
what limits; far below it: something else, such as the head, is).

``decode_bound``, measured before the Desk starts: stage 0's decode-step CPU at a replica's rows (requests / 4:
4 stage nodes, every one busy) over one pipeline's (requests / 2: its 2 groups). When decoding dominates, every node
is busy and both run the same number of steps per token, so 2 replicas gain at most that much; a CPU's small
matmuls cost far less than twice as much at twice the rows in that range (docs/benchmarks.md, bench replicas).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smolcluster.errors import ConfigError

PORT = 5710
# A decode step here takes milliseconds, and stages hand steps to each other: with the Desk's 100 ms period a node
# of 0.3 core runs 30 ms and then stops for 70, stalling its pipeline's other stage with it, where a slower machine
# would run on, only slower. A 10 ms period keeps a budget close to a slower CPU at this timescale.
PERIOD_US = 10_000
NODES = ("n0", "n1", "n2", "n3")


def stage_cmd(run: Path, rank: int, ips: list[str]) -> list[str]:
    """One node's stage: ``rank`` of the 2-stage pipeline on nodes ``ips``."""
    return [sys.executable, "-u", "-m", "smolcluster.infer", "role=stage", f"rank={rank}", "stages=2",
            f"checkpoint={run}", f"++cluster.nodes={nodes_override(ips)}", f"cluster.port={PORT}",
            "++cluster.bind=0.0.0.0", "cluster.insecure=true", "cluster.connect_timeout_s=600"]


def nodes_override(ips: list[str]) -> str:
    return "[" + ",".join(f"{{host:'{ip}'}}" for ip in ips) + "]"


def drive(args: argparse.Namespace) -> dict:
    """In the head's namespace: the chat's sessions on ``args.replicas`` pipelines, warmed, then the timed load."""
    import torch
    from hydra import compose, initialize_config_dir

    from smolcluster.paths import CONFIG_DIR
    from smolcluster.serving.config import sessions_from_config
    from smolcluster.serving.sessions import Settings
    from smolcluster.serving.settings import chat_settings

    ips = args.ips.split(",")[:2 * args.replicas]
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("chat", overrides=[
            f"checkpoint={args.run}", "role=head", f"replicas={args.replicas}", "stages=2", f"head_host={args.head}",
            f"++cluster.nodes={nodes_override(ips)}", f"cluster.port={PORT}", "cluster.connect_timeout_s=600",
            f"serve.max_active={args.requests}", "logging.level=WARNING"])
    sessions = sessions_from_config(chat_settings(cfg))
    gen = torch.Generator().manual_seed(args.seed)
    settings = Settings(max_new_tokens=args.tokens, stop_at_eos=False)  # greedy: the default

    def run(n: int) -> tuple[float, list]:
        prompts = [torch.randint(1, 500, (args.prompt,), generator=gen).tolist() for _ in range(n)]
        t0 = time.perf_counter()
        gens = [sessions.submit(p, user=f"u{i}", settings=settings) for i, p in enumerate(prompts)]
        for g in gens:
            if not g.wait(1800) or g.finish_reason != "length" or g.completion_tokens != args.tokens:
                raise ConfigError(f"a request did not finish: {g.finish_reason} {g.error}")
        return max(g.finished_at for g in gens) - t0, gens

    try:
        run(args.replicas)  # warm-up: one request per replica (first-call allocations, page faults)
        served = [r.served for r in sessions.replicas]
        steps0 = stage_steps(sessions)
        cpu0 = time.process_time()
        print("MARK", flush=True)  # the timed part: the bench reads the nodes' CPU groups and the host's CPU here
        seconds, _ = run(args.requests)
        print("MARK", flush=True)
        head_cores = (time.process_time() - cpu0) / seconds  # is the head (sessions + clients) what limits?
        per_replica = [r.served - s for r, s in zip(sessions.replicas, served)]
        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(steps0, stage_steps(sessions))]
    finally:
        sessions.close()
    return {"replicas": args.replicas, "seconds": round(seconds, 3),
            "tokens_per_s": round(args.requests * args.tokens / seconds, 2), "requests_per_replica": per_replica,
            "head_cores": round(head_cores, 2), "steps": sum(s for s, _ in steps),
            "rows_per_step": round(sum(r for _, r in steps) / max(1, sum(s for s, _ in steps)), 1)}


def stage_steps(sessions, timeout_s: float = 10.0) -> list[tuple[int, int]]:
    """Every stage's (forwards, rows) so far, as its beacon says once it has no request left (a beacon rides the
    next heartbeat, so this waits for one that shows the stage idle)."""
    deadline = time.monotonic() + timeout_s
    while True:
        infos = [r.pipe.client.mesh.peers[s].info for r in sessions.replicas for s in r.pipe.client.stages]
        if all(i.get("requests") == 0 for i in infos) or time.monotonic() > deadline:
            return [(int(i.get("steps", 0)), int(i.get("rows", 0))) for i in infos]
        time.sleep(0.05)


def step_cost(run: Path, rows: list[int], context: int, repeats: int = 60) -> dict[int, float]:
    """CPU ms (median, one thread) of stage 0's decode step (embedding, its blocks, LM head, greedy picks) at each
    of ``rows`` requests with ``context`` cached positions: the stage code a node runs, without its messages. Why:
    at ``--requests`` N a replica's stage steps carry N / 4 rows and one pipeline's N / 2 (2 groups per 2-stage
    ring), so cost(N / 2) / cost(N / 4) is what 2 replicas can gain over one at most when decoding dominates."""
    import torch

    from smolcluster.pipeline.architectures import KVCache, family_for
    from smolcluster.pipeline.architectures.base import Batch, pin_attributes
    from smolcluster.pipeline.weights import gpt2_config, load_stage

    torch.set_num_threads(1)
    weights = run / "checkpoint.safetensors"
    config = gpt2_config(weights, n_head=4)  # (write_tiny_run's heads)
    spec = family_for(config).plan(2, None, head_first=True)[0]
    stage = load_stage(weights, config, spec.blocks, embed=True, head=True)
    pin_attributes(stage)
    with torch.inference_mode():
        caches = {n: [KVCache(len(spec.blocks), context + 1) for _ in range(n)] for n in rows}
        for c in (c for cs in caches.values() for c in cs):
            stage.run_blocks(stage.embed(torch.randint(0, 500, (1, context)), 0), c)
        times: dict[int, list[float]] = {n: [] for n in rows}
        for _ in range(repeats):  # the row counts in turn, so that other load on the box weighs on each alike
            for n in rows:
                for c in caches[n]:
                    c.length = context
                batch = Batch(caches[n], [1] * n)
                t0 = time.thread_time()
                x = stage.run_blocks(stage.embed(torch.randint(0, 500, (1, n)), batch.positions()), batch)
                stage.logits(x).float()[0].argmax(-1).tolist()
                times[n].append(time.thread_time() - t0)
    # the fastest fifth: steps that other load on the box did not interrupt or evict from the caches
    return {n: round(statistics.quantiles(t, n=5)[0] * 1000, 2) for n, t in times.items()}


def cpu_counts(desk, nodes) -> tuple[int, int, int, float, float]:
    """``nodes``' CPU groups so far: (CFS periods, periods the quota ran out, CPU microseconds their processes
    used), and the host's (busy, all) CPU ticks from /proc/stat (is the box itself full, so that no node can reach
    its budget?)."""
    stats = [dict(line.split() for line in (desk.groups[n] / "cpu.stat").read_text().splitlines()) for n in nodes]
    pids = [p for n in nodes for p in (desk.groups[n] / "cgroup.procs").read_text().split()]
    host = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = host[3] + host[4]  # idle + iowait
    return (sum(int(x["nr_periods"]) for x in stats), sum(int(x["nr_throttled"]) for x in stats),
            sum(process_usec(p) for p in pids), sum(host) - idle, sum(host))


def process_usec(pid: str) -> int:
    """A process's CPU time (every thread, user + system), in microseconds; 0 once it is gone. (cgroup v1's cpu
    group counts no usage: that is cpuacct's, a hierarchy the Desk does not use.)"""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return (int(fields[11]) + int(fields[12])) * 1_000_000 // os.sysconf("SC_CLK_TCK")  # utime + stime


def run_driver(desk, args: argparse.Namespace, run: Path, replicas: int, seed: int) -> dict:
    """One driver in the head's namespace; the nodes' and the host's CPU counted over its timed part (its MARKs)."""
    cmd = [*desk.exec("head"), sys.executable, "-u", "-m", "smolcluster.bench.replicas", "--drive",
           f"--run={run}", f"--replicas={replicas}", f"--ips={','.join(desk.ip[n] for n in NODES)}",
           f"--head={desk.ip['head']}", f"--requests={args.requests}", f"--prompt={args.prompt}",
           f"--tokens={args.tokens}", f"--seed={seed}"]
    used = NODES[:2 * replicas]
    marks, lines = [], []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # (the driver's own timeouts end it: every wait in it has one)
            if line.startswith("MARK"):
                marks.append(cpu_counts(desk, used))
            lines.append(line)
    result = next((x for x in lines if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None or len(marks) != 2:
        raise ConfigError(f"the driver failed (exit {proc.returncode}):\n{''.join(lines)[-3000:]}")
    out = json.loads(result[len("RESULT "):])
    periods, hits, usec, host_busy, host_all = (b - a for a, b in zip(*marks))
    steps = out.pop("steps")
    return {**out, "at_budget": round(hits / max(1, periods), 2),
            "node_busy": round(usec / 1e6 / (args.cpu * len(used) * out["seconds"]), 2),
            "cpu_ms_per_step": round(usec / 1e3 / max(1, steps), 2), "host_busy": round(host_busy / host_all, 2)}


def measure(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict]:
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.bench.desk import Desk

    run = write_tiny_run(tmp / "run", 256, vocab=500, n_layer=args.layers, n_embd=args.embd)
    # Before the Desk starts (this process, quiet of the nodes): a replica's step (N / 4 rows) against a pipeline's
    # (N / 2), at the decode's middle context.
    small, large = max(1, args.requests // 4), max(1, args.requests // 2)
    cost = step_cost(run, [small, large], min(250, args.prompt + args.tokens // 2))
    print(json.dumps({"step_cpu_ms": cost, "decode_bound": round(cost[large] / cost[small], 2)}), flush=True)
    cpus = {**{n: args.cpu for n in NODES}, **({"head": args.head_cpu} if args.head_cpu else {})}
    desk = Desk(["head", *NODES], rate=args.rate, cpus=cpus).build()
    for host, cores in cpus.items():  # a finer CFS period than the Desk's 100 ms (see PERIOD_US)
        period = max(PERIOD_US, int(1000 / cores) + 1)  # (the kernel's smallest quota is 1 ms)
        (desk.groups[host] / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
        (desk.groups[host] / "cpu.cfs_period_us").write_text(str(period))
    procs = []
    try:
        ips = [desk.ip[n] for n in NODES]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SMOLCLUSTER_LOG_LEVEL": "WARNING"}  # one core or less
        for i, n in enumerate(NODES):
            log = open(tmp / f"{n}.log", "w")  # noqa: SIM115 (the stage writes it until it is stopped)
            pair = ips[i - i % 2:i - i % 2 + 2]
            procs.append(subprocess.Popen([*desk.exec(n), *stage_cmd(run, i % 2, pair)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True))
        rows = []
        for r in range(args.rounds):
            one = run_driver(desk, args, run, 1, seed=2 * r)
            two = run_driver(desk, args, run, 2, seed=2 * r + 1)
            rows.append({"round": r, "one_tokens_per_s": one["tokens_per_s"], "two_tokens_per_s": two["tokens_per_s"],
                         "ratio": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
                         "two_requests_per_replica": two["requests_per_replica"],
                         "head_cores": f"{one['head_cores']} / {two['head_cores']}",
                         "rows_per_step": f"{one['rows_per_step']} / {two['rows_per_step']}",
                         "cpu_ms_per_step": f"{one['cpu_ms_per_step']} / {two['cpu_ms_per_step']}",
                         "node_busy": f"{one['node_busy']} / {two['node_busy']}",
                         "host_busy": f"{one['host_busy']} / {two['host_busy']}",
                         "stages_at_budget": f"{one['at_budget']} / {two['at_budget']}"})
            print(json.dumps(rows[-1]), flush=True)
        return rows, cost
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 15)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        desk.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", type=float, default=0.45, help="cores per node (cgroup cfs quota)")
    p.add_argument("--head-cpu", type=float, default=0.5, help="the head's cores (its own machine; 0: no budget, "
                   "so it competes with whatever else runs)")
    p.add_argument("--rate", default="1gbit", help="every link's tbf rate")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests (serve.max_active too)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of each request")
    p.add_argument("--tokens", type=int, default=32, help="new tokens of each request")
    p.add_argument("--layers", type=int, default=4, help="GPT-2 blocks (2 per stage at 4)")
    p.add_argument("--embd", type=int, default=512, help="GPT-2 width")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)  # (the head namespace's driver)
    for hidden in ("--run", "--ips", "--head"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.drive:
        print("RESULT " + json.dumps(drive(args)), flush=True)
        return 0
    from smolcluster.bench.desk import cgroup_unavailable
    from smolcluster.testing.netns import netns_unavailable

    why = netns_unavailable(shaping=True) or cgroup_unavailable()
    if why:
        raise ConfigError(f"bench replicas: {why}")
    from smolcluster.bench.report import write_report

    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-replicas-") as d:
        rows, cost = measure(args, Path(d))
    ratio = statistics.median(r["ratio"] for r in rows)
    small, large = min(cost), max(cost)
    write_report("replicas", rows, {"setup": f"4 nodes x {args.cpu} core, head {args.head_cpu or 'unbudgeted'}, "
                                              f"{args.rate}, {args.requests} requests of "
                                              f"{args.prompt}+{args.tokens} tokens, GPT-2 {args.layers}x{args.embd}",
                                    "step_cpu_ms": f"{cost[small]} at {small} rows (a replica's), {cost[large]} at "
                                                   f"{large} (one pipeline's)",
                                    "decode_bound": round(cost[large] / cost[small], 2),
                                    "median_ratio": ratio, "goal": "ratio >= 1.8", "met": ratio >= 1.8})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
