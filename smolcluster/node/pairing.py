"""Who is who: CURVE identities, fingerprints, the pairing code, and each side's store of the other's keys.

Trust on first use, confirmed on both screens (like Bluetooth's numeric comparison, with its
commit-then-reveal): the coordinator sends its key and a *commitment* to a fresh nonce; the agent
answers with its key and a fresh nonce of its own; the coordinator reveals its nonce, which must
match the commitment. Both then show a 6-digit code, an HMAC over both keys keyed by both nonces.
A machine in the middle that swapped a key must fix its own nonce (commit) before it sees the
other side's, so it matches the two screens with chance 1e-6 per attempt; grinding keys offline
gains nothing, because no code exists before both fresh nonces do. The code is not a secret (it
is compared, never typed into the exchange): knowing it lets nobody pair.

Each side keeps what the operator confirmed: the agent the coordinator's public key in
``STATE/paired/`` (it obeys only those keys), the coordinator each agent's name and key in
``STATE/agents/NAME.key`` (it places roles and sends run keys only to those agents).

Key files are ZeroMQ certificates, the format of :mod:`smolcluster.keys`, written here only
through :func:`write_private`: created exclusively (never over a file or through a symlink),
mode 0600, in a 0700 directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from smolcluster.errors import ConfigError
from smolcluster.transport import make_keys

Z85_KEY = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_PUBLIC = re.compile(r'^\s*public-key\s*=\s*"([^"\n]{40})"\s*$', re.M)
_SECRET = re.compile(r'^\s*secret-key\s*=\s*"([^"\n]{40})"\s*$', re.M)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def private_dir(d: Path) -> Path:
    """``d`` (and missing parents) as 0700 directories; refuses a symlink anywhere it creates or finds at ``d``."""
    d = Path(d).expanduser()
    missing = [p for p in (d, *d.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        os.mkdir(p, 0o700)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{d} is not a directory (a symlink?): refusing to keep keys there")
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def write_private(path: Path, text: str) -> Path:
    """A new file readable by this user only: O_CREAT|O_EXCL|O_NOFOLLOW (never an old file, never through a link)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def certificate(public: str, secret: str | None = None) -> str:
    """A ZeroMQ certificate's text (what ``zmq.auth.load_certificate`` reads), made from checked keys only."""
    for k in (public, secret):
        if k is not None and not Z85_KEY.fullmatch(k):
            raise ValueError("not a z85 CURVE key (40 characters)")
    text = f'metadata\ncurve\n    public-key = "{public}"\n'
    return text + (f'    secret-key = "{secret}"\n' if secret else "")


def parse_certificate(text: str, want_secret: bool) -> str:
    """A certificate rebuilt from the two keys found in ``text`` (nothing else of it survives); ValueError if none."""
    pub, sec = _PUBLIC.findall(text), _SECRET.findall(text)
    if len(pub) != 1 or len(sec) != int(want_secret):
        raise ValueError("a key file holds one public-key (and, for *_secret, one secret-key) line")
    return certificate(pub[0], sec[0] if want_secret else None)


def identity(directory: Path) -> Path:
    """``directory`` holding this machine's key pairs (``server.key[_secret]``, ``client.key[_secret]``), made on
    first use in a 0700 directory (the agent uses the server pair, a coordinator the client pair)."""
    d = private_dir(directory)
    if not (d / "server.key_secret").is_file():
        make_keys(d, clients=1)
        for f in d.glob("*_secret"):
            f.chmod(0o600)
    return d


def public_key(path: Path) -> str:
    """The z85 public key in a certificate file."""
    m = _PUBLIC.search(Path(path).read_text())
    if not m or not Z85_KEY.fullmatch(m.group(1)):
        raise ValueError(f"{path} holds no CURVE public key")
    return m.group(1)


def write_public_key(path: Path, key: str) -> Path:
    """A public certificate (replacing one of the same name: a link's agent key may change after a re-pair)."""
    path = Path(path)
    text = certificate(key)
    if os.path.lexists(path):
        os.unlink(path)
    return write_private(path, text)


def fingerprint(key: str) -> str:
    """A short, readable name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def nonce() -> str:
    return secrets.token_hex(16)


def commitment(coordinator_key: str, coordinator_nonce: str) -> str:
    """What the coordinator sends before it may see the agent's nonce (and reveals after)."""
    return hashlib.sha256(f"smolcluster-commit:{coordinator_key}:{coordinator_nonce}".encode()).hexdigest()


def pairing_code(agent_key: str, coordinator_key: str, agent_nonce: str, coordinator_nonce: str) -> str:
    """The 6 digits both screens show: HMAC-SHA256 over both keys, keyed by both fresh nonces."""
    mac = hmac.new(f"{agent_nonce}:{coordinator_nonce}".encode(),
                   f"smolcluster-pair-v2:{agent_key}:{coordinator_key}".encode(), hashlib.sha256).digest()
    return f"{int.from_bytes(mac[:8], 'big') % 1_000_000:06d}"


def printable(text: str, limit: int = 64) -> str:
    """A peer-chosen string made safe to log: no newlines, escape codes or other control characters."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


class Allowlist:
    """Coordinators this agent obeys: one public certificate per key in ``STATE/paired/``."""

    def __init__(self, state_dir: Path):
        self.dir = private_dir(Path(state_dir) / "paired")

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


class AgentStore:
    """Agents this coordinator has paired with: ``STATE/agents/NAME.key`` (their public certificates).

    A name is bound to one key: the same name with another key (a reinstalled machine, or someone
    else answering under its name) is refused until the operator removes the old entry."""

    def __init__(self, state_dir: Path):
        self.dir = private_dir(Path(state_dir) / "agents")

    def path(self, name: str) -> Path:
        if not SAFE_NAME.fullmatch(name):
            raise ConfigError(f"node name {printable(name)!r} is not a plain name (letters, digits, . _ -): "
                              "start its agent with --name NAME")
        return self.dir / f"{name}.key"

    def knows(self, name: str, key: str) -> bool:
        """True for the paired (name, key); False for a name never paired; ConfigError for a known name, new key."""
        path = self.path(name)
        if not path.is_file():
            return False
        try:
            known = public_key(path)
        except ValueError:
            known = None
        if known != key:
            raise ConfigError(f"node {name} now presents key {fingerprint(key)}, not the key this coordinator paired "
                              f"with ({fingerprint(known or '')}): if that machine was reinstalled, re-pair with "
                              f"rm {path} and run again")
        return True

    def add(self, name: str, key: str) -> Path:
        return write_public_key(self.path(name), key)


def confirm_path(state_dir: Path, code: str) -> Path:
    """The file ``python -m smolcluster.node pair CODE`` writes for a running agent or coordinator to see."""
    return Path(state_dir) / "confirm" / f"{code}"
