"""Dispatch ``python -m smolcluster.bench NAME [args...]`` to ``smolcluster.bench.NAME.main``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import smolcluster.bench as pkg
from smolcluster.errors import SmolclusterError

_NOT_BENCHES = {"report", "common", "desk", "__main__"}
_NAMED = {"desk_goals": "desk", "diloco_sim": "diloco-sim"}  # module -> bench name (desk.py is the emulated desk the benches share)


def available() -> list[str]:
    return sorted(_NAMED.get(m.name, m.name) for m in pkgutil.iter_modules(pkg.__path__)
                  if m.name not in _NOT_BENCHES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m smolcluster.bench NAME [--help]\n\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"error: unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"smolcluster.bench.{next((m for m, b in _NAMED.items() if b == name), name)}")
    try:
        return int(module.main(argv[1:]) or 0)
    except SmolclusterError as e:  # a missing file or a bad option: one line, as train/infer print it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
