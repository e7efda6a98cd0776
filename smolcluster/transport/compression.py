"""Codecs for float tensors on the wire: none, fp16, bf16, int8 and int4 (per-chunk absmax scale).

One small interface (hivemind-style): ``encode(float32 array) -> (payload, meta)``
and ``decode(payload bytes, meta, count) -> float32 array``, plus ``payload_size``
so the wire can check a frame's length before touching it. All vectorised numpy.
:class:`ErrorFeedback` keeps what a lossy codec threw away and adds it to the next
input, so quantisation error is delayed, not lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class Codec:
    name = "none"
    lossy = False

    def encode(self, arr: np.ndarray) -> tuple[np.ndarray, dict]:
        return arr, {}

    def decode(self, buf, meta: dict, count: int) -> np.ndarray:
        return np.frombuffer(buf, dtype=np.float32, count=count)

    def payload_size(self, count: int, meta: dict) -> int:
        return 4 * count


class Fp16(Codec):
    name, lossy = "fp16", True

    def encode(self, arr):
        # Clip to fp16's range first: an overflow to inf would be rejected by the receiver.
        return np.clip(arr, -65504.0, 65504.0).astype(np.float16), {}

    def decode(self, buf, meta, count):
        return np.frombuffer(buf, dtype=np.float16, count=count).astype(np.float32)

    def payload_size(self, count, meta):
        return 2 * count


class Bf16(Codec):
    """bfloat16 = the top 16 bits of a float32 (round-to-nearest-even), carried as uint16."""

    name, lossy = "bf16", True

    def encode(self, arr):
        import torch  # here, not at the top: a launcher checks codec names without importing torch

        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(torch.bfloat16).view(torch.uint16).numpy(), {}

    def decode(self, buf, meta, count):
        raw = np.frombuffer(buf, dtype=np.uint16, count=count)
        return (raw.astype(np.uint32) << 16).view(np.float32)

    def payload_size(self, count, meta):
        return 2 * count


class Int8(Codec):
    """Symmetric int8 with one float32 absmax scale per chunk; frame = int8 values then the scales.

    Error per value <= its chunk's absmax / 254 (half a step). Works through the array
    ``_ROWS`` chunks at a time, so the temporaries stay small (a few MB) even for a
    GPT-2-sized gradient on a small board.
    """

    name, lossy = "int8", True
    _ROWS = 512

    def __init__(self, chunk: int = 2048):
        self.chunk = chunk

    @staticmethod
    def _quantise(blocks: np.ndarray, q: np.ndarray, scales: np.ndarray) -> None:
        """blocks (rows, width) float32 -> q (rows, width) int8 and scales (rows,), in place."""
        np.divide(np.abs(blocks).max(axis=1), 127.0, out=scales)
        safe = np.where(scales > 0, scales, np.float32(1.0))  # an all-zero chunk: q = 0
        q[...] = np.rint(blocks / safe[:, None]).clip(-127, 127)

    def encode(self, arr):
        flat, c = arr.reshape(-1), self.chunk
        n = flat.size
        full, chunks = n // c, -(-n // c)
        out = np.empty(n + 4 * chunks, dtype=np.uint8)
        q = out[:n].view(np.int8)
        scales = np.empty(chunks, dtype=np.float32)
        for r in range(0, full, self._ROWS):
            rows = slice(r * c, min(full, r + self._ROWS) * c)
            self._quantise(flat[rows].reshape(-1, c), q[rows].reshape(-1, c), scales[r : r + self._ROWS][: full - r])
        if full < chunks:  # the last, shorter chunk
            self._quantise(flat[full * c :].reshape(1, -1), q[full * c :].reshape(1, -1), scales[full:])
        out[n:] = scales.view(np.uint8)
        return out, {"chunk": c}

    def decode(self, buf, meta, count):
        c = int(meta["chunk"])
        full, chunks = count // c, -(-count // c)
        raw = np.frombuffer(buf, dtype=np.uint8)
        q = raw[:count].view(np.int8)
        scales = np.frombuffer(raw[count : count + 4 * chunks].tobytes(), dtype=np.float32)  # aligned copy
        out = np.empty(count, dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):  # a hostile inf scale: the finite check says so
            for r in range(0, full, self._ROWS):
                rows = slice(r * c, min(full, r + self._ROWS) * c)
                np.multiply(q[rows].reshape(-1, c), scales[r : min(full, r + self._ROWS), None],
                            out=out[rows].reshape(-1, c))
            if full < chunks:
                np.multiply(q[full * c :], scales[full], out=out[full * c :])
        return out

    def payload_size(self, count, meta):
        c = meta.get("chunk")
        if not isinstance(c, int) or isinstance(c, bool) or c <= 0 or c > 1 << 24:
            raise ValueError(f"int8 chunk must be a positive integer, got {c!r}")
        return count + 4 * (-(-count // c))


class Int4(Codec):
    """Symmetric int4 (-7..7) with one float32 absmax scale per chunk, two values a byte (low nibble first,
    stored +8); frame = the packed bytes then the scales. Error per value <= its chunk's absmax / 14. For
    DiLoCo's outer gradient (``algo=diloco algo.codec=int4``), where error feedback makes up the rounding
    over rounds. Whole-array numpy (temporaries ~ 2x the input): it runs once a round, not once a step."""

    name, lossy = "int4", True

    def __init__(self, chunk: int = 2048):
        if chunk <= 0 or chunk % 2:
            raise ValueError(f"int4 chunk must be a positive even number, got {chunk}")
        self.chunk = chunk

    def encode(self, arr):
        flat, c = arr.reshape(-1), self.chunk
        n = flat.size
        chunks = -(-n // c)
        blocks = np.zeros((chunks, c), dtype=np.float32)  # the last chunk padded with zeros (q = 0)
        blocks.reshape(-1)[:n] = flat
        scales = (np.abs(blocks).max(axis=1) / np.float32(7.0)).astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1.0))
        q = (np.rint(blocks / safe[:, None]).clip(-7, 7) + 8).astype(np.uint8).reshape(-1)[: n + n % 2]
        if n % 2:
            q[-1] = 8  # the pad nibble of an odd count: zero
        out = np.empty(len(q) // 2 + 4 * chunks, dtype=np.uint8)
        np.bitwise_or(q[0::2], q[1::2] << 4, out=out[: len(q) // 2])
        out[len(q) // 2 :] = scales.view(np.uint8)
        return out, {"chunk": c}

    def decode(self, buf, meta, count):
        c, half = int(meta["chunk"]), (count + 1) // 2
        chunks = -(-count // c)
        raw = np.frombuffer(buf, dtype=np.uint8)
        scales = np.frombuffer(raw[half : half + 4 * chunks].tobytes(), dtype=np.float32)  # aligned copy
        q = np.empty(chunks * c, dtype=np.float32)
        q[: 2 * half : 2] = (raw[:half] & 15).astype(np.float32) - 8
        q[1 : 2 * half : 2] = (raw[:half] >> 4).astype(np.float32) - 8
        q[2 * half :] = 0
        with np.errstate(invalid="ignore", over="ignore"):  # a hostile inf scale: the finite check says so
            out = (q.reshape(chunks, c) * scales[:, None]).reshape(-1)[:count]
        return np.ascontiguousarray(out)

    def payload_size(self, count, meta):
        c = meta.get("chunk")
        if not isinstance(c, int) or isinstance(c, bool) or c <= 0 or c % 2 or c > 1 << 24:
            raise ValueError(f"int4 chunk must be a positive even integer, got {c!r}")
        return (count + 1) // 2 + 4 * (-(-count // c))


CODECS: dict[str, Codec] = {c.name: c for c in (Codec(), Fp16(), Bf16(), Int8(), Int4())}


def get_codec(name: str | Codec) -> Codec:
    if isinstance(name, Codec):
        return name
    try:
        return CODECS[name]
    except KeyError:
        from smolcluster.errors import ConfigError

        raise ConfigError(f"codec {name!r} is unknown: choose one of {', '.join(CODECS)}") from None


class ErrorFeedback:
    """Error feedback for a lossy codec: send x + residual, keep what the codec lost for next time."""

    def __init__(self, codec: str | Codec):
        self.codec = get_codec(codec)
        self.residual: dict[str, torch.Tensor] = {}

    def compensate(self, tensors: dict[str, torch.Tensor]) -> None:
        """In place: tensors += residual; residual = tensors - decode(encode(tensors))."""
        import torch  # here, not at the top: see Bf16.encode

        if not self.codec.lossy:
            return
        for name, t in tensors.items():
            r = self.residual.get(name)
            if r is not None:
                t.add_(r)
            arr = t.detach().cpu().numpy().reshape(-1)
            payload, meta = self.codec.encode(arr)
            sent = self.codec.decode(memoryview(payload).cast("B"), meta, arr.size)
            self.residual[name] = torch.from_numpy(arr - sent).to(t.device).view_as(t)
