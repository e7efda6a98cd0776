"""``python -m launchers.slurm``: the sbatch script for a multi-node run, and each task's command.

There is no Slurm here, so the test does what the script's ``srun`` line would: it runs the
per-task command once per task, with the variables Slurm sets for a task (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_JOB_ID``) and the host list the script exports (``SMOLCLUSTER_HOSTS``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from tests.conftest import REPO


def slurm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.slurm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def srun_command(script: str) -> list[str]:
    line = next(x for x in script.splitlines() if x.startswith("srun "))
    words = shlex.split(line)
    return words[words.index(sys.executable):]


def test_allreduce_sbatch_script_runs_one_rank_per_task(tmp_path):
    run_dir = tmp_path / "run"
    got = slurm("script", "--cluster", "local", "--run-dir", str(run_dir), "--tasks-per-node", "2",
                "algo=allreduce", "cluster.workers=2", "train.steps=4", "train.log_every=2")
    assert got.returncode == 0, got.stderr
    script = got.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    for line in ("#SBATCH --ntasks=2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                 f"#SBATCH --output={run_dir}/slurm-%j.out"):
        assert line in script.splitlines(), script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script and run_dir.is_dir()
    cmd = srun_command(script)
    # each task as srun would start it: both on one node (127.0.0.1), ranks from SLURM_PROCID
    tasks = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "SLURM_PROCID": str(i), "SLURM_NTASKS": "2", "SLURM_JOB_ID": "77",
                                   "SMOLCLUSTER_HOSTS": "127.0.0.1"}) for i in range(2)]
    outs = [t.communicate(timeout=240)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algo"] == "allreduce" and summary["steps"] == 4
    assert "rank 0/2 on tcp://127.0.0.1:20077" in outs[0] and "rank 1/2 on tcp://127.0.0.1:20078" in outs[1]
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # rank 0 records the config; rank 1 does not overwrite


def test_task_layout_across_nodes_and_its_errors(tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from launchers import slurm as launcher

    run_dir = tmp_path / "run"
    assert launcher.main(["script", "--cluster", "local", "--run-dir", str(run_dir), "algo=mp", "algo.stages=3"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks=3" in script and "#SBATCH --nodes=3" in script
    assert script.rstrip().splitlines()[-1].endswith(f"-m smolcluster.pipeline.merge {run_dir}")
    # stage 2 of 3 on the third node of the allocation (what Slurm and the script set for that task)
    for key, value in {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "5",
                       "SMOLCLUSTER_HOSTS": "n1,n2,n3"}.items():
        monkeypatch.setenv(key, value)
    args = ["task", "--cluster", "local", "--run-dir", str(run_dir), "algo=mp", "algo.stages=3"]
    argv = launcher.task_command(argparse.Namespace(
        cluster="local", run_dir=str(run_dir), tasks_per_node=1, overrides=["algo=mp", "algo.stages=3"]))
    assert argv[-5:] == ["run_id=slurm-5", f"hydra.run.dir={run_dir}", "train.progress=false", "role=stage", "rank=2"]
    cluster = OmegaConf.load(run_dir / ".launch" / "cluster" / "slurm-5-2.yaml")
    # every stage's host from the allocation; peers on other nodes connect in, so it binds 0.0.0.0
    assert cluster.host == "n1" and [n.host for n in cluster.nodes] == ["n1", "n2", "n3"]
    assert cluster.bind == "0.0.0.0" and cluster.port == 20005
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert launcher.main(args) == 2
    assert capsys.readouterr().err.strip() == ("error: the job step has 2 tasks but algo=mp needs 3 (stage 0, stage 1, "
                                               "stage 2): regenerate the script for this config")
