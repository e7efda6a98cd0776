"""``python -m smolcluster.bench speculate``: speculative decoding's tokens/s through 2 stages, against none.

A 4-layer target (``gpt2-tiny``) is trained ``--steps`` steps on Tiny Shakespeare with a byte-level BPE (``bench
quantize``'s trainer), in a temporary directory (or ``--pair``); the 1-layer draft (the same with ``n_layer=1``) is
distilled from it (``--draft distill``, the default: the target's embeddings, first block and final norm, then
``--steps`` steps fitting the target's next-token distribution on the same text) or trained on the text as the
target was (``--draft train``). Both share a byte-level BPE of ``--vocab`` tokens; at this width the LM head is most
of a 1-layer draft's cost, so the vocabulary decides how cheap the draft is next to the target (real pairs: a tenth
or less; docs/benchmarks.md, speculate, has the ratio per vocabulary). One pipeline of 2 local stage processes
serves the target with ``speculate.k=--k``, both drafters (``lookup=--lookup``, ``draft=`` the 1-layer model); one
greedy request at a time is timed per arm, on ``--prompts`` held-out passages (evenly spaced), in interleaved
rounds:

- ``off``: no speculation (the base of every ratio), timed on each prompt just before the arm's request;
- ``draft``: the draft model proposes, on each held-out passage to continue;
- ``lookup``: prompt lookup, on "edit this passage" prompts: a held-out passage, then its start again, so
  the answer can quote its context.

Reported per arm: median tokens/s over a round's prompts (from submission to the last token, ``--tokens``
tokens each, no EOS), the median of per-round ratios to ``off`` on the same prompts, the acceptance rate
(tokens kept / proposed; overall, and the lowest and highest prompt's), and whether the tokens equal
``off``'s (greedy: they must), and each process's CPU ms per token (stage 0, stage 1, the head: what a quiet
machine's wall time is made of, measurable under load; ``--costs`` adds a pass's components timed in one thread,
the cost model's inputs). Why several prompts: greedy acceptance belongs to one trajectory, and one
prompt's trajectory made the figure a draw (docs/benchmarks.md, speculate). Goals (issue 25): >= 1.6x with the
draft model, >= 1.5x with lookup. The stages share this machine (loopback links: a hop is cheap here, so what
speculation saves, one round of hops per kept token, is smaller than across machines). Writes
bench-speculate.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

GOALS = {"draft": 1.6, "lookup": 1.5}


def distill_draft(target_dir: Path, text: str, tok, out: Path, steps: int, block: int = 64,
                  batch: int = 16) -> Path:
    """The 1-layer draft, distilled: the target's embeddings, first block and final norm, then ``steps`` steps
    (``train_tiny``'s batches and schedule) fitting its next-token distribution to the target's (KL) on ``text``.
    Why: a draft pays only when the target agrees with it; trained on the text alone it learns the text, this
    way it learns the target (DistillSpec, Zhou et al. 2023)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    config = copy.deepcopy(target.config)
    config.n_layer = 1
    draft = AutoModelForCausalLM.from_config(config)
    kept = {k: v for k, v in target.state_dict().items() if not k.startswith("transformer.h.") or
            k.startswith("transformer.h.0.")}
    draft.load_state_dict(kept)
    draft.train()
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        starts = torch.randint(0, len(ids) - block, (batch,), generator=g)
        x = torch.stack([ids[s: s + block] for s in starts])
        with torch.no_grad():
            p = target(x).logits.log_softmax(-1).flatten(0, 1)
        q = draft(x).logits.log_softmax(-1).flatten(0, 1)
        loss = torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"draft distilled from the target: {steps} steps of {batch} x {block} tokens in "
          f"{time.perf_counter() - t0:.0f} s, last KL {loss.item():.3f}", file=sys.stderr)
    draft.eval().save_pretrained(out / "gpt2-tiny-1layer-distilled")
    return out / "gpt2-tiny-1layer-distilled"


def cpu_seconds(pipe) -> list[float]:
    """CPU seconds so far of each stage process (every thread: the loop, zmq's I/O threads) and of this one (the
    head). Why CPU and not wall time: on a loaded machine wall time is mostly waiting for a core, while CPU per
    token is what each process spends, which is what a quiet machine's wall time is made of (with the hops'
    wake-ups), so an arm's costs can be compared under load."""
    import psutil

    stages = [psutil.Process(p.pid).cpu_times() for p in pipe._children.procs.values()]
    return [t.user + t.system for t in stages] + [time.process_time()]


