"""``python -m smolcluster.bench pipeline``: the stage pipeline against one process, in the same run.

Measured, for gpt2-tiny and GPT-2 small (124M, random init: speed and memory do not
depend on the weights' values):

- decode tokens/s of one request through a 2-stage pipeline vs Hugging Face
  ``generate`` (greedy, KV cache) in this process, and time to first token (each the
  best of ``--repeats`` tries, alternating with the baseline's: the machine may be shared);
- aggregate tokens/s of 4 requests in flight at once vs the same 4 one at a time;
- peak RSS (``VmHWM``) of each stage of a 2-stage GPT-2 pipeline vs a single process
  holding the whole model (``transformers`` + ``generate``), and vs the pipeline's own
  code run as one stage;
- how long a killed stage takes to surface as a PeerError at the caller;
- ``algo=mp`` training samples/s with ``microbatches=4`` vs 1 (2 stages, gpt2-tiny);
- continuous batching: aggregate decode tokens/s at 1, 4, 8 and 16 requests in flight (8 prompts
  of different lengths, cycled) through 2 stages, p50/p95 per-token latency at each level, vs
  ``transformers`` ``generate`` on the same 8 prompts batched with (left) padding
  (``--batching-only`` runs just this; ``--compile false,true`` runs it once per ``compile=`` value, the
  stages' ``compile_slots`` being ``--compile-slots``).

The stages run on this machine as ``InferencePipeline.start_local`` starts them (co-located: a model of
16M parameters a stage or more takes turns with all cores, a smaller one gets ``cores // stages`` threads
a stage; docs/inference.md); the baseline is the better of torch's default (all cores) and one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from smolcluster.bench.report import write_report
from smolcluster.errors import PeerError
from smolcluster.inference import InferencePipeline
from smolcluster.inference.api import COMPILE_CONNECT_S
from smolcluster.inference.settings import compile_mode
from smolcluster.paths import CONFIG_DIR
from smolcluster.telemetry.logging import setup_logging

VOCAB = {"gpt2-tiny": 4096, "gpt2": 50257, "smollm2-135m": 49152}  # the offline BPE / GPT-2's / SmolLM2's
QUIET = {"SMOLCLUSTER_LOG_LEVEL": "WARNING"}
# The Llama-family bench model: SmolLM2-135M's shape (about GPT-2 small's size), random init, since speed and
# memory do not depend on the weights' values. Its config is written by hand: nothing is downloaded.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                    bos_token_id=None, eos_token_id=None)
PEAK_RSS_MODELS = ("gpt2", "smollm2-135m")  # the sizes where a stage's memory share is worth measuring


def model_config(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"))
    return {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "n_positions")}


def save_model(name: str, out: Path):
    """A seeded random init of ``name``, written as a Hugging Face directory (what the stages and the
    single-process baseline both load)."""
    torch.manual_seed(0)
    if name == "smollm2-135m":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    else:
        from smolcluster.models.gpt2 import build_gpt2

        model = build_gpt2(vocab_size=VOCAB[name], **model_config(name)).eval()
    model.save_pretrained(out)
    return model


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size of a live process (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- inference speed ---------------------------------------------------------------------------
# The machine may be shared: every figure is the best of `repeats` tries, and the pipeline's
# tries alternate with the baseline's, so both see the same conditions.
def hf_once(model, prompt: list[int], n: int) -> tuple[float, float]:
    """(tokens/s, seconds to the first token) of one greedy generate with the KV cache."""
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return (out.shape[1] - len(prompt)) / (time.perf_counter() - t), ttft


def hf_best_threads(model, prompt: list[int], n: int) -> tuple[float, float]:
    """The baseline at its best: torch's default thread count (all cores), or one thread, which wins
    for small models and on a busy machine (a descheduled OpenMP thread stalls every step)."""
    default = torch.get_num_threads()
    results = []
    for threads in sorted({default, 1}):
        torch.set_num_threads(threads)
        try:
            results.append(hf_once(model, prompt, n))
        finally:
            torch.set_num_threads(default)
    return max(r[0] for r in results), min(r[1] for r in results)


def pipeline_once(pipe: InferencePipeline, prompt: list[int], n: int) -> tuple[float, float]:
    r = pipe.submit(prompt, max_new_tokens=n, stop_at_eos=False)
    got = len(r.tokens())
    return got / (r.finished_at - r.submitted_at), r.first_token_at - r.submitted_at


def concurrency_once(pipe: InferencePipeline, prompt: list[int], n: int, k: int) -> tuple[float, float]:
    """(aggregate tokens/s of k requests in flight together, of the same k one at a time)."""
    t = time.perf_counter()
    reqs = [pipe.submit(prompt, max_new_tokens=n, stop_at_eos=False) for _ in range(k)]
    together = sum(len(r.tokens()) for r in reqs) / (time.perf_counter() - t)
    t = time.perf_counter()
    total = sum(len(pipe.submit(prompt, max_new_tokens=n, stop_at_eos=False).tokens()) for _ in range(k))
    return together, total / (time.perf_counter() - t)


def compare_speed(model, pipe: InferencePipeline, prompt: list[int], n: int, repeats: int, k: int) -> dict:
    for _ in range(2):  # warm both up (generate's first calls are markedly slower)
        hf_best_threads(model, prompt, n)
        pipeline_once(pipe, prompt, n)
    best = {"hf_tps": 0.0, "hf_ttft": float("inf"), "tps": 0.0, "ttft": float("inf"), "together": 0.0, "alone": 0.0}
    for _ in range(repeats):
        tps, ttft = hf_best_threads(model, prompt, n)
        best["hf_tps"], best["hf_ttft"] = max(best["hf_tps"], tps), min(best["hf_ttft"], ttft)
        tps, ttft = pipeline_once(pipe, prompt, n)
        best["tps"], best["ttft"] = max(best["tps"], tps), min(best["ttft"], ttft)
        together, alone = concurrency_once(pipe, prompt, n, k)
        best["together"], best["alone"] = max(best["together"], together), max(best["alone"], alone)
    return best


# -- continuous batching ------------------------------------------------------------------------
LEVELS = (1, 4, 8, 16)


def batching_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, vocab, (8 + 4 * i,), generator=g).tolist() for i in range(8)]


def batched_level(pipe: InferencePipeline, prompts: list[list[int]], n: int, k: int) -> dict:
    """k requests at once: aggregate decode tokens/s and the gaps between a request's tokens."""
    t = time.perf_counter()
    reqs = [pipe.submit(prompts[i % len(prompts)], max_new_tokens=n, stop_at_eos=False) for i in range(k)]
    total = sum(len(r.tokens()) for r in reqs)
    wall = time.perf_counter() - t
    gaps = sorted(b - a for r in reqs for a, b in zip(r.token_at, r.token_at[1:]))
    return {"tps": total / wall, "p50_ms": 1000 * gaps[len(gaps) // 2], "p95_ms": 1000 * gaps[int(len(gaps) * 0.95)]}


def hf_padded_batch_tps(model, prompts: list[list[int]], n: int) -> float:
    """``generate`` over the prompts as one left-padded batch (greedy, KV cache): tokens/s, at its
    best of torch's default thread count and one thread (as :func:`hf_best_threads`)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    default, best = torch.get_num_threads(), 0.0
    for threads in sorted({default, 1}):
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, **kw)  # warm up
                t = time.perf_counter()
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            best = max(best, len(prompts) * (out.shape[1] - width) / (time.perf_counter() - t))
        finally:
            torch.set_num_threads(default)
    return best


def batching_rows(name: str, run_dir: Path, model, n: int, repeats: int, compiles: tuple[str, ...] = ("false",),
                  compile_slots: int = 4) -> list[dict]:
    """Each ``compile=`` value's pipeline at every level (rounds interleaved across them), and ``generate``."""
    prompts = batching_prompts(VOCAB[name])
    hf = max(hf_padded_batch_tps(model, prompts, n) for _ in range(repeats))
    best: dict[tuple[str, int], dict] = {}
    with contextlib.ExitStack() as stack:
        pipes = {c: stack.enter_context(InferencePipeline.start_local(
            run_dir, stages=2, env=QUIET, compile=c, compile_slots=compile_slots,
            connect_timeout_s=COMPILE_CONNECT_S)) for c in compiles}
        for pipe in pipes.values():
            batched_level(pipe, prompts, 4, 4)  # warm up
        for _ in range(repeats):
            for c, pipe in pipes.items():
                for k in LEVELS:
                    got = batched_level(pipe, prompts, n, k)
                    if (c, k) not in best or got["tps"] > best[c, k]["tps"]:
                        best[c, k] = got
        decode = {c: pipe.model_info["decode"] for c, pipe in pipes.items()}
    rows = []
    for c in compiles:
        label = f"{name}, 2 stages" + ("" if compiles == ("false",) else f", compile={c}")
        for k in LEVELS:
            b = best[c, k]
            rows.append({"metric": f"batched decode tokens/s, {k} in flight", "model": label,
                         "pipeline (2 stages)": b["tps"], "baseline": best[c, 1]["tps"],
                         "ratio": b["tps"] / best[c, 1]["tps"], "vs generate, 8 padded": b["tps"] / hf,
                         "p50 ms/token": b["p50_ms"], "p95 ms/token": b["p95_ms"], "decode": " | ".join(decode[c])})
        rows.append({"metric": "transformers generate, the 8 prompts batched with padding, tokens/s",
                     "model": label, "pipeline (2 stages)": best[c, 8]["tps"], "baseline": hf,
                     "ratio": best[c, 8]["tps"] / hf})
    for c in compiles[1:]:  # each against the first, at 8 in flight
        rows.append({"metric": f"batched decode at 8 in flight, compile={c} vs compile={compiles[0]}", "model": name,
                     "pipeline (2 stages)": best[c, 8]["tps"], "baseline": best[compiles[0], 8]["tps"],
                     "ratio": best[c, 8]["tps"] / best[compiles[0], 8]["tps"]})
    return rows


# -- memory ------------------------------------------------------------------------------------
_HF_PROCESS = """
import resource, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
if sys.argv[2] == "load":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
else:
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1])).eval()
with torch.inference_mode():
    model.generate(torch.zeros(1, 16, dtype=torch.long), max_new_tokens={n}, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def hf_process_peak_mb(run_dir: Path, n: int, load: bool = True) -> float:
    """Peak RSS of one process holding the whole model with transformers (load=False: random init, no load)."""
    out = subprocess.run([sys.executable, "-c", _HF_PROCESS.format(n=n), str(run_dir), "load" if load else "init"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return float(out.stdout.strip().splitlines()[-1])


def stage_peaks_mb(pipe: InferencePipeline) -> list[float]:
    return [vm_hwm_mb(p.pid) for p in pipe._children.procs.values()]


# -- failure detection -------------------------------------------------------------------------
def kill_detection_s(run_dir: Path, liveness_s: float) -> float:
    pipe = InferencePipeline.start_local(run_dir, stages=2, heartbeat_s=0.2, liveness_s=liveness_s,
                                         env=QUIET)
    try:
        reqs = [pipe.submit([1, 2, 3], max_new_tokens=250, stop_at_eos=False) for _ in range(16)]
        stream = iter(reqs[-1])
        next(stream)
        os.kill(list(pipe._children.procs.values())[1].pid, signal.SIGKILL)
        t = time.perf_counter()
        try:
            for _ in stream:
                pass
        except PeerError:
            return time.perf_counter() - t
        raise RuntimeError("the request finished although its stage was killed")
    finally:
        pipe.close()


# -- how parallel is this machine? ----------------------------------------------------------------
_SPIN = "import time, torch; torch.set_num_threads(1); a, b = torch.randn(256, 512), torch.randn(512, 512)\n" \
        "t = time.perf_counter()\nfor _ in range(1500): a @ b\nprint(time.perf_counter() - t)"


def parallel_capacity() -> float:
    """Work done per second by two single-thread processes at once, relative to one alone (ideal: 2).
    Pipelined stages can overlap only as much as the machine lets two processes compute together."""
    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    alone = min(run(1) for _ in range(2))
    together = min(run(2) for _ in range(2))
    return 2 * alone / together


# -- training ----------------------------------------------------------------------------------
def train_samples_per_s(microbatches: int, steps: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "smolcluster.train", "algo=mp", "model=gpt2-tiny", "data=text",
           f"algo.microbatches={microbatches}", f"train.steps={steps}", "train.batch_size=16",
           "train.eval_samples=16", "train.progress=false", f"hydra.run.dir={out}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **QUIET})
    return json.loads((out / "summary.json").read_text())["samples_per_s"]


def model_rows(name: str, run_dir: Path, args, extra: dict) -> list[dict]:
    """One model's rows: the 2-stage pipeline against `generate` (head first and last), continuous batching,
    and, for the models in PEAK_RSS_MODELS, each stage's peak RSS against transformers' own process."""
    rows: list[dict] = []
    model = save_model(name, run_dir)
    prompt = torch.randint(0, VOCAB[name], (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    for head in ("first", "last"):
        with InferencePipeline.start_local(run_dir, stages=2, head=head, env=QUIET) as pipe:
            b = compare_speed(model, pipe, prompt, args.new_tokens, args.repeats, args.concurrent)
            peaks = stage_peaks_mb(pipe)
        tag = f"{name}, head {head}"
        rows += [
            {"metric": "decode tokens/s, 1 request", "model": tag, "pipeline (2 stages)": b["tps"],
             "baseline": b["hf_tps"], "ratio": b["tps"] / b["hf_tps"]},
            {"metric": "time to first token, ms", "model": tag, "pipeline (2 stages)": b["ttft"] * 1000,
             "baseline": b["hf_ttft"] * 1000, "ratio": b["ttft"] / b["hf_ttft"]},
            {"metric": f"aggregate tokens/s, {args.concurrent} in flight vs one at a time", "model": tag,
             "pipeline (2 stages)": b["together"], "baseline": b["alone"], "ratio": b["together"] / b["alone"]},
        ]
        extra[f"stage_peak_rss_mb[{tag}]"] = peaks
    rows += batching_rows(name, run_dir, model, args.new_tokens, args.repeats)
    del model
    if name in PEAK_RSS_MODELS:
        hf_peak = hf_process_peak_mb(run_dir, 8)
        hf_init_peak = hf_process_peak_mb(run_dir, 8, load=False)
        with InferencePipeline.start_local(run_dir, stages=1, env=QUIET) as pipe:
            pipe.submit(prompt, max_new_tokens=8, stop_at_eos=False).tokens()
            lean_peak = stage_peaks_mb(pipe)[0]
        extra[f"single_process_peak_rss_mb[{name}]"] = {
            "transformers: load checkpoint + generate (baseline)": hf_peak,
            "transformers: random init + generate, no load": hf_init_peak,
            "pipeline stage code, 1 stage holding everything": lean_peak}
        for head in ("first", "last"):
            for rank, mb in enumerate(extra[f"stage_peak_rss_mb[{name}, head {head}]"]):
                rows.append({"metric": f"peak RSS MB, stage {rank}/2", "model": f"{name}, head {head}",
                             "pipeline (2 stages)": mb, "baseline": hf_peak, "ratio": mb / hf_peak,
                             "vs HF no load": mb / hf_init_peak, "vs 1-stage pipeline": mb / lean_peak})
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2-tiny,gpt2,smollm2-135m",
                   help="of gpt2-tiny, gpt2 (124M), smollm2-135m (the Llama family at GPT-2 small's size)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--batching-only", action="store_true", help="only the continuous-batching levels")
    p.add_argument("--compile", default="false",
                   help="the batching levels once per compile= value (comma-separated, e.g. false,true; --batching-only)")
    p.add_argument("--compile-slots", type=int, default=4, help="the stages' compile_slots where they compile")
    args = p.parse_args(argv)
    compiles = tuple(compile_mode(c) for c in args.compile.split(","))
    if compiles != ("false",) and not args.batching_only:
        p.error("--compile compares the continuous-batching levels: add --batching-only")
    setup_logging(level="WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.batching_only:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                model = save_model(name, Path(tmp) / name)
                rows += batching_rows(name, Path(tmp) / name, model, args.new_tokens, args.repeats, compiles,
                                      args.compile_slots)
                del model
        write_report("pipeline-batching", rows, {"cpu_count": os.cpu_count(), "new_tokens": args.new_tokens,
                                                 "levels": list(LEVELS), "compile": list(compiles),
                                                 "compile_slots": args.compile_slots})
        return 0
    rows: list[dict] = []
    capacity = parallel_capacity()
    rows.append({"metric": "machine: 2 compute processes at once vs 1 (ideal 2)", "model": "-",
                 "pipeline (2 stages)": capacity, "baseline": 1.0, "ratio": capacity})
    extra: dict = {"cpu_count": os.cpu_count(), "torch_threads_baseline": torch.get_num_threads(),
                   "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            rows += model_rows(name, tmp / name, args, extra)
        detect = kill_detection_s(tmp / args.models.split(",")[0], liveness_s=2.0)
        rows.append({"metric": "killed stage -> PeerError at the caller, s", "model": "liveness_s=2.0",
                     "pipeline (2 stages)": detect, "baseline": 2.0, "ratio": detect / 2.0})
        if not args.skip_train:
            one = four = 0.0
            for i in range(2):  # alternate, best of two each
                one = max(one, train_samples_per_s(1, args.train_steps, tmp / f"train-m1-{i}"))
                four = max(four, train_samples_per_s(4, args.train_steps, tmp / f"train-m4-{i}"))
            rows.append({"metric": "training samples/s, microbatches 4 vs 1", "model": "gpt2-tiny, 2 stages, batch 16",
                         "pipeline (2 stages)": four, "baseline": one, "ratio": four / one})
    write_report("pipeline", rows, extra)
    return 0
