"""Where the Hydra config lives: ``conf/`` at the top of a source checkout, or inside the installed package."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent
# A source checkout (editable install, or running from the repo) keeps conf/ beside the package;
# a wheel ships the same files as smolcluster/conf (see pyproject.toml).
CONFIG_DIR = _PKG.parent / "conf" if (_PKG.parent / "conf" / "config.yaml").is_file() else _PKG / "conf"

# conf/config.yaml names train_schema (and conf/algo/NAME.yaml its NAME_schema): every compose of it needs them
# registered, so they are wherever the config directory is found.
import smolcluster.train_settings  # noqa: E402, F401
