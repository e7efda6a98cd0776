"""Messages <-> zmq frames: a msgpack header, then one raw frame per tensor. No pickle, ever.

    frame 0   msgpack {"v": 1, "kind": "grad", ...fields..., "tensors": [{"name", "dtype", "shape", "codec", ...}]}
    frame 1.. the tensors' bytes, in header order

Senders pass the arrays' own memory (``copy=False``); receivers view the frames with
``np.frombuffer`` — no copy for uncompressed tensors. Every header field is checked
against the kind's schema *before* anything is used (:func:`decode`); a bad message
raises :class:`WireError` with a short ``reason`` that the endpoints count.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from smolcluster.transport.compression import CODECS, get_codec

PROTOCOL_VERSION = 1

# Only these dtypes may arrive; bfloat16 travels as its raw 16 bits.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64), "bool": np.dtype(np.bool_),
}
_FLOATS = {"float32", "float16", "bfloat16"}
# dtype -> its wire name, looked up per tensor sent (``ndarray.dtype.name`` costs ~3 us: it is a hop's hot path)
_WIRE_NAME = {dt: name for name, dt in DTYPES.items() if name != "bfloat16"}
_MAX_TENSORS = 64
_MAX_HEADER = 1 << 20


class WireError(ValueError):
    """A malformed message. ``reason`` is a short token the endpoints count (``rejected[reason]``):
    truncated, bad_header, version, unknown_kind, missing_field, unknown_field, bad_field, dtype,
    bad_shape, codec, shape_mismatch, oversize, non_finite."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Schema:
    fields: dict[str, type | tuple]
    optional: dict[str, type | tuple] = field(default_factory=dict)
    finite: bool = False  # float fields and tensors must be finite (gradients, losses)


KINDS: dict[str, Schema] = {}


def register_kind(name: str, fields: dict, *, optional: dict | None = None, finite: bool = False) -> None:
    """Declare a message kind and its header schema; unknown kinds are rejected on receipt."""
    KINDS[name] = Schema(dict(fields), dict(optional or {}), finite)


_NUM = (int, float)
_ANY_METRICS = {"metrics": dict}
# Parameter server (syncps, edp)
register_kind("register", {"rank": int, "node": str, "device": str, "batch_size": int, "protocol": int,
                           "fingerprint": str, "algo": str}, optional={"session": str, **_ANY_METRICS})
register_kind("welcome", {"rank": int, "step": int, "version": int})
register_kind("refuse", {"reason": str}, optional={"retry": bool, "name": str})  # retry: try again later (a live
# rank); name: the node agent's reservation it refuses (node/protocol.py)
register_kind("grad", {"rank": int, "step": int, "version": int, "samples": int, "loss": _NUM},
              optional={"samples_per_s": _NUM, **_ANY_METRICS}, finite=True)
register_kind("weights", {"step": int, "version": int})
register_kind("pull", {"rank": int})
register_kind("ping", {"rank": int})  # a waiting worker: "do you know me?" (see WorkerLink.ping)
register_kind("heartbeat", {"rank": int}, optional={"role": str, "session": str})
register_kind("error", {"reason": str, "detail": str})
register_kind("bye", {"rank": int})
register_kind("stop", {"reason": str})


@dataclass
class Message:
    kind: str
    fields: dict
    tensors: dict[str, np.ndarray]  # codec "none": views of the received frames (no copy)
    nbytes: int = 0  # bytes on the wire, header included
    dtypes: dict[str, str] = field(default_factory=dict)  # wire dtype per tensor ("bfloat16" arrives as uint16)
    sender_key: str | None = None  # the sender's CURVE public key (z85), on a CURVE server; else None

    def tensor(self, name: str, *, copy: bool = False) -> torch.Tensor:
        """The tensor as torch (bfloat16 restored from its raw bits).

        ``copy=False`` (default) is zero-copy: the tensor shares the received frame's memory
        and keeps it alive. Frames from a zmq socket are writable memory that nobody else
        uses, so an in-place update is safe there; frames given as ``bytes`` are read-only
        (writing is undefined, and torch would warn: that warning is silenced here). When
        in doubt, ``copy=True`` returns a private, writable tensor (one memcpy).
        """
        arr = self.tensors[name]
        if copy:
            arr = arr.copy()
        with warnings.catch_warnings():
            # torch warns about read-only numpy memory (bytes frames); see the docstring
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtypes.get(name) == "bfloat16" else t


