"""``bench replicas``' own measures, without the Desk (which needs root and netns): a stage step's CPU cost by rows
(the bound on what 2 replicas gain when decoding dominates) and a process's CPU time from /proc."""

from __future__ import annotations

import os
import time

from smolcluster.bench.common import write_tiny_run
from smolcluster.bench.replicas import process_usec, step_cost


def test_step_cost_runs_a_stage_step_of_each_row_count(tmp_path):
    run = write_tiny_run(tmp_path / "run", 64, n_layer=2, n_embd=64)
    cost = step_cost(run, [1, 48], context=16, repeats=5)
    assert set(cost) == {1, 48}
    # 48 requests' attention (one call each per block) and 48x the rows: far dearer than one, whatever the load
    assert 0 < cost[1] < cost[48], cost


def test_process_usec_is_this_processs_cpu_time():
    before, cpu0 = process_usec(str(os.getpid())), time.process_time()
    while time.process_time() - cpu0 < 0.3:  # burn CPU
        sum(range(1000))
    used_us, cpu_us = process_usec(str(os.getpid())) - before, (time.process_time() - cpu0) * 1e6
    assert abs(used_us - cpu_us) < 50_000, (used_us, cpu_us)  # /proc counts clock ticks (10 ms)
    assert process_usec("999999999") == 0  # a process gone: nothing to count
