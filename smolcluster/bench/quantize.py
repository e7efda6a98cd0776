"""``python -m smolcluster.bench quantize``: what precision and quantization cost and save, measured in one run.

- Quality: gpt2-tiny and llama-tiny are trained here on tinyshakespeare (``--steps``), then each
  format's perplexity on held-out text (the last 10% of the corpus) is compared with fp32's,
  and bf16's greedy continuation of a held-out prompt with fp32's (first 32 tokens).
- Memory: the model a stage adds (peak RSS minus RSS after its imports, before any weight is
  read), each format in a fresh process, for GPT-2 124M and a Llama-family model of the same
  size (random init: memory and speed do not depend on the weights' values).
- Speed: greedy decode tokens/s of the whole model as one stage (KV cache), each format vs fp32.

- ``--decode``: only decode speed, the issue-24 measurement: a SmolLM2-135M-shaped Llama (random init,
  30 x 576, GQA 9/3, tied head), one request, each format in interleaved rounds (one fresh process per
  round and code tree, formats in turn inside it), medians and ratios to fp32; ``--baseline DIR`` also
  times another checkout's code (e.g. ``main``) in the same rounds. A format ``fp32/none/compile`` times
  the compiled decode step (``compile=true``, :mod:`smolcluster.inference.compiled`; its compile is not timed).

Each model is one stage holding everything (embedding, blocks, head), loaded by the same
``load_stage`` a pipeline stage runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smolcluster.errors import ConfigError
from smolcluster.launch.threads import stage_env

FORMATS = [("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("fp32", "int4")]
TARGETS = {("bf16", "none"): 0.5, ("fp32", "int8"): 1.0, ("fp32", "int4"): 5.0}  # ppl % over fp32 allowed


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(weights: str, precision: str, quantize: str, group: int = 64) -> dict:
    """In a fresh process: RSS after imports, then peak RSS once the whole model is loaded as one stage."""
    code = ("import json, sys; from smolcluster.bench.quantize import _probe_main; "
            f"_probe_main({weights!r}, {precision!r}, {quantize!r}, {group})")
    env = stage_env(1)  # what a stage process runs with
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe_main(weights: str, precision: str, quantize: str, group: int) -> None:
    from smolcluster.pipeline.quantize import StageFormat
    from smolcluster.pipeline.weights import find_model, load_stage

    src = find_model(weights)
    n_layer = src.config.get("n_layer") or src.config["num_hidden_layers"]
    fmt = StageFormat(precision, quantize, group)
    # Run the conversion code once on a small tensor first: the first call of each torch op pages in
    # its code (part of what imports cost every process), which is not the model's memory.
    from smolcluster.pipeline import quantize as qz

    w = torch.randn(64, 128)
    q, _ = qz.int4_groups(w, 32)
    qz.int8_rows(w, fmt.dtype), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), w.to(fmt.dtype)
    before = _status_mb("VmRSS")
    stage = load_stage(src.weights, src.config, range(n_layer), embed=True, head=True, fmt=fmt)
    peak = _status_mb("VmHWM")
    held = sum(t.numel() * t.element_size() for t in (*stage.parameters(), *stage.buffers())) / 2**20
    print(json.dumps({"rss_imports_mb": before, "peak_mb": peak, "added_mb": peak - before, "tensors_mb": held}))


def load(weights: str | Path, precision: str = "fp32", quantize: str = "none", group: int = 64):
    from smolcluster.pipeline.quantize import StageFormat
    from smolcluster.pipeline.weights import find_model, load_stage

    src = find_model(weights)
    n_layer = src.config.get("n_layer") or src.config["num_hidden_layers"]
    return load_stage(src.weights, src.config, range(n_layer), embed=True, head=True,
                      fmt=StageFormat(precision, quantize, group))


@torch.inference_mode()
def perplexity(stage, ids: torch.Tensor, block: int) -> float:
    n = (len(ids) - 1) // block
    x, y = ids[: n * block].view(n, block), ids[1: n * block + 1].view(n, block)
    losses = []
    for i in range(0, n, 16):
        logits = stage(x[i: i + 16]).float()
        losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                        y[i: i + 16].reshape(-1), reduction="sum"))
    return float(torch.exp(torch.stack(losses).sum() / y.numel()))


@torch.inference_mode()
def greedy(stage, prompt: torch.Tensor, n: int) -> tuple[list[int], float, list[float]]:
    """``n`` greedy tokens with a KV cache; returns them, decode tokens/s (after the prefill), and each step's
    gap between the top two logits (a near-tie is where another format may fairly pick the other token)."""
    from smolcluster.pipeline.architectures import KVCache

    def pick(x):
        top = stage.logits(x, last_only=True)[0, -1].float().topk(2).values
        return float(top[0] - top[1])

    cache = KVCache(len(stage.blocks))
    x = stage.run_blocks(stage.embed(prompt[None], 0), cache)
    out, gaps = [int(stage.logits(x, last_only=True)[0, -1].argmax())], [pick(x)]
    t0 = time.perf_counter()
    for _ in range(n - 1):
        x = stage.run_blocks(stage.embed(torch.tensor([[out[-1]]]), cache.length), cache)
        out.append(int(stage.logits(x, last_only=True)[0, -1].argmax()))
        gaps.append(pick(x))
    return out, (n - 1) / (time.perf_counter() - t0), gaps


def train_tiny(name: str, text: str, tok, out: Path, steps: int, block: int = 64, batch: int = 16,
               overrides: dict | None = None, save_as: str | None = None) -> Path:
    """A model of conf/model/NAME.yaml (``overrides`` on its keys) trained ``steps`` steps on ``text`` (AdamW,
    warmup then linear decay to 10%), saved as a Hugging Face directory ``out/save_as`` (default NAME)."""
    from omegaconf import OmegaConf

    from smolcluster.models import build_model
    from smolcluster.paths import CONFIG_DIR

    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"), overrides or {})
    model = build_model(OmegaConf.to_container(cfg, resolve=True), {"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id}).train()
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=g)
        x = torch.stack([ids[s: s + block] for s in starts])
        y = torch.stack([ids[s + 1: s + block + 1] for s in starts])
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    name = save_as or name
    print(f"{name}: {steps} steps of {batch} x {block} tokens in {time.perf_counter() - t0:.0f} s, last train loss "
          f"{loss.item():.3f}", file=sys.stderr)
    model.eval().save_pretrained(out / name)
    return out / name


def big_models(out: Path) -> dict[str, Path]:
    """GPT-2 124M and a Llama-family model of the same size (12 x 768, GQA 12/4, 32k vocab), random init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from smolcluster.models.gpt2 import build_gpt2

    torch.manual_seed(0)
    build_gpt2().save_pretrained(out / "gpt2-124M")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(out / "llama-125M")
    return {"gpt2-124M": out / "gpt2-124M", "llama-125M": out / "llama-125M"}


