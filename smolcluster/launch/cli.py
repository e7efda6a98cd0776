"""The one CLI error wrapper every command's ``main`` runs under.

A user's error (:class:`~smolcluster.errors.SmolclusterError`: a bad config, a port in use, a peer that failed)
prints one line, ``error: WHY``, and exits 2; Ctrl-C (or SIGTERM, which :func:`sigterm_as_interrupt` turns into
Ctrl-C) exits 130; anything else is a bug and keeps its traceback (exit 1). Used by train, infer, chat, the
bench CLI, the node agent, the stage server and the SSH and Slurm launchers.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

from smolcluster.errors import SmolclusterError

USER_ERROR, INTERRUPTED = 2, 130


def _said(e: SmolclusterError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return USER_ERROR


@contextmanager
def user_errors(on_error=None, interrupted: str | None = None):
    """Around a Hydra command's work: a SmolclusterError prints one line and exits 2, KeyboardInterrupt exits 130.

    ``on_error(e)``: called after the line is printed (e.g. to log it); it may re-raise to hand the error on
    instead (a Hydra multirun records the failed job). ``interrupted``: a line printed on Ctrl-C.
    """
    try:
        yield
    except SmolclusterError as e:
        code = _said(e)
        if on_error is not None:
            on_error(e)
        sys.exit(code)
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        sys.exit(INTERRUPTED)


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
