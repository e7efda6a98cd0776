"""``bench desk``'s peer: torchft's DiLoCo (``torchft.local_sgd.DiLoCo``, PyPI ``torchft``) on the same desk.

torchft runs a lighthouse (``torchft_lighthouse``, in the desk's ``srv`` namespace) that forms the quorum, and in
every replica a Manager (its own TCPStore and manager server) that joins it and configures a gloo process group
across the replicas. Here each replica is one process in its node's namespace and CPU group, as our ranks are:

- the same model, data shard (``Trainer.batch(step, rank)``), steps and lr schedule as ``algo=diloco``;
- the inner optimizer is torch's (``torch.optim.SGD``/``AdamW`` with ``train.*``'s settings, clipped to
  ``train.grad_clip``): DiLoCo hooks ``Optimizer.step`` and hands the outer optimizer fresh ``.grad`` tensors, and
  the trainer's flat optimizer has no hooks and keeps its gradients as views of one buffer;
- the outer optimizer is ``torch.optim.SGD`` with Nesterov momentum (``--outer-lr``, ``--outer-momentum``), and
  torchft's ``sync_every`` is H;
- the pseudo-gradient is averaged uncompressed in one bucket (``use_bucketization``): torchft's
  ``should_quantize`` needs CUDA and triton.

All replicas start from the same seeded weights (``init_sync=False``: no step-0 copy from a peer, as our ring).
The clock starts once the first quorum formed the gloo group (our rows' clock starts once the ring formed). Rank
0 writes metrics-like rows (step, time, samples, bytes sent, eval loss, torchft's committed outer steps) every
``eval_every`` steps; bytes are its namespace's eth0 TX counter, as DDP's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from smolcluster.bench.scaling import PORT, env, read_rows, wait_all
from smolcluster.cluster import free_port
from smolcluster.testing.netns import Lan

LIGHTHOUSE_PORT = 29510  # torchft_lighthouse's default


def unavailable() -> str | None:
    """Why torchft's DiLoCo cannot run here; None when it can."""
    try:
        import torchft.local_sgd  # noqa: F401
    except ImportError as e:
        return f"torchft is not installed ({e}): pip install torchft"
    if lighthouse() is None:
        return "torchft_lighthouse (torchft's quorum server) is not on PATH nor beside this Python"
    return None


def lighthouse() -> str | None:
    beside = Path(sys.executable).parent / "torchft_lighthouse"  # a venv's console script, PATH or not
    return str(beside) if beside.is_file() else shutil.which("torchft_lighthouse")


def run_torchft(hosts, n: int, model_args: list[str], steps: int, run_dir: Path, *, inner_steps: int,
                outer_lr: float, outer_momentum: float, eval_every: int, eval_samples: int,
                stop_after_s: float | None = None, timeout: float = 900) -> dict:
    """One torchft DiLoCo run on ``hosts``' nodes w0..w{n-1} (lighthouse on ``srv``): its metrics-like rows, and
    ``stopped`` if cut short at ``stop_after_s``. Raises RuntimeError (a replica's log tail) if one fails."""
    run_dir.mkdir(parents=True)
    desk = isinstance(hosts, Lan)  # namespaces: an address each, fixed ports; loopback (no namespaces): free ones
    ifname = "eth0" if desk else "lo"
    lh_port = LIGHTHOUSE_PORT if desk else free_port()
    # the heartbeat timeout is generous: a heartbeat queued behind a round's sync on a slow link is not a death
    lh = subprocess.Popen([*hosts.exec("srv"), lighthouse(), "--bind", f"[::]:{lh_port}", "--min_replicas", str(n),
                           "--heartbeat_timeout_ms", "60000"],
                          stdout=(run_dir / "lighthouse.out").open("w"), stderr=subprocess.STDOUT)
    procs, logs = {}, {}
    try:
        for r in range(n):
            host = f"w{r}"
            logs[host] = run_dir / f"{host}.out"
            spec = json.dumps({"rank": r, "world": n, "ip": hosts.ip[host], "store_port": PORT if desk else free_port(),
                               "lighthouse": f"http://{hosts.ip['srv']}:{lh_port}", "overrides": model_args,
                               "steps": steps, "inner_steps": inner_steps, "outer_lr": outer_lr,
                               "outer_momentum": outer_momentum, "eval_every": eval_every,
                               "eval_samples": eval_samples, "rows": str(run_dir / "metrics.jsonl"),
                               "ifname": ifname, "timeout": timeout})
            procs[host] = subprocess.Popen([*hosts.exec(host), sys.executable, "-m", "smolcluster.bench.torchft_peer",
                                            spec], stdout=logs[host].open("w"), stderr=subprocess.STDOUT,
                                           env={**env(), "GLOO_SOCKET_IFNAME": ifname})
        wait_all(procs, logs, timeout, stop_after_s=stop_after_s)
    finally:
        lh.terminate()
        try:
            lh.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lh.kill()
            lh.wait(timeout=10)
    rows = read_rows(run_dir / "metrics.jsonl")
    return {"stopped": not rows or rows[-1]["step"] < steps, "rows": rows,
            "params": next((r["params"] for r in rows if "params" in r), None)}


