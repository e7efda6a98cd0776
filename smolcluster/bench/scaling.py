"""``python -m smolcluster.bench scaling``: how each data-parallel algorithm scales on a real (shaped) LAN.

Every node runs in its own network namespace on a bridge (:mod:`smolcluster.testing.netns`), each link shaped
with ``tc ... tbf`` to the rate of a home LAN, both ways. For each link rate, model and worker count we run
``syncps``, ``edp`` (server in its own namespace), ``allreduce``, ``allreduce algo.zero=1`` and PyTorch DDP
(gloo, one process per namespace, the script below) and report:

- samples/s over the steady state (the first ``--warmup`` steps excluded), from the run's metrics.jsonl;
- bytes sent per step by the busiest node (the server for syncps/edp, rank 0 for a ring; for DDP its
  namespace's eth0 TX counter, so that one includes TCP/IP headers) and the formula's figure:
  N x M (a server sends every worker a weight copy) or 2(N-1)/N x M (ring), M = the fp32 gradient's bytes;
- scaling efficiency: samples/s at N over N x samples/s of the same algorithm with one worker on that link;
- the ratios issue 14 asks for: allreduce / DDP at the most workers on each link, allreduce / syncps there
  on the slowest link.

Every process runs with one intra-op thread (``OMP_NUM_THREADS=1``): with 4 workers on a 2-core machine the
workers are CPU-starved anyway; the per-worker batches are small so that at 100 Mbit/s the link, not the
compute, sets the step time. Needs root, iproute2 and tc. Writes bench-scaling.json and a PNG plot.

``--cpu C --speeds 1,1,2,4`` make it an emulated desk (:mod:`smolcluster.bench.desk`): worker r runs under a CPU
budget of C x speeds[r mod len] cores (a cgroup v1 cfs quota), so one worker and N workers get the same compute
per node, and unlike speeds emulate unlike machines. ``diloco`` and ``streaming`` (F=4, tau=1) sync every
``INNER_STEPS`` steps, ``timed`` every ``ROUND_S`` seconds (``algo.round_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from smolcluster.bench.desk import Desk, cgroup_unavailable
from smolcluster.bench.report import write_report
from smolcluster.testing.netns import Lan, netns_unavailable, parse_rate

PORT = 5555
MODELS = {
    "mlp": ["model=mlp", "data=mnist", "data.root={root}", "train.batch_size=64"],
    "gpt2-tiny": ["model=gpt2-tiny", "data=text", "data.path={text}", "train.batch_size=8",
                  "train.optimizer=adamw", "train.lr=1e-3"],
    # a Llama (RMSNorm, RoPE, GQA, SwiGLU) of 12.6M parameters: big enough that a sync costs seconds on a home link
    "llama-tiny": ["model=llama-tiny", "model.n_embd=384", "model.n_layer=6", "model.n_head=6", "model.n_kv_head=2",
                   "model.intermediate_size=1024", "data=text", "data.path={text}", "train.batch_size=8",
                   "train.optimizer=adamw", "train.lr=1e-3"],
}
STEPS = {"mlp": 100, "gpt2-tiny": 20, "llama-tiny": 10}
ALGOS = {  # name -> (algo overrides, has a server)
    "syncps": (["algo=syncps"], True),
    "edp": (["algo=edp"], True),
    "allreduce": (["algo=allreduce"], False),
    "zero1": (["algo=allreduce", "algo.zero=1"], False),
    "ddp": ([], False),
    "diloco": (["algo=diloco", "algo.inner_steps={h}"], False),
    "streaming": (["algo=diloco", "algo.inner_steps={h}", "algo.fragments=4", "algo.overlap_steps=1",
                   "algo.merge_alpha=0.5"], False),
    "timed": (["algo=diloco", "algo.round_s={t}"], False),  # rounds of ROUND_S seconds (unlike machines)
}
INNER_STEPS = 10  # diloco's H here: several outer syncs within a benchmark's steps
ROUND_S = 0.25  # timed's rounds
RINGS = ("allreduce", "diloco", "streaming", "timed")  # a ring of one is training alone: algo=local


def overrides_of(model: str, args: argparse.Namespace) -> list[str]:
    return [o.format(root=args.root, text=args.text) for o in MODELS[model]]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH")]))}


# Runs a command and writes its peak RSS (KiB) to a file. A child's ``ru_maxrss`` counts the memory of the
# process that spawned it (Linux carries the old address space's high-water mark across exec), so a worker
# started straight from this torch-importing bench would read at least the bench's own size. Spawned from
# this bare interpreter (-S: no site, a few MB) instead, ``wait4`` gives the worker's own peak.
PEAK_RSS = """import os, signal, sys
got = []  # a signal before the spawn returns: passed on once there is a child
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda n, f: os.kill(pid, n) if "pid" in globals() else got.append(n))
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
for n in got:
    os.kill(pid, n)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))"""


def measured(cmd: list[str], peak_file: Path) -> list[str]:
    """``cmd`` run so that its peak RSS lands in ``peak_file`` (read by :func:`wait_all`)."""
    return [sys.executable, "-S", "-c", PEAK_RSS, str(peak_file), *cmd]


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float,
             on_tick=None, stop_after_s: float | None = None) -> dict[str, float]:
    """Wait for every process to exit 0 (``on_tick()`` between polls); each one's peak RSS in MB where it
    was started by :func:`measured` (``LOG.peak`` beside its log). ``stop_after_s``: a time budget, after which
    every process is stopped (SIGTERM) and the run counts as cut short, not failed."""
    deadline = time.monotonic() + timeout
    stop_at = None if stop_after_s is None else time.monotonic() + stop_after_s
    try:
        for host, p in procs.items():
            while p.poll() is None:
                if stop_at is not None and time.monotonic() > stop_at:
                    return {}  # (the finally below stops them all)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{host} still running after {timeout:.0f}s:\n{logs[host].read_text()[-3000:]}")
                if on_tick:
                    on_tick()
                time.sleep(0.1)
            if p.returncode != 0:
                raise RuntimeError(f"{host} exited {p.returncode}:\n{logs[host].read_text()[-3000:]}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()  # the PEAK_RSS wrapper passes it on; a kill would orphan the worker
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
    peaks = {h: logs[h].with_suffix(".peak") for h in procs}
    return {h: int(f.read_text()) / 1024 for h, f in peaks.items() if f.is_file()}


def steady(rows: list[dict], warmup: int, last_step: int | None = None) -> tuple[float, float]:
    """(samples/s, bytes sent per sample) between the first row at or past ``warmup`` and the last one (at or
    before ``last_step``)."""
    rows = [r for r in rows if "samples" in r and (last_step is None or r["step"] <= last_step)]
    first = next(r for r in rows if r["step"] >= warmup)
    last = rows[-1]
    samples = last["samples"] - first["samples"]
    sent = last.get("bytes_sent", 0) - first.get("bytes_sent", 0)  # (algo=local sends nothing)
    return samples / (last["time"] - first["time"]), sent / samples


def run_smolcluster(lan: Lan, algo: str, n: int, model_args: list[str], steps: int, warmup: int,
                    batch: int, run_dir: Path, extra_args: tuple[str, ...] = (), port: int = PORT,
                    on_tick=None, timeout: float = 900, stop_after_s: float | None = None) -> dict:
    """One run of ``algo`` on ``lan``'s hosts (``extra_args`` last, so they win); its steady-state figures,
    metrics rows, summary and each process's peak RSS. ``on_tick`` runs while it waits. A run stopped at
    ``stop_after_s`` has ``stopped`` set, the rows it wrote, and no summary."""
    algo_args, has_server = ALGOS[algo]
    algo_args = [a.format(h=INNER_STEPS, t=ROUND_S) for a in algo_args]
    if algo in RINGS and n == 1:
        algo_args = ["algo=local"]  # a ring of one is training alone (and RingLink needs a peer)
    workers = [f"w{r}" for r in range(n)]
    nodes = ", ".join(f"{{name: {h}, host: '{lan.ip[h]}'}}" for h in workers)
    # EDP applies one worker's batch per update: N x steps updates train on as many samples as the others
    total = steps * n if algo == "edp" else steps
    extra = [f"algo.min_workers={n}"] if algo == "edp" else []
    common = [sys.executable, "-m", "smolcluster.train", *algo_args, *model_args, *extra,
              f"cluster.workers={n}", f"cluster.nodes=[{nodes}]", f"cluster.port={port}", "cluster.bind=0.0.0.0",
              "cluster.insecure=true", f"cluster.host='{lan.ip['srv']}'", "cluster.connect_timeout_s=120",
              f"train.steps={total}", f"train.log_every={1 if algo != 'edp' else n}", "train.eval_every=0",
              "train.eval_samples=64", "train.progress=false", "logging.level=WARNING", "run_id=scaling",
              f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", *extra_args]
    roles = {h: ["role=worker", f"rank={r}"] for r, h in enumerate(workers)}
    if has_server:
        roles = {"srv": ["role=server"], **roles}
    run_dir.mkdir(parents=True)
    logs = {h: run_dir / f"{h}.out" for h in roles}
    procs = {h: subprocess.Popen(measured([*lan.exec(h), *common, *args], logs[h].with_suffix(".peak")),
                                 stdout=logs[h].open("w"), stderr=subprocess.STDOUT,
                                 env={**env(), "SMOLCLUSTER_NODE": h}) for h, args in roles.items()}
    peaks = wait_all(procs, logs, timeout, on_tick, stop_after_s)
    rows = read_rows(run_dir / "metrics.jsonl")
    done = (run_dir / "summary.json").is_file()
    if not done:  # stopped at its time budget: the figures of the rows it wrote
        return {"stopped": True, "rows": rows, "summary": {}, "peak_rss_mb": peaks,
                "params": next((r["params"] for r in rows if "params" in r), None)}
    rate, bytes_per_sample = steady(rows, warmup * (n if algo == "edp" else 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"samples_per_s": rate, "bytes_per_step": bytes_per_sample * batch * n,
            "params": summary.get("num_params") or summary.get("params"),
            "seconds_per_step": summary.get("seconds_per_step"),  # a ring's rank 0: where its step time went
            "rows": rows, "summary": summary, "peak_rss_mb": peaks, "stopped": False}


def read_rows(path: Path) -> list[dict]:
    """A JSON-lines file's whole lines (a writer stopped mid-line leaves a partial last one), [] if absent."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(x) for x in lines if x.strip()]


