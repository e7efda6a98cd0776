"""Ship log lines to Grafana Loki without ever slowing down the process that logs them.

:class:`LokiSink` is a loguru sink. ``write()`` runs on the logging thread and only
appends the line to a bounded queue, or counts it as dropped when the queue is full;
it takes no lock and wakes no thread (but once per full batch). A daemon thread wakes
every ``flush_interval_s`` (or when a batch is full) and pushes the queue to Loki's
HTTP push API in batches (gzip JSON, retries with exponential backoff). When Loki is
down or slow the queue fills and new lines are dropped and counted, never buffered
without limit. The count is logged as a WARNING (when it has grown, at most every
``warn_every_s``), bound ``no_loki=True`` so that a dead Loki cannot feed its own queue.
"""

from __future__ import annotations

import atexit
import gzip
import json
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone

import requests
from loguru import logger

from smolcluster.errors import ConfigError

# The contract with the Grafana dashboards: every stream carries exactly these labels.
STREAM_LABELS = ("job", "run_id", "node", "role", "rank", "algo", "level")
JOB = "smolcluster"
SKIP = "no_loki"  # logger.bind(no_loki=True): a line this sink must not ship
LINE_FORMAT = "{level} {message}"  # loguru appends the exception text; colorize=False keeps it plain
_HEADERS = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def unix_ns(t: datetime) -> int:
    """A record's time as integer nanoseconds since the epoch, exactly (no float rounding)."""
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


def _shippable(record) -> bool:
    return not record["extra"].get(SKIP)


