"""Hydra multirun sweeps: every job runs to its own summary.json, and the sweep table collects them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from smolcluster import sweep
from tests.conftest import run_cli


def _rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "sweep.csv").open() as f:
        return list(csv.DictReader(f))


def test_multirun_of_four_jobs_writes_four_summaries_and_the_table(tmp_path):
    """The issue's own sweep: each job starts its whole cluster (server + worker) on its own port."""
    sweep_dir = tmp_path / "sweep"
    # One worker a job: with two, an edp job (elastic: it starts with the first worker in) could end its 12
    # updates while the second was still starting, and the launcher then gave that one 10 s to exit before
    # stopping it, twice a sweep. Several workers per job are the other tests' business; here, the sweep's.
    run_cli("smolcluster.train", "-m", "algo=syncps,edp", "train.lr=0.01,0.05", "train.steps=12",
            "cluster.workers=1", "train.progress=false", f"hydra.sweep.dir={sweep_dir}", timeout=300)
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert sorted(summaries) == ["0", "1", "2", "3"]

    rows = _rows(sweep_dir)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    # the swept keys are columns; each job's row carries its own values and its own summary figures
    assert {(r["algo"], r["train.lr"]) for r in rows} == {
        ("syncps", "0.01"), ("syncps", "0.05"), ("edp", "0.01"), ("edp", "0.05")}
    for r in rows:
        s = summaries[r["job"]]
        assert r["status"] == "ok"
        assert s["algo"] == r["algo"] and int(r["steps"]) == s["steps"] == 12
        assert sorted(s["workers"]) == ["0"] and s["workers"]["0"]["applied"] == 12  # the job's worker made every step
        assert float(r["final_loss"]) == pytest.approx(s["final_loss"])
        assert float(r["eval_accuracy"]) == pytest.approx(s["eval_accuracy"])
        assert s["config"]["train"]["lr"] == float(r["train.lr"])
    # every job had its own server port; each job ran its own settings: the two lrs end apart, while edp with one
    # worker (every gradient fresh: staleness 0, a full step) makes syncps's very updates
    ports = {json.loads((sweep_dir / r["job"] / "server.json").read_text())["port"] for r in rows}
    assert len(ports) == 4
    loss = {(r["algo"], r["train.lr"]): float(r["final_loss"]) for r in rows}
    assert loss["edp", "0.01"] == pytest.approx(loss["syncps", "0.01"], abs=1e-6)
    assert loss["edp", "0.05"] == pytest.approx(loss["syncps", "0.05"], abs=1e-6)
    assert abs(loss["syncps", "0.01"] - loss["syncps", "0.05"]) > 0.01, loss

    md = (sweep_dir / "sweep.md").read_text()
    assert "4 of 4 jobs finished" in md
    assert md.count("\n| ") == 5  # header + 4 jobs
    assert "| job | algo | train.lr | status |" in md


def test_table_marks_a_job_without_summary(tmp_path):
    """A job that died leaves its overrides but no summary: its row says so, the others stay."""
    for num, lr, summary in (("0", "0.01", {"algo": "local", "steps": 5, "final_loss": 1.5}), ("1", "0.1", None)):
        job = tmp_path / num
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- algo=local\n- train.lr={lr}\n- run_id=x{num}\n")
        if summary:
            (job / "summary.json").write_text(json.dumps(summary))
    md, _ = sweep.write_table(tmp_path)
    rows = _rows(tmp_path)
    assert [(r["job"], r["train.lr"], r["status"]) for r in rows] == [
        ("0", "0.01", "ok"), ("1", "0.1", "no summary.json (failed or still running)")]
    assert "run_id" not in rows[0] and "algo" in rows[0]  # algo is a figure here, not a swept key
    assert rows[0]["final_loss"] == "1.5" and rows[1]["final_loss"] == ""
    assert "1 of 2 jobs finished" in md.read_text()


def _server_port(run_dir: Path) -> int:
    for log in run_dir.glob("node-*server*.log.jsonl"):
        for line in log.read_text().splitlines():
            m = re.search(r"server on tcp://[\d.]+:(\d+)", json.loads(line)["text"])
            if m:
                return int(m.group(1))
    raise AssertionError(f"no server address in the logs of {run_dir}: {sorted(p.name for p in run_dir.iterdir())}")


@pytest.mark.slow
def test_parallel_syncps_jobs_each_run_their_cluster_on_their_own_port(tmp_path):
    """Two syncps jobs at once (submitit's local executor): each starts its server and a worker
    on its own free port, both finish, and the table has both."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    run_cli("smolcluster.train", "-m", "hydra/launcher=parallel", "algo=syncps", "train.steps=6",
            "train.lr=0.01,0.05", "train.progress=false", "cluster.workers=1",
            f"hydra.sweep.dir={sweep_dir}", timeout=280)
    jobs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert all(s["algo"] == "syncps" and s["steps"] == 6 for s in summaries)
    assert all(sorted(s["workers"]) == ["0"] for s in summaries)
    ports = [_server_port(j) for j in jobs]
    assert ports[0] != ports[1]
    assert [r["status"] for r in _rows(sweep_dir)] == ["ok", "ok"]


def test_slurm_launcher_config_composes():
    """`hydra/launcher=slurm` selects submitit's Slurm launcher with our defaults (no Slurm here to submit to)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = run_cli("smolcluster.train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                  "--cfg", "hydra", "--package", "hydra.launcher", timeout=120).stdout
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
    assert "partition: gpu" in out and "tasks_per_node: 1" in out
