"""Who is who: CURVE identities, fingerprints, the pairing code and the allowlist of paired coordinators.

Trust on first use, with a code on both screens (like Bluetooth's numeric comparison): the agent
and the coordinator each derive a 6-digit code from *both* public keys. A machine in the middle
that swapped either key would make the two screens show different codes, so an operator who
confirms only a matching code pairs with the coordinator actually in front of them. After
pairing the agent keeps the coordinator's public key in ``STATE/paired/`` and obeys only keys
found there; every control message is CURVE-encrypted with these keys.

Key files are ZeroMQ certificates, the format of :mod:`smolcluster.keys`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from smolcluster.transport import make_keys

_PUBLIC = re.compile(r'public-key\s*=\s*"([^"]{40})"')


def identity(directory: Path) -> Path:
    """``directory`` holding this machine's key pair (``server.key[_secret]``), made on first use.

    The agent uses the server pair (it binds); a coordinator uses the client pair (it connects).
    """
    d = Path(directory).expanduser()
    if not (d / "server.key_secret").is_file():
        make_keys(d, clients=1)
        for f in d.glob("*_secret"):
            f.chmod(0o600)
    return d


def public_key(path: Path) -> str:
    """The z85 public key in a certificate file."""
    m = _PUBLIC.search(Path(path).read_text())
    if not m:
        raise ValueError(f"{path} holds no CURVE public key")
    return m.group(1)


def write_public_key(path: Path, key: str) -> Path:
    """A public certificate in ZeroMQ's format (what ``zmq.auth.load_certificate`` reads)."""
    if not re.fullmatch(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}", key):
        raise ValueError("not a z85 CURVE public key (40 characters)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'metadata\ncurve\n    public-key = "{key}"\n')
    return path


def fingerprint(key: str) -> str:
    """A short, readable name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def pairing_code(agent_key: str, coordinator_key: str) -> str:
    """The 6 digits both sides show: a hash of both public keys (order fixed: agent, coordinator)."""
    digest = hashlib.sha256(f"smolcluster-pair:{agent_key}:{coordinator_key}".encode()).digest()
    return f"{int.from_bytes(digest[:8], 'big') % 1_000_000:06d}"


class Allowlist:
    """Coordinators this agent obeys: one public certificate per key in ``STATE/paired/``."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "paired"
        self.dir.mkdir(parents=True, exist_ok=True)

    def keys(self) -> set[str]:
        out = set()
        for f in self.dir.glob("*.key"):
            try:
                out.add(public_key(f))
            except (OSError, ValueError):
                pass  # a half-written or foreign file: ignored, not trusted
        return out

    def __contains__(self, key: str | None) -> bool:
        return key is not None and key in self.keys()

    def add(self, key: str) -> Path:
        return write_public_key(self.dir / f"{fingerprint(key)}.key", key)


def confirm_path(state_dir: Path, code: str) -> Path:
    """The file ``python -m smolcluster.node pair CODE`` writes for the running agent to see."""
    return Path(state_dir) / "confirm" / f"{code}"
