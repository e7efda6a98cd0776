"""``bench diloco-sim`` at its tiniest (gpt2-tiny, 6 steps, 2 simulated workers): the lone node sets the target,
each config trains through the Outer the ranks run, and the bytes it reports follow from the syncs it made."""

from __future__ import annotations

import json

import pytest

from smolcluster.bench.diloco_sim import main, parse_config


def test_parse_config_defaults_to_the_papers_outer_step():
    assert parse_config("H=25,om=0,w=all,s=0.5") == {"H": 25, "olr": 0.7, "om": 0.0, "lr": None, "w": "all", "s": 0.5}


def test_diloco_sim_reports_each_config(shakespeare, tmp_path):
    main(["--steps", "6", "--eval-every", "3", "--eval-samples", "4", "--workers", "2", "--max-frac", "1",
          "--configs", "w=all;H=3,olr=1,om=0", "--text", str(shakespeare), "--out", str(tmp_path)])
    out = json.loads((tmp_path / "bench-diloco-sim.json").read_text())
    assert [p["step"] for p in out["local"]] == [3, 6]
    assert out["target"] == out["local"][-1]["eval_loss"]
    rows = {r["config"]: r for r in out["rows"]}
    allreduce, diloco = rows["w=all"], rows["H=3,olr=1,om=0"]
    assert allreduce["outer_steps"] == 0
    steps = out["curves"]["H=3,olr=1,om=0"][-1]["step"]  # (6, or 3 where it reached the target there)
    assert diloco["outer_steps"] == steps // 3
    # a ring of 2 sends the float32 model once per sync: every step for allreduce, every 3rd for H=3
    assert diloco["bytes_per_sample"] == pytest.approx(allreduce["bytes_per_sample"] / 3, abs=0.1)
    assert allreduce["bytes_per_sample"] == 1_350_400 * 4 / (8 * 2)  # gpt2-tiny's parameters, batch 8 x 2 workers
    assert (tmp_path / "diloco-sim.png").is_file()
