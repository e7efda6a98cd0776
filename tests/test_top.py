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


async def settled(app, pilot, table_id: str, rows: int, polls: int):
    """The app's table once it shows ``rows`` rows after at least ``polls`` polls (or after 30 s: the caller's
    asserts then say what it shows)."""
    table = app.query_one(table_id)
    for _ in range(300):
        await pilot.pause(0.1)
        if table.row_count == rows and app.polls >= polls:
            break
    return table


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
                table = await settled(app, pilot, "#nodes", 3, 3)
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
    assert "none of the 3 nodes answered" in proc.stderr
    announced = [json.loads(p.read_text()) for p in sorted((run_dir / "endpoints").iterdir())]
    assert sorted(a["role"] + a["rank"] for a in announced) == ["server", "worker0", "worker1"]
    assert all(a["url"].startswith("http://127.0.0.1:") and a["run_id"] == "test" for a in announced)


def test_live_view_of_a_two_stage_inference_pipeline(tmp_path):
    """Both stages and the head in top's inference table: tokens/s > 0 while requests stream, KV back to 0 after."""
    from smolcluster.bench.common import write_tiny_run
    from smolcluster.inference import InferencePipeline
    from smolcluster.serving.sessions import Sessions, Settings
    from smolcluster.telemetry.serving import open_serving_metrics

    model, run_dir = write_tiny_run(tmp_path / "model", n_positions=1024), tmp_path / "serve"
    telemetry = {"prometheus_port": 0, "run_dir": str(run_dir), "run_id": "inf"}
    head = open_serving_metrics(telemetry, {"run_id": "inf", "node": "local", "role": "head", "rank": "",
                                            "algo": "chat"})
    pipe = InferencePipeline.start_local(model, stages=2, n_head=4, kv_cache_mb=64, heartbeat_s=0.2, telemetry=telemetry)
    sessions = Sessions(lambda: pipe, max_active=4, reconnect=False, watch_s=0.1, metrics=head).start()
    try:
        view = ClusterView(run_dir=run_dir)

        def by_role() -> dict[str, object]:
            return {f"{n.labels['role']}{n.labels['rank']}": n for n in view.poll() if n.up}

        assert wait_until(lambda: sorted(by_role()) == ["head", "stage0", "stage1"], 60), view.nodes
        assert all(n.serving for n in by_role().values()) and "kv_bytes" not in by_role()["head"].values
        budget = 64 * 2**20
        assert {k: n.values["kv_budget"] for k, n in by_role().items() if k != "head"} == {"stage0": budget,
                                                                                            "stage1": budget}
        # four answers that run to the context (no EOS): long enough to watch them stream
        gens = [sessions.submit(list(range(1 + i, 9 + i)), user=f"u{i}",
                              settings=Settings(max_new_tokens=1000, stop_at_eos=False)) for i in range(4)]
        streaming = None
        while not any(g.state == "done" for g in gens):
            nodes = by_role()
            if len(nodes) == 3 and all(n.rates.get("tokens", 0) > 0 and n.values["active"] > 0 for n in nodes.values()):
                streaming = {k: (n.rates["tokens"], n.values["active"], n.values.get("kv_bytes")) for k, n in nodes.items()}
                break
        assert streaming is not None, "never saw every node busy with tokens/s > 0 while the requests streamed"
        assert streaming["stage0"][2] > 0 and streaming["stage1"][2] > 0  # their KV caches held
        for g in gens:
            g.cancel()
        assert all(g.wait(30) for g in gens)

        def idle() -> bool:
            nodes = by_role()
            return len(nodes) == 3 and all(n.values["active"] == 0 and n.values.get("kv_bytes", 0) == 0
                                           for n in nodes.values())

        assert wait_until(idle, 30), {k: n.values for k, n in by_role().items()}
        stages = by_role()
        # every token of every answer went through both stages' layers (prompts too), and the head counted
        # those it streamed
        answered = sum(g.completion_tokens for g in gens)
        assert wait_until(lambda: by_role()["head"].values["tokens"] == answered, 10)
        assert stages["stage0"].values["tokens"] >= answered + 4 * 8 - 4

        async def drive() -> list:
            app = make_app(ClusterView(run_dir=run_dir), interval_s=0.2)
            async with app.run_test(size=(160, 40)) as pilot:
                table = await settled(app, pilot, "#stages", 3, 2)
                assert not app.query_one("#nodes").display  # no training table for an inference run
                return [table.get_row_at(i) for i in range(table.row_count)]

        rows = asyncio.run(drive())
        assert sorted(r[1] for r in rows) == ["head", "stage0", "stage1"] and all(r[2] == "up" for r in rows)
        assert all(r[3] == "0" for r in rows)  # nothing active any more
    finally:
        sessions.close()
    proc = run_cli("smolcluster.top", "--run-dir", str(run_dir), "--once", "--interval", "0.1", check=False)
    assert "smolcluster inference" in proc.stdout and "stage1" in proc.stdout and "DOWN" in proc.stdout


