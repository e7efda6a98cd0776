"""``python -m smolcluster.node``: the agent; ``python -m smolcluster.node pair CODE``: confirm a pairing.

    python -m smolcluster.node [--port 5660] [--state-dir ~/.smolcluster/node]
    python -m smolcluster.node pair 123456 [--state-dir ~/.smolcluster/node]          # on the agent's machine
    python -m smolcluster.node pair 123456 --state-dir ~/.smolcluster/coordinator     # on the coordinator's
    python -m smolcluster.node forget      # unpair every coordinator
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEFAULT_STATE = Path("~/.smolcluster/node")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolcluster.node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("run", "pair", "forget"))
    p.add_argument("code", nargs="?", help="pair: the 6-digit code the coordinator shows")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                   help="this agent's key pair, paired coordinators and run files (default ~/.smolcluster/node); "
                   "pair: a coordinator's is its cluster.state_dir/coordinator")
    p.add_argument("--port", type=int, default=5660, help="control port (CURVE); port+1 answers public facts")
    p.add_argument("--bind", default="0.0.0.0", help="listen address (default every interface)")
    p.add_argument("--name", default=None, help="this node's name (default: SMOLCLUSTER_NODE or the host name)")
    p.add_argument("--advertise", default=None, help="the address to advertise on mDNS (default: every IPv4 one)")
    p.add_argument("--no-mdns", dest="mdns", action="store_false", help="do not advertise (static peers only)")
    p.add_argument("--owner-timeout", type=float, default=15.0,
                   help="stop a coordinator's roles after it has been silent this many seconds")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)  # tests: written once listening
    args = p.parse_args(argv)
    state = args.state_dir.expanduser()
    if args.command == "pair":
        if not (args.code and args.code.isdigit() and len(args.code) == 6):
            print("error: pair needs the 6-digit code the coordinator shows: python -m smolcluster.node pair 123456",
                  file=sys.stderr)
            return 2
        from smolcluster.node.pairing import confirm_path, write_private

        path = confirm_path(state, args.code)
        if not path.exists():
            write_private(path, "confirmed\n")
        print(f"confirmed code {args.code}: the agent or coordinator using {state} pairs with the key it showed "
              "that code for (once; an expired code does nothing)")
        return 0
    if args.command == "forget":
        shutil.rmtree(state / "paired", ignore_errors=True)
        print(f"forgot every paired coordinator ({state}/paired/)")
        return 0
    from smolcluster.errors import SmolclusterError
    from smolcluster.node.agent import run_agent

    try:
        return run_agent(args)
    except SmolclusterError as e:  # a port in use: one line, as train/infer print it
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from smolcluster.supervisor import exit_without_teardown

    exit_without_teardown(main())  # 0, 2 or 130 (SIGTERM): each after the agent has unwound
