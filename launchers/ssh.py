"""Start every role of a cluster file on its host over SSH; or check the hosts first.

    python -m launchers.ssh check  --cluster lan-example
    python -m launchers.ssh launch --cluster lan-example algo=syncps train.steps=500 train.lr=0.02
    python -m launchers.ssh launch --cluster my-cluster.yaml --keep-going algo=edp
    python -m launchers.ssh launch --cluster lan-example algo=allreduce      # the ring: no server
    python -m launchers.ssh launch --cluster lan-example algo=mp algo.stages=3 model=gpt2-tiny data=text
    python -m launchers.ssh serve  --cluster lan-example checkpoint=RUN_DIR stages=3   # inference stages
    python -m launchers.ssh serve  --cluster lan-example --weights send model.pretrained=DIR stages=2

``--cluster`` is a name in conf/cluster/ or a path to a YAML file; everything after the
options is a Hydra override given to every role. ``launch`` runs ``check`` first (skip with
``--no-check``), then starts every role over SSH: syncps/edp's server and each worker
(``cluster.nodes[r]``), allreduce's ranks (``cluster.nodes[r]``, no server) or mp's stages
(``cluster.nodes[i]``). It prints every node's output with a ``[server]`` / ``[worker N]`` /
``[stage N]`` prefix (also kept in RUN_DIR/launch/NODE.log here), and ends when the node that
writes the run's files finishes (the server; allreduce's rank 0; mp's last stage, after which
the stages' checkpoint shards are merged on its host). If a role fails, every other role is
stopped and the launcher exits 2 naming the node and why (``--keep-going``: a syncps/edp worker
may fail and the server carries on without it, as it does when a host disappears). Ctrl-C
stops every node.

``serve`` first sends each stage's share of the weights over SSH into its host's cache (``--weights
auto``: unless the host reads the very model files; launchers/ssh_weights.py), then starts
``python -m smolcluster.infer role=stage rank=i`` on each stage's node, prints
the ``chat role=head`` / ``infer role=head`` command that attaches to them once every stage
serves, and keeps them up until Ctrl-C or SIGTERM (which stops them all). ``check algo=mp`` /
``algo=allreduce`` checks the ranks' layout (each listens on its port, every other reaches it).

The run directory (``runs/DATE/TIME-ALGO-MODEL-RUNID``) is relative to each node's working
dir; the server's summary.json is copied back into the same path here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # `python launchers/ssh.py ...` from anywhere: make `launchers` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir  # noqa: E402
from loguru import logger  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launchers.cluster_file import Node, cluster_nodes, load_cluster, rank_nodes  # noqa: E402
from launchers.preflight import check, format_reports, free_ports_on  # noqa: E402
from launchers.remote import RemoteRole, echo, host_command, python_script, sh_path  # noqa: E402
from smolcluster.cluster import new_run_id  # noqa: E402
from smolcluster.config import validate  # noqa: E402
from smolcluster.errors import ConfigError, PeerError  # noqa: E402
from smolcluster.launch.cli import command  # noqa: E402
from smolcluster.launch.overrides import child_overrides  # noqa: E402
from smolcluster.launch.supervisor import Supervisor, sigterm_as_interrupt  # noqa: E402
from smolcluster.node.coordinator import WEIGHT_MODES  # noqa: E402
from smolcluster.paths import CONFIG_DIR  # noqa: E402
from smolcluster.train_settings import LaunchSpec, launch_spec, train_config  # noqa: E402

SERVER_ALGOS = ("syncps", "edp")               # one server + cluster.workers workers
RING_ALGOS = ("allreduce", "diloco")           # a ring of cluster.workers ranks, no server
CLUSTER_ALGOS = (*SERVER_ALGOS, *RING_ALGOS, "mp")  # mp: algo.stages stages
# Overrides this launcher sets for every role itself, besides those every launcher sets (child_overrides).
_LAUNCHER_KEYS = ("cluster=", "--config-dir")


def compose_config(cluster_ref: str, overrides: list[str], need_algo: bool = True,
                   config: str = "config") -> tuple[LaunchSpec, str]:
    """The full config every role will see (``config``: train's, or ``infer`` for inference stages), composed
    here first so a typo fails before any SSH; returned as what the launcher reads of it."""
    spec, stem, _ = compose_settings(cluster_ref, overrides, need_algo, config)
    return spec, stem


def compose_settings(cluster_ref: str, overrides: list[str], need_algo: bool = True,
                     config: str = "config") -> tuple[LaunchSpec, str, object]:
    """:func:`compose_config`, and for ``infer`` the stages' typed pipeline settings (None for training)."""
    path, _ = load_cluster(cluster_ref)
    name = f"launch-{path.stem}"
    bad = [o for o in overrides if o.startswith(("role=", "rank=", "cluster="))]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: the launcher sets role, rank and the cluster itself; "
                          "pick the cluster with --cluster")
    if config == "infer":
        from smolcluster.inference import settings  # noqa: F401  (registers infer's schema with Hydra)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cluster").mkdir()
        (Path(tmp) / "cluster" / f"{name}.yaml").write_text(path.read_text())
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            try:
                cfg = compose(config, overrides=[f"cluster={name}", f"hydra.searchpath=[file://{tmp}]",
                                                   *[o for o in overrides if not o.startswith("hydra.")]])
            except Exception as e:
                why = str(e).split("Config search path")[0].strip().replace("\n\n", " ").replace("\n\t", " ")
                raise ConfigError(f"cannot compose the config with {' '.join(overrides)}: {why}") from None
    if config == "infer":
        from smolcluster.inference.settings import infer_settings

        settings = infer_settings(cfg)  # the stages' own checks (stages, partition, ...), here first
        return launch_spec(cfg), path.stem, settings.pipeline
    validate(train_config(cfg))
    if need_algo and cfg.algo.name not in CLUSTER_ALGOS:
        raise ConfigError(f"algo={cfg.algo.name} runs in one process: launch algo=syncps, edp, allreduce, diloco or mp")
    return launch_spec(cfg), path.stem, None