def inner_optimizer(model, train):
    """torch.optim's optimizer of ``train.optimizer`` with the run's settings (the trainer's flat one, element
    for element)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def manager_of(spec: dict, model, inner):
    """This replica's torchft Manager: a group of one process, whose TCPStore it hosts."""
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    wait = timedelta(seconds=spec["timeout"])
    store = TCPStore(spec["ip"], spec["store_port"], is_master=True, wait_for_workers=False)
    return store, Manager(
        pg=ProcessGroupGloo(timeout=wait), min_replica_size=spec["world"], use_async_quorum=False,
        load_state_dict=lambda s: (model.load_state_dict(s["model"]), inner.load_state_dict(s["inner"])),
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        replica_id=f"desk_{spec['rank']}", rank=0, world_size=1, store_addr=spec["ip"],
        store_port=spec["store_port"], lighthouse_addr=spec["lighthouse"], hostname=spec["ip"], init_sync=False,
        timeout=wait, quorum_timeout=wait, connect_timeout=timedelta(seconds=120))


def replica(spec: dict) -> None:
    """One torchft replica (``python -m smolcluster.bench.torchft_peer SPEC_JSON``): H inner steps, then
    torchft's DiLoCo sync, ``steps`` steps in all."""
    import torch
    from torchft.local_sgd import DiLoCo

    from smolcluster.bench.common import compose_config
    from smolcluster.objective import loss_fn
    from smolcluster.optim import clip_, lr_at, set_lr
    from smolcluster.trainer import Trainer

    rank, world, steps = spec["rank"], spec["world"], spec["steps"]
    cfg = compose_config([*spec["overrides"], f"train.steps={steps}", f"train.eval_samples={spec['eval_samples']}"])
    trainer = Trainer(cfg, [cfg.train.batch_size] * world, with_optimizer=False)
    model, train = trainer.model, cfg.train
    inner = inner_optimizer(model, train)
    outer = torch.optim.SGD(model.parameters(), lr=spec["outer_lr"], momentum=spec["outer_momentum"],
                            nesterov=spec["outer_momentum"] > 0)
    store, manager = manager_of(spec, model, inner)  # (the store lives as long as this process: peers may read it)
    manager.start_quorum()  # forms the gloo group across the replicas: the clock starts once it has
    tx = Path(f"/sys/class/net/{spec['ifname']}/statistics/tx_bytes")
    every, start, sent0 = spec["eval_every"], time.perf_counter(), int(tx.read_text())
    with DiLoCo(manager, [model], inner, outer, sync_every=spec["inner_steps"], use_bucketization=True):
        for step in range(steps):
            x, y = trainer.batch(step, rank)
            inner.zero_grad()
            loss_fn(model, x, y).backward()
            clip_(model.parameters(), train.grad_clip)
            set_lr(inner, lr_at(step, train, steps))
            inner.step()  # every H-th: DiLoCo's hook averages the pseudo-gradient and takes the outer step
            if rank == 0 and every and ((step + 1) % every == 0 or step + 1 == steps):
                row = {"step": step + 1, "samples": (step + 1) * train.batch_size * world,
                       "bytes_sent": int(tx.read_text()) - sent0, **trainer.evaluate(),
                       "time": time.perf_counter() - start, "outer_steps": manager.current_step(),
                       "params": trainer.num_params}
                with open(spec["rows"], "a") as f:  # a line at a time: a run stopped at its budget keeps its rows
                    f.write(json.dumps(row) + "\n")
    manager.shutdown(wait=False)


if __name__ == "__main__":
    replica(json.loads(sys.argv[1]))
