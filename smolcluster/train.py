"""``python -m smolcluster.train``: the Hydra entry point for every training algorithm.

    python -m smolcluster.train                         # default algo on embedded digits
    python -m smolcluster.train algo=local model=gpt2-tiny data=text
    python -m smolcluster.train --help                  # config groups and examples
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from loguru import logger
from omegaconf import DictConfig, open_dict

from smolcluster import algorithms
from smolcluster.algorithms import launcher
from smolcluster.cluster import new_run_id, node_name
from smolcluster.config import validate
from smolcluster.errors import SmolclusterError
from smolcluster.launch.cli import user_errors
from smolcluster.launch.supervisor import exit_without_teardown, sigterm_as_interrupt
from smolcluster.paths import CONFIG_DIR
from smolcluster.telemetry.logging import setup_logging
from smolcluster.telemetry.run_files import abort_open
from smolcluster.train_settings import refuse_added_keys, train_config


def describe(summary: dict) -> str:
    parts = [f"{summary['algo']} {summary['model']}: {summary['steps']} steps, {summary['samples']:,} samples "
             f"in {summary['wall_s']:.1f}s ({summary['samples_per_s']:,.0f} samples/s)"]
    if summary.get("eval_accuracy") is not None:
        parts.append(f"test accuracy {summary['eval_accuracy']:.2%}")
    if summary.get("eval_loss") is not None:
        parts.append(f"eval loss {summary['eval_loss']:.4f}")
    return ", ".join(parts)


def run(cfg: DictConfig) -> dict | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with open_dict(cfg):
        cfg.run_id = str(cfg.get("run_id") or new_run_id())  # run_id=123 from a user is still a label string
    role = cfg.role if cfg.algo.name != "local" else "main"
    setup_logging(node=cfg.get("node") or node_name(), role=role, rank=cfg.rank if cfg.rank is not None else "",
                  algo=cfg.algo.name, run_id=cfg.run_id, run_dir=run_dir, level=cfg.logging.level,
                  loki=cfg.logging.get("loki"))
    refuse_added_keys(cfg, list(HydraConfig.get().overrides.task))
    tc = train_config(cfg)  # the one read of Hydra's config: typed settings from here on
    validate(tc)
    if cfg.model.get("deprecated"):
        logger.warning(cfg.model.deprecated)
    if role == "launch" and tc.cluster.auto is not None:  # through the node agents on the LAN
        from smolcluster.node.coordinator import run_auto

        summary = run_auto(tc, run_dir)
    elif role == "launch":  # every role as a child here; this process never imports torch
        summary = launcher.launch(tc, run_dir)
    else:
        summary = algorithms.get(tc.algo.name).run(tc, run_dir)
    if summary and role in ("main", "launch", "server"):
        logger.success(describe(summary))
        files = [n for n in ("metrics.jsonl", "summary.json", "checkpoint.safetensors", "loss.png")
                 if (run_dir / n).is_file()]  # (a cluster=auto run's are on its lead node: said above)
        if (run_dir / "hf" / "config.json").is_file():
            files.append("hf/ (a Hugging Face model directory)")
        if (run_dir / "adapter" / "adapter_config.json").is_file():
            files.append("adapter/ (a PEFT LoRA adapter)")
        if files:
            logger.success(f"run files: {run_dir}/ ({', '.join(files)})")
    return summary


def _log_or_hand_to_sweep(e: SmolclusterError) -> None:
    logger.error(str(e))
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise e  # let Hydra record the failed job (the sweep table lists it) and go on


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
@user_errors(on_error=_log_or_hand_to_sweep, interrupted="interrupted")  # one line, exit 2; Ctrl-C: 130
def main(cfg: DictConfig) -> None:
    sigterm_as_interrupt()  # SIGTERM unwinds like Ctrl-C: children stopped, run files and W&B runs closed
    try:
        run(cfg)
    except BaseException as e:
        abort_open(e)  # recorders not finished: a last "stopped" row, files closed, W&B given the exit code
        raise


if __name__ == "__main__":
    main()  # errors exit inside (codes 2, 130; a traceback for a bug)
    exit_without_teardown()
