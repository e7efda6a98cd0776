"""Read a cluster file and say which role runs on which host, and how to reach it over SSH.

A cluster file is a Hydra config of the ``cluster`` group (``conf/cluster/NAME.yaml``). On top
of the keys every node reads (host, port, workers, nodes, keys, heartbeat_s, ...), the SSH
launcher reads:

    ssh:                 # defaults for every node
      user: pi           # null = your local user name (or ~/.ssh/config)
      port: 22
      identity: null     # private key file; null = ssh's defaults / agent
      python: .venv/bin/python   # relative to workdir, absolute, or on PATH (python3)
      workdir: ~/smolcluster     # a checkout with smolcluster installed; runs/ land here
      options: []        # extra `ssh -o` options, e.g. [StrictHostKeyChecking=accept-new]
      env: {}            # extra environment for the role, e.g. {OMP_NUM_THREADS: "4"}
      local: false       # true = run on this machine directly, without SSH
    server: {name: macmini, host: 192.168.1.10, ssh: {...}}   # host defaults to the top-level host
    nodes:               # one entry per worker rank (allreduce: per ring rank; mp: per stage); host is where it runs
      - {name: laptop, host: 192.168.1.11, ssh: {user: ada}}

A node's own ``ssh`` block overrides the defaults key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from smolcluster.errors import ConfigError
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import LaunchSpec

SSH_DEFAULTS = {"user": None, "port": None, "identity": None, "python": ".venv/bin/python",
                "workdir": "~/smolcluster", "options": [], "env": {}, "local": False,
                "state_dir": "~/.smolcluster/node", "weights_cache_gb": None}


@dataclass
class SshSpec:
    host: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    python: str = ".venv/bin/python"
    workdir: str = "~/smolcluster"
    options: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    local: bool = False
    state_dir: str = "~/.smolcluster/node"  # serve's weight cache there (STATE/weights: an agent's own default)
    weights_cache_gb: float | None = None  # that cache's cap (an agent's --weights-cache-gb; None: the free disk)

    @property
    def target(self) -> str:
        """``user@host:port`` as a person would write it, for messages."""
        if self.local:
            return "this machine"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.host}{port}"


@dataclass
class Node:
    role: str             # server | worker | stage
    rank: int | None      # worker / stage rank; None for the server
    name: str             # the node name in logs (SMOLCLUSTER_NODE)
    ssh: SshSpec

    @property
    def label(self) -> str:
        return "server" if self.role == "server" else f"{self.role} {self.rank}"

    def describe(self) -> str:
        return f"{self.label} ({self.name}, {self.ssh.target})"


def find_cluster_file(ref: str | Path) -> Path:
    """A path to a YAML file, or the name of one in conf/cluster/."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    named = CONFIG_DIR / "cluster" / f"{ref}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml")))
    raise ConfigError(f"cluster file {ref!r} not found: give a path to a YAML file or one of: {known}")


def load_cluster(ref: str | Path) -> tuple[Path, dict]:
    """The cluster file ``ref`` names, checked to be a YAML mapping (the launchers compose it into the config)."""
    path = find_cluster_file(ref)
    try:
        cluster = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cluster file {path} is not valid YAML: {e}") from None
    if not OmegaConf.is_dict(cluster):
        raise ConfigError(f"cluster file {path} must be a mapping (host: ..., port: ..., nodes: [...])")
    return path, OmegaConf.to_container(cluster)


def _ssh_spec(where: str, host: str | None, defaults: dict, own) -> SshSpec:
    if own is not None and not isinstance(own, dict):
        raise ConfigError(f"{where}.ssh must be a mapping like {{user: pi, workdir: ~/smolcluster}}")
    merged = {**defaults, **(own or {})}
    unknown = sorted(set(merged) - set(SSH_DEFAULTS) - {"host"})
    if unknown:
        raise ConfigError(f"{where}.ssh has unknown keys {unknown}: use {sorted(SSH_DEFAULTS)} (and host)")
    host = merged.pop("host", None) or host
    if not host and not merged.get("local"):
        raise ConfigError(f"{where} has no host: add {where}.host (its address on your network)")
    if merged["port"] is not None and not isinstance(merged["port"], int):
        raise ConfigError(f"{where}.ssh.port={merged['port']!r} must be an integer, e.g. 22")
    if not isinstance(merged["options"], list):
        raise ConfigError(f"{where}.ssh.options must be a list of ssh -o options, e.g. [ConnectTimeout=5]")
    if merged["weights_cache_gb"] is not None and not isinstance(merged["weights_cache_gb"], (int, float)):
        raise ConfigError(f"{where}.ssh.weights_cache_gb={merged['weights_cache_gb']!r} must be a number of GB, "
                          "e.g. 20")
    merged["env"] = {str(k): str(v) for k, v in (merged["env"] or {}).items()}
    return SshSpec(host=str(host or "localhost"), **merged)


def _ssh_defaults(spec: LaunchSpec) -> dict:
    own = spec.cluster.rest.get("ssh") or {}
    if not isinstance(own, dict):
        raise ConfigError("cluster.ssh must be a mapping like {user: pi, workdir: ~/smolcluster}")
    return {**SSH_DEFAULTS, **own}


def rank_nodes(spec: LaunchSpec, n: int, role: str) -> list[Node]:
    """Ranks 0..n-1 and no server (allreduce's ring, mp's stages): rank r runs on ``cluster.nodes[r].host``,
    where it also listens (as :func:`smolcluster.launch.nodes.stage_nodes` reads it), else on cluster.host."""
    defaults = _ssh_defaults(spec)
    entries = spec.cluster.nodes
    host = spec.cluster.host if spec.host_given else None
    if not host and len(entries) < n:
        raise ConfigError(f"{n} {role}s but cluster.nodes lists {len(entries)} nodes and cluster.host is not set: "
                          "give one nodes entry (with its host) per rank")
    nodes = []
    for rank in range(n):
        entry = (entries[rank] if rank < len(entries) else None) or {}
        nodes.append(Node(role, rank, entry.get("name") or f"{role}{rank}",
                          _ssh_spec(f"cluster.nodes[{rank}]", entry.get("host") or host, defaults, entry.get("ssh"))))
    return nodes


def cluster_nodes(spec: LaunchSpec) -> list[Node]:
    """The server and every worker rank, each with where and how to start it."""
    defaults, cluster = _ssh_defaults(spec), spec.cluster
    workers = cluster.workers
    if workers < 1:
        raise ConfigError(f"cluster.workers={workers!r} must be a positive integer")
    if not spec.host_given:
        raise ConfigError("cluster.host is not set: give the server's address as the workers reach it")
    server = cluster.rest.get("server") or {}
    if not isinstance(server, dict):
        raise ConfigError("cluster.server must be a mapping like {name: macmini, host: 192.168.1.10}")
    nodes = [Node("server", None, server.get("name") or "server",
                  _ssh_spec("cluster.server", server.get("host") or cluster.host, defaults, server.get("ssh")))]
    entries = cluster.nodes
    if len(entries) < workers:
        raise ConfigError(f"cluster.workers={workers} but cluster.nodes lists {len(entries)} nodes: "
                          "the SSH launcher needs one nodes entry (with its host) per worker rank")
    for rank in range(workers):
        entry = entries[rank] or {}
        where = f"cluster.nodes[{rank}]"
        nodes.append(Node("worker", rank, entry.get("name") or f"worker{rank}",
                          _ssh_spec(where, entry.get("host"), defaults, entry.get("ssh"))))
    return nodes
