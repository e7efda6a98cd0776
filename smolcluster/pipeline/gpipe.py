"""``algo=mp`` training on one stage: the GPipe schedule.

Each step the global batch (``train.batch_size``, the same batch ``algo=local`` sees
at that step) is cut into ``algo.microbatches`` micro-batches. The first stage pushes
them all forward; each stage forwards what arrives and passes it on; the last stage
computes the loss of each micro-batch (scaled by 1/M, so the sum is the batch mean)
and starts its backward at once; activation-gradients flow back stage by stage,
each stage taking them in micro-batch order so its accumulation is deterministic.
Then, before every stage steps its own optimizer:

- a tied embedding (GPT-2's ``transformer.wte.weight``, a tied Llama's or Qwen's
  ``model.embed_tokens.weight``): the first and last stage each hold it (one embeds, one
  projects onto the vocabulary); they swap gradients and both add them, so both copies
  take the identical update the single tied tensor takes locally;
- gradient clipping needs the *global* norm: stages swap squared norms (the tied
  copy counted once) and scale by the same factor as ``clip_grad_norm_``.

A stage is a :class:`~smolcluster.trainer.Trainer` holding its part of the model: the
schedule, data order, optimizer, learning rate, cadence and checkpoints' counters are
``algo=local``'s, which is why 20 steps of ``mp`` end on the same parameters as ``local``
and a resumed run reads as one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from smolcluster import checkpoint
from smolcluster.errors import ConfigError, PeerError
from smolcluster.launch.nodes import stage_nodes
from smolcluster.models import lora
from smolcluster.models.hf import is_hf_model
from smolcluster.objective import cross_entropy, figures, score
from smolcluster.pipeline import shards
from smolcluster.pipeline.architectures import FAMILIES, Architecture, family_for
from smolcluster.pipeline.mesh import Envelope, Mesh
from smolcluster.pipeline.partition import StageSpec, node_weights, plan, stage_name
from smolcluster.pipeline.sequential import block_groups, find_sequential, sequential_stage
from smolcluster.telemetry.run_files import open_recorder
from smolcluster.train_settings import TrainConfig
from smolcluster.trainer import RunLoop, Trainer

EVAL_BATCH = 512  # the batch objective.evaluate uses, so eval sums match algo=local's

# Received tensors are read-only views of the message frame; stages never write to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def tensor_of(arr: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return (arr if torch.is_tensor(arr) else torch.from_numpy(arr)).to(device)  # bfloat16 arrives as torch


def array_of(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A numpy view of a contiguous CPU tensor (a copy only when it lives on an accelerator); a bfloat16 one (a
    LoRA stage over a bf16 base) stays torch, which numpy cannot hold: the wire carries its raw bits.

    Sends are zero-copy: zmq reads this memory later, from its I/O thread. So a tensor
    handed to a send must never be written to afterwards (send a clone if it will be).
    """
    t = t.detach().cpu().contiguous()
    return t if t.dtype == torch.bfloat16 else t.numpy()


