"""``bench cpu``'s report from measured rounds (the rounds themselves need llama-cpp-python, a bench extra)."""

from __future__ import annotations

import argparse
import json

from smolcluster.bench import cpu


def test_a_report_without_fp32_keeps_every_ratio_and_leaves_agreement_out(tmp_path):
    # --formats int8: no transformers fp32 run to compare tokens with, so no "agrees" column, and the ratios are
    # medians of per-round ratios (round 2 is a slow machine for both sides alike).
    tok = lambda v: {"tokens": [1, 2, 3], "tok_s": v}  # noqa: E731
    runs = {("smollm2-135m", "llama.cpp", "int8"): [tok(100.0), tok(50.0), tok(110.0)],
            ("smollm2-135m", "ours1", "int8"): [tok(50.0), tok(30.0), tok(44.0)],
            ("smollm2-135m", "ours2", "int8"): [tok(40.0), tok(20.0), tok(44.0)]}
    args = argparse.Namespace(compile=False, threads=2, rounds=3, tokens=64, prompt_len=16, out=str(tmp_path))
    [row] = cpu.report(runs, ["smollm2-135m"], ["int8"], args)
    assert row["1 stage / llama.cpp"] == 0.5 and row["2 stages / llama.cpp"] == 0.4  # of 0.5/0.6/0.4, 0.4/0.4/0.4
    assert row["ours1 tok/s"] == 44.0 and not any(k.endswith("agrees") for k in row)
    goals = {g["goal"]: g for g in json.loads((tmp_path / "bench-cpu.json").read_text())["goals (smollm2-135m shape)"]}
    assert goals["int8 vs llama.cpp q8_0"] == {"goal": "int8 vs llama.cpp q8_0", "at least": 0.8, "measured": 0.5,
                                               "met": False}
    assert goals["fp32, 1 stage vs llama.cpp f32"]["met"] is None  # not measured: neither met nor missed


def test_a_report_with_fp32_counts_agreement_with_transformers(tmp_path):
    runs = {("gpt2", "transformers", "fp32"): [{"tokens": [1, 2, 3, 4], "tok_s": 10.0}],
            ("gpt2", "ours1", "fp32"): [{"tokens": [1, 2, 9, 4], "tok_s": 12.0}],
            ("gpt2", "llama.cpp", "fp32"): [{"tokens": [1, 2, 3, 4], "tok_s": 24.0}]}
    args = argparse.Namespace(compile=False, threads=2, rounds=1, tokens=4, prompt_len=16, out=str(tmp_path))
    [row] = cpu.report(runs, ["gpt2"], ["fp32"], args)
    assert row["ours1 agrees"] == 2 and row["llama.cpp agrees"] == 4 and row["1 stage / llama.cpp"] == 0.5


def test_a_report_with_compile_gives_the_first_and_the_next_compile_time(tmp_path):
    run = lambda v, c=None: {"tokens": [1], "tok_s": v, **({"compile_s": c} if c else {})}  # noqa: E731
    runs = {("gpt2", "llama.cpp", "int8"): [run(100.0), run(100.0)],
            ("gpt2", "ours1/compile", "int8"): [run(80.0, 17.25), run(60.0, 3.04)]}
    args = argparse.Namespace(compile=True, threads=2, rounds=2, tokens=4, prompt_len=16, out=str(tmp_path))
    [row] = cpu.report(runs, ["gpt2"], ["int8"], args)
    assert row["1 stage compiled / llama.cpp"] == 0.7 and row["compile s (first, then)"] == "17.2 / 3.0"
