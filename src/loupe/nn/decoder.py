"""LLaMA-style decoder: RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention
(with q/k/v bias where the config asks, as Qwen2).

Shape legend: B batch, T new positions, Tk cached + new positions, E model width,
H query heads, G key/value heads, D head dim, F FFN width, V vocabulary, R chosen rows,
S extra key columns, C returned probability columns.

Methods compose with these layers instead of re-implementing them: `DecoderLayer.forward`
is the plain layer; `forward_rows` the same layer with a few rows recomputed explicitly
(their probabilities returned, optionally extra keys/values only they see);
`attention_residual` + `feed_forward` are the two halves a fused sublayer goes between
(`loupe.nn.fusion`).

Module names follow the Hugging Face checkpoint (`self_attn.q_proj`, `mlp.gate_proj`, ...)
so the key map in `loupe.checkpoints` stays a short table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loupe.config import TextConfig
from loupe.nn.attention import Kernel, attend, row_attention, row_key_mask
from loupe.nn.kv_cache import KVStore
from loupe.nn.rope import Rope

T = TypeVar("T")


@dataclass
class AttnContext:
    """What every self-attention of one forward shares."""

    rope: Rope  # angles of the new positions, each (B, T, D)
    mask: torch.Tensor | None  # (B, 1, T, Tk) bool; None: see `causal`
    causal: bool  # with mask None: True = plain causal (T == Tk), False = see every key
    kernel: Kernel = "sdpa"
    key_valid: torch.Tensor | None = None  # (B, Tk) False at padding (needed by `Rows`)


@dataclass
class ExtraKeys:
    """Key/value columns that only the chosen rows see (FlexAttention's HR keys), rotated already."""

    keys: torch.Tensor  # (B, G, S, D)
    values: torch.Tensor  # (B, G, S, D)
    mask: torch.Tensor  # (B, R, S) True where a chosen row may attend
    gate: float = 1.0  # the rows' output: (1 - gate) * without + gate * with these columns


@dataclass
class Rows:
    """Query rows a layer recomputes explicitly, so that their attention probabilities can
    be read while every row still goes through the fused kernel (the score-rows seam)."""

    index: torch.Tensor  # (B, R) index of each chosen row among the new rows
    valid: torch.Tensor  # (B, R) False at padding rows (their output is not replaced)
    extra: ExtraKeys | None = None  # columns only these rows see
    columns: torch.Tensor | None = None  # (B, C) key columns whose probabilities are returned (None: all)
    probs_without_extra: bool = False  # the probabilities as if `extra` were absent (same scores)
    all_valid: bool | None = None  # known on the host: every row is real (None: read `valid`, a host sync)


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
    """Grouped-query self-attention; `forward_rows` adds the chosen-rows path."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        e, hd = cfg.hidden_size, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(e, cfg.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(e, cfg.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(e, cfg.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, e, bias=cfg.attention_bias)

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

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx.rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, G, Tk, D)
        out, _ = attend(q, k, v, ctx.mask, causal=ctx.causal, kernel=ctx.kernel)  # (B, H, T, D)
        return self.o_proj(self.merge(out))  # (B, T, E)

    def forward_rows(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None,
                     rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every row, with the chosen rows recomputed explicitly (and, with
        `rows.extra`, over extra columns too). Returns the output (B, T, E) and the chosen
        rows' float32 probabilities (B, H, R, C) over `rows.columns` (or every column)."""
        if ctx.key_valid is None:
            raise ValueError("forward_rows needs AttnContext.key_valid")
        q, k, v = self.qkv(x, ctx.rope)  # (B, H, T, D), (B, G, T, D)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, G, Tk, D)
        key_mask = row_key_mask(rows.index, ctx.key_valid, q.shape[2])  # (B, R, Tk)
        extra = rows.extra
        # A decode step whose only row is a chosen row gets its whole output from the
        # explicit path below (with the gate fully open): the fused pass is skipped.
        only_rows = (q.shape[2] == 1 and (extra is None or extra.gate == 1.0)
                     and (rows.all_valid if rows.all_valid is not None else bool(rows.valid.all())))
        out = None if only_rows else attend(q, k, v, ctx.mask, causal=ctx.causal, kernel=ctx.kernel)[0]
        extra_kv = None if extra is None else (extra.keys, extra.values, extra.mask)
        rows_out, probs = row_attention(gather_rows(q, rows.index), k, v, key_mask, extra_kv,
                                        probs_without_extra=rows.probs_without_extra)
        assert rows_out is not None
        if out is None:
            out = rows_out  # T == R == 1
        elif extra is not None:
            rows_out = (1 - extra.gate) * gather_rows(out, rows.index) + extra.gate * rows_out
            out = scatter_rows(out, rows.index, rows.valid, rows_out)
        if rows.columns is not None:
            probs = probs.gather(3, rows.columns[:, None, None].expand(-1, probs.shape[1], probs.shape[2], -1))
        return self.o_proj(self.merge(out)), probs


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, R, D) at row indices (B, R)."""
    return x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) with its real rows (B, R) replaced by values (B, H, R, D)."""
    b_idx, r_idx = valid.nonzero(as_tuple=True)  # (K,) each
    out = x.clone()
    out[b_idx, :, rows[b_idx, r_idx]] = values[b_idx, :, r_idx]  # (K, H, D)
    return out


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `checkpointed` set (`loupe.distributed.enable_activation_checkpointing`), training
    forwards keep only the layer's inputs and recompute the rest in backward. The public
    entry points (`forward`, `forward_rows`, `attention_residual`, `feed_forward`) never call
    each other, so FSDP2 can gather the layer's parameters around each of them
    (`register_fsdp_forward_method`).
    """

    checkpointed: bool = False

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None = None) -> torch.Tensor:
        return self._run(self._layer, x, ctx, cache)

    def forward_rows(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None,
                     rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer with chosen rows recomputed explicitly (see `SelfAttention.forward_rows`);
        returns the new hidden states and those rows' attention probabilities."""
        return self._run(self._layer_rows, x, ctx, cache, rows)

    def attention_residual(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None = None) -> torch.Tensor:
        return self._attention_residual(x, ctx, cache)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._feed_forward(x)

    # ---- the computation ------------------------------------------------------------
    def _run(self, fn: Callable[..., T], x: torch.Tensor, ctx: AttnContext, cache: KVStore | None,
             *rest: object) -> T:
        # Recompute only in a training forward without a cache (a cache is written in place).
        if self.checkpointed and self.training and cache is None and torch.is_grad_enabled():
            return checkpoint(fn, x, ctx, cache, *rest, use_reentrant=False)
        return fn(x, ctx, cache, *rest)

    def _layer(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None) -> torch.Tensor:
        return self._feed_forward(self._attention_residual(x, ctx, cache))

    def _layer_rows(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None,
                    rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        attn, probs = self.self_attn.forward_rows(self.input_layernorm(x), ctx, cache, rows)
        return self._feed_forward(x + attn), probs

    def _attention_residual(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), ctx, cache)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))  # (B, T, V)
