"""A process that started others stops them at once on SIGTERM, as on Ctrl-C, and waits for them."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from tests.conftest import REPO, wait_until


def _start(args: list[str], ready: str, log) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")], daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if re.search(ready, lines.get(timeout=0.5)):
                return proc, lines
        except queue.Empty:
            continue
    proc.kill()
    raise AssertionError(f"{args} did not get ready (exit code {proc.poll()}); see {log.name}")


def test_sigterm_to_chat_stops_its_stages_at_once(tmp_path):
    log = (tmp_path / "chat.log").open("w")
    proc, _ = _start(["smolcluster.chat", "serve.port=0", "serve.ui=false", "cluster.liveness_s=60"],
                     r"smolcluster chat: http://", log)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len([c for c in children if "smolcluster.inference.stage" in " ".join(c.cmdline())]) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        # with liveness_s=60 a stage left behind would linger a minute; stopped, they are gone in seconds
        assert wait_until(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
                          15), [c.pid for c in children if c.is_running()]
    finally:
        for c in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            c.kill()
        if proc.poll() is None:
            proc.kill()
