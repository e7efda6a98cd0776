"""The web server's front door, attacked over real HTTP on loopback: one keyed server (API + Gradio
chat page) on a real 2-stage pipeline of a tiny GPT-2.

Without the key every route but ``/health`` is 401 (the chat page and ``/gradio_api`` too), and the
answer comes from the request's head: a 32 MiB body is answered before the client has sent it and
malformed JSON is never parsed. A wrong Host is 400 (DNS rebinding), a keyed client's body is cut
at ``serve.max_body_mb``, and the body's ``user`` field does not change who waits in the fair queue.
"""

from __future__ import annotations

import base64
import socket
import threading

import httpx
import pytest

from smolcluster.serving.fair_queue import FairQueue
from smolcluster.serving.front_door import allowed_hosts
from tests.test_openai_api import CONTEXT, MODEL, Served, wait_until, write_tiny_run

KEY = "s3cret-key"
MAX_BODY_MB = 1
BIG = 32 * 2**20


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = Served(write_tiny_run(tmp_path_factory.mktemp("tiny-run"), CONTEXT), ui=True, api_key=KEY, max_body_mb=MAX_BODY_MB)
    try:
        yield s
    finally:
        s.close()


def bearer(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def basic(password: str, user: str = "anyone") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def raw_request(url: str, head: str, body_chunks=()) -> tuple[bytes, int]:
    """Send ``head`` then ``body_chunks`` on a raw socket until the server answers; (the answer, how
    many body bytes were sent when it began)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        for chunk in body_chunks:
            try:
                first = sock.recv(4096)  # the server answered: stop sending
                break
            except BlockingIOError:
                pass
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, BlockingIOError):
                first = b""
                break
            sent += len(chunk)
        else:
            first = b""
        sock.settimeout(60)
        answer = first
        try:
            while chunk := sock.recv(4096):  # the server closes the connection after answering
                answer += chunk
        except ConnectionResetError:  # closed with our unread body in its buffer: the head came first
            pass
        return answer, sent


def test_without_the_key_every_route_but_health_is_401_the_chat_page_and_gradio_api_included(keyed):
    http = keyed.http
    for method, path in (("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("GET", "/"), ("GET", "/config"),
                         ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"), ("GET", "/openapi.json"),
                         ("GET", "/docs"), ("GET", "/no/such/page")):
        for headers in ({}, bearer("wrong"), basic("wrong"), {"Authorization": KEY}):
            r = http.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"].startswith("Basic")  # the browser's login dialog
    # malformed JSON without the key: 401, not the parser's 400 (the body was never parsed)
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert http.post("/v1/chat/completions", content=b"{not json", headers={
        "content-type": "application/json", **bearer()}).status_code == 400
    # /health is open but tells a stranger only whether it serves; the key holder gets the figures
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    full = http.get("/health", headers=bearer()).json()
    assert full["model"] == MODEL and len(full["stages"]) == 2


def test_the_key_opens_the_api_and_the_chat_page_as_a_bearer_or_as_basic_auth(keyed):
    http = keyed.http
    assert [m["id"] for m in http.get("/v1/models", headers=bearer()).json()["data"]] == [MODEL]
    for headers in (bearer(), basic(KEY), basic(KEY, user="")):
        page = http.get("/", headers=headers)
        assert page.status_code == 200 and "<html" in page.text.lower()
        info = http.get("/gradio_api/info", headers=headers)
        assert info.status_code == 200 and "named_endpoints" in info.json()
    r = http.post("/v1/completions", headers=bearer(),
                  json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_32_mib_body_without_the_key_is_answered_401_before_the_client_has_sent_it(keyed):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BIG}\r\n\r\n")
    answer, sent = raw_request(keyed.url, head, (b"x" * 2**20 for _ in range(BIG // 2**20)))
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent < BIG, "the server answered only after the whole body was sent"


def test_a_keyed_body_beyond_max_body_mb_is_refused_413_declared_or_streamed(keyed):
    auth = f"Authorization: Bearer {KEY}\r\n"
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {BIG}\r\n\r\n")
    answer, sent = raw_request(keyed.url, head, (b"x" * 2**20 for _ in range(BIG // 2**20)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < BIG
    # chunked: no length declared, the bytes are counted as they come
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (2**16, b"x" * 2**16)
    answer, sent = raw_request(keyed.url, head, (chunk for _ in range(BIG // 2**16)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert sent < BIG
    assert keyed.http.get("/v1/models", headers=bearer()).status_code == 200  # and it keeps serving


def test_a_wrong_host_header_is_400_loopback_names_are_served(keyed):
    for host in ("evil.example", "192.0.2.7", "localhost.evil.example"):
        r = keyed.http.get("/health", headers={"Host": host})
        assert r.status_code == 400, host
        assert keyed.http.get("/", headers={"Host": host, **bearer()}).status_code == 400
    for host in ("localhost", f"localhost:{keyed.server.port}", "127.0.0.1", "[::1]:80"):
        assert keyed.http.get("/health", headers={"Host": host}).status_code == 200, host


def test_the_allowed_hosts_are_loopback_the_bound_address_and_serve_allowed_hosts():
    assert allowed_hosts("127.0.0.1") == sorted(["localhost", "127.0.0.1", "[::1]"])
    assert set(allowed_hosts("192.0.2.5", ["chat.lab", "*.lab.example"])) == {
        "localhost", "127.0.0.1", "[::1]", "192.0.2.5", "chat.lab", "*.lab.example"}
    assert "9lives.lan" in allowed_hosts("9lives.lan")  # a name, even one that starts with a digit
    assert allowed_hosts("::") == allowed_hosts("0.0.0.0")
    everywhere = allowed_hosts("0.0.0.0")
    assert socket.gethostname().lower() in everywhere and "127.0.0.1" in everywhere
    assert len(everywhere) > 4  # this machine's own addresses too


def test_the_user_field_does_not_change_who_waits_in_the_fair_queue(keyed):
    sessions, shared_queue = keyed.sessions, keyed.sessions.queue
    sessions.queue = FairQueue(slots=1, max_waiting=8)
    hold = sessions.queue.join("holder")  # takes the only slot: the requests below must wait
    answers: list[int] = []

    def ask(user: str) -> None:
        r = httpx.post(f"{keyed.url}/v1/completions", headers=bearer(), timeout=60, json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "user": user})
        answers.append(r.status_code)

    threads = [threading.Thread(target=ask, args=(u,)) for u in ("alice", "bob", "carol")]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: sessions.queue.stats()["waiting"] == 3, timeout_s=30), sessions.queue.stats()
        # three names, one client: one user of the queue, named by its address
        assert sessions.queue.stats()["waiting_users"] == 1
        assert list(sessions.queue._waiting) == ["api:127.0.0.1"]
    finally:
        sessions.queue.leave(hold)
        for t in threads:
            t.join(60)
        sessions.queue = shared_queue
    assert answers == [200, 200, 200]
