"""What a run leaves behind: metrics.jsonl (one object per logged step), summary.json, loss.png.

One :class:`RunRecorder` per run (the server's or the local process's); it also
fans each logged step out to the optional sinks (W&B, Prometheus) built from
``logging`` config.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loguru import logger


class RunRecorder:
    def __init__(self, run_dir: str | Path, sinks: list | None = None, append: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._file = self.metrics_path.open("a" if append else "w", buffering=1)
        self.sinks = list(sinks or [])
        self.t0 = time.time()

    def log(self, step: int, **metrics) -> dict:
        row = {"step": step, "time": round(time.time() - self.t0, 4), **metrics}
        self._file.write(json.dumps(row, default=float) + "\n")
        for sink in self.sinks:
            try:
                sink.log(step, metrics)
            except Exception as e:  # a tracker must never take training down
                logger.warning(f"metrics sink {type(sink).__name__} failed: {e}")
        return row

    def finish(self, summary: dict) -> dict:
        self._file.close()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        try:
            plot_losses(self.metrics_path, self.run_dir / "loss.png", title=f"{summary.get('algo')} / {summary.get('model')}")
        except Exception as e:
            logger.warning(f"could not draw loss.png: {e}")
        for sink in self.sinks:
            try:
                sink.close(summary)
            except Exception as e:
                logger.warning(f"metrics sink {type(sink).__name__} failed to close: {e}")
        return summary


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_losses(metrics_path: str | Path, out: str | Path, title: str = "") -> Path:
    """Train loss (and per-worker loss when present) and eval loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        for key, value in r.items():
            if key == "loss" or key == "eval_loss" or (key.startswith("loss/")):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(r["step"])
                ys.append(value)
    for key, (xs, ys) in sorted(series.items()):
        style = dict(marker="o", lw=2) if key == "eval_loss" else dict(lw=1.5 if key == "loss" else 0.8)
        ax.plot(xs, ys, label=key.replace("loss/", "worker "), **style)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def open_recorder(cfg, run_dir: str | Path, append: bool = False) -> RunRecorder:
    """A recorder for this run, with the W&B / Prometheus sinks that ``logging`` config enables."""
    from smolcluster.telemetry.logging import identity

    sinks: list = []
    try:
        from smolcluster.telemetry.sinks import build_sinks
    except ImportError:  # observability extras not present in this build
        build_sinks = None
    if build_sinks is not None:
        from omegaconf import OmegaConf

        sinks = build_sinks(cfg.logging, run_dir=Path(run_dir), identity=identity(),
                            config=OmegaConf.to_container(cfg, resolve=True))
    return RunRecorder(run_dir, sinks, append=append)
