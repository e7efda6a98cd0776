"""The one override filter: which of the user's Hydra overrides a launcher hands on to the roles it starts.

- :func:`child_overrides`: the user's overrides minus the ones every launcher sets per role itself (role, rank,
  port, run id, run dir), minus a caller's own (``drop``), or only those a caller's roles take (``keep``). Used by
  the local launchers (:mod:`.local`), the SSH launcher (``launchers/ssh.py``) and the coordinator of node agents
  (``node/coordinator.py``).
- :func:`check_override`: the agent's side, what a paired coordinator may tell a role an agent starts: plain
  ``key=value`` overrides, nothing more.

Each argument an agent receives is parsed by Hydra's own override parser (the one ``python -m smolcluster.train``
will use), so what is checked here is what Hydra will do. Allowed: ``key=value`` (Hydra's CHANGE)
of a key the program's config has (``conf/config.yaml`` for train, ``conf/infer.yaml`` for infer),
a config group picked by a plain name (``model=gpt2-tiny``: a file of the agent's own ``conf/``).
Refused: anything starting with ``-`` (Hydra's flags: ``--experimental-rerun`` unpickles a file),
``+``/``++``/``~`` forms, ``key@package``, sweeps, ``hydra`` keys in any form, ``role``/``rank``
(the agent sets them), any key part or dict key starting with ``_`` (``_target_`` and kin: no
class of the coordinator's choosing is instantiated; models come from the agent's own config
files), ``${...}`` interpolations (resolvers read the environment), and control characters.
"""

from __future__ import annotations

import functools

from omegaconf import OmegaConf

from smolcluster.paths import CONFIG_DIR

# Overrides every launcher sets for each role itself (a user's value would clash with them).
LAUNCHER_SETS = ("role=", "rank=", "cluster.port=", "run_id=", "++run_id=", "+run_id=", "hydra.run.dir=",
                 "hydra.output_subdir=", "train.progress=")
_CONFIG = {"train": "config.yaml", "infer": "infer.yaml"}
_NOT_THROUGH_AN_AGENT = ("hydra", "role", "rank", "defaults")


def child_overrides(overrides: list[str] | None = None, *, drop: tuple[str, ...] = (),
                    keep: tuple[str, ...] | None = None) -> list[str]:
    """``overrides`` (default: this Hydra run's command line) to hand on to children: minus :data:`LAUNCHER_SETS`
    and the prefixes in ``drop``; with ``keep``, only those starting with one of its prefixes."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ValueError, ImportError):  # not under Hydra (tests calling a launcher directly)
            overrides = []
    out = [o for o in overrides if not o.startswith((*LAUNCHER_SETS, *drop))]
    return out if keep is None else [o for o in out if o.startswith(keep)]


@functools.cache
def program_keys(program: str) -> tuple[frozenset, frozenset]:
    """(top-level keys, config groups) of ``python -m smolcluster.PROGRAM``'s primary config."""
    cfg = OmegaConf.load(CONFIG_DIR / _CONFIG[program])
    groups = {next(iter(d)) for d in cfg.get("defaults", []) if isinstance(d, dict) or OmegaConf.is_dict(d)}
    groups = {g for g in groups if "/" not in g and not g.startswith("override")}
    return frozenset(set(cfg.keys()) | groups) - set(_NOT_THROUGH_AN_AGENT), frozenset(groups)


def _hidden(value) -> bool:
    """A value that could reach past data: a dict key starting with ``_`` or an interpolation, at any depth."""
    if isinstance(value, dict):
        return any(str(k).startswith("_") or _hidden(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_hidden(v) for v in value)
    return isinstance(value, str) and "${" in value


def check_override(arg, program: str) -> str | None:
    """None for an override an agent passes on; else why not (one line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    # (imported here: node.pairing brings zmq, which a launcher filtering overrides never needs)
    from smolcluster.node.pairing import SAFE_NAME, printable

    if not isinstance(arg, str):
        return "args must be strings (key=value overrides)"
    shown = printable(arg, 120)
    if any(ord(c) < 32 or ord(c) == 127 for c in arg):
        return f"override {shown!r} holds a control character"
    if arg.startswith("-"):
        return f"{shown!r}: no flags through an agent, only key=value overrides"
    try:
        o = OverridesParser.create().parse_override(arg)
    except Exception:
        return f"{shown!r} is not a key=value override"
    if o.type is not OverrideType.CHANGE or o.package is not None or o.is_sweep_override():
        return f"{shown!r}: only plain key=value overrides (no +, ++, ~, @package or sweeps) through an agent"
    parts = o.key_or_group.split(".")
    keys, groups = program_keys(program)
    if parts[0] not in keys:
        return f"{shown!r}: {parts[0]!r} is not a key smolcluster.{program} takes through an agent"
    value = o.value()
    if any(p.startswith("_") for p in parts) or _hidden(value):
        return f"{shown!r}: no _target_-like keys or ${{...}} interpolations through an agent"
    if len(parts) == 1 and parts[0] in groups and not (isinstance(value, str) and SAFE_NAME.fullmatch(value)):
        return f"{shown!r}: a config group takes the name of one of this node's config files"
    return None
