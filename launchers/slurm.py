"""One training run across the nodes of a Slurm allocation: an sbatch script with one task per role.

    python -m launchers.slurm script --cluster lan-example --run-dir /shared/runs/ring algo=allreduce > ring.sbatch
    sbatch ring.sbatch

``script`` writes a batch script: ``#SBATCH`` lines for as many tasks as the run has roles
(syncps/edp: a server + ``cluster.workers`` workers; allreduce: ``cluster.workers`` ranks;
mp: ``algo.stages`` stages), then one ``srun`` that starts ``python -m launchers.slurm task``
in every task. A task reads what Slurm tells it (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_JOB_ID``, and the allocation's host names, which the script puts in
``SMOLCLUSTER_HOSTS``), works out its role (task 0 the server for syncps/edp, else rank
``SLURM_PROCID``) and every rank's host (tasks are placed in blocks of ``--tasks-per-node``),
writes that cluster file into the run dir and execs ``python -m smolcluster.train`` with it.
The run dir and the working dir must be on a filesystem every node sees; mp's stage shards
are merged after the ``srun`` ends. Ports: ``cluster.port`` (rank r: port + r), else one
derived from the job id. For a sweep of one-node jobs use ``hydra/launcher=slurm``
(conf/hydra/launcher/slurm.yaml) instead.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launchers/slurm.py ...` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from launchers.ssh import RING_ALGOS, SERVER_ALGOS, compose_config  # noqa: E402
from smolcluster.errors import ConfigError  # noqa: E402
from smolcluster.launch.cli import command  # noqa: E402
from smolcluster.security import is_loopback  # noqa: E402
from smolcluster.train_settings import LaunchSpec  # noqa: E402


def roles(spec: LaunchSpec) -> list[tuple[str, int | None]]:
    """(role, rank) of task 0, 1, ...: syncps/edp's server first, else ring ranks / pipeline stages."""
    if spec.algo in SERVER_ALGOS:
        return [("server", None), *[("worker", r) for r in range(spec.cluster.workers)]]
    if spec.algo in RING_ALGOS:
        return [("worker", r) for r in range(spec.cluster.workers)]
    return [("stage", r) for r in range(spec.stages)]


def lead_task(spec: LaunchSpec) -> int:
    """The task that writes the run's files (.hydra/, summary.json): the server, ring rank 0, mp's last stage."""
    return len(roles(spec)) - 1 if spec.algo == "mp" else 0


def script(args: argparse.Namespace) -> str:
    spec, _ = compose_config(args.cluster, args.overrides)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)  # Slurm opens --output there before the script runs
    n = len(roles(spec))
    nodes = math.ceil(n / args.tasks_per_node)
    python = args.python or sys.executable
    task = [python, "-u", "-m", "launchers.slurm", "task", "--cluster", str(Path(args.cluster).resolve())
            if Path(args.cluster).is_file() else args.cluster, "--run-dir", args.run_dir,
            "--tasks-per-node", str(args.tasks_per_node), *args.overrides]
    sbatch = [f"--job-name=smolcluster-{spec.algo}", f"--nodes={nodes}", f"--ntasks={n}",
              f"--ntasks-per-node={args.tasks_per_node}", f"--cpus-per-task={args.cpus_per_task}",
              f"--time={args.time_min}", f"--output={args.run_dir}/slurm-%j.out"]
    sbatch += [f"--partition={args.partition}"] if args.partition else []
    sbatch += [f"--gpus-per-task={args.gpus_per_task}"] if args.gpus_per_task else []
    lines = ["#!/bin/bash", f"# {spec.algo}: {n} tasks ({', '.join(_label(r) for r in roles(spec))}), "
             f"written by python -m launchers.slurm script",
             *[f"#SBATCH {s}" for s in sbatch],
             "set -euo pipefail",
             f"cd {shlex.quote(str(Path(args.workdir).resolve()))}",
             "# every task's host, in task order (block placement): rank r finds its peers from this list",
             'export SMOLCLUSTER_HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)"',
             "export PYTHONUNBUFFERED=1",
             f"srun --kill-on-bad-exit=1 --distribution=block {shlex.join(task)}"]
    if spec.algo == "mp":  # each stage saved its shard into the shared run dir
        lines.append(f"{shlex.quote(python)} -m smolcluster.pipeline.merge {shlex.quote(args.run_dir)}")
    return "\n".join(lines) + "\n"


