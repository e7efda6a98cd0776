"""``python -m smolcluster.bench lora``: LoRA fine-tuning against full fine-tuning, 2 workers, one run.

The base is a seeded random-init Llama of SmolLM2-135M's shape (``--layers`` fewer blocks for a quick run)
saved as a Hugging Face directory, with a byte-level BPE and a ChatML chat template built from the data
(offline); ``--base DIR`` takes a pretrained instruct model instead. The data are Tiny Shakespeare as
conversations (``data=chat``): each speech is a user turn and the speech that answers it the assistant's,
so the loss is on the answering speech only. Both are written into a temporary directory, never into the
repository.

Three arms train with ``algo=allreduce`` on 2 workers (a ring: each node a worker holding its own model,
gradient and optimizer; the algorithm for slow links, docs/benchmarks.md#scaling): ``full`` (every weight),
``lora`` (peft adapters on the attention and MLP projections, fp32 base) and ``lora-int8`` (the same over
an int8 base). Every arm checkpoints activations (``train.activation_checkpointing``, QLoRA's recipe;
``--no-activation-checkpointing`` to hold them all). Each arm runs ``--steps`` steps through ``bench
scaling``'s runner and reports:

- steps/s over its first ``--link-steps`` steps on ``--link`` tbf-shaped links (as root with network
  namespaces: a :class:`smolcluster.bench.desk.Desk`, ``--cpu`` budgets optional); the links are unshaped
  once the run's metrics show that step, so a long full fine-tune does not crawl. Without namespaces (or
  ``--link none``) the nodes share loopback, unshaped, and the steps/s are over every step;
- the bytes a node sends per step, and the eval loss on the held-out conversations after ``--steps``;
- per-node peak RSS: each worker's ``ru_maxrss`` over its whole life (load, training, eval and the final
  checkpoint), the larger of the two; taken by a bare spawner (:func:`smolcluster.bench.scaling.measured`)
  so that it is the worker's own peak, not this process's size at the fork.

Every ratio is LoRA over full fine-tuning in the same run. Writes bench-lora.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from smolcluster.bench.desk import Desk, cgroup_unavailable
from smolcluster.bench.pipeline import SMOLLM2_135M
from smolcluster.bench.report import write_report
from smolcluster.bench.scaling import run_smolcluster, steady
from smolcluster.cluster import free_port
from smolcluster.errors import DataError
from smolcluster.testing.netns import netns_unavailable, parse_rate

WORKERS = 2
ARMS = {  # name -> the arm's overrides on top of the common ones
    "full": ["train.lr={lr_full}"],
    "lora": ["train.lora.enabled=true", "train.lr={lr_lora}"],
    "lora-int8": ["train.lora.enabled=true", "train.lora.base_precision=int8", "train.lr={lr_lora}"],
}
GOALS = {  # key -> (goal text, passes)
    "bytes_per_step": ("<= 0.02", lambda r: r <= 0.02),
    "peak_rss_lora": ("<= 0.5", lambda r: r <= 0.5),
    "peak_rss_lora_int8": ("<= 0.35", lambda r: r <= 0.35),
    "steps_per_s": (">= 1.5", lambda r: r >= 1.5),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def speeches(text: str) -> list[str]:
    """Tiny Shakespeare's speeches: blocks of a ``NAME:`` line and its lines, separated by blank lines."""
    return [b.strip() for b in text.split("\n\n") if ":" in b.split("\n", 1)[0] and "\n" in b.strip()]


