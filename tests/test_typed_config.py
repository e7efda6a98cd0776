"""The typed objects below the commands: one ClusterSpec for training, inference, the coordinator and the
launchers (its byte limit converted once, a node's settings read by one function), and the launchers' LaunchSpec.
No processes: these are the reads every multi-process test depends on, checked directly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from smolcluster.errors import ConfigError
from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import MB, AutoSpec, ClusterSpec, train_config


def composed(config: str, overrides: list[str]):
    if config == "infer":
        from smolcluster.inference import settings  # noqa: F401  (registers infer's schema)
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(config, overrides=overrides)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml")))
def test_every_cluster_file_reads_back_the_same_from_what_the_launchers_ship(name):
    """The launchers ship ``ClusterSpec.as_file()`` to every node, which reads it with ``ClusterSpec.of``: the
    same settings, the keys no field types (ssh, server) and cluster=auto's kept."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "cluster" / f"{name}.yaml"), resolve=True)
    spec = ClusterSpec.of(raw)
    shipped = spec.as_file()
    assert ClusterSpec.of(shipped) == spec
    assert shipped["max_message_mb"] == raw.get("max_message_mb", 2048)
    assert {k: shipped[k] for k in raw if k not in ("workers",)} == {k: v for k, v in raw.items() if k != "workers"}
    assert (spec.auto is not None) == (name == "auto")


def test_training_and_inference_convert_the_message_limit_once_to_the_same_bytes():
    tc = train_config(composed("config", ["cluster.max_message_mb=3"]))
    from smolcluster.inference.settings import infer_settings

    links = infer_settings(composed("infer", ["cluster.max_message_mb=3"])).pipeline.links
    assert tc.cluster.max_bytes == links.max_bytes == 3 * MB and isinstance(links, ClusterSpec)
    with pytest.raises(ConfigError, match=r"cluster.max_message_mb=0 is invalid"):
        infer_settings(composed("infer", ["cluster.max_message_mb=0"]))


def test_cluster_auto_keys_are_typed_for_the_coordinator():
    tc = train_config(composed("config", ["cluster=auto", "algo=allreduce", "cluster.workers=3",
                                          "cluster.peers=10.0.0.5:5660", "cluster.pair_timeout_s=0"]))
    a = tc.cluster.auto
    assert isinstance(a, AutoSpec) and (a.workers, a.pair_timeout_s, a.discover_s, a.weights) == (3, 0.0, 3.0, "auto")
    from smolcluster.node.discovery import peer_list

    assert peer_list(a.peers) == ["10.0.0.5:5660"]
    with pytest.raises(ConfigError, match=r"cluster.discover_s='soon' is invalid: it must be a number"):
        train_config(composed("config", ["cluster=auto", "cluster.discover_s=soon"]))
    from smolcluster.inference.settings import infer_settings

    assert infer_settings(composed("infer", ["cluster=auto"])).pipeline.links.auto == AutoSpec()
    assert train_config(composed("config", [])).cluster.auto is None


