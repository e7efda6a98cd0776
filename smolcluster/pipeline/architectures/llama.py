"""Llama-shaped stages (Llama 2/3.x, SmolLM2, TinyLlama; Mistral and Qwen reuse them), in plain PyTorch.

One pre-norm decoder block: RMSNorm -> attention with rotary positions (RoPE) and
grouped-query heads -> residual -> RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm and
an LM head that may be the token embedding (``tie_word_embeddings``). The families
differ only by flags read from ``config.json`` (:class:`LlamaShape`): biases on q/k/v
(Qwen2), per-head q/k RMSNorm (Qwen3), a sliding attention window (Mistral).

The tensor operations and their order are those of ``transformers``' ``modeling_llama.py``
(v5, sdpa attention: including its choice between ``enable_gqa``, packed single-query
heads and repeated keys, and its ``DynamicCache`` whose ``torch.cat`` makes keys
contiguous), so a stage's outputs equal the ``transformers`` model's bit for bit.
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
class LlamaShape:
    model_type: str
    vocab_size: int
    hidden: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    eps: float
    context: int
    tied: bool
    pad_token_id: int | None
    qkv_bias: bool                        # biases on q/k/v projections
    o_bias: bool                          # a bias on the output projection
    mlp_bias: bool
    qk_norm: bool                         # Qwen3: RMSNorm over each head's q and k
    windows: tuple[int | None, ...]       # per layer: the sliding attention window, None = full
    rope: tuple                           # (rope_type, theta, scaling items) -> inv_freq


def rope_parameters(config: dict) -> dict:
    """``rope_parameters`` as transformers v5 writes them, or built from v4's rope_theta + rope_scaling."""
    params = config.get("rope_parameters")
    if not params:
        params = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inv_freq(rope: dict, head_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies, computed as transformers' ``modeling_rope_utils`` does (float32, CPU)."""
    kind, base, dim = rope["rope_type"], rope["rope_theta"], head_dim
    if kind == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))
    if kind == "linear":
        return freq / rope["factor"]
    # llama3 (Llama 3.1/3.2): long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


ROPE_TYPES = ("default", "linear", "llama3")


