"""What every training algorithm shares: build the pieces from config, step, evaluate, checkpoint, summarise.

An algorithm is a policy on top of this: ``local`` calls :meth:`Trainer.step_local`
in a loop; the parameter server gets gradients from the wire, puts them in
``trainer.flat.grads`` and calls :meth:`Trainer.apply_gradients`. The run around the steps is one
:class:`RunLoop` for every algorithm: the step-0 evaluation, the progress bar, the clock, the loss
window, the log rows' cadence and common fields, :meth:`Trainer.after_step` (grad norms, eval,
checkpoint), the final evaluation, save and summary. An algorithm hands it each step's loss, samples and
learning rate and its own row fields. Samples and time are counted on the Trainer, which a resume
carries on. A pipeline stage (:class:`smolcluster.pipeline.gpipe.StageTrainer`) is a Trainer over its
part of the model (:meth:`Trainer.own_part`), with its own clip, evaluation and checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

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
        # Where the lr schedule stands (None: at self.step). algo.round_s sets it from the ring's samples, so ranks
        # that take unlike numbers of steps anneal together.
        self.lr_step: float | None = None
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
        lr = lr_at(self.step if self.lr_step is None else self.lr_step, self.train, self.total_steps)
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
        if not any(torch.is_tensor(v) for v in self.values):  # a server's losses arrive as floats: keep float64
            return math.fsum(self.values) / len(self.values)
        return float(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in self.values]).mean())


class RunLoop:
    """The run around an algorithm's steps, the same for every algorithm.

    :meth:`start` (the step-0 evaluation, the progress bar, the clock); :meth:`record` after each step, which is
    :meth:`count` (the loss window, samples) then :meth:`after_step` (the log row every ``train.log_every`` steps
    and at the end, :meth:`Trainer.after_step`'s eval and checkpoint); :meth:`finish` (the final evaluation, save,
    summary.json). :meth:`run` is the whole of it for an algorithm that pulls its steps; one driven by messages
    (EDP's server, the ring) calls the parts.

    ``fields()``: the algorithm's own fields of a log row. ``note(row)``: the tail of the log line of a lead's row
    (None: no line). ``run_state()``: its counters for a checkpoint's JSON. ``window``: how many steps the logged
    loss averages (default ``train.log_every``). A process that is not ``lead`` logs its ``fields()`` only to its
    own sinks, and takes no evaluation or checkpoint; ``lead`` and ``recorder`` may change while a ring re-forms.
    """

    def __init__(self, trainer: Trainer, recorder, run_dir: str | Path, *, fields: Callable[[], dict] | None = None,
                 note: Callable[[dict], str] | None = None, run_state: Callable[[], dict] | None = None,
                 window: int | None = None, lead: bool = True):
        self.trainer, self.recorder, self.run_dir, self.lead = trainer, recorder, Path(run_dir), lead
        self.fields, self.note, self.run_state = fields, note, run_state
        self.window = LossWindow(window or trainer.train.log_every)
        self.bar: tqdm | None = None

    def start(self, *, eval_first: bool = False, progress: bool = False) -> None:
        """``eval_first``: a fresh run's evaluation at step 0 (the eval curve's start). ``progress``: a bar, on a
        terminal only (tqdm's ``disable=None``: redirected output gets no carriage-return frames)."""
        t = self.trainer
        if eval_first and t.train.eval_every and t.step == 0:
            self.log(0, t.evaluate())  # (a pipeline stage but the last evaluates to {}: it passes activations on)
        if progress:
            self.bar = tqdm(total=t.end_step, initial=t.step, desc="train", unit="step",
                            disable=None if t.train.progress else True, dynamic_ncols=True)
        t.start_clock(self.recorder)

    def log_due(self) -> bool:
        t = self.trainer
        return t.step % t.train.log_every == 0 or t.step == t.end_step

    def record(self, loss, samples: int, lr: float | None, row: dict | None = None) -> dict:
        """A step the trainer took: :meth:`count` it, then :meth:`after_step`."""
        self.count(loss, samples)
        return self.after_step(lr, row)

    def count(self, loss, samples: int) -> None:
        """Count a step's loss (None: not known here) and samples."""
        if loss is not None:
            self.window.add(loss)
        self.trainer.samples += samples
        if self.bar is not None:
            self.bar.update(1)

    def after_step(self, lr: float | None, row: dict | None = None) -> dict:
        """The step's row and cadence. ``row``: fields logged at this step whatever the cadence (DiLoCo's outer
        steps). Returns the evaluation, if one was due."""
        t = self.trainer
        row = dict(row or {})
        if self.log_due():
            row.update(self.log_row(lr))
        if self.lead:
            return t.after_step(self.recorder, self.run_dir, row, self.run_state)
        if row:
            self.recorder.log(t.step, **row)  # a worker's own sinks (Prometheus, W&B)
        return {}

    def log_row(self, lr: float | None) -> dict:
        """A log step's fields: the lead's loss (if known here), lr, samples and samples/s, then the algorithm's."""
        t, extra = self.trainer, self.fields() if self.fields is not None else {}
        if not self.lead:
            return extra
        rate, loss = t.rate, self.window.mean()
        row = {**({"loss": loss} if loss is not None else {}), "lr": lr, "samples": t.samples,
               "samples_per_s": round(rate, 2), **extra}
        if self.bar is not None and loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:,.0f}")
        if self.note is not None:
            logger.info(f"step {t.step}/{t.end_step} loss {loss:.4f} ({rate:,.0f} samples/s, {self.note(row)})")
        return row

    def run(self, step: Callable[[], tuple | None]) -> None:
        """Step until the run's end; ``step()`` returns (loss, samples, lr), or None when no update was applied."""
        while self.trainer.step < self.trainer.end_step:
            took = step()
            if took is not None:
                self.record(*took)

    def finish(self, algo: str, *, evaluation: dict | None = None, final_loss: float | None = None,
               summarise: bool = True, **extra) -> dict | None:
        """The end: the final evaluation (``evaluation``: one the algorithm made) logged, the checkpoint, and
        (``summarise``) summary.json with the algorithm's ``extra`` figures. ``final_loss``: by default the
        window's."""
        t = self.trainer
        if self.bar is not None:
            self.bar.close()
        evaluation = t.evaluate() if evaluation is None else evaluation
        self.log(t.step, evaluation)
        t.save(self.run_dir, self.run_state() if self.run_state is not None else None)  # after the last row
        summary = None
        if summarise:
            final_loss = self.window.mean() if final_loss is None else final_loss
            summary = t.summary(algo, final_loss, evaluation, self.run_dir, **extra)
        return self.recorder.finish(summary)

    def log(self, step: int, evaluation: dict) -> None:
        if evaluation:
            self.recorder.log(step, **evaluation)