def _label(role: tuple[str, int | None]) -> str:
    return role[0] if role[1] is None else f"{role[0]} {role[1]}"


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.isdigit():
        raise ConfigError(f"${name} is {value!r}: `task` runs inside a Slurm job step (srun sets it)")
    return int(value)


def task_command(args: argparse.Namespace) -> list[str]:
    """This task's ``python -m smolcluster.train`` argv, after writing its cluster file into the run dir."""
    procid, ntasks, job = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), os.environ.get("SLURM_JOB_ID", "0")
    hosts = [h for h in os.environ.get("SMOLCLUSTER_HOSTS", "").split(",") if h]
    if not hosts:
        raise ConfigError("$SMOLCLUSTER_HOSTS is empty: the sbatch script sets it from $SLURM_JOB_NODELIST")
    spec, _ = compose_config(args.cluster, args.overrides)
    layout = roles(spec)
    if ntasks != len(layout):
        raise ConfigError(f"the job step has {ntasks} tasks but algo={spec.algo} needs {len(layout)} "
                          f"({', '.join(_label(r) for r in layout)}): regenerate the script for this config")

    def host(task: int) -> str:
        index = task // args.tasks_per_node
        if index >= len(hosts):
            raise ConfigError(f"task {task} would run on node {index} but the allocation has {len(hosts)} nodes")
        return hosts[index]

    cluster = spec.cluster.as_file()
    cluster["port"] = cluster.get("port") or 20000 + int(job) % 20000  # the same on every task of the job
    if not all(is_loopback(h) for h in hosts):
        cluster["bind"] = "0.0.0.0"  # peers on other nodes connect in (cluster.keys, or insecure, as ever)
    cluster["host"] = host(0)  # the server, or rank 0
    if spec.algo not in SERVER_ALGOS:  # every rank listens on its own node: cluster.nodes[r].host
        nodes = list(cluster.get("nodes") or [])
        nodes += [{}] * (len(layout) - len(nodes))
        cluster["nodes"] = [{**(nodes[r] or {}), "host": host(r)} for r in range(len(layout))]
    name = f"slurm-{job}-{procid}"
    path = Path(args.run_dir) / ".launch" / "cluster" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# task {procid} of Slurm job {job}\n" + OmegaConf.to_yaml(cluster))
    role, rank = layout[procid]
    argv = [f"--config-dir={Path(args.run_dir) / '.launch'}", f"cluster={name}",
            *[o for o in args.overrides if not o.startswith(("role=", "rank=", "cluster="))],
            f"run_id=slurm-{job}", f"hydra.run.dir={args.run_dir}", "train.progress=false", f"role={role}"]
    argv += [] if rank is None else [f"rank={rank}"]
    argv += [] if procid == lead_task(spec) else ["hydra.output_subdir=null"]
    return [sys.executable, "-u", "-m", "smolcluster.train", *argv]


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.slurm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("script", "write an sbatch script that runs every role of the run as a Slurm task"),
                       ("task", "inside the job: start this task's role (reads SLURM_PROCID and friends)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--cluster", required=True, help="a name in conf/cluster/ or a path to a cluster YAML")
        p.add_argument("--run-dir", required=True, help="the run dir, on a filesystem every node sees")
        p.add_argument("--tasks-per-node", type=int, default=1, help="roles per node (block placement)")
        if name == "script":
            p.add_argument("--workdir", default=".", help="the smolcluster checkout the job runs in (shared)")
            p.add_argument("--python", default=None, help="the Python on the nodes (default: this one)")
            p.add_argument("--partition", default=None)
            p.add_argument("--cpus-per-task", type=int, default=4)
            p.add_argument("--gpus-per-task", type=int, default=0)
            p.add_argument("--time-min", type=int, default=60)
        p.add_argument("overrides", nargs="*", help="Hydra overrides for every role, e.g. algo=allreduce")
    args = parser.parse_args(argv)
    if args.tasks_per_node < 1:
        raise ConfigError(f"--tasks-per-node={args.tasks_per_node} must be at least 1")
    if args.command == "script":
        sys.stdout.write(script(args))
        return 0
    cmd = task_command(args)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
