"""GPT-2 stages: a contiguous slice of GPT-2's layers, in plain PyTorch (no ``transformers`` import).

Why not Hugging Face's modules? A stage process should hold only its share of the
model, and importing ``transformers`` alone costs ~150 MB of RSS. So this file
re-states GPT-2's forward pass with the very same tensor operations, in the same
order, as ``transformers``' ``GPT2LMHeadModel`` (sdpa attention, ``addmm``
Conv1D, tanh-GELU): outputs and gradients match it bit
for bit, which the tests check.

Parameter names are the full model's ``named_parameters()`` names
(``transformer.h.5.attn.c_attn.weight``), so a stage loads exactly its own tensors
from a whole-model checkpoint, and shards merge back into one by name.

GPT-2 ties the LM head to the token embedding (``transformer.wte.weight``). In
training the head sits on the last stage (the loss is computed there), so the first
and last stage each hold a copy under the same name and keep them equal by summing
their gradients (see ``train.py``). In inference the head may sit on the first stage
instead, so the embedding is held once (see ``inference/stage.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smolcluster.errors import ConfigError
from smolcluster.pipeline.architectures.base import Architecture, Batch, KVCache, as_batch, refuse
from smolcluster.pipeline.quantize import project


@dataclass(frozen=True)
class GPT2Shape:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_head: int
    n_layer: int
    eps: float = 1e-5

    def block_params(self) -> int:
        c = self.n_embd
        return 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)


def param_shapes(shape: GPT2Shape, embed: bool, head: bool, blocks: range) -> list[tuple[str, tuple]]:
    """(name, shape) of a stage's parameters in the order GPT2LMHeadModel.named_parameters() lists them."""
    c, out = shape.n_embd, []
    if embed or head:
        out.append(("transformer.wte.weight", (shape.vocab_size, c)))
    if embed:
        out.append(("transformer.wpe.weight", (shape.n_positions, c)))
    for i in blocks:
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (c,)), (p + "ln_1.bias", (c,)),
                (p + "attn.c_attn.weight", (c, 3 * c)), (p + "attn.c_attn.bias", (3 * c,)),
                (p + "attn.c_proj.weight", (c, c)), (p + "attn.c_proj.bias", (c,)),
                (p + "ln_2.weight", (c,)), (p + "ln_2.bias", (c,)),
                (p + "mlp.c_fc.weight", (c, 4 * c)), (p + "mlp.c_fc.bias", (4 * c,)),
                (p + "mlp.c_proj.weight", (4 * c, c)), (p + "mlp.c_proj.bias", (c,))]
    if head:
        out += [("transformer.ln_f.weight", (c,)), ("transformer.ln_f.bias", (c,))]
    return out


class Conv1D(nn.Module):
    """GPT-2's transposed linear layer: weight is (in, out); the same ``addmm`` as transformers'."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.empty(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """OpenAI GPT's tanh GELU. Training: written exactly as transformers' NewGELUActivation, so ``algo=mp``
    stays bit-identical to ``local``. Serving (inference mode): torch's fused tanh GELU, the same function in
    one op instead of eight, within 2.4e-7 of it (~14 us less per block at decode on CPU, where a gpt2-tiny
    token costs ~1.2 ms; docs/benchmarks.md)."""
    if torch.is_inference_mode_enabled():
        return F.gelu(x, approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, n_embd // n_head
        self.scaling = self.head_dim ** -0.5
        self.c_attn = Conv1D(n_embd, 3 * n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)

    def forward(self, x: torch.Tensor, segments: list | None, j: int = 0) -> torch.Tensor:
        """``segments``: None (training: plain causal), else one (cache, first row, rows, past length)
        per request, from :meth:`Batch.segments`; each request attends over its own cache's block j."""
        q, k, v = self.c_attn.forward(x).chunk(3, dim=2)  # (Tensor.split is a Python wrapper; chunk: the same views)
        shape = (*k.shape[:-1], -1, self.head_dim)
        q, k, v = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
        if segments is None:
            out = self.attend(q, k, v, None, j)
        elif len(segments) == 1:
            out = self.attend(q, k, v, segments[0][0], j)
        else:
            out = torch.cat([self.attend(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], cache, j)
                             for cache, a, n, _ in segments], dim=2)
        # (batch, heads, rows, head_dim) -> (batch, rows, n_embd): transformers' transpose + contiguous + reshape,
        # in one copy (reshape copies a transposed tensor into contiguous memory: the same values)
        return self.c_proj.forward(out.transpose(1, 2).reshape(*x.shape[:-1], self.n_embd))

    def attend(self, q, k, v, cache: KVCache | None, j: int) -> torch.Tensor:
        if cache is not None:
            k, v = cache.append(j, k, v)  # views of the request's preallocated buffers
        else:
            # transformers runs even training through a DynamicCache, whose torch.cat makes k/v
            # contiguous; match that layout so sdpa takes the same kernel path.
            k, v = k.contiguous(), v.contiguous()
        q_len, kv_len = q.shape[2], k.shape[2]
        # Prefill (q_len > 1) on an empty cache is plain causal; one new token attends to everything;
        # a later chunk of a prompt (chunked prefill) sees the whole past and is causal within itself.
        mask = None
        if 1 < q_len < kv_len:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                              is_causal=q_len > 1 and mask is None)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = Conv1D(n_embd, 4 * n_embd)
        self.c_proj = Conv1D(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj.forward(gelu_new(self.c_fc.forward(x)))


class Block(nn.Module):
    def __init__(self, shape: GPT2Shape):
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.n_embd, eps=shape.eps)
        self.attn = Attention(shape.n_embd, shape.n_head)
        self.ln_2 = nn.LayerNorm(shape.n_embd, eps=shape.eps)
        self.mlp = MLP(shape.n_embd)

    def forward(self, x: torch.Tensor, segments: list | None = None, j: int = 0) -> torch.Tensor:
        # Submodules run through .forward(), not nn.Module.__call__: its hook checks cost ~2 us a call, and a
        # decode step makes 8 such calls per block, a fifth of a gpt2-tiny block's CPU time (measured,
        # docs/benchmarks.md). Nothing registers hooks on a stage's modules.
        x = self.attn.forward(self.ln_1.forward(x), segments, j) + x
        return x + self.mlp.forward(self.ln_2.forward(x))


