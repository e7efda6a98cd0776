"""Where each stage lives: its inbox address, device and thread count, from the cluster config.

Stage ``i`` listens on ``cluster.nodes[i].host`` (default ``cluster.host``) at port
``cluster.nodes[i].port`` (default ``cluster.port + i``) and binds ``cluster.bind``
there. A real cluster sets the hosts per node and ``cluster.bind=0.0.0.0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolcluster.errors import ConfigError


@dataclass(frozen=True)
class StageNode:
    rank: int
    host: str
    port: int
    bind_host: str
    device: str | None
    threads: int | None

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def bind(self) -> str:
        return f"tcp://{self.bind_host}:{self.port}"


def stage_nodes(cluster, n_stages: int) -> list[StageNode]:
    """Every stage's node; ``cluster`` is the :class:`~smolcluster.train_settings.ClusterSpec` (training's, or
    inference's ``Pipeline.links``)."""
    out = []
    for rank in range(n_stages):
        node = cluster.node(rank)
        port = node.port
        if port is None:
            if cluster.port is None:
                raise ConfigError("cluster.port is not set: give the first stage's port (cluster.port=5555; "
                                  "stage i listens on port+i) or cluster.nodes[i].port per stage")
            port = int(cluster.port) + rank
        out.append(StageNode(rank, str(node.host or cluster.host), int(port), str(cluster.bind or cluster.host),
                             node.device, node.threads))
    return out
