"""``bench lora`` at its tiniest (1 layer of SmolLM2-135M's shape, its width and vocabulary: the byte ratio is
smaller than the 30-layer model's, the embedding being most of the parameters; 3 steps per arm of 1 row of 32 tokens per worker): real 2-worker allreduce
runs of full fine-tuning, LoRA and LoRA over an int8 base, on shaped links where namespaces are available.
And the chunked evaluation its memory figures rest on."""

from __future__ import annotations

import json

import pytest
import torch

from smolcluster.models.hf import build_causal_lm
from smolcluster.objective import evaluate
from smolcluster.testing.netns import netns_unavailable
from tests.conftest import run_cli


@pytest.mark.timeout(900)  # 6 worker processes start one pair after another: minutes on a crowded machine
def test_bench_lora_reports_every_ratio_and_lora_sends_a_fraction_of_the_bytes(tmp_path):
    reason = netns_unavailable(shaping=True)
    link = "none" if reason else "1gbit"  # 1 Gbit/s: a full step's 140 MB takes a second, not ten
    proc = run_cli("smolcluster.bench", "lora", "--small", "--steps", "3", "--link-steps", "2", "--link", link,
                   "--layers", "1", "--block", "32", "--batch-size", "1", "--eval-samples", "4", "--conversations", "40",
                   "--keep", str(tmp_path / "work"), "--out", str(tmp_path), timeout=600)
    out = json.loads((tmp_path / "bench-lora.json").read_text())
    assert set(out["ratios"]) >= {"bytes_per_step", "peak_rss_lora", "peak_rss_lora_int8", "steps_per_s",
                                  "eval_loss"}
    assert set(out["goals"]) == {"bytes_per_step", "peak_rss_lora", "peak_rss_lora_int8", "steps_per_s"}
    assert 0 < out["ratios"]["bytes_per_step"] < 0.05, out["ratios"]
    full, lora = out["arms"]["full"], out["arms"]["lora"]
    # a ring of 2 sends each node's half of the flat buffer and receives the other: M bytes of float32 per step
    assert 4 * full["trainable_params"] <= full["bytes_per_step"] < 1.05 * 4 * full["trainable_params"]
    assert 4 * lora["trainable_params"] <= lora["bytes_per_step"] < 1.2 * 4 * lora["trainable_params"]
    assert lora["params"] > full["params"] and lora["trainable_params"] < full["params"] / 100
    assert all(a["eval_loss"] > 0 and a["peak_rss_mb"] > 100 for a in out["arms"].values())
    assert "| peak RSS per node (MB) |" in proc.stdout and "<= 0.02: met" in proc.stdout
    assert (tmp_path / "work" / "lora" / "adapter" / "adapter_config.json").is_file()
    if reason:
        assert out["link"].startswith("unshaped")
        pytest.skip(f"ran unshaped, the shaped-link phase is not covered here: {reason}")
    assert out["link"] == "1gbit shaped"


def test_an_lm_is_evaluated_in_batches_whose_logits_fit_the_budget():
    """Rows x tokens x vocab logits are evaluated a few rows at a time, to the loss of one batch."""
    torch.manual_seed(0)
    model = build_causal_lm("llama", vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=64)
    x = torch.randint(0, 300, (10, 16))
    y = torch.where(torch.rand(10, 16) < 0.3, torch.full_like(x, -100), torch.randint(0, 300, (10, 16)))
    whole = evaluate(model, x, y, "lm", torch.device("cpu"), logits_budget=10**9)["eval_loss"]
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    chunked = evaluate(model, x, y, "lm", torch.device("cpu"), logits_budget=3 * 16 * 300)["eval_loss"]
    assert seen == [1, 3, 3, 3]  # the first row sizes the rest: 3 rows' logits fit
    assert abs(chunked - whole) < 1e-5, (chunked, whole)
