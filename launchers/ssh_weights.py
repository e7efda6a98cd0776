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
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from launchers.cluster_file import Node
from launchers.remote import host_command, python_script
from smolcluster.errors import ConfigError, PeerError
from smolcluster.node.coordinator import WEIGHT_MODES as MODES
from smolcluster.node.protocol import CHUNK
from smolcluster.node.weightsend import (
    Entry,
    HashBook,
    model_files,
    plan_stages,
    progress_bar,
    resend_bad,
    sent_summary,
    what_to_send,
)

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
    owed: int = 0                                               # chunks written that it has not answered yet
    heard: float = field(default_factory=time.monotonic)       # when it last answered (or said it got on)
    hashed: int = -1                                            # the most its busy lines said it hashed
    why: str = ""                                               # why the launcher ended it, if it did
    reader: threading.Thread | None = None
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
        cap = [] if spec.weights_cache_gb is None else ["--weights-cache-gb", str(spec.weights_cache_gb)]
        cmd = host_command(spec, python_script(spec, RECEIVER, ["--state-dir", spec.state_dir, *cap]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True, name="weights-answers")
        self.reader.start()
        threading.Thread(target=self._errors, daemon=True, name="weights-stderr").start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            try:
                got = json.loads(line)
            except ValueError:
                got = None
            if not isinstance(got, dict):  # not the receiver talking: the host's setup failed (remote.py's prelude)
                got = {"error": line.decode(errors="replace").strip()[:500] or "(an empty line)"}
            if "busy" in got:  # alive, but only getting on counts: a count that stays put is a stuck disk there
                if isinstance(got.get("hashed"), int) and got["hashed"] > self.hashed:
                    self.hashed, self.heard = got["hashed"], time.monotonic()
                continue
            self.heard = time.monotonic()
            self.answers.put(got)
        self.answers.put(None)  # the session ended

    def _errors(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self.errors.append(line.decode(errors="replace").rstrip())

    def send(self, fields: dict, data: bytes = b"") -> None:
        """Write a message (blocks while the host is slow to read: :func:`stream`'s watchdog ends a session that
        owes answers and says nothing for its timeout, and the write then fails here)."""
        try:
            self.proc.stdin.write(json.dumps(fields).encode() + b"\n" + data)
        except (BrokenPipeError, OSError, ValueError):  # (ValueError: written after close)
            raise self.failure() from None

    def answer(self, timeout_s: float, block: bool = True) -> dict | None:
        """The host's next answer (None: none yet, when not ``block``); raises if the session ended, said why it
        failed, or said nothing in time. Its ``busy`` lines (weightrecv.in_turn) restart the wait while the bytes
        they say it hashed grow."""
        try:
            self.proc.stdin.flush()
        except (OSError, ValueError):  # it ended: what it said last (a setup error) comes first, then the end
            pass
        start = time.monotonic()
        while True:
            try:
                got = self.answers.get(block, min(1.0, timeout_s))
            except queue.Empty:
                if not block:
                    return None
                if time.monotonic() - max(start, self.heard) > timeout_s:
                    raise PeerError(f"weights: {self.where} answered nothing (nor got on) within {timeout_s:g}s") \
                        from None
                continue
            if got is None:
                raise self.failure()
            if "error" in got and "state" not in got:
                raise PeerError(f"weights: {self.where} failed: {got['error']}")
            if "taken" in got:  # (weightrecv.claim) two senders' chunks of one entry would interleave there
                raise PeerError(f"weights: another transfer of this model to {self.where} is in progress: wait for "
                                "it or run again")
            return got

    def failure(self) -> PeerError:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.reader.join(5)  # (its last lines: an error line there says why better than stderr)
        said = [a["error"] for a in list(self.answers.queue) if a is not None and "error" in a and "state" not in a]
        last = self.why or next(iter(said), None) or next((e for e in reversed(self.errors) if e.strip()),
                                                           "(no output)")
        return PeerError(f"weights: the SSH session to {self.where} ended (exit {self.proc.poll()}): {last}")

    def kill(self, why: str) -> None:
        """End the session now (a write blocked on it then fails); ``why`` is what its failure says."""
        if self.proc is not None and self.proc.poll() is None:
            self.why = why
            self.proc.kill()

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
        own = own_files(p, info)
        out = [[] for _ in nodes]
        for s, todo in todos:
            if todo is None:  # it reads the model files itself
                for r in s.ranks:
                    out[r] = [own]
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


def own_files(p, info: dict) -> str:
    """The override for a host that reads the very files: where the launcher found them, not the user's (maybe
    relative) checkpoint= / model.pretrained= resolved against the host's workdir; a hub id (``gpt2``,
    ``org/name``: found in the Hugging Face cache) becomes the directory it was found in there."""
    given = Path(p.checkpoint or p.model["pretrained"]).expanduser()
    if given.exists():
        where = given.resolve()
    else:  # (find_model found it in the Hugging Face cache: a snapshot directory, or a run directory's file)
        where = Path(info["weights"]).resolve()
        where = where if where.is_dir() else where.parent
    return f"{'checkpoint' if p.checkpoint else 'model.pretrained'}={where}"


def stream(todos: list[tuple[Session, list]], timeout_s: float, watch=None) -> int:
    """Every host's missing entries, all hosts at once (a thread each); returns the bytes sent. A host that owes
    answers and says nothing for ``timeout_s`` is ended; the first host to fail ends the others too. ``watch``:
    the WeightsMetrics each host's figures go to, per answered chunk."""
    bar = progress_bar(sum(e.size - off for _, todo in todos for e, off in todo))
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
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
            now = time.monotonic()
            for s, _ in todos:
                if failed:  # one host failed: the run fails, so the others stop now rather than finish
                    s.kill("stopped: another host's transfer failed")
                elif s.owed and now - s.heard > timeout_s:  # its blocked write (or wait) then fails
                    s.kill(f"it owed {s.owed} answers and said nothing for {timeout_s:g}s: stopped sending")
    finally:
        bar.close()
    if failed:
        raise next((e for e in failed if "another host's transfer failed" not in str(e)), failed[0])
    return sent_summary({s.where: s.sent for s, _ in todos}, start)


def _send_entries(s: Session, todo: list[tuple[Entry, int]], progress, timeout_s: float) -> None:
    """Write every chunk (SSH's own flow control paces it), taking the host's answers as they come (the bar
    moves with them); an entry that arrived corrupt is sent again from its start (weightsend.resend_bad)."""
    files, retries, todo = {}, {}, deque(todo)
    s.heard = time.monotonic()

    def take(a: dict) -> None:
        s.owed -= 1
        s.sent += a["n"]
        if a["state"] == "bad":
            e = resend_bad(s.entries, retries, a, f"weights: {s.where}", a.get("error", "?"))
            todo.append((e, 0))
            s.need += e.size  # (top's line: the bytes to send grow by the entry sent again)
        progress(a["n"])

    try:
        while todo or s.owed:
            if not todo:  # everything written: wait for what is owed
                take(s.answer(timeout_s))
                continue
            e, at = todo.popleft()
            n = min(CHUNK, e.size - at)
            data = e.read(at, n, files)
            if len(data) != n:
                raise ConfigError(f"{e.path} changed while its weights were sent (short read): run again")
            if not s.owed:  # (the host's silence counts from when it first owes something)
                s.heard = time.monotonic()
            s.owed += 1  # (before the write, which blocks while the host reads nothing)
            s.send({"op": "chunk", "sha": e.sha, "size": e.size, "offset": at, "n": n}, data)
            if at + n < e.size:
                todo.appendleft((e, at + n))
            while s.owed and (a := s.answer(timeout_s, block=False)) is not None:
                take(a)
    finally:
        for f in files.values():
            f.close()
