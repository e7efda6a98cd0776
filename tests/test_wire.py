"""The wire format: round trips, zero copy, and every kind of hostile message rejected with its reason."""

import msgpack
import numpy as np
import pytest
import torch

from smolcluster.transport import wire
from smolcluster.transport.wire import WireError, decode, encode

LIMIT = 1 << 20
GRAD = {"rank": 1, "step": 3, "version": 3, "samples": 32, "loss": 0.25}


def header(**over):
    h = {"v": 1, "kind": "grad", **GRAD, "tensors": [{"name": "g", "dtype": "float32", "shape": [4], "codec": "none"}]}
    h.update(over)
    return msgpack.packb(h)


def test_roundtrip_is_zero_copy_on_the_receive_side():
    g = np.arange(1000, dtype=np.float32)
    frames = encode("grad", GRAD, {"float32": g})
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), g)  # sender passes its own buffer
    payload = bytearray(frames[1])
    msg = decode([frames[0], payload], max_bytes=LIMIT)
    out = msg.tensors["float32"]
    assert np.array_equal(out, g) and msg.fields == GRAD and msg.kind == "grad"
    payload[0:4] = np.float32(42).tobytes()  # the received array is a view of the frame
    assert out[0] == 42
    assert msg.tensor("float32").shape == (1000,)
    assert msg.nbytes == len(frames[0]) + 4000


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([], "truncated"),
        ([header()], "truncated"),                                                  # tensor frame missing
        ([header(), b"\0" * 16, b"extra"], "truncated"),
        ([header(), b"\0" * 15], "shape_mismatch"),                                 # 4 floats need 16 bytes
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [5], "codec": "none"}]), b"\0" * 16], "shape_mismatch"),
        ([header(tensors=[{"name": "g", "dtype": "object", "shape": [4], "codec": "none"}]), b"\0" * 16], "dtype"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [-4], "codec": "none"}]), b""], "bad_shape"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": "4", "codec": "none"}]), b""], "bad_shape"),
        ([header(tensors=[{"name": "g", "dtype": "int8", "shape": [4], "codec": "int8"}]), b"\0" * 4], "codec"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [4], "codec": "int8", "chunk": 0}]), b"\0" * 8], "codec"),
        ([header(kind="launch_missiles"), b"\0" * 16], "unknown_kind"),
        ([b"\xc1\xff garbage", b"\0" * 16], "bad_header"),
        ([msgpack.packb([1, 2, 3])], "bad_header"),
        ([header(v=2), b"\0" * 16], "version"),
        ([msgpack.packb({"v": 1, "kind": "grad", "rank": 1, "tensors": []})], "missing_field"),
        ([header(rank="one"), b"\0" * 16], "bad_field"),
        ([header(rank=True), b"\0" * 16], "bad_field"),
        ([header(loss=float("nan")), b"\0" * 16], "non_finite"),
        ([header(evil=1), b"\0" * 16], "unknown_field"),
        ([header(), np.array([1, np.nan, 2, 3], np.float32).tobytes()], "non_finite"),
        ([header(), np.array([1, np.inf, 2, 3], np.float32).tobytes()], "non_finite"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [1 << 20], "codec": "none"}]), b"\0" * (1 << 22)], "oversize"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [1 << 30], "codec": "none"}]), b""], "oversize"),
        ([header(), b"\0" * (LIMIT + 1)], "oversize"),                             # total over the limit
        ([header(tensors=[{"name": "g", "dtype": ["float32"], "shape": [4], "codec": "none"}]), b"\0" * 16], "dtype"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [4], "codec": {}}]), b"\0" * 16], "codec"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [4], "codec": "none"}] * 2), b"\0" * 16,
          b"\0" * 16], "bad_header"),                                              # the same name twice
        ([header(tensors=[{"dtype": "float32", "shape": [4], "codec": "none"}]), b"\0" * 16], "bad_header"),
        ([header(tensors={"g": 1}), b"\0" * 16], "bad_header"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [2, 2.0], "codec": "none"}]), b"\0" * 16],
         "bad_shape"),
        ([header(tensors=[{"name": "g", "dtype": "bool", "shape": [4], "codec": "none"}]), b"\0\1\2\0"], "dtype"),
        ([header(v=True), b"\0" * 16], "version"),                                  # True == 1, but not a version
        ([header(kind=["grad"]), b"\0" * 16], "unknown_kind"),
        ([header(loss=float("inf")), b"\0" * 16], "non_finite"),
        ([header(tensors=[{"name": "g", "dtype": "float16", "shape": [2], "codec": "none"}]),
          np.array([1, np.inf], np.float16).tobytes()], "non_finite"),
        ([header(tensors=[{"name": "g", "dtype": "bfloat16", "shape": [2], "codec": "none"}]),
          torch.tensor([1.0, float("nan")]).to(torch.bfloat16).view(torch.int16).numpy().tobytes()], "non_finite"),
        ([header(tensors=[{"name": "g", "dtype": "float32", "shape": [4], "codec": "int8", "chunk": 2}]),
          b"\0" * 4 + np.array([1, np.inf], np.float32).tobytes()], "non_finite"),     # a hostile int8 scale
    ],
)
def test_hostile_messages_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(WireError) as e:
        decode(frames, max_bytes=LIMIT)
    assert e.value.reason == reason


