"""LLaMA-style decoder: RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention.

Shape legend: B batch, T new positions, Tk cached + new positions, E model width,
H query heads, G key/value heads, D head dim, F FFN width, V vocabulary.

Module names follow the Hugging Face checkpoint (`self_attn.q_proj`, `mlp.gate_proj`, ...)
so the key map in `loupe.checkpoints` stays a short table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loupe.config import TextConfig
from loupe.nn.attention import Kernel, attend
from loupe.nn.kv_cache import LayerCache
from loupe.nn.rope import Rope


@dataclass
class AttnContext:
    """What every self-attention of one forward shares."""

    rope: Rope  # angles of the new positions, each (B, T, D)
    mask: torch.Tensor | None  # (B, 1, T, Tk) bool; None: see `causal`
    causal: bool  # with mask None: True = plain causal (T == Tk), False = see every key
    kernel: Kernel = "sdpa"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, E)


class SelfAttention(nn.Module):
    """Grouped-query self-attention. `heads`/`merge` are public so methods can compose
    their own attention (extra keys, extra rows) from the same projections."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        e, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(e, cfg.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(e, cfg.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(e, cfg.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, e, bias=bias)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n*D) -> (B, n, T, D)."""
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, H*D)."""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).reshape(b, t, -1)

    def qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (B, H, T, D), rotated keys and values (B, G, T, D)."""
        q = rope.apply(self.heads(self.q_proj(x), self.num_heads))
        k = rope.apply(self.heads(self.k_proj(x), self.num_kv_heads))
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx.rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, G, Tk, D)
        out, _ = attend(q, k, v, ctx.mask, causal=ctx.causal, kernel=ctx.kernel)  # (B, H, T, D)
        return self.o_proj(self.merge(out))  # (B, T, E)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        return self.feed_forward(self.attention_residual(x, ctx, cache))

    def attention_residual(self, x: torch.Tensor, ctx: AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), ctx, cache)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding, the layer stack, final norm and LM head. The layer loop itself
    belongs to the method (see `loupe.methods`), so methods can change it."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return Rope.at(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))  # (B, T, V)