def _as_array(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.uint16).numpy()
        return t.contiguous().numpy()
    return np.require(t, requirements="C")  # (ascontiguousarray would turn a 0-d array into 1-d)


def _dtype_name(arr: np.ndarray, t) -> str:
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
        return "bfloat16"
    name = _WIRE_NAME.get(arr.dtype)
    if name is None:
        raise WireError("dtype", f"cannot send dtype {arr.dtype.name}; allowed: {', '.join(DTYPES)}")
    return name


def _plain(value):
    """msgpack hook: numpy scalars (a loss from ``np.mean``) travel as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot put a {type(value).__name__} in a message header (numbers, str, bool, list, dict)")


_packers = threading.local()


def _pack(header: dict) -> bytes:
    """``msgpack.packb``'s bytes, from one Packer per thread: ``packb`` builds a Packer per call, whose
    256 KiB buffer glibc maps and unmaps every message (two syscalls, page faults, a TLB flush of every
    core running this process, and the malloc lock held meanwhile, which stalls zmq's I/O thread):
    ~30-60 us a pipeline hop, measured with strace. A Packer is not thread-safe, hence one per thread."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True, default=_plain)
    try:
        return packer.pack(header)
    except BaseException:
        packer.reset()  # a failed pack leaves partial bytes in the buffer (autoreset only resets on success)
        raise


def encode(kind: str, fields: dict | None = None, tensors: dict | None = None, codec="none") -> list:
    """Frames for ``send_multipart(copy=False)``: float32 tensors go through ``codec``; others raw.

    With codec "none" each tensor frame is a memoryview of the array's own memory (no copy):
    keep the array unchanged until zmq has sent it. Tensors must be CPU; a non-contiguous
    one is made contiguous (a copy) first, as is a CUDA/MPS tensor moved to the CPU.
    """
    header = {"v": PROTOCOL_VERSION, "kind": kind, **(fields or {})}
    specs, frames = [], []
    c = get_codec(codec)
    for name, t in (tensors or {}).items():
        arr = _as_array(t)
        spec = {"name": name, "dtype": _dtype_name(arr, t), "shape": list(arr.shape), "codec": "none"}
        if c.name != "none" and arr.dtype == np.float32:
            payload, meta = c.encode(arr.reshape(-1))
            spec.update(codec=c.name, **meta)
            arr = payload
        specs.append(spec)
        frames.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
    header["tensors"] = specs
    return [_pack(header), *frames]


def _check_type(kind: str, key: str, value, want) -> None:
    wants = want if isinstance(want, tuple) else (want,)
    ok = isinstance(value, wants) and not (isinstance(value, bool) and bool not in wants)
    if not ok:
        names = "/".join(w.__name__ for w in wants)
        raise WireError("bad_field", f"{kind}.{key} must be {names}, got {type(value).__name__}")


def _frame_bytes(frame) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    return buf if buf is not None else memoryview(frame)


def decode(frames: list, *, max_bytes: int) -> Message:
    """Validate and decode; raises WireError (never anything else) for any malformed input."""
    if not frames:
        raise WireError("truncated", "empty message")
    bufs = [_frame_bytes(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > max_bytes:
        raise WireError("oversize", f"{total} bytes > limit {max_bytes}")
    if bufs[0].nbytes > _MAX_HEADER:
        raise WireError("oversize", f"header of {bufs[0].nbytes} bytes")
    try:
        header = msgpack.unpackb(bufs[0], raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises many types; all mean the same thing here
        raise WireError("bad_header", f"not msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("bad_header", f"header is a {type(header).__name__}, not a map")
    if type(header.get("v")) is not int or header["v"] != PROTOCOL_VERSION:  # (True == 1 in Python)
        raise WireError("version", f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    kind = header.get("kind")
    schema = KINDS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise WireError("unknown_kind", f"kind {kind!r}")
    fields = {k: v for k, v in header.items() if k not in ("v", "kind", "tensors")}
    for key in schema.fields:
        if key not in fields:
            raise WireError("missing_field", f"{kind}.{key}")
    for key, value in fields.items():  # (each field checked once: this runs per pipeline hop)
        want = schema.fields.get(key) or schema.optional.get(key)
        if want is None:
            raise WireError("unknown_field", f"{kind}.{key}")
        _check_type(kind, key, value, want)
        if schema.finite and isinstance(value, float) and not math.isfinite(value):
            raise WireError("non_finite", f"{kind}.{key}={value}")
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > _MAX_TENSORS:
        raise WireError("bad_header", "tensors must be a list of at most 64 entries")
    if len(bufs) != 1 + len(specs):
        raise WireError("truncated", f"{len(bufs) - 1} tensor frames for {len(specs)} tensors")
    tensors, dtypes = {}, {}
    for spec, buf in zip(specs, bufs[1:]):
        tensors.update(_decode_tensor(kind, spec, buf, schema.finite, max_bytes))
        if spec["name"] in dtypes:
            raise WireError("bad_header", f"tensor {spec['name']!r} appears twice")
        dtypes[spec["name"]] = spec["dtype"]
    return Message(kind, fields, tensors, nbytes=total, dtypes=dtypes)


_FINITE_CHUNK = 1 << 22  # elements per isfinite() pass: bounds the temporary bool array (4 MB)


def _all_finite(arr: np.ndarray, dtype: str) -> bool:
    flat = arr.reshape(-1)
    for i in range(0, flat.size, _FINITE_CHUNK):
        part = flat[i : i + _FINITE_CHUNK]
        if dtype == "bfloat16":  # raw bits: NaN/Inf iff all 8 exponent bits are set
            if ((part & 0x7F80) == 0x7F80).any():
                return False
        elif not np.isfinite(part).all():
            return False
    return True


def _decode_tensor(kind: str, spec, buf: memoryview, finite: bool, max_bytes: int) -> dict[str, np.ndarray]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise WireError("bad_header", "tensor entry without a name")
    name, dtype, shape, codec = spec["name"], spec.get("dtype"), spec.get("shape"), spec.get("codec", "none")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # (an unhashable dtype must not raise TypeError)
        raise WireError("dtype", f"{name}: dtype {dtype!r} not allowed")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape):
        raise WireError("bad_shape", f"{name}: shape {shape!r}")
    if not isinstance(codec, str) or codec not in CODECS or (codec != "none" and dtype != "float32"):
        raise WireError("codec", f"{name}: codec {codec!r} for dtype {dtype}")
    count = math.prod(shape)
    c = CODECS[codec]
    try:
        expected = count * DTYPES[dtype].itemsize if codec == "none" else c.payload_size(count, spec)
    except ValueError as e:
        raise WireError("codec", f"{name}: {e}") from None
    if expected > max_bytes:
        raise WireError("oversize", f"{name}: shape {shape} would need {expected} bytes > limit {max_bytes}")
    if buf.nbytes != expected:
        raise WireError("shape_mismatch", f"{name}: shape {shape} x {dtype} ({codec}) needs {expected} bytes, "
                                          f"frame has {buf.nbytes}")
    if codec == "none":
        arr = np.frombuffer(buf, dtype=DTYPES[dtype], count=count).reshape(shape)
        if dtype == "bool" and (arr.view(np.uint8) > 1).any():
            raise WireError("dtype", f"{name}: a bool tensor holds bytes other than 0 and 1")
    else:
        arr = c.decode(buf, spec, count).reshape(shape)
    if finite and dtype in _FLOATS and not _all_finite(arr, dtype):
        raise WireError("non_finite", f"{name} has NaN or Inf values")
    return {name: arr}
