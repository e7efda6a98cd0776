"""The only package that imports zmq: message format, codecs and endpoints.

    wire         message <-> frames (msgpack header + raw tensor frames), schemas, validation
    compression  none / fp16 / bf16 / int8 codecs and error feedback
    sockets      ROUTER/DEALER endpoints, heartbeats, CURVE keys
    pubsub       the pipeline's PUB/SUB links (one bound inbox per node, one outbox to many)

The names below load on first use (PEP 562): a launcher that only checks a codec's name imports
``compression`` without torch and zmq, which are most of a process's start-up.
"""

import importlib

_HOMES = {
    "PROTOCOL_VERSION": "wire", "Message": "wire", "WireError": "wire", "decode": "wire", "encode": "wire",
    "register_kind": "wire",
    "Codec": "compression", "ErrorFeedback": "compression", "get_codec": "compression",
    "ClientEndpoint": "sockets", "Heartbeat": "sockets", "ServerEndpoint": "sockets", "client_key_name": "sockets",
    "client_ranks": "sockets", "make_keys": "sockets",
}
__all__ = [*_HOMES, "compression", "wire"]


def __getattr__(name: str):
    if name in ("compression", "wire", "sockets", "pubsub"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
