"""``python -m smolcluster.node``: the agent; ``python -m smolcluster.node pair CODE``: confirm a pairing.

    python -m smolcluster.node [--port 5660] [--state-dir ~/.smolcluster/node]
    python -m smolcluster.node pair 123456 [--state-dir ~/.smolcluster/node]          # on the agent's machine
    python -m smolcluster.node pair 123456 --state-dir ~/.smolcluster/coordinator     # on the coordinator's
    python -m smolcluster.node forget      # unpair every coordinator
    python -m smolcluster.node run --help  # the agent's options
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from smolcluster.launch.cli import command

DEFAULT_STATE = Path("~/.smolcluster/node")


COMMANDS = ("run", "pair", "forget")
FLAGS = ("--no-mdns", "-h", "--help")  # the options that take no value


def _command_first(argv: list[str]) -> list[str]:
    """``run`` is the default command, and options may come before the command: move it to the front."""
    for i, a in enumerate(argv):
        takes_value = i > 0 and argv[i - 1].startswith("-") and "=" not in argv[i - 1] and argv[i - 1] not in FLAGS
        if not a.startswith("-") and not takes_value:
            return [a, *argv[:i], *argv[i + 1:]] if a in COMMANDS else argv
    return argv if any(a in ("-h", "--help") for a in argv) else ["run", *argv]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smolcluster.node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", metavar="{run,pair,forget}")
    state_help = ("this agent's key pair, paired coordinators and run files (default ~/.smolcluster/node); "
                  "pair: a coordinator's is its cluster.state_dir/coordinator")
    run = commands.add_parser("run", help="the agent (the default command)")
    pair = commands.add_parser("pair", help="confirm the pairing code a coordinator or agent shows",
                               description="Confirm a pairing: run where the code should be accepted.")
    pair.add_argument("code", help="the 6-digit code the coordinator (or agent) shows")
    forget = commands.add_parser("forget", help="unpair every coordinator")
    for sub in (run, pair, forget):
        sub.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help=state_help)
    run.add_argument("--port", type=int, default=5660, help="control port (CURVE); port+1 answers public facts")
    run.add_argument("--bind", default="0.0.0.0", help="listen address (default every interface)")
    run.add_argument("--name", default=None, help="this node's name (default: SMOLCLUSTER_NODE or the host name)")
    run.add_argument("--advertise", default=None, help="the address to advertise on mDNS (default: --bind's, or every IPv4 one)")
    run.add_argument("--no-mdns", dest="mdns", action="store_false", help="do not advertise (static peers only)")
    run.add_argument("--owner-timeout", type=float, default=15.0,
                     help="stop a coordinator's roles after it has been silent this many seconds")
    run.add_argument("--weights-cache-gb", type=float, default=None,
                     help="most disk the weights heads send may take (default: the disk, less 64 MB); least "
                          "recently used models' weights are deleted first")
    run.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)  # tests: written once listening
    # tests: after the first weights chunk, hold the next acknowledgement until this file exists (at most 30 s),
    # so a transfer is seen part-sent as a state, not caught in a moment (tests/test_weights_top.py)
    run.add_argument("--hold-weights-until", default=None, help=argparse.SUPPRESS)
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_command_first(list(sys.argv[1:] if argv is None else argv)))
    state = args.state_dir.expanduser()
    if args.command == "pair":
        if not (args.code.isdigit() and len(args.code) == 6):
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
    from smolcluster.node.agent import run_agent

    return run_agent(args)  # a port in use: one line (@command)


if __name__ == "__main__":
    from smolcluster.launch.supervisor import exit_without_teardown

    exit_without_teardown(main())  # 0, 2 or 130 (SIGTERM): each after the agent has unwound