def timed(pipe, prompt: list[int], n: int, how: str, cpu: dict | None = None
          ) -> tuple[list[int], float, tuple[int, int]]:
    """One greedy request: its tokens, seconds (submission to last token) and (proposed, kept); ``cpu[how]`` adds
    up each process's CPU seconds spent on it."""
    before = cpu_seconds(pipe) if cpu is not None else None
    req = pipe.submit(prompt, max_new_tokens=n, stop_at_eos=False, speculate=how)
    tokens = req.tokens()
    if cpu is not None:
        spent = [b - a for a, b in zip(before, cpu_seconds(pipe))]
        cpu[how] = [a + b for a, b in zip(cpu.get(how, [0.0] * len(spent)), spent)]
    return tokens, req.finished_at - req.submitted_at, (req.drafted, req.accepted)


def prompts(text: str, tok, length: int, n: int) -> dict[str, list[list[int]]]:
    """``n`` held-out passages, evenly spaced in ``text``: the draft arm continues each; the lookup arm's prompt is
    the passage followed by its own start (to edit)."""
    ids = tok.encode(text)
    step = (len(ids) - length) // max(n, 1)
    passages = [ids[i * step: i * step + length] for i in range(n)]
    return {"draft": passages, "lookup": [p + tok.encode("\n\n") + p[: length // 4] for p in passages]}


def measure(pipe, prompt: dict[str, list[list[int]]], args) -> list[dict]:
    """Interleaved rounds; in a round, each arm's prompts one after another, each timed with ``off`` just before.
    Why several prompts: greedy acceptance is a property of one trajectory, and a weak target's trajectories
    differ wildly (one falls into a loop a 1-layer draft predicts, the next does not); one prompt made the
    figure a draw (docs/benchmarks.md, speculate)."""
    runs: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    kept = {arm: [[0, 0] for _ in prompt[arm]] for arm in GOALS}  # per prompt: proposed, kept
    same = dict.fromkeys(GOALS, True)
    cpu: dict[str, list[float]] = {}  # per arm: CPU seconds of stage 0, stage 1, ..., the head
    for r in range(args.rounds):
        for arm in ("draft", "lookup") if r % 2 == 0 else ("lookup", "draft"):
            seconds = {"off": 0.0, arm: 0.0}
            for i, passage in enumerate(prompt[arm]):
                base, base_s, _ = timed(pipe, passage, args.tokens, "off", cpu)
                tokens, s, (drafted, accepted) = timed(pipe, passage, args.tokens, arm, cpu)
                seconds["off"] += base_s
                seconds[arm] += s
                kept[arm][i][0] += drafted
                kept[arm][i][1] += accepted
                same[arm] &= tokens == base
            n = len(prompt[arm]) * args.tokens
            runs.setdefault(f"off ({arm}'s prompts)", []).append(n / seconds["off"])
            runs.setdefault(arm, []).append(n / seconds[arm])
            ratios.setdefault(arm, []).append(seconds["off"] / seconds[arm])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in runs.items()),
              file=sys.stderr)
    tokens = {arm: args.rounds * len(prompt[arm]) * args.tokens for arm in GOALS}
    tokens["off"] = sum(tokens.values())
    per_token = {arm: [round(1e3 * c / tokens[arm], 3) for c in spent] for arm, spent in cpu.items()}
    rows = [{"arm": k, "tok_s_median": statistics.median(v)} for k, v in runs.items() if k.startswith("off")]
    rows.append({"arm": "off", "cpu_ms_per_token": per_token["off"], "cpu_ms_per_token_total": sum(per_token["off"])})
    for arm in GOALS:
        drafted, accepted = (sum(c[j] for c in kept[arm]) for j in (0, 1))
        each = [a / d if d else 0.0 for d, a in kept[arm]]
        ratio = statistics.median(ratios[arm])  # per-round ratios: load moves both sides of a round alike
        # each pass makes its kept proposals plus one: the mean tokens a round of hops carried
        made = args.rounds * len(prompt[arm]) * (args.tokens - 1)
        rows.append({"arm": arm, "tok_s_median": statistics.median(runs[arm]), "vs_off": ratio,
                     "goal": f">= {GOALS[arm]}", "met": ratio >= GOALS[arm],
                     "acceptance": accepted / drafted if drafted else 0.0,
                     "acceptance_per_prompt": f"{min(each):.2f}-{max(each):.2f}",
                     "tokens_per_pass": made / (made - accepted) if made > accepted else "",
                     "same_tokens_as_off": same[arm],
                     # stage 0, stage 1, ..., the head; the total's ratio to off's: the speedup a quiet machine's
                     # CPU alone allows (the hops' wake-ups aside)
                     "cpu_ms_per_token": per_token[arm], "cpu_ms_per_token_total": sum(per_token[arm]),
                     "cpu_vs_off": sum(per_token["off"]) / sum(per_token[arm])})
    return rows


def thread_ms(fn, n: int = 200, repeats: int = 5) -> float:
    """CPU milliseconds of this thread per call of ``fn`` (the least of ``repeats`` means: what load adds is
    waiting, not this thread's CPU, but a loaded core's caches still slow it, so the least is the figure)."""
    for _ in range(n // 10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - t0) / n * 1e3)
    return best


def component_costs(target: Path, draft: Path, prompt: list[int], k: int) -> list[dict]:
    """What a speculating pass is made of, in this thread's CPU ms (one thread, as each co-located stage has):
    each stage's blocks over 1 row (a plain decode step) and k+1 rows (a verify pass) on top of ``prompt``'s
    cache, the LM head over as many rows, a draft model's forward (its ``propose`` of k, per proposal), the
    greedy acceptance. The cost model: speedup = tokens a pass * T_step / T_pass, with T_pass
    = k * T_draft + T_verify(k+1) + the hops' overhead (docs/benchmarks.md, speculate)."""
    from smolcluster.inference.sampling import SamplingParams
    from smolcluster.inference.speculate import DraftModel, Want, accept
    from smolcluster.pipeline.architectures import KVCache, family_for
    from smolcluster.pipeline.architectures.base import Batch, pin_attributes
    from smolcluster.pipeline.weights import find_model, load_stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = find_model(target)
    layers = family_for(source.config).n_layer
    half = layers // 2  # (the bench's two stages, head=first)
    stages = [load_stage(source.weights, source.config, range(0, half), embed=True, head=True),
              load_stage(source.weights, source.config, range(half, layers), embed=False, head=False)]
    model = DraftModel(str(draft), source.config, None, k)
    rows, greedy = [], SamplingParams()
    with torch.inference_mode():
        for i, stage in enumerate(stages):
            pin_attributes(stage)
            cache = KVCache(len(stage.blocks), None, k)
            width = stage.shape.n_embd
            stage.run_blocks(torch.zeros(1, len(prompt), width), Batch([cache], [len(prompt)]))

            def blocks(n, stage=stage, cache=cache, width=width):
                stage.run_blocks(torch.zeros(1, n, width), Batch([cache], [n]))
                cache.truncate(cache.length - n)

            rows.append({"component": f"stage {i}: blocks, 1 row (a decode step)", "cpu_ms": thread_ms(lambda: blocks(1))})
            rows.append({"component": f"stage {i}: blocks, {k + 1} rows (a verify pass)",
                         "cpu_ms": thread_ms(lambda: blocks(k + 1))})
        for n in (1, k + 1):
            h = torch.zeros(1, n, stages[0].shape.n_embd)
            rows.append({"component": f"stage 0: LM head + greedy picks, {n} row(s)",
                         "cpu_ms": thread_ms(lambda h=h: stages[0].logits(h).float().cpu()[0].argmax(-1).tolist())})
        rows.append({"component": "draft model: a proposal (propose of k, per proposal)",
                     "cpu_ms": thread_ms(lambda: model.propose([Want("r", prompt, k, greedy, None)]), 50) / k})
        logits = torch.randn(k + 1, stages[0].shape.vocab_size)
        rows.append({"component": "accept (greedy), a pass",
                     "cpu_ms": thread_ms(lambda: accept(logits, list(range(k)), None, greedy, None))})
    torch.set_num_threads(threads)
    return rows


def train_pair(where: Path, text: str, tok, args) -> tuple[Path, Path]:
    """The target and the draft in ``where``: trained there, or (``--pair`` kept from an earlier run) read back, so
    timing runs can share one pair."""
    from smolcluster.bench.quantize import train_tiny

    names = ("gpt2-tiny", "gpt2-tiny-1layer-distilled" if args.draft == "distill" else "gpt2-tiny-1layer")
    # the recipe a kept pair was trained with: acceptance depends on it, so a run reusing the pair must match it
    recipe = {"steps": args.steps, "draft": args.draft, "vocab": tok.vocab_size}
    kept = where / "recipe.json"
    if all((where / n / "config.json").is_file() for n in names):
        was = json.loads(kept.read_text()) if kept.is_file() else None
        if was != recipe:
            raise SystemExit(f"--pair {where}: its models were trained with {was or 'an unknown recipe'}, this run "
                             f"asks for {recipe}; give the matching --steps/--draft/--vocab or another --pair "
                             "directory")
        print(f"the target and the draft: read from {where} (--pair)", file=sys.stderr)
        return where / names[0], where / names[1]
    # One thread: the pair's bits then do not depend on the machine's core count (another thread count rounds
    # the matmuls otherwise, and greedy trajectories, hence acceptance, follow the rounding); and threads that
    # wait on each other are what a loaded machine starves.
    print(f"training the target and the draft in {where}", file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    target = train_tiny("gpt2-tiny", text, tok, where, args.steps)
    if args.draft == "distill":
        draft = distill_draft(target, text, tok, where, args.steps)
    else:
        draft = train_tiny("gpt2-tiny", text, tok, where, args.steps, overrides={"n_layer": 1}, save_as=names[1])
    torch.set_num_threads(threads)
    kept.write_text(json.dumps(recipe))
    return target, draft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench speculate", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="/work/shared/data/tinyshakespeare/input.txt")
    p.add_argument("--steps", type=int, default=1500, help="training steps of the target and the draft")
    p.add_argument("--draft", choices=("distill", "train"), default="distill",
                   help="the 1-layer draft: distilled from the target (its first layer, embeddings and final norm, "
                        "then fit to its outputs), or trained on the text like the target")
    p.add_argument("--k", type=int, default=4, help="speculate.k: tokens proposed per pass")
    p.add_argument("--lookup", type=int, default=3, help="speculate.lookup: the n-gram size")
    p.add_argument("--confidence", type=float, default=None,
                   help="speculate.confidence: the draft stops after a proposal below this probability "
                        "(default: the product's; 0: always k)")
    p.add_argument("--adaptive", choices=("true", "false"), default=None,
                   help="speculate.adaptive: each request's proposals per pass follow its acceptance, up to --k "
                        "(default: the product's)")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens per timed request")
    p.add_argument("--prompt-tokens", type=int, default=96, help="the held-out passage's length")
    p.add_argument("--prompts", type=int, default=4, help="held-out passages per arm and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--head", choices=("first", "last"), default="first",
                   help="where the LM head sits (last: the proposals travel to the last stage with each step)")
    p.add_argument("--vocab", type=int, default=512,
                   help="the byte-level BPE's vocabulary (target and draft; 512 keeps the draft's LM head cheap)")
    p.add_argument("--pair", default=None, help="a directory to keep the trained target and draft in, and to read "
                                                 "them back from on a later run (default: trained afresh)")
    p.add_argument("--costs", action="store_true",
                   help="also time a pass's components in this process (CPU ms per stage's blocks at 1 and k+1 "
                        "rows, the LM head, a draft proposal, acceptance): the cost model's inputs")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    for name in ("prompts", "rounds", "steps", "tokens", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    from smolcluster.bench.report import markdown_table, write_report
    from smolcluster.data.text import get_tokenizer, read_corpus
    from smolcluster.inference import InferencePipeline
    from smolcluster.inference.api import check_speculate

    text = read_corpus(args.corpus)
    split = int(len(text) * 0.9)
    tok = get_tokenizer(text, "bpe", args.vocab)  # (trained once, then read from ~/.cache/smolcluster)
    print(f"tokenizer: {tok.vocab_size} tokens", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-speculate-") as tmp:
        target, draft = train_pair(Path(args.pair or tmp), text[:split], tok, args)
        spec = {"k": args.k, "lookup": args.lookup, "draft": str(draft),
                **({"confidence": args.confidence} if args.confidence is not None else {}),
                **({"adaptive": args.adaptive == "true"} if args.adaptive is not None else {})}
        pipe_spec = check_speculate(spec, json.loads((target / "config.json").read_text()))  # (the defaults filled)
        # no prefix cache: every arm's request pays its own prefill (a cached prompt would favour whichever arm
        # follows the first to send it)
        with InferencePipeline.start_local(target, stages=2, head=args.head, tokenizer=tok, eos_ids=[],
                                           speculate=spec, prefix_cache=False) as pipe:
            context = pipe.context - args.tokens
            prompt = {k: [p[-context:] for p in v]
                      for k, v in prompts(text[split:], tok, args.prompt_tokens, args.prompts).items()}
            rows = measure(pipe, prompt, args)
        costs = component_costs(target, draft, prompt["draft"][0], args.k) if args.costs else None
        if costs:
            print("\ncomponents of a pass (CPU ms, one thread):\n\n" + markdown_table(costs))
    write_report("speculate", rows, {"steps": args.steps, "draft": args.draft, "k": args.k, "lookup": args.lookup,
                                     "confidence": pipe_spec["confidence"], "adaptive": pipe_spec["adaptive"],
                                     "tokens": args.tokens, "prompts": args.prompts, "rounds": args.rounds,
                                     "vocab": tok.vocab_size, "stages": 2, "co_located": True, "head": args.head,
                                     **({"component_costs": costs} if costs else {})},
                 args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
