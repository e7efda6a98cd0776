"""What every process that starts others shares: SIGTERM unwinds like Ctrl-C, so its children are stopped.

Python's default SIGTERM ends the process on the spot: no ``finally`` runs, and child
processes (a chat's stages, a launcher's workers) are left to notice on their own that
their parent is gone, which takes their liveness timeout. Raising KeyboardInterrupt
instead runs the same clean-up path as Ctrl-C: children stopped and waited for, run
files closed.
"""

from __future__ import annotations

import signal
import threading


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread (a no-op off the main thread).

    uvicorn captures SIGTERM while it serves and re-raises it once it has shut down, so a
    web server's process reaches its ``finally`` blocks too.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