def smollm2_shaped(out: Path) -> Path:
    """A random-init Llama of SmolLM2-135M's shape: 30 layers, 576 wide, GQA 9/3, 49152 vocab, tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(out / "smollm2-135M-shaped")
    return out / "smollm2-135M-shaped"


# Run in a child under the code tree being timed (its PYTHONPATH; -P keeps the working directory off sys.path),
# using only the stage API that trees share.
_DECODE_ROUND = """
import json, sys, time, torch
import smolcluster
from smolcluster.bench.quantize import load
from smolcluster.pipeline.architectures import KVCache
weights, formats, prompt_len, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = (torch.arange(prompt_len) % 1000)[None]
out = {}
with torch.inference_mode():
    for f in formats:
        precision, quantize, *how = f.split("/")  # fp32/none/compile: the compiled decode step (compile=true)
        stage = load(weights, precision, quantize, 64)
        compiled = blocks = None
        if how == ["compile"]:
            from smolcluster.inference.compiled import CompiledDecode
            from smolcluster.inference.stage import ServeConfig
            from smolcluster.pipeline.architectures.base import Batch
            compiled = CompiledDecode(stage, 1, ServeConfig.compile_positions, next(stage.parameters()).dtype, "cpu")
            compiled.warm("bench")
            blocks = lambda x, cache: compiled.run(x, Batch([cache], [1]))
        for steps in (4, n):  # a short pass warms up (first-call costs, page faults), the second is timed
            cache = compiled.cache(len(stage.blocks), prompt_len + n, 0) if compiled else KVCache(len(stage.blocks))
            tok = int(stage.logits(stage.run_blocks(stage.embed(prompt, 0), cache), last_only=True)[0, -1].argmax())
            t0 = time.perf_counter()
            for _ in range(steps - 1):
                x = (blocks or stage.run_blocks)(stage.embed(torch.tensor([[tok]]), cache.length), cache)
                tok = int(stage.logits(x, last_only=True)[0, -1].argmax())
            if compiled:
                compiled.release(cache)
        out[f] = (n - 1) / (time.perf_counter() - t0)
        del stage, compiled, blocks
