"""llama.cpp beside smolcluster and ``transformers`` on this CPU: decode tokens/s of one request.

The same random-init models (a SmolLM2-135M-shaped Llama and GPT-2 124M) run four ways, each in a fresh
process per round, rounds interleaved so that a busy machine moves every side alike:

- llama.cpp through ``llama-cpp-python``, on GGUF files converted here by llama.cpp's own
  ``convert_hf_to_gguf.py`` (f32, bf16) and quantized by its own ``llama_model_quantize`` (q8_0, q4_0);
- smolcluster, the whole model in 1 stage, and in 2 stages on this machine (``start_local``);
- ``transformers`` ``generate`` (fp32, bf16).

Formats pair up as fp32/f32, bf16/bf16, int8/q8_0 and int4/q4_0 (group 32, q4_0's block). Each side's
greedy tokens are compared with ``transformers`` fp32 (the longest common prefix is reported).

llama-cpp-python compiles llama.cpp from source (about 12 minutes on 2 cores):

    pip install 'smolcluster[bench]'
    python -m smolcluster.bench cpu                       # both models, 3 rounds, 64 tokens, 2 threads
    python -m smolcluster.bench cpu --models smollm2-135m --formats fp32,int8 --rounds 1

The converter is not in the wheel: it is taken from the llama-cpp-python source distribution of the installed
version (``pip download``, cached under ~/.cache/smolcluster/), so script and library match; or give a
llama.cpp checkout of that version with ``--llama-cpp-src``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from smolcluster.bench.report import write_report
from smolcluster.errors import SmolclusterError

MODELS = ("smollm2-135m", "gpt2")
# our (precision, quantize) and llama.cpp's type for each format
FORMATS = {"fp32": (("fp32", "none"), "f32"), "bf16": (("bf16", "none"), "bf16"),
           "int8": (("fp32", "int8"), "q8_0"), "int4": (("fp32", "int4"), "q4_0")}
GROUP = 32  # int4 group size: q4_0's block, so both sides keep the same information per weight
LLAMA_FTYPE = {"q8_0": 7, "q4_0": 2}  # llama.h's LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
HF_FORMATS = ("fp32", "bf16")  # transformers runs these; its int8 needs bitsandbytes/GPU paths
GOALS = [  # (what, numerator, denominator, at least): the targets on the SmolLM2-135M shape
    ("fp32, 1 stage vs llama.cpp f32", ("ours1", "fp32"), ("llama.cpp", "fp32"), 1.0),
    ("fp32, 2 stages vs llama.cpp f32", ("ours2", "fp32"), ("llama.cpp", "fp32"), 0.9),
    ("bf16 vs our fp32 (1 stage)", ("ours1", "bf16"), ("ours1", "fp32"), 1.0),
    ("int8 vs llama.cpp q8_0", ("ours1", "int8"), ("llama.cpp", "int8"), 0.8),
    ("int8 vs our fp32 (1 stage)", ("ours1", "int8"), ("ours1", "fp32"), 1.5),
    # the same with compile=true's decode step (--compile)
    ("fp32, 1 stage compiled vs llama.cpp f32", ("ours1/compile", "fp32"), ("llama.cpp", "fp32"), 1.0),
    ("bf16 vs our fp32 (1 stage compiled)", ("ours1/compile", "bf16"), ("ours1/compile", "fp32"), 1.0),
    ("int8, compiled vs llama.cpp q8_0", ("ours1/compile", "int8"), ("llama.cpp", "int8"), 0.8),
    ("int8 vs our fp32 (1 stage compiled)", ("ours1/compile", "int8"), ("ours1/compile", "fp32"), 1.5),
]
# ours1: the whole model in one stage as serving runs it (smolcluster::rows_mm for few-row products where it is
# built); ours1/torch: the same with SMOLCLUSTER_CPU_KERNELS=0 (torch's kernels); ours1/compile: compile=true;
# ours2 and ours2/compile: 2 stage processes (start_local), eager and compiled
SIDES = ("llama.cpp", "ours1", "ours1/torch", "ours1/compile", "ours2", "ours2/compile", "transformers")
INSTALL = ("llama-cpp-python is not installed: pip install 'smolcluster[bench]' (it compiles llama.cpp, "
           "about 12 minutes on 2 cores)")


# -- the models, with a tokenizer llama.cpp's converter can read ---------------------------------------------

def write_models(out: Path, names: list[str]) -> dict[str, Path]:
    """Each model as a Hugging Face directory with a byte-level BPE tokenizer: the converter needs one, and the
    tokens are only ids here (prompts are ids; no text is compared)."""
    from transformers import PreTrainedTokenizerFast

    from smolcluster.bench.common import write_tokenizer
    from smolcluster.bench.pipeline import save_model
    from smolcluster.bench.quantize import smollm2_shaped

    dirs = {}
    for name in names:
        d = smollm2_shaped(out) if name == "smollm2-135m" else out / name
        if name == "gpt2":
            save_model("gpt2", d)
        tok = write_tokenizer(d, 1000) / "tokenizer.json"
        PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>").save_pretrained(d)
        dirs[name] = d
    return dirs


# -- llama.cpp: the converter, the quantizer, the runner ----------------------------------------------------

def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise SmolclusterError(INSTALL) from None


def llama_cpp_source(version: str, given: str | None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` and ``gguf-py/``, at the version the
    installed library vendors: a given checkout, or the source distribution's ``vendor/llama.cpp``."""
    if given:
        src = Path(given)
        if not (src / "convert_hf_to_gguf.py").is_file():
            raise SmolclusterError(f"--llama-cpp-src {src} has no convert_hf_to_gguf.py: give the root of a "
                                   f"llama.cpp checkout at the version llama-cpp-python {version} vendors")
        return src
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smolcluster" / f"llama.cpp-{version}"
    if (cache / "convert_hf_to_gguf.py").is_file():
        return cache
    print(f"fetching llama.cpp's converter from llama-cpp-python {version}'s source distribution ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                              f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not sdists:
            raise SmolclusterError(f"could not download llama-cpp-python {version}'s source ({got.stderr.strip()[-300:]})"
                                   "; give a llama.cpp checkout of that version with --llama-cpp-src")
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        with tarfile.open(sdists[0]) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(wanted)]
            for m in members:
                m.name = m.name[len(prefix):]
            # into a temporary directory first: an interrupted extraction never looks like a cached one
            tar.extractall(Path(tmp) / "llama.cpp", members=members, filter="data")
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(tmp) / "llama.cpp", cache)
    return cache