class GPT2Stage(nn.Module):
    """Blocks ``blocks`` of a GPT-2, with the embeddings when ``embed`` and ln_f + LM head when ``head``.

    The pieces are separate methods because inference may place the head on the first
    stage (the pipeline is then a ring: the last stage's hidden state comes back to the
    stage that already holds the tied embedding). :meth:`forward` chains what the stage
    has, in model order, for training: ids or hidden states in, hidden states or logits out.
    """

    def __init__(self, shape: GPT2Shape, embed: bool, head: bool, blocks: range):
        super().__init__()
        self.shape, self.has_embed, self.has_head, self.blocks = shape, embed, head, blocks
        self.transformer = nn.Module()
        t = self.transformer
        # Parameters are left uninitialised: a stage always takes its values from a checkpoint or
        # the full model. (Embedding's own init, run on the meta device, would import ~70 MB of code.)
        if embed or head:
            t.wte = nn.Embedding(shape.vocab_size, shape.n_embd, _weight=torch.empty(shape.vocab_size, shape.n_embd))
        if embed:
            t.wpe = nn.Embedding(shape.n_positions, shape.n_embd, _weight=torch.empty(shape.n_positions, shape.n_embd))
        t.h = nn.ModuleDict({str(i): Block(shape) for i in blocks})
        if head:
            t.ln_f = nn.LayerNorm(shape.n_embd, eps=shape.eps)

    def embed(self, ids: torch.Tensor, past_len: int | torch.Tensor = 0) -> torch.Tensor:
        """``past_len``: the first token's position, or every token's (a :meth:`Batch.positions`)."""
        t = self.transformer
        if isinstance(past_len, torch.Tensor):
            positions = past_len
        else:
            positions = (torch.arange(ids.shape[1], device=ids.device) + past_len).unsqueeze(0)
        return t.wte.forward(ids) + t.wpe.forward(positions)  # .forward: no hook checks (see Block.forward)

    def run_blocks(self, x: torch.Tensor, cache: KVCache | Batch | None = None) -> torch.Tensor:
        batch = as_batch(x, cache)
        segments = batch.segments() if batch is not None else None
        for j, block in enumerate(self.transformer.h.values()):
            x = block.forward(x, segments, j)
        if batch is not None:
            batch.advance()
        return x

    def logits(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        x = self.transformer.ln_f.forward(x)
        if last_only:
            x = x[:, -1:, :]  # what generate() does (logits_to_keep=1): only the next token's logits
        return project(x, self.transformer.wte)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.has_embed:
            x = self.embed(x, cache.length if cache is not None else 0)
        x = self.run_blocks(x, cache)
        return self.logits(x) if self.has_head else x


def shape_of(config) -> GPT2Shape:
    """The GPT2Shape of a transformers GPT2Config (or its ``config.json`` dict), refusing variants
    this file does not implement."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    unsupported = {
        "activation_function": (get("activation_function", "gelu_new"), "gelu_new"),
        "tie_word_embeddings": (get("tie_word_embeddings", True), True),
        "scale_attn_weights": (get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (get("scale_attn_by_inverse_layer_idx", False), False),
        "reorder_and_upcast_attn": (get("reorder_and_upcast_attn", False), False),
        "add_cross_attention": (get("add_cross_attention", False), False),
        "n_inner": (get("n_inner"), None),
    }
    for key, (value, want) in unsupported.items():
        if value != want:
            refuse("GPT-2", key, value, want)
    n_embd, n_head = get("n_embd"), get("n_head")
    if not n_head or n_embd % n_head:
        raise ConfigError(f"GPT-2: n_embd={n_embd} is not divisible by n_head={n_head}; set model.n_head")
    return GPT2Shape(get("vocab_size"), get("n_positions"), n_embd, n_head, get("n_layer"),
                     get("layer_norm_epsilon", 1e-5))


class GPT2(Architecture):
    model_type = "gpt2"
    embed_name = head_name = "transformer.wte.weight"
    tied = True

    def __init__(self, config: dict):
        self.shape = shape_of(config)
        self.vocab_size, self.context, self.n_layer = self.shape.vocab_size, self.shape.n_positions, self.shape.n_layer

    def param_shapes(self, embed: bool, head: bool, blocks: range) -> list[tuple[str, tuple]]:
        return param_shapes(self.shape, embed, head, blocks)

    def kv_bytes_per_token(self, n_blocks: int, element_size: int) -> int:
        return 2 * n_blocks * self.shape.n_embd * element_size

    def stage(self, embed: bool, head: bool, blocks: range) -> GPT2Stage:
        return GPT2Stage(self.shape, embed, head, blocks)
