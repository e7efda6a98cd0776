"""What a run leaves behind: metrics.jsonl (one object per logged step), summary.json, loss.png.

One :class:`RunRecorder` per run (the server's or the local process's); it also
fans each logged step out to the optional sinks (W&B, Prometheus) built from
``logging`` config.

A node stopped early (SIGTERM, Ctrl-C, an error) closes what it opened too: its
code calls :meth:`RunRecorder.abort`, or the entry point calls :func:`abort_open`
for every recorder not finished, so ``metrics.jsonl`` ends with a ``stopped`` row
and the W&B run is finished with the exit code.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loguru import logger

_open: list[RunRecorder] = []  # recorders not finished yet, for abort_open


def exit_code_of(exc: BaseException | None) -> int:
    """The exit code a run stopped by ``exc`` records: 130 interrupted (Ctrl-C, or SIGTERM: see
    smolcluster.launch.supervisor), 2 a one-line error, a SystemExit's own code, else 1."""
    from smolcluster.errors import SmolclusterError

    if exc is None:
        return 0
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 2 if isinstance(exc, SmolclusterError) else 1


class RunRecorder:
    """Where a node's metrics go: ``metrics.jsonl`` (unless ``files=False``, as on workers) and the sinks.

    Each row also gets, when due, this process's hardware use (every ``hardware_every``
    steps) and the bandwidth implied by its ``bytes_sent`` / ``bytes_received`` totals.

    ``keep_until=N`` (a run resumed from its step-N checkpoint) keeps the rows up to step N and drops
    the later ones (``dropped_rows``): those steps are trained again, and each step is logged once.
    """

    def __init__(self, run_dir: str | Path, sinks: list | None = None, append: bool = False,
                 files: bool = True, hardware_every: int = 0, keep_until: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.dropped_rows = 0
        if files and keep_until is not None:
            append = True
            if self.metrics_path.is_file():
                rows = self.metrics_path.read_text().splitlines(keepends=True)
                kept = [r for r in rows if r.strip() and json.loads(r)["step"] <= keep_until]
                self.dropped_rows = sum(1 for r in rows if r.strip()) - len(kept)
                tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
                tmp.write_text("".join(kept))
                tmp.replace(self.metrics_path)
        self._file = self.metrics_path.open("a" if append else "w", buffering=1) if files else None
        self.sinks = list(sinks or [])
        self.t0 = time.time()
        self.hardware_every = int(hardware_every or 0)
        self._hardware = None
        self._next_hardware = 0
        self._last_bytes: dict[str, tuple[float, float]] = {}
        self.last_step, self.finished = 0, False
        _open.append(self)

    def log(self, step: int, **metrics) -> dict:
        now = time.time()
        if self.hardware_every and step >= self._next_hardware:
            from smolcluster.telemetry.hardware import HardwareSampler

            self._hardware = self._hardware or HardwareSampler()
            metrics.update(self._hardware.sample())
            self._next_hardware = (step // self.hardware_every + 1) * self.hardware_every
        for key in ("bytes_sent", "bytes_received"):
            if metrics.get(key) is not None:
                last = self._last_bytes.get(key)
                if last is not None and now > last[0]:
                    metrics[f"{key}_per_s"] = round((metrics[key] - last[1]) / (now - last[0]), 1)
                self._last_bytes[key] = (now, metrics[key])
        row = {"step": step, "time": round(now - self.t0, 4), **metrics}
        self.last_step = step
        if self._file is not None:
            self._file.write(json.dumps(row, default=float) + "\n")
        for sink in self.sinks:
            try:
                sink.log(step, metrics)
            except Exception as e:  # a tracker must never take training down
                logger.warning(f"metrics sink {type(sink).__name__} failed: {e}")
        return row

    def event(self, step: int, name: str, **info) -> dict:
        """A row that marks something that happened (``{"step": 600, "event": "resumed", ...}``), in the file only."""
        row = {"step": step, "time": round(time.time() - self.t0, 4), "event": name, **info}
        if self._file is not None:
            self._file.write(json.dumps(row, default=str) + "\n")
        return row

    def finish(self, summary: dict | None, exit_code: int = 0) -> dict | None:
        """Close metrics.jsonl (writing summary.json and loss.png beside it) and every sink; once only."""
        if self.finished:
            return summary
        self.finished = True
        if self in _open:
            _open.remove(self)
        if self._file is not None:
            self._file.close()
        if self._file is not None and summary is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            try:
                plot_losses(self.metrics_path, self.run_dir / "loss.png", title=f"{summary.get('algo')} / {summary.get('model')}")
            except Exception as e:
                logger.warning(f"could not draw loss.png: {e}")
        for sink in self.sinks:
            try:
                sink.close(summary, exit_code=exit_code)
            except Exception as e:
                logger.warning(f"metrics sink {type(sink).__name__} failed to close: {e}")
        return summary


    def abort(self, exc: BaseException | None = None, exit_code: int | None = None) -> None:
        """The node stops before the end (``exc``: why): a last ``stopped`` row, the file closed, the sinks closed
        with the exit code (W&B records it). No summary.json: the run did not finish. A no-op after finish."""
        if self.finished:
            return
        code = exit_code_of(exc) if exit_code is None else exit_code
        self.event(self.last_step, "stopped", exit_code=code, reason=type(exc).__name__ if exc else "")
        self.finish(None, exit_code=code)


def abort_open(exc: BaseException | None = None, exit_code: int | None = None) -> None:
    """Abort every recorder of this process not finished yet (the entry point's last word on an early stop)."""
    for recorder in list(_open):
        recorder.abort(exc, exit_code)


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_losses(metrics_path: str | Path, out: str | Path, title: str = "") -> Path:
    """Train loss (and per-worker loss when present) and eval loss against step; see :func:`loss_figure`."""
    import matplotlib.pyplot as plt

    fig = loss_figure(read_metrics(metrics_path), title)
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def loss_figure(rows: list[dict], title: str = ""):
    """The losses of ``rows`` against step, and a tick at the foot of the plot at each outer step (``algo=diloco``'s
    rows with ``outer_step``: where the ranks synced and the loss may jump)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    outer = [r["step"] for r in rows if "outer_step" in r]
    if outer:  # in axes height (0 to 6%), whatever the loss's scale
        ax.vlines(outer, 0, 0.06, transform=ax.get_xaxis_transform(), colors="tab:gray", lw=1, label="outer step")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series or outer:
        ax.legend()
    fig.tight_layout()
    return fig


def open_recorder(cfg, run_dir: str | Path, append: bool = False, files: bool = True,
                  keep_until: int | None = None) -> RunRecorder:
    """A recorder for this node, with the W&B / Prometheus sinks that ``logging`` config enables
    (``keep_until``: resuming from that step's checkpoint, see :class:`RunRecorder`)."""
    from smolcluster.telemetry.logging import identity
    from smolcluster.telemetry.sinks import build_sinks

    sinks = build_sinks(cfg, run_dir=Path(run_dir), identity=identity())
    return RunRecorder(run_dir, sinks, append=append, files=files, keep_until=keep_until,
                       hardware_every=cfg.logging.hardware_every)