def test_inference_configs_name_the_port_and_run_dir_top_reads(tmp_path):
    from hydra import compose, initialize_config_dir

    from smolcluster.inference.settings import infer_settings
    from smolcluster.paths import CONFIG_DIR
    from smolcluster.serving.settings import chat_settings
    from smolcluster.telemetry.prometheus import metrics_port

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        t = chat_settings(compose("chat", ["logging.prometheus.port=9500", f"logging.run_dir={tmp_path}"])).pipeline.telemetry
        assert (t["prometheus_port"], t["run_dir"]) == (9500, str(tmp_path)) and t["run_id"].startswith("r")
        assert infer_settings(compose("infer", [])).pipeline.telemetry == {}  # no port: nothing published
        default = infer_settings(compose("infer", ["logging.prometheus.port=0"])).pipeline.telemetry
        assert default["prometheus_port"] == 0 and "/runs/serve/" in default["run_dir"]
    # the head takes the base, stage i base + 1 + i (as a training server and its workers or stages); 0 stays
    # "any free port"
    assert (metrics_port(9500, None), metrics_port(9500, 0), metrics_port(9500, 1), metrics_port(0, 3)) == \
        (9500, 9501, 9502, 0)


def test_once_on_a_run_without_metrics_says_why_instead_of_an_empty_table(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = run_cli("smolcluster.top", "--run-dir", str(run_dir), "--once", "--interval", "0.01", check=False)
    assert proc.returncode == 1 and proc.stdout.strip() == ""
    assert "logging.prometheus.port=0" in proc.stderr and str(run_dir) in proc.stderr


def test_a_diloco_lora_run_shows_each_nodes_rounds_and_its_adapter_sized_sync(tmp_path):
    """A live diloco LoRA fine-tune of a tiny Llama directory, watched through its nodes' /metrics: every rank shows
    its rounds rising, H inner steps a round, the bytes of its last round (a 2-ring sends each rank the adapters'
    size once a round: only the adapters travel) and its own inner samples/s; the lead shows trainable/all."""
    from smolcluster.data.text import embedded_corpus
    from smolcluster.top import ROUND_COLUMNS, row_of, training_columns
    from tests.test_hf_training import pretrained_dir

    base = pretrained_dir(tmp_path / "base", "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded_corpus()[:20_000])
    run_dir = tmp_path / "run"
    with Cluster(run_dir, "diloco", "logging.prometheus.port=0", "model=llama-tiny", f"model.pretrained={base}",
                 "model.block_size=32", "data=text", f"data.path={corpus}", "train.lora.enabled=true",
                 "train.lora.r=4", "train.batch_size=4", "train.steps=100000", "train.log_every=5",
                 "algo.inner_steps=5", "cluster.nodes=[{delay_s: 0.02},{delay_s: 0.02}]") as c:
        c.worker(0)
        c.worker(1)
        view = ClusterView(run_dir=run_dir)

        def ranks() -> dict:
            return {n.labels["rank"]: n for n in view.poll() if n.up and n.values.get("rounds", 0) >= 2}

        assert wait_until(lambda: sorted(ranks()) == ["0", "1"], 180), c.output("worker0")[-3000:]
        nodes = ranks()
        lead = nodes["0"].values
        trainable, params = lead["trainable_params"], lead["params"]
        assert 0 < trainable < params / 10  # the adapters
        for n in nodes.values():
            v = n.values
            assert v["round_inner_steps"] == 5 and v["inner_samples_per_s"] > 0
            assert 4 * trainable <= v["round_bytes_sent"] < 1.2 * 4 * trainable, (v["round_bytes_sent"], trainable)
        assert training_columns(list(nodes.values()))[-len(ROUND_COLUMNS):] == ROUND_COLUMNS
        row = row_of(nodes["0"], rounds=True)
        assert row[-3] == "5" and f"{trainable:,.0f}/{params:,.0f}" in row[11], row

        async def drive() -> tuple[list, list]:  # the terminal UI adds the round columns once it sees a diloco node
            app = make_app(ClusterView(run_dir=run_dir), interval_s=0.2)
            async with app.run_test(size=(200, 40)) as pilot:
                table = await settled(app, pilot, "#nodes", 2, 2)
                return [str(col.label) for col in table.columns.values()], [table.get_row_at(i) for i in range(2)]

        columns, rows = asyncio.run(drive())
        assert tuple(columns[-len(ROUND_COLUMNS):]) == ROUND_COLUMNS and all(r[-3] == "5" for r in rows), (columns, rows)
