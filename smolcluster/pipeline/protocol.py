"""The pipeline's message kinds and their fields, checked before use; frames via the wire format.

Every data message carries ``src`` (the sender's node name) and ``seq`` (its
sequence number on the sender->receiver link, see :mod:`smolcluster.pipeline.mesh`).
Tensors travel as raw frames (no pickle): activations are sent from contiguous
memory with ``copy=False`` and arrive as read-only numpy views of the frame.
"""

from __future__ import annotations

import msgpack
import numpy as np

_COMMON = ("src", "seq")

# kind -> fields it must carry (besides src, seq); numbers in FINITE must be finite.
KINDS: dict[str, tuple[str, ...]] = {
    # every node, always
    "mp.heartbeat": ("inc", "heard", "sent", "info"),
    "mp.bye": (),
    # training (GPipe)
    "mp.act": ("step", "mb", "phase"),      # tensors: x (activations into the next stage)
    "mp.grad": ("step", "mb"),              # tensors: g (gradient of the loss w.r.t. those activations)
    "mp.tied": ("step",),                   # tensors: g (this stage's gradient of the tied embedding)
    "mp.norm": ("step", "sq"),              # this stage's squared gradient norm, for global clipping
    "mp.eval": ("step", "loss_sum", "correct", "count"),
    # inference
    "mp.hello": ("head", "address"),        # a head announces its inbox
    "mp.submit": ("req", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "eos"),  # tensors: ids
    "mp.hidden": ("req",),                  # tensors: x (hidden states for the next stage)
    "mp.token": ("req", "token", "index", "done", "reason"),
    "mp.cancel": ("req",),
    "mp.error": ("req", "message"),
    "mp.shutdown": (),
}
FINITE = {"mp.norm": ("sq",), "mp.eval": ("loss_sum",), "mp.submit": ("temperature", "top_p")}

_DTYPES = {"float32", "float16", "bfloat16", "int64", "int32", "uint8"}


# TEMPORARY stand-in until smolcluster.transport.wire lands (same layout: msgpack header + raw frames).
def encode(kind: str, fields: dict, tensors: dict[str, np.ndarray] | None) -> list:
    tensors = tensors or {}
    specs = [{"name": k, "dtype": str(a.dtype), "shape": list(a.shape)} for k, a in tensors.items()]
    header = msgpack.packb({"v": 1, "kind": kind, **fields, "tensors": specs})
    return [header, *(np.ascontiguousarray(a) for a in tensors.values())]


def decode(frames: list, max_bytes: int) -> tuple[str, dict, dict[str, np.ndarray]]:
    header = msgpack.unpackb(bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]))
    kind = header.pop("kind", None)
    if header.pop("v", None) != 1 or kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    specs = header.pop("tensors", [])
    for f in _COMMON + KINDS[kind]:
        if f not in header:
            raise ValueError(f"{kind} without field {f!r}")
    for f in FINITE.get(kind, ()):
        if not np.isfinite(header[f]):
            raise ValueError(f"{kind}.{f} is not finite")
    if len(specs) != len(frames) - 1:
        raise ValueError("tensor count does not match frames")
    tensors = {}
    for spec, frame in zip(specs, frames[1:]):
        if spec["dtype"] not in _DTYPES:
            raise ValueError(f"dtype {spec['dtype']}")
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        arr = np.frombuffer(buf, dtype=spec["dtype"])
        if arr.size != int(np.prod(spec["shape"])):
            raise ValueError("shape does not match frame")
        tensors[spec["name"]] = arr.reshape(spec["shape"])
    return kind, header, tensors