def test_weights_may_carry_any_value_but_gradients_must_be_finite():
    w = np.array([np.inf, 1.0], np.float32)
    assert decode(encode("weights", {"step": 0, "version": 0}, {"w": w}), max_bytes=LIMIT).tensors["w"][0] == np.inf
    with pytest.raises(WireError):
        decode(encode("grad", GRAD, {"w": w}), max_bytes=LIMIT)


def test_new_kinds_can_be_registered_by_other_modules():
    wire.register_kind("test_ping", {"n": int}, optional={"note": str})
    msg = decode(encode("test_ping", {"n": 3, "note": "hi"}), max_bytes=LIMIT)
    assert msg.fields == {"n": 3, "note": "hi"}
    with pytest.raises(WireError, match="missing_field"):
        decode(encode("test_ping", {"note": "hi"}), max_bytes=LIMIT)


def test_unsendable_dtype_is_refused_at_the_sender():
    with pytest.raises(WireError, match="dtype"):
        encode("weights", {"step": 0, "version": 0}, {"c": np.zeros(2, np.complex64)})


def test_received_tensors_come_back_as_torch_with_their_dtype():
    w = torch.randn(3, 5).to(torch.bfloat16)
    h = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    frames = [bytes(f) for f in encode("weights", {"step": 0, "version": 0}, {"w": w, "h": h})]
    msg = decode(frames, max_bytes=LIMIT)
    assert msg.dtypes == {"w": "bfloat16", "h": "int64"}
    assert torch.equal(msg.tensor("w"), w) and msg.tensor("w").dtype == torch.bfloat16
    assert torch.equal(msg.tensor("h"), h)
    mine = msg.tensor("h", copy=True)  # a private copy may be written to
    mine += 1
    assert torch.equal(msg.tensor("h"), h) and torch.equal(mine, h + 1)


def test_noncontiguous_and_0d_tensors_and_numpy_scalars_in_fields_travel():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed (non-contiguous) view
    scalar = np.array(2.5, np.float32)
    fields = {**GRAD, "loss": np.float32(0.5), "samples": np.int64(8)}
    msg = decode([bytes(f) for f in encode("grad", fields, {"t": t, "s": scalar})], max_bytes=LIMIT)
    assert torch.equal(msg.tensor("t"), t) and msg.tensors["s"].shape == () and msg.tensors["s"] == 2.5
    assert msg.fields["loss"] == 0.5 and msg.fields["samples"] == 8


def test_a_header_field_that_msgpack_cannot_carry_is_refused_at_the_sender():
    with pytest.raises(TypeError, match="cannot put a object"):
        encode("heartbeat", {"rank": object()})


def test_deep_or_huge_headers_are_rejected_not_crashing():
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(WireError) as e:
        decode([deep], max_bytes=LIMIT)
    assert e.value.reason == "bad_header"
    with pytest.raises(WireError) as e:
        decode([b"\0" * (2 << 20)], max_bytes=8 << 20)
    assert e.value.reason == "oversize"


def test_headers_are_packbs_bytes_after_a_refused_one_and_from_many_threads():
    """encode reuses one msgpack Packer per thread: its bytes must stay exactly packb's (the wire format),
    a header refused half-packed must leave nothing behind, and threads must not mix their headers."""
    from concurrent.futures import ThreadPoolExecutor

    def fields(i: int) -> dict:
        return {"rank": i, "step": 7 * i, "version": 1, "samples": 8, "loss": 0.5 + i}

    def want(i: int) -> bytes:
        return msgpack.packb({"v": wire.PROTOCOL_VERSION, "kind": "grad", **fields(i), "tensors": []},
                             use_bin_type=True)

    with pytest.raises(TypeError):
        encode("grad", {**fields(1), "loss": object()})  # refused after rank/step/... were packed
    assert encode("grad", fields(2))[0] == want(2)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: encode("grad", fields(i))[0], range(2000)))
    assert got == [want(i) for i in range(2000)]
