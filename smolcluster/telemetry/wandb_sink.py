"""Weights & Biases tracking: one W&B group per cluster run, one W&B run per node in it.

``logging.wandb.mode``: ``disabled`` (the default), ``offline`` (written under the
run directory; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later) or
``online``, which falls back to offline, with a warning, when this machine is not
logged in (``wandb login`` or ``WANDB_API_KEY``): a run never fails for want of an
account or a network. The group is the cluster's ``run_id``, so the server's run and
every worker's run appear together; each is named ``NODE-ROLE[RANK]``.
"""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

MODES = ("disabled", "offline", "online")

# metrics.jsonl key prefixes -> W&B sections, so the W&B page groups them sensibly.
_SECTIONS = (
    ("eval_", "eval/"), ("grad_norm", "grad_norm"), ("staleness", "edp/staleness"),
    ("bytes_", "wire/bytes_"), ("cpu_percent", "hardware/cpu_percent"), ("rss_bytes", "hardware/rss_bytes"),
    ("system_cpu_percent", "hardware/system_cpu_percent"), ("gpu_", "hardware/gpu_"), ("loss/", "worker/"),
)


def wandb_key(key: str) -> str:
    """``loss`` -> ``train/loss``, ``eval_accuracy`` -> ``eval/accuracy``, ``loss/1`` -> ``worker/1`` ..."""
    for prefix, section in _SECTIONS:
        if key.startswith(prefix):
            return section + key[len(prefix):]
    return "train/" + key


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """The mode to run W&B in (``mode`` is one of MODES: config.validate checks it)."""
    if mode == "online" and not logged_in():
        logger.warning("logging.wandb.mode=online but this machine is not logged in to W&B (run `wandb login` "
                       "or set WANDB_API_KEY): logging offline; upload later with `wandb sync`")
        return "offline"
    return mode


class WandbSink:
    """A metrics sink (``log(step, row)`` / ``close(summary)``) writing one W&B run for this node."""

    def __init__(self, wcfg, run_dir: Path, identity: dict, config: dict, mode: str):
        import wandb

        name = f"{identity.get('node', 'node')}-{identity.get('role', '')}{identity.get('rank', '')}"
        self.run = wandb.init(
            project=wcfg.project or "smolcluster", entity=wcfg.entity,
            group=wcfg.group or identity.get("run_id") or None, job_type=identity.get("role"),
            name=name, dir=str(run_dir), config=config, mode=mode, tags=[identity.get("algo", "")],
            settings=wandb.Settings(console="off", silent=True),
        )
        logger.info(f"W&B {mode} run {self.run.id} in group {self.run.group!r} ({self.run.dir})")

    def log(self, step: int, metrics: dict) -> None:
        row = {wandb_key(k): v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if row:
            self.run.log(row, step=step)

    def close(self, summary: dict | None = None, exit_code: int = 0) -> None:
        """Finish the run: W&B records ``exit_code`` (non-zero: the node was stopped or failed)."""
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=exit_code)
