"""The receiving end of weights sent over SSH: ``python -m launchers.ssh serve --weights send|auto``.

    python -m smolcluster.node.weightrecv --state-dir ~/.smolcluster/node

The launcher runs this on a stage's host through SSH (the encrypted, authenticated channel) and talks to it
over the session's stdin and stdout. It writes into the same content-addressed cache an agent keeps
(``STATE/weights``, weightcache.py): verified on arrival, resumable, pruned least recently used first, and
shared with an agent started with the same ``--state-dir``. Each message is one JSON line (a ``chunk`` is
followed by its ``n`` raw bytes); each answer one JSON line on stdout. Nothing is pickled.

    ask   {entries: {sha: size}, files: {path: [size, sha]}}  ->  {have, free, readable}   (WeightCache.answer;
                                                              {busy} lines every KEEPALIVE_S before it)
    chunk {sha, size, offset, n} + n bytes                    ->  {sha, offset, n, state}  (partial|done|bad;
                                                              bad with its error: the launcher says it)
    build {stages: {name: manifest}}                          ->  {args: {name: [checkpoint=DIR, adapters.X=DIR]}}
    bye   {}                                                  ->  exits 0

``build`` makes each stage's model directory of links into the cache (``STATE/ssh/KEY``, KEY from the
manifest's hash, so a second run reuses the same one, whole, even while another serve's stage reads it) as
an agent does for a stage it starts. Two receivers on one cache (two serves at once, or one cache under two
spellings of ``--state-dir``) take turns per message (a file lock, ``STATE/weights/.lock``); an agent on the
same state dir does not take that lock, so do not point both at one directory while both receive.
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
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path

from smolcluster.node.pairing import private_dir
from smolcluster.node.protocol import CHUNK
from smolcluster.node.weightcache import CacheError, WeightCache, adapter_dirs, model_dir

KEEPALIVE_S = 10.0  # a busy line this often during a long ask (well inside the launcher's timeout)
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
    while line := inp.readline(MAX_LINE):
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise CacheError(f"a message is a JSON object, not {type(msg).__name__}")
        op = msg.get("op")
        if op == "ask":
            with cache_lock(cache):
                reply(out, keep_alive(out, cache.answer, msg["entries"], msg["files"]))
        elif op == "chunk":
            n = int(msg["n"])
            if not 0 < n <= CHUNK:
                raise CacheError(f"a chunk carries 1..{CHUNK} bytes, not {n}")
            data = read_exact(inp, n)
            got = {"sha": msg["sha"], "offset": msg["offset"], "n": n}
            try:
                with cache_lock(cache):
                    got["state"] = "done" if cache.write(msg["sha"], int(msg["size"]), int(msg["offset"]), data) \
                        else "partial"
            except CacheError as e:  # a corrupt entry: the launcher sends it again from its start
                got.update(state="bad", error=str(e))
            reply(out, got)
        elif op == "build":
            with cache_lock(cache):
                reply(out, {"args": build(cache, state, msg["stages"])})
        elif op == "bye":
            return
        else:
            raise CacheError(f"unknown op {str(op)[:40]!r}")


def keep_alive(out, fn, *args):
    """``fn(*args)`` (an ask re-hashes every entry it names: minutes for a big model on a slow disk), saying
    ``{"busy": ...}`` every ``KEEPALIVE_S`` meanwhile, so the launcher knows this host is alive and waits on."""
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fn, *args)
        while True:
            try:
                return job.result(timeout=KEEPALIVE_S)
            except FutureTimeout:
                reply(out, {"busy": "re-hashing the cached weights"})


@contextmanager
def cache_lock(cache: WeightCache):
    """The cache to this process alone meanwhile: another receiver (a second serve, or the same cache under
    another spelling of ``--state-dir``) waits for it. (An agent on the same state dir locks only among its
    own threads: do not point an agent and ``ssh.state_dir`` at one directory while both receive.)"""
    with open(cache.root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
