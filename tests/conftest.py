"""Shared helpers: where the real data lies, and running the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST = SHARED_DATA / "mnist"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST subset not found in {MNIST} (set SMOLCLUSTER_SHARED_DATA)")
    return MNIST


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE


def run_cli(module: str, *args: str, timeout: float = 300, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repo root, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(run_dir: Path, *overrides: str, timeout: float = 300, **kw) -> dict:
    """Run ``python -m smolcluster.train`` into run_dir and return its summary.json."""
    run_cli("smolcluster.train", f"hydra.run.dir={run_dir}", "train.progress=false", *overrides,
            timeout=timeout, **kw)
    return json.loads((run_dir / "summary.json").read_text())


def wait_until(cond, timeout_s: float = 30.0, every_s: float = 0.05) -> bool:
    """Poll ``cond`` until it is true (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return False


@pytest.fixture
def lan():
    """Three hosts (srv, w0, w1) in network namespaces on a bridge (smolcluster.bench.netns.Lan); skips with the
    reason where namespaces are not available (not root, no iproute2)."""
    from smolcluster.bench.netns import Lan, netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Lan(["srv", "w0", "w1"])
    try:
        yield net.build()
    finally:
        net.close()
