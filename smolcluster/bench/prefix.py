"""``python -m smolcluster.bench prefix``: a chat's second turn's time to first token, with the prefix cache.

A chat re-sends the whole conversation each turn. Here a conversation is a ~``--history``-token passage of
Tiny Shakespeare (the first turn's prompt), the greedy answer (``--answer`` tokens), then the passage's next
``--message`` tokens as the user's next message: the second turn's prompt. Served by 2 local stage processes
of a random-init GPT-2 (``--layers`` x ``--width``, context 2048: what is timed is prefill, which the weights'
values do not change), one request at a time, ``--rounds`` conversations (each on another passage, so each first
turn misses the cache), once with ``serve.prefix_cache`` on and once off.

Reported: each turn's median time to first token (submission to the first token at the head), the median of the
per-conversation ratio second turn / first turn (goal, issue 25: <= 0.3x with the cache), the tokens the cache
saved, and whether the second turn's text equals the uncached pipeline's (greedy: it must). Writes
bench-prefix.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

GOAL = 0.3


def conversation(pipe, history: list[int], message: list[int], answer: int) -> dict:
    """Two turns; each turn's time to first token (s) and the second turn's tokens."""
    first = pipe.submit(history, max_new_tokens=answer, stop_at_eos=False)
    said = first.tokens()
    second = pipe.submit(history + said + message, max_new_tokens=answer, stop_at_eos=False)
    tokens = second.tokens()
    return {"ttft": [r.first_token_at - r.submitted_at for r in (first, second)], "tokens": tokens}


def serve(model: Path, tok, passages: list[tuple[list[int], list[int]]], args, cached: bool) -> tuple[list[dict], int]:
    from smolcluster.inference import InferencePipeline

    with InferencePipeline.start_local(model, stages=2, tokenizer=tok, eos_ids=[], prefix_cache=cached) as pipe:
        out = []
        for r, (history, message) in enumerate(passages):
            out.append(conversation(pipe, history, message, args.answer))
            t = out[-1]["ttft"]
            print(f"cache {'on' if cached else 'off'}, conversation {r + 1}/{len(passages)}: time to first token "
                  f"{t[0] * 1e3:.0f} ms, then {t[1] * 1e3:.0f} ms", file=sys.stderr)
        saved = pipe.client.mesh.peers[pipe.client.stages[0]].info.get("prefix_tokens", 0) if cached else 0
    return out, saved


def row(arm: str, runs: list[dict], same: bool | str, saved: int) -> dict:
    ratio = statistics.median(r["ttft"][1] / r["ttft"][0] for r in runs)
    return {"arm": arm, "first_turn_ttft_ms": 1e3 * statistics.median(r["ttft"][0] for r in runs),
            "second_turn_ttft_ms": 1e3 * statistics.median(r["ttft"][1] for r in runs), "second_over_first": ratio,
            "goal": f"<= {GOAL}" if arm == "cache on" else "", "met": ratio <= GOAL if arm == "cache on" else "",
            "tokens_saved": saved, "same_text_as_off": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench prefix", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="/work/shared/data/tinyshakespeare/input.txt")
    p.add_argument("--history", type=int, default=1000, help="the first turn's prompt, in tokens")
    p.add_argument("--message", type=int, default=40, help="the second turn's new message, in tokens")
    p.add_argument("--answer", type=int, default=16, help="greedy tokens per answer")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3, help="conversations per arm (medians reported)")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    import torch
    from transformers import GPT2LMHeadModel

    from smolcluster.bench.report import write_report
    from smolcluster.data.text import get_tokenizer, read_corpus
    from smolcluster.models.gpt2 import gpt2_config

    text = read_corpus(args.corpus)
    tok = get_tokenizer(text, "bpe", 4096)  # (trained once, then read from ~/.cache/smolcluster)
    ids = tok.encode(text[:200_000])
    span = args.history + args.message
    passages = [(ids[r * span:r * span + args.history], ids[r * span + args.history:(r + 1) * span])
                for r in range(args.rounds)]
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-prefix-") as tmp:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(gpt2_config(tok.vocab_size, args.layers, 6, args.width, 2048)).eval()
        model.save_pretrained(tmp)
        on, saved = serve(Path(tmp), tok, passages, args, cached=True)
        off, _ = serve(Path(tmp), tok, passages, args, cached=False)
    same = all(tok.decode(a["tokens"]) == tok.decode(b["tokens"]) for a, b in zip(on, off))
    rows = [row("cache on", on, same, saved), row("cache off", off, "", 0)]
    write_report("prefix", rows, {"history": args.history, "message": args.message, "answer": args.answer,
                                  "layers": args.layers, "width": args.width, "rounds": args.rounds, "stages": 2,
                                  "co_located": True}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
