"""``python -m smolcluster.infer``: generate through a pipeline of stages, printing tokens as they arrive.

    python -m smolcluster.infer model=gpt2-tiny prompt="Once upon a time" max_new_tokens=50
    python -m smolcluster.infer checkpoint=RUN_DIR prompt="ROMEO:" temperature=0.8 top_p=0.95 sampling_seed=1
    echo "To be, or not to be" | python -m smolcluster.infer checkpoint=RUN_DIR   # the prompt on stdin
    python -m smolcluster.infer prompt="'To be, or not to be'"   # or quoted twice: a bare comma is a Hydra list
    python -m smolcluster.infer role=stage rank=0 checkpoint=RUN_DIR cluster=lan     # one stage of a cluster
    python -m smolcluster.infer role=head checkpoint=RUN_DIR cluster=lan prompt="..."  # use running stages
    python -m smolcluster.infer cluster=auto checkpoint=RUN_DIR prompt="..."  # stages on the node agents
    python -m smolcluster.infer model.pretrained=BASE adapters={sql:RUN_DIR/adapter} adapter=sql prompt="..."

The generated text goes to stdout; timings and the finish reason to stderr.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig

from smolcluster.errors import ConfigError
from smolcluster.inference.settings import InferSettings, Role, infer_settings
from smolcluster.launch.cli import user_errors
from smolcluster.launch.supervisor import exit_without_teardown, sigterm_as_interrupt
from smolcluster.paths import CONFIG_DIR
from smolcluster.telemetry.logging import setup_logging

NO_PROMPT = ('no prompt: add prompt="your text" (quote commas twice: prompt="\'To be, or not to be\'"), '
             'or pipe it in: echo "To be, or not to be" | python -m smolcluster.infer ...')


def read_prompt(s: InferSettings) -> str:
    """``prompt=...``, else standard input: prompts are prose, and a comma in an override is Hydra's list
    syntax. A terminal on stdin is no prompt (nothing would say it waits for one)."""
    if s.prompt is not None:
        return s.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError(NO_PROMPT)
    text = sys.stdin.read()
    text = text[:-1] if text.endswith("\n") else text  # the newline echo or a here-document adds
    if not text:
        raise ConfigError(NO_PROMPT)
    return text


def run(cfg: DictConfig) -> dict | None:
    s = infer_settings(cfg)  # the one read of Hydra's config: typed settings from here on
    p = s.pipeline
    setup_logging(role="stage" if p.role is Role.stage else "infer", rank=p.rank if p.rank is not None else "",
                  algo="infer", level=cfg.logging.level, loki=cfg.logging.get("loki"),
                  run_id=p.telemetry.get("run_id", ""), run_dir=p.telemetry.get("run_dir"))
    if p.role is Role.stage:
        from smolcluster.inference.from_config import serve_config_from
        from smolcluster.inference.stage import StageServer

        StageServer(serve_config_from(p)).run()
        return None
    prompt = read_prompt(s)
    if p.role is Role.launch and p.compile == "auto":  # (stages started here, or by agents: cluster=auto) one
        p.compile = "false"  # prompt's tokens would not repay a compile (tens of seconds a shape, cold)
    from smolcluster.inference.from_config import pipeline_from_config
    from smolcluster.node.coordinator import agent_stages

    with agent_stages(p), pipeline_from_config(p, prompt=prompt) as pipe:  # cluster=auto: stages on agents
        t0 = time.perf_counter()
        req = pipe.submit(prompt, max_new_tokens=s.max_new_tokens, sampling=s.sampling, stop_at_eos=s.stop_at_eos,
                          adapter=s.adapter)
        sys.stdout.write(prompt)
        text = []
        for tok in req:
            text.append(tok.text)
            sys.stdout.write(tok.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        wall = time.perf_counter() - t0
        n = len(req.ids)
        ttft = (req.first_token_at - req.submitted_at) * 1000 if req.first_token_at else float("nan")
        stats = {"tokens": n, "wall_s": round(wall, 3), "tokens_per_s": round(n / wall, 2) if wall else None,
                 "ttft_ms": round(ttft, 1), "finish_reason": req.finish_reason, "stages": pipe.stages}
        speculated = ""
        if req.drafted:  # speculate.k: how many of the proposed tokens the target kept
            stats.update(drafted=req.drafted, accepted=req.accepted, acceptance=round(req.accepted / req.drafted, 3))
            speculated = f", {req.accepted}/{req.drafted} proposed tokens accepted"
        if not s.sampling.greedy:  # the seed drawn when none was given: sampling_seed=N repeats this answer
            stats["sampling_seed"] = req.seed
            speculated += f", sampling_seed={req.seed}"
        print(f"[{n} tokens in {wall:.2f}s, {stats['tokens_per_s']} tokens/s, first token after {ttft:.0f} ms, "
              f"{pipe.stages} stages{speculated}, finished: {req.finish_reason}]", file=sys.stderr)
        if req.ids and not "".join(text).strip():
            print(whitespace_hint(len(req.ids), s.sampling.temperature), file=sys.stderr)
        return stats


def whitespace_hint(n: int, temperature: float) -> str:
    """Why a run can print nothing visible: a briefly trained model's likeliest token is often a newline."""
    how = ("greedy decoding (temperature=0) repeats the likeliest token; try temperature=0.8 top_p=0.95"
           if temperature == 0 else "sampling did too")
    return (f"note: the {n} generated tokens are only whitespace: {how}, or train the model longer "
            "(a short run's likeliest token is often a newline)")


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="infer")
@user_errors(interrupted="interrupted")  # a SmolclusterError: one line, exit 2; Ctrl-C: 130
def main(cfg: DictConfig) -> None:
    sigterm_as_interrupt()  # stages started here are stopped on SIGTERM as on Ctrl-C
    run(cfg)


if __name__ == "__main__":
    main()  # errors exit inside (codes 2, 130; a traceback for a bug)
    exit_without_teardown()