class LokiSink:
    """A loguru sink pushing to ``{url}/loki/api/v1/push`` from a daemon thread; see the module doc."""

    def __init__(self, url: str, *, batch_size: int = 500, flush_interval_s: float = 1.0,
                 queue_size: int = 10_000, timeout_s: float = 2.0, max_retries: int = 3,
                 labels: Mapping | None = None, backoff_s: float = 0.25, warn_every_s: float = 5.0,
                 close_timeout_s: float | None = None):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"logging.loki.url={url!r}: give Loki's base URL, e.g. http://HOST:3100")
        self.push_url = url.rstrip("/") + "/loki/api/v1/push"
        self.batch_size, self.flush_interval_s, self.timeout_s = batch_size, flush_interval_s, timeout_s
        self.max_retries, self.backoff_s, self.warn_every_s = max_retries, backoff_s, warn_every_s
        self.close_timeout_s = close_timeout_s if close_timeout_s is not None else max(1.0, 2 * timeout_s)
        self.static_labels = {str(k): str(v) for k, v in (labels or {}).items()}
        for name in self.static_labels:
            if name in STREAM_LABELS or not _LABEL_NAME.fullmatch(name):
                raise ConfigError(f"logging.loki.labels: {name!r} is not allowed (a Loki label name "
                                  f"[a-zA-Z_][a-zA-Z0-9_]*, other than {', '.join(STREAM_LABELS)})")
        self.sent = 0
        # One counter per writing thread, so no lock is needed: the logging threads (serialised
        # by loguru's handler lock), the pusher, and close().
        self._dropped_full = self._dropped_failed = self._dropped_at_close = 0
        self._reported, self._last_warning = 0, float("-inf")
        self._why = "the queue was full: Loki is slower than the logging"
        self._report_lock = threading.Lock()
        # deque append/popleft are atomic; only write() appends (serialised by loguru), so
        # checking the length first keeps it within queue_size.
        self._lines: deque = deque()
        self.queue_size = queue_size
        self._wake, self._closing = threading.Event(), threading.Event()
        self._give_up_at = float("inf")
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name="loki-push", daemon=True)
        self._thread.start()
        # Runs before loguru's own atexit remove() (registered earlier), so the console
        # handler is still there to show the final drop count.
        atexit.register(self.close)

    @classmethod
    def from_config(cls, cfg: Mapping) -> LokiSink:
        """Build from the ``logging.loki`` config node (``url`` must be set)."""
        keys = ("batch_size", "flush_interval_s", "queue_size", "timeout_s", "max_retries", "labels")
        return cls(str(cfg["url"]), **{k: cfg[k] for k in keys if cfg.get(k) is not None})

    def handler_options(self, level: str) -> dict:
        """The ``logger.add`` keywords for this sink: plain text, no variable dumps, no own lines."""
        return dict(level=level, format=LINE_FORMAT, filter=_shippable, colorize=False,
                    backtrace=False, diagnose=False, enqueue=False)

    @property
    def dropped(self) -> int:
        return self._dropped_full + self._dropped_failed + self._dropped_at_close

    def stats(self) -> dict:
        return {"sent": self.sent, "dropped": self.dropped, "queued": len(self._lines)}

    # -- the logging thread: never blocks -------------------------------------------------------
    def write(self, message) -> None:
        lines = self._lines
        if len(lines) >= self.queue_size or self._closing.is_set():
            self._dropped_full += 1
            return
        record = message.record
        extra = record["extra"]
        stream = (extra.get("run_id", ""), extra.get("node", ""), extra.get("role", ""),
                  str(extra.get("rank", "")), extra.get("algo", ""), record["level"].name)
        lines.append((stream, record["time"], str(message)))
        if len(lines) == self.batch_size:
            self._wake.set()

    def stop(self) -> None:  # loguru calls this on logger.remove()
        self.close()

    def close(self) -> None:
        """Push what is queued and stop, waiting at most ``close_timeout_s``: exit never hangs."""
        if self._closing.is_set():
            return
        atexit.unregister(self.close)
        self._give_up_at = time.monotonic() + self.close_timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join(self.close_timeout_s)
        while True:  # what Loki did not take in time is dropped, and counted
            try:
                self._lines.popleft()
            except IndexError:
                break
            self._dropped_at_close += 1
        self._report_drops(force=True)

    # -- the pusher thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if len(self._lines) < self.batch_size and not self._closing.is_set():
                self._wake.wait(self.flush_interval_s)  # a full batch or close() ends the wait early
                self._wake.clear()
            if self._closing.is_set() and (not self._lines or time.monotonic() > self._give_up_at):
                break
            batch = [self._lines.popleft() for _ in range(min(self.batch_size, len(self._lines)))]
            if batch:
                try:
                    self._push(batch)
                except Exception as e:  # a bug here must not stop the thread: the queue would only fill
                    self._why = f"{type(e).__name__}: {e}"
                    self._dropped_failed += len(batch)
            self._report_drops()
        self._session.close()

    def _push(self, batch: list) -> None:
        body = gzip.compress(json.dumps(self.payload(batch)).encode(), compresslevel=1)
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if self._closing.is_set() and time.monotonic() + delay > self._give_up_at:
                    break
                self._closing.wait(delay)  # on close, retry at once (still within close_timeout_s)
            try:
                r = self._session.post(self.push_url, data=body, headers=_HEADERS, timeout=self.timeout_s)
            except requests.RequestException as e:
                self._why = f"{type(e).__name__} pushing to {self.push_url}"
            else:
                if r.status_code < 300:
                    self.sent += len(batch)
                    return
                self._why = f"Loki answered HTTP {r.status_code}: {r.text[:200].strip()}"
                if r.status_code < 500 and r.status_code != 429:
                    break  # a client error: the same body would fail again
            self._report_drops()
        self._dropped_failed += len(batch)

    def payload(self, batch: list) -> dict:
        """Loki's push JSON: one stream per label set, values in timestamp order."""
        streams: dict[tuple, list] = {}
        for stream, t, line in batch:
            streams.setdefault(stream, []).append((unix_ns(t), line.rstrip("\n")))
        return {"streams": [
            {"stream": {**self.static_labels, **dict(zip(STREAM_LABELS, (JOB, *stream)))},
             "values": [[str(ns), line] for ns, line in sorted(values, key=lambda v: v[0])]}
            for stream, values in streams.items()]}

    def _report_drops(self, force: bool = False) -> None:
        with self._report_lock:
            dropped, now = self.dropped, time.monotonic()
            if dropped <= self._reported or (not force and now - self._last_warning < self.warn_every_s):
                return
            self._reported, self._last_warning = dropped, now
        logger.bind(**{SKIP: True}).warning(
            f"loki: dropped {dropped} log lines so far ({self._why}); they are still on the console "
            f"(and in the run directory's log files)")