def split_for_training(full: torch.nn.Module, n_stages: int, weights: list[float], rank: int, lora_cfg=None
                       ) -> tuple[list[StageSpec], torch.nn.Module, Architecture | None]:
    """This rank's stage, holding (views of) the full model's own tensors: the same initial weights.

    A decoder of a supported family (``config.model_type``) is split into the pipeline's own
    stage modules; a model that is one ``nn.Sequential`` into runs of its modules (no architecture).
    Under LoRA (``lora_cfg``: train.lora, ``full`` the peft model of :func:`smolcluster.models.lora.apply`) the
    stage is wrapped with peft as ``full`` is and takes its frozen base and its adapters from it.
    """
    base = full.get_base_model() if lora_cfg else full
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "model_type", None) in FAMILIES:
        config = config.to_dict()
        drops = {k: config[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")
                 if config.get(k)}
        if drops:
            raise ConfigError(f"algo=mp runs {config['model_type']} stages without dropout, this model has "
                              f"{drops}: set model.dropout=0")
        arch = family_for(config)
        specs = arch.plan(n_stages, weights, head_first=False)
        spec = specs[rank]
        with torch.device("meta"):
            stage = arch.stage(spec.first, spec.last, spec.blocks)
            if lora_cfg:
                where = f"stage {rank} (blocks {spec.blocks.start}-{spec.blocks.stop - 1})"
                stage = lora.wrap_stage(stage, full, lora_cfg, where)
                check_adapted(stage, arch)
        own = full.state_dict()  # parameters, and an int8 base's integer rows and scales (buffers)
        stage.load_state_dict({n: own[n].detach() for n in stage.state_dict()}, assign=True)
        return specs, stage, arch
    if lora_cfg:
        raise ConfigError(f"train.lora with algo=mp adapts a transformers decoder's stages; this model "
                          f"({type(base).__name__}) is split as an nn.Sequential: use algo=local, syncps, edp or "
                          "allreduce")
    _, seq = find_sequential(full)
    costs = [sum(p.numel() for i in g for p in seq[i].parameters()) for g in block_groups(seq)]
    specs = plan(costs, n_stages, weights)
    spec = specs[rank]
    return specs, sequential_stage(full, spec.blocks, spec.first, spec.last), None


def check_adapted(stage: torch.nn.Module, arch: Architecture) -> None:
    """Refuse an adapted embedding or head: a stage projects onto the vocabulary with its weight (``project``),
    bypassing a LoRA layer's forward, and a tied embedding's adapter would have to cross between stages."""
    from peft.tuners.lora import LoraLayer

    outside = {arch.embed_name.removesuffix(".weight"), arch.head_name.removesuffix(".weight")}
    for name, module in stage.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and name in outside:
            raise ConfigError(f"train.lora.target_modules adapts {name} under algo=mp, which adapts the decoder "
                              "blocks only: leave it out of train.lora.target_modules")


class StageTrainer(Trainer):
    """A :class:`~smolcluster.trainer.Trainer` whose model is one stage: it keeps the Trainer's schedule, cadence
    (:meth:`Trainer.after_step`), run counters, resume-as-one-run and summary, and replaces the parts a pipeline
    does differently: the step (GPipe), the gradient clip (by the norm across stages), evaluation (through every
    stage) and the checkpoint (one shard per stage)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int):
        self.run_dir, self.rank = Path(run_dir), rank
        self.n, self.M = cfg.algo.stages, cfg.algo.microbatches
        if not 0 <= rank < self.n:
            raise ConfigError(f"rank={rank} is invalid for algo.stages={self.n}: use 0..{self.n - 1}")
        if self.M < 1 or cfg.train.batch_size % self.M:
            raise ConfigError(f"algo.microbatches={self.M} must be positive and divide train.batch_size="
                              f"{cfg.train.batch_size}")
        self.nodes = stage_nodes(cfg.cluster, self.n)
        self.node = self.nodes[rank]
        if self.node.threads:
            torch.set_num_threads(self.node.threads)
        super().__init__(cfg, [cfg.train.batch_size], device=self.node.device)  # own_part() splits the model
        self.grad_norm_every = 0  # per-layer norms would cover this stage's layers only
        self.lr: float | None = None
        self.bytes_before = (0, 0)  # a resumed stage's traffic so far (mesh counters start at 0)
        if cfg.resume:
            self.resume(cfg.resume)
        # (LoRA: the embedding is frozen base, nothing to sum)
        self.tied = self.decoder and self.arch.tied and self.n > 1 and (self.first or self.last) and not self.lora
        self.names = [stage_name(r) for r in range(self.n)]
        self.me = self.names[rank]
        self.prev = self.names[rank - 1] if rank > 0 else None
        self.next = self.names[rank + 1] if rank < self.n - 1 else None
        self.pending: dict[tuple, Envelope] = {}
        self.mesh: Mesh | None = None
        logger.info(f"{self.spec.describe(self.last and self.decoder, self.first and self.decoder)}: "
                    f"{sum(p.numel() for p in self.model.parameters()):,} of {self.num_params:,} params, "
                    f"device={self.device}")

    def own_part(self, whole: torch.nn.Module) -> torch.nn.Module:
        # what the checkpoint holds (a LoRA run's: the adapters), in the whole model's order
        self.whole_layout = [(name, p.numel()) for name, p in whole.named_parameters() if p.requires_grad]
        # a transformers model's run is also written as a Hugging Face directory (LoRA: adapter/) once its shards merge
        base = whole.get_base_model() if self.lora else whole
        self.hf_config = base.config.to_dict() if is_hf_model(base) else None
        self.specs, stage, self.arch = split_for_training(whole, self.n, node_weights(self.cfg.cluster, self.n),
                                                          self.rank, self.train.lora.as_dict() if self.lora else None)
        self.decoder = self.arch is not None  # embeddings and head are named in the partition
        self.spec = self.specs[self.rank]
        self.first, self.last = self.spec.first, self.spec.last
        return stage  # from here on this process holds only its stage

    def resume(self, path: str | Path) -> dict:
        """This stage's layers (by their whole-model names) and its slice of the optimizer state, from a
        whole checkpoint (the run's shards are merged into one first); then the run goes on as Trainer's does."""
        path = shards.resolve_resume(path)
        meta = checkpoint.load_meta(path)
        if meta.get("fingerprint") not in (None, self.fingerprint):
            raise ConfigError(f"resume={self.cfg.resume}: the checkpoint is of another model "
                              f"(fingerprint {meta['fingerprint']} != {self.fingerprint})")
        checkpoint.load(path, self.model)
        trained = [n for n, p in self.model.named_parameters() if p.requires_grad]  # the optimizer's (LoRA: adapters)
        state = shards.stage_optimizer_state(path, self.whole_layout, trained, meta)
        if state is not None:
            self.optimizer.load_state_dict(state)
        self.carry_on(path, meta)
        # each stage's traffic goes on from its own counters (with another number of stages, from 0)
        stages = self.carried.pop("stages", None) or []
        mine = stages[self.rank] if len(stages) == self.n else {}
        self.bytes_before = (int(mine.get("bytes_sent", 0)), int(mine.get("bytes_received", 0)))
        return meta

    def traffic(self) -> dict:
        return {"bytes_sent": self.bytes_before[0] + self.mesh.bytes_sent,
                "bytes_received": self.bytes_before[1] + self.mesh.bytes_received}

    # -- links ------------------------------------------------------------------------------
    def connect(self) -> None:
        c = self.cfg.cluster
        self.mesh = Mesh(self.me, self.node.bind, heartbeat_s=c.heartbeat_s, liveness_s=c.liveness_s,
                         max_bytes=c.max_bytes, keys_dir=c.keys)
        for node in self.nodes:
            if node.rank != self.rank:
                self.mesh.add_peer(self.names[node.rank], node.address)
        self.mesh.beacon = {"fingerprint": self.fingerprint, "step": self.step, "end_step": self.end_step,
                            "microbatches": self.M, "stages": self.n}
        others = [n for n in self.names if n != self.me]
        self.mesh.wait_ready(others, float(c.connect_timeout_s), " (the other pipeline stages)")
        for name in others:
            info = self.mesh.peers[name].info
            for key, mine in self.mesh.beacon.items():
                if info.get(key) != mine:
                    raise ConfigError(f"stage {name} has {key}={info.get(key)!r} but {self.me} has {mine!r}: "
                                      "start every stage with the same config (and resume= dir)")
        logger.info(f"{self.me}: linked with {', '.join(others)} at {self.mesh.address}")

    _KEYS = {"mp.act": ("step", "mb", "phase"), "mp.grad": ("step", "mb"), "mp.tied": ("step",),
             "mp.norm": ("step",)}

    def expect(self, kind: str, src: str, *key) -> Envelope:
        """The message of ``kind`` from ``src`` for ``key`` (e.g. step, micro-batch); others wait their turn."""
        want = (kind, src, *key)
        while want not in self.pending:
            env = self.mesh.recv(self.cfg.cluster.heartbeat_s)
            if env is None:
                continue
            if env.kind == "mp.bye":
                if env.src == src:
                    raise PeerError(f"{self.me}: {env.src} finished while {self.me} still waited for its {kind} {key}")
                continue  # another stage finished first; goodbye() sees its bye later
            if env.kind not in self._KEYS:
                logger.warning(f"{self.me}: ignored an unexpected {env.kind!r} from {env.src}")
                continue
            self.pending[(env.kind, env.src, *(env.fields[k] for k in self._KEYS[env.kind]))] = env
        return self.pending.pop(want)

    def send(self, dst: str, kind: str, fields: dict, tensors: dict | None = None) -> None:
        tag = f"{fields.get('step', '')}.{fields.get('mb', '')}"
        self.mesh.send(dst, kind, fields, tensors, tag=tag)

    # -- one step ---------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor | None:
        step, M = self.step, self.M
        idx = self.sharder.indices(step, 0)
        xs = self.data.train_x[idx].chunk(M) if self.first else None
        ys = self.data.train_y[idx].chunk(M) if self.last else None
        self.flat.zero_grad()
        stash, total = [], None
        for m in range(M):
            if self.first:
                inp = xs[m].to(self.device)
            else:
                env = self.expect("mp.act", self.prev, step, m, "train")
                inp = tensor_of(env.tensors["x"], self.device).requires_grad_()
            out = self.model(inp)
            if self.last:
                loss = cross_entropy(out, ys[m]) / M
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
                if not self.first:
                    self.send(self.prev, "mp.grad", {"step": step, "mb": m}, {"g": array_of(inp.grad)})
            else:
                self.send(self.next, "mp.act", {"step": step, "mb": m, "phase": "train"}, {"x": array_of(out)})
                stash.append((inp, out))
        for m, (inp, out) in enumerate(stash):  # GPipe: every forward first, then the backwards
            env = self.expect("mp.grad", self.next, step, m)
            out.backward(tensor_of(env.tensors["g"], self.device))
            if not self.first:
                self.send(self.prev, "mp.grad", {"step": step, "mb": m}, {"g": array_of(inp.grad)})
        if self.tied:
            self.sum_tied_gradient()
        self.lr = self.apply_gradients()  # clip_gradients() below, the schedule, the optimizer, step + 1
        return total

    def sum_tied_gradient(self) -> None:
        grad = dict(self.model.named_parameters())[self.arch.embed_name].grad
        other = self.names[-1] if self.first else self.names[0]
        # A clone: the in-place add below must not change what is still queued for sending.
        self.send(other, "mp.tied", {"step": self.step}, {"g": array_of(grad.clone())})
        env = self.expect("mp.tied", other, self.step)
        grad.add_(tensor_of(env.tensors["g"], self.device))  # a + b == b + a: both copies get the same sum

    def clip_gradients(self) -> None:
        """Clip by the norm of the whole model's gradient: the stages swap their squared norms."""
        if self.train.grad_clip <= 0:
            return
        sq = sum(float(p.grad.double().pow(2).sum()) for name, p in self.model.named_parameters()
                 if p.requires_grad and not (self.tied and self.last and name == self.arch.embed_name))  # the tied copy counts once
        for other in self.names:
            if other != self.me:
                self.send(other, "mp.norm", {"step": self.step, "sq": sq})
        parts = {self.me: sq}
        for other in self.names:
            if other != self.me:
                parts[other] = float(self.expect("mp.norm", other, self.step).fields["sq"])
        # The same order on every stage, then clip_grad_norm_'s float32 arithmetic.
        total = torch.tensor(math.sqrt(sum(parts[n] for n in self.names)), dtype=torch.float32)
        coef = torch.clamp(self.train.grad_clip / (total + 1e-6), max=1.0)
        for g in self.flat.grads.values():
            g.mul_(coef.to(g.device))

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss through the pipeline, scored as objective.evaluate scores (the last stage holds the
        figures; the others pass activations on and return {})."""
        x, y = self.data.test_x, self.data.test_y
        n = len(x) if not self.train.eval_samples else min(self.train.eval_samples, len(x))
        self.model.eval()
        sums = [0.0, 0, 0]  # summed loss, correct, scored targets
        for b, i in enumerate(range(0, n, EVAL_BATCH)):
            j = min(i + EVAL_BATCH, n)
            if self.first:
                inp = x[i:j].to(self.device)
            else:
                inp = tensor_of(self.expect("mp.act", self.prev, self.step, b, "eval").tensors["x"], self.device)
            out = self.model(inp)
            if self.last:
                sums = [a + b for a, b in zip(sums, score(out, y[i:j]))]
            else:
                self.send(self.next, "mp.act", {"step": self.step, "mb": b, "phase": "eval"}, {"x": array_of(out)})
        self.model.train()
        return figures(*sums, self.kind) if self.last else {}

    def save(self, run_dir: str | Path, run_state: dict | None = None) -> Path:
        """This stage's shard; its JSON's ``run`` holds the run's counters and this stage's traffic."""
        run_dir = Path(run_dir)
        extra = {"fingerprint": self.fingerprint, "algo": "mp", "run": self.run_counters({**self.traffic(),
                                                                                           **(run_state or {})})}
        tok = self.data.tokenizer
        if self.last and tok is not None and not (run_dir / "tokenizer.json").is_file():
            tok.save(run_dir / "tokenizer.json")  # inference decodes with the run's own tokenizer
        if self.hf_config is not None:
            extra["hf_config"] = self.hf_config
            extra["tokenizer"] = str(getattr(tok, "path", None) or run_dir / "tokenizer.json") if tok else None
        if self.lora:  # merging the shards writes adapter/ (and with merge=true hf/, from each stage's merged part)
            extra["lora"] = self.train.lora.as_dict()
            if self.train.lora.merge:
                merged = lora.merged(self.model)
                shards.save_hf_part(run_dir, self.rank, self.n, {n: p for n, p in merged.named_parameters()},
                                    self.step)
        return shards.save_shard(run_dir, self.rank, self.n, self.model, self.optimizer, self.step, extra)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> dict | None:
        self.connect()
        # Every stage reports to its own sinks (Prometheus, W&B); only the last writes the run's files, and a
        # resumed run's rows after its checkpoint's step are dropped (those steps are trained again). Every
        # stage takes the cadence's evaluations (they run through all stages) and checkpoints its shard.
        recorder = open_recorder(self.cfg, self.run_dir, files=self.last,
                                 keep_until=self.step if self.resumed_from else None)
        loop = RunLoop(self, recorder, self.run_dir,
                       fields=lambda: {"epoch": round(self.sharder.epoch_of(self.step), 4), **self.traffic()})
        try:
            loop.start(eval_first=True)
            # only the last stage sees the loss (None elsewhere: those rows have none)
            loop.run(lambda: (self.train_step(), self.train.batch_size, self.lr))
            # the final evaluation first: its activations cross the mesh, and the summary's traffic counts them
            summary = loop.finish(
                "mp", evaluation=self.evaluate(), summarise=self.last, stages=self.n, microbatches=self.M,
                partition=[s.describe(s.last and self.decoder, s.first and self.decoder) for s in self.specs],
                **self.traffic())
            self.mesh.goodbye([n for n in self.names if n != self.me], float(self.cfg.cluster.liveness_s))
            return summary
        finally:
            self.mesh.close()
