"""One web app for the chat page and the API, and a server that runs it.

``build_app`` puts the OpenAI-compatible routes (``/v1/...``) and ``/health`` on a
FastAPI app and mounts the Gradio chat page at ``/`` behind them. :class:`WebServer`
runs it with uvicorn on a socket it binds itself, so ``port=0`` works and the port is
known before the first request (the tests and ``python -m smolcluster.chat`` use it).
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp

from smolcluster.errors import ConfigError, PeerError
from smolcluster.serving.front_door import allowed_hosts as allowed_hosts_for
from smolcluster.serving.front_door import front_door
from smolcluster.serving.openai_api import OpenAIAPI
from smolcluster.serving.sessions import ChatDefaults, Sessions


def build_app(sessions: Sessions, model_name: str, defaults: ChatDefaults | None = None,
              api_key: str | None = None, ui: bool = True, host: str = "127.0.0.1",
              allowed_hosts: list[str] | None = None, max_body_mb: float = 8.0) -> ASGIApp:
    """The API and chat page behind the front door (Host check, ``api_key`` on every route but
    ``/health``, bodies up to ``max_body_mb``); ``host`` is where it listens (its names are allowed)."""
    defaults = defaults or ChatDefaults()
    app = FastAPI(title="smolcluster", summary="OpenAI-compatible API and chat on a smolcluster inference pipeline")
    OpenAIAPI(sessions, model_name, chat_max_tokens=defaults.max_new_tokens).install(app)

    @app.get("/health")
    def health(request: Request) -> JSONResponse:
        """200 when the pipeline takes requests, 503 when it is down; with the key (or on a keyless server)
        stage and queue figures too, without it only the status."""
        h = sessions.health()
        code = 200 if h["status"] == "ok" else 503
        if not request.scope.get("smolcluster.keyed", True):
            return JSONResponse({"status": h["status"]}, status_code=code)
        h["model"] = model_name
        return JSONResponse(h, status_code=code)

    if ui:
        import gradio as gr

        from smolcluster.serving.chat_ui import build_chat_ui

        app = gr.mount_gradio_app(app, build_chat_ui(sessions, defaults, model_name), path="/", footer_links=["api"])
    return front_door(app, api_key=api_key, hosts=allowed_hosts_for(host, allowed_hosts),
                      max_body_bytes=int(max_body_mb * 2**20))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = any free port), with a clear error when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Connections inherit it: uvicorn writes a response's head and body (and each streamed chunk) apart,
    # and with Nagle on, every write after the first waits for the client's delayed ACK (40 ms on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): pick another serve.port "
                          "(0 = any free port) or stop what uses it") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class WebServer:
    """uvicorn serving ``app`` on ``host:port``; ``run()`` in this thread or ``start()`` in a background one."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 sock: socket.socket | None = None):
        self.sock = sock if sock is not None else bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        # proxy_headers off: no proxy is in front, so a client's X-Forwarded-For must not rename it (its
        # address is its fair-queue identity)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3,
                                                    lifespan="on", proxy_headers=False))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout_s: float = 30.0) -> WebServer:
        self._thread = threading.Thread(target=self.run, name="web-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise PeerError(f"the web server on {self.url} did not start within {timeout_s:.0f}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
