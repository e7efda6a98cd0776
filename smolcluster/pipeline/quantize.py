"""Precision and weight-only quantization, applied to a stage tensor by tensor as it loads.

    precision = fp32 | bf16 | fp16     the type weights are held in, and activations, KV cache and
                                       the wire carry (half the bytes of fp32 for bf16/fp16)
    quantize  = none | int8 | int4     weight-only: the blocks' Linear weights (and the token
                                       embedding / LM head) as integers plus scales

- ``int8``: symmetric, one scale per output channel (each row of an ``out x in`` weight);
  a CPU stage's decode-sized matmuls (up to ``PACKED_ROWS`` rows) by :func:`cpu_kernels.rows_mm`
  where it is built, else ``torch.ops.aten._weight_int8pack_mm`` (torch's own CPU kernel); larger
  ones dequantized.
- ``int4``: asymmetric, group-wise along the input dim (``group_size`` 32/64/128), scale
  and zero per group; packed and multiplied by torch's tinygemm CPU kernels
  (``_convert_weight_to_int4pack_for_cpu`` / ``_weight_int4pack_mm_for_cpu``). The token
  embedding and LM head are int8 then (a lookup table of int4 groups has no kernel, and
  the head is where int4 costs the most quality).
- torch's packed kernels get their activations in bf16 (see ``KERNEL_DTYPE``); ``kernels(fmt)`` says
  which path a stage's matmuls take on its machine (bf16: ``rows_mm`` for a few rows where it is
  built; beyond, oneDNN where the CPU has AMX or AVX512-BF16, else torch's bf16-load / fp32-math kernels).

Why torch's ops and not ``torchao``: torchao 0.18 is on PyPI, but it was not installed into the
shared environment or tried against torch 2.13 here (its compiled kernels are built per torch
release), and its CPU weight-only int8/int4 paths call these same aten kernels anyway. What is
written here is only what the kernels do not do: computing the integers and scales (a few
lines each), a dequantize-then-matmul for int8 prefills (torch's int8 CPU kernel tiles a few
rows at a time), and reading a large tensor in row chunks so the full-precision tensor is never resident
beside its quantized copy (:func:`convert`).

Norms, biases and position embeddings stay in the compute type: they are a rounding
error of the memory and carry the numerics that matter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.errors import ConfigError
from smolcluster.pipeline import cpu_kernels

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZE = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
_CHUNK_BYTES = 1 << 20  # a big tensor is read and converted this many bytes at a time


@dataclass(frozen=True)
class StageFormat:
    """How a stage holds its weights: compute precision, weight quantization, and the device."""

    precision: str = "fp32"
    quantize: str = "none"
    group_size: int = 64
    device: str = "cpu"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is invalid: choose {' | '.join(PRECISIONS)}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize={self.quantize!r} is invalid: choose {' | '.join(QUANTIZE)}")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"quantize_group={self.group_size!r} is invalid: choose "
                              f"{' | '.join(map(str, GROUP_SIZES))}")
        if self.quantize == "int4" and torch.device(self.device).type != "cpu":
            raise ConfigError(f"quantize=int4 runs on CPU stages only (torch's packed int4 CPU kernel); on "
                              f"{self.device} use quantize=int8 or precision=bf16/fp16")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


def resolve_device(device: str | None) -> str:
    """``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` / ``auto`` (cuda if present, else mps, else cpu), checked here."""
    device = device or "cpu"
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is invalid: choose cpu, cuda, cuda:N, mps or auto") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: this machine has no CUDA device (torch sees none); use cpu or auto")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= \
            torch.cuda.device_count():
        raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device={device!r}: MPS is not available here (Apple silicon + a macOS torch build)")
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r} is invalid: choose cpu, cuda, cuda:N, mps or auto")
    return device


def cpu_isa() -> str:
    """The CPU's best instructions for low-precision matmuls, as torch sees them."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return torch.backends.cpu.get_cpu_capability()  # AVX512 | AVX2 | DEFAULT (or an ARM capability)


def kernels(fmt: StageFormat) -> str:
    """Which matmul kernels a stage of this format runs, on this machine, in words (its startup line, the
    stage's beacon, ``/v1/models``)."""
    if torch.device(fmt.device).type != "cpu":
        return f"{fmt.device}: {fmt.precision} matmuls" + ("" if fmt.quantize == "none" else
                                                          f" on {fmt.quantize} weights dequantized per matmul")
    isa = cpu_isa()
    rows = f"{cpu_kernels.describe()}, " if uses_rows_mm(fmt) else ""
    if fmt.quantize == "int8":
        return (f"int8: {rows or 'aten._weight_int8pack_mm, bf16 activations, '}"
                f"larger products dequantized ({isa})")
    if fmt.quantize == "int4":
        return f"int4: aten._weight_int4pack_mm_for_cpu, bf16 activations ({isa}); embedding and head int8" + \
            (f" on {cpu_kernels.describe()}" if rows else "")
    if fmt.precision == "fp32":
        return f"fp32: {rows}MKL sgemm ({isa})"
    if fmt.precision == "bf16" and isa in ("AMX", "AVX512-BF16"):
        return f"bf16: {rows}oneDNN ({isa})"
    # torch sends a bf16/fp16 matmul to oneDNN only where the CPU has native bf16 (AMX, AVX512-BF16) or fp16
    # (AMX-FP16, AVX512-FP16) instructions; elsewhere to its own kernels, which load 16-bit weights and
    # multiply in fp32 (half the bytes read, no converted copy of the weights): bench quantize --decode.
    return f"{fmt.precision}: {rows}aten cpublas, {fmt.precision} loads, fp32 math ({isa})"


def uses_rows_mm(fmt: StageFormat) -> bool:
    """Whether a stage of this format sends its few-row matmuls to :func:`cpu_kernels.rows_mm` here: a CPU
    stage whose weights it reads (fp32, bf16, int8; not fp16), once the kernel is loaded
    (:func:`cpu_kernels.available`: not yet built, it starts a background build and this stage keeps torch's
    kernels). bf16 too where the CPU has native bf16: oneDNN's bf16 product at a few rows took 1.7-2.4x
    rows_mm's time on an AVX512-BF16 EPYC (``bench kernels``), so it keeps only a prefill's many rows."""
    if torch.device(fmt.device).type != "cpu":
        return False
    if fmt.quantize == "none" and fmt.precision == "fp16":
        return False
    return cpu_kernels.available()


# -- the integers ---------------------------------------------------------------------------------
def int8_rows(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``w ~= q * scale[:, None]``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale.to(dtype)


def int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group`` inputs: q in [0, 15] (int32) and (in/group, out, 2) scale/zero,
    in tinygemm's convention ``w ~= (q - 8) * scale + zero``."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).view(n, k)
    zero = lo + 8 * scale
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


# -- the modules a quantized stage holds ------------------------------------------------------------
# torch's packed int8/int4 CPU kernels (aten/src/ATen/native/cpu/int8mm_kernel.cpp, int4mm_kernel.cpp) are
# vectorized (AVX512 / AVX2) for bf16 activations only: for fp32 or fp16 ones they fall back to a scalar
# loop, 10-100x slower for a decode step's row (measured here, docs/benchmarks.md "Packed kernels"). So a
# CPU stage hands them its activations in bf16, whatever its compute type, and gets fp32 sums rounded to bf16
# back: one bf16 rounding of the input and output, well inside int8's own error (tests/test_quantize.py).
KERNEL_DTYPE = torch.bfloat16
# Up to this many rows (decode steps, small batches) an int8 matmul runs on the packed kernel; a prefill's
# many rows run faster dequantized (the kernel tiles a few rows at a time; on this project's 2-core Xeon the
# packed kernel led for a 1536 x 576 weight up to ~16 rows and the dequantized product at 64).
PACKED_ROWS = 16
# torch 2.13's packed int8 kernel on AVX512 CPUs reads an input 16 values at a time, and past its rows where the
# width is not a multiple of 16 (garbage out, or a crash: widths 24, 40 and 100 on an AVX512 EPYC; its AVX2 loop
# steps by 8): such projections dequantize instead (tests/test_quantize.py).
PACKED_IN_MULTIPLE = 16


class _DequantizedMatmul(torch.autograd.Function):
    """``F.linear(x, q) * scales`` whose backward dequantizes ``q`` again: autograd would save the float copy
    of the weight for it, one per projection, so training a frozen int8 base would hold the float model."""

    @staticmethod
    def forward(ctx, x, q, scales):
        ctx.save_for_backward(q, scales)
        return F.linear(x, q.to(x.dtype)) * scales

    @staticmethod
    def backward(ctx, grad):
        q, scales = ctx.saved_tensors
        return (grad * scales) @ q.to(grad.dtype), None, None


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias``; also a token lookup table when it replaces an embedding."""

    def __init__(self, n_in: int, n_out: int, bias: bool, padding_idx: int | None = None):
        super().__init__()
        self.n_in, self.n_out, self.padding_idx = n_in, n_out, padding_idx
        self.register_buffer("qweight", torch.empty(n_out, n_in, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(n_out))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None
        self.rows_mm = False  # few-row products on cpu_kernels.rows_mm (prepare sets it where the kernel is built)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # The packed kernel takes its scales in its activations' type: a bf16 view of them (2 bytes an
        # output channel; the same tensor in a bf16 stage), outside the state dict.
        self.kernel_scales = self.scales.to(KERNEL_DTYPE)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.n_in)
        if x2.requires_grad:  # training through a frozen int8 base (LoRA): keep int8 rows for the backward
            y = _DequantizedMatmul.apply(x2, self.qweight, self.scales)
        elif self.rows_mm and x2.shape[0] <= cpu_kernels.KERNEL_ROWS:  # fp32 activations, bias added inside
            return cpu_kernels.rows_mm(x2, self.qweight, self.scales, self.bias).view(*x.shape[:-1], self.n_out)
        elif x2.device.type == "cpu" and x2.shape[0] <= PACKED_ROWS and self.n_in % PACKED_IN_MULTIPLE == 0:
            # (the packed kernel has no backward)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE).contiguous(), self.qweight,
                                                   self.kernel_scales).to(x.dtype)
        else:
            # A prefill's many rows, or cuda / mps: dequantize on the fly (int8 storage, a compute-type matmul).
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.n_out)

    forward = project

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids, None]


class Int8Embedding(Int8Linear):
    """An int8 token embedding (rows are tokens): ``forward`` looks up, ``project`` is the tied LM head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids)


class Int4Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool, group: int):
        super().__init__()
        self.n_in, self.n_out, self.group = n_in, n_out, group
        self.register_buffer("qweight", torch.empty(n_out, n_in // 2, dtype=torch.uint8))
        self.register_buffer("scales_zeros", torch.empty(n_in // group, n_out, 2))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.kernel_scales_zeros = self.scales_zeros.to(KERNEL_DTYPE)  # as Int8Linear's kernel_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.n_in).to(KERNEL_DTYPE).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group,
                                                       self.kernel_scales_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.n_out)


class FloatLinear(nn.Module):
    """A float projection, ``weight`` (out, in) as ``nn.Linear`` holds it (GPT-2's Conv1D, stored (in, out), is
    transposed as it loads), whose few-row products run on :func:`cpu_kernels.rows_mm`; a prefill's many rows
    and anything under autograd on ``F.linear`` (MKL). A CPU stage holds its projections so where the kernel
    is built (:func:`prepare`)."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.n_in)
        if x2.shape[0] <= cpu_kernels.KERNEL_ROWS and not x2.requires_grad:
            y = cpu_kernels.rows_mm(x2, self.weight, None, self.bias)
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.n_out)

    forward = project


class FloatEmbedding(FloatLinear):
    """A float token embedding whose ``project`` is the tied LM head (rows are tokens), on the kernel."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class TransposedHead(nn.Module):
    """A float LM head held transposed, ``(in, out)``, so that its product is ``x @ weight_t``.

    Why: on the CPU, MKL's fp32 ``x @ W.T`` for an LM head's shape (a few rows against a
    ~50k x 768 weight) is slow: measured on this project's 2-core Xeon, GPT-2's head took 18.5 ms for
    8 rows and 5.4 ms for one, against 9.2 and 4.4 ms for the same product on the transposed copy (an
    8-row decode step of GPT-2 124M spent 17.9 of its 47.3 ms there). Large prefills are on a
    par, and bf16 is not faster this way, so only fp32 CPU stages hold their head so (:func:`prepare`).
    A head tied to the token embedding is held once, this way round: ``forward`` looks tokens up in
    its columns (~7 us for a decode step's token, ~0.8 ms for 256 prompt tokens).
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.register_buffer("weight_t", torch.empty(n_in, n_out))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(-1, self.n_in) @ self.weight_t).view(*x.shape[:-1], self.n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # the tied token embedding (a lookup)
        return F.embedding(ids, self.weight_t.t())


def project(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """An LM head: ``x @ weight.T`` of an embedding or Linear, float or quantized."""
    # Asked of the class: hasattr on an nn.Embedding falls through to nn.Module.__getattr__, which raises
    # (a formatted AttributeError, ~2 us) every token.
    if hasattr(type(module), "project"):
        return module.project(x)
    return F.linear(x, module.weight)


# -- applying a format to a stage as it loads --------------------------------------------------------
@dataclass
class _Target:
    kind: str            # "int8" | "int4" | "transpose" (a float head held as (in, out): TransposedHead)
    #                      | "float" (a float Conv1D held (out, in): FloatLinear)
    transposed: bool     # GPT-2's Conv1D stores (in, out)


def prepare(stage: nn.Module, fmt: StageFormat, head: str | None = None) -> dict[str, _Target]:
    """Swap the stage's (meta) Linear / Conv1D / Embedding modules for quantized ones; returns which
    file tensors (by parameter name) must be quantized, and how. ``head``: the LM head's module name
    when the stage holds it (a float CPU stage on ``rows_mm`` holds every projection as a :class:`FloatLinear`;
    else an fp32 CPU stage holds its head as a :class:`TransposedHead`)."""
    if fmt.quantize == "none" and uses_rows_mm(fmt):
        return _float_projections(stage, head)
    if fmt.quantize == "none":
        if head is None or fmt.dtype != torch.float32 or torch.device(fmt.device).type != "cpu":
            return {}
        module = stage.get_submodule(head)
        if getattr(module, "bias", None) is not None:  # no supported family has one; keep it exact if one did
            return {}
        n_out, n_in = module.weight.shape  # an Embedding's (tokens, dim) or a Linear's (out, in): the same
        parent_name, _, attr = head.rpartition(".")
        setattr(stage.get_submodule(parent_name) if parent_name else stage, attr, TransposedHead(n_in, n_out))
        return {f"{head}.weight": _Target("transpose", False)}
    from smolcluster.pipeline.architectures.gpt2 import Conv1D

    targets: dict[str, _Target] = {}
    for name, module in list(stage.named_modules()):
        if not name:
            continue
        if isinstance(module, nn.Embedding):
            if name.endswith("wpe"):  # positions: small, and added to every hidden state
                continue
            new = Int8Embedding(module.embedding_dim, module.num_embeddings, False, module.padding_idx)
            kind, transposed = "int8", False
        elif isinstance(module, (nn.Linear, Conv1D)):
            transposed = isinstance(module, Conv1D)
            n_in, n_out = (module.weight.shape[0], module.weight.shape[1]) if transposed else \
                (module.weight.shape[1], module.weight.shape[0])
            head = name == "lm_head"
            kind = "int8" if fmt.quantize == "int8" or head else "int4"
            if kind == "int4" and n_in % fmt.group_size:
                raise ConfigError(f"quantize=int4: {name} has {n_in} inputs, not a multiple of "
                                  f"quantize_group={fmt.group_size}; choose a group that divides it")
            bias = module.bias is not None
            new = Int8Linear(n_in, n_out, bias) if kind == "int8" else Int4Linear(n_in, n_out, bias, fmt.group_size)
        else:
            continue
        if isinstance(new, Int8Linear):
            new.rows_mm = uses_rows_mm(fmt)
        parent_name, _, attr = name.rpartition(".")
        setattr(stage.get_submodule(parent_name) if parent_name else stage, attr, new)
        targets[f"{name}.weight"] = _Target(kind, transposed)
    return targets


def _float_projections(stage: nn.Module, head: str | None) -> dict[str, _Target]:
    """A float CPU stage with the kernel: every Linear / Conv1D a :class:`FloatLinear`, and a head tied to the
    token embedding a :class:`FloatEmbedding` (the kernel reads (out, in): no :class:`TransposedHead`)."""
    from smolcluster.pipeline.architectures.gpt2 import Conv1D

    targets: dict[str, _Target] = {}
    for name, module in list(stage.named_modules()):
        if isinstance(module, nn.Linear):
            new = FloatLinear(module.in_features, module.out_features, module.bias is not None)
        elif isinstance(module, Conv1D):
            new = FloatLinear(module.weight.shape[0], module.weight.shape[1], True)
            targets[f"{name}.weight"] = _Target("float", True)
        elif isinstance(module, nn.Embedding) and name == head:
            new = FloatEmbedding(module.embedding_dim, module.num_embeddings, False)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(stage.get_submodule(parent_name) if parent_name else stage, attr, new)
    return targets


def convert(name: str, shape: tuple, read_rows: Callable[[int, int], torch.Tensor], fmt: StageFormat,
            targets: dict[str, _Target]) -> dict[str, torch.Tensor]:
    """The state-dict entries for file tensor ``name``, built from ``read_rows(r0, r1)`` (file rows, file dtype).

    A tensor is read a chunk of rows at a time into its final form, so no full-precision copy of
    it is ever resident (for int4, GPT-2's Conv1D weights, stored (in, out), are read whole: one
    block's matrix, not the model).
    """
    dev, dtype, target = fmt.device, fmt.dtype, targets.get(name)
    rows = shape[0] if shape else 1
    row_bytes = max(1, (torch.Size(shape[1:]).numel() if len(shape) > 1 else 1) * 4)
    step = max(1, _CHUNK_BYTES // row_bytes)
    base = name.removesuffix(".weight")
    if target is None:
        if not shape:
            return {name: read_rows(0, 1).to(dev)}
        first = read_rows(0, min(rows, step))
        if not first.is_floating_point():
            out = torch.empty(shape, dtype=first.dtype)
        else:
            out = torch.empty(shape, dtype=dtype)
        out[: first.shape[0]] = first
        del first
        for r in range(step, rows, step):
            out[r: r + step] = read_rows(r, min(rows, r + step))
        return {name: out.to(dev)}
    if target.kind == "float":  # GPT-2's Conv1D (in, out) held (out, in): one block's matrix, read whole
        return {name: read_rows(0, rows).t().to(dtype).contiguous().to(dev)}
    if target.kind == "transpose":  # written a chunk of file rows (output channels) at a time into columns
        out = torch.empty(shape[1], rows, dtype=dtype)
        for r in range(0, rows, step):
            out[:, r: r + step] = read_rows(r, min(rows, r + step)).t()
        return {f"{base}.weight_t": out.to(dev)}
    if target.transposed and target.kind == "int8":
        # GPT-2's Conv1D weight is stored (in, out): an output channel is a column. Two passes over chunks
        # of the file's rows, so no more than a chunk is ever in full precision: the columns' absolute
        # maxima (the scales), then each chunk quantized and written transposed.
        n_in, n_out = shape
        amax = torch.zeros(n_out)
        for r in range(0, n_in, step):
            amax = torch.maximum(amax, read_rows(r, min(n_in, r + step)).float().abs().amax(dim=0))
        scale = (amax / 127).clamp(min=1e-12)
        q = torch.empty(n_out, n_in, dtype=torch.int8)
        for r in range(0, n_in, step):
            chunk = read_rows(r, min(n_in, r + step)).float()
            q[:, r: r + step] = torch.round(chunk / scale).clamp_(-127, 127).to(torch.int8).t()
        return {f"{base}.qweight": q.to(dev), f"{base}.scales": scale.to(dtype).to(dev)}
    if target.transposed:  # int4: the (out, in) int32 matrix the packing kernel needs is one block's, freed at once
        q, sz = int4_groups(read_rows(0, rows).t(), fmt.group_size)
        return {f"{base}.qweight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                f"{base}.scales_zeros": sz.to(dtype)}
    if target.kind == "int8":
        q = torch.empty(shape, dtype=torch.int8)
        s = torch.empty(rows, dtype=dtype)
        for r in range(0, rows, step):
            q[r: r + step], s[r: r + step] = int8_rows(read_rows(r, min(rows, r + step)), dtype)
        return {f"{base}.qweight": q.to(dev), f"{base}.scales": s.to(dev)}
    # int4: groups run along a row, so rows quantize independently; the packing kernel needs the whole
    # (out, in) int32 matrix (one block's, freed at once).
    q = torch.empty(shape, dtype=torch.int32)
    sz = torch.empty(shape[1] // fmt.group_size, rows, 2, dtype=dtype)
    for r in range(0, rows, step):
        q[r: r + step], sz[:, r: r + step] = int4_groups(read_rows(r, min(rows, r + step)), fmt.group_size)
    return {f"{base}.qweight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), f"{base}.scales_zeros": sz}


def compute_dtype(stage: nn.Module) -> torch.dtype:
    """The stage's compute type: that of its floating-point tensors (activations are cast to it on arrival)."""
    for t in (*stage.parameters(), *stage.buffers()):
        if t.is_floating_point() and t.device.type != "meta" and t.dtype != torch.float32:
            return t.dtype
    return torch.float32
