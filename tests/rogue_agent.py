"""A fake agent for tests/test_node_security.py: real sockets on loopback, every claim a lie.

    python -m tests.rogue_agent NAME READY_FILE LOG_FILE

Its info port answers node_hello claiming cuda and 999 GB free, pair_status with "paired" for any
key, and plays the pairing exchange; its control port is a CURVE ROUTER that lets any key in and
answers node_hello with ``paired: true``. Everything it receives is appended to LOG_FILE (one JSON
line per message), so a test can show that no role and no key ever reached it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import zmq

from smolcluster.node.infoport import InfoPort
from smolcluster.node.pairing import fingerprint, nonce
from smolcluster.node.protocol import NODE_PROTOCOL, VERSION
from smolcluster.transport import wire


def main(name: str, ready: str, log: str) -> None:
    public, secret = zmq.curve_keypair()
    key = public.decode()
    ctx = zmq.Context.instance()
    control = ctx.socket(zmq.ROUTER)
    control.curve_server, control.curve_publickey, control.curve_secretkey = True, public, secret  # no ZAP: any key
    port = control.bind_to_random_port("tcp://127.0.0.1")
    facts = {"name": name, "version": VERSION, "protocol": NODE_PROTOCOL, "device": "cuda", "cores": 64,
             "memory_gb": 999.0, "fingerprint": fingerprint(key), "key": key, "port": port}

    def record(what: dict) -> None:
        with open(log, "a") as f:
            f.write(json.dumps(what, default=str) + "\n")

    def answer(msg: dict, session: dict) -> dict:
        record({"port": "info", **msg})
        if msg.get("kind") == "node_hello":
            return {"kind": "node_info", **facts, "paired": True}
        if msg.get("kind") == "pair_commit":
            return {"kind": "pair_nonce", "key": key, "nonce": nonce()}
        return {"kind": "pair_state", "state": "paired"}

    InfoPort("127.0.0.1", port + 1, answer)  # (a liar may as well use the real responder)
    Path(ready).write_text(str(port))
    while True:
        frames = control.recv_multipart()
        msg = wire.decode(frames[1:], max_bytes=1 << 24)
        record({"port": "control", "kind": msg.kind, **msg.fields})
        if msg.kind == "node_hello":
            control.send_multipart([frames[0], *wire.encode("node_info", {**facts, "paired": True})])


if __name__ == "__main__":
    main(*sys.argv[1:4])
