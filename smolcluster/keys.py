"""``python -m smolcluster.keys --dir keys/ --workers N``: CURVE key pairs for a cluster, one client pair per worker.

CURVE is ZeroMQ's public-key authentication and encryption. This writes

    DIR/server.key, DIR/server.key_secret      the server's pair (the node that binds)
    DIR/client.key, DIR/client.key_secret      worker rank 0's pair (and other connecting nodes')
    DIR/clientN.key, DIR/clientN.key_secret    worker rank N's pair
    DIR/authorized/*.key                       the client public keys the server lets in

Secret files are 0600 and the directories 0700. The parameter server lets rank N register only with
``authorized/clientN.key`` (rank 0: ``client.key``), so one worker's key cannot claim another's rank; a worker
uses ``clientN.key_secret`` when it has it, else ``client.key_secret``. One client key shared by several
workers is accepted only on loopback. Set ``cluster.keys=DIR`` on every node to switch CURVE on. Key
generation lives in :func:`smolcluster.transport.make_keys` (only the transport package touches zmq).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smolcluster.launch.cli import command
from smolcluster.transport import make_keys


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="keys", help="where to write the keys (default: keys/)")
    p.add_argument("--workers", "--clients", type=int, default=2, dest="workers",
                   help="client key pairs to make, one per worker rank (default 2, as conf/cluster/local.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    args = p.parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    d = Path(args.dir)
    if (d / "server.key_secret").exists() and not args.force:
        print(f"error: {d}/server.key_secret exists; pass --force to replace the cluster's keys "
              "(every node then needs the new ones)", file=sys.stderr)
        return 2
    made = make_keys(d, clients=args.workers)
    clients = sorted((k.removesuffix("_secret") for k in made if k.startswith("client")),
                     key=lambda n: int(n.removeprefix("client") or 0))
    print(f"CURVE keys written to {d}/ ({len(clients)} client pair(s), one per worker rank). On a real cluster,")
    print(f"with the same path {d}/ on every node and cluster.keys={d}:")
    print(f"  node that binds (parameter server; pipeline stages' inboxes): {d}/server.key_secret, "
          f"{d}/server.key, {d}/authorized/   -- the secret stays on this node")
    print(f"  worker rank N: {d}/server.key and its own pair only (give no node another's secret):")
    for rank, name in enumerate(clients):
        print(f"    rank {rank}: {d}/{name}.key_secret")
    print(f"  drop a worker's public key from {d}/authorized/ (and restart the server) to lock it out.")
    print("A node that both binds and connects (a pipeline stage) needs both sets.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
