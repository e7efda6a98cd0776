"""The child-process supervisor: what every process that starts others shares.

- :class:`Children`: child processes in their own process groups, their output relayed line by
  line with a ``[name]`` prefix; the first to fail stops the rest (:class:`PeerError` naming it).
  Used by the star launcher (``launch_local``), ``algo=mp`` / ``algo=allreduce`` launches and
  inference's local stages.
- :func:`stop_process_groups`: SIGTERM, a grace period, then SIGKILL (the agent's roles too).
- :func:`child_overrides`: the user's Hydra overrides, to hand on to children.
- :func:`sigterm_as_interrupt`: SIGTERM unwinds like Ctrl-C, so children are stopped.
- :func:`exit_without_teardown`: a process that ended cleanly exits without freeing its modules.

Python's default SIGTERM ends the process on the spot: no ``finally`` runs, and child
processes (a chat's stages, a launcher's workers) are left to notice on their own that
their parent is gone, which takes their liveness timeout. Raising KeyboardInterrupt
instead runs the same clean-up path as Ctrl-C: children stopped and waited for, run
files closed.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from smolcluster.errors import PeerError

# Overrides a launcher sets for each child itself (a user's value would clash with them).
_PER_CHILD_KEYS = ("role=", "rank=", "cluster.port=", "run_id=", "++run_id=", "+run_id=", "hydra.run.dir=",
                   "hydra.output_subdir=", "train.progress=")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread (a no-op off the main thread).

    uvicorn captures SIGTERM while it serves and re-raises it once it has shut down, so a
    web server's process reaches its ``finally`` blocks too.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def exit_without_teardown(code: int = 0) -> None:
    """End a process whose work has unwound (done, or stopped cleanly) as Python's exit would, minus the interpreter's
    teardown: freeing torch's and transformers' modules is a large share of a short process's CPU (``python -c
    "import torch"`` against the same ending in ``os._exit(0)``), and whoever started the process (a launcher,
    a test) waits for its exit.

    What the normal exit does first still runs: non-daemon threads are joined (``threading._shutdown``, which
    also stops idle executor threads), then the atexit hooks (W&B's among them); sockets closed with a linger
    get it, loguru's sinks are closed (their files flushed) and stdout/stderr flushed, since ``os._exit``
    flushes no buffer."""
    from loguru import logger

    threading._shutdown()  # private, but the very call Py_Finalize makes here; no public equivalent exists
    atexit._run_exitfuncs()
    if "zmq" in sys.modules:  # a last message closed with a linger (a server's stop, a ring's chunk) still leaves
        from smolcluster.transport.sockets import let_lingering_leave

        let_lingering_leave()
    logger.remove()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader has gone (a closed pipe): nothing left to say to it
            pass
    os._exit(code)


def child_overrides() -> list[str]:
    """The user's command-line overrides, minus the ones the launcher sets per child."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):  # not under Hydra (tests calling a launcher directly)
        task = []
    return [o for o in task if not o.startswith(_PER_CHILD_KEYS)]


def stop_process_groups(procs: Iterable[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every live process's group, wait up to ``grace_s`` in all, then SIGKILL what is left."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


class Children:
    """Child processes started in their own process groups, output relayed line by line with a prefix."""

    def __init__(self, log_path: Path | None = None):
        self.procs: dict[str, subprocess.Popen] = {}
        self.relays: list[threading.Thread] = []  # joined at stop: a child's last lines are copied before we end
        self.log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    def start(self, name: str, cmd: list[str], env: dict, cwd: str | None = None) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=cwd, start_new_session=True)
        self.procs[name] = p
        relay = threading.Thread(target=self._relay, args=(p, f"[{name}]"), daemon=True)
        relay.start()
        self.relays.append(relay)
        return p

    def _relay(self, proc: subprocess.Popen, prefix: str) -> None:
        for line in iter(proc.stdout.readline, ""):
            if self.log is not None:
                self.log.write(f"{prefix} {line}")
            else:
                sys.stderr.write(f"{prefix} {line}")
        proc.stdout.close()

    def failed(self) -> tuple[str, int] | None:
        for name, p in self.procs.items():
            code = p.poll()
            if code is not None and code != 0:
                return name, code
        return None

    def wait_all(self, until: str | None = None, poll_s: float = 0.1) -> None:
        """Until every child (or just ``until``) has exited cleanly; the first to fail raises PeerError
        (the rest are stopped)."""
        while True:
            failed = self.failed()
            if failed:
                name, code = failed
                self.stop()
                raise PeerError(f"{name} exited with code {code}; stopped the others (its log is above)")
            done = [self.procs[until]] if until is not None else self.procs.values()
            if all(p.poll() == 0 for p in done):
                return
            time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0, exit_first_s: float = 0.0) -> None:
        """Give the children ``exit_first_s`` to exit by themselves, then SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + exit_first_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.05)
        stop_process_groups(self.procs.values(), grace_s)
        deadline = time.monotonic() + 5.0  # (a grandchild still holding a pipe open: bounded)
        for relay in self.relays:
            relay.join(max(0.0, deadline - time.monotonic()))
        if self.log is not None:
            self.log.close()
            self.log = None