def layout(spec: LaunchSpec, serving: bool = False) -> tuple[list[Node], int | None]:
    """Every role's node, and the index of the one that writes the run's files and whose end ends the run
    (None for inference stages, which serve until stopped)."""
    if serving:
        return rank_nodes(spec, spec.stages, "stage"), None
    if spec.algo in RING_ALGOS:
        return rank_nodes(spec, spec.cluster.workers, "worker"), 0
    if spec.algo == "mp":
        return rank_nodes(spec, spec.stages, "stage"), spec.stages - 1
    return cluster_nodes(spec), 0


def run_check(spec: LaunchSpec, nodes: list[Node], max_skew_s: float) -> tuple[int | None, LaunchSpec]:
    """Print the preflight table; returns the port the cluster can use, or raises if a check failed. With
    ``partition=auto``, a stage node without ``memory_gb`` / ``gflops`` gets what its preflight measured (in
    the spec returned)."""
    logger.info(f"preflight on {len(nodes)} nodes: " + ", ".join(n.describe() for n in nodes))
    reports, port = check(spec.cluster, nodes, max_skew_s=max_skew_s)
    print(format_reports(reports), flush=True)
    failed = [r.node.describe() for r in reports if r.failed]
    if failed:
        raise PeerError(f"preflight failed on {', '.join(failed)}: fix the FAIL rows above "
                        "(or launch with --no-check to start anyway)")
    if spec.partition == "auto":
        spec = fill_measured(spec, reports)
    return port, spec


def fill_measured(spec: LaunchSpec, reports) -> LaunchSpec:
    """``partition=auto`` places blocks by ``cluster.nodes[i].memory_gb`` and, when every node has one, prefers
    the faster by ``cluster.nodes[i].gflops`` (smolcluster/inference/placement.py): where the cluster file does not
    say, use what the node's preflight measured (usable memory: available RAM within its cgroup's limit, or the
    free VRAM of a cuda stage's GPU; the matmul rate on the stage's device), so every stage plans the same."""
    nodes = list(spec.cluster.nodes)
    filled = []
    for r in reports:
        usable = r.facts.get("usable_bytes")
        if r.node.rank is None or usable is None:
            continue
        while len(nodes) <= r.node.rank:
            nodes.append({})
        entry = nodes[r.node.rank] = dict(nodes[r.node.rank] or {})
        if entry.get("memory_gb") is None:
            entry["memory_gb"] = round(usable / 2**30, 3)
            filled.append(f"{r.node.label} {entry['memory_gb']} GB")
        rates = (r.facts.get("resources") or {}).get("gflops") or {}
        device = str(entry.get("device") or "auto")
        gpu = device if ":" in device else "cuda:0" if device in ("cuda", "auto") else None
        rate = rates.get(gpu) or (rates.get("cpu") if device in ("cpu", "auto") else None)
        if entry.get("gflops") is None and rate:
            entry["gflops"] = rate
            filled.append(f"{r.node.label} {rate} GFLOP/s")
    if not filled:
        return spec
    logger.info("partition=auto: measured by the preflight: " + ", ".join(filled))
    return replace(spec, cluster=replace(spec.cluster, nodes=nodes))


