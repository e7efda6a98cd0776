"""Training algorithms: each is one module with ``run(cfg: TrainConfig, run_dir) -> dict`` (the run's summary).

A new strategy is a new file here, a ``conf/algo/NAME.yaml`` naming ``NAME_schema`` in its defaults, and that
schema: a dataclass of its settings in ``smolcluster/train_settings.py``'s ``ALGOS``.
"""

from __future__ import annotations

import importlib
import pkgutil

from smolcluster.errors import ConfigError

_HELPERS = {"ps", "launcher", "guard", "membership"}  # shared machinery, not algorithms of their own


def available() -> list[str]:
    import smolcluster.algorithms as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in _HELPERS)


def get(name: str):
    if name not in available():
        raise ConfigError(f"algo={name!r} is unknown: choose one of {', '.join(available())}")
    return importlib.import_module(f"smolcluster.algorithms.{name}")
