"""A content-addressed cache of model files in an agent's state directory: ``STATE/weights/``.

An entry is a file named by the sha256 of its bytes: one tensor as a one-tensor safetensors file (its own
header + the bytes a head read by range from the model's file), or a small file that travels with a stage
(``config.json``, ``tokenizer.json``). ``blobs/<sha>`` holds what arrived whole and hashed right;
``partial/<sha>`` what is still arriving, appended in order, so an interrupted transfer resumes where it
stopped. An entry is verified twice: when its last byte arrives (hashed as its chunks arrive; a mismatch
deletes it and the sender starts it again) and when a head asks what is here (:meth:`WeightCache.status` re-hashes every blob it
asks about, so a byte flipped on disk since is found and fetched again).

The interface: :meth:`status` (what of these entries is here, whole or in part), :meth:`write` (one chunk
at its offset), :meth:`path` (a whole entry's file), :meth:`free_bytes` (room left on the disk).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")
_READ = 1 << 20


class CacheError(ValueError):
    """A chunk the cache cannot take (wrong offset, past the entry's end, a bad name)."""


def file_hash(path: Path):
    """The running sha256 of a file's bytes (read a MiB at a time)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h


def file_sha256(path: Path) -> str:
    return file_hash(path).hexdigest()


class WeightCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs, self.partial = self.root / "blobs", self.root / "partial"
        for d in (self.root, self.blobs, self.partial):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.hashing: dict[str, tuple] = {}  # entry -> (sha256 of its partial bytes so far, their length)

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
                if blob.stat().st_size == size and file_sha256(blob) == sha:
                    out[sha] = size
                    continue
                blob.unlink()  # corrupt: fetched again
            have = part.stat().st_size if part.is_file() else 0
            if have == size and have:  # whole, but the agent stopped before moving it in (write's last lines)
                self.hashing.pop(sha, None)
                if file_sha256(part) == sha:
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
            h = file_hash(part) if have else hashlib.sha256()
        with open(part, "ab", buffering=0) as f:
            f.write(data)
        h.update(data)
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
