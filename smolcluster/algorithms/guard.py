"""The bound on the gradients a member hands the aggregation (the PS servers of syncps / edp, the allreduce ring).

A gradient whose norm is non-finite or above an absolute cap is rejected and counted; one above ``ratio``
times a median that no single worker can move is clipped to it and counted. CURVE keys
(:mod:`smolcluster.security`) stop a stranger; this bounds a buggy node (an fp16 overflow) or a malicious member.
"""

from __future__ import annotations

import collections
import math

import torch
from loguru import logger


class GradientGuard:
    """The bound on one gradient's norm: an absolute cap from the first step, then a robust bound that one
    source cannot move.

    - non-finite, or above ``cap`` (``train.max_grad_norm``): rejected and counted, never applied (a norm that
      large is a broken node or an attack; clipping it would still hand SGD a step ``cap`` long).
    - above ``ratio`` x the median (after ``warmup`` recorded norms): clipped to that bound and counted. A
      clipped gradient moves the model no further than an accepted one at the bound could, so clipping is as
      safe as rejecting and keeps the honest part of an occasional spike.

    The median is the smaller of two: the global median of the last ``window`` recorded norms, and the lower
    median of each source's own median. Each source (a worker) records at most one norm per weights version,
    and a clipped norm is recorded at the bound: so a worker that sends three gradients per honest one, or
    ever larger ones, cannot drag the bound up (with two sources it can lower it, never raise it).
    The robust bound waits for ``min_sources`` sources too (a server passes the workers it waits for): one
    source that reaches the server first, alone, would otherwise set the median it is then held to.
    ``ratio <= 0`` turns the robust bound off, ``cap <= 0`` the cap (non-finite gradients are still rejected).
    """

    def __init__(self, ratio: float = 10.0, window: int = 50, warmup: int = 5, cap: float = 1e4,
                 min_sources: int = 1):
        self.ratio, self.warmup, self.cap = float(ratio), int(warmup), float(cap)
        self.min_sources = max(1, int(min_sources))
        self.window = max(1, int(window))
        self.norms: collections.deque[float] = collections.deque(maxlen=self.window)
        self.per_source: dict[str, collections.deque[float]] = {}
        self.seen: dict[str, collections.deque[int]] = {}  # the versions each source has recorded a norm for
        self.rejected = self.clipped = 0
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, train, min_sources: int = 1) -> GradientGuard:
        return cls(getattr(train, "max_grad_norm_ratio", 10.0), getattr(train, "grad_norm_window", 50),
                   getattr(train, "grad_norm_warmup", 5), getattr(train, "max_grad_norm", 1e4), min_sources)

    def bound(self) -> float | None:
        """The robust bound now (norms above it are clipped to it), or None while warming up or when off."""
        if self.ratio <= 0 or len(self.norms) < min(self.warmup, self.window):
            return None
        if self.min_sources > 1 and len(self.per_source) < self.min_sources:
            return None
        median = _median(self.norms)
        mine = [_median(d) for d in self.per_source.values() if d]
        if len(mine) > 1:
            median = min(median, sorted(mine)[(len(mine) - 1) // 2])
        return self.ratio * median

    def check(self, norm: float, who: str = "a gradient", source: str | None = None, version: int | None = None
              ) -> float:
        """How much of the gradient to apply: 1.0 as it is, 0 < s < 1 clipped to the bound, 0.0 rejected."""
        if not math.isfinite(norm) or (self.cap > 0 and norm > self.cap):
            self.rejected += 1
            why = "not finite" if not math.isfinite(norm) else f"> train.max_grad_norm={self.cap:g}"
            logger.warning(f"rejected {who}: norm {norm:.4g} is {why}; {self.rejected} rejected so far")
            return 0.0
        limit = self.bound()
        scale = 1.0 if limit is None or norm <= limit else limit / norm
        if scale < 1.0:
            self.clipped += 1
            if source not in self._warned:  # once per source: a steady attacker does not flood the log
                self._warned.add(source)
                logger.warning(f"clipped {who}: norm {norm:.4g} > {self.ratio:g} x the recent median ({limit:.4g}, "
                               f"train.max_grad_norm_ratio); further clips of it are counted, not logged")
        self._record(norm, limit, source, version)
        return scale

    def observe(self, norm: float, source: str | None = None, version: int | None = None) -> None:
        """Record the norm of a gradient that is not applied (edp: dropped as stale), as ``check`` would. Why: a
        source flooding fast updates moves the version on while an honest worker computes, so every honest
        gradient can arrive stale; heard only through applied ones, the guard would then know one source, form
        no bound, and hold the flood to the absolute cap alone."""
        if math.isfinite(norm) and not (self.cap > 0 and norm > self.cap):
            self._record(norm, self.bound(), source, version)

    def _record(self, norm: float, limit: float | None, source: str | None, version: int | None) -> None:
        norm = min(norm, limit) if limit is not None else norm  # a clipped norm counts at the bound
        if source is not None:
            seen = self.seen.setdefault(source, collections.deque(maxlen=self.window))
            if version is not None and version in seen:
                return  # one norm per source per version
            seen.append(version)
            self.per_source.setdefault(source, collections.deque(maxlen=self.window)).append(norm)
        self.norms.append(norm)

    def state(self) -> dict:
        """What a rank handing over its state (allreduce) passes on for the next one to decide alike."""
        return {"norms": list(self.norms), "rejected": self.rejected, "clipped": self.clipped}

    def load(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        self.rejected, self.clipped = state["rejected"], state.get("clipped", 0)


def _median(values) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def grad_norm(tensors) -> float:
    """The global L2 norm of a collection of float tensors. Each tensor's norm is taken in float32, and again
    in float64 only when that overflows or underflows (a 1e20- or 1e-23-per-value gradient still gets its
    finite norm): a float64 pass converts every value, several times the cost of the float32 reduction, on the
    server's hot path once per gradient (``python -m smolcluster.bench ddp``)."""
    total = 0.0
    for t in tensors:
        # half-precision values are summed in float32 (their own dtype would keep 3 significant digits)
        norm = float(torch.linalg.vector_norm(t, dtype=None if t.dtype.itemsize >= 4 else torch.float32))
        # inf: overflowed in float32, or holds an inf; 0: all zero, or values below ~1e-19 whose squares
        # underflow. float64 tells which, and gives the finite norm where there is one.
        if math.isinf(norm) or norm == 0.0:
            norm = float(torch.linalg.vector_norm(t, dtype=torch.float64))
        total += norm * norm
    return math.sqrt(total)
