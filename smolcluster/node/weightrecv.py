"""The receiving end of weights sent over SSH: ``python -m launchers.ssh serve --weights send|auto``.

    python -m smolcluster.node.weightrecv --state-dir ~/.smolcluster/node

The launcher runs this on a stage's host through SSH (the encrypted, authenticated channel) and talks to it
over the session's stdin and stdout. It writes into the same content-addressed cache an agent keeps
(``STATE/weights``, weightcache.py): verified on arrival, resumable, pruned least recently used first, and
shared with an agent started with the same ``--state-dir``. Each message is one JSON line (a ``chunk`` is
followed by its ``n`` raw bytes); each answer one JSON line on stdout. Nothing is pickled.

    ask   {entries: {sha: size}, files: {path: [size, sha]}}  ->  {have, free, readable}   (WeightCache.answer)
    chunk {sha, size, offset, n} + n bytes                    ->  {sha, offset, n, state}  (partial|done|bad)
    build {stages: {name: manifest}}                          ->  {args: {name: [checkpoint=DIR, adapters.X=DIR]}}
    bye   {}                                                  ->  exits 0

``build`` makes each stage's model directory of links into the cache (``STATE/ssh/KEY``, KEY from the
manifest's hash, so a second run reuses the same one) exactly as an agent does for a stage it starts.
A bad message ends the program with one ``{"error": ...}`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from smolcluster.node.pairing import private_dir
from smolcluster.node.protocol import CHUNK
from smolcluster.node.weightcache import CacheError, WeightCache, adapter_dirs, model_dir

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
    """Each stage's model directory from its manifest; the overrides that point the stage at it."""
    out = {}
    for name, manifest in stages.items():
        key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
        d = private_dir(state / "ssh" / key)
        out[name] = [f"checkpoint={model_dir(cache, d / 'model', manifest)}",
                     *adapter_dirs(cache, d / "adapters", manifest)]
    return out


def serve(state: Path, inp, out) -> None:
    cache = WeightCache(state / "weights")
    while line := inp.readline(MAX_LINE):
        msg = json.loads(line)
        op = msg.get("op")
        if op == "ask":
            reply(out, cache.answer(msg["entries"], msg["files"]))
        elif op == "chunk":
            n = int(msg["n"])
            if not 0 < n <= CHUNK:
                raise CacheError(f"a chunk carries 1..{CHUNK} bytes, not {n}")
            data = read_exact(inp, n)
            try:
                whole = cache.write(msg["sha"], int(msg["size"]), int(msg["offset"]), data)
                got = "done" if whole else "partial"
            except CacheError as e:  # a corrupt entry: the launcher sends it again from its start
                print(f"weights: {e}", file=sys.stderr, flush=True)
                got = "bad"
            reply(out, {"sha": msg["sha"], "offset": msg["offset"], "n": n, "state": got})
        elif op == "build":
            reply(out, {"args": build(cache, state, msg["stages"])})
        elif op == "bye":
            return
        else:
            raise CacheError(f"unknown op {str(op)[:40]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smolcluster.node.weightrecv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default="~/.smolcluster/node", help="the cache goes in STATE/weights")
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    try:
        serve(private_dir(Path(args.state_dir).expanduser()), sys.stdin.buffer, out)
    except (CacheError, ValueError, KeyError, TypeError, OSError) as e:
        reply(out, {"error": f"{type(e).__name__}: {e}"})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
