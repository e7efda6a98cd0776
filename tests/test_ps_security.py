"""Hostile input and CURVE against a live SyncPS server: rejected, counted, model untouched."""

from __future__ import annotations

import msgpack
import numpy as np
import zmq
from safetensors.torch import load_file

from smolcluster.transport import make_keys, wire
from tests.cluster_util import Cluster
from tests.conftest import ATTACKED_SYNCPS as ARGS


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def hostile_messages() -> list[list[bytes]]:
    grad = {"v": 1, "kind": "grad", "rank": 0, "step": 5, "version": 5, "samples": 64, "loss": 0.1,
            "tensors": [{"name": "float32", "dtype": "float32", "shape": [17226], "codec": "none"}]}
    big = np.full(17226, 1e6, np.float32).tobytes()
    return [
        [msgpack.packb(grad)],                                                      # truncated: frame missing
        [msgpack.packb(grad), big[:-4]],                                            # frame shorter than its shape
        [msgpack.packb({**grad, "tensors": [{**grad["tensors"][0], "dtype": "float64"}]}), big],  # wrong dtype
        [msgpack.packb({**grad, "tensors": [{**grad["tensors"][0], "shape": [99]}]}), big],       # shape/length mismatch
        [msgpack.packb({**grad, "tensors": [{**grad["tensors"][0], "shape": [1 << 30]}]}), b""],  # oversize: 4 GB > limit
        [msgpack.packb({**grad, "kind": "format_disk"}), big],                      # unknown kind
        [b"\xd9\xff\x00not msgpack"],                                               # garbage msgpack
        [msgpack.packb(grad), np.full(17226, np.nan, np.float32).tobytes()],        # NaN gradient
        [msgpack.packb(grad), big],                                                 # well-formed but unregistered
        wire.encode("register", {"rank": 0, "node": "evil", "device": "cpu", "batch_size": 64, "protocol": 1,
                                 "fingerprint": "0123456789abcdef", "algo": "syncps"}),  # foreign model
    ]


def test_hostile_input_to_a_live_server_is_rejected_and_the_model_is_untouched(tmp_path, clean_syncps_weights):
    reference = clean_syncps_weights
    with Cluster(tmp_path / "attacked", "syncps", *ARGS, workers=1) as c:
        c.server()
        c.worker(0)
        c.wait_for_step(10)
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(f"tcp://127.0.0.1:{c.port}")
        for frames in hostile_messages():
            raw.send_multipart([bytes(f) for f in frames])
        replies = []
        while raw.poll(3000):
            replies.append(wire.decode(raw.recv_multipart(), max_bytes=1 << 20))
        raw.close()
        assert c.wait("server") == 0, c.output("server")[-3000:]
        summary = c.summary()
    kinds = [m.kind for m in replies]
    assert kinds.count("error") == 9 and kinds.count("refuse") == 1
    rejected = summary["rejected_messages"]
    assert sum(rejected.values()) == 10, rejected  # 9 bad messages + the refused foreign-model registration
    assert rejected.get("refused_fingerprint") == 1, rejected
    for reason in ("truncated", "dtype", "shape_mismatch", "oversize", "unknown_kind", "bad_header", "non_finite",
                   "unregistered"):
        assert rejected.get(reason), (reason, rejected)
    assert summary["steps"] == 100 and summary["workers"]["0"]["applied"] == 100
    assert same_weights(load_file(tmp_path / "attacked" / "checkpoint.safetensors"), reference)


def test_with_curve_a_client_without_the_key_cannot_affect_training(tmp_path, clean_syncps_weights):
    make_keys(tmp_path / "keys")
    keys = f"cluster.keys={tmp_path / 'keys'}"
    reference = clean_syncps_weights
    with Cluster(tmp_path / "curve", "syncps", *ARGS, keys, workers=1) as c:
        c.server()
        c.worker(0)
        c.wait_for_step(10)
        raw = zmq.Context.instance().socket(zmq.DEALER)  # no CURVE keys at all
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(f"tcp://127.0.0.1:{c.port}")
        for frames in hostile_messages()[-2:]:
            raw.send_multipart([bytes(f) for f in frames])
        assert not raw.poll(2000)  # no answer: the handshake never completed
        raw.close()
        assert c.wait("server") == 0, c.output("server")[-3000:]
        summary = c.summary()
    assert summary["rejected_messages"] == {}  # nothing even reached the decoder
    assert same_weights(load_file(tmp_path / "curve" / "checkpoint.safetensors"), reference)
