"""What every training algorithm shares: build the pieces from config, step, evaluate, checkpoint, summarise.

An algorithm is a policy on top of this: ``local`` calls :meth:`Trainer.step_local`
in a loop; the parameter server gets gradients from the wire, puts them in
``trainer.flat.grads`` and calls :meth:`Trainer.apply_gradients`. Every algorithm then hands
its row of figures to :meth:`Trainer.after_step`, the one home of the cadence (grad norms, eval,
log, checkpoint), and counts samples and time on the Trainer, which a resume carries on. A pipeline
stage (:class:`smolcluster.pipeline.gpipe.StageTrainer`) is a Trainer over its part of the model
(:meth:`Trainer.own_part`), with its own clip, evaluation and checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from loguru import logger

from smolcluster import checkpoint
from smolcluster.cluster import pick_device
from smolcluster.data import DataBundle, build_data
from smolcluster.data.sharding import Sharder
from smolcluster.flat import FlatParams
from smolcluster.models import build_model, count_parameters, fingerprint, lora
from smolcluster.models.hf import checkpoint_activations, is_hf_model, save_hf_dir
from smolcluster.objective import evaluate, loss_fn
from smolcluster.optim import build_optimizer, clip_, lr_at, set_lr
from smolcluster.train_settings import TrainConfig


class Trainer:
    def __init__(self, cfg: TrainConfig, batch_sizes: list[int], *, device: str | None = None,
                 with_optimizer: bool = True, data: DataBundle | None = None):
        self.cfg = cfg
        self.train = cfg.train  # shared, never edited: an algorithm that needs other values copies it (replace)
        self.kind = cfg.model["kind"]
        self.device = pick_device(device or cfg.device)
        self.data = data or build_data(cfg.data, cfg.model)
        torch.manual_seed(cfg.seed)  # the same seed on every process: identical initial weights
        self.lora = cfg.train.lora.enabled
        if self.lora:  # the base frozen (read straight into its precision), peft's adapters the only trainable ones
            whole = lora.build(cfg.model, self.data.info, self.train.lora.as_dict(), cfg.seed)
        else:
            whole = build_model(cfg.model, self.data.info)
        if self.train.activation_checkpointing:
            checkpoint_activations(whole, cfg.model["name"])
        self.fingerprint, self.num_params = fingerprint(whole), count_parameters(whole)  # of the whole model
        self.model_desc = describe_model(cfg.model, whole)
        self.model_name = self.model_desc["name"]
        self.model = self.own_part(whole).to(self.device)
        self.model.train()
        self.flat = FlatParams(self.model)
        self._trainable: list[torch.Tensor] | None = None  # set by local_gradients' first call
        self.optimizer = build_optimizer(self.model, self.train, self.flat) if with_optimizer else None
        self.sharder = Sharder(len(self.data.train_x), batch_sizes, cfg.seed)
        steps = cfg.train.steps or cfg.train.epochs * self.sharder.steps_per_epoch
        self.total_steps = int(steps)
        # The schedule always spans total_steps; stop_after only ends this process early (resume continues).
        self.end_step = min(self.total_steps, cfg.train.stop_after or self.total_steps)
        self.step = 0
        # The run's counters, carried across resumes in the checkpoint's JSON (``run``): samples trained on and
        # training wall time (waiting for workers and the time between a crash and its restart not counted).
        self.samples, self.wall_before, self.t0 = 0, 0.0, time.perf_counter()
        self.carried: dict = {}  # the rest of ``run`` from the checkpoint: an algorithm's own counters, worker history
        self.resumed_from: Path | None = None
        # Per-layer gradient norms every N steps (logging.grad_norm_every), measured before clipping.
        self.grad_norm_every = cfg.logging.grad_norm_every
        self.grad_norms: dict[str, float] = {}
        self._sizes_logged = False

    def own_part(self, whole: torch.nn.Module) -> torch.nn.Module:
        """The part of the model this process trains: all of it (a pipeline stage keeps its layers)."""
        return whole

    # -- one step ---------------------------------------------------------------------------
    def batch(self, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sharder.indices(step, rank)
        # index_select, not x[idx]: the same rows in half the time of advanced indexing (~10 us of an MLP step)
        return (self.data.train_x.index_select(0, idx).to(self.device),
                self.data.train_y.index_select(0, idx).to(self.device))

    def compute_gradients(self, step: int, rank: int = 0) -> tuple[float, int]:
        """Forward + backward on this rank's shard of the step's batch; gradients land in flat.grads."""
        x, y = self.batch(step, rank)
        self.flat.zero_grad()
        loss = loss_fn(self.model, x, y)
        loss.backward()
        return loss.detach(), len(x)

    def apply_gradients(self, scale: float = 1.0) -> float:
        """Clip, set the scheduled learning rate (times ``scale``) and step the optimizer."""
        if self.grad_norm_every and (self.step + 1) % self.grad_norm_every == 0:
            self.grad_norms = self.layer_grad_norms()
        self.clip_gradients()
        lr = lr_at(self.step, self.train, self.total_steps)
        set_lr(self.optimizer, lr * scale)
        self.optimizer.step()
        self.step += 1
        return lr

    def clip_gradients(self) -> None:
        """Clip to train.grad_clip by the global norm of this process's gradient (a pipeline stage's spans stages)."""
        clip_(self.flat.params.values(), self.train.grad_clip)

    def layer_grad_norms(self) -> dict[str, float]:
        """``grad_norm/<parameter>`` for every parameter, plus the global ``grad_norm`` (one device sync)."""
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        norms = torch.stack([g.detach().float().norm() for _, g in named]).tolist()
        out = {f"grad_norm/{n}": v for (n, _), v in zip(named, norms)}
        out["grad_norm"] = float(sum(v * v for v in norms) ** 0.5)
        return out

    def pop_grad_norms(self) -> dict[str, float]:
        """The norms measured at the last due step, once (so each lands in exactly one metrics row)."""
        out, self.grad_norms = self.grad_norms, {}
        return out

    def step_local(self) -> tuple[torch.Tensor, int, float]:
        loss, n = self.local_gradients(self.step)
        lr = self.apply_gradients()
        return loss, n, lr

    def local_gradients(self, step: int) -> tuple[torch.Tensor, int]:
        """:meth:`compute_gradients` for a process whose gradients no hook watches (``algo=local``): autograd
        hands back fresh gradients and one fused copy puts them in flat.grads. Zeroing the flat buffer for
        autograd to add into costs two more passes over it (~10% of an MNIST MLP step); the values are the same."""
        x, y = self.batch(step)
        loss = loss_fn(self.model, x, y)
        if self._trainable is None:  # the flat gradient views, fixed once FlatParams made them
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
            self._grad_views = [p.grad for p in self._trainable]
        grads = torch.autograd.grad(loss, self._trainable, materialize_grads=True)
        torch._foreach_copy_(self._grad_views, grads)
        return loss.detach(), len(x)

    def after_step(self, recorder, run_dir: str | Path, row: dict, run_state=None) -> dict:
        """The cadence after a step: grad norms and a due evaluation join ``row``, which is logged (if not
        empty), and a due checkpoint is written, with ``run_state()`` (the algorithm's counters) in its JSON.
        Returns the evaluation, if one was due (else an empty dict)."""
        if self.grad_norms:
            row.update(self.pop_grad_norms())
        evaluation = self.evaluate() if self.due(self.train.eval_every) else {}
        row.update(evaluation)
        if row:
            if not self._sizes_logged:  # once a process: what it trains (top shows it, LoRA's few percent)
                row.update(trainable_params=self.flat.numel(), params=self.num_params)
                self._sizes_logged = True
            recorder.log(self.step, **row)
        if self.due(self.train.checkpoint_every):
            self.save(run_dir, run_state() if run_state is not None else None)
        return evaluation

    # -- the run's clock and counters (one run, however many times it was resumed) ---------------
    def start_clock(self, recorder=None) -> None:
        """Start timing training (not the wait for workers); metrics.jsonl's ``time`` goes on from the checkpoint's.
        A resumed run's restart is recorded there as an event row at the checkpoint's step."""
        self.t0 = time.perf_counter()
        if recorder is not None:
            recorder.t0 = time.time() - self.wall_before
            if self.resumed_from is not None:
                recorder.event(self.step, "resumed", resumed_from=str(self.resumed_from),
                               dropped_rows=recorder.dropped_rows)

    @property
    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        return self.samples / max(self.elapsed, 1e-9)

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors (AdamW: two moments per parameter)."""
        if self.optimizer is None:
            return 0
        return sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                   for t in st.values() if torch.is_tensor(t))

    # -- evaluation, checkpoints ------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.test_x, self.data.test_y, self.kind, self.device,
                        max_samples=self.train.eval_samples)

    def save(self, run_dir: str | Path, run_state: dict | None = None) -> Path:
        """Weights, optimizer and, in the JSON's ``run``, the counters a resume carries on (plus ``run_state``)."""
        tok = self.data.tokenizer
        if tok is not None and not (Path(run_dir) / "tokenizer.json").is_file():
            tok.save(Path(run_dir) / "tokenizer.json")  # inference and chat decode with the run's own tokenizer
        path = checkpoint.save(run_dir, self.model, self.optimizer, self.step,
                               {"fingerprint": self.fingerprint, "model": self.model_desc,
                                "run": self.run_counters(run_state)})
        tok_file = None if tok is None else (getattr(tok, "path", None) or Path(run_dir) / "tokenizer.json")
        if self.lora:  # the adapters as peft writes them; with merge=true also the merged model as hf/
            lora.save_adapter(self.model, Path(run_dir) / "adapter")
            if self.train.lora.merge:
                save_hf_dir(lora.merged(self.model), None, Path(run_dir) / "hf", tok_file)
        elif is_hf_model(self.model):  # also as a Hugging Face directory: the result goes anywhere transformers does
            save_hf_dir(self.model, None, Path(run_dir) / "hf", tok_file)
        return path

    def run_counters(self, run_state: dict | None = None) -> dict:
        """The checkpoint JSON's ``run``: samples and wall time so far, plus the algorithm's ``run_state``."""
        # wall_s unrounded: a resumed run's clock starts there, and must not start before the last row's time
        return {"samples": self.samples, "wall_s": self.elapsed, **(run_state or {})}

    def resume(self, path: str | Path) -> dict:
        meta = checkpoint.load(path, self.model, self.optimizer)
        return self.carry_on(checkpoint.resolve(path), meta)

    def carry_on(self, path: Path, meta: dict) -> dict:
        """Take the run up where the checkpoint at ``path`` (already loaded) stopped: its step and counters."""
        self.step = int(meta["step"])
        self.carried = dict(meta.get("run") or {})
        self.samples = int(self.carried.pop("samples", 0))
        self.wall_before = float(self.carried.pop("wall_s", 0.0))
        self.resumed_from = path
        logger.info(f"resumed from {path} at step {self.step}")
        return meta

    def due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0 and self.step < self.end_step

    def summary(self, algo: str, final_loss: float | None, evaluation: dict, run_dir: Path, **extra) -> dict:
        """The whole run's figures (a resumed run's counters go on from its checkpoint's)."""
        wall_s = self.elapsed
        return {
            "algo": algo,
            "model": self.model_name,
            "data": self.cfg.data["name"],
            "steps": self.step,
            "samples": self.samples,
            "wall_s": round(wall_s, 3),
            "samples_per_s": round(self.samples / wall_s, 2) if wall_s > 0 else None,
            **({"resumed_from": str(self.resumed_from)} if self.resumed_from else {}),
            "final_loss": final_loss,
            **evaluation,
            "params": self.num_params,
            "trainable_params": self.flat.numel(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),  # intra-op threads: CPU sums round by thread count
            "optimizer_state_bytes": self.optimizer_state_bytes(),
            "run_dir": str(run_dir),
            **extra,
            "config": {**self.cfg.composed, "model": self.model_desc},
        }


