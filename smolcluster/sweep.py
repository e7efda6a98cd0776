"""The sweep table: one row per job of a Hydra multirun, built from each job's ``summary.json``.

    python -m smolcluster.train -m algo=syncps,edp train.lr=1e-3,3e-3
    # -> multirun/DATE/TIME/{0,1,2,3}/summary.json  and  multirun/DATE/TIME/sweep.{md,csv}

:class:`SweepTable` is a Hydra callback (listed under ``hydra.callbacks`` in
``conf/config.yaml``). It rewrites the table after every job (``on_job_end``, so a
sweep that dies half-way still leaves the rows it finished) and once more when the
whole sweep ends (``on_multirun_end``). It reads only files, so it works the same
with the basic launcher, submitit's local launcher (jobs in parallel) and Slurm.

``python -m smolcluster.sweep DIR`` rebuilds the table of a sweep directory by hand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from smolcluster.launch.cli import command

# The summary.json figures that go into the table, in this order (those no job has are left out).
FIGURES = ("algo", "model", "data", "steps", "samples", "wall_s", "samples_per_s", "final_loss",
           "eval_loss", "eval_accuracy", "workers_lost")
# Overrides that differ per job for bookkeeping, not because the user swept them.
_NOT_SWEPT = ("hydra.", "run_id=")


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job directories under a sweep dir: those holding Hydra's ``.hydra/overrides.yaml`` or a summary."""
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.rglob("summary.json")}
    dirs.discard(sweep_dir)

    def order(d: Path) -> tuple:
        rel = d.relative_to(sweep_dir)
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel.parts)

    return sorted(dirs, key=order)


def _overrides(job_dir: Path) -> dict[str, str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        if not str(item).startswith(_NOT_SWEPT):
            out[key] = value
    return out



def collect(sweep_dir: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the sweep table: job, the swept keys, status, then the summary figures."""
    sweep_dir = Path(sweep_dir)
    rows, swept = [], {}
    for job_dir in find_jobs(sweep_dir):
        overrides = _overrides(job_dir)
        summary_path = job_dir / "summary.json"
        summary: dict = {}
        status = "no summary.json (failed or still running)"
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
                status = "ok"
            except json.JSONDecodeError as e:
                status = f"unreadable summary.json: {e}"
        for k, v in overrides.items():
            swept.setdefault(k, set()).add(v)
        row = {"job": str(job_dir.relative_to(sweep_dir)), **overrides, "status": status}
        for key in FIGURES:
            value = summary.get(key)
            if key == "workers_lost" and isinstance(value, list):
                value = len(value)
            row[key] = value
        rows.append(row)
    # A key that takes several values across jobs is a swept one; a key every job shares is not news.
    varying = [k for k, vals in swept.items() if len(vals) > 1] or list(swept)
    figures = [k for k in FIGURES if any(r.get(k) is not None for r in rows)]
    columns = ["job", *varying, "status", *figures]
    return columns, [{c: r.get(c) for c in columns} for r in rows]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if key == "eval_accuracy" and isinstance(value, (int, float)):
        return f"{value:.2%}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if r[c] is None else r[c]) for c in columns} for r in rows)
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    # jobs running in parallel may rewrite the table at the same moment: readers see one whole version
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write ``sweep.md`` and ``sweep.csv`` into the sweep dir; returns their paths."""
    sweep_dir = Path(sweep_dir)
    columns, rows = collect(sweep_dir)
    md, csv_path = sweep_dir / "sweep.md", sweep_dir / "sweep.csv"
    ok = sum(r["status"] == "ok" for r in rows)
    header = f"# Sweep {sweep_dir}\n\n{ok} of {len(rows)} jobs finished with a summary.json.\n\n"
    _write_atomic(md, header + to_markdown(columns, rows))
    _write_atomic(csv_path, to_csv(columns, rows))
    return md, csv_path


class SweepTable(Callback):
    """Hydra callback: keep ``sweep.md`` / ``sweep.csv`` in the sweep directory up to date.

    Its two methods are entry points: Hydra calls them with its composed config (a ``DictConfig``, the
    callback interface's type). They read only ``hydra.mode`` and ``hydra.sweep.dir`` from it; everything
    below takes the sweep directory as a Path."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            write_table(Path(config.hydra.sweep.dir))
        except Exception as e:  # the table is a convenience: never fail a finished job over it
            logger.warning(f"could not update the sweep table in {config.hydra.sweep.dir}: {e}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            logger.warning(f"sweep dir {sweep_dir} does not exist: no sweep table written")
            return
        md, csv_path = write_table(sweep_dir)
        print(md.read_text(), file=sys.stderr)
        logger.success(f"sweep table: {md} and {csv_path}")


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m smolcluster.sweep SWEEP_DIR   (rebuilds SWEEP_DIR/sweep.md and sweep.csv)",
              file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir} is not a directory: give a multirun sweep dir "
              "(e.g. multirun/2024-05-01/12-00-00)", file=sys.stderr)
        return 2
    md, _ = write_table(sweep_dir)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
