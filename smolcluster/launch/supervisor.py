"""The supervisor: one interface for every process that starts and watches others.

:class:`Supervisor` is what every backend shares: roles started by name, their output relayed line by line
with a ``[name]`` prefix, :meth:`Supervisor.wait` until a state is reached (the first role to fail raises a
:class:`PeerError` naming it), and leaving its ``with`` block stops every role still running, whether it is left
by a return, an error, Ctrl-C or SIGTERM (which unwinds like Ctrl-C inside the block). Backends:

- :class:`Children` (local): child processes in their own process groups on this machine. Used by the
  star and ring launchers (:mod:`smolcluster.launch.local`) and inference's local stages.
- ``launchers/ssh.py`` ``Launch`` (SSH): one ``launchers/remote.py`` ``RemoteRole`` per host.
- ``node/coordinator.py`` ``Run`` (agent): roles a paired node agent started, their state and output over its
  control link (the agent's side, ``node/agent.py``, runs its roles as local process groups, stopped with
  :func:`stop_process_groups`).

Also here: :func:`stop_process_groups` (SIGTERM, a grace period, then SIGKILL), :func:`sigterm_as_interrupt`
and :func:`exit_without_teardown`.

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
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

from smolcluster.errors import PeerError


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


def signal_group(p: subprocess.Popen, sig: int) -> None:
    """``sig`` to the process group ``p`` leads (each role does: its children go with it), while ``p`` runs."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass


def stop_process_groups(procs: Iterable[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every live process's group, wait up to ``grace_s`` in all, then SIGKILL what is left."""
    procs = list(procs)
    for p in procs:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(p, signal.SIGKILL)
            p.wait(timeout=5)


class Supervisor(ABC):
    """Roles started by one process, watched until a state; what every backend implements.

    A backend says which role failed (:meth:`failed`, one line naming it, or raising its own error), how to
    stop every role (:meth:`stop`) and, if it must, what to do on every poll (:meth:`tick`: an agent link's
    messages). ``with supervisor:`` makes SIGTERM unwind like Ctrl-C and stops every role on the way out.
    """

    @abstractmethod
    def failed(self) -> str | None:
        """Why the first role that failed failed (one line naming it); None while none has."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every role still running."""

    def tick(self) -> None:  # noqa: B027  (optional: most backends have nothing to do per poll)
        """Work done on every poll of :meth:`wait` (e.g. take a control link's messages)."""

    def wait(self, until: Callable[[], bool], poll_s: float = 0.1) -> None:
        """Until ``until()`` holds; the first role to fail raises PeerError (checked first, on every poll)."""
        while True:
            self.tick()
            why = self.failed()
            if why is not None:
                raise PeerError(why)
            if until():
                return
            time.sleep(poll_s)

    def __enter__(self):
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        sigterm_as_interrupt()  # SIGTERM unwinds like Ctrl-C: through __exit__, which stops every role
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if threading.current_thread() is threading.main_thread() and self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)


class Children(Supervisor):
    """The local backend: child processes in their own process groups, output relayed line by line with a prefix."""

    def __init__(self, log_path: Path | None = None):
        self.procs: dict[str, subprocess.Popen] = {}
        self.relays: list[threading.Thread] = []  # joined at stop: a child's last lines are copied before we end
        self.log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    def start(self, name: str, cmd: list[str], env: dict, cwd: str | None = None,
              on_line: Callable[[str], None] | None = None, preexec_fn=None) -> subprocess.Popen:
        """Start ``name``; each line it prints goes to ``on_line`` (default: here, as ``[name] line``)."""
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=cwd, start_new_session=True, preexec_fn=preexec_fn)
        self.procs[name] = p
        self.relays = [r for r in self.relays if r.is_alive()]  # (a node agent starts roles for as long as it runs)
        relay = threading.Thread(target=self._relay, args=(p, on_line or self._printer(f"[{name}]")), daemon=True)
        relay.start()
        self.relays.append(relay)
        return p

    def _printer(self, prefix: str) -> Callable[[str], None]:
        return lambda line: (self.log or sys.stderr).write(f"{prefix} {line}")

    @staticmethod
    def _relay(proc: subprocess.Popen, on_line: Callable[[str], None]) -> None:
        for line in iter(proc.stdout.readline, ""):
            on_line(line)
        proc.stdout.close()

    def failed(self) -> str | None:
        for name, p in self.procs.items():
            code = p.poll()
            if code is not None and code != 0:
                return f"{name} exited with code {code}"
        return None

    def wait_all(self, until: str | None = None, poll_s: float = 0.1) -> None:
        """Until every child (or just ``until``) has exited cleanly; the first to fail raises PeerError
        (the rest are stopped)."""
        done = [self.procs[until]] if until is not None else list(self.procs.values())
        try:
            self.wait(lambda: all(p.poll() == 0 for p in done), poll_s)
        except PeerError as e:
            self.stop()
            raise PeerError(f"{e}; stopped the others (its log is above)") from None

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