def describe_model(model_cfg: dict, whole: torch.nn.Module) -> dict:
    """The model a run trains, as logs, summary.json and the checkpoint name it: ``model=``'s settings, or, with
    ``model.pretrained=DIR``, what that directory holds (its config.json decides the family, width and tying,
    whatever ``model=`` preset named the run)."""
    desc = dict(model_cfg)
    config = getattr(whole, "config", None)
    if not desc.get("pretrained") or config is None:
        return desc
    get = lambda *keys: next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)  # noqa: E731
    return {"name": Path(str(desc["pretrained"])).name or str(desc["pretrained"]), "kind": desc.get("kind", "lm"),
            "pretrained": desc["pretrained"], "family": config.model_type,
            "n_layer": get("num_hidden_layers", "n_layer"), "n_embd": get("hidden_size", "n_embd"),
            "n_head": get("num_attention_heads", "n_head"), "vocab_size": config.vocab_size,
            "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)), "preset": desc.get("name")}


class LossWindow:
    """Mean train loss over the last ``n`` steps, kept as tensors so logging costs no sync per step."""

    def __init__(self, n: int):
        self.n, self.values = max(1, n), []

    def add(self, loss) -> None:
        self.values.append(loss)
        if len(self.values) > self.n:
            self.values.pop(0)

    def mean(self) -> float | None:
        if not self.values:
            return None
        return float(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in self.values]).mean())
