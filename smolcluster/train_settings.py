"""The ``train`` command's settings as typed dataclasses: read from Hydra once, at the edge.

``conf/config.yaml`` names :class:`TrainSchema` first in its defaults list and each ``conf/algo/NAME.yaml`` names
its algorithm's schema (``NAME_schema``), all registered in Hydra's ConfigStore, so a mistyped override fails
while the config is composed, before any process starts, naming the key (``train.lr=abc``, ``algo.zero=x``).
``train.py`` then turns the composed config into a :class:`TrainConfig` with :func:`train_config`, once; the
algorithms, the trainer and the recorder take that object. Children of a launch still get their settings as
Hydra overrides on the command line, and re-compose and re-type them.

The model and data groups stay open (a ``_target_`` model takes its own keys; both are instantiated): they
arrive as plain dicts. The cluster group is open too (a cluster file is the user's): :class:`ClusterSpec` reads
it, for training, inference (``Pipeline.links``), the cluster=auto coordinator (:class:`AutoSpec`) and the
launchers (:class:`LaunchSpec`, built by :func:`launch_spec` where they compose the config); a node's
``cluster.nodes[i]`` entry is read by :meth:`ClusterSpec.node` alone.

The schema dataclasses are not frozen: Hydra merges the yaml and the overrides into them, which a frozen
dataclass refuses. Code that needs other values (a pipeline stage's own clip, allreduce's scaled steps) makes
a :func:`dataclasses.replace` copy, never edits the shared one.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from smolcluster.errors import ConfigError

MB = 1024 * 1024
_KINDS = {int: "a whole number", float: "a number", bool: "true or false"}


# -- train.*, logging.* ------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the family's attention + MLP projections (models/lora.py)
    base_precision: str = "fp32"                # fp32 | bf16 | int8
    merge: bool = False

    def as_dict(self) -> dict:
        """What :mod:`smolcluster.models.lora` takes (it serves inference's adapters too, as dicts)."""
        return dataclasses.asdict(self)


@dataclass
class TrainSettings:
    """``train.*``: the schedule, optimizer, guard and cadence (conf/config.yaml documents each key)."""

    steps: int | None = None
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0
    activation_checkpointing: bool = False
    max_grad_norm: float | None = 10000.0
    max_grad_norm_ratio: float | None = 10.0
    grad_norm_window: int = 50
    grad_norm_warmup: int = 5
    eval_every: int = 0
    eval_samples: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    stop_after: int | None = None
    progress: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class LokiSettings:
    url: str | None = None
    batch_size: int = 500
    flush_interval_s: float = 1.0
    queue_size: int = 10000
    timeout_s: float = 2.0
    max_retries: int = 3
    labels: Any = None  # extra static stream labels, {name: value}


@dataclass
class WandbSettings:
    mode: str = "disabled"
    project: str = "smolcluster"
    entity: str | None = None
    group: str | None = None


@dataclass
class PrometheusSettings:
    port: int | None = None
    addr: str | None = None


@dataclass
class LoggingSettings:
    level: str = "INFO"
    loki: LokiSettings = field(default_factory=LokiSettings)
    wandb: WandbSettings = field(default_factory=WandbSettings)
    prometheus: PrometheusSettings = field(default_factory=PrometheusSettings)
    grad_norm_every: int = 50
    hardware_every: int = 50


# -- algo.*: one dataclass per algorithm ------------------------------------------------------------
# One per algorithm rather than the union of every algorithm's keys: Hydra then refuses a key of another
# algorithm (algo=local algo.zero=1), and each algorithm reads only the settings it has.
@dataclass
class AlgoSettings:
    name: str = MISSING


@dataclass
class LocalSettings(AlgoSettings):
    pass


@dataclass
class PSSettings(AlgoSettings):
    """What both parameter servers (syncps, edp) share: the wire's codecs and the EMA weights."""

    compression: str = "none"
    weights_compression: str = "none"
    codec: str = "none"            # the old name of compression (the yaml makes it ${.compression})
    ema: float = 0.0


@dataclass
class SyncPSSettings(PSSettings):
    straggler_timeout: float = 30.0


@dataclass
class EdpSettings(PSSettings):
    staleness_rule: str = "inverse"
    dc_lambda: float = 0.04
    max_staleness: int = 8
    pull_every: int = 1
    min_workers: int = 1  # start once this many registered; also the gradient guard's quorum (syncps: every worker)


@dataclass
class RingSettings(AlgoSettings):
    """What both ring algorithms (allreduce, diloco) share; checked in algorithms/launcher.py."""

    bucket_mb: Any = "auto"        # auto | a size in MB (Any: a number or the word)
    codec: str = "none"
    elastic: bool = True
    min_workers: int | None = None


@dataclass
class AllreduceSettings(RingSettings):
    zero: int = 0
    compression: str = "none"
    overlap: bool = True
    max_staleness: int = 0


@dataclass
class DilocoSettings(RingSettings):
    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 1
    overlap_steps: int = 0
    merge_alpha: float = 0.0
    round_s: float | None = None
    warmup_sync_steps: int = 0


@dataclass
class MpSettings(AlgoSettings):
    stages: int = 2
    microbatches: int = 1


ALGOS: dict[str, type[AlgoSettings]] = {
    "local": LocalSettings, "syncps": SyncPSSettings, "edp": EdpSettings, "allreduce": AllreduceSettings,
    "diloco": DilocoSettings, "mp": MpSettings,
}


# -- cluster.* ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultKnobs:
    """Test knobs, not settings a real run wants: they make a node slow or faulty on purpose, for the tests and
    benchmarks (``bench edp``, ``bench desk``) that need an unlike or misbehaving member on one machine. Set as
    ``cluster.nodes[i].delay_s`` etc.; off (0) by default."""

    delay_s: float = 0.0          # sleep this long after every step: an artificially slow node
    blowup_every: int = 0         # (allreduce) every Nth step's gradient x 1e6: a node whose gradient blows up
    lie_norm_every: int = 0       # (allreduce) every Nth step blow up the reduced chunks, report the old norm: a liar


@dataclass(frozen=True)
class NodeSpec:
    """One rank's ``cluster.nodes[rank]`` entry, typed (:meth:`ClusterSpec.node`): a training worker's (its batch
    size over ``train.batch_size``), a ring rank's or a pipeline stage's. ``faults``: its test knobs."""

    rank: int
    name: str
    batch_size: int
    device: str | None = None
    host: str | None = None
    port: int | None = None          # where a ring rank / stage listens (None: cluster.port + rank)
    threads: int | None = None       # a stage's torch threads
    weight: float = 1.0              # its share of a pipeline's layers (mp, partition=even)
    memory_gb: float | None = None   # what the node offers its stage (partition=auto; None: measured here)
    gflops: float | None = None      # its measured speed (partition=auto prefers the faster)
    precision: str | None = None     # inference: this stage's precision / quantize over the command's
    quantize: str | None = None
    faults: FaultKnobs = field(default_factory=lambda: FaultKnobs())


def message_bytes(cluster: dict) -> int:
    """``cluster.max_message_mb`` in bytes: the one conversion of the message-size limit (training's and
    inference's links both take :attr:`ClusterSpec.max_bytes`)."""
    mb = _typed(cluster, "max_message_mb", int, 2048)
    if mb is None or mb < 1:
        raise ConfigError(f"cluster.max_message_mb={mb!r} is invalid: give the largest message in MB, e.g. 2048")
    return mb * MB


def _typed(c: dict, key: str, kind: type, default):
    """``cluster.KEY`` checked to be ``kind`` (or null): the cluster group is open, so Hydra checks none of it."""
    value = c.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = value is None or (isinstance(value, bool) if kind is bool else
                           number and (kind is float or float(value).is_integer()))
    if not ok:
        raise ConfigError(f"cluster.{key}={value!r} is invalid: it must be {_KINDS[kind]}")
    return None if value is None else kind(value)


@dataclass(frozen=True)
class AutoSpec:
    """``cluster=auto``'s own keys (conf/cluster/auto.yaml documents each): how the coordinator
    (node/coordinator.py) finds, pairs and places the node agents."""

    peers: Any = field(default_factory=list)  # static agents, host:port (a list, or one string: discovery.peer_list)
    mdns: bool = True
    discover_s: float = 3.0
    expect: int | None = None
    server: str | None = None      # the node for syncps/edp's server (None: the most free memory)
    workers: int | None = None     # None: one per other node (rings: one per node)
    pair_timeout_s: float = 120.0
    state_dir: str = "~/.smolcluster"
    write: str | None = None
    discover_only: bool = False
    weights: str = "auto"          # inference: auto | send | shared (node/weightsend.py)

    @classmethod
    def of(cls, c: dict) -> AutoSpec:
        return cls(peers=c.get("peers") or [], mdns=bool(_typed(c, "mdns", bool, True)),
                   discover_s=_typed(c, "discover_s", float, 3.0), expect=_typed(c, "expect", int, None),
                   server=None if c.get("server") is None else str(c["server"]),
                   workers=_typed(c, "workers", int, None), pair_timeout_s=_typed(c, "pair_timeout_s", float, 120.0),
                   state_dir=str(c.get("state_dir") or "~/.smolcluster"),
                   write=None if c.get("write") is None else str(c["write"]),
                   discover_only=bool(_typed(c, "discover_only", bool, False)), weights=str(c.get("weights") or "auto"))


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster group, typed: what training, inference's stages and head, the coordinator and the launchers
    read. ``nodes`` stays the per-node dicts (:meth:`worker` types a training rank's; stages, placement and the
    launchers read keys of their own there); ``rest`` keeps the keys no field types (the launchers' ``ssh`` and
    ``server`` blocks), so :meth:`as_file` writes the cluster file back whole; ``auto``: cluster=auto's keys."""

    name: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    bind: str | None = None
    workers: int = 1
    nodes: list = field(default_factory=list)
    keys: str | None = None
    insecure: bool = False
    heartbeat_s: float = 1.0
    liveness_s: float = 10.0
    connect_timeout_s: float = 60.0
    max_bytes: int = 2048 * MB    # cluster.max_message_mb (message_bytes)
    auto: AutoSpec | None = None
    rest: dict = field(default_factory=dict)
    # the keys the file has, and those of them it left null: as_file writes back what the file said
    given: frozenset = field(default=frozenset(), compare=False)
    nulls: frozenset = field(default=frozenset(), compare=False)

    @classmethod
    def of(cls, c: dict) -> ClusterSpec:
        """The cluster group (open: a cluster file is the user's) read with its types checked here."""
        nodes = c.get("nodes") or []
        if not isinstance(nodes, list) or any(n is not None and not isinstance(n, dict) for n in nodes):
            raise ConfigError(f"cluster.nodes={nodes!r} is invalid: give a list of per-node settings, "
                              "e.g. cluster.nodes=[{batch_size: 32},{device: cpu}]")
        workers = _typed(c, "workers", int, 1)  # null (cluster=auto: the coordinator decides, and passes it on)
        auto = AutoSpec.of(c) if c.get("name") == "auto" else None
        own = {f.name for f in fields(cls)} | {f.name for f in fields(AutoSpec) if auto} | {"max_message_mb"}
        return cls(name=c.get("name"), host=str(c.get("host") or "127.0.0.1"), port=_typed(c, "port", int, None),
                   bind=c.get("bind"), workers=1 if workers is None else workers, nodes=list(nodes),
                   keys=c.get("keys"), insecure=bool(_typed(c, "insecure", bool, False)),
                   heartbeat_s=_typed(c, "heartbeat_s", float, 1.0), liveness_s=_typed(c, "liveness_s", float, 10.0),
                   connect_timeout_s=_typed(c, "connect_timeout_s", float, 60.0), max_bytes=message_bytes(c),
                   auto=auto, rest={k: v for k, v in c.items() if k not in own},
                   given=frozenset(c), nulls=frozenset(k for k, v in c.items() if v is None))

    def as_file(self) -> dict:
        """These settings as a cluster file (plain data), which :meth:`of` reads back the same: what the
        launchers ship to every node. Where a setting still has its default, the file's own word is written back
        (absent stays absent, null stays null: no ``host`` stays no host); a changed one (``port``) is written."""
        typed = {}
        for f in fields(self):
            if f.name in ("max_bytes", "auto", "rest", "given", "nulls"):
                continue
            value = getattr(self, f.name)
            if value != _default(f) or (f.name in self.given and f.name not in self.nulls):
                typed[f.name] = value
            elif f.name in self.nulls:
                typed[f.name] = None
        auto = dataclasses.asdict(self.auto) if self.auto else {}
        return {**self.rest, **typed, **auto, "max_message_mb": self.max_bytes // MB, "nodes": list(self.nodes)}

    def node(self, rank: int, batch_size: int = 0) -> NodeSpec:
        """Rank ``rank``'s ``cluster.nodes[rank]`` entry, typed and checked (the defaults where the list ends or
        the entry is null): the one reader of a node's settings."""
        node = dict(self.nodes[rank]) if rank < len(self.nodes) and self.nodes[rank] else {}
        where = f"cluster.nodes[{rank}]"

        def number(key: str, default, why: str):
            value = node.get(key, default)
            if value is None and default is not None or value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{where}.{key}={value!r} {why}")
            return value

        threads = node.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"{where}.threads={threads!r} must be a positive integer")
        port = node.get("port")
        return NodeSpec(rank, str(node.get("name", f"worker{rank}")), int(node.get("batch_size", batch_size)),
                        node.get("device"), node.get("host"), None if port is None else int(port), threads,
                        float(number("weight", 1.0, "is invalid: it must be a positive number")),
                        number("memory_gb", None, "is invalid: give a positive number of GB"),
                        number("gflops", None, "is invalid: give the node's measured GFLOP/s"),
                        node.get("precision"), node.get("quantize"),
                        FaultKnobs(float(node.get("delay_s", 0.0)), int(node.get("blowup_every", 0)),
                                   int(node.get("lie_norm_every", 0))))

    def worker(self, rank: int, batch_size: int) -> NodeSpec:
        """Training rank ``rank``'s settings: ``cluster.nodes[rank]`` overrides the defaults."""
        spec = self.node(rank, batch_size)
        if spec.batch_size <= 0:
            raise ConfigError(f"cluster.nodes[{rank}].batch_size={spec.batch_size} must be positive")
        return spec


# -- the whole run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """One process's whole training config, typed. ``composed`` is the resolved config as plain data: what
    summary.json and W&B record of the run (never read for behaviour)."""

    train: TrainSettings
    algo: AlgoSettings
    cluster: ClusterSpec
    logging: LoggingSettings
    model: dict
    data: dict
    run_id: str | None
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    role: str = "launch"
    rank: int | None = None
    node: str | None = None
    composed: dict = field(default_factory=dict)

    def batch_sizes(self) -> list[int]:
        """Every worker rank's batch size (``cluster.nodes[r].batch_size`` or ``train.batch_size``)."""
        return [self.cluster.worker(r, self.train.batch_size).batch_size for r in range(self.cluster.workers)]


# -- the schema Hydra checks conf/config.yaml and every override against ------------------------------
@dataclass
class TrainSchema:
    train: TrainSettings = field(default_factory=TrainSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    algo: Any = MISSING       # typed by its own NAME_schema (conf/algo/NAME.yaml's defaults)
    model: Any = MISSING
    data: Any = MISSING
    cluster: Any = MISSING    # open: a cluster file carries keys for launchers (ssh, server) and discovery
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    role: str = "launch"
    rank: int | None = None
    node: str | None = None
    run_id: str | None = None


def register() -> None:
    """Make ``train_schema`` and each algorithm's ``NAME_schema`` known to Hydra (before ``hydra.main`` runs)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    for name, cls in ALGOS.items():
        cs.store(group="algo", name=f"{name}_schema", node=cls)


register()


OPEN_GROUPS = ("model", "hydra")  # take keys the defaults do not list: a custom model's kwargs, Hydra's own


def refuse_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse ``+train.stpes=100``: a key the defaults do not have would be stored and ignored. Hydra itself
    refuses the typo without ``+``, then advises adding the ``+``; this check ends that road with the near
    name. (``++key`` is Hydra's explicit "set or add", and is left to the user.)"""
    # here, not at the top: importing paths registers this module's schemas
    from smolcluster.paths import CONFIG_DIR

    groups = {d.name for d in CONFIG_DIR.iterdir() if d.is_dir()}
    for o in overrides:
        if not o.startswith("+") or o.startswith("++"):
            continue
        key = o[1:].split("=", 1)[0]
        parts = key.split(".")
        if parts[0] in OPEN_GROUPS or (len(parts) == 1 and parts[0] in groups):
            continue
        parent = OmegaConf.select(cfg, ".".join(parts[:-1])) if len(parts) > 1 else cfg
        known = [k for k in (parent.keys() if isinstance(parent, DictConfig) else []) if k != parts[-1]]
        where = ".".join(parts[:-1])
        near = difflib.get_close_matches(parts[-1], known, n=1)
        hint = (f"did you mean {where + '.' if where else ''}{near[0]}?" if near else
                f"{where or 'the top level'} has {', '.join(map(str, known))}" if known else
                f"{where} takes no settings")
        raise ConfigError(f"{key} is not a setting (it would be stored and ignored): {hint}")


def train_config(cfg: DictConfig) -> TrainConfig:
    """The composed config as a :class:`TrainConfig` (the only place training reads Hydra's config)."""
    algo = OmegaConf.to_object(cfg.algo)
    if not isinstance(algo, AlgoSettings):
        raise ConfigError(f"algo={cfg.algo.name}: conf/algo/{cfg.algo.name}.yaml names no schema; add a dataclass "
                          f"to smolcluster/train_settings.py's ALGOS and `defaults: [{cfg.algo.name}_schema, _self_]`")
    plain = OmegaConf.to_container(cfg, resolve=True)
    rank = cfg.get("rank")
    return TrainConfig(
        train=OmegaConf.to_object(cfg.train), algo=algo, cluster=ClusterSpec.of(plain["cluster"]),
        logging=OmegaConf.to_object(cfg.logging), model=plain["model"], data=plain["data"],
        run_id=None if cfg.run_id is None else str(cfg.run_id), seed=int(cfg.seed), device=str(cfg.device),
        resume=None if cfg.resume is None else str(cfg.resume), role=str(cfg.role),
        rank=None if rank is None else int(rank), node=cfg.get("node"), composed=plain)


# -- the SSH and Slurm launchers ---------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchSpec:
    """What the SSH and Slurm launchers read of the config they compose (:func:`launch_spec`, once, at their
    entry): the roles' layout, and the cluster they ship to every node (:meth:`ClusterSpec.as_file`)."""

    cluster: ClusterSpec
    algo: str | None          # train's algo.name; None: inference stages (``launchers.ssh serve``)
    stages: int | None        # mp's algo.stages, or inference's stages; None for the others
    model: str                # model.name (in the run dir's name)
    partition: str = "even"   # inference: auto fills cluster.nodes[i].memory_gb / gflops from the preflight
    host_given: bool = True   # the cluster file names cluster.host (a launcher assumes no loopback default)


def _default(f):
    """A dataclass field's default value (its factory's, for a list)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def launch_spec(cfg: DictConfig) -> LaunchSpec:
    """A composed ``config`` (train) or ``infer`` config as the launchers' :class:`LaunchSpec`."""
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    algo = cfg.algo.name if "algo" in cfg else None
    if algo is not None and "workers" in cluster and cluster["workers"] is None:  # (null means 1 only for auto)
        raise ConfigError("cluster.workers=None must be a positive integer: how many workers the launcher starts")
    stages = cfg.algo.stages if algo == "mp" else cfg.get("stages") if algo is None else None
    return LaunchSpec(ClusterSpec.of(cluster), algo, None if stages is None else int(stages),
                      str(cfg.model.get("name")), str(cfg.get("partition") or "even"), bool(cluster.get("host")))
