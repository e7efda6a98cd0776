"""What is being minimised and how it is judged: classification or next-token prediction."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.models import model_output_logits


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: over samples (classifier) or over every token (language model) whose target is not
    -100 (``F.cross_entropy``'s ignore_index: what data=chat puts on every token but the assistant's)."""
    return cross_entropy(model_output_logits(model(x)), y)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss of logits (rows x classes, or rows x tokens x vocabulary) against their targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).to(logits.device), reduction=reduction)


def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """One evaluation batch's (summed loss, correct predictions, scored targets): the sums :func:`figures` reads."""
    flat_logits, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1).to(logits.device)
    scored = flat_y != -100  # targets data=chat masks out (cross_entropy's ignore_index)
    return (F.cross_entropy(flat_logits, flat_y, reduction="sum").item(),
            (flat_logits.argmax(-1) == flat_y)[scored].sum().item(), scored.sum().item())


def figures(loss_sum: float, correct: int, count: int, kind: str) -> dict[str, float]:
    """The evaluation's figures from its sums: loss, and accuracy (classifier) or perplexity (language model)."""
    out = {"eval_loss": loss_sum / max(count, 1)}
    if kind == "classifier":
        out["eval_accuracy"] = correct / count
    else:
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out


# The most logits one evaluation batch may hold (floats): a language model's logits are rows x tokens x vocab,
# so 512 rows of 128 tokens over SmolLM2's 49k vocabulary would be 13 GB. Batches of LM rows are sized to this.
LOGITS_BUDGET = 2**25


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, device: torch.device,
             batch_size: int = 512, max_samples: int = 0, logits_budget: int = LOGITS_BUDGET) -> dict[str, float]:
    """Loss (and accuracy for classifiers) on held-out data; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    n = len(x) if not max_samples else min(max_samples, len(x))
    total_loss, correct, count = 0.0, 0, 0
    i, rows = 0, 1 if kind == "lm" else batch_size  # an LM's first row tells how large its logits are
    while i < n:
        xb, yb = x[i : min(i + rows, n)].to(device), y[i : min(i + rows, n)].to(device)
        i += len(xb)
        logits = model_output_logits(model(xb))
        if kind == "lm":
            rows = max(1, min(batch_size, logits_budget * len(xb) // logits.numel()))
        batch_loss, batch_correct, batch_count = score(logits, yb)
        total_loss, correct, count = total_loss + batch_loss, correct + batch_correct, count + batch_count
    model.train(was_training)
    return figures(total_loss, correct, count, kind)
