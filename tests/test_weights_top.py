"""``smolcluster.top`` while weights travel: the head's /metrics (telemetry/weights.py) has a line per stage.

Real agents on loopback, a real ``infer cluster=auto cluster.weights=send`` head with
``logging.prometheus.port=0``: top finds the head's weights endpoint in the run directory. Mid-transfer is a
state, not a moment: each agent holds its second chunk's acknowledgement (the agent's test knob
``--hold-weights-until``) until top has shown both stages part-sent; that snapshot is kept and rendered. A
second run with the same weights shows ``cached: 0 bytes sent`` for each stage.
"""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

from smolcluster.top import ClusterView, rich_tables
from tests import test_node_agent
from tests.test_node_agent import Proc, agents, prepare

procs = test_node_agent.procs  # the fixture: every process a test starts is stopped after it


def rendered(nodes) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    for table in rich_tables(nodes):
        console.print(table)
    return console.file.getvalue()


def watch(c: Proc, run_dir: Path, until, on_line=None) -> tuple[object, str]:
    """Poll top's view of ``run_dir`` while the head runs, until ``until(lines)`` holds for the weights
    endpoint's ``{(stage, peer): gauges}``; ``on_line(node)`` sees every poll first. (node, its table)."""
    view = ClusterView(run_dir=run_dir)
    deadline = time.monotonic() + 180  # a hung head fails here, with its output, not at the suite's timeout
    try:
        while c.p.poll() is None:
            assert time.monotonic() < deadline, f"top saw no end of the transfer in 180 s:\n{c.text()[-4000:]}"
            node = next((n for n in view.poll() if n.weights and n.up), None)
            if node is None:
                time.sleep(0.01)
                continue
            if on_line is not None:
                on_line(view, node)
            if until(node.values.get("weights", {})):
                return node, rendered([node])
        raise AssertionError(f"the head ended before top saw it:\n{c.text()[-4000:]}")
    finally:
        view.close()


def test_top_shows_a_line_per_stage_while_weights_travel_then_cached_on_a_second_run(tmp_path, procs):
    from smolcluster.bench.common import write_tiny_run

    # ~50 MB of blocks (n_embd=512): each agent's share takes long enough on loopback for top to see it part-sent
    d = write_tiny_run(tmp_path / "model", 64, vocab=500, n_layer=4, n_embd=512)
    gate = tmp_path / "seen-part-sent"  # each agent holds its second chunk's acknowledgement until this exists
    spec = {name: [*extra, "--hold-weights-until", str(gate)] for name, extra in prepare(tmp_path, ["a", "b"]).items()}
    started = agents(tmp_path, spec, procs)
    peers = ",".join(f"127.0.0.1:{port}" for _, port in started.values())

    def infer(run_dir: Path) -> Proc:
        c = Proc([sys.executable, "-u", "-m", "smolcluster.infer", "cluster=auto", f"cluster.peers=[{peers}]",
                  f"cluster.state_dir={tmp_path / 'coord'}", "cluster.mdns=false", f"checkpoint={d}",
                  "prompt=class Foo", "max_new_tokens=4", "stop_at_eos=false", "cluster.heartbeat_s=0.2",
                  "cluster.weights=send", "logging.prometheus.port=0", f"logging.run_dir={run_dir}"])
        procs.append(c)
        return c

    mid: dict = {}

    def keep_mid_transfer(view: ClusterView, node) -> None:
        # each poll is a new snapshot (node.values is replaced, not updated): the first part-sent one is kept
        lines = node.values.get("weights", {})
        if mid or len(lines) < 2 or not all(0 < w.get("done", 0) < w.get("need", 0) for w in lines.values()):
            return
        mid.update(lines=lines, table=rendered([node]))
        gate.touch()  # seen: the agents go on

    c = infer(tmp_path / "first")
    node, table = watch(c, tmp_path / "first", lambda lines: len(lines) == 2 and all(
        w["need"] > 0 and w["done"] == w["need"] for w in lines.values()), keep_mid_transfer)
    assert mid, "top never saw a stage part-sent"
    assert sorted(stage for stage, _ in mid["lines"]) == ["0", "1"]
    assert {peer.split()[0] for _, peer in mid["lines"]} == {"a", "b"}
    part = [w for w in mid["lines"].values() if 0 < w["done"] < w["need"]]
    assert part and all(w["rate"] > 0 for w in part)
    # the rendered line of a part-sent stage: sending, done/total MB, MB/s, seconds left
    assert re.search(r"sending\s.*\s\d+\.\d/\d+\.\d MB\s.*\d+\.\d\s.*\d+s", mid["table"]), mid["table"]
    assert "smolcluster weights" in mid["table"]
    assert c.wait(timeout=180) == 0, c.text()[-4000:]
    sent = int(re.search(r"weights: sent (\d+) bytes in all", c.text()).group(1))
    final = node.values["weights"]
    assert sum(w["done"] for w in final.values()) == sent > 40 * 2**20  # the gauges: every byte the head sent
    assert all(w["total"] == w["need"] for w in final.values())  # (empty caches: each stage needed all of it)
    assert table.count(" done ") == 2 and "sending" not in table, table

    c = infer(tmp_path / "second")  # the same weights again: each agent holds its share
    node, table = watch(c, tmp_path / "second", lambda lines: len(lines) == 2)
    assert all(w["need"] == w["done"] == 0 < w["total"] for w in node.values["weights"].values())
    assert table.count("cached: 0 bytes sent") == 2, table
    assert c.wait(timeout=180) == 0, c.text()[-4000:]
    assert "weights: sent 0 bytes in all" in c.text()


def test_the_live_view_has_a_weights_table_and_no_training_table_for_a_head_sending_weights(tmp_path):
    """The Textual app (not only ``--once``'s tables): the head's weights endpoint, scraped over HTTP, is a
    line per stage in its own table; the training table stays hidden."""
    import asyncio

    from smolcluster.telemetry.weights import WeightsMetrics
    from smolcluster.top import make_app
    from tests.test_top import settled

    watch = WeightsMetrics({"run_id": "w", "node": "laptop", "algo": "chat"}, tmp_path)
    try:
        for done in (0, 50 * 2**20):  # as weightsend.stream does: at the start, then per acknowledged chunk
            watch.show("0", "a (10.0.0.2:7000)", total=300 * 2**20, need=200 * 2**20, done=done)
        watch.show("1,2", "b (10.0.0.3:7000)", total=100 * 2**20, need=0, done=0)

        async def drive() -> list:
            app = make_app(ClusterView(run_dir=tmp_path), interval_s=0.2)
            async with app.run_test(size=(160, 40)) as pilot:
                table = await settled(app, pilot, "#weights", 2, 2)
                assert not app.query_one("#nodes").display and not app.query_one("#stages").display
                return [table.get_row_at(i) for i in range(table.row_count)]

        rows = asyncio.run(drive())
    finally:
        watch.close()
    assert [r[:4] for r in rows] == [["0", "a (10.0.0.2:7000)", "sending", "50.0/200.0 MB"],
                                     ["1,2", "b (10.0.0.3:7000)", "cached: 0 bytes sent", "100.0 MB held there"]]
    assert float(rows[0][4]) > 0 and rows[0][5].endswith("s") and rows[1][4:] == ["-", "-"]
