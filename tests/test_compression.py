"""Codecs: property tests of their round trips through the wire, and error feedback."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from smolcluster.errors import ConfigError
from smolcluster.transport import wire
from smolcluster.transport.compression import ErrorFeedback, Int8, get_codec

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)

GRAD = {"rank": 0, "step": 0, "version": 0, "samples": 1, "loss": 0.0}


def roundtrip(arr: np.ndarray, codec: str, kind: str = "grad") -> np.ndarray:
    fields = GRAD if kind == "grad" else {"step": 0, "version": 0}
    frames = wire.encode(kind, fields, {"g": arr}, codec=codec)
    frames = [bytes(f) for f in frames]  # as they arrive from the network
    return wire.decode(frames, max_bytes=1 << 30).tensors["g"]


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=finite))
def test_none_is_exact_for_any_shape(arr):
    out = roundtrip(arr, "none")
    assert out.shape == arr.shape and out.dtype == np.float32
    assert np.array_equal(out, arr)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=finite), st.sampled_from(["fp16", "bf16"]))
def test_half_precision_codecs_are_within_their_rounding(arr, codec):
    out = roundtrip(arr, codec)
    rel = 2**-11 if codec == "fp16" else 2**-8
    assert out.shape == arr.shape
    assert np.all(np.abs(out - arr) <= rel * np.abs(arr) + 1e-7 + (6e-8 if codec == "fp16" else 0))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 5000).map(lambda n: (n,)), elements=finite))
def test_int8_error_is_at_most_half_a_step_of_its_chunk(arr):
    out = roundtrip(arr, "int8")
    chunk = 2048
    for i in range(0, arr.size, chunk):
        block = arr[i : i + chunk]
        step = np.abs(block).max() / 127
        assert np.abs(out[i : i + chunk] - block).max() <= step / 2 + 1e-6 * step + 1e-12


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 6000).map(lambda n: (n,)), elements=finite), st.integers(1, 70))
def test_int8_matches_the_textbook_quantiser_for_any_chunk_size(arr, chunk):
    """Any chunk (the receiver takes it from the header), across many of the encoder's row batches."""
    frames = [bytes(f) for f in wire.encode("grad", GRAD, {"g": arr}, codec=Int8(chunk))]
    out = wire.decode(frames, max_bytes=1 << 30).tensors["g"]
    n = arr.size
    blocks = np.zeros(-(-n // chunk) * chunk, np.float32)
    blocks[:n] = arr
    blocks = blocks.reshape(-1, chunk)
    scale = (np.abs(blocks).max(axis=1) / np.float32(127)).astype(np.float32)
    q = np.rint(blocks / np.where(scale > 0, scale, 1)[:, None]).clip(-127, 127).astype(np.int8)
    assert np.array_equal(out, (q * scale[:, None]).reshape(-1)[:n])


@settings(max_examples=30, deadline=None)
@given(arrays(st.sampled_from([np.int8, np.uint8, np.int32, np.int64, np.bool_, np.float16]), shapes))
def test_other_dtypes_travel_raw_and_exact(arr):
    out = roundtrip(arr, "int8", kind="weights")  # the codec applies to float32 only; weights may be inf
    assert out.dtype == arr.dtype and np.array_equal(out, arr, equal_nan=True)


def test_bfloat16_torch_tensors_keep_their_bits():
    t = torch.randn(100).to(torch.bfloat16)
    frames = [bytes(f) for f in wire.encode("weights", {"step": 0, "version": 0}, {"w": t})]
    back = wire.decode(frames, max_bytes=1 << 20).tensors["w"]
    assert torch.equal(torch.from_numpy(back.copy()).view(torch.bfloat16), t)


def test_int8_is_about_four_times_smaller():
    arr = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)
    raw = sum(memoryview(f).nbytes for f in wire.encode("grad", GRAD, {"g": arr}))
    small = sum(memoryview(f).nbytes for f in wire.encode("grad", GRAD, {"g": arr}, codec="int8"))
    assert 3.9 < raw / small < 4.0


def test_error_feedback_keeps_the_sum_of_what_was_sent_on_track():
    rng = np.random.default_rng(1)
    codec = get_codec("int8")
    fb = ErrorFeedback("int8")
    true_sum = np.zeros(4096, np.float32)
    sent_fb, sent_plain = np.zeros_like(true_sum), np.zeros_like(true_sum)
    for _ in range(800):
        g = rng.normal(scale=1e-3, size=4096).astype(np.float32)
        g[0] = 1.0  # one large value makes the chunk's scale coarse: small values round to 0
        true_sum += g
        t = {"g": torch.from_numpy(g.copy())}
        fb.compensate(t)
        p, meta = codec.encode(t["g"].numpy())
        sent_fb += codec.decode(memoryview(p).cast("B"), meta, 4096)
        p, meta = codec.encode(g)
        sent_plain += codec.decode(memoryview(p).cast("B"), meta, 4096)
    err_fb = np.abs(sent_fb - true_sum)[1:].mean()
    err_plain = np.abs(sent_plain - true_sum)[1:].mean()
    # with feedback the error stays bounded by one quantisation step; without, it grows like a random walk
    assert err_fb < err_plain / 5, (err_fb, err_plain)


def test_unknown_codec_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="none, fp16, bf16, int8"):
        get_codec("zstd")


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(0, 5000).map(lambda n: (n,)), elements=finite), st.sampled_from([2, 6, 2048]))
def test_int4_matches_the_textbook_quantiser_two_values_a_byte(arr, chunk):
    from smolcluster.transport.compression import Int4

    frames = [bytes(f) for f in wire.encode("grad", GRAD, {"g": arr}, codec=Int4(chunk))]
    out = wire.decode(frames, max_bytes=1 << 30).tensors["g"]
    n = arr.size
    assert out.shape == arr.shape and len(frames[1]) == (n + 1) // 2 + 4 * (-(-n // chunk))
    blocks = np.zeros(-(-n // chunk) * chunk, np.float32)
    blocks[:n] = arr
    blocks = blocks.reshape(-1, chunk)
    scale = (np.abs(blocks).max(axis=1) / np.float32(7)).astype(np.float32)
    q = np.rint(blocks / np.where(scale > 0, scale, 1)[:, None]).clip(-7, 7)
    assert np.array_equal(out, (q * scale[:, None]).reshape(-1)[:n])
    assert np.all(np.abs(out - arr) <= np.repeat(scale, chunk)[:n] / 2 + 1e-6 * np.abs(arr) + 1e-38)  # half a step
    # (+1e-38: a subnormal chunk's absmax / 7 underflows to a zero scale, sent as 0)


def test_int4_is_about_eight_times_smaller_and_error_feedback_keeps_its_sum_on_track():
    arr = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)
    raw = sum(memoryview(f).nbytes for f in wire.encode("grad", GRAD, {"g": arr}))
    small = sum(memoryview(f).nbytes for f in wire.encode("grad", GRAD, {"g": arr}, codec="int4"))
    assert 7.9 < raw / small < 8.0
    rng, codec, fb = np.random.default_rng(2), get_codec("int4"), ErrorFeedback("int4")
    true_sum, sent = np.zeros(4096, np.float32), np.zeros(4096, np.float32)
    for _ in range(200):
        g = rng.normal(size=4096).astype(np.float32)
        true_sum += g
        t = {"g": torch.from_numpy(g.copy())}
        fb.compensate(t)
        p, meta = codec.encode(t["g"].numpy())
        sent += codec.decode(memoryview(p).cast("B"), meta, 4096)
    # what was sent differs from the true sum by one step's rounding (the residual), not 200 steps' worth
    assert np.abs(sent - true_sum).max() < np.abs(g).max() / 7, np.abs(sent - true_sum).max()
