"""A paired but malicious parameter-server worker, as a real process speaking the wire protocol through
smolcluster.transport (the tests of tests/test_member_claims.py start it).

    python tests/rogue_worker.py PORT RANK MODE [KEYS_DIR] -- OVERRIDES...

MODE
  forge  syncps: its first gradient has norm 1e30 (with an honest sample count), every later one is tiny
         (norm ~0.002) with a forged count cycling -129, 10**9, -128: the issue's attack on sample weighting.
  drift  edp: once an honest gradient has landed, three gradients per pull, claiming three recent versions,
         each 10x the norm of the last (from 1, up to 1e3, under the absolute cap): the attack that dragged
         the old guard's median up.
It prints ``registered`` once welcomed and exits 0 when the server says stop.
"""

from __future__ import annotations

import itertools
import sys
import time

import numpy as np
from hydra import compose, initialize_config_dir

from smolcluster.paths import CONFIG_DIR
from smolcluster.train_settings import train_config
from smolcluster.trainer import Trainer
from smolcluster.transport import ClientEndpoint, client_key_name, wire

FORGED = (-129, 10**9, -128)


def gradient(sizes: dict[str, int], norm: float) -> dict[str, np.ndarray]:
    total = sum(sizes.values())
    return {name: np.full(n, norm / np.sqrt(total), np.float32) for name, n in sizes.items()}


def main(port: int, rank: int, mode: str, keys: str | None, overrides: list[str]) -> int:
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = train_config(compose("config", overrides=overrides))
    trainer = Trainer(cfg, [int(cfg.train.batch_size)] * int(cfg.cluster.workers), with_optimizer=False)
    client = ClientEndpoint(f"tcp://127.0.0.1:{port}", max_bytes=1 << 28, curve_dir=keys,
                            client_key=client_key_name(rank))
    batch = int(cfg.train.batch_size)
    hello = {"rank": rank, "node": "rogue", "device": "cpu", "batch_size": batch, "protocol": wire.PROTOCOL_VERSION,
             "fingerprint": trainer.fingerprint, "algo": cfg.algo.name, "session": "rogue"}
    deadline = time.monotonic() + 120
    msg = None
    while msg is None or msg.kind != "welcome":
        if time.monotonic() > deadline:
            print(f"no welcome: {msg and msg.fields}", flush=True)
            return 1
        client.send("register", hello)
        msg = client.recv(2000)
    print("registered", flush=True)
    sizes = {name: a.size for name, a in msg.tensors.items()}
    counts, norm, first, answered = itertools.cycle(FORGED), 1.0, True, set()
    while True:
        if msg.kind == "stop":
            return 0
        if msg.kind in ("welcome", "weights"):
            f = msg.fields
            if mode == "forge" and f["step"] in answered:
                pass  # a second welcome (registrations queued before the server listened): one gradient per step
            elif mode == "forge":
                answered.add(f["step"])
                norm, n = (1e30, batch) if first else (0.002, next(counts))
                client.send("grad", {"rank": rank, "step": f["step"], "version": f["version"], "samples": n,
                                     "loss": 0.1}, gradient(sizes, norm))
            elif f["version"] == 0:  # drift, before any update: it waits for an honest gradient to land first
                # (version 1), so the guard has heard both sources. On a busy machine the rogue's updates, 3 a pull
                # and no compute, can move the version past algo.max_staleness while the honest worker computes,
                # so every honest gradient is dropped as stale before the guard sees it, and a guard waiting for 2
                # sources never forms a bound (seen once under CI-like load).
                time.sleep(0.02)
                client.send("pull", {"rank": rank})
            else:  # drift
                for k in range(3):  # each claiming another recent version: one norm per version counts
                    client.send("grad", {"rank": rank, "step": f["step"], "version": max(0, f["version"] - k),
                                         "samples": batch, "loss": 0.1}, gradient(sizes, norm))
                    norm = min(norm * 10, 1e3)
                client.send("pull", {"rank": rank})
            first = False
        client.send("heartbeat", {"rank": rank, "session": "rogue"})
        msg = client.recv(30_000)
        if msg is None:
            print("the server went silent", flush=True)
            return 1


if __name__ == "__main__":
    args, overrides = sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
    sys.exit(main(int(args[0]), int(args[1]), args[2], args[3] if len(args) > 3 else None, overrides))
