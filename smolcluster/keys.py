"""``python -m smolcluster.keys --dir keys/``: CURVE key pairs for a cluster (ZeroMQ's public-key auth + encryption).

Writes ``server.key`` / ``server.key_secret``, ``client.key`` / ``client.key_secret``
(plus ``clientN`` pairs with ``--clients N``) and ``authorized/`` (the client public
keys the server lets in). Set ``cluster.keys=keys/`` on every node to switch CURVE on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smolcluster.transport import make_keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="keys", help="where to write the keys (default: keys/)")
    p.add_argument("--clients", type=int, default=1, help="client key pairs to make (default 1, shared by all workers)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    args = p.parse_args(argv)
    d = Path(args.dir)
    if (d / "server.key_secret").exists() and not args.force:
        print(f"error: {d}/server.key_secret exists; pass --force to replace the cluster's keys", file=sys.stderr)
        return 2
    made = make_keys(d, clients=args.clients)
    print(f"CURVE keys written to {d}/")
    print(f"  server node:  {made['server_secret'].name} + authorized/   (keep the secret key private)")
    print("  worker nodes: client.key_secret + server.key")
    print(f"Copy {d}/ to every node (same path) and add cluster.keys={d} to the command line or cluster file.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
