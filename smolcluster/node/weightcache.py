"""A content-addressed cache of model files in an agent's state directory: ``STATE/weights/``.

An entry is a file named by the sha256 of its bytes: one tensor as a one-tensor safetensors file (its own
header + the bytes a head read by range from the model's file), or a small file that travels with a stage
(``config.json``, ``tokenizer.json``). ``blobs/<sha>`` holds what arrived whole and hashed right;
``partial/<sha>`` what is still arriving, appended in order, so an interrupted transfer resumes where it
stopped. An entry is verified twice: when its last byte arrives (hashed as its chunks arrive; a mismatch
deletes it and the sender starts it again) and when a head asks what is here (:meth:`WeightCache.status` re-hashes every blob it
asks about, so a byte flipped on disk since is found and fetched again).

The cache is pruned least recently used first: an entry's mtime is touched each time a head asks for it, and
:meth:`make_room` (called when a head asks) deletes the entries that ask does not name and that nothing used
lately, oldest first, until what is missing fits on the disk (``DISK_MARGIN`` left free) and under the agent's
``--weights-cache-gb`` cap, or nothing when that cannot be reached; :meth:`room` is what the head is told.
So the cache grows with the models served and never fills the disk.

``cluster.weights=auto`` sends nothing to an agent that reads the head's very model files itself. "The very
files" means the same path, size and sha256: :meth:`file_matches` hashes a file once per (size, mtime) and
remembers it in ``files.json`` (two machines can hold different checkpoints of the same size at the same path).

The interface: :meth:`status` (what of these entries is here, whole or in part), :meth:`write` (one chunk
at its offset), :meth:`path` (a whole entry's file), :meth:`free_bytes` (room left on the disk),
:meth:`make_room`, :meth:`file_matches`; :meth:`answer` (a head's ask, as an agent and the SSH launcher's
receiver answer it) and :func:`model_dir` / :func:`adapter_dirs` (a stage's model directory of links into the
cache) serve both ways the weights travel (an agent: node/agent.py; SSH: node/weightrecv.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from smolcluster.node.pairing import printable, private_dir

SHA256 = re.compile(r"[0-9a-f]{64}")
_READ = 1 << 20
DISK_MARGIN = 64 << 20  # left free on a node's disk beyond its weights
IN_USE_S = 600.0  # an entry asked for or written this recently may be about to be loaded by a stage: never pruned
# the files beside a stage's tensors that a head may send (config.json always; the tokenizer's with stage 0)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")
# a LoRA adapter's files (inference/adapters.py), and its name as a directory: nothing of the head's choosing
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # (a Hydra key: adapters.NAME=DIR)


class CacheError(ValueError):
    """A chunk the cache cannot take (wrong offset, past the entry's end, a bad name)."""


def file_hash(path: Path, counted=None):
    """The running sha256 of a file's bytes (read a MiB at a time); ``counted``: a WeightCache whose ``hashed``
    grows as they are read (what weightrecv's busy lines say, so the launcher tells slow from stuck)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ):
            h.update(chunk)
            if counted is not None:
                counted.hashed += len(chunk)
    return h


def file_sha256(path: Path, counted=None) -> str:
    return file_hash(path, counted).hexdigest()


class WeightCache:
    def __init__(self, root: Path, cap_bytes: int | None = None):
        self.root, self.cap = Path(root), cap_bytes
        self.blobs, self.partial = self.root / "blobs", self.root / "partial"
        for d in (self.root, self.blobs, self.partial):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.hashing: dict[str, tuple] = {}  # entry -> (sha256 of its partial bytes so far, their length)
        self.hashed = 0  # bytes hashed so far (re-hashed or written): grows while this cache makes progress

    @staticmethod
    def _name(sha: str) -> str:
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            raise CacheError(f"{str(sha)[:80]!r} is not a sha256 (64 lowercase hex digits)")
        return sha

    def path(self, sha: str) -> Path:
        return self.blobs / self._name(sha)

    def status(self, entries: dict[str, int]) -> dict[str, int]:
        """``{sha: bytes here}`` for ``entries = {sha: size}``: ``size`` for a whole entry that hashes right, the
        length of what arrived so far of one arriving, 0 for none. A whole entry whose bytes no longer hash to
        its name, or a partial one longer than its size, is deleted (and reported 0); a partial one that is whole
        and hashes right (the agent stopped between its last write and the move) is moved in."""
        out = {}
        for sha, size in entries.items():
            blob, part = self.path(sha), self.partial / sha
            if blob.is_file():
                if blob.stat().st_size == size and file_sha256(blob, self) == sha:
                    os.utime(blob)  # used: the last to be pruned
                    out[sha] = size
                    continue
                blob.unlink()  # corrupt: fetched again
            have = part.stat().st_size if part.is_file() else 0
            if have == size and have:  # whole, but the agent stopped before moving it in (write's last lines)
                self.hashing.pop(sha, None)
                if file_sha256(part, self) == sha:
                    os.replace(part, blob)
                    out[sha] = size
                    continue
            if have >= size and have:
                part.unlink()
                have = 0
            out[sha] = have
        return out

    def write(self, sha: str, size: int, offset: int, data) -> bool:
        """Append ``data`` at ``offset`` of entry ``sha`` (``size`` bytes whole). True once the entry is whole and
        verified; a whole entry that does not hash to ``sha`` is deleted and raises (the sender restarts it)."""
        part = self.partial / self._name(sha)
        have = part.stat().st_size if part.is_file() else 0
        if offset != have:
            raise CacheError(f"entry {sha[:12]}: a chunk at byte {offset}, but {have} bytes are here")
        if offset + len(data) > size:
            raise CacheError(f"entry {sha[:12]}: a chunk ends at byte {offset + len(data)}, past its size {size}")
        h, hashed = self.hashing.get(sha, (None, -1))
        if hashed != have:  # resumed (or first) write: hash what is on disk once, then as chunks arrive
            h = file_hash(part, self) if have else hashlib.sha256()
        with open(part, "ab", buffering=0) as f:
            f.write(data)
        h.update(data)
        self.hashed += len(data)
        self.hashing[sha] = (h, offset + len(data))
        if offset + len(data) < size:
            return False
        del self.hashing[sha]
        if h.hexdigest() != sha:
            part.unlink()
            raise CacheError(f"entry {sha[:12]} arrived whole but hashes to {h.hexdigest()[:12]}: discarded, send "
                             "it again")
        os.replace(part, self.path(sha))
        return True

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def room(self) -> int:
        """The bytes a head may count on here, ``DISK_MARGIN`` included as it expects: the disk's free space, or
        less under the ``--weights-cache-gb`` cap."""
        free = self.free_bytes()
        return free if self.cap is None else min(free, self.cap - self.used_bytes() + DISK_MARGIN)

    def used_bytes(self) -> int:
        return sum(f.stat().st_size for d in (self.blobs, self.partial) for f in d.iterdir())

    def make_room(self, keep: set[str], need: int) -> int:
        """Delete entries (whole or partial) not in ``keep``, least recently used first, until ``need`` more bytes
        fit on the disk with ``DISK_MARGIN`` to spare and under the cap. Entries used in the last ``IN_USE_S``
        (another head's run starting, a transfer arriving) are never deleted, and nothing is deleted when even
        deleting every candidate would not make room (the head then refuses the node in one line, and the cache
        keeps what other models need). Returns the bytes freed."""
        recent = time.time() - IN_USE_S
        others = sorted((f for d in (self.blobs, self.partial) for f in d.iterdir()
                         if f.name not in keep and f.stat().st_mtime < recent), key=lambda f: f.stat().st_mtime_ns)
        used, freed = self.used_bytes(), 0
        could = sum(f.stat().st_size for f in others)
        if need + DISK_MARGIN > self.free_bytes() + could or (self.cap is not None and used - could + need > self.cap):
            return 0
        for f in others:
            short = need + DISK_MARGIN - self.free_bytes()
            if short <= 0 and (self.cap is None or used + need <= self.cap):
                break
            n = f.stat().st_size
            f.unlink()
            self.hashing.pop(f.name, None)
            used, freed = used - n, freed + n
        return freed

    def file_matches(self, path: str, size: int, sha: str) -> bool:
        """Whether ``path`` is a file of ``size`` bytes hashing to ``sha`` (its hash remembered per size and
        mtime, so a model directory is read once, not on every run)."""
        p = Path(path)
        if not p.is_file() or p.stat().st_size != size:
            return False
        book_file = self.root / "files.json"
        try:
            book = json.loads(book_file.read_text()) if book_file.is_file() else {}
        except ValueError:
            book = {}
        mark = f"{p.resolve()}|{size}|{p.stat().st_mtime_ns}"
        if mark not in book:
            book[mark] = file_sha256(p, self)
            tmp = book_file.with_name(f".files.{os.getpid()}")
            tmp.write_text(json.dumps(book))
            tmp.replace(book_file)
        return book[mark] == sha

    def answer(self, entries: dict[str, int], files: dict) -> dict:
        """A head's ask: ``{have, free, readable}``. ``readable``: every one of the head's model ``files``
        ({path: [size, sha256]}) is here, the very same (then nothing is sent and nothing re-hashed); otherwise
        what of ``entries`` ({sha: size}) is here (re-hashed), after making room for the rest."""
        good = {path: v for path, v in files.items() if isinstance(path, str) and isinstance(v, list) and len(v) == 2}
        readable = bool(files) and len(good) == len(files) and all(
            self.file_matches(x, int(v[0]), str(v[1])) for x, v in good.items())
        have = {} if readable else self.status({sha: int(size) for sha, size in entries.items()})
        if not readable:  # room for what is missing: least recently used entries of other models go first
            self.make_room(set(entries), sum(int(size) - have[sha] for sha, size in entries.items()))
        return {"have": have, "free": self.room(), "readable": readable}

    def cached(self, sha: str) -> Path:
        path = self.path(sha)
        if not path.is_file():
            raise CacheError(f"cache entry {sha[:12]} is not here: send the weights first")
        return path


def model_dir(cache: WeightCache, d: Path, model: dict) -> Path:
    """A stage's model directory ``d`` built from the cache: its files and one-tensor safetensors files linked, and
    an index naming which holds each tensor (as a sharded Hugging Face directory has)."""
    files, tensors = model["config_files"], model["tensors"]
    if not isinstance(files, dict) or not isinstance(tensors, dict) or "config.json" not in files:
        raise CacheError("model needs config_files (with config.json) and tensors")
    if os.path.lexists(d):
        shutil.rmtree(d)
    private_dir(d)
    for name, sha in files.items():
        if name not in MODEL_FILES:
            raise CacheError(f"model file {printable(name)!r} is not one of {', '.join(MODEL_FILES)}")
        os.symlink(cache.cached(sha), d / name)
    for sha in set(tensors.values()):
        os.symlink(cache.cached(sha), d / f"{sha}.safetensors")
    index = {"metadata": {}, "weight_map": {str(k): f"{sha}.safetensors" for k, sha in tensors.items()}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def adapter_dirs(cache: WeightCache, d: Path, model: dict) -> list[str]:
    """The LoRA adapters that travelled with a stage (``model["adapters"]``: {name: {file: sha}}), each a PEFT
    directory of links into the cache under ``d``; the ``adapters.NAME=DIR`` overrides that point the stage at
    them."""
    adapters = model.get("adapters") or {}
    if not isinstance(adapters, dict):
        raise CacheError("model adapters must be {name: {file: sha256}}")
    out = []
    if os.path.lexists(d):  # (a role started again in the same run directory)
        shutil.rmtree(d)
    for name, files in adapters.items():
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or not isinstance(files, dict):
            raise CacheError(f"adapter name {printable(str(name))!r} is not a plain name ({ADAPTER_NAME.pattern})")
        private_dir(d / name)
        for file, sha in files.items():
            if file not in ADAPTER_FILES:
                raise CacheError(f"adapter file {printable(str(file))!r} is not one of {', '.join(ADAPTER_FILES)}")
            os.symlink(cache.cached(sha), d / name / file)
        out.append(f"adapters.{name}={d / name}")
    return out
