"""Comparing two runs' parameters: the equivalence checks of the distributed algorithms against ``local``."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def max_abs_diff(a_dir, b_dir) -> float:
    """Max |a - b| over every parameter of two runs' checkpoints."""
    a = load_file(a_dir / "checkpoint.safetensors")
    b = load_file(b_dir / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def adamw_diff(a_dir, b_dir) -> tuple[float, float, int]:
    """(the largest 99.9th percentile of |a - b| over every parameter but the noisy ones, max |a - b| over every
    parameter, how many values differ by more than 1e-5).

    Noisy: GPT-2's attention key bias (its gradient is exactly zero in exact arithmetic: softmax ignores a
    constant added to every score, so two equivalent computations feed AdamW different rounding noise,
    |g| ~ 1e-10, which it normalises into steps of ~lr * |g| / eps), and the token embedding, where a
    token's gradient can cancel to nearly zero in a step: AdamW normalises it, so rounding noise of 1e-7
    relative becomes an lr-sized step on a few dozen of its 500k values (1.8e-5 at lr=1e-3, the same bits
    for syncps and allreduce). Any other weight can hold such a value too, a near-zero gradient element whose
    rounding depends on the CPU's kernels (one of 65,536 in an MLP weight on an AVX2 EPYC, 1.4e-5): so every
    weight's bulk (its 99.9th percentile) is held to the tight bound, and single values to the loose one. A
    wrong sum moves them all, and far more than 1e-4.
    """
    a = load_file(a_dir / "checkpoint.safetensors")
    b = load_file(b_dir / "checkpoint.safetensors")
    rest, largest, count = 0.0, 0.0, 0
    for k in a:
        diff = (a[k] - b[k]).abs().reshape(-1).double()
        if k.endswith("attn.c_attn.bias"):  # [query | key | value]
            n = diff.numel() // 3
            quiet = torch.cat([diff[:n], diff[2 * n :]])
        elif k.endswith("wte.weight"):
            quiet = diff[:0]
        else:
            quiet = diff
        if quiet.numel():
            rest = max(rest, float(torch.quantile(quiet, 0.999)))
        largest = max(largest, float(diff.max()))
        count += int((diff > 1e-5).sum())
    return rest, largest, count
