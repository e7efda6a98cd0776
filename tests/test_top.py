"""smolcluster.top against a live syncps run: the nodes it announces, their steps rising, their log lines."""

import asyncio
import json

import pytest

from smolcluster.top import ClusterView, make_app, parse_targets
from tests.cluster_util import Cluster
from tests.conftest import run_cli, wait_until

pytestmark = pytest.mark.slow


def test_targets_parse_ports_and_ranges():
    assert parse_targets("10.0.0.2:9400-9402, h:9500") == [
        "http://10.0.0.2:9400/metrics", "http://10.0.0.2:9401/metrics", "http://10.0.0.2:9402/metrics",
        "http://h:9500/metrics"]
    with pytest.raises(ValueError, match="host:port"):
        parse_targets("9400")


def _steps(view: ClusterView) -> dict[str, float]:
    return {n.name: n.values.get("step", -1) for n in view.poll() if n.up}


def test_live_view_of_a_syncps_run(tmp_path):
    run_dir = tmp_path / "run"
    # throttled workers (the test knob) keep the run alive while it is watched; ports chosen by the OS
    with Cluster(run_dir, "syncps", "logging.prometheus.port=0", "train.steps=100000", "train.log_every=5",
                 "cluster.nodes=[{delay_s: 0.05},{delay_s: 0.05}]") as c:
        c.server()
        c.worker(0)
        c.worker(1)
        view = ClusterView(run_dir=run_dir)
        assert wait_until(lambda: len(_steps(view)) == 3, 120), c.output("server")[-2000:]
        assert {n.split(" ", 1)[1] for n in _steps(view)} == {"server", "worker0", "worker1"}
        first = _steps(view)
        assert wait_until(lambda: all(v > first[k] for k, v in _steps(view).items()), 60), "steps did not rise"
        server = next(n for n in view.nodes.values() if n.labels["role"] == "server")
        assert server.values["loss"] > 0 and server.values["peers_alive"] == 2
        assert wait_until(lambda: any(" step " in line for line in view.last_logs(server)), 30), view.last_logs(server)

        # the same through the terminal UI, driven by Textual's test pilot
        async def drive() -> tuple[int, list[str], str]:
            app = make_app(ClusterView(run_dir=run_dir), interval_s=0.2)
            async with app.run_test(size=(160, 40)) as pilot:
                table = app.query_one("#nodes")
                for _ in range(300):
                    await pilot.pause(0.1)
                    if table.row_count == 3 and app.polls >= 3:
                        break
                rows = [table.get_row_at(i) for i in range(table.row_count)]
                logs = str(app.query_one("#logs").render())
                (tmp_path / "top.svg").write_text(app.export_screenshot())
                return table.row_count, rows, logs

        count, rows, logs = asyncio.run(drive())
        assert count == 3, rows
        assert {r[1] for r in rows} == {"server", "worker0", "worker1"} and all(r[2] == "up" for r in rows)
        assert all(int(r[3]) > 0 for r in rows) and "worker" in logs

        # a node that dies shows as DOWN, not as a stale healthy row
        c.kill("worker1")
        # (the view lists nodes in the order it first saw them, which is the order they happened to announce)
        def worker1_up():
            return {n.labels["rank"]: n.up for n in view.poll() if n.labels["role"] == "worker"}.get("1")
        assert wait_until(lambda: worker1_up() is False, 30), [(n.name, n.up) for n in view.poll()]

    # --once prints a table naming every announced node, and exits 1 when none answers any more
    proc = run_cli("smolcluster.top", "--run-dir", str(run_dir), "--once", "--interval", "0.1", check=False)
    assert proc.returncode == 1 and "worker0" in proc.stdout and "DOWN" in proc.stdout
    announced = [json.loads(p.read_text()) for p in sorted((run_dir / "endpoints").iterdir())]
    assert sorted(a["role"] + a["rank"] for a in announced) == ["server", "worker0", "worker1"]
    assert all(a["url"].startswith("http://127.0.0.1:") and a["run_id"] == "test" for a in announced)