def run_ddp(lan: Lan, n: int, model_args: list[str], steps: int, warmup: int, run_dir: Path,
            eval_every: int = 0, eval_samples: int = 64, stop_after_s: float | None = None,
            timeout: float = 900, trainer_optimizer: bool = False) -> dict:
    """One DDP-gloo run on ``lan``'s hosts: rank 0's steady figures (absent if stopped at ``stop_after_s``) and
    ``rows``, metrics-like rows (step, time, samples, bytes_sent, eval_loss) every ``eval_every`` steps."""
    run_dir.mkdir(parents=True)
    out, rows = run_dir / "ddp.json", run_dir / "metrics.jsonl"
    procs, logs = {}, {}
    ifname = "eth0" if n > 1 and isinstance(lan, Lan) else "lo"  # (hosts on loopback: bench desk's fallback)
    for r in range(n):
        host = f"w{r}"
        logs[host] = run_dir / f"{host}.out"
        spec = json.dumps({"rank": r, "world": n, "master": lan.ip["w0"], "port": PORT, "overrides": model_args,
                           "steps": steps, "warmup": warmup, "out": str(out), "rows": str(rows),
                           "eval_every": eval_every, "eval_samples": eval_samples, "ifname": ifname,
                           "trainer_optimizer": trainer_optimizer})
        procs[host] = subprocess.Popen([*lan.exec(host), sys.executable, "-m", "smolcluster.bench.scaling", spec],
                                       stdout=logs[host].open("w"), stderr=subprocess.STDOUT,
                                       env={**env(), "GLOO_SOCKET_IFNAME": ifname})
    wait_all(procs, logs, timeout, stop_after_s=stop_after_s)
    got = json.loads(out.read_text()) if out.is_file() else {"stopped": True}
    return {"stopped": False, **got, "rows": read_rows(rows)}