def llama_shape(config: dict, *, qkv_bias: bool | None = None, o_bias: bool | None = None, qk_norm: bool = False,
                windows: list[int | None] | None = None) -> LlamaShape:
    """A :class:`LlamaShape` from a ``config.json`` dict; the keyword flags are the family's differences."""
    model_type = config.get("model_type", "llama")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        refuse(model_type, "hidden_act", act, "silu")
    rope = rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise ConfigError(f"{model_type}: rope type {rope['rope_type']!r} is not implemented by the pipeline's "
                          f"stages (they implement {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(model_type, "partial_rotary_factor", rope["partial_rotary_factor"], 1.0)
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or hidden // n_head
    if n_head % n_kv:
        raise ConfigError(f"{model_type}: num_attention_heads={n_head} is not a multiple of "
                          f"num_key_value_heads={n_kv}")
    n_layer = config["num_hidden_layers"]
    bias = bool(config.get("attention_bias", False))
    scaling = tuple(sorted((k, v) for k, v in rope.items() if isinstance(v, (int, float, str))))
    return LlamaShape(
        model_type=model_type, vocab_size=config["vocab_size"], hidden=hidden, n_layer=n_layer, n_head=n_head,
        n_kv_head=n_kv, head_dim=head_dim, intermediate=config["intermediate_size"],
        eps=config.get("rms_norm_eps", 1e-6), context=config.get("max_position_embeddings", 2048),
        tied=bool(config.get("tie_word_embeddings", False)), pad_token_id=config.get("pad_token_id"),
        qkv_bias=bias if qkv_bias is None else qkv_bias, o_bias=bias if o_bias is None else o_bias,
        mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=qk_norm,
        windows=tuple(windows) if windows is not None else (None,) * n_layer, rope=scaling)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    # smolcluster.inference.compiled.llama_blocks repeats this math (norms, projections, RoPE, grouped sdpa) over
    # slot caches for the compiled decode step: a change here must be made there too (tests/test_compiled.py).
    def __init__(self, s: LlamaShape, window: int | None):
        super().__init__()
        self.head_dim, self.groups, self.window = s.head_dim, s.n_head // s.n_kv_head, window
        self.scaling = s.head_dim ** -0.5
        self.q_proj = nn.Linear(s.hidden, s.n_head * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.n_kv_head * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.n_kv_head * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.n_head * s.head_dim, s.hidden, bias=s.o_bias)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.eps)
            self.k_norm = RMSNorm(s.head_dim, s.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list | None,
                j: int = 0) -> torch.Tensor:
        """``segments``: None (training), else one (cache, first row, rows, past length) per request,
        from :meth:`Batch.segments`; each request attends over its own cache's block j."""
        input_shape = x.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q = self.q_norm(self.q_proj(x).view(hidden_shape)).transpose(1, 2)
            k = self.k_norm(self.k_proj(x).view(hidden_shape)).transpose(1, 2)
        else:
            q = self.q_proj(x).view(hidden_shape).transpose(1, 2)
            k = self.k_proj(x).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(x).view(hidden_shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
        if segments is None:
            out = self.attend(q, k, v, None, j, 0)
        elif len(segments) == 1:
            out = self.attend(q, k, v, segments[0][0], j, segments[0][3])
        else:
            out = torch.cat([self.attend(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n], cache, j, past_len)
                             for cache, a, n, past_len in segments], dim=1)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())

    def attend(self, q, k, v, cache: KVCache | None, j: int, past_len: int) -> torch.Tensor:
        """One request's attention, (1, rows, heads, head_dim)."""
        if cache is not None:
            # A sliding window keeps only the window - 1 latest keys: the next query sees those and itself.
            k, v = cache.append(j, k, v, keep=self.window - 1 if self.window is not None else None)
        else:
            # transformers keeps keys in a cache even when training; its torch.cat makes them contiguous.
            k, v = k.contiguous(), v.contiguous()
        q_len, kv_len = q.shape[2], k.shape[2]
        mask = None
        if self.window is not None and kv_len >= self.window:
            # transformers materialises the sliding-window mask once the keys reach the window.
            q_pos = torch.arange(q_len, device=q.device) + past_len
            k_pos = torch.arange(kv_len, device=q.device) + (past_len + q_len - kv_len)
            diff = q_pos[:, None] - k_pos[None, :]
            mask = ((diff >= 0) & (diff < self.window)).view(1, 1, q_len, kv_len)
        elif 1 < q_len < kv_len:  # a later chunk of a prompt: the whole past, causal within the chunk
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        kw = {}
        if self.groups > 1:
            if mask is None:
                kw["enable_gqa"] = True
            elif q_len == 1:  # one query: each kv head's group of query heads as a sequence
                q = q.reshape(q.shape[0], q.shape[1] // self.groups, self.groups, q.shape[-1])
            else:
                k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                             is_causal=q_len > 1 and mask is None, **kw)
        return out.reshape(out.shape[0], -1, q_len, v.shape[-1]).transpose(1, 2).contiguous()


