"""The CPU matmul kernel (``smolcluster::rows_mm``) against torch's own kernels, per weight shape and row count.

    python -m smolcluster.bench kernels                        # SmolLM2-135M's shapes, 1-32 rows, fp32/bf16/int8
    python -m smolcluster.bench kernels --rows 1,4 --formats int8 --threads 1

Each arm multiplies ``rows`` activations by the weight as a stage would (fp32 activations; an int8 weight
with per-channel scales), torch's side being what a stage runs without the kernel:

- fp32: ``F.linear`` (MKL sgemm);
- bf16: ``F.linear`` on bf16 activations and weights (oneDNN with native bf16, else torch's cpublas);
- int8: ``aten._weight_int8pack_mm`` on bf16 activations (torch's packed CPU kernel; for inputs not a multiple
  of 16 wide, which it misreads, the dequantized ``F.linear``, as a stage runs them).

A call streams one of several copies of the weight, together larger than the L3 cache, so each call reads its
weight from memory as a decode step does (a model's weights never fit the cache). Arms alternate, rounds are
interleaved, and the figure is the median per call; ``rows_mm / torch`` is the ratio of speeds in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from smolcluster.bench.report import write_report
from smolcluster.errors import SmolclusterError

# (out, in) of SmolLM2-135M's projections (q/o, k/v, gate/up, down) and its tied LM head
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))
FORMATS = ("fp32", "bf16", "int8")


def arms(fmt: str, x: torch.Tensor, n_out: int):
    """(make one weight copy, rows_mm's call, torch's call) for a format."""
    from smolcluster.pipeline.cpu_kernels import rows_mm

    scale = torch.rand(n_out) + 0.5
    if fmt == "int8":
        from smolcluster.pipeline.quantize import PACKED_IN_MULTIPLE

        xb, sb = x.bfloat16(), scale.bfloat16()
        def make():
            return torch.randint(-127, 128, (n_out, x.shape[1]), dtype=torch.int8)

        if x.shape[1] % PACKED_IN_MULTIPLE:  # what a stage runs where torch's packed kernel misreads the width
            return make, lambda w: rows_mm(x, w, scale), lambda w: F.linear(x, w.float()) * scale
        return make, lambda w: rows_mm(x, w, scale), lambda w: torch.ops.aten._weight_int8pack_mm(xb, w, sb).float()
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    xt = x.to(dtype)
    return (lambda: torch.randn(n_out, x.shape[1]).to(dtype), lambda w: rows_mm(x, w), lambda w: F.linear(xt, w))


def per_call(f, weights) -> float:
    t0 = time.perf_counter()
    for w in weights:
        f(w)
    return (time.perf_counter() - t0) / len(weights)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8,16,32", help="activation rows per product (decode: 1 per request)")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)}")
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="weights as OUTxIN")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (a stage's threads)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stream-mb", type=int, default=96,
                   help="the copies of a weight a round walks through, in MB: beyond the L3 cache")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    from smolcluster.pipeline import cpu_kernels

    if not cpu_kernels.available(wait=True):
        raise SmolclusterError(f"the CPU kernel is not available here: {cpu_kernels.describe()}")
    formats = args.formats.split(",")
    if bad := [f for f in formats if f not in FORMATS]:
        p.error(f"unknown format {bad}: choose from {', '.join(FORMATS)}")
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        p.error("--rows takes integers (1,4,8) and --shapes OUTxIN pairs (576x576,1536x576)")
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for n_out, n_in in shapes:
            for fmt in formats:
                for m in rows_list:
                    x = torch.randn(m, n_in)
                    make, ours, theirs = arms(fmt, x, n_out)
                    first = make()
                    size = first.numel() * first.element_size()
                    weights = [first] + [make() for _ in range(max(1, (args.stream_mb << 20) // size) - 1)]
                    ref = theirs(first).float()
                    err = ((ours(first).float() - ref).abs().max() / ref.abs().max()).item()
                    ours(first), theirs(first)  # first-call costs
                    t_ours, t_theirs = [], []
                    for _ in range(args.rounds):
                        t_ours.append(per_call(ours, weights))
                        t_theirs.append(per_call(theirs, weights))
                    a, b = statistics.median(t_ours), statistics.median(t_theirs)
                    rows.append({"weight": f"{n_out}x{n_in}", "format": fmt, "rows": m,
                                 "rows_mm us": round(a * 1e6, 1), "torch us": round(b * 1e6, 1),
                                 "rows_mm GB/s": round(size / a / 1e9, 1), "torch GB/s": round(size / b / 1e9, 1),
                                 "rows_mm / torch": round(b / a, 2), "max rel diff": f"{err:.1e}"})
                    print(f"{n_out}x{n_in} {fmt} rows={m}: rows_mm {a * 1e6:.0f} us, torch {b * 1e6:.0f} us",
                          flush=True)
    write_report("kernels", rows, {"threads": args.threads, "rounds": args.rounds,
                                   "torch": {"fp32": "F.linear (MKL)", "bf16": "F.linear (bf16)",
                                             "int8": "aten._weight_int8pack_mm, bf16 activations (dequantized "
                                                     "F.linear for inputs not a multiple of 16 wide)"}}, args.out)
    return 0