print(json.dumps({"tree": smolcluster.__file__, "tok_s": out}))
"""


DECODE_PROMPT = 16  # the prompt's tokens in each --decode round


def check_decode_formats(formats: list[str], tokens: int) -> None:
    """``--formats`` of ``--decode`` checked before any round: PRECISION/QUANTIZE[/compile], the compiled arm
    within its slot's positions (the prompt plus ``--tokens``)."""
    from smolcluster.inference.stage import ServeConfig

    for f in formats:
        parts = f.split("/")
        if len(parts) not in (2, 3) or parts[2:] not in ([], ["compile"]):
            raise ConfigError(f"--formats {f!r}: give PRECISION/QUANTIZE, or PRECISION/QUANTIZE/compile for the "
                              "compiled decode step (e.g. fp32/none/compile)")
        if parts[2:] and DECODE_PROMPT + tokens > ServeConfig.compile_positions:
            raise ConfigError(f"--tokens {tokens}: the compiled arm holds {ServeConfig.compile_positions} positions "
                              f"(a {DECODE_PROMPT}-token prompt plus the tokens): use --tokens at most "
                              f"{ServeConfig.compile_positions - DECODE_PROMPT}")


def decode(args) -> int:
    """Decode tokens/s of one request per format (and per code tree), in interleaved rounds; medians and ratios."""
    import os
    import statistics

    from smolcluster.bench.report import write_report

    trees = {"this": str(Path(__file__).resolve().parents[2])}
    if args.baseline:
        trees["baseline"] = str(Path(args.baseline).resolve())
    formats = args.formats.split(",")
    check_decode_formats(formats, args.tokens)
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-decode-") as tmp:
        weights = smollm2_shaped(Path(tmp))
        for r in range(args.rounds):
            for tree, src in (trees.items() if r % 2 == 0 else reversed(trees.items())):
                env = stage_env(1, {"PYTHONPATH": src}, threads=args.threads)
                order = formats if r % 2 == 0 else formats[::-1]
                out = subprocess.run([sys.executable, "-P", "-c", _DECODE_ROUND, str(weights), json.dumps(order), str(DECODE_PROMPT),
                                      str(args.tokens)], capture_output=True, text=True, env=env, cwd=os.getcwd())
                if out.returncode:
                    raise RuntimeError(f"decode round under {src} failed:\n{out.stderr[-2000:]}")
                got = json.loads(out.stdout.strip().splitlines()[-1])
                if not got["tree"].startswith(src):
                    raise RuntimeError(f"the round meant for {src} imported {got['tree']}")
                for f, tps in got["tok_s"].items():
                    runs.setdefault((tree, f), []).append(tps)
                print(f"round {r + 1}/{args.rounds} {tree}: " + ", ".join(
                    f"{f} {runs[tree, f][-1]:.1f}" for f in formats), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}

    def ratio(a, b):  # the median of per-round ratios: a busy machine's load moves both sides of one round alike
        return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))

    rows = [{"tree": tree, "format": f, "decode_tok_s_median": med[tree, f],
             "vs_same_tree_fp32": ratio((tree, f), (tree, formats[0])),
             "vs_this_fp32": ratio((tree, f), ("this", formats[0])),
             "vs_baseline_same_format": ratio((tree, f), ("baseline", f)) if "baseline" in trees else "",
             # a compiled arm against its format's eager arm, where both were timed
             "vs_eager_same_format": ratio((tree, f), (tree, f.removesuffix("/compile")))
             if f.endswith("/compile") and f.removesuffix("/compile") in formats else ""}
            for tree in trees for f in formats]
    write_report("quantize-decode", rows, {"threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
                                          "trees": trees, "runs": {f"{t}:{f}": v for (t, f), v in runs.items()}},
                 args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench quantize", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default="/work/shared/data/tinyshakespeare/input.txt")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each tiny model (16 x 64 tokens)")
    p.add_argument("--models", default="gpt2-tiny,llama-tiny", help="which tiny models to train and compare")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens compared and timed")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens perplexity is measured on")
    p.add_argument("--group", type=int, default=32, help="int4 group size (32 divides llama-tiny's 352-wide MLP)")
    p.add_argument("--skip-big", action="store_true", help="only the trained tiny models")
    p.add_argument("--only-big", action="store_true", help="only the 124M models' memory and speed")
    p.add_argument("--big-tokens", type=int, default=16, help="decode tokens timed on the 124M models (0: memory only)")
    p.add_argument("--decode", action="store_true", help="only decode tokens/s of a SmolLM2-135M-shaped Llama")
    p.add_argument("--baseline", help="with --decode: another checkout whose code is timed in the same rounds")
    p.add_argument("--rounds", type=int, default=5, help="with --decode: interleaved rounds (medians reported)")
    p.add_argument("--threads", type=int, default=2, help="with --decode: the stage's threads")
    p.add_argument("--formats", default=",".join(f"{p}/{q}" for p, q in FORMATS),
                   help="with --decode: precision/quantize pairs timed (fp32/none first: the ratios' base); "
                        "add /compile for the compiled decode step (e.g. fp32/none/compile)")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    if args.decode:
        return decode(args)
    from smolcluster.bench.report import write_report
    from smolcluster.data.text import get_tokenizer, read_corpus

    text = read_corpus(args.corpus)
    split = int(len(text) * 0.9)
    tok = get_tokenizer(text, "bpe", 4096)
    # torch's CPU int4 kernel costs one decode step per row, so held-out text is kept to --eval-tokens.
    held = torch.tensor(tok.encode(text[split:])[: args.eval_tokens + 1], dtype=torch.long)
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-quantize-") as tmp:
        tmp = Path(tmp)
        for name in () if args.only_big else args.models.split(","):
            d = train_tiny(name, text[:split], tok, tmp, args.steps)
            base_ppl = base_tokens = base_tps = None
            for precision, quantize in FORMATS:
                stage = load(d, precision, quantize, args.group)
                ppl = perplexity(stage, held, 64)
                toks, tps, gaps = greedy(stage, held[:16], args.tokens)
                if base_ppl is None:
                    base_ppl, base_tokens, base_tps, base_gaps = ppl, toks, tps, gaps
                agree = next((i for i, (a, b) in enumerate(zip(toks, base_tokens, strict=True)) if a != b), len(toks))
                d_ppl = 100 * (ppl / base_ppl - 1)
                target = TARGETS.get((precision, quantize))
                rows.append({"model": name, "format": f"{precision}/{quantize}", "ppl": ppl, "ppl_vs_fp32_%": d_ppl,
                             "target_%": "" if target is None else f"<= {target}",
                             "greedy_agree": f"{agree}/{len(toks)}",
                             # fp32's top-two logit gap where this format first picked otherwise
                             "fp32_gap_there": "" if agree == len(toks) else round(base_gaps[agree], 4),
                             "decode_tok_s": tps,
                             "speed_vs_fp32": tps / base_tps})
        if not args.skip_big:
            for name, d in big_models(tmp).items():
                base_mem = base_tps = None
                prompt = torch.arange(16) % 1000
                for precision, quantize in FORMATS:
                    mem = probe(str(d), precision, quantize, args.group)
                    tps = float("nan")
                    if args.big_tokens:
                        stage = load(d, precision, quantize, args.group)
                        _, tps, _ = greedy(stage, prompt, args.big_tokens)
                        del stage
                    if base_mem is None:
                        base_mem, base_tps = mem, tps
                    rows.append({"model": name, "format": f"{precision}/{quantize}",
                                 "added_mb": mem["added_mb"], "added_vs_fp32": mem["added_mb"] / base_mem["added_mb"],
                                 "peak_rss_mb": mem["peak_mb"], "tensors_mb": mem["tensors_mb"],
                                 "decode_tok_s": tps, "speed_vs_fp32": tps / base_tps})
    extra["threads"] = torch.get_num_threads()
    extra["note"] = ("added_mb = peak RSS minus RSS after imports (before weights); targets: int8 <= 0.3x, "
                     "bf16 <= 0.55x of fp32")
    write_report("quantize-big" if args.only_big else "quantize", rows, extra, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