# Run in a child: llama.cpp's converter as its own command line, told two things about the byte-level BPE
# trained here. The converter names a BPE pre-tokenizer by the hash of what a known tokenizer makes of a
# fixed text, so it cannot know this one; it splits text as GPT-2's does, which is the name given. And its
# Llama path tries sentencepiece first, which would fail on the import (not installed, not needed) instead
# of on the missing tokenizer.model that makes it fall back to the BPE path.
_CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base

def no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model: the tokenizer is a byte-level BPE")
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), 2
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params):
    sys.exit("llama_model_quantize failed")
"""


def to_gguf(model_dir: Path, src: Path, out: Path, formats: list[str]) -> dict[str, Path]:
    """The model in each of llama.cpp's types: f32/bf16 by the converter, q8_0/q4_0 from f32 by the quantizer."""
    files = {}
    for fmt in ["fp32", *(f for f in formats if f != "fp32")]:
        kind, path = FORMATS[fmt][1], out / f"{model_dir.name}-{FORMATS[fmt][1]}.gguf"
        if kind in LLAMA_FTYPE:
            cmd = [sys.executable, "-c", _QUANTIZE, str(files["fp32"]), str(path), str(LLAMA_FTYPE[kind])]
        else:
            cmd = [sys.executable, "-c", _CONVERT, str(src), str(model_dir), "--outtype", kind, "--outfile", str(path)]
        got = subprocess.run(cmd, capture_output=True, text=True)
        if got.returncode:
            raise SmolclusterError(f"llama.cpp could not make the {kind} file of {model_dir.name}:\n"
                                   f"{got.stderr.strip()[-1500:]}")
        files[fmt] = path
    return files


# -- one timed decode, in a fresh process per side ----------------------------------------------------------

