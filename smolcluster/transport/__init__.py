"""The only package that imports zmq: message format, codecs and endpoints.

    wire         message <-> frames (msgpack header + raw tensor frames), schemas, validation
    compression  none / fp16 / bf16 / int8 codecs and error feedback
    sockets      ROUTER/DEALER endpoints, heartbeats, CURVE keys
    pubsub       the pipeline's PUB/SUB links (one bound inbox per node, one outbox to many)
"""

from smolcluster.transport import compression, wire
from smolcluster.transport.compression import Codec, ErrorFeedback, get_codec
from smolcluster.transport.sockets import (
    ClientEndpoint,
    Heartbeat,
    ServerEndpoint,
    client_key_name,
    client_ranks,
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
    "Message",
    "ServerEndpoint",
    "WireError",
    "compression",
    "decode",
    "encode",
    "get_codec",
    "client_key_name",
    "client_ranks",
    "make_keys",
    "register_kind",
    "wire",
]
