"""``python -m smolcluster.keys --dir keys/ [--clients N]``: CURVE key pairs for a cluster.

CURVE is ZeroMQ's public-key authentication and encryption. This writes

    DIR/server.key, DIR/server.key_secret      the server's pair (the node that binds)
    DIR/client.key, DIR/client.key_secret      a client pair (nodes that connect)
    DIR/clientN.key, DIR/clientN.key_secret    more client pairs, with --clients N+1
    DIR/authorized/*.key                       the client public keys the server lets in

and prints which files each node needs. Set ``cluster.keys=DIR`` on every node to switch
CURVE on. Key generation lives in :func:`smolcluster.transport.make_keys` (only the
transport package touches zmq); this is a thin command line around it.
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
    p.add_argument("--clients", type=int, default=1,
                   help="client key pairs to make (default 1, shared by all connecting nodes)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    args = p.parse_args(argv)
    if args.clients < 1:
        print("error: --clients must be at least 1", file=sys.stderr)
        return 2
    d = Path(args.dir)
    if (d / "server.key_secret").exists() and not args.force:
        print(f"error: {d}/server.key_secret exists; pass --force to replace the cluster's keys "
              "(every node then needs the new ones)", file=sys.stderr)
        return 2
    made = make_keys(d, clients=args.clients)
    clients = sorted(k.removesuffix("_secret") for k in made if k.startswith("client"))
    print(f"CURVE keys written to {d}/ ({len(clients)} client pair(s)). On a real cluster, with the same")
    print(f"path {d}/ on every node and cluster.keys={d}:")
    print(f"  node that binds (parameter server; pipeline stages' inboxes): {d}/server.key_secret, "
          f"{d}/server.key, {d}/authorized/   -- the secret stays on this node")
    if len(clients) == 1:
        print(f"  every node that connects (workers, pipeline head/stages): {d}/server.key, "
              f"{d}/client.key_secret")
    else:
        print(f"  node that connects, one pair each: {d}/server.key + its own pair renamed to "
              f"{d}/client.key_secret:")
        for name in clients:
            note = "   (already so named)" if name == "client" else ""
            print(f"    {d}/{name}.key_secret -> {d}/client.key_secret{note}")
        print(f"  drop a node's public key from {d}/authorized/ (and restart the server) to lock it out.")
    print("A node that both binds and connects (a pipeline stage) needs both sets.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