# Every side: a short pass first (first-call costs, page faults), then n greedy tokens; decode tokens/s is
# timed from the first token to the last (prefill excluded). Prints {"tokens": [...], "tok_s": ...}.
_DECODE = """
import json, sys, time
side, path, fmt, prompt, n, threads, group = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), \\
    int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])

def streamed(tokens, k):  # (the first k tokens, decode tokens/s after the first)
    out, t = [], None
    for tok in tokens:
        out.append(int(tok))
        t = t or time.perf_counter()
        if len(out) == k:
            return out, (k - 1) / (time.perf_counter() - t)

if side == "llama.cpp":
    import inspect
    from llama_cpp import Llama
    kw = dict(n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + n + 8, verbose=False)
    if "use_extra_bufts" in inspect.signature(Llama).parameters:
        kw["use_extra_bufts"] = False  # weight repacking off: its AMX path crashes on some CPUs (llama.cpp #20824)
    llm = Llama(path, **kw)
    run = lambda k: streamed(llm.generate(prompt, top_k=1, temp=0.0, reset=True), k)
elif side == "transformers":
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, {"fp32": "float32"}.get(fmt, "bfloat16")))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(k):  # generate streams nothing by itself: one token's call is its prefill, the rest is decode
        with torch.inference_mode():
            t = time.perf_counter()
            model.generate(torch.tensor([prompt]), max_new_tokens=1, **kw)
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(torch.tensor([prompt]), max_new_tokens=k, min_new_tokens=k, **kw)
            return out[0, len(prompt):].tolist(), (k - 1) / (time.perf_counter() - t - first)
else:
    import torch
    from smolcluster.bench.quantize import load
    from smolcluster.pipeline.architectures import KVCache
    torch.set_num_threads(threads)
    stage = load(path, *fmt.split("/"), group)
    step = stage.run_blocks
    if side.endswith("/compile"):  # compile=true's decode step (one slot; compiled before the timed runs)
        from smolcluster.inference.compiled import CompiledDecode
        from smolcluster.pipeline.architectures.base import Batch
        from smolcluster.inference.stage import ServeConfig
        # serving's default slot length, compile_positions (a step reads the positions written, whatever the slot's)
        positions = max(ServeConfig.compile_positions, len(prompt) + n + 8)
        compiled = CompiledDecode(stage, 1, positions, stage.compute_dtype, torch.device("cpu"), [1])
        t0 = time.perf_counter()
        compiled.warm("bench")
        compile_s = time.perf_counter() - t0
        step = lambda x, cache: compiled.run_step(x, Batch([cache], [x.shape[1]]), stage.run_blocks)

    @torch.inference_mode()
    def greedy():
        cache = compiled.cache(len(stage.blocks), len(prompt) + n + 8, 0) if side.endswith("/compile") else \
            KVCache(len(stage.blocks))
        try:
            x = stage.run_blocks(stage.embed(torch.tensor([prompt]), 0), cache)
            while True:
                tok = int(stage.logits(x, last_only=True)[0, -1].argmax())
                yield tok
                x = step(stage.embed(torch.tensor([[tok]]), cache.length), cache)
        finally:
            if side.endswith("/compile"):
                compiled.release(cache)
    run = lambda k: streamed(greedy(), k)
run(4)
tokens, tok_s = run(n)
print(json.dumps({"tokens": tokens, "tok_s": tok_s, **({"compile_s": compile_s} if side.endswith("/compile") else {})}))
"""


def decode_in_child(side: str, path: Path, fmt: str, prompt: list[int], n: int, threads: int) -> dict:
    from smolcluster.launch.threads import stage_env

    arg = "/".join(FORMATS[fmt][0]) if side.startswith("ours1") else fmt
    env = stage_env(1, threads=threads)
    if side == "ours1/torch":  # torch's own kernels for the same stage: what rows_mm is measured against
        env["SMOLCLUSTER_CPU_KERNELS"] = "0"
    got = subprocess.run([sys.executable, "-c", _DECODE, side, str(path), arg, json.dumps(prompt), str(n),
                          str(threads), str(GROUP)], capture_output=True, text=True, env=env)
    if got.returncode:
        raise SmolclusterError(f"{side} {fmt} failed:\n{got.stderr.strip()[-1500:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def decode_two_stages(model_dir: Path, fmt: str, prompt: list[int], n: int, threads: int,
                      compile: bool = False) -> dict:
    """Our 2-stage pipeline on this machine (stages take turns, each with ``threads``), as ``infer`` runs it
    (``compile``: with ``compile=true``, each stage compiling its decode step as it starts)."""
    from smolcluster.inference.api import InferencePipeline

    precision, quantize = FORMATS[fmt][0]
    with InferencePipeline.start_local(model_dir, stages=2, precision=precision, quantize=quantize,
                                       quantize_group=GROUP, threads=threads, compile=compile, compile_slots=1,
                                       env={"SMOLCLUSTER_LOG_LEVEL": "WARNING"}) as pipe:
        pipe.submit(prompt, max_new_tokens=4, stop_at_eos=False).tokens()  # warm up
        r = pipe.submit(prompt, max_new_tokens=n, stop_at_eos=False)
        tokens = list(r.tokens())
        # the first token's time is prefill; decode rate from the first token to the last
        return {"tokens": tokens, "tok_s": (len(tokens) - 1) / (r.finished_at - r.first_token_at)}


# -- the run -------------------------------------------------------------------------------------------------

