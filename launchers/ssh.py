"""Start every role of a cluster file on its host over SSH; or check the hosts first.

    python -m launchers.ssh check  --cluster lan-example
    python -m launchers.ssh launch --cluster lan-example algo=syncps train.steps=500 train.lr=0.02
    python -m launchers.ssh launch --cluster my-cluster.yaml --keep-going algo=edp

``--cluster`` is a name in conf/cluster/ or a path to a YAML file; everything after the
options is a Hydra override given to every role. ``launch`` runs ``check`` first (skip with
``--no-check``), then starts the server and each worker over SSH, prints every node's output
with a ``[server]`` / ``[worker N]`` prefix (also kept in RUN_DIR/launch/NODE.log here), and
ends when the server finishes. If a role fails, every other role is stopped and the launcher
exits 1 naming the node and why (``--keep-going``: a worker may fail and the server carries
on without it, as it does when a host disappears). Ctrl-C stops every node.

The run directory (``runs/DATE/TIME-ALGO-MODEL-RUNID``) is relative to each node's working
dir; the server's summary.json is copied back into the same path here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # `python launchers/ssh.py ...` from anywhere: make `launchers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from loguru import logger  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from launchers.cluster_file import Node, cluster_nodes, load_cluster  # noqa: E402
from launchers.preflight import check, format_reports, free_server_port  # noqa: E402
from launchers.remote import RemoteRole, host_command, sh_path  # noqa: E402
from smolcluster.cluster import new_run_id  # noqa: E402
from smolcluster.config import validate  # noqa: E402
from smolcluster.errors import ConfigError, PeerError, SmolclusterError  # noqa: E402
from smolcluster.paths import CONFIG_DIR  # noqa: E402

CLUSTER_ALGOS = ("syncps", "edp")  # one server + N workers; mp (pipeline stages) is not launched here yet
# Overrides the launcher sets for every role itself.
_LAUNCHER_KEYS = ("role=", "rank=", "cluster=", "cluster.port=", "run_id=", "hydra.run.dir=",
                  "hydra.output_subdir=", "train.progress=", "--config-dir")


def compose_config(cluster_ref: str, overrides: list[str], need_algo: bool = True) -> tuple[DictConfig, str]:
    """The full config every role will see, composed here first so a typo fails before any SSH."""
    path, _ = load_cluster(cluster_ref)
    name = f"launch-{path.stem}"
    bad = [o for o in overrides if o.startswith(("role=", "rank=", "cluster="))]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: the launcher sets role, rank and the cluster itself; "
                          "pick the cluster with --cluster")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cluster").mkdir()
        (Path(tmp) / "cluster" / f"{name}.yaml").write_text(path.read_text())
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            try:
                cfg = compose("config", overrides=[f"cluster={name}", f"hydra.searchpath=[file://{tmp}]",
                                                   *[o for o in overrides if not o.startswith("hydra.")]])
            except Exception as e:
                why = str(e).split("Config search path")[0].strip().replace("\n\n", " ").replace("\n\t", " ")
                raise ConfigError(f"cannot compose the config with {' '.join(overrides)}: {why}") from None
    validate(cfg)
    if need_algo and cfg.algo.name not in CLUSTER_ALGOS:
        raise ConfigError(f"algo={cfg.algo.name} does not run as a server and workers: add algo=syncps or algo=edp")
    return cfg, path.stem


def run_check(cfg: DictConfig, nodes: list[Node], max_skew_s: float) -> int | None:
    """Print the preflight table; returns the port the server can use, or raises if a check failed."""
    logger.info(f"preflight on {len(nodes)} nodes: " + ", ".join(n.describe() for n in nodes))
    reports, port = check(cfg.cluster, nodes, max_skew_s=max_skew_s)
    print(format_reports(reports), flush=True)
    failed = [r.node.describe() for r in reports if r.failed]
    if failed:
        raise PeerError(f"preflight failed on {', '.join(failed)}: fix the FAIL rows above "
                        "(or launch with --no-check to start anyway)")
    return port


def role_args(node: Node, common: list[str]) -> list[str]:
    if node.role == "server":
        return [*common, "role=server"]
    # the server records the run's .hydra/; workers sharing its host and run dir must not overwrite it
    return [*common, "role=worker", f"rank={node.rank}", "hydra.output_subdir=null"]


class Launch:
    """Every role of one run: start, relay, supervise, stop."""

    def __init__(self, cfg: DictConfig, nodes: list[Node], overrides: list[str], cluster_stem: str,
                 port: int, keep_going: bool = False, run_dir: str | None = None):
        self.cfg, self.nodes, self.keep_going = cfg, nodes, keep_going
        self.run_id = new_run_id()
        now = datetime.now()
        self.run_dir = run_dir or (f"runs/{now:%Y-%m-%d}/{now:%H-%M-%S}-{cfg.algo.name}-{cfg.model.name}-"
                                   f"{self.run_id}")
        cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
        cluster["port"] = port
        group = f"launch-{self.run_id}"
        # ship the composed cluster file with the run: every node reads exactly what was checked here
        self.files = {f"{self.run_dir}/.launch/cluster/{group}.yaml":
                      f"# {cluster_stem}, as launched (run {self.run_id})\n" + OmegaConf.to_yaml(cluster)}
        common = [f"--config-dir={self.run_dir}/.launch", f"cluster={group}",
                  *[o for o in overrides if not o.startswith(_LAUNCHER_KEYS)],
                  f"cluster.port={port}", f"run_id={self.run_id}", f"hydra.run.dir={self.run_dir}",
                  "train.progress=false"]
        self.local_dir = Path(self.run_dir) / "launch"
        self.roles = [RemoteRole(n, role_args(n, common), self.files,
                                 self.local_dir / f"{n.label.replace(' ', '')}.log") for n in nodes]
        self.lost: list[str] = []

    def start(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / "launch.json").write_text(json.dumps({
            "run_id": self.run_id, "run_dir": self.run_dir,
            "nodes": [{"label": r.node.label, "name": r.node.name, "target": r.node.ssh.target,
                       "workdir": r.node.ssh.workdir, "command": shlex.join(r.command()[:-1]) + " SCRIPT",
                       "args": r.args} for r in self.roles]}, indent=2))
        logger.info(f"run {self.run_id}: {len(self.roles)} roles, run dir {self.run_dir} "
                    f"(on each node, under its ssh.workdir)")
        for role in self.roles:
            role.start()

    def supervise(self, poll_s: float = 0.2, finish_grace_s: float = 20.0) -> None:
        """Until the server finishes; a failed role stops the run (a worker: unless keep_going)."""
        server, workers = self.roles[0], self.roles[1:]
        while True:
            code = server.poll()
            if code is not None:
                if code != 0:
                    server.join()
                    if any("Address already in use" in line for line in server.tail):
                        raise PortTaken(server.why())
                    raise PeerError(f"{server.node.describe()} failed: {server.why()}")
                # the server told the workers to stop: give them time to say goodbye on their own
                deadline = time.monotonic() + finish_grace_s
                while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
                    time.sleep(poll_s)
                return
            for w in workers:
                wcode = w.poll()
                if wcode in (None, 0) or w.node.label in self.lost:
                    continue
                w.join()
                if not self.keep_going:
                    raise PeerError(f"{w.node.describe()} failed: {w.why()}; stopped the other nodes")
                self.lost.append(w.node.label)
                logger.warning(f"{w.node.describe()} failed: {w.why()}; carrying on without it "
                               "(--keep-going: the server drops it after cluster.liveness_s)")
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop every role that still runs, all at once (each waits for its own grace)."""
        running = [r for r in self.roles if r.poll() is None]
        if running:
            logger.info("stopping " + ", ".join(r.node.describe() for r in running))
        threads = [threading.Thread(target=r.stop, daemon=True) for r in self.roles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)

    def fetch_summary(self) -> dict | None:
        """Copy the server's summary.json into the same run dir here (unless it is already here)."""
        local = Path(self.run_dir) / "summary.json"
        server = self.nodes[0].ssh
        script = f"cd {sh_path(server.workdir)} && cat {shlex.quote(self.run_dir)}/summary.json"
        try:
            got = subprocess.run(host_command(server, script), capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            got = None
        if got is None or got.returncode != 0:
            logger.warning(f"could not fetch summary.json from {server.target}: "
                           f"{got.stderr.strip() if got else 'timed out'}")
            return json.loads(local.read_text()) if local.is_file() else None
        summary = json.loads(got.stdout)
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(got.stdout)
        return summary


class PortTaken(PeerError):
    """The server could not listen on its port: something took it after the preflight found it free."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(args: argparse.Namespace, attempts: int = 3) -> int:
    if not any(o.startswith(("algo=", "+algo=")) for o in args.overrides):
        # the config's default (local) is one process; a cluster file means a parameter server
        args.overrides = ["algo=syncps", *args.overrides]
        logger.info("no algo given: using algo=syncps (add algo=edp for the asynchronous one)")
    cfg, stem = compose_config(args.cluster, args.overrides)
    nodes = cluster_nodes(cfg.cluster)
    port = cfg.cluster.port
    if not args.no_check:
        port = run_check(cfg, nodes, args.max_skew_s)
    elif port is None:
        port = free_server_port(cfg.cluster, nodes[0])
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the cluster like Ctrl-C does
    for attempt in range(1, attempts + 1):
        run = Launch(cfg, nodes, args.overrides, stem, int(port), keep_going=args.keep_going, run_dir=args.run_dir)
        try:
            run.start()
            run.supervise()
            break
        except PortTaken as e:
            # only a port we picked ourselves may be swapped; the user's own cluster.port is a hard error
            if cfg.cluster.port is not None or attempt == attempts:
                raise PeerError(f"{nodes[0].describe()} failed: {e}") from None
            run.stop()
            port = free_server_port(cfg.cluster, nodes[0])
            logger.warning(f"the server's port was taken after the preflight ({e}); retrying on port {port}")
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping every node")
            run.stop()
            return 130
        finally:
            run.stop()
    summary = run.fetch_summary()
    if summary:
        logger.success(f"run {run.run_id} finished: {summary.get('steps')} steps, final loss "
                       f"{summary.get('final_loss')}, eval {summary.get('eval_accuracy', summary.get('eval_loss'))}")
    logger.success(f"run dir {run.run_dir} (summary.json, launch/ node logs here; run files on the server)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.ssh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "preflight every node: SSH, Python and packages, port, reachability, clock"),
                       ("launch", "start the server and every worker on their hosts and supervise them")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--cluster", required=True, help="a name in conf/cluster/ or a path to a cluster YAML")
        p.add_argument("--max-skew-s", type=float, default=2.0, help="largest clock offset allowed (s)")
        if name == "launch":
            p.add_argument("--no-check", action="store_true", help="skip the preflight")
            p.add_argument("--keep-going", action="store_true",
                           help="a failed worker does not stop the run (the server continues without it)")
            p.add_argument("--run-dir", default=None, help="run dir, relative to each node's workdir")
        p.add_argument("overrides", nargs="*", help="Hydra overrides for every role, e.g. algo=syncps train.lr=0.01")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
               "<cyan>[launcher]</cyan> {message}", level="INFO")
    try:
        if args.command == "check":
            cfg, _ = compose_config(args.cluster, args.overrides, need_algo=False)
            run_check(cfg, cluster_nodes(cfg.cluster), args.max_skew_s)
            return 0
        return launch(args)
    except SmolclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