def role_args(node: Node, common: list[str], lead: bool, serving: bool = False) -> list[str]:
    if node.role == "server":
        return [*common, "role=server"]
    args = [*common, f"role={node.role}", f"rank={node.rank}"]
    # the lead records the run's .hydra/; other roles sharing its host and run dir must not overwrite it
    return args if lead or serving else [*args, "hydra.output_subdir=null"]


class Launch(Supervisor):
    """The SSH backend of the supervisor (smolcluster/launch/supervisor.py): every role of one run on its host
    (:class:`~launchers.remote.RemoteRole`): start, relay, supervise, stop."""

    def __init__(self, spec: LaunchSpec, nodes: list[Node], overrides: list[str], cluster_stem: str,
                 port: int, keep_going: bool = False, run_dir: str | None = None, lead: int | None = 0,
                 serving: bool = False, extra: list[list[str]] | None = None):
        self.spec, self.nodes, self.keep_going, self.lead, self.serving = spec, nodes, keep_going, lead, serving
        self.run_id = new_run_id()
        now = datetime.now()
        what = "serve" if serving else spec.algo
        self.run_dir = run_dir or f"runs/{now:%Y-%m-%d}/{now:%H-%M-%S}-{what}-{spec.model}-{self.run_id}"
        cluster = {**spec.cluster.as_file(), "port": port}
        self.group = group = f"launch-{self.run_id}"
        # ship the composed cluster file with the run: every node reads exactly what was checked here
        self.files = {f"{self.run_dir}/.launch/cluster/{group}.yaml":
                      f"# {cluster_stem}, as launched (run {self.run_id})\n" + OmegaConf.to_yaml(cluster)}
        self.overrides = child_overrides(overrides, drop=_LAUNCHER_KEYS)
        common = [f"--config-dir={self.run_dir}/.launch", f"cluster={group}", *self.overrides, f"cluster.port={port}"]
        if serving:  # a stage says when it serves at INFO; the attach command is printed once all have
            common += [] if any(o.startswith("logging.level=") for o in overrides) else ["logging.level=INFO"]
        else:
            common += [f"run_id={self.run_id}", f"hydra.run.dir={self.run_dir}", "train.progress=false"]
        self.local_dir = Path(self.run_dir) / "launch"
        module = "smolcluster.infer" if serving else "smolcluster.train"
        # extra: per role, what follows the common overrides (a stage's checkpoint= in its weight cache)
        self.roles = [RemoteRole(n, [*role_args(n, common, i == lead, serving), *(extra[i] if extra else [])],
                                 self.files,
                                 self.local_dir / f"{n.label.replace(' ', '')}.log", module)
                      for i, n in enumerate(nodes)]
        self.lost: list[str] = []
        self.announced = False  # serving: the attach command has been printed

    def start(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for rel, text in self.files.items():  # here too: a head attaches with the same cluster file
            Path(rel).parent.mkdir(parents=True, exist_ok=True)
            Path(rel).write_text(text + "\n")
        (self.local_dir / "launch.json").write_text(json.dumps({
            "run_id": self.run_id, "run_dir": self.run_dir, "cluster": self.group,
            **({"attach": self.attach_command()} if self.serving else {}),
            "nodes": [{"label": r.node.label, "name": r.node.name, "target": r.node.ssh.target,
                       "workdir": r.node.ssh.workdir, "command": shlex.join(r.command()[:-1]) + " SCRIPT",
                       "args": r.args} for r in self.roles]}, indent=2))
        logger.info(f"run {self.run_id}: {len(self.roles)} roles, run dir {self.run_dir} "
                    f"(on each node, under its ssh.workdir)")
        for role in self.roles:
            role.start()

    def attach_command(self) -> str:
        """The head's command line: same cluster file (written here too), same model options as the stages."""
        # --config-dir first: Hydra's parser takes no option after the overrides
        return shlex.join(["python", "-m", "smolcluster.chat", f"--config-dir={self.run_dir}/.launch", "role=head",
                           f"cluster={self.group}", *[o for o in self.overrides if not o.startswith("logging.")]])

    def supervise(self, poll_s: float = 0.2, finish_grace_s: float = 20.0) -> None:
        """Until the lead finishes (inference stages: until every stage has ended); a failed role stops the run
        (a syncps/edp worker: unless keep_going)."""
        if self.lead is None:
            self.wait(lambda: all(r.poll() is not None for r in self.roles), poll_s)
            return
        lead = self.roles[self.lead]
        self.wait(lambda: lead.poll() == 0, poll_s)
        # the lead told the others to stop: give them time to say goodbye on their own
        deadline = time.monotonic() + finish_grace_s
        while any(w.poll() is None for w in self.roles) and time.monotonic() < deadline:
            time.sleep(poll_s)

    def failed(self) -> str | None:
        """Why the run fails: the lead failed, or another role did (a syncps/edp worker with keep_going is only
        noted in ``lost``). Once the lead has finished cleanly, nothing else counts. A role that found its port
        taken raises PortTaken (the launcher may retry on another)."""
        lead = self.roles[self.lead] if self.lead is not None else None
        code = lead.poll() if lead is not None else None
        if code is not None:
            return None if code == 0 else self._why_ended(lead)
        for w in self.roles:
            wcode = w.poll()
            if w is lead or wcode is None or w.node.label in self.lost or wcode == 0 and lead is not None:
                continue
            why = self._why_ended(w)
            if wcode == 0:  # an inference stage ended by itself (a head asked it to shut down)
                continue
            if not (self.keep_going and self.nodes[0].role == "server"):
                return f"{why}; stopped the other nodes"
            self.lost.append(w.node.label)
            logger.warning(f"{why}; carrying on without it (--keep-going: the server drops it after "
                           "cluster.liveness_s)")
        return None

    @staticmethod
    def _why_ended(role: RemoteRole) -> str:
        role.join()  # its last lines are in
        if any("Address already in use" in line for line in role.tail):
            raise PortTaken(role.why())
        return f"{role.node.describe()} failed: {role.why()}"

    def tick(self) -> None:
        """Serving: once every stage serves, say how to attach a head (once)."""
        if self.serving and not self.announced and all(r.serving.is_set() for r in self.roles):
            self.announced = True
            echo(f"[launcher] stages ready: {len(self.roles)} stages serve; attach a head with\n"
                 f"    {self.attach_command()}\n"
                 "(add head_host=ADDRESS, this machine's address as the stages reach it, unless that is "
                 "cluster.host; smolcluster.infer takes the same arguments and prompt=...); Ctrl-C here stops "
                 "the stages")

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

    def merge_shards(self) -> None:
        """mp: merge the stages' checkpoint shards into checkpoint.safetensors on the last stage's host (where
        every shard is when the stages share its working dir; otherwise say how to gather them)."""
        spec = self.nodes[self.lead].ssh
        script = python_script(spec, "import sys; from smolcluster.pipeline.merge import main; sys.exit(main())",
                               [self.run_dir])
        try:
            got = subprocess.run(host_command(spec, script), capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            got = None
        if got is not None and got.returncode == 0:
            logger.info(f"merged the stages' shards into {self.run_dir}/checkpoint.safetensors on {spec.target}")
            return
        why = (got.stderr.strip().splitlines() or ["?"])[-1] if got else "timed out"
        logger.warning(f"could not merge the stages' shards on {spec.target} ({why}): copy every "
                       f"{self.run_dir}/stage-*-of-*.safetensors to one machine and run "
                       f"python -m smolcluster.pipeline.merge {self.run_dir}")

    def fetch_summary(self) -> dict | None:
        """Copy the lead's summary.json into the same run dir here (unless it is already here)."""
        local = Path(self.run_dir) / "summary.json"
        server = self.nodes[self.lead].ssh
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


def launch(args: argparse.Namespace, attempts: int = 3) -> int:
    if args.command == "launch" and not any(o.startswith(("algo=", "+algo=")) for o in args.overrides):
        # the config's default (local) is one process; a cluster file means a parameter server
        args.overrides = ["algo=syncps", *args.overrides]
        logger.info("no algo given: using algo=syncps (add algo=edp for the asynchronous one)")
    serving = args.command == "serve"
    spec, stem, pipeline = compose_settings(args.cluster, args.overrides, config="infer" if serving else "config")
    nodes, lead = layout(spec, serving)
    port = spec.cluster.port
    if not args.no_check:
        port, spec = run_check(spec, nodes, args.max_skew_s)
    elif port is None:
        port = free_ports_on(spec.cluster, nodes[0], 1 if nodes[0].role == "server" else len(nodes))
    sigterm_as_interrupt()  # `kill` stops the cluster like Ctrl-C does
    extra = None
    if serving:  # each stage's share of the weights into its host's cache (the plan uses the measured memory)
        from launchers.ssh_weights import send_weights
        from smolcluster.cluster import node_name
        from smolcluster.telemetry.weights import open_weights_metrics

        # with logging.prometheus.port: top's line per stage host (it lives as long as this launcher)
        watch = open_weights_metrics(pipeline.telemetry, {"node": node_name(), "algo": "infer"})
        extra = send_weights(pipeline, nodes, list(spec.cluster.nodes), args.weights, progress=watch)
    for attempt in range(1, attempts + 1):
        run = Launch(spec, nodes, args.overrides, stem, int(port), keep_going=args.keep_going, run_dir=args.run_dir,
                     lead=lead, serving=serving, extra=extra)
        try:
            run.start()
            run.supervise()
            break
        except PortTaken as e:
            # only a port we picked ourselves may be swapped; the user's own cluster.port is a hard error
            if spec.cluster.port is not None or attempt == attempts:
                raise PeerError(f"{nodes[0].describe()} failed: {e}") from None
            run.stop()
            port = free_ports_on(spec.cluster, nodes[0], 1 if nodes[0].role == "server" else len(nodes))
            logger.warning(f"a port was taken after the preflight ({e}); retrying on port {port}")
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping every node")
            run.stop()
            return 130
        finally:
            run.stop()
    if serving:
        logger.success("every stage has stopped")
        return 0
    if spec.algo == "mp":
        run.merge_shards()
    summary = run.fetch_summary()
    if summary:
        logger.success(f"run {run.run_id} finished: {summary.get('steps')} steps, final loss "
                       f"{summary.get('final_loss')}, eval {summary.get('eval_accuracy', summary.get('eval_loss'))}")
    logger.success(f"run dir {run.run_dir} (summary.json, launch/ node logs here; run files on "
                   f"{run.nodes[run.lead].describe()})")
    return 0


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.ssh", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "preflight every node: SSH, Python and packages, port, reachability, clock, "
                                 "memory and speed"),
                       ("launch", "start every training role (server + workers, ring ranks, mp stages) on its host"),
                       ("serve", "start inference stages (smolcluster.infer role=stage) on their hosts for a head")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--cluster", required=True, help="a name in conf/cluster/ or a path to a cluster YAML")
        p.add_argument("--max-skew-s", type=float, default=2.0, help="largest clock offset allowed (s)")
        if name in ("launch", "serve"):
            p.add_argument("--no-check", action="store_true", help="skip the preflight")
            p.add_argument("--keep-going", action="store_true", default=False,
                           help="a failed worker does not stop the run (the server continues without it)")
            p.add_argument("--run-dir", default=None, help="run dir, relative to each node's workdir")
        if name == "serve":
            p.add_argument("--weights", choices=WEIGHT_MODES, default="auto",
                           help="send each stage its share of the weights over SSH into its host's ssh.state_dir "
                                "cache: auto = unless the host reads the very model files; send = always; "
                                "shared = never (every host reads checkpoint=/model.pretrained= itself)")
        p.add_argument("overrides", nargs="*", help="Hydra overrides for every role, e.g. algo=syncps train.lr=0.01")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> "
               "<cyan>[launcher]</cyan> {message}", level="INFO")
    if args.command == "check":
        spec, _ = compose_config(args.cluster, args.overrides, need_algo=False)
        run_check(spec, layout(spec)[0], args.max_skew_s)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