def test_a_nodes_settings_are_read_and_checked_in_one_place():
    c = ClusterSpec(port=5000, nodes=[{"weight": 2, "memory_gb": 0.5, "threads": 2, "port": 7001, "host": "a"},
                                      None, {"precision": "bf16", "gflops": 12.5}])
    first, missing, third, past = c.node(0), c.node(1), c.node(2), c.node(9)
    assert (first.weight, first.memory_gb, first.threads, first.port) == (2.0, 0.5, 2, 7001)
    assert missing == past.__class__(1, "worker1", 0) and past.weight == 1.0 and past.memory_gb is None
    assert (third.precision, third.gflops) == ("bf16", 12.5)
    from smolcluster.launch.nodes import stage_nodes
    from smolcluster.pipeline.partition import node_weights

    assert [n.address for n in stage_nodes(c, 3)] == ["tcp://a:7001", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"]
    assert node_weights(c, 3) == [2.0, 1.0, 1.0]
    for bad, message in [({"weight": 0}, "weight=0 is invalid: it must be a positive number"),
                         ({"weight": None}, "weight=None is invalid"),
                         ({"memory_gb": "lots"}, "memory_gb='lots' is invalid: give a positive number of GB"),
                         ({"threads": 0}, "threads=0 must be a positive integer")]:
        with pytest.raises(ConfigError, match=r"cluster.nodes\[0\]." + message.replace("(", r"\(")):
            ClusterSpec(nodes=[bad]).node(0)


def test_the_launchers_read_one_launch_spec_from_the_composed_config():
    from launchers.cluster_file import cluster_nodes
    from launchers.slurm import lead_task, roles
    from launchers.ssh import compose_config, layout

    spec, stem = compose_config("lan-example", ["algo=mp", "algo.stages=2", "cluster.insecure=true"])
    assert (stem, spec.algo, spec.stages, spec.model) == ("lan-example", "mp", 2, "mlp")
    nodes, lead = layout(spec)
    assert [n.describe() for n in nodes] == ["stage 0 (laptop, smol@192.168.1.11:22)",
                                             "stage 1 (pi, pi@192.168.1.12:22)"] and lead == 1
    assert roles(spec) == [("stage", 0), ("stage", 1)] and lead_task(spec) == 1
    server = layout(compose_config("lan-example", ["algo=syncps", "cluster.insecure=true"])[0])[0][0]
    assert server.describe() == "server (macmini, ada@192.168.1.10:22)"  # the open `server` block, kept
    serving, _ = compose_config("local", ["stages=3"], config="infer")
    assert serving.algo is None and [n.label for n in layout(serving, serving=True)[0]] == ["stage 0", "stage 1",
                                                                                            "stage 2"]
    no_host = compose_config("local", ["algo=syncps", "cluster.host=null"])[0]
    with pytest.raises(ConfigError, match="cluster.host is not set"):
        cluster_nodes(no_host)


def test_the_coordinator_places_and_writes_the_cluster_from_typed_settings(tmp_path: Path):
    from smolcluster.node.coordinator import node_entries, place, write_cluster
    from smolcluster.node.discovery import NodeInfo

    def info(name: str, device: str, gb: float) -> NodeInfo:
        return NodeInfo(name, f"10.0.0.{len(name)}", 5660, "k", "f", "v", 3, device, 4, gb)

    found = [info("big", "cpu", 32.0), info("gpu", "cuda", 8.0), info("small", "cpu", 4.0)]
    server, workers = place(found, AutoSpec())
    assert server.name == "big" and [w.name for w in workers] == ["gpu", "small"]  # accelerators first
    server, workers = place(found, AutoSpec(server="small", workers=3))
    assert server.name == "small" and [w.name for w in workers] == ["gpu", "big", "gpu"]
    with pytest.raises(ConfigError, match="cluster.server=nope is not among the agents found"):
        place(found, AutoSpec(server="nope"))
    c = ClusterSpec.of({"name": "auto", "max_message_mb": 64, "heartbeat_s": 0.5,
                        "nodes": [{"batch_size": 16, "ssh": {"user": "x"}}]})
    assert node_entries(c, workers[:2]) == [{"batch_size": 16, "name": "gpu", "host": "10.0.0.3"},
                                            {"name": "big", "host": "10.0.0.3"}]
    write_cluster(tmp_path / "home.yaml", c, server, workers)
    back = ClusterSpec.of(OmegaConf.to_container(OmegaConf.load(tmp_path / "home.yaml")))
    assert (back.max_bytes, back.heartbeat_s, back.workers, back.rest["server"]["name"]) == (64 * MB, 0.5, 3, "small")


def test_every_algorithm_module_is_an_algo_choice_and_back():
    from smolcluster.algorithms import available
    # a shared module (ps, guard, membership, ...) listed as an algorithm would be offered in errors as a fix
    assert set(available()) == {p.stem for p in (Path(CONFIG_DIR) / "algo").glob("*.yaml")}


def test_a_launcher_ships_the_users_cluster_file_as_written_and_refuses_a_null_worker_count():
    from smolcluster.train_settings import launch_spec
    user = {"nodes": [{"host": "a"}, {"host": "b"}], "keys": None, "insecure": True}
    spec = ClusterSpec.of(user)
    shipped = ClusterSpec.of(dict(user, port=None)).as_file()  # what the launchers write, before the port
    assert "host" not in shipped and "workers" not in shipped and shipped["keys"] is None  # no defaults added
    assert ClusterSpec.of(shipped) == spec
    cfg = OmegaConf.create({"cluster": {**user, "workers": None}, "algo": {"name": "syncps"}, "model": {"name": "m"}})
    with pytest.raises(ConfigError, match=r"cluster.workers=None must be a positive integer"):
        launch_spec(cfg)
