"""The one CLI error wrapper every command's ``main`` runs under.

A user's error (:class:`~smolcluster.errors.SmolclusterError`: a bad config, a port in use, a peer that failed)
prints one line, ``error: WHY``, and exits 2; Ctrl-C (or SIGTERM, which :func:`sigterm_as_interrupt` turns into
Ctrl-C) exits 130; anything else is a bug and keeps its traceback (exit 1). Used by train, infer, chat, the
bench CLI, the node agent, the stage server and the SSH and Slurm launchers.
"""

from __future__ import annotations

import functools
import sys
from contextlib import ContextDecorator

from smolcluster.errors import SmolclusterError

USER_ERROR, INTERRUPTED = 2, 130


def _said(e: SmolclusterError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR


class user_errors(ContextDecorator):  # noqa: N801  (used as a decorator, named like one)
    """Around a Hydra command's main (as its decorator, or a ``with`` block): a SmolclusterError prints one line
    and exits 2, KeyboardInterrupt exits 130.

    ``on_error(e)``: called after the line is printed (e.g. to log it); it may re-raise to hand the error on
    instead (a Hydra multirun records the failed job). ``interrupted``: a line printed on Ctrl-C. A class, not
    a generator: a Hydra launcher (submitit) pickles the decorated main.
    """

    def __init__(self, on_error=None, interrupted: str | None = None):
        self.on_error, self.interrupted = on_error, interrupted

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if isinstance(e, SmolclusterError):
            code = _said(e)
            if self.on_error is not None:
                self.on_error(e)
            sys.exit(code)
        if isinstance(e, KeyboardInterrupt):
            if self.interrupted:
                print(self.interrupted, file=sys.stderr)
            sys.exit(INTERRUPTED)
        return False


def command(main):
    """Decorates a ``main(argv) -> int``: a SmolclusterError prints one line and returns 2, KeyboardInterrupt
    returns 130 (returned, not raised: tests call such a main in-process)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except SmolclusterError as e:
            return _said(e)
        except KeyboardInterrupt:
            return INTERRUPTED

    return wrapper
