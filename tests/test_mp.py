"""``algo=mp`` end to end through the real CLI: stage processes linked by PUB/SUB on loopback,
compared with ``algo=local`` run in this process on the same config.

Stages and the reference both compute with one thread: reductions split over a
different number of threads round differently, and AdamW turns such 1e-10
differences on zero-gradient coordinates (e.g. attention key biases) into lr-sized ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from smolcluster import checkpoint
from smolcluster.algorithms import local
from smolcluster.models.gpt2 import build_gpt2
from smolcluster.paths import CONFIG_DIR
from smolcluster.telemetry.logging import setup_logging
from smolcluster.train_settings import train_config
from tests.conftest import run_cli, train

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
GPT2 = ["model=gpt2-tiny", "data=text", "model.block_size=32", "train.batch_size=8", "train.eval_samples=64",
        "train.log_every=5", "train.optimizer=adamw", "train.lr=3e-3", "train.warmup_steps=5", "train.steps=20"]
MLP = ["model=mlp", "data=digits", "train.steps=40", "train.grad_clip=0.5", "train.lr=0.05"]


def params_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run_dir / "checkpoint.safetensors").items() if not k.startswith("optim/")}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_local(run_dir: Path, *overrides: str) -> dict:
    """``algo=local`` in this process, on one thread like each stage."""
    setup_logging(level="WARNING")
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=["algo=local", "train.progress=false", *overrides]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return local.run(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory) -> str:
    return f"data.cache_dir={tmp_path_factory.mktemp('tok')}"


@pytest.mark.slow
def test_gpt2_two_stages_20_steps_end_on_the_local_parameters(tmp_path, tok_cache):
    ref = run_local(tmp_path / "local", *GPT2, tok_cache)
    s = train(tmp_path / "mp", "algo=mp", *GPT2, tok_cache, env=ONE_THREAD)
    assert s["algo"] == "mp" and s["stages"] == 2 and s["steps"] == 20 and s["samples"] == 160
    assert s["partition"] == ["stage 0/2: embeddings + blocks 0-1", "stage 1/2: blocks 2-3 + head"]
    diff = max_diff(params_of(tmp_path / "mp"), params_of(tmp_path / "local"))
    assert diff <= 1e-5, diff
    assert s["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-5)
    assert s["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 20]
    assert all(r["bytes_sent"] > 0 for r in rows if "loss" in r)
    assert (tmp_path / "mp" / "loss.png").is_file()
    # the merged checkpoint is an ordinary whole-model one: the HF model loads it, tied head included
    wte = params_of(tmp_path / "mp")["transformer.wte.weight"]
    model = build_gpt2(vocab_size=wte.shape[0], n_layer=4, n_head=4, n_embd=128, n_positions=256)
    meta = checkpoint.load(tmp_path / "mp", model)
    assert meta["step"] == 20 and meta["merged_from"] == ["stage-0-of-2.safetensors", "stage-1-of-2.safetensors"]
    assert torch.equal(model.lm_head.weight, wte)


@pytest.mark.slow
def test_mlp_three_stages_microbatched_and_clipped_resume_from_shards_like_local(tmp_path):
    run_local(tmp_path / "local", *MLP)
    first = tmp_path / "first"
    train(first, "algo=mp", *MLP, "algo.stages=3", "algo.microbatches=4", "train.stop_after=20", env=ONE_THREAD)
    assert json.loads((first / "checkpoint.json").read_text())["step"] == 20
    merged = load_file(first / "checkpoint.safetensors")
    (first / "checkpoint.safetensors").unlink()  # resume from the three shards alone
    run_cli("smolcluster.pipeline.merge", str(first))  # ... after checking the merge command rebuilds it
    assert all(torch.equal(merged[k], v) for k, v in load_file(first / "checkpoint.safetensors").items())
    (first / "checkpoint.safetensors").unlink()
    s = train(tmp_path / "second", "algo=mp", *MLP, "algo.stages=3", "algo.microbatches=4", f"resume={first}",
              env=ONE_THREAD)
    assert s["steps"] == 40 and s["partition"] == ["stage 0/3: block 0", "stage 1/3: block 1", "stage 2/3: block 2"]
    assert max_diff(params_of(tmp_path / "second"), params_of(tmp_path / "local")) <= 1e-5
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert s["eval_accuracy"] == pytest.approx(local_summary["eval_accuracy"], abs=2e-3)


@pytest.mark.slow
def test_a_run_stopped_and_resumed_in_its_own_directory_reads_as_one_run_and_ends_like_local(tmp_path):
    """Stop at step 25, resume into the same directory: each step logged once, counters cumulative, one
    ``resumed`` event; the data order depends on the step alone, so the end equals ``local``'s (1e-5)."""
    common = ["algo=mp", *MLP, "train.log_every=5", "train.checkpoint_every=10"]
    run_local(tmp_path / "local", *MLP, "train.log_every=5")
    mp = tmp_path / "mp"
    first = train(mp, *common, "train.stop_after=25", env=ONE_THREAD)
    assert first["steps"] == 25 and first["samples"] == 64 * 25
    s = train(mp, *common, f"resume={mp}", env=ONE_THREAD)
    rows = [json.loads(x) for x in (mp / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 41, 5))  # each step once
    assert all(r["samples"] == 64 * r["step"] for r in logged)
    sent = [r["bytes_sent"] for r in logged]
    assert sent == sorted(sent) and sent[0] > 0  # the last stage's traffic goes on counting after the resume
    assert [(r["step"], r["event"]) for r in rows if "event" in r] == [(25, "resumed")]
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert s["steps"] == 40 and s["samples"] == 64 * 40 and s["wall_s"] > first["wall_s"]
    assert s["resumed_from"].startswith(str(mp))
    assert max_diff(params_of(mp), params_of(tmp_path / "local")) <= 1e-5
    local_loss = [r["loss"] for r in (json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text()
                                      .splitlines()) if "loss" in r]
    assert [r["loss"] for r in logged] == pytest.approx(local_loss, abs=1e-5)


def test_bad_pipeline_settings_fail_with_a_clear_message(tmp_path):
    p = run_cli("smolcluster.train", f"hydra.run.dir={tmp_path}", "algo=mp", "algo.microbatches=5", check=False)
    assert p.returncode == 2
    assert "algo.microbatches=5 must be a positive integer dividing train.batch_size=64" in p.stderr
