"""The only package that imports zmq: message format, codecs and endpoints."""

from smolcluster.transport import wire
from smolcluster.transport.sockets import ClientEndpoint, Heartbeat, Liveness, ServerEndpoint, make_keys
from smolcluster.transport.wire import Message, WireError

__all__ = ["ClientEndpoint", "Heartbeat", "Liveness", "Message", "ServerEndpoint", "WireError", "make_keys", "wire"]
