"""``serve --weights send|auto``: each stage's share of the weights travels over SSH into its host's cache.

The same plan as agents get (smolcluster/node/weightsend.py: each stage exactly its tensors, read by byte
range from the model's safetensors files, hashed once and remembered in
``~/.smolcluster/launcher/weight-hashes.json``; config.json with every stage, the tokenizer's files with
stage 0), sent to ``python -m smolcluster.node.weightrecv`` on each host (one SSH session per host and
``ssh.state_dir``), which writes the agent's content-addressed cache there (weightcache.py). So:

1. ask      every host at once what it holds (re-hashed there) and its free disk; with ``auto``, whether
            it reads the launcher's very model files (same paths, sizes, sha256): then nothing is sent and
            its stages read the files as before. A host without room is refused in one line before anything
            is sent anywhere.
2. stream   what is missing, every host at once, resuming a partial entry where it stopped; an entry that
            arrives corrupt is sent again. A bar with MB/s and time left (only on a terminal).
3. build    each stage's model directory of links into the cache on its host; its stage then starts with
            ``checkpoint=`` that directory, as a stage an agent starts does.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from launchers.cluster_file import Node
from launchers.remote import host_command, python_script
from smolcluster.errors import ConfigError, PeerError
from smolcluster.inference.placement import size as human
from smolcluster.node.protocol import CHUNK
from smolcluster.node.weightsend import Entry, HashBook, model_files, plan_stages, say, what_to_send

MODES = ("auto", "send", "shared")  # as cluster.weights for agents (node/coordinator.WEIGHT_MODES)
BOOK = Path("~/.smolcluster/launcher/weight-hashes.json")
RECEIVER = "import sys; from smolcluster.node.weightrecv import main; sys.exit(main())"


@dataclass
class Session:
    """One SSH session to ``python -m smolcluster.node.weightrecv`` on a host, for its stages (``ranks``)."""

    nodes: list[Node]
    ranks: list[int]
    entries: dict[str, Entry] = field(default_factory=dict)
    answers: queue.Queue = field(default_factory=queue.Queue)
    errors: deque = field(default_factory=lambda: deque(maxlen=20))
    proc: subprocess.Popen | None = None
    sent: int = 0
    need: int = 0  # bytes to send (grows when a corrupt entry is sent again)

    def show(self, progress) -> None:
        """This host's figures to ``progress`` (telemetry/weights.WeightsMetrics)."""
        progress.show(",".join(map(str, self.ranks)), self.where, sum(e.size for e in self.entries.values()),
                      self.need, self.sent)

    @property
    def where(self) -> str:
        n = self.nodes[0]
        return f"{n.ssh.target} ({', '.join(x.label for x in self.nodes)}, ssh.state_dir {n.ssh.state_dir})"

    def start(self) -> None:
        spec = self.nodes[0].ssh
        cmd = host_command(spec, python_script(spec, RECEIVER, ["--state-dir", spec.state_dir]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name="weights-answers").start()
        threading.Thread(target=self._errors, daemon=True, name="weights-stderr").start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            self.answers.put(json.loads(line))
        self.answers.put(None)  # the session ended

    def _errors(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self.errors.append(line.decode(errors="replace").rstrip())

    def send(self, fields: dict, data: bytes = b"") -> None:
        try:
            self.proc.stdin.write(json.dumps(fields).encode() + b"\n" + data)
        except (BrokenPipeError, OSError):
            raise self.failure() from None

    def answer(self, timeout_s: float) -> dict:
        """The host's next answer; raises if the session ended, said why it failed, or said nothing in time."""
        try:
            self.proc.stdin.flush()
            got = self.answers.get(timeout=timeout_s)
        except (BrokenPipeError, OSError):
            raise self.failure() from None
        except queue.Empty:
            raise PeerError(f"weights: {self.where} answered nothing within {timeout_s:g}s") from None
        if got is None:
            raise self.failure()
        if "error" in got:
            raise PeerError(f"weights: {self.where} failed: {got['error']}")
        return got

    def failure(self) -> PeerError:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        last = next((e for e in reversed(self.errors) if e.strip()), "(no output)")
        return PeerError(f"weights: the SSH session to {self.where} ended (exit {self.proc.poll()}): {last}")

    def close(self, done: bool = True) -> None:
        """Say goodbye (``done``), or end the session at once (interrupted: a sender thread may be mid-chunk;
        the host keeps what arrived whole, and the next run resumes from there)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if not done:
                raise OSError("interrupted")
            self.send({"op": "bye"})
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (PeerError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)


def send_weights(p, nodes: list[Node], node_entries: list, mode: str, timeout_s: float = 600.0,
                 progress=None) -> list[list[str]]:
    """Per stage, the overrides that point it at its cached weights on its host ([] where it reads the model's
    own files: ``shared``, or ``auto`` and the very files are there). ``progress``: a
    telemetry/weights.WeightsMetrics for ``top``'s lines (a line per host: its stages)."""
    if mode not in MODES:
        raise ConfigError(f"--weights {mode} is not one of {', '.join(MODES)}")
    if mode == "shared":
        return [[] for _ in nodes]
    if not p.checkpoint and not p.model.get("pretrained"):
        if mode == "send":
            raise ConfigError("--weights send needs weights to send: give checkpoint=RUN_DIR or model.pretrained=DIR")
        return [[] for _ in nodes]  # a seeded random init: every stage makes its own
    from smolcluster.inference.from_config import resolve_model

    info, _, _ = resolve_model(p, need_tokenizer=False)
    book = HashBook(BOOK.expanduser())
    BOOK.expanduser().parent.mkdir(parents=True, exist_ok=True)
    plans = plan_stages(p, info, node_entries, book)
    files = model_files(info, book, p.adapters) if mode == "auto" else {}
    sessions: dict[tuple, Session] = {}
    for r, n in enumerate(nodes):  # one session per host and cache: two stages there share their common entries
        s = sessions.setdefault((n.ssh.local, n.ssh.host, n.ssh.port, n.ssh.user, n.ssh.state_dir), Session([], []))
        s.nodes.append(n)
        s.ranks.append(r)
        s.entries.update((e.sha, e) for e in plans[r].entries())
    try:
        for s in sessions.values():
            s.start()
        for s in sessions.values():
            s.send({"op": "ask", "entries": {sha: e.size for sha, e in s.entries.items()}, "files": files})
        # every host answers (and may be refused) before a byte is sent to any
        todos = [(s, what_to_send(f"host {s.where}", s.entries, s.answer(timeout_s),
                                  "free disk there, or point ssh.state_dir at a disk with room"))
                 for s in sessions.values()]
        for s, todo in todos:
            s.need = sum(e.size - off for e, off in todo or [])
            if todo == [] and progress is not None:  # its cache holds everything: top says so
                s.show(progress)
        stream([(s, todo) for s, todo in todos if todo], timeout_s, progress)
        out = [[] for _ in nodes]
        for s, todo in todos:
            if todo is None:  # it reads the model files itself
                continue
            s.send({"op": "build", "stages": {f"stage{r}": plans[r].manifest() for r in s.ranks}})
            args = s.answer(timeout_s)["args"]
            for r in s.ranks:
                out[r] = args[f"stage{r}"]
    except BaseException:
        for s in sessions.values():
            s.close(done=False)
        raise
    for s in sessions.values():
        s.close()
    return out


def stream(todos: list[tuple[Session, list]], timeout_s: float, watch=None) -> int:
    """Every host's missing entries, all hosts at once (a thread each); returns the bytes sent. ``watch``: the
    WeightsMetrics each host's figures go to, per acknowledged chunk."""
    from tqdm import tqdm

    total = sum(e.size - off for _, todo in todos for e, off in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="weights", file=sys.stderr,
               disable=True if total == 0 else None, mininterval=0.5)  # None: only on a terminal (no \r in logs)
    lock, failed, start = threading.Lock(), [], time.monotonic()

    def progress(s: Session, n: int) -> None:
        with lock:
            bar.update(n)
            if watch is not None:
                s.show(watch)

    def run(s: Session, todo: list) -> None:
        try:
            _send_entries(s, todo, lambda n: progress(s, n), timeout_s)
        except Exception as e:  # (re-raised below, in the launcher's thread)
            failed.append(e)

    for s, _ in todos:
        if watch is not None:
            s.show(watch)
    threads = [threading.Thread(target=run, args=(s, todo), daemon=True, name="weights-send") for s, todo in todos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if failed:
        raise failed[0]
    sent, took = sum(s.sent for s, _ in todos), time.monotonic() - start
    for s, _ in todos:
        say(f"weights: sent {s.sent} bytes to {s.where}")
    say(f"weights: sent {sent} bytes in all ({human(sent)} in {took:.1f}s, {sent / 2**20 / max(took, 1e-9):.1f} MB/s)")
    return sent


def _send_entries(s: Session, todo: list[tuple[Entry, int]], progress, timeout_s: float) -> None:
    """Write every chunk (SSH's own flow control paces it), then take the host's answers: an entry that arrived
    corrupt is sent again from its start, twice at most."""
    files, retries = {}, {}
    try:
        while todo:
            chunks = 0
            for e, offset in todo:
                for at in range(offset, e.size, CHUNK):
                    n = min(CHUNK, e.size - at)
                    data = e.read(at, n, files)
                    if len(data) != n:
                        raise ConfigError(f"{e.path} changed while its weights were sent (short read): run again")
                    s.send({"op": "chunk", "sha": e.sha, "size": e.size, "offset": at, "n": n}, data)
                    chunks += 1
            again = []
            for _ in range(chunks):
                a = s.answer(timeout_s)
                s.sent += a["n"]
                progress(a["n"])
                if a["state"] == "bad":
                    e = s.entries.get(a["sha"])
                    if e is None or a["offset"] + a["n"] != e.size or retries.get(e.sha, 0) >= 2:
                        raise PeerError(f"weights: {s.where} could not store entry {a['sha'][:12]}: "
                                        f"{(list(s.errors) or ['?'])[-1]}")
                    retries[e.sha] = retries.get(e.sha, 0) + 1
                    s.need += e.size
                    say(f"weights: entry {e.sha[:12]} arrived corrupt at {s.where}: sending it again")
                    again.append((e, 0))
            todo = again
    finally:
        for f in files.values():
            f.close()
