"""The only package that imports zmq: message format, codecs and endpoints.

    wire         message <-> frames (msgpack header + raw tensor frames), schemas, validation
    compression  none / fp16 / bf16 / int8 codecs and error feedback
    sockets      ROUTER/DEALER and PUB/SUB endpoints, heartbeats, liveness, CURVE keys
"""

from smolcluster.transport import compression, wire
from smolcluster.transport.compression import Codec, ErrorFeedback, get_codec
from smolcluster.transport.sockets import (
    ClientEndpoint,
    Heartbeat,
    Liveness,
    Publisher,
    ServerEndpoint,
    Subscriber,
    make_keys,
)
from smolcluster.transport.wire import (
    PROTOCOL_VERSION,
    Message,
    WireError,
    decode,
    encode,
    register_kind,
)

__all__ = [
    "PROTOCOL_VERSION",
    "ClientEndpoint",
    "Codec",
    "ErrorFeedback",
    "Heartbeat",
    "Liveness",
    "Message",
    "Publisher",
    "ServerEndpoint",
    "Subscriber",
    "WireError",
    "compression",
    "decode",
    "encode",
    "get_codec",
    "make_keys",
    "register_kind",
    "wire",
]
