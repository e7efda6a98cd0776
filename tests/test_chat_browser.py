"""The chat page in a real headless Chromium (Selenium), served by a real ``python -m smolcluster.chat``.

The answer must appear in the page in several growing steps while the pipeline makes
it, and Stop must cancel the request in the pipeline: the stages report the request
while it runs and none after, long before it could have finished by itself.
Needs Debian's chromium + chromium-driver (``sh scripts/test-deps.sh`` as root; ``make test`` runs it).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.test_openai_api import wait_until, write_tiny_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW = 1000  # far more than the test lets it make before pressing Stop

NO_BROWSER = CHROMIUM is None or CHROMEDRIVER is None
NO_BROWSER_WHY = ("chromium and chromium-driver are not installed: run `sh scripts/test-deps.sh` as root "
                  "(make test does)")

if NO_BROWSER and os.environ.get("CI") == "true":
    # CI must run this test, not skip it: a missing browser is an error there (and says how to fix it).
    # Autouse at module scope, so it runs before the module's chat_server fixture starts anything.
    @pytest.fixture(scope="module", autouse=True)
    def _browser_required_in_ci():
        pytest.fail(f"CI=true but {NO_BROWSER_WHY}; the browser test must not be skipped in CI", pytrace=False)
else:
    pytestmark = pytest.mark.skipif(NO_BROWSER, reason=NO_BROWSER_WHY)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """``python -m smolcluster.chat`` on a free port with a 1024-token GPT-2; stopped (stages too) after.

    12 layers x 512 wide makes ~100 tokens/s here: a 1000-token answer lasts long enough to watch it grow
    and press Stop, even on a busy machine (a 2-layer model finished before the page was read 3 times)."""
    run_dir = write_tiny_run(tmp_path_factory.mktemp("run-1024"), n_positions=1024, n_layer=12, n_embd=512)
    log = (tmp_path_factory.mktemp("chat-log") / "chat.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolcluster.chat", f"checkpoint={run_dir}", "serve.port=0", "serve.model_name=tiny",
         "cluster.heartbeat_s=0.2", f"max_new_tokens={MAX_NEW}", "temperature=0", "stop_at_eos=false",
         "compile=false"],  # (compile=auto would compile these 12 light blocks first, for answers past its slots)
        cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in iter(proc.stdout.readline, "")], daemon=True).start()
    stages = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                m = re.search(r"smolcluster chat: (http://\S+)/ ", lines.get(timeout=0.5))
            except queue.Empty:
                continue
            url = m.group(1) if m else None
        assert url is not None, f"the chat server did not start (exit code {proc.poll()}); see {log.name}"
        stages = psutil.Process(proc.pid).children(recursive=True)
        assert len(stages) == 2
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the server stops and shuts its stages down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("the chat server did not exit within 30 s of Ctrl-C")
        finally:
            log.close()
        still = [p for p in stages if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in still:
            p.kill()
        assert not still, f"stage processes left running after the server exited: {still}"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_and_the_api_are_served_by_the_same_process(chat_server):
    with httpx.Client(base_url=chat_server, timeout=30) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
        assert "<html" in http.get("/").text.lower()
        r = http.get("/v1/no-such-thing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"  # not the page's HTML
        r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        # the answer is complete before the last stage has freed the request's cache: poll for it
        idle = [{"name": "s0", "requests": 0, "kv_bytes": 0, "lost": False},
                {"name": "s1", "requests": 0, "kv_bytes": 0, "lost": False}]

        def stages() -> list[dict]:
            return [{k: st[k] for k in ("name", "requests", "kv_bytes", "lost")} for st in http.get("/health").json()["stages"]]

        assert wait_until(lambda: stages() == idle, timeout_s=20), http.get("/health").json()


def test_the_answer_streams_into_the_page_and_stop_cancels_it_in_the_pipeline(chat_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    http = httpx.Client(base_url=chat_server, timeout=30)
    find = browser.find_element
    stats = lambda: find(By.CSS_SELECTOR, "#stats").text  # noqa: E731
    answers = lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')]  # noqa: E731

    def set_max_new_tokens(n: int) -> None:
        box = WebDriverWait(browser, 10).until(
            lambda _: find(By.CSS_SELECTOR, "#max_new_tokens input[type=number]"))  # drawn once opened
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(n), Keys.TAB)
        assert WebDriverWait(browser, 10).until(
            lambda _: find(By.CSS_SELECTOR, "#max_new_tokens input[type=range]").get_attribute("value") == str(n))

    browser.get(chat_server + "/")
    prompt = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    assert "tiny" in find(By.TAG_NAME, "body").text

    # the controls reach the pipeline: a 7-token answer, sent with Enter
    find(By.XPATH, "//span[text()='Settings']").click()  # open the accordion
    set_max_new_tokens(7)
    prompt.send_keys("Hello", Keys.ENTER)
    WebDriverWait(browser, 60).until(lambda _: "finished" in stats())
    assert stats().startswith("7 tokens") and "finished: length" in stats() and "tokens/s" in stats()
    assert "first token after" in stats() and len(answers()) == 1 and answers()[0]
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]')] == ["Hello"]

    # a long answer: watch it grow in the page, see the stages hold the request, then press Stop
    set_max_new_tokens(MAX_NEW)
    prompt.send_keys("Tell me a long story")
    find(By.CSS_SELECTOR, "#send").click()
    seen: list[str] = []
    stages_busy = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (len(seen) >= 3 and stages_busy):
        texts = answers()
        if len(texts) == 2 and texts[1] and (not seen or texts[1] != seen[-1]):
            seen.append(texts[1])
        stages_busy = stages_busy or any(s["requests"] for s in http.get("/health").json()["stages"])
        assert not seen or "finished" not in stats(), "the answer ended before Stop was pressed"
        time.sleep(0.02)
    assert len(seen) >= 3, f"the answer did not stream in steps: {seen}"
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:])), seen  # it grew, step by step
    assert stages_busy, "the stages never reported the running request"
    find(By.CSS_SELECTOR, "#stop").click()

    WebDriverWait(browser, 30).until(lambda _: "finished: cancelled" in stats())
    n_tokens = int(re.match(r"(\d+) tokens", stats()).group(1))
    assert 0 < n_tokens < MAX_NEW
    assert len(answers()[1]) >= len(seen[-1])
    # every stage freed the request (its KV cache), and the head has nothing in flight
    assert wait_until(lambda: (lambda h: h["in_flight"] == 0 and all(s["requests"] == 0 for s in h["stages"]))(
        http.get("/health").json()), timeout_s=20)
    http.close()