def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(args, models: dict[str, Path], ggufs: dict[str, dict[str, Path]], formats: list[str]) -> dict:
    """runs[(model, side, format)] = every round's {"tokens", "tok_s"}."""
    prompt = [(7 * i + 3) % 1000 for i in range(args.prompt_len)]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for r in range(args.rounds):
        for model, d in models.items():
            order = formats if r % 2 == 0 else formats[::-1]
            for fmt in order:
                sides = [("llama.cpp", ggufs[model][fmt]), ("ours1", d), ("ours1/torch", d), ("ours2", d)]
                sides += [("ours1/compile", d), ("ours2/compile", d)] if args.compile else []
                sides += [("transformers", d)] if fmt in HF_FORMATS else []
                for side, path in (sides if r % 2 == 0 else sides[::-1]):
                    got = decode_two_stages(d, fmt, prompt, args.tokens, args.threads, side.endswith("/compile")) \
                        if side.startswith("ours2") else \
                        decode_in_child(side, path, fmt, prompt, args.tokens, args.threads)
                    runs.setdefault((model, side, fmt), []).append(got)
                print(f"round {r + 1}/{args.rounds} {model} {fmt}: " + ", ".join(
                    f"{s} {runs[model, s, fmt][-1]['tok_s']:.1f}" for s, _ in sides), file=sys.stderr, flush=True)
    return runs


def report(runs: dict, models: list[str], formats: list[str], args) -> list[dict]:
    def med(key):
        return statistics.median(x["tok_s"] for x in runs[key]) if key in runs else None

    def ratio(model, a, b):  # the median of per-round ratios: one round's load moves both sides alike
        ka, kb = (model, *a), (model, *b)
        if ka not in runs or kb not in runs:
            return None
        return round(statistics.median(x["tok_s"] / y["tok_s"] for x, y in zip(runs[ka], runs[kb])), 3)

    rows = []
    for model in models:
        # the greedy reference: transformers fp32, measured only when fp32 is among the formats
        ref = runs[model, "transformers", "fp32"][0]["tokens"] if (model, "transformers", "fp32") in runs else None
        for fmt in formats:
            row = {"model": model, "format": f"{fmt} / {FORMATS[fmt][1]}"}
            for side in SIDES:
                if (model, side, fmt) in runs:
                    row[f"{side} tok/s"] = round(med((model, side, fmt)), 2)
                    if ref is not None:
                        row[f"{side} agrees"] = common_prefix(runs[model, side, fmt][0]["tokens"], ref)
            row["1 stage / llama.cpp"] = ratio(model, ("ours1", fmt), ("llama.cpp", fmt))
            row["2 stages / llama.cpp"] = ratio(model, ("ours2", fmt), ("llama.cpp", fmt))
            if args.compile:
                row["2 stages compiled / llama.cpp"] = ratio(model, ("ours2/compile", fmt), ("llama.cpp", fmt))
            row["1 stage rows_mm / torch kernels"] = ratio(model, ("ours1", fmt), ("ours1/torch", fmt))
            if args.compile and (model, "ours1/compile", fmt) in runs:
                row["1 stage compiled / llama.cpp"] = ratio(model, ("ours1/compile", fmt), ("llama.cpp", fmt))
                # the first round's compile (cold, unless an earlier run filled inductor's disk cache), then warm
                row["compile s (first, then)"] = " / ".join(
                    f"{x['compile_s']:.1f}" for x in runs[model, "ours1/compile", fmt][:2])
            row["1 stage / our fp32"] = ratio(model, ("ours1", fmt), ("ours1", "fp32"))
            rows.append(row)
    goals = []
    for what, a, b, least in GOALS:
        got = ratio("smollm2-135m", a, b) if "smollm2-135m" in models else None
        goals.append({"goal": what, "at least": least, "measured": got,
                      "met": None if got is None else got >= least})
    write_report("cpu", rows, {"goals (smollm2-135m shape)": goals, "threads": args.threads, "rounds": args.rounds,
                               "tokens": args.tokens, "prompt_len": args.prompt_len,
                               "agrees": "greedy tokens equal to transformers fp32 before the first difference",
                               "runs": {"|".join(k): [x["tok_s"] for x in v] for k, v in runs.items()}}, args.out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="threads of every side")
    p.add_argument("--compile", action="store_true",
                   help="also our 1 stage with compile=true's decode step (inductor: ~20 s a format cold, seconds from its cache)")
    p.add_argument("--llama-cpp-src", default=None, help="a llama.cpp checkout (default: the matching sdist's)")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    models, formats = args.models.split(","), args.formats.split(",")
    for name, got, known in (("model", models, MODELS), ("format", formats, FORMATS)):
        if bad := [x for x in got if x not in known]:
            p.error(f"unknown {name} {bad}: choose from {', '.join(known)}")
    src = llama_cpp_source(llama_cpp_version(), args.llama_cpp_src)
    from smolcluster.pipeline import cpu_kernels

    cpu_kernels.available(wait=True)  # built before the rounds: a stage starting without it runs torch's kernels
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory(prefix="smolcluster-bench-cpu-") as tmp:
        dirs = write_models(Path(tmp), models)
        ggufs = {m: to_gguf(d, src, Path(tmp), formats) for m, d in dirs.items()}
        runs = measure(args, dirs, ggufs, formats)
    report(runs, models, formats, args)
    return 0
