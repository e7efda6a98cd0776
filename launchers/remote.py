"""One role on one host: the shell command run over SSH, its prefixed log stream, and stopping it.

The role runs under a small POSIX ``sh`` wrapper on the remote side (:func:`role_script`). It
``cd``s into the node's working dir, writes the files the launcher ships (the cluster file),
starts ``python -m smolcluster.train ...`` in the background and watches the SSH session's
stdin: when the launcher closes it, or the SSH connection dies, the wrapper sends SIGTERM to
the role. So no role outlives its launcher, even without a terminal (no ``ssh -t``) and even
when the network between them goes away.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from launchers.cluster_file import Node, SshSpec

SERVING = ": serving at "  # what an inference stage logs (at INFO) once it takes requests

# Exit codes of the wrapper itself (the role's own codes pass through unchanged).
NO_WORKDIR, CANNOT_WRITE, NO_PYTHON, SSH_FAILED = 97, 98, 127, 255

_print_lock = threading.Lock()


def echo(line: str) -> None:
    """Write one whole line to stdout (lines of different nodes never interleave mid-line)."""
    with _print_lock:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()


def sh_path(path: str) -> str:
    """Quote a path for ``sh``, keeping a leading ``~`` meaning the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def ssh_argv(spec: SshSpec, remote_command: str) -> list[str]:
    """``ssh`` with non-interactive options: a missing key or host fails at once instead of prompting."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            # a dead network ends the session in ~15 s, so the launcher notices and the remote
            # wrapper (its stdin closed by sshd) stops the role
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if spec.port:
        argv += ["-p", str(spec.port)]
    if spec.identity:
        argv += ["-i", str(Path(spec.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
    if spec.user:
        argv += ["-l", spec.user]
    for opt in spec.options:
        argv += ["-o", str(opt)]
    return [*argv, spec.host, remote_command]


def host_command(spec: SshSpec, script: str) -> list[str]:
    """The local argv that runs a ``sh`` script on the node (over SSH, or here when ``ssh.local``)."""
    if spec.local:
        return ["sh", "-c", script]
    # sh -c: the user's login shell may be zsh or fish; the script is POSIX sh either way
    return ssh_argv(spec, "sh -c " + shlex.quote(script))


def _fail(message: str, code: int) -> str:
    return f"{{ echo {shlex.quote('smolcluster-launch: ' + message)}; exit {code}; }}"


def _prelude(spec: SshSpec, files: dict[str, str] | None = None) -> list[str]:
    lines = [f"cd {sh_path(spec.workdir)} || " + _fail(f"no directory {spec.workdir}: set ssh.workdir", NO_WORKDIR)]
    for rel, text in (files or {}).items():
        target = shlex.quote(rel)
        lines.append(f"mkdir -p \"$(dirname {target})\" && printf '%s\\n' {shlex.quote(text)} > {target} || "
                     + _fail(f"cannot write {rel} in {spec.workdir}", CANNOT_WRITE))
    lines.append(f"command -v {sh_path(spec.python)} >/dev/null 2>&1 || "
                 + _fail(f"python {spec.python} not found (in {spec.workdir}): set ssh.python", NO_PYTHON))
    return lines


def role_script(spec: SshSpec, node_name: str, args: list[str], files: dict[str, str] | None = None,
                module: str = "smolcluster.train") -> str:
    """The ``sh`` script that runs ``python -u -m MODULE ARGS`` on the node until stdin closes (``MODULE``:
    smolcluster.train for every training role, smolcluster.infer for an inference stage)."""
    env = {"PYTHONUNBUFFERED": "1", "SMOLCLUSTER_NODE": node_name, **spec.env}
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    train = " ".join([sh_path(spec.python), "-u", "-m", module, *map(shlex.quote, args)])
    return "\n".join([
        *_prelude(spec, files),
        "exec 3<&0",  # a background job's stdin is /dev/null in sh: keep the session's stdin as fd 3
        f"env {env_words} {train} </dev/null 2>&1 &",
        "pid=$!",
        # the watchdog: stdin reaches EOF when the launcher closes it or the SSH session ends
        '( cat <&3 >/dev/null 2>&1; kill -TERM "$pid" 2>/dev/null ) >/dev/null 2>&1 &',
        "watchdog=$!",
        "exec 3<&-",
        'wait "$pid"; status=$?',
        'kill "$watchdog" 2>/dev/null',
        'exit "$status"',
    ])


def python_script(spec: SshSpec, code: str, args: list[str] | None = None) -> str:
    """A ``sh`` script that runs a Python snippet with the node's Python in its working dir."""
    words = " ".join(map(shlex.quote, args or []))
    return "\n".join([*_prelude(spec), f"exec {sh_path(spec.python)} -c {shlex.quote(code)} {words}"])


class RemoteRole:
    """A role running on a node: its process (ssh or sh), a relay thread, the log's last lines."""

    def __init__(self, node: Node, args: list[str], files: dict[str, str] | None = None,
                 log_path: Path | None = None, module: str = "smolcluster.train"):
        self.node, self.args, self.files, self.log_path, self.module = node, args, files, log_path, module
        self.proc: subprocess.Popen | None = None
        self.tail: deque[str] = deque(maxlen=60)
        self.serving = threading.Event()  # an inference stage said it serves
        self._relay: threading.Thread | None = None

    @property
    def prefix(self) -> str:
        return f"[{self.node.label}]"

    def command(self) -> list[str]:
        return host_command(self.node.ssh, role_script(self.node.ssh, self.node.name, self.args, self.files,
                                                       self.module))

    def start(self) -> None:
        # a session of its own: Ctrl-C in the launcher's terminal reaches the launcher only,
        # which then stops every role in order
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._relay = threading.Thread(target=self._pump, name=f"relay-{self.node.label}", daemon=True)
        self._relay.start()

    def _pump(self) -> None:
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in iter(self.proc.stdout.readline, ""):
                self.tail.append(line.rstrip("\n"))
                if SERVING in line:
                    self.serving.set()
                echo(f"{self.prefix} {line}")
                if log:
                    log.write(line)
                    log.flush()
        finally:
            self.proc.stdout.close()
            if log:
                log.close()

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self, grace_s: float = 10.0) -> None:
        """Close the session's stdin (the remote watchdog stops the role), then end ssh itself."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                # the session is stuck (e.g. the host vanished): ending ssh ends it on the far side too
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        self.join()

    def join(self, timeout: float = 5.0) -> None:
        if self._relay is not None:
            self._relay.join(timeout)

    def why(self) -> str:
        """One line on why the role ended badly, from its exit code and the last lines it printed."""
        code = self.poll()
        last = [line for line in self.tail if line.strip()]
        error_lines = [line for line in last if "error" in line.lower() or "smolcluster-launch:" in line]
        detail = (error_lines or last or ["(no output)"])[-1].strip()
        if code == SSH_FAILED and not self.node.ssh.local:
            spec = self.node.ssh
            port = f"-p {spec.port} " if spec.port and spec.port != 22 else ""
            user = f"{spec.user}@" if spec.user else ""
            return f"ssh to {spec.target} failed: {detail} (try: ssh {port}{user}{spec.host} true)"
        if code in (NO_WORKDIR, CANNOT_WRITE, NO_PYTHON):
            return detail.replace("smolcluster-launch: ", "")
        if code is not None and code < 0:
            return f"killed by signal {-code}; last output: {detail}"
        return f"exit code {code}: {detail}"
