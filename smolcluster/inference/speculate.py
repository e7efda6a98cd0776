"""Speculative decoding: stage 0 proposes tokens, the pipeline scores them all in one pass.

A pipeline pays every stage and every hop for each token. With ``speculate.k=K``, stage 0 proposes up
to K tokens after a request's last one (a *drafter*), feeds the last token and the K proposals through
the stages as one step of K+1 rows (a short prefill on top of each stage's KV cache), and the stage
holding the LM head keeps the longest prefix the target agrees with plus the target's own next token:
1 to K+1 tokens per pass, for one round of hops. The proposals are made where the schedule is (stage 0,
which knows each request's tokens); with ``head=last`` they travel to the last stage with the step
(``drafts``, and a sampling draft model's probabilities as the tensor ``q``), and the step's results
say how many were kept. Stage 0 then cuts the rejected rows' keys and values from every stage's cache
with the next step's ``trim`` field (:meth:`~smolcluster.pipeline.architectures.base.KVCache.truncate`).

Drafters (:class:`Speculator`):

- ``lookup=N`` (prompt lookup): the longest n-gram, N tokens down to 1, that ends the context and
  occurs earlier in it; propose the tokens that followed its latest earlier occurrence. No model:
  it pays on text that quotes its context (edits, code, summaries with citations).
- ``draft=DIR``: a small model with the target's tokenizer, every block on stage 0 with its own KV
  cache per request (the project's stage code, not ``transformers``), decoded K tokens ahead.

How many (``speculate.adaptive``, :meth:`Speculator.choose_k`): a greedy request proposes, each pass, the count
in 0..K that makes the most tokens per unit of time for its running acceptance (:class:`Pace`) and what a
proposal costs next to a pass, both measured here. ``speculate.confidence``: a draft model stops a pass's
proposals after one it gives less than that probability (off by default; docs/benchmarks.md, speculate).

Acceptance (:func:`accept`): greedy keeps a proposal while it equals the target's argmax, so the
output is the non-speculative output token for token. Sampling uses standard speculative sampling
(Leviathan et al. 2023, Chen et al. 2023): proposal ``d`` drawn from ``q`` is kept with probability
``min(1, p(d)/q(d))``, else the token is drawn from ``norm(max(0, p - q))`` and the pass ends; after
K kept, one more from ``p``. Every token is then distributed as the target's ``p`` (with the request's
temperature / top-k / top-p applied to both). A lookup proposal is a point mass (``q(d) = 1``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from smolcluster.errors import ConfigError
from smolcluster.inference.sampling import SamplingParams, filter_logits

DRAFTERS = ("lookup", "draft")


def lookup(history: list[int], n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest n-gram (``n`` down to 1)
    ending ``history``; [] when none occurs."""
    seq = np.asarray(history, dtype=np.int64)
    for m in range(min(n, len(seq) - 1), 0, -1):
        # Windows starting at 0 .. len-1-m: each is followed by at least one token.
        windows = sliding_window_view(seq[:-1], m)
        hits = np.flatnonzero((windows == seq[-m:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + m
            return seq[start:start + k].tolist()
    return []


def accept(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[list[int], int]:
    """The tokens one verified pass makes, and how many proposals were kept.

    ``logits``: the target's ``(len(drafts) + 1, V)``, row i scoring the token after proposal i-1;
    ``q``: the drafter's ``(len(drafts), V)`` probabilities (None: point masses, a lookup's or greedy)."""
    if params.greedy:
        picks = logits.argmax(-1).tolist()
        kept = 0
        while kept < len(drafts) and picks[kept] == drafts[kept]:
            kept += 1
        return drafts[:kept] + [picks[kept]], kept
    p = torch.stack([filter_logits(row, params).softmax(-1) for row in logits])
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])
        if float(torch.rand(1, generator=generator)) * q_d < float(p[i, d]):  # i.e. u < min(1, p/q)
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # (p == q to rounding: then p itself)
            residual = p[i]
        return drafts[:i] + [int(torch.multinomial(residual, 1, generator=generator))], i
    return drafts + [int(torch.multinomial(p[-1], 1, generator=generator))], len(drafts)


def draft_config(directory: str | Path, target: dict) -> dict:
    """The draft model's config.json, refused in one line when its vocabulary is not the target's."""
    from smolcluster.pipeline.architectures import family_for
    from smolcluster.pipeline.weights import find_model

    config = find_model(directory).config
    ours, theirs = family_for(config).vocab_size, family_for(target).vocab_size
    if ours != theirs:
        raise ConfigError(f"speculate.draft={directory} has a vocabulary of {ours} tokens, the served model "
                          f"{theirs}: a draft model must share the target's tokenizer")
    return config


@dataclass
class Want:
    """One request's proposal to make: its tokens so far, at most ``k`` proposals, how to pick them."""

    req: str
    history: list[int]
    k: int
    params: SamplingParams
    generator: torch.Generator | None
    limit: int | None = None  # the positions reserved for it (prompt + max_new_tokens): its draft cache's cap


def draft_seed(seed: int) -> int:
    """With ``head=last``, stage 0 draws a sampling draft model's proposals from its own generator, seeded from
    the request's seed but not equal to it: the last stage's accept/resample draws from one seeded with the
    seed, and two generators of one seed would draw the same numbers (the proposals would not be independent
    of the test that keeps them, and the output would no longer be distributed as the target's)."""
    return (int(seed) ^ 0x5DEECE66D) % 2**63


class DraftModel:
    """A small model on stage 0, decoding ahead of every speculating request, with a KV cache per request that
    keeps whatever of the request's tokens it has already seen."""

    def __init__(self, directory: str, target: dict, fmt, slack: int):
        from smolcluster.pipeline.architectures import family_for
        from smolcluster.pipeline.architectures.base import pin_attributes
        from smolcluster.pipeline.weights import find_model, load_stage

        source = find_model(directory)
        draft_config(directory, target)
        self.arch = family_for(source.config)
        self.stage = load_stage(source.weights, source.config, range(self.arch.n_layer), embed=True, head=True,
                                fmt=fmt)
        pin_attributes(self.stage)
        self.slack = slack
        element = next(self.stage.parameters()).element_size()
        self.kv_per_token = self.arch.kv_bytes_per_token(self.arch.n_layer, element)  # its share of stage 0's budget
        self.seen: dict[str, tuple[object, list[int]]] = {}  # req -> (its KVCache, the tokens in it)

    def forget(self, req: str) -> None:
        self.seen.pop(req, None)

    def kv_need(self, positions: int) -> int:
        """KV bytes a request of ``positions`` (prompt + max_new_tokens) can come to here (never past the context:
        ``propose`` stops proposing there)."""
        return min(positions, self.arch.context) * self.kv_per_token

    def nbytes(self) -> int:
        """KV-cache bytes the draft model's per-request caches hold (their capacity)."""
        return sum(cache.nbytes() for cache, _ in self.seen.values())

    def _rows(self, want: Want) -> list[int]:
        """Cut the request's draft cache back to what it shares with its history; the rest are the rows to feed."""
        from smolcluster.pipeline.architectures import KVCache

        limit = min(want.limit or self.arch.context, self.arch.context)  # within what stage 0 reserved for it
        cache, fed = self.seen.get(want.req) or (KVCache(self.arch.n_layer, limit, self.slack), [])
        common = 0
        for a, b in zip(fed, want.history):
            if a != b:
                break
            common += 1
        common = min(common, len(want.history) - 1)  # the last token is always fed: its logits pick the first
        cache.truncate(common)
        del fed[common:]
        self.seen[want.req] = (cache, fed)
        return want.history[common:]

    def propose(self, wants: list[Want], confidence: float = 0.0) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """Each request's proposals and their probabilities (None when greedy), all requests in one forward per
        proposal (a :class:`Batch`, as the stages run). ``confidence``: a request stops after a proposal its
        distribution gives less than this (its top probability): the next would likely be rejected, and each
        costs a forward here and a row of the verify pass (transformers' ``assistant_confidence_threshold``)."""
        from smolcluster.pipeline.architectures.base import Batch

        for w in wants:  # the proposals fed back (all but the last) need positions the draft model has
            w.k = min(w.k, self.arch.context - len(w.history) + 1)
        wants = [w for w in wants if w.k > 0]
        out = {w.req: ([], []) for w in wants}
        rows = {w.req: self._rows(w) for w in wants}
        device = self.stage.device
        while wants:
            caches = []
            for w in wants:
                cache, fed = self.seen[w.req]
                caches.append(cache)
                fed.extend(rows[w.req])
            sizes = [len(rows[w.req]) for w in wants]
            batch = Batch(caches, sizes)
            ids = torch.tensor([[t for w in wants for t in rows[w.req]]], device=device)
            h = self.stage.run_blocks(self.stage.embed(ids, batch.positions(device)), batch)
            if len(sizes) < h.shape[1]:  # (every request fed one row: each row is a last row, no gather)
                h = h[:, batch.last_rows(), :]
            logits = self.stage.logits(h).float().cpu()[0]
            # every greedy row's pick in one argmax, and no per-row tensors for them (iterating a tensor makes one
            # per row): a 1-layer draft's forward is mostly such per-call costs (docs/benchmarks.md, speculate)
            picks = logits.argmax(-1).tolist()
            sure = logits.softmax(-1).amax(-1).tolist() if confidence > 0 else None  # (greedy: its pick's p)
            stop = set()
            for i, w in enumerate(wants):
                drafts, probs = out[w.req]
                if w.params.greedy:
                    drafts.append(picks[i])
                else:
                    probs.append(filter_logits(logits[i], w.params).softmax(-1))
                    drafts.append(int(torch.multinomial(probs[-1], 1, generator=w.generator)))
                    if sure is not None:
                        sure[i] = float(probs[-1].max())
                rows[w.req] = [drafts[-1]]
                if len(drafts) >= w.k or (sure is not None and sure[i] < confidence):
                    stop.add(w.req)  # (the last proposal is never fed)
            wants = [w for w in wants if w.req not in stop]
        return {req: (d, torch.stack(p) if p else None) for req, (d, p) in out.items()}


@dataclass
class Pace:
    """One request's running acceptance (``speculate.adaptive``): proposals kept and passes that ended on a
    rejection, each fading by ``DECAY`` a pass (so the last ~5 passes count most: a trajectory's acceptance moves,
    highest where the text loops). Starts at 0.8, optimistic."""

    kept: float = 4.0
    missed: float = 1.0
    plain: int = 0  # passes without proposals since the last probe (choose_k chose 0)
    DECAY = 0.8
    PROBE = 8  # at k=0, one pass in this many still proposes 1, so the acceptance can be seen to recover

    def update(self, proposed: int, kept: int) -> None:
        self.kept = self.DECAY * self.kept + kept
        self.missed = self.DECAY * self.missed + (kept < proposed)

    def rate(self) -> float:
        """The chance a proposal is kept, given the ones before it were (each pass: kept trials, then a miss)."""
        return self.kept / (self.kept + self.missed)


class Speculator:
    """Stage 0's drafters: ``propose`` for one step's speculating decodes; ``forget`` when a request ends."""

    def __init__(self, spec: dict, target: dict, fmt):
        self.k, self.n = int(spec["k"]), int(spec.get("lookup") or 0)
        self.adaptive, self.confidence = bool(spec.get("adaptive", True)), float(spec.get("confidence") or 0.0)
        # running means (choose_k): seconds per proposal of each drafter, and per pass
        self.seconds = dict.fromkeys((*DRAFTERS, "pass"), 0.0)
        self.draft = DraftModel(spec["draft"], target, fmt, self.k) if spec.get("draft") else None
        self.default = "draft" if self.draft is not None else "lookup"
        self.drafted = self.accepted = 0  # proposals made and kept, since the stage started

    def drafter(self, asked: str) -> str | None:
        """Which drafter a request asking for ``asked`` gets ("": the default; "off": none); None when not served."""
        if asked == "off":
            return "off"
        name = asked or self.default
        return name if (name == "draft" and self.draft) or (name == "lookup" and self.n) else None

    def propose(self, wants: list[tuple[str, Want]]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """``wants``: (drafter, Want) pairs; lookup's are point masses (no probabilities)."""
        t0 = time.perf_counter()
        out = {w.req: (lookup(w.history, self.n, w.k), None) for name, w in wants if name == "lookup" and w.k > 0}
        self.timed("lookup", time.perf_counter() - t0, sum(len(d) for d, _ in out.values()))
        drafted = [w for name, w in wants if name == "draft" and w.k > 0]
        if drafted:
            t0 = time.perf_counter()
            made = self.draft.propose(drafted, self.confidence)
            self.timed("draft", time.perf_counter() - t0, sum(len(d) for d, _ in made.values()))
            out.update(made)
        return out

    def choose_k(self, pace: Pace, drafter: str) -> int:
        """A request's proposals for its next pass (``adaptive``): the k in 0..``k`` that makes the most tokens per
        unit of time, for its running acceptance ``a`` (:class:`Pace`) and what a proposal costs next to a pass
        (``c``, measured here): a pass of k proposals makes (1 - a^(k+1)) / (1 - a) tokens on average and costs
        1 + c*k passes' worth (Leviathan et al. 2023, section 3.5, the choice of gamma). Why not transformers'
        heuristic (+2 after a pass that kept all, -1 after any rejection): on the bench pair (acceptance ~0.55)
        it settled near 2 proposals and cost a tenth of the speedup; here k falls only when the acceptance is
        low for what a proposal costs. A proposal's cost is its drafter's time per proposal (the verify rows are
        not counted: a lookup proposal, tens of microseconds, is nearly free, and a lookup request keeps ``k``
        unless it is rejected nearly always). Greedy output is the same whatever the count: each pass keeps only
        what the target would have made. k = 0 (plain decoding, 1 token a pass) wins where a < c about: then one
        pass in ``Pace.PROBE`` still proposes 1, since the acceptance is only seen through proposals."""
        if not self.adaptive or self.seconds["pass"] <= 0:
            return self.k
        a, c = min(pace.rate(), 0.999), self.seconds[drafter] / self.seconds["pass"]
        k = max(range(self.k + 1), key=lambda k: (1 - a ** (k + 1)) / (1 + c * k))
        if k == 0:
            pace.plain = (pace.plain + 1) % pace.PROBE
            return 0 if pace.plain else 1
        return k

    def timed(self, what: str, seconds: float, n: int = 1) -> None:
        """The running mean of a drafter's seconds per proposal (``what``: lookup or draft; ``n`` proposals made
        in ``seconds``) or of a pass's, from when stage 0 made its proposals to its results (``"pass"``)."""
        if n > 0:
            was, each = self.seconds[what], seconds / n
            self.seconds[what] = each if was <= 0 else 0.9 * was + 0.1 * each

    def forget(self, req: str) -> None:
        if self.draft is not None:
            self.draft.forget(req)

    def kv_need(self, drafter: str, positions: int) -> int:
        """Stage 0's KV bytes, beyond the target's, of a request with ``drafter`` and ``positions`` reserved."""
        return self.draft.kv_need(positions) if drafter == "draft" else 0

    def nbytes(self) -> int:
        """The draft model's KV caches here (0 without one)."""
        return self.draft.nbytes() if self.draft is not None else 0