def write_chat(text_path: Path, out: Path, limit: int) -> str:
    """``limit`` conversations, each a speech (user) and the speech that follows it (assistant), as JSONL at
    ``out``; their text (what the tokenizer is trained on)."""
    said = speeches(text_path.read_text(encoding="utf-8"))[: limit + 1]
    with out.open("w", encoding="utf-8") as f:
        for ask, answer in zip(said, said[1:]):
            f.write(json.dumps({"messages": [{"role": "user", "content": ask},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return "\n\n".join(said)


def write_base(d: Path, corpus: str, layers: int) -> Path:
    """A random-init Llama of SmolLM2-135M's shape with ``layers`` blocks, and a BPE (trained on ``corpus``)
    with a ChatML template, as a model directory (what ``model.pretrained=`` and ``data=chat`` read)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus], trainers.BpeTrainer(
        vocab_size=4096, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", chat_template=CHATML)
    hf.save_pretrained(str(d))
    torch.manual_seed(0)
    shape = {**SMOLLM2_135M, "num_hidden_layers": layers, "eos_token_id": hf.eos_token_id}
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(d)
    return d


class Loopback:
    """Every host on 127.0.0.1, nothing shaped: the hosts of a run where network namespaces are not available."""

    ip = collections.defaultdict(lambda: "127.0.0.1")

    def exec(self, host: str) -> list[str]:
        return []

    def close(self) -> None:
        pass


def unshape_after(lan: Desk, run_dir: Path, step: int):
    """An ``on_tick`` that puts the links back to veth speed once the run's metrics show ``step``: the steps/s
    are measured up to there, and the rest of a long run does not crawl."""
    metrics = run_dir / "metrics.jsonl"

    def tick() -> None:
        if not lan.rate or not metrics.is_file():
            return
        done = metrics.read_text().split("\n")[:-1]  # whole lines only: the writer may be mid-line
        if any(json.loads(line).get("step", 0) >= step for line in done[-3:] if line.strip()):
            lan.unshape()
    return tick


def run_arm(hosts, arm: str, args: argparse.Namespace, base: Path, chat: Path, run_dir: Path) -> dict:
    """One arm's 2-worker allreduce run: steps/s (up to ``--link-steps`` when shaped), bytes a node sends per
    step, eval loss, and each worker's peak RSS."""
    shaped = isinstance(hosts, Desk)
    if shaped:
        hosts.shape(args.link)
    measured = args.link_steps if shaped else args.steps
    warmup = max(1, measured // 4)
    model_args = ["model=llama-tiny", f"model.pretrained={base}", f"model.block_size={args.block}", "data=chat",
                  f"data.path={chat}", f"train.batch_size={args.batch_size}", "train.optimizer=adamw",
                  "train.schedule=constant", "logging.hardware_every=0", "logging.grad_norm_every=0",
                  f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
                  *(a.format(lr_full=args.lr_full, lr_lora=args.lr_lora) for a in ARMS[arm])]
    extra = (f"train.eval_samples={args.eval_samples}", *(() if shaped else ("cluster.bind=127.0.0.1",)))
    try:
        got = run_smolcluster(hosts, "allreduce", WORKERS, model_args, args.steps, warmup, args.batch_size, run_dir,
                              extra_args=extra, port=5555 if shaped else free_port(),
                              on_tick=unshape_after(hosts, run_dir, args.link_steps) if shaped else None,
                              timeout=args.timeout)
    finally:
        if shaped:
            hosts.unshape()
    samples_per_s, bytes_per_sample = steady(got["rows"], warmup, measured)
    per_step = args.batch_size * WORKERS
    return {"steps_per_s": samples_per_s / per_step, "bytes_per_step": bytes_per_sample * per_step,
            "peak_rss_mb": max(got["peak_rss_mb"][f"w{r}"] for r in range(WORKERS)),
            "peak_rss_mb_per_worker": [round(got["peak_rss_mb"][f"w{r}"], 1) for r in range(WORKERS)],
            "eval_loss": got["summary"]["eval_loss"], "params": got["summary"]["params"],
            "trainable_params": got["summary"].get("trainable_params", got["summary"]["params"])}


def report(arms: dict[str, dict], args: argparse.Namespace, link: str) -> tuple[list[dict], dict]:
    """The table's rows (each measure for every arm, LoRA over full, the goal) and the ratios with pass/fail."""
    full, lora, int8 = arms["full"], arms["lora"], arms["lora-int8"]
    ratios = {"bytes_per_step": lora["bytes_per_step"] / full["bytes_per_step"],
              "peak_rss_lora": lora["peak_rss_mb"] / full["peak_rss_mb"],
              "peak_rss_lora_int8": int8["peak_rss_mb"] / full["peak_rss_mb"],
              "steps_per_s": lora["steps_per_s"] / full["steps_per_s"],
              "steps_per_s_int8": int8["steps_per_s"] / full["steps_per_s"],
              "eval_loss": lora["eval_loss"] / full["eval_loss"],
              "eval_loss_int8": int8["eval_loss"] / full["eval_loss"]}
    goals = {k: {"goal": g, "met": ok(ratios[k])} for k, (g, ok) in GOALS.items()}

    def row(measure, key, scale=1.0, ratio=None, ratio_int8=None, goal=None):
        out = {"measure": measure, **{a: round(arms[a][key] * scale, 4) for a in ARMS}}
        out["lora / full"] = round(ratios[ratio], 4) if ratio else ""
        out["int8 / full"] = round(ratios[ratio_int8], 4) if ratio_int8 else ""
        out["goal"] = "; ".join(f"{GOALS[k][0]}: {'met' if goals[k]['met'] else 'NOT met'}" for k in goal or ())
        return out

    rows = [row("trainable params (M)", "trainable_params", 1e-6),
            row("MB sent per node per step", "bytes_per_step", 1e-6, "bytes_per_step", None, ["bytes_per_step"]),
            row("peak RSS per node (MB)", "peak_rss_mb", 1, "peak_rss_lora", "peak_rss_lora_int8",
                ["peak_rss_lora", "peak_rss_lora_int8"]),
            row(f"steps/s, {link}", "steps_per_s", 1, "steps_per_s", "steps_per_s_int8", ["steps_per_s"]),
            row(f"eval loss after {args.steps} steps", "eval_loss", 1, "eval_loss", "eval_loss_int8")]
    return rows, {"ratios": {k: round(v, 4) for k, v in ratios.items()}, "goals": goals}


SMALL = dict(layers=2, steps=20, link_steps=4, batch_size=2, block=64, eval_samples=16, conversations=400,
             link="1gbit")  # --small: a run of minutes on a loaded laptop, the full shape's width and vocabulary


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m smolcluster.bench lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="quick defaults: " + ", ".join(f"{k}={v}" for k, v in SMALL.items()))
    p.add_argument("--layers", type=int, default=30, help="transformer blocks (SmolLM2-135M: 30)")
    p.add_argument("--base", default=None, help="a pretrained model directory with a chat template (e.g. "
                   "SmolLM2-135M-Instruct's) instead of the random init: an eval loss that means something")
    p.add_argument("--steps", type=int, default=200, help="steps of each arm; the eval loss is after them")
    p.add_argument("--link-steps", type=int, default=10, help="the first steps, on shaped links: steps/s")
    p.add_argument("--link", default="100mbit", help="tbf rate of every link (root + netns), or none")
    p.add_argument("--cpu", type=float, default=None, help="each worker's CPU budget in cores (cgroup v1)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per worker per step")
    p.add_argument("--block", type=int, default=128, help="tokens per row (model.block_size)")
    p.add_argument("--lr-full", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="every arm keeps one block's activations, as QLoRA's recipe does (default), so the memory "
                   "ratios compare weights and optimizer state, not activations that no arm needs to hold")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out rows the eval loss is over")
    p.add_argument("--conversations", type=int, default=4000, help="Tiny Shakespeare speech pairs (the last "
                   "10%% held out)")
    shared = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", "../shared/data"))
    p.add_argument("--text", default=str(shared / "tinyshakespeare" / "input.txt"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds one arm may take")
    p.add_argument("--out", default=".", help="where bench-lora.json goes")
    p.add_argument("--keep", default=None, help="build the model, data and run directories here, and keep them")
    if "--small" in argv:
        p.set_defaults(**SMALL)
    args = p.parse_args(argv)
    if not 2 <= args.link_steps <= args.steps:
        p.error(f"--link-steps={args.link_steps} must be at least 2 and at most --steps={args.steps}")
    if args.link != "none":
        try:
            parse_rate(args.link)
        except ValueError as e:
            p.error(str(e))
    return args


def hosts_for(args: argparse.Namespace):
    """A Desk (built unshaped; each arm shapes it) where namespaces are available, else Loopback; and why not."""
    reason = "--link none" if args.link == "none" else netns_unavailable(shaping=True) or (
        args.cpu and cgroup_unavailable())
    if reason:
        return Loopback(), f"unshaped loopback ({reason})"
    cpus = {f"w{r}": args.cpu for r in range(WORKERS)} if args.cpu else {}
    return Desk(["srv", *(f"w{r}" for r in range(WORKERS))], cpus=cpus).build(), f"{args.link} shaped"


def main(argv: list[str]) -> int:
    args = parse(argv)
    text = Path(args.text).expanduser()
    if args.base and not (Path(args.base) / "config.json").is_file():
        raise DataError(f"--base {args.base}: no config.json there; give a Hugging Face model directory")
    if not text.is_file():
        raise DataError(f"--text {text}: no such file; point it (or $SMOLCLUSTER_SHARED_DATA) at Tiny Shakespeare's input.txt")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the runs and removes the LAN
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = Path(args.keep or tmp)
        (work / "base").mkdir(parents=True, exist_ok=True)
        chat = work / "chat.jsonl"
        corpus = write_chat(text, chat, args.conversations)
        base = Path(args.base) if args.base else write_base(work / "base", corpus, args.layers)
        hosts, link = hosts_for(args)
        arms = {}
        try:
            for arm in ARMS:
                arms[arm] = run_arm(hosts, arm, args, base, chat, work / arm)
                print(json.dumps({"arm": arm, **arms[arm]}), flush=True)
        finally:
            hosts.close()
    rows, extra = report(arms, args, link)
    shape = args.base or f"random-init SmolLM2-135M shape, {args.layers} layers"
    write_report("lora", rows, {**extra, "link": link, "arms": arms, "algo": f"allreduce, {WORKERS} workers",
                                "base": shape,
                                "settings": {k: v for k, v in vars(args).items() if k not in ("keep", "small", "out")},
                                "load_average": os.getloadavg(), "cores": os.cpu_count(),
                                "wall_s": round(time.monotonic() - started, 1)}, out_dir=args.out)
    return 0