class MLP(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=s.mlp_bias)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=s.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, s: LlamaShape, window: int | None):
        super().__init__()
        self.self_attn = Attention(s, window)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden, s.eps)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.eps)

    def forward(self, x, cos, sin, segments=None, j: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, j)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(nn.Module):
    """Blocks ``blocks`` of a Llama-shaped model, with the token embedding when ``embed`` and the
    final norm + LM head when ``head`` (a tied head holds the embedding, as GPT-2's does)."""

    def __init__(self, s: LlamaShape, embed: bool, head: bool, blocks: range):
        super().__init__()
        self.shape, self.has_embed, self.has_head, self.blocks = s, embed, head, blocks
        self.model = nn.Module()
        m = self.model
        if embed or (head and s.tied):
            # Left uninitialised (the values come from a file or the full model); padding_idx as
            # transformers sets it, since it keeps that row's gradient at zero.
            m.embed_tokens = nn.Embedding(s.vocab_size, s.hidden, s.pad_token_id,
                                          _weight=torch.empty(s.vocab_size, s.hidden))
        m.layers = nn.ModuleDict({str(i): Block(s, s.windows[i]) for i in blocks})
        if head:
            m.norm = RMSNorm(s.hidden, s.eps)
            if not s.tied:
                self.lm_head = nn.Linear(s.hidden, s.vocab_size, bias=False)
        # Real memory even when the stage is built on the meta device: nothing loads it from a file.
        self.register_buffer("inv_freq", inv_freq(dict(s.rope), s.head_dim), persistent=False)

    def embed(self, ids: torch.Tensor, past_len: int | torch.Tensor = 0) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (attention_scaling is 1 for these rope types)

    def run_blocks(self, x: torch.Tensor, cache: KVCache | Batch | None = None) -> torch.Tensor:
        batch = as_batch(x, cache)
        if batch is None:
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        else:
            positions = batch.positions(x.device)
        cos, sin = self.rope(x, positions)
        segments = batch.segments() if batch is not None else None
        for j, block in enumerate(self.model.layers.values()):
            x = block(x, cos, sin, segments, j)
        if batch is not None:
            batch.advance()
        return x

    def logits(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:, :]  # what generate() does (logits_to_keep=1): only the next token's logits
        return project(x, self.model.embed_tokens if self.shape.tied else self.lm_head)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.has_embed:
            x = self.embed(x)
        x = self.run_blocks(x, cache)
        return self.logits(x) if self.has_head else x


class Llama(Architecture):
    model_type = "llama"
    embed_name = "model.embed_tokens.weight"

    def __init__(self, config: dict):
        self.shape = self.read(config)
        s = self.shape
        self.vocab_size, self.context, self.n_layer, self.tied = s.vocab_size, s.context, s.n_layer, s.tied
        self.head_name = self.embed_name if s.tied else "lm_head.weight"

    @staticmethod
    def read(config: dict) -> LlamaShape:
        return llama_shape(config)

    def param_shapes(self, embed: bool, head: bool, blocks: range) -> list[tuple[str, tuple]]:
        s, out = self.shape, []
        h, d = s.hidden, s.head_dim
        if embed or (head and s.tied):
            out.append((self.embed_name, (s.vocab_size, h)))
        for i in blocks:
            p = f"model.layers.{i}."
            for name, n_out, bias in (("q_proj", s.n_head * d, s.qkv_bias), ("k_proj", s.n_kv_head * d, s.qkv_bias),
                                      ("v_proj", s.n_kv_head * d, s.qkv_bias)):
                out.append((f"{p}self_attn.{name}.weight", (n_out, h)))
                if bias:
                    out.append((f"{p}self_attn.{name}.bias", (n_out,)))
            out.append((f"{p}self_attn.o_proj.weight", (h, s.n_head * d)))
            if s.o_bias:
                out.append((f"{p}self_attn.o_proj.bias", (h,)))
            if s.qk_norm:
                out += [(f"{p}self_attn.q_norm.weight", (d,)), (f"{p}self_attn.k_norm.weight", (d,))]
            for name, shape in (("gate_proj", (s.intermediate, h)), ("up_proj", (s.intermediate, h)),
                                ("down_proj", (h, s.intermediate))):
                out.append((f"{p}mlp.{name}.weight", shape))
                if s.mlp_bias:
                    out.append((f"{p}mlp.{name}.bias", shape[:1]))
            out += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
        if head:
            out.append(("model.norm.weight", (h,)))
            if not s.tied:
                out.append(("lm_head.weight", (s.vocab_size, h)))
        return out

    def kv_bytes_per_token(self, n_blocks: int, element_size: int) -> int:
        return 2 * n_blocks * self.shape.n_kv_head * self.shape.head_dim * element_size

    def stage(self, embed: bool, head: bool, blocks: range) -> LlamaStage:
        return LlamaStage(self.shape, embed, head, blocks)
