"""The receiving end of weights sent over SSH: ``python -m launchers.ssh serve --weights send|auto``.

    python -m smolcluster.node.weightrecv --state-dir ~/.smolcluster/node

The launcher runs this on a stage's host through SSH (the encrypted, authenticated channel) and talks to it
over the session's stdin and stdout. It writes into the same content-addressed cache an agent keeps
(``STATE/weights``, weightcache.py): verified on arrival, resumable, pruned least recently used first, and
shared with an agent started with the same ``--state-dir``. Each message is one JSON line (a ``chunk`` is
followed by its ``n`` raw bytes); each answer one JSON line on stdout. Nothing is pickled.

    ask   {entries: {sha: size}, files: {path: [size, sha]}}  ->  {have, free, readable}   (WeightCache.answer),
                                                              or {taken: n}: another receiver is writing n of
                                                              the missing entries (claim)
    chunk {sha, size, offset, n} + n bytes                    ->  {sha, offset, n, state}  (partial|done|bad;
                                                              bad with its error: the launcher says it)
    build {stages: {name: manifest}}                          ->  {args: {name: [checkpoint=DIR, adapters.X=DIR]}}
    bye   {}                                                  ->  exits 0

Before any answer, a ``{busy, hashed}`` line every KEEPALIVE_S while it waits for its turn on the cache or
works (in_turn): ``hashed`` grows while the cache makes progress, so the launcher waits on a slow host and
not on a stuck one.

``build`` makes each stage's model directory of links into the cache (``STATE/ssh/KEY``, KEY from the
manifest's hash, so a second run reuses the same one, whole, even while another serve's stage reads it) as
an agent does for a stage it starts. Two receivers on one cache (two serves at once, or one cache under two
spellings of ``--state-dir``) take turns per message (a file lock, ``STATE/weights/.lock``), and an entry
arriving is claimed by its receiver until whole (``STATE/weights/locks/<sha>``): a second serve of the same
model to this host while the first still sends it is refused in one line, not interleaved. An agent on the
same state dir takes neither lock, so do not point both at one directory while both receive.
``--weights-cache-gb`` caps the cache as an agent's option does (the launcher passes ``ssh.weights_cache_gb``).
Anything wrong ends the program with one ``{"error": ...}`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from smolcluster.node.pairing import private_dir
from smolcluster.node.protocol import CHUNK
from smolcluster.node.weightcache import CacheError, WeightCache, adapter_dirs, model_dir

KEEPALIVE_S = 10.0  # a busy line this often while a message waits or works (well inside the launcher's timeout)
MAX_LINE = 64 << 20  # an ask names every entry of a model (~150 bytes each): room for a few hundred thousand


def reply(out, fields: dict) -> None:
    out.write(json.dumps(fields).encode() + b"\n")
    out.flush()


def read_exact(inp, n: int) -> bytes:
    data = inp.read(n)
    if len(data) != n:
        raise CacheError(f"the session ended inside a chunk ({len(data)} of {n} bytes)")
    return data


def build(cache: WeightCache, state: Path, stages: dict) -> dict[str, list[str]]:
    """Each stage's model directory from its manifest; the overrides that point the stage at it.

    ``STATE/ssh/KEY`` is named by the manifest's hash, so a stage of another serve of the same model may be
    reading it right now: a whole one is reused as it is, and a new one is built aside and moved in whole
    (never removed and relinked under a running stage)."""
    out = {}
    for name, manifest in stages.items():
        if not isinstance(manifest, dict):
            raise CacheError(f"stage {str(name)[:40]!r}: its manifest must be a JSON object")
        key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
        d = private_dir(state / "ssh") / key
        if not _whole(d, manifest):
            tmp = private_dir(state / "ssh" / f".{key}.{os.getpid()}")
            try:
                model_dir(cache, tmp / "model", manifest)
                adapter_dirs(cache, tmp / "adapters", manifest)
                (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))  # last: marks it whole
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _move_in(tmp, d)
        out[name] = [f"checkpoint={d / 'model'}", *(f"adapters.{a}={d / 'adapters' / a}" for a in
                                                    (manifest.get("adapters") or {}))]
    return out


def _whole(d: Path, manifest: dict) -> bool:
    """Whether ``d`` was built whole from this very manifest and every link in it still leads to its entry."""
    try:
        return (json.loads((d / "manifest.json").read_text()) == json.loads(json.dumps(manifest, sort_keys=True))
                and all(f.exists() for f in d.rglob("*")))
    except (OSError, ValueError):
        return False


def _move_in(tmp: Path, d: Path) -> None:
    if os.path.lexists(d):  # broken (an entry since pruned) or from an older version: set aside, then removed
        old = d.with_name(f".{d.name}.old.{os.getpid()}")
        os.replace(d, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, d)
    except OSError:  # another serve moved in the same one first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)


def serve(state: Path, inp, out, cap_bytes: int | None = None) -> None:
    cache = WeightCache(state / "weights", cap_bytes)
    claims: dict[str, object] = {}  # entry -> its open lock file (STATE/weights/locks/<sha>), held while it arrives
    while line := inp.readline(MAX_LINE):
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise CacheError(f"a message is a JSON object, not {type(msg).__name__}")
        op = msg.get("op")
        if op == "ask":
            got = in_turn(out, cache, "re-hashing the cached weights", cache.answer, msg["entries"], msg["files"])
            missing = [sha for sha, size in msg["entries"].items() if got["have"].get(sha, size) < int(size)]
            taken = [sha for sha in missing if not claim(cache, claims, sha)]
            reply(out, {"taken": len(taken)} if taken else got)
        elif op == "chunk":
            n = int(msg["n"])
            if not 0 < n <= CHUNK:
                raise CacheError(f"a chunk carries 1..{CHUNK} bytes, not {n}")
            data = read_exact(inp, n)
            got = {"sha": msg["sha"], "offset": msg["offset"], "n": n}
            try:
                if not claim(cache, claims, msg["sha"]):
                    raise CacheError(f"entry {str(msg['sha'])[:12]}: another receiver is writing it")
                done = in_turn(out, cache, "writing", cache.write, msg["sha"], int(msg["size"]), int(msg["offset"]),
                               data)
                got["state"] = "done" if done else "partial"
                if done:  # whole: another serve of the model may take it (reads it) from now on
                    claims.pop(msg["sha"]).close()
            except CacheError as e:  # a corrupt entry: the launcher sends it again from its start
                got.update(state="bad", error=str(e))
            reply(out, got)
        elif op == "build":
            reply(out, {"args": in_turn(out, cache, "building", build, cache, state, msg["stages"])})
        elif op == "bye":
            return
        else:
            raise CacheError(f"unknown op {str(op)[:40]!r}")


def claim(cache: WeightCache, claims: dict, sha: str) -> bool:
    """Take entry ``sha`` for this receiver until it is whole (or the session ends), unless another receiver (a
    second serve of the same model to this host) holds it: two senders' chunks of one entry would interleave.
    False then: the launcher says so in one line. (Empty lock files stay in STATE/weights/locks: a lock file
    removed while another process waits on it would let two hold "the" lock.)"""
    if sha in claims:
        return True
    f = open(private_dir(cache.root / "locks") / WeightCache._name(sha), "a")  # noqa: SIM115 (held past this call)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    claims[sha] = f
    return True


def in_turn(out, cache: WeightCache, doing: str, fn, *args):
    """``fn(*args)`` with the cache to this receiver alone (``STATE/weights/.lock``: another receiver, a second
    serve or the same cache under another spelling of ``--state-dir``, waits for its turn). Meanwhile, every
    ``KEEPALIVE_S``, a ``{"busy", "hashed"}`` line: ``hashed`` the bytes every receiver hashed or wrote on this
    cache so far (kept in the lock file, so one waiting for its turn sees the holder's progress). The launcher
    waits on while that grows, and not for a holder stuck on a hung disk. (An agent on the same state dir locks
    only among its own threads: do not point an agent and ``ssh.state_dir`` at one directory while both
    receive.)"""
    # (not O_APPEND: Linux's pwrite appends to such a file wherever it is told to write)
    lock = os.open(cache.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(lock, "r+b", buffering=0) as f, ThreadPoolExecutor(1) as pool:
        # the count is written by one thread at a time (guard), never after the turn ends: so it only grows
        turn, guard = {}, threading.Lock()

        def take_turn():
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                with guard:
                    turn["base"] = _count(f) - cache.hashed  # the count is then base + cache.hashed
                return fn(*args)
            finally:
                with guard:
                    if "base" in turn:
                        _count(f, turn["base"] + cache.hashed)
                    turn["over"] = True
                fcntl.flock(f, fcntl.LOCK_UN)

        job = pool.submit(take_turn)
        while True:
            try:
                return job.result(timeout=KEEPALIVE_S)
            except FutureTimeout:
                with guard:
                    if "base" in turn and "over" not in turn:
                        busy = {"busy": doing, "hashed": _count(f, turn["base"] + cache.hashed)}
                    else:
                        busy = {"busy": "waiting for another receiver's turn on this cache", "hashed": _count(f)}
                reply(out, busy)


def _count(f, n: int | None = None) -> int:
    """The lock file's count of bytes hashed on this cache: read, or written as ``n`` (a fixed 20 digits, so a
    reader never sees half of a longer number)."""
    if n is not None:
        os.pwrite(f.fileno(), b"%020d" % n, 0)
        return n
    try:
        return int(os.pread(f.fileno(), 20, 0) or b"0")
    except ValueError:  # (a lock file from before the count, or torn: counts as no progress)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smolcluster.node.weightrecv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default="~/.smolcluster/node", help="the cache goes in STATE/weights")
    parser.add_argument("--weights-cache-gb", type=float, default=None,
                        help="the cache's cap, as an agent's --weights-cache-gb (default: the disk's free space)")
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    cap = None if args.weights_cache_gb is None else int(args.weights_cache_gb * 2**30)
    try:
        serve(private_dir(Path(args.state_dir).expanduser()), sys.stdin.buffer, out, cap)
    except Exception as e:  # noqa: BLE001 (anything the launcher sent or the host did: one line, never a traceback)
        reply(out, {"error": f"{type(e).__name__}: {str(e)[:500]}"})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
