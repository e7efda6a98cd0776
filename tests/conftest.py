"""Shared helpers: where the real data lies, and running the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMOLCLUSTER_SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST = SHARED_DATA / "mnist"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


def pytest_sessionstart(session):
    """Build the CPU matmul kernel (smolcluster::rows_mm, ~40 s once per machine) before any test starts a stage:
    a stage process would otherwise build it inside a test's start-up deadline (later ones load it in 0.2 s)."""
    from smolcluster.pipeline import cpu_kernels

    # Every process a test starts finds the build here, whatever HOME the test gives it.
    os.environ.setdefault("SMOLCLUSTER_KERNELS_DIR", str(cpu_kernels.build_dir()))
    cpu_kernels.available(wait=True)


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


def tokenizer_cache(cache_dir: Path, corpus: Path | None = None, vocab_size: int = 4096) -> Path:
    """A ``data.cache_dir`` holding the corpus's BPE, trained here as a run would (``data.tokenizer=auto``): runs
    started together then read it instead of each training the same one."""
    from smolcluster.data import text

    text.get_tokenizer(text.read_corpus(str(corpus) if corpus else None), "auto", vocab_size, str(cache_dir))
    return cache_dir


@pytest.fixture(scope="session")
def shakespeare_bpe(tmp_path_factory) -> Path:
    """A ``data.cache_dir`` with Tiny Shakespeare's BPE (the default vocabulary) trained."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    return tokenizer_cache(tmp_path_factory.mktemp("tok"), SHAKESPEARE)


@pytest.fixture(scope="session")
def gpt2_common(shakespeare_bpe) -> list[str]:
    """gpt2-tiny on Tiny Shakespeare for 20 AdamW steps: the equivalence runs' shared settings."""
    tok = shakespeare_bpe
    return ["model=gpt2-tiny", "data=text", f"data.path={SHAKESPEARE}", "model.n_layer=2", "model.block_size=32",
            "train.optimizer=adamw", "train.lr=1e-3", "train.steps=20", f"data.cache_dir={tok}"]


@pytest.fixture(scope="session")
def local_gpt2(tmp_path_factory, gpt2_common) -> tuple[Path, dict]:
    """The ``local`` reference of the gpt2-tiny equivalence tests (global batch 8): its run dir and summary."""
    run = tmp_path_factory.mktemp("local_gpt2")
    return run, train(run, "algo=local", "train.batch_size=8", *gpt2_common)


# An attacked syncps run's settings (test_security, test_ps_security): 1 worker, 100 steps slow enough to attack
ATTACKED_SYNCPS = ["train.steps=100", "cluster.heartbeat_s=0.2", "cluster.liveness_s=5",
                   "cluster.nodes=[{delay_s: 0.05}]"]


@pytest.fixture(scope="session")
def clean_syncps_weights(tmp_path_factory) -> dict:
    """The final weights of an unattacked ``ATTACKED_SYNCPS`` run: every attacked run must end on them exactly.
    One run for the session: each attack test would otherwise pay a cluster's start-up for the same weights."""
    from safetensors.torch import load_file

    from tests.cluster_util import Cluster

    run = tmp_path_factory.mktemp("clean_syncps")
    with Cluster(run, "syncps", *ATTACKED_SYNCPS, workers=1) as c:
        c.server()
        c.worker(0)
        assert c.wait("server") == 0, c.output("server")[-3000:]
    return load_file(run / "checkpoint.safetensors")


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


def train_together(*runs: tuple[Path, list[str]], timeout: float = 300, env: dict | None = None) -> list[dict]:
    """Several independent ``train`` runs at once, each ``(run_dir, overrides)``; their summaries, in order.
    On two cores one run's start-up (imports, mostly one core) overlaps another's, instead of following it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    logs = [tempfile.TemporaryFile("w+") for _ in runs]  # (not pipes: a full one would stall its run)
    procs = [subprocess.Popen([sys.executable, "-m", "smolcluster.train", f"hydra.run.dir={run_dir}",
                               "train.progress=false", *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              text=True, env=full_env) for (run_dir, overrides), log in zip(runs, logs)]
    deadline = time.monotonic() + timeout
    try:
        for (_, overrides), proc, log in zip(runs, procs, logs):
            if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                log.seek(0)
                raise AssertionError(f"train {' '.join(overrides)} exited {proc.returncode}\n{log.read()[-8000:]}")
    finally:
        for proc, log in zip(procs, logs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [json.loads((run_dir / "summary.json").read_text()) for run_dir, _ in runs]


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
    """Three hosts (srv, w0, w1) in network namespaces on a bridge (smolcluster.testing.netns.Lan); skips with the
    reason where namespaces are not available (not root, no iproute2)."""
    from smolcluster.testing.netns import Lan, netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Lan(["srv", "w0", "w1"])
    try:
        yield net.build()
    finally:
        net.close()
