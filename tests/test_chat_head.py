"""``python -m smolcluster.chat role=head`` on stages already running as cluster nodes (``role=stage``).

The chat attaches to the stages as a head: ``/health`` lists them, a greedy ``/v1/completions``
gives exactly the text ``python -m smolcluster.infer`` prints for that prompt against the same
stages, and when the chat server stops the stages keep running and serve the next head.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from smolcluster.launch.local import free_ports
from tests.conftest import REPO, run_cli
from tests.test_openai_api import wait_until, write_tiny_run

PROMPT = "The meaning of life is"
MAX_NEW = 20


def start_chat_head(args: list[str], log) -> tuple[subprocess.Popen, str]:
    """Start ``python -m smolcluster.chat role=head ...``; return it and its base URL once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "smolcluster.chat", "role=head", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")], daemon=True).start()
    deadline = time.monotonic() + 120  # the stages start at the same time: both import torch
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            m = re.search(r"smolcluster chat: (http://\S+)/ ", lines.get(timeout=0.5))
        except queue.Empty:
            continue
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError(f"the chat head did not start (exit code {proc.poll()}); see {log.name}")


def test_chat_head_on_running_stages_equals_infer_and_leaves_the_stages_serving(tmp_path):
    run_dir = write_tiny_run(tmp_path / "run", n_positions=256)
    port = free_ports("127.0.0.1", 2)
    common = [f"checkpoint={run_dir}", "stages=2", f"cluster.port={port}", "cluster.heartbeat_s=0.2",
              "cluster.liveness_s=3"]
    stage_logs = [(tmp_path / f"stage{r}.log").open("w") for r in range(2)]
    stages = [subprocess.Popen([sys.executable, "-u", "-m", "smolcluster.infer", "role=stage", f"rank={r}", *common,
                               "logging.level=INFO"],  # (their "head ... left" lines: waited for below)
                               cwd=REPO, stdout=stage_logs[r], stderr=subprocess.STDOUT) for r in range(2)]
    head = None
    head_log = (tmp_path / "chat.log").open("w")
    try:
        head, url = start_chat_head([*common, "serve.port=0", "serve.ui=false"], head_log)
        with httpx.Client(base_url=url, timeout=60) as http:
            health = http.get("/health")
            assert health.status_code == 200, health.text
            h = health.json()
            assert h["status"] == "ok" and h["context"] == 256 and h["model"] == run_dir.name
            assert [(s["name"], s["lost"]) for s in h["stages"]] == [("s0", False), ("s1", False)]
            card, = http.get("/v1/models").json()["data"]
            assert card["id"] == run_dir.name
            # compile=auto (the default) left each tiny stage eager, and each stage says why
            assert [d.split(",")[0] for d in card["decode"]] == ["compiled decode: off (compile=auto: eager"] * 2
            assert all(re.search(r"its blocks hold [0-9.]+M parameters, under 10M", d) for d in card["decode"]), card

            r = http.post("/v1/completions", json={"model": run_dir.name, "prompt": PROMPT,
                                                   "max_tokens": MAX_NEW, "temperature": 0})
            assert r.status_code == 200, r.text
            api_text = r.json()["choices"][0]["text"]
            assert r.json()["usage"]["completion_tokens"] == MAX_NEW and api_text.strip()
            # the request is freed on every stage once answered (their heartbeats report no open request)
            assert wait_until(lambda: [s["requests"] for s in http.get("/health").json()["stages"]] == [0, 0],
                              timeout_s=10)

        head.send_signal(signal.SIGINT)  # as Ctrl-C: the head leaves; stages it did not start stay up
        assert head.wait(timeout=30) == 0, f"the chat head exited {head.returncode}; see {head_log.name}"
        assert [s.poll() for s in stages] == [None, None], "a stage stopped when the chat head left"

        # a second head on the same stages: python -m smolcluster.infer, greedy, same prompt and length
        p = run_cli("smolcluster.infer", "role=head", *common, f"prompt={PROMPT}", f"max_new_tokens={MAX_NEW}",
                    "temperature=0", timeout=180)
        assert p.stdout == PROMPT + api_text + "\n"
        # once every stage has noticed both heads gone (liveness_s=3), they must still be serving
        def both_heads_left() -> bool:
            return all(len(re.findall(r"head \S+ left", (tmp_path / f"stage{r}.log").read_text())) >= 2
                       for r in range(2))
        assert wait_until(both_heads_left, timeout_s=60), "the stages did not notice both heads leave"
        assert [s.poll() for s in stages] == [None, None], "a stage stopped after its heads left"
    finally:
        if head is not None and head.poll() is None:
            head.kill()
            head.wait(timeout=10)
        for s in stages:
            s.terminate()
        for s in stages:
            try:
                s.wait(timeout=20)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait(timeout=10)
        for f in (head_log, *stage_logs):
            f.close()
