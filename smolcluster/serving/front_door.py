"""The web server's front door: Host check, API key and body-size bound in front of every route.

Pure ASGI middleware, so it decides from the request's head alone, before anything reads
the body: a stranger without the key gets 401 whatever it sends (a 32 MiB body is never
read, malformed JSON is never parsed), and a keyed client's body is cut at
``max_body_bytes`` (413) whether it declares its length or streams it chunked.

The key is accepted as ``Authorization: Bearer KEY`` (the OpenAI clients) or as HTTP Basic
with any user name and the key as password: a browser asks for it in its own login dialog
on the first 401 and then sends it with every request of the chat page, its ``/gradio_api``
calls and streams included. ``/health`` stays open; without the key it says only whether
the pipeline serves.

The Host check (starlette's ``TrustedHostMiddleware``) answers a request for any other
name 400: a web page cannot reach the keyless loopback default through DNS rebinding.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import socket

import psutil
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smolcluster.security import is_loopback

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/health",)


def key_matches(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Whether the request's ``Authorization`` carries ``api_key`` (Bearer, or Basic's password)."""
    value = next((v for k, v in headers if k == b"authorization"), b"").decode("latin-1")
    scheme, _, cred = value.partition(" ")
    if scheme.lower() == "basic":
        try:
            cred = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    # constant time: how long the comparison takes says nothing about how much of the key was right
    return hmac.compare_digest(cred.strip().encode(), api_key.encode())


def allowed_hosts(host: str, extra: list[str] | None = None) -> list[str]:
    """The Host names the server answers: loopback, ``extra`` (``serve.allowed_hosts``), and when it
    listens beyond loopback the address it binds (every local address and the hostname for 0.0.0.0 / ::)."""
    names = [*LOOPBACK_NAMES, *(extra or [])]
    if not is_loopback(host):
        if is_wildcard(host):
            names += [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
                      if a.family in (socket.AF_INET, socket.AF_INET6)]
            names += [socket.gethostname(), f"{socket.gethostname()}.local", socket.getfqdn()]
        else:
            names.append(host)
    return sorted({f"[{n}]" if ":" in n and not n.startswith("[") else n.lower() for n in names})


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface (0.0.0.0, ::, empty, *)."""
    try:
        return host in ("", "*") or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:  # a host name
        return False


async def answer(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": data})


def api_error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class FrontDoor:
    """ASGI middleware: the API key on every route but ``/health``, then at most ``max_body_bytes`` of body."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        keyed = self.api_key is None or key_matches(scope["headers"], self.api_key)
        if scope["type"] == "websocket":
            return await (self.app(scope, receive, send) if keyed else send({"type": "websocket.close", "code": 1008}))
        if scope["path"] in OPEN_PATHS:
            scope["smolcluster.keyed"] = keyed  # /health without the key: only whether it serves
            return await self.app(scope, receive, send)
        if not keyed:  # answered from the head: the body is never read
            return await answer(send, 401, api_error(
                "Incorrect API key provided: send 'Authorization: Bearer <serve.api_key>' (a browser: the key "
                "as the password of its login dialog)", "invalid_api_key"),
                [(b"www-authenticate", b'Basic realm="smolcluster", charset="UTF-8"')])
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await answer(send, 413, self.too_large())
        await self.app(scope, *self.bounded(receive, send))

    def too_large(self) -> dict:
        return api_error(f"the request body is larger than serve.max_body_mb "
                         f"({self.max_body_bytes / 2**20:g} MiB)", "request_too_large")

    def bounded(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """``receive`` that counts a streamed (chunked) body and answers 413 past the bound (the app then
        sees the client gone), and ``send`` that drops what the app answers after that."""
        seen, started, refused = 0, False, False

        async def bounded_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    if not started and not refused:
                        refused = True
                        await answer(send, 413, self.too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        return bounded_receive, guarded_send


def front_door(app: ASGIApp, *, api_key: str | None, hosts: list[str], max_body_bytes: int) -> ASGIApp:
    """``app`` behind the Host check, then the key and the body bound."""
    return TrustedHostMiddleware(FrontDoor(app, api_key, max_body_bytes), allowed_hosts=hosts, www_redirect=False)
