"""What a ``role=launch`` process runs: check the config, start every role as a child, return the summary.

The launcher itself trains nothing, so it never imports torch (its children do): it looks up here how each
algorithm launches instead of importing the algorithm's module, which would cost seconds of imports before
the first child starts. The checks of ``allreduce`` and ``diloco`` live here for that reason (their
modules use them too), so a bad config is one error from the launcher, not one per child.
"""

from __future__ import annotations

import json
from pathlib import Path

from smolcluster.errors import ConfigError
from smolcluster.train_settings import AlgoSettings, TrainConfig
from smolcluster.transport.compression import get_codec


def launch(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """``role=launch`` of ``cfg.algo.name``; an algorithm not listed here launches through its own module."""
    name = cfg.algo.name
    if name in ("syncps", "edp"):  # a server and its workers
        from smolcluster.launch.local import launch_star

        return launch_star(cfg, run_dir)
    if name in RING_CHECKS:
        RING_CHECKS[name](cfg)
        return launch_ring(cfg, run_dir)
    from smolcluster import algorithms

    return algorithms.get(name).run(cfg, run_dir)


def launch_ring(cfg: TrainConfig, run_dir: Path) -> dict:
    """Every rank of a ring (``allreduce``, ``diloco``) as a ``python -m smolcluster.train`` child here."""
    from smolcluster.launch.local import launch_ranks

    n = int(cfg.cluster.workers)
    launch_ranks(cfg, run_dir, n, "worker", f"algo={cfg.algo.name} (a ring of {n})")
    return json.loads((Path(run_dir) / "summary.json").read_text())


def codecs(grads: str, weights: str = "none") -> tuple[str, str]:
    """(gradient codec, weights codec). ``algo.codec`` is the old name of ``algo.compression`` (the yaml makes it
    follow ``compression``, so either override works). Weights default to uncompressed: a worker's weights have
    no error feedback, so int8 rounding would accumulate in every copy instead of being made up later."""
    get_codec(grads)  # an unknown name is a ConfigError listing the valid ones
    if get_codec(weights).name == "int8":
        raise ConfigError("algo.weights_compression=int8 is not supported (no error feedback for weights): "
                          "choose none, fp16 or bf16")
    return grads, weights


def check_allreduce(cfg: TrainConfig) -> None:
    a = cfg.algo
    if a.zero not in (0, 1):
        raise ConfigError(f"algo.zero={a.zero!r} is invalid: 0 (every rank steps everything) or 1 (ZeRO-1)")
    _check_bucket(a)
    codecs(a.codec)  # an unknown algo.compression is a one-line error listing the codecs
    k = a.max_staleness
    if k < 0:
        raise ConfigError(f"algo.max_staleness={k!r} is invalid: a whole number of steps >= 0 (0 = synchronous)")
    if k and a.zero:
        raise ConfigError("algo.max_staleness>0 with algo.zero=1 is not supported: ZeRO-1 steps each shard in "
                          "lock-step; use algo.zero=0 or algo.max_staleness=0")
    _min_workers(cfg)


def _check_bucket(a: AlgoSettings) -> None:
    mb = a.bucket_mb
    if mb != "auto" and (not isinstance(mb, (int, float)) or isinstance(mb, bool) or mb <= 0):
        raise ConfigError(f"algo.bucket_mb={mb!r} is invalid: auto, or a positive number of MB, e.g. 25")


def _min_workers(cfg: TrainConfig) -> int | None:
    m = cfg.algo.min_workers
    if m is not None and not 1 <= m <= cfg.cluster.workers:
        raise ConfigError(f"algo.min_workers={m!r} is invalid: between 1 and cluster.workers "
                          f"({cfg.cluster.workers}), or null for all of them")
    return m


def _whole(a: AlgoSettings, key: str, low: int) -> int:
    v = getattr(a, key)
    if v < low:  # (a whole number: the schema types it)
        raise ConfigError(f"algo.{key}={v!r} is invalid: a whole number >= {low}")
    return v


def check_diloco(cfg: TrainConfig) -> None:
    a = cfg.algo
    h, f, tau = _whole(a, "inner_steps", 1), _whole(a, "fragments", 1), _whole(a, "overlap_steps", 0)
    _whole(a, "warmup_sync_steps", 0)
    if f > h:
        raise ConfigError(f"algo.fragments={f} exceeds algo.inner_steps={h}: each fragment needs its own step of "
                          f"the round to sync at; lower algo.fragments or raise algo.inner_steps")
    if tau >= h:
        raise ConfigError(f"algo.overlap_steps={tau} must be below algo.inner_steps={h}: a fragment's outer step "
                          "is merged before its next sync")
    for key, lo, hi in (("outer_lr", 0.0, None), ("outer_momentum", 0.0, 1.0), ("merge_alpha", 0.0, 1.0)):
        v = getattr(a, key)
        if v < lo or (hi is not None and v >= hi) or (key == "outer_lr" and v == 0):
            raise ConfigError(f"algo.{key}={v:g} is invalid: a number in {'(0, inf)' if key == 'outer_lr' else '[0, 1)'}")
    get_codec(a.codec)  # an unknown codec is a one-line error listing them
    t = a.round_s
    if t is not None:
        if t <= 0:
            raise ConfigError(f"algo.round_s={t:g} is invalid: seconds per round (> 0), or null for algo.inner_steps")
        if f > 1 or tau:
            raise ConfigError("algo.round_s works with plain DiLoCo only: set algo.fragments=1 algo.overlap_steps=0")
        if cfg.resume or cfg.train.stop_after:
            raise ConfigError("algo.round_s runs cannot be stopped and resumed (the ranks are at different steps): "
                              "drop resume= / train.stop_after, or use fixed rounds (algo.round_s=null)")
    _check_bucket(a)
    m = _min_workers(cfg)
    if m is not None and m < cfg.cluster.workers and (f > 1 or tau or t is not None or a.elastic is False):
        raise ConfigError("algo.min_workers below cluster.workers needs an elastic ring (ranks join later): "
                          "algo.fragments=1 algo.overlap_steps=0 algo.round_s=null algo.elastic=true")


RING_CHECKS = {"allreduce": check_allreduce, "diloco": check_diloco}