def ddp_rank(spec: dict) -> None:
    """One DDP-gloo rank inside its namespace (``python -m smolcluster.bench.scaling SPEC_JSON``): the same
    model, data slice and optimizer as ``bench ddp``; rank 0 reports samples/s and its eth0 TX bytes per step,
    and every ``eval_every`` steps appends a row (with its eval loss) to ``rows``."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from smolcluster.bench.common import compose_config
    from smolcluster.objective import loss_fn
    from smolcluster.trainer import Trainer

    rank, world, steps, warmup = spec["rank"], spec["world"], spec["steps"], spec["warmup"]
    os.environ.update(MASTER_ADDR=spec["master"] if world > 1 else "127.0.0.1", MASTER_PORT=str(spec["port"]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = compose_config([*spec["overrides"], f"train.steps={steps}",  # (the lr schedule's length)
                          f"train.eval_samples={spec.get('eval_samples', 64)}"])
    # trainer_optimizer: the runs' own optimizer and schedule (train.*), stepped on the gradients DDP averaged
    # into the trainer's flat buffer (copied into the existing .grad views), so its loss curve compares with ours
    own = bool(spec.get("trainer_optimizer"))
    trainer = Trainer(cfg, [cfg.train.batch_size] * world, with_optimizer=own)
    model = DistributedDataParallel(trainer.model)
    opt = trainer.optimizer if own else torch.optim.SGD(model.parameters(), lr=0.01) \
        if cfg.train.optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=1e-3)
    tx = Path(f"/sys/class/net/{spec.get('ifname', 'eth0')}/statistics/tx_bytes")
    every, start, sent_start = spec.get("eval_every", 0), time.perf_counter(), int(tx.read_text())
    for step in range(steps):
        if step == warmup:
            dist.barrier()
            t0, sent0 = time.perf_counter(), int(tx.read_text())
        x, y = trainer.batch(step, rank)
        trainer.flat.zero_grad() if own else opt.zero_grad()
        loss_fn(model, x, y).backward()
        trainer.apply_gradients() if own else opt.step()
        if rank == 0 and every and ((step + 1) % every == 0 or step + 1 == steps):
            row = {"step": step + 1, "samples": (step + 1) * cfg.train.batch_size * world,
                   "bytes_sent": int(tx.read_text()) - sent_start, **trainer.evaluate(),
                   "time": time.perf_counter() - start, "params": trainer.num_params}
            with open(spec["rows"], "a") as f:  # a line at a time: a run stopped at its budget keeps its rows
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    elapsed, sent = time.perf_counter() - t0, int(tx.read_text()) - sent0
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({
            "samples_per_s": (steps - warmup) * cfg.train.batch_size * world / elapsed,
            "bytes_per_step": sent / (steps - warmup), "params": trainer.num_params}))
    dist.destroy_process_group()


def formula(algo: str, n: int, m: int) -> float:
    if algo in ("syncps", "edp"):
        return n * m  # the server sends each worker a copy of the weights
    if algo in ("diloco", "streaming", "timed"):
        return 2 * (n - 1) / n * m / INNER_STEPS  # the ring's, once a round (timed: as many steps as fit in one)
    return 2 * (n - 1) / n * m  # ring (and gloo's ring all-reduce): reduce-scatter + all-gather


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(len(models), len(links), figsize=(5 * len(links), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, link in enumerate(links):
            ax = axes[i][j]
            for algo in dict.fromkeys(r["algo"] for r in rows):
                pts = sorted((r["workers"], r["samples_per_s"]) for r in rows
                             if r["model"] == model and r["link"] == link and r["algo"] == algo)
                if pts:  # one colour per algorithm in every panel
                    ax.plot(*zip(*pts), marker="o", label=algo, color=f"C{list(ALGOS).index(algo)}")
            ax.set_title(f"{model}, {link} links")
            ax.set_xlabel("workers")
            ax.set_ylabel("samples/s")
            ax.set_ylim(bottom=0)  # differences in proportion to the rates
            ax.set_xticks(sorted({r["workers"] for r in rows}))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.set_visible(False)  # this model was not run on this link
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def budgets(args: argparse.Namespace, n: int) -> dict[str, float]:
    """Host -> cores (the server gets one unit); empty without ``--cpu``."""
    if not args.cpu and not args.speeds:
        return {}
    speeds = [float(x) for x in (args.speeds or "1").split(",")]
    unit = args.cpu or 0.45
    return {"srv": unit, **{f"w{r}": unit * speeds[r % len(speeds)] for r in range(n)}}


def measure(args, base: Path, models: list[str], links: list[str], algos: list[str], counts: list[int]
            ) -> list[dict]:
    """Every (link, model, algo, workers) run on one emulated desk per link: a row each, printed as it ends."""
    rows: list[dict] = []
    for link in links:
        lan = Desk(["srv", *(f"w{r}" for r in range(max(counts)))], rate=link, cpus=budgets(args, max(counts))).build()
        try:
            for model in models:
                model_args = overrides_of(model, args)
                batch = int(next(o.split("=")[1] for o in model_args if o.startswith("train.batch_size=")))
                steps = args.steps or STEPS[model]
                warmup = max(2, steps // 4)
                one: dict[str, float] = {}
                for n in counts:
                    for algo in algos:
                        if algo == "zero1" and n == 1:
                            continue  # nothing to shard: its baseline is allreduce's
                        run_dir = base / f"{link}-{model}-{algo}-{n}"
                        t0 = time.monotonic()
                        got = run_ddp(lan, n, model_args, steps, warmup, run_dir) if algo == "ddp" else \
                            run_smolcluster(lan, algo, n, model_args, steps, warmup, batch, run_dir)
                        m = 4 * int(got["params"])
                        if n == 1:
                            one[algo] = got["samples_per_s"]
                        base_rate = one.get(algo) or one.get("allreduce" if algo == "zero1" else algo)
                        row = {"link": link, "model": model, "algo": algo, "workers": n,
                               "samples_per_s": round(got["samples_per_s"], 1),
                               "MB_sent_per_node_step": round(got["bytes_per_step"] / 1e6, 3),
                               "formula_MB": round(formula(algo, n, m) / 1e6, 3),
                               "bytes_vs_formula": round(got["bytes_per_step"] / formula(algo, n, m), 3) if n > 1 else None,
                               "efficiency": round(got["samples_per_s"] / (n * base_rate), 3) if base_rate else None,
                               "run_s": round(time.monotonic() - t0, 1)}
                        if got.get("seconds_per_step"):  # a ring's rank 0: where a step went, in seconds
                            t = got["seconds_per_step"]
                            row["rank0_step"] = (f"compute {t['compute']:.3f}, ring {t['ring']:.3f} (not hidden "
                                                 f"{t['ring_not_hidden']:.3f}), optimizer {t['optimizer']:.3f}")
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            lan.close()
    return rows


def allreduce_ratios(rows: list[dict], models: list[str], links: list[str], counts: list[int]) -> dict:
    """allreduce's samples/s over ddp's and syncps's at every worker count above one (the goals are at 4)."""
    def rate(link, model, algo, n):
        return next((r["samples_per_s"] for r in rows if (r["link"], r["model"], r["algo"], r["workers"])
                     == (link, model, algo, n)), None)

    ratios = {}
    for model in models:
        for link in links:
            for n in (c for c in counts if c > 1):
                a = rate(link, model, "allreduce", n)
                for other in ("ddp", "syncps"):
                    o = rate(link, model, other, n)
                    if a and o:
                        ratios[f"{model} allreduce/{other} at {n} workers, {link}"] = round(a / o, 3)
    return ratios


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2-tiny,mlp")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--links", default="1gbit,100mbit", help="tbf rates, e.g. 1gbit,100mbit")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"any of {', '.join(ALGOS)}")
    p.add_argument("--speeds", default=None,
                   help="CPU budgets in proportion, worker r gets speeds[r mod len] x --cpu cores, e.g. 1,1,2,4")
    p.add_argument("--cpu", type=float, default=None,
                   help="cores per unit of speed (cgroup v1 cfs quota), e.g. 0.45; default: no budget")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per run (default: " + ", ".join(f"{k} {v}" for k, v in STEPS.items()) + ")")
    shared = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", "../shared/data"))
    p.add_argument("--root", default=str(shared / "mnist"), help="MNIST IDX directory")
    p.add_argument("--text", default=str(shared / "tinyshakespeare" / "input.txt"))
    p.add_argument("--plot", default="bench-scaling.png")
    p.add_argument("--keep", default=None, help="keep every run's directory under this path")
    args = p.parse_args(argv)
    args.root, args.text = str(Path(args.root).resolve()), str(Path(args.text).resolve())  # the runs' cwd differs
    models, links = args.models.split(","), args.links.split(",")
    algos, counts = args.algos.split(","), sorted(int(x) for x in args.workers.split(","))
    for name, known in (("model", MODELS), ("algo", ALGOS)):
        bad = [x for x in (models if name == "model" else algos) if x not in known]
        if bad:
            p.error(f"unknown {name} {bad}: choose from {', '.join(known)}")
    for link in links:
        try:
            parse_rate(link)
        except ValueError as e:
            p.error(str(e))
    reason = netns_unavailable(shaping=True) or ((args.cpu or args.speeds) and cgroup_unavailable())
    if reason:
        print(f"error: bench scaling {reason}", file=sys.stderr)
        return 2

    import tempfile
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the runs and removes the LAN
    base = Path(args.keep or tempfile.mkdtemp(prefix="scaling-"))
    started = time.monotonic()
    rows = measure(args, base, models, links, algos, counts)
    ratios = allreduce_ratios(rows, models, links, counts)
    png = plot(rows, Path(args.plot))
    write_report("scaling", rows, {"ratios": ratios, "goals": "allreduce >= 0.9x ddp at 4 workers on both links; "
                                   ">= 3x syncps at 4 workers on 100mbit; bytes within 10% of the formula",
                                   "cores": os.cpu_count(), "threads_per_process": 1, "plot": str(png),
                                   "wall_s": round(time.monotonic() - started, 1)})
    return 0


if __name__ == "__main__":  # one DDP rank, started by run_ddp inside a namespace
    ddp_rank(json.loads(sys.argv[1]))
