"""Where the Hydra config lives: ``conf/`` at the top of a source checkout, or inside the installed package."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
# A source checkout (editable install, or running from the repo) keeps conf/ beside the package;
# a wheel ships the same files as smolcluster/conf (see pyproject.toml).
CONFIG_DIR = _PKG.parent / "conf" if (_PKG.parent / "conf" / "config.yaml").is_file() else _PKG / "conf"
